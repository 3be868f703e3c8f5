//! The load harness: a realistic mix of distinct, correctly signed and
//! encrypted pushes, a client that drives a relay over keep-alive connections
//! (at saturation or at a fixed rate, timing each answer from when it was due),
//! counting sinks for the broker and the webhooks, the bare baseline server,
//! and resident-memory readings. Used by `cargo bench --bench load` and by the
//! smoke test in `tests/it/load_smoke.rs`, which each use a part of it. It
//! builds on the integration tests' `common` (free ports, waiting with a
//! deadline), which every user of this module includes.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::push::{self, PushParams, Sealing};

pub const TOKEN: &str = "Relay2024Token";
pub const KEY: &str = "R3layV3ct0rsEncodingAesKeyForTests0123456Zq";
pub const APP_ID: &str = "wx5f3c9a1e7d2b4c60";

/// What kind of push, by the route it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// subscribe with a scene and a Ticket, or SCAN: broker and webhooks.
    Login,
    /// text, CLICK or LOCATION: webhooks only.
    Other,
}

pub struct Push {
    pub path: String,
    pub body: Bytes,
    pub kind: PushKind,
}

/// Push number `i`: 20 % subscribe with a scene and Ticket, 10 % SCAN, 70 %
/// text, CLICK and LOCATION; each from its own user, so none dedups.
pub fn push(i: u64, now: i64, key: &AesKey) -> Push {
    let user = format!("oLoadTestUser{i:015}");
    let (kind, inner) = match i % 10 {
        0 | 1 => (PushKind::Login, format!("<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event><EventKey><![CDATA[qrscene_login:{i}]]></EventKey><Ticket><![CDATA[gQH47joAAAAAAAAAAS5odHRwOi8v{i}]]></Ticket>")),
        2 => (PushKind::Login, format!("<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[SCAN]]></Event><EventKey><![CDATA[login:{i}]]></EventKey><Ticket><![CDATA[gQH47joAAAAAAAAAAS5odHRwOi8v{i}]]></Ticket>")),
        3..=5 => (PushKind::Other, format!("<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[你好 load test message {i}]]></Content><MsgId>{}</MsgId>", 24_000_000_000_000_000 + i)),
        6 | 7 => (PushKind::Other, "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[CLICK]]></Event><EventKey><![CDATA[V1001_TODAY_MUSIC]]></EventKey>".to_string()),
        _ => (PushKind::Other, "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[LOCATION]]></Event><Latitude>23.137466</Latitude><Longitude>113.352425</Longitude><Precision>119.385040</Precision>".to_string()),
    };
    let xml = format!(
        "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\n<FromUserName><![CDATA[{user}]]></FromUserName>\n<CreateTime>{now}</CreateTime>\n{inner}\n</xml>"
    );
    let nonce = (1_000_000_000 + i).to_string();
    let p = push::build(
        &xml,
        Sealing::Secure(key),
        &PushParams {
            token: TOKEN,
            app_id: APP_ID,
            timestamp: now,
            nonce: &nonce,
            openid: Some(&user),
            random: &[b'L'; 16],
        },
    );
    Push {
        path: format!("/wx/main?{}", p.query),
        body: Bytes::from(p.body),
        kind,
    }
}

pub fn key() -> AesKey {
    AesKey::from_encoding(KEY).unwrap_or_else(|e| panic!("{e}"))
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The relay's configuration for a load run: the example's routing (login
/// events to the broker, which may reply, and to the webhooks; everything else
/// to the webhooks).
pub fn relay_config(
    public: SocketAddr,
    admin: SocketAddr,
    spool: &std::path::Path,
    broker: &str,
    hooks: &str,
) -> String {
    relay_config_paused(public, admin, &sqlite_spool(spool), broker, hooks, false)
}

/// The account the pushes are signed and sealed for: `[accounts.main]`, in
/// secure mode.
pub fn account() -> String {
    format!(
        "[accounts.main]\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\nencoding_aes_key = \"{KEY}\"\nmode = \"secure\"\n"
    )
}

/// The `[spool]` keys of a SQLite spool at `path`.
pub fn sqlite_spool(path: &std::path::Path) -> String {
    format!("path = \"{}\"\n", path.display())
}

/// As [`relay_config`], with the `[spool]` keys `spool`, and both targets
/// paused or not.
pub fn relay_config_paused(
    public: SocketAddr,
    admin: SocketAddr,
    spool: &str,
    broker: &str,
    hooks: &str,
    paused: bool,
) -> String {
    let account = account();
    format!(
        r#"[server]
listen = "{public}"
admin_listen = "{admin}"

[spool]
{spool}

{account}
[targets.broker]
url = "{broker}"
format = "raw"
retry = "login"
timeout = "3s"
concurrency = 32
paused = {paused}

[targets.webhooks]
url = "{hooks}"
format = "json"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
retry = "durable"
timeout = "5s"
concurrency = 32
paused = {paused}

[[routes]]
match = {{ event = ["subscribe", "SCAN"] }}
to = ["broker", "webhooks"]
reply_from = "broker"

[[routes]]
to = ["webhooks"]
"#
    )
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub sent: usize,
    pub success: usize,
    pub login_success: usize,
    pub non_success: usize,
    pub errors: usize,
    pub elapsed: Duration,
    /// Answer latencies in microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.success as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank] as f64 / 1000.0
    }

    pub fn line(&self, name: &str) -> String {
        format!(
            "{name:<10} {:>9.0}/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  answered {} of {} (non-success {}, errors {})",
            self.throughput(),
            self.percentile_ms(50.0),
            self.percentile_ms(90.0),
            self.percentile_ms(99.0),
            self.percentile_ms(100.0),
            self.success,
            self.sent,
            self.non_success,
            self.errors
        )
    }
}

/// Sends pushes `first..first + n` over `connections` keep-alive connections.
/// With `rate`, push `k` is due at `start + k / rate` and its latency counts
/// from then (so a stall is not hidden by the client waiting); without, each
/// connection sends as fast as it is answered.
pub async fn drive(
    addr: SocketAddr,
    first: u64,
    n: usize,
    connections: usize,
    rate: Option<f64>,
    now: i64,
) -> Report {
    drive_spread(&[addr], first, n, connections, rate, now).await
}

/// As [`drive`], the connections shared out over `addrs` in turn (several
/// replicas, as a load balancer would).
pub async fn drive_spread(
    addrs: &[SocketAddr],
    first: u64,
    n: usize,
    connections: usize,
    rate: Option<f64>,
    now: i64,
) -> Report {
    let key = Arc::new(key());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (key, next, addr) = (key.clone(), next.clone(), addrs[c % addrs.len()]);
        tasks.push(tokio::spawn(async move {
            let mut report = Report::default();
            let mut sender = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    break;
                }
                let p = push(first + k as u64, now, &key);
                let due = match rate {
                    Some(r) => {
                        let due = start + Duration::from_secs_f64(k as f64 / r);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                report.sent += 1;
                if sender.is_none() {
                    sender = connect(addr).await;
                }
                let Some(s) = sender.as_mut() else {
                    report.errors += 1;
                    continue;
                };
                let request = Request::post(p.path.as_str())
                    .header("host", "relay")
                    .header("content-type", "text/xml")
                    .body(Full::new(p.body.clone()));
                let Ok(request) = request else { continue };
                match s.send_request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        report.latencies_us.push(due.elapsed().as_micros() as u64);
                        if status == StatusCode::OK && (&body[..] == b"success" || body.is_empty())
                        {
                            report.success += 1;
                            if p.kind == PushKind::Login {
                                report.login_success += 1;
                            }
                        } else {
                            report.non_success += 1;
                        }
                    }
                    Err(_) => {
                        report.errors += 1;
                        sender = None;
                    }
                }
            }
            report
        }));
    }
    let mut total = Report::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.sent += r.sent;
            total.success += r.success;
            total.login_success += r.login_success;
            total.non_success += r.non_success;
            total.errors += r.errors;
            total.latencies_us.extend(r.latencies_us);
        }
    }
    total.elapsed = start.elapsed();
    total.latencies_us.sort_unstable();
    total
}

async fn connect(addr: SocketAddr) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// Pushes `first..first + n` into the relay started in this process on
/// `spool` (whose `[spool]` keys are `spool_toml`), its targets paused so that
/// only ingest is timed; the relay is stopped after.
pub async fn ingest_in_process(
    spool: wxrelay::spool::OpenSpool,
    spool_toml: &str,
    first: u64,
    n: usize,
    connections: usize,
) -> Report {
    let unused = super::common::free_port();
    let sink = format!("http://{unused}/");
    let admin = super::common::free_port();
    let toml = relay_config_paused(unused, admin, spool_toml, &sink, &sink, true);
    let settings =
        wxrelay::config::Settings::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}"));
    let listener = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let options = wxrelay::app::Options {
        public: Some(listener().await),
        admin: Some(listener().await),
        spool: Some(spool),
        clock: None,
        config_path: None,
        idle_poll: None,
    };
    let relay = wxrelay::app::Relay::start(settings, options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let report = drive(relay.public_addr, first, n, connections, None, unix_now()).await;
    relay.shutdown().await;
    report
}

/// A fast local target that counts what it receives, per path, and answers
/// `success` (a valid answer for a reply target too). A path can be made to
/// play dead: it then answers 503 and counts the attempts instead; and every
/// answer can be made to take a while.
#[derive(Clone, Default)]
pub struct Sink {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    total: Arc<AtomicU64>,
    down: Arc<Mutex<Option<String>>>,
    refused: Arc<AtomicU64>,
    /// Microseconds each answer waits before it is sent.
    delay_us: Arc<AtomicU64>,
}

impl Sink {
    pub async fn start(listener: TcpListener) -> Sink {
        let sink = Sink::default();
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                let _ = stream.set_nodelay(true);
                let service = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let _ = req.into_body().collect().await;
                        let delay = s.delay_us.load(Ordering::Relaxed);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_micros(delay)).await;
                        }
                        let down = s.down.lock().unwrap_or_else(|e| e.into_inner());
                        if down.as_deref() == Some(path.as_str()) {
                            s.refused.fetch_add(1, Ordering::Relaxed);
                            let mut refusal = Response::new(Full::new(Bytes::new()));
                            *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(refusal);
                        }
                        drop(down);
                        *s.counts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(path)
                            .or_default() += 1;
                        s.total.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"success",
                        ))))
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        sink
    }

    /// A sink on a fresh port of 127.0.0.1, and its address.
    pub async fn start_local() -> (Sink, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        (Sink::start(listener).await, addr)
    }

    pub fn count(&self, path: &str) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Makes `path` answer 503 (`None`: every path answers again).
    pub fn set_down(&self, path: Option<&str>) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = path.map(str::to_owned);
    }

    /// Makes every answer wait `delay` first, as a target that takes that
    /// long to answer.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Requests refused while a path played dead.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The baseline: a bare hyper HTTP/1.1 server that reads the body and answers
/// `success` to anything, on the same listener and connection settings as the relay.
pub async fn baseline(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let service = service_fn(|req: Request<Incoming>| async move {
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"success"))))
        });
        tokio::spawn(
            http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

/// Resident memory of a process, in MiB, from /proc.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// A memory field of /proc/PID/status (`VmRSS:`, `VmHWM:` for the peak), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
