//! Shared test harness: the real relay on 127.0.0.1:0 with a real SQLite spool
//! in a temp dir and an injected clock, a minimal HTTP client, and the vectors.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use wxrelay::app::{Options, Relay};
use wxrelay::clock::FixedClock;
use wxrelay::config::Settings;
use wxrelay::spool::{DeadFilter, Spool, SqliteSpool};

pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub spool: Arc<SqliteSpool>,
    pub clock: Arc<FixedClock>,
    pub dir: tempfile::TempDir,
}

impl TestRelay {
    /// Starts the relay on `toml` (the spool path is replaced by a temp file).
    pub async fn start(toml: &str, now_secs: i64) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}"));
        let spool = Arc::new(SqliteSpool::open(&dir.path().join("spool.db")).unwrap());
        let clock = Arc::new(FixedClock::at_secs(now_secs));
        let relay = Relay::start(
            settings,
            Options {
                public: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                admin: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
                spool: Some(spool.clone()),
                clock: Some(clock.clone()),
            },
        )
        .await
        .unwrap();
        TestRelay {
            addr: relay.public_addr,
            admin: relay.admin_addr,
            relay: Some(relay),
            spool,
            clock,
            dir,
        }
    }

    pub async fn post(&self, path_and_query: &str, body: impl Into<Bytes>) -> Answer {
        send(self.addr, Method::POST, path_and_query, body.into()).await
    }

    /// A POST that owns what it needs, to spawn several at once.
    pub fn post_later(
        &self,
        path_and_query: String,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Answer> + Send + 'static {
        let addr = self.addr;
        async move { send(addr, Method::POST, &path_and_query, body.into()).await }
    }

    /// No delivery is waiting in the spool.
    pub async fn nothing_pending(&self) -> bool {
        self.spool.depth().await.unwrap().is_empty()
    }

    pub async fn get(&self, path_and_query: &str) -> Answer {
        send(self.addr, Method::GET, path_and_query, Bytes::new()).await
    }

    /// Every event stored as an `unrouted` dead letter, oldest first.
    pub async fn unrouted(&self) -> Vec<wxrelay::spool::StoredEvent> {
        let filter = DeadFilter {
            reason: Some("unrouted".into()),
            ..Default::default()
        };
        let mut events = Vec::new();
        for d in self.spool.dead_letters(filter, 100_000).await.unwrap() {
            events.push(self.spool.event(d.event_id).await.unwrap().unwrap());
        }
        events.sort_by_key(|e| e.event_id);
        events
    }

    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(addr: SocketAddr, method: Method, path_and_query: &str, body: Bytes) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", addr.to_string())
        .header("content-type", "text/xml")
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("the relay answers")
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Polls `check` until it holds or `within` passes; for waiting on effects that
/// happen on other tasks, without sleeping a guessed amount.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
