//! The load benchmark. Release build, run from the repository root:
//!
//! ```text
//! cargo bench --bench load -- compare [PUSHES] [CONNECTIONS]   baseline vs relay at saturation
//! cargo bench --bench load -- rate [RATE] [SECONDS]            p99 at a fixed rate, both servers
//! cargo bench --bench load -- backlog [PUSHES]                 webhooks down: memory, then drain rate
//! ```
//!
//! The relay is the real release binary in its own process, on a fresh SQLite
//! spool, routing as the example config does; the baseline is a bare hyper
//! server (this binary, `baseline-server`) in its own process on the same
//! runtime settings; the client and the counting sinks run here. Every relay
//! run also checks that each answered push reached each of its targets.

#[path = "harness/mod.rs"]
mod harness;

use harness::{Report, Sink};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const RELAY: &str = env!("CARGO_BIN_EXE_wxrelay");

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_baseline() -> Server {
    let addr = harness::free_port();
    let child = Command::new(std::env::current_exe().unwrap_or_else(|e| panic!("{e}")))
        .args(["baseline-server", &addr.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let up = harness::wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    assert!(up, "the baseline came up");
    Server { child, addr }
}

struct RelayProcess {
    server: Server,
    admin: SocketAddr,
    config: std::path::PathBuf,
    spool: std::path::PathBuf,
    broker: String,
    hooks: String,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Rewrites the configuration with the targets paused or not, and reloads.
    fn set_paused(&self, paused: bool) {
        let toml = harness::relay_config_paused(
            self.server.addr,
            self.admin,
            &self.spool,
            &self.broker,
            &self.hooks,
            paused,
        );
        std::fs::write(&self.config, toml).unwrap_or_else(|e| panic!("{e}"));
        let pid = self.server.child.id().to_string();
        let hup = Command::new("kill").args(["-HUP", &pid]).status();
        assert!(hup.is_ok_and(|s| s.success()), "SIGHUP sent");
    }
}

async fn start_relay(broker: &str, hooks: &str) -> RelayProcess {
    start_relay_paused(broker, hooks, false).await
}

async fn start_relay_paused(broker: &str, hooks: &str, paused: bool) -> RelayProcess {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (public, admin) = (harness::free_port(), harness::free_port());
    let config = dir.path().join("relay.toml");
    let spool = dir.path().join("spool.db");
    let toml = harness::relay_config_paused(public, admin, &spool, broker, hooks, paused);
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(RELAY)
        .args(["serve", "--config"])
        .arg(&config)
        .env("WXRELAY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let server = Server {
        child,
        addr: public,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while harness::get(admin, "/healthz").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the relay came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    RelayProcess {
        server,
        admin,
        config,
        spool,
        broker: broker.into(),
        hooks: hooks.into(),
        _dir: dir,
    }
}

async fn start_sink() -> (Sink, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    (Sink::start(listener).await, addr)
}

fn arg(args: &[String], i: usize, default: f64) -> f64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Waits until the sinks hold what the report says was answered.
async fn check_delivered(sink: &Sink, report: &Report, within: Duration) -> Duration {
    let started = Instant::now();
    let ok = harness::wait_until(within, || {
        sink.count("/hooks") >= report.success as u64
            && sink.count("/broker") >= report.login_success as u64
    })
    .await;
    println!(
        "           delivered: webhooks {} of {} answered, broker {} of {} answered login events{}",
        sink.count("/hooks"),
        report.success,
        sink.count("/broker"),
        report.login_success,
        if ok { "" } else { "  <-- MISSING" }
    );
    started.elapsed()
}

async fn compare(args: &[String]) {
    let n = arg(args, 0, 20_000.0) as usize;
    let connections = arg(args, 1, 32.0) as usize;
    println!("saturation: {n} pushes (20% subscribe+scene, 10% SCAN, 70% text/CLICK/LOCATION), {connections} keep-alive connections");
    let base = {
        let baseline = start_baseline().await;
        harness::drive(
            baseline.addr,
            10_000_000,
            n / 4,
            connections,
            None,
            harness::unix_now(),
        )
        .await; // warm-up
        harness::drive(baseline.addr, 0, n, connections, None, harness::unix_now()).await
    };
    println!("{}", base.line("baseline"));

    // Ingest alone, as the README's Performance table reports it (verify,
    // decrypt, parse, dedup, durable commit, answer): the targets are paused,
    // so no fan-out competes for the cores; then a reload unpauses them and
    // the fan-out is timed on its own.
    let (sink, at) = start_sink().await;
    let relay = start_relay_paused(
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
        true,
    )
    .await;
    let idle = harness::rss_mib(relay.server.child.id()).unwrap_or(0.0);
    let ingest = harness::drive(
        relay.server.addr,
        0,
        n,
        connections,
        None,
        harness::unix_now(),
    )
    .await;
    println!("{}", ingest.line("ingest"));
    let deliveries = ingest.success + ingest.login_success;
    relay.set_paused(false);
    let took = check_delivered(&sink, &ingest, Duration::from_secs(300)).await;
    let after = harness::rss_mib(relay.server.child.id()).unwrap_or(0.0);
    println!(
        "fan-out    {:>9.0} deliveries/s  ({deliveries} deliveries to 2 local sinks in {:.2} s)",
        deliveries as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    drop(relay);

    // The same pushes while the fan-out runs at the same time.
    let (sink, at) = start_sink().await;
    let relay = start_relay(
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
    )
    .await;
    let mixed = harness::drive(
        relay.server.addr,
        0,
        n,
        connections,
        None,
        harness::unix_now(),
    )
    .await;
    println!("{}", mixed.line("mixed"));
    check_delivered(&sink, &mixed, Duration::from_secs(300)).await;
    println!(
        "ratio relay/baseline: ingest throughput {:.2}, ingest p99 {:.2}; with fan-out running: throughput {:.2}   (relay RSS idle {idle:.1} MiB, after the run {after:.1} MiB)",
        ingest.throughput() / base.throughput(),
        ingest.percentile_ms(99.0) / base.percentile_ms(99.0).max(0.001),
        mixed.throughput() / base.throughput(),
    );
}

async fn rate(args: &[String]) {
    let rate = arg(args, 0, 1000.0);
    let seconds = arg(args, 1, 10.0);
    let n = (rate * seconds) as usize;
    println!("fixed rate: {rate:.0} pushes/s for {seconds:.0} s ({n} pushes), latency from each push's due time, 64 connections");
    let base = {
        let baseline = start_baseline().await;
        harness::drive(baseline.addr, 0, n, 64, Some(rate), harness::unix_now()).await
    };
    println!("{}", base.line("baseline"));
    let (sink, at) = start_sink().await;
    let relay = start_relay(
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
    )
    .await;
    let run = harness::drive(relay.server.addr, 0, n, 64, Some(rate), harness::unix_now()).await;
    println!("{}", run.line("relay"));
    check_delivered(&sink, &run, Duration::from_secs(120)).await;
}

async fn backlog(args: &[String]) {
    let n = arg(args, 0, 200_000.0) as usize;
    let (broker, broker_at) = start_sink().await;
    let hooks_at = harness::free_port();
    let relay = start_relay(
        &format!("http://{broker_at}/broker"),
        &format!("http://{hooks_at}/hooks"),
    )
    .await;
    let pid = relay.server.child.id();
    println!(
        "backlog: webhooks down, {n} pushes; relay RSS idle {:.1} MiB",
        harness::rss_mib(pid).unwrap_or(0.0)
    );
    let step = (n / 10).max(1);
    let mut answered = Report::default();
    let started = Instant::now();
    for chunk in 0..n.div_ceil(step) {
        let first = (chunk * step) as u64;
        let count = step.min(n - chunk * step);
        let r = harness::drive(
            relay.server.addr,
            first,
            count,
            32,
            None,
            harness::unix_now(),
        )
        .await;
        answered.success += r.success;
        answered.login_success += r.login_success;
        answered.non_success += r.non_success;
        answered.errors += r.errors;
        println!(
            "  ingested {:>9}  ({:>6.0}/s)  relay RSS {:>6.1} MiB",
            answered.success,
            r.throughput(),
            harness::rss_mib(pid).unwrap_or(0.0)
        );
    }
    println!(
        "ingest: {} answered in {:.1} s (non-success {}, errors {})",
        answered.success,
        started.elapsed().as_secs_f64(),
        answered.non_success,
        answered.errors
    );

    let listener = TcpListener::bind(hooks_at)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let hooks = Sink::start(listener).await;
    let drain_started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut peak = 0.0f64;
    while hooks.total() < answered.success as u64 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = harness::rss_mib(pid).unwrap_or(0.0);
        peak = peak.max(rss);
        let now = (Instant::now(), hooks.total());
        println!(
            "  drained {:>9} of {}  ({:>6.0} deliveries/s)  relay RSS {:>6.1} MiB",
            now.1,
            answered.success,
            (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64(),
            rss
        );
        last = now;
        if drain_started.elapsed() > Duration::from_secs(1800) {
            println!("  gave up after 30 min");
            break;
        }
    }
    let took = drain_started.elapsed().as_secs_f64();
    println!(
        "drain: {} deliveries in {took:.1} s = {:.0} deliveries/s; peak RSS while draining {peak:.1} MiB; broker got {} of {} login events",
        hooks.total(),
        hooks.total() as f64 / took,
        broker.count("/broker"),
        answered.login_success
    );
    let _ = relay.admin;
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("baseline-server") {
        let addr: SocketAddr = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("baseline-server ADDR"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        runtime.block_on(async {
            let listener = TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            harness::baseline(listener).await;
        });
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let rest = args.get(1..).unwrap_or_default().to_vec();
    runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("compare") | None => compare(&rest).await,
            Some("rate") => rate(&rest).await,
            Some("backlog") => backlog(&rest).await,
            Some(other) => eprintln!("unknown run {other}: compare | rate | backlog"),
        }
    });
}
