//! Durable ingest with and without group commit, in one run on one machine.
//!
//! `cargo bench --bench ingest [-- PUSHES CONNECTIONS]` starts the real relay
//! twice on a fresh SQLite spool (WAL, synchronous=FULL): once with group
//! commit (the default, up to 512 requests per commit) and once with one
//! commit per push. The same client sends the same number of distinct,
//! correctly signed and encrypted pushes over keep-alive connections, and the
//! run prints pushes/s for each and their ratio.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use wxrelay::app::{Options, Relay};
use wxrelay::config::Settings;
use wxrelay::spool::SqliteSpool;
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::push::{self, Envelope, Sealing};

const TOKEN: &str = "Relay2024Token";
const KEY: &str = "R3layV3ct0rsEncodingAesKeyForTests0123456Zq";
const APP_ID: &str = "wx5f3c9a1e7d2b4c60";

fn config() -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [accounts.main]\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\nencoding_aes_key = \"{KEY}\"\nmode = \"secure\"\n\n\
         [targets.sink]\nurl = \"http://127.0.0.1:9/unused\"\n\n\
         [[routes]]\nto = [\"sink\"]\n"
    )
}

/// Distinct text messages, sealed as WeChat would, stamped now.
fn pushes(n: usize, seed: u64) -> Vec<(String, Bytes)> {
    let key = AesKey::from_encoding(KEY).unwrap_or_else(|e| panic!("{e}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    (0..n)
        .map(|i| {
            let id = seed * 10_000_000 + i as u64;
            let xml = format!(
                "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName><FromUserName><![CDATA[oBenchUser{:018}]]></FromUserName><CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello {id}]]></Content><MsgId>{id}</MsgId></xml>",
                id % 1000
            );
            let nonce = id.to_string();
            let p = push::build(
                &xml,
                Sealing::Secure(&key),
                &Envelope { token: TOKEN, app_id: APP_ID, timestamp: now, nonce: &nonce, openid: None, random: &[b'b'; 16] },
            );
            (format!("/wx/main?{}", p.query), Bytes::from(p.body))
        })
        .collect()
}

/// Sends every push over `connections` keep-alive connections; returns pushes/s.
async fn drive(addr: SocketAddr, pushes: Vec<(String, Bytes)>, connections: usize) -> f64 {
    let queue = Arc::new(std::sync::Mutex::new(pushes));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(conn);
            let mut sent = 0usize;
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some((path, body)) = next else { break };
                let req = http::Request::post(path)
                    .header("host", "relay")
                    .header("content-type", "text/xml")
                    .body(Full::new(body))
                    .unwrap_or_else(|e| panic!("{e}"));
                let response = sender
                    .send_request(req)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                assert!(
                    status == 200 && &body[..] == b"success",
                    "answer {status} {body:?}"
                );
                sent += 1;
            }
            sent
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn run(max_batch: usize, n: usize, connections: usize, seed: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let spool = Arc::new(
        SqliteSpool::open_with_batch(&dir.path().join("spool.db"), max_batch)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let settings = Settings::from_toml_str(&config()).unwrap_or_else(|e| panic!("{e}"));
    let relay = Relay::start(
        settings,
        Options {
            public: Some(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            admin: Some(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
            spool: Some(spool.clone()),
            clock: None,
            config_path: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rate = drive(relay.public_addr, pushes(n, seed), connections).await;
    relay.shutdown().await;
    spool.close();
    rate
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(5_000);
    let connections = args.get(1).copied().unwrap_or(64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        // Warm up the allocator, the page cache and the client.
        run(512, 500, connections, 9).await;
        let grouped = run(512, n, connections, 1).await;
        let single = run(1, n, connections, 2).await;
        println!("durable ingest, {n} pushes over {connections} keep-alive connections (secure mode, fsync per commit)");
        println!("  group commit (up to 512 per commit): {grouped:>8.0} pushes/s");
        println!("  one commit per push:                 {single:>8.0} pushes/s");
        println!("  ratio group/single:                  {:>8.2}x", grouped / single);
    });
}
