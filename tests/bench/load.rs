//! The load benchmark. Release build, run from the repository root:
//!
//! ```text
//! cargo bench --bench load -- compare [PUSHES] [CONNECTIONS]   baseline vs relay at saturation
//! cargo bench --bench load -- rate [RATE] [SECONDS]            p99 at a fixed rate, both servers
//! cargo bench --bench load -- backlog [PUSHES]                 webhooks down: memory, then drain rate
//! cargo bench --bench load -- flood [CONNECTIONS] [SECONDS] [send|hold|idle]  an attacker's flood: RSS, real pushes' latency
//! cargo bench --bench load -- outage [SECONDS] [CONNECTIONS]  webhooks down that long under a stream of pushes, then back
//! cargo bench --bench load -- pinned OTHER_BIN [PUSHES] [CONNECTIONS] [RUNS]  one core each: this build vs another
//! ```
//!
//! `pinned` runs the relay on core 1 and this process (client and sinks) on
//! core 0 (`taskset`), alternating this build and `OTHER_BIN` (an older
//! release), RUNS times each (default 3): each run pushes and waits until
//! every delivery reached the sinks, so the relay's one core does ingest and
//! fan-out. It prints each run, with how busy the relay kept its core, and
//! the ratio of this build's median to the other's, with the range of the
//! ratios of the runs' pairs.
//! `WXRELAY_RELAY_CPUS=LIST` pins the relay of any other run (`taskset -c`).
//!
//! `WXRELAY_BIN=/path/to/wxrelay` runs another build of the relay (an older
//! release, to compare; `outage` runs it first, then this build); `WXRELAY_NOFILE=1024` runs it under that open-file
//! limit. `flood` opens one descriptor per connection in this
//! process: raise `ulimit -n` first.
//!
//! The relay is the real release binary in its own process, on a fresh SQLite
//! spool, routing as the example config does; the baseline is a bare hyper
//! server (this binary, `baseline-server`) in its own process on the same
//! runtime settings; the client and the counting sinks run here. Every relay
//! run also checks that each answered push reached each of its targets.

// The integration tests' helpers, which the load harness builds on; a bench
// uses only a few of them.
#[path = "../it/common/mod.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
mod common;
#[path = "harness/mod.rs"]
mod harness;

use harness::{Report, Sink};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    let addr = common::free_port();
    let child = Command::new(std::env::current_exe().unwrap_or_else(|e| panic!("{e}")))
        .args(["baseline-server", &addr.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let up = common::eventually(Duration::from_secs(10), || async {
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
            &harness::sqlite_spool(&self.spool),
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
    let relay = std::env::var("WXRELAY_BIN").unwrap_or_else(|_| RELAY.to_string());
    start_relay_bin(&relay, broker, hooks, paused).await
}

async fn start_relay_bin(relay: &str, broker: &str, hooks: &str, paused: bool) -> RelayProcess {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (public, admin) = (common::free_port(), common::free_port());
    let config = dir.path().join("relay.toml");
    let spool = dir.path().join("spool.db");
    let toml = harness::relay_config_paused(
        public,
        admin,
        &harness::sqlite_spool(&spool),
        broker,
        hooks,
        paused,
    );
    std::fs::write(&config, toml).unwrap_or_else(|e| panic!("{e}"));
    let nofile = std::env::var("WXRELAY_NOFILE").unwrap_or_else(|_| "unlimited".into());
    // Pinned by `taskset`, which execs the shell.
    let mut command = match std::env::var("WXRELAY_RELAY_CPUS") {
        Ok(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpus, "sh"]);
            c
        }
        Err(_) => Command::new("sh"),
    };
    // Through a shell only to set the limit; `exec` keeps the relay's pid.
    let child = command
        .args(["-c", "ulimit -n \"$0\" 2>/dev/null; exec \"$@\"", &nofile])
        .arg(relay)
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
    let up = common::eventually(Duration::from_secs(20), || async {
        common::try_send(admin, http::Method::GET, "/healthz", bytes::Bytes::new())
            .await
            .is_ok_and(|answer| answer.status == 200)
    })
    .await;
    assert!(up, "the relay came up");
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

fn arg(args: &[String], i: usize, default: f64) -> f64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Waits until the sinks hold what the report says was answered.
async fn check_delivered(sink: &Sink, report: &Report, within: Duration) -> Duration {
    let started = Instant::now();
    let ok = common::eventually(within, || async {
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
    let (sink, at) = Sink::start_local().await;
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
    let (sink, at) = Sink::start_local().await;
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

/// One core for the relay, the other for the client and sinks: this build
/// against `OTHER_BIN`, alternating, each run from push to last delivery.
async fn pinned(args: &[String]) {
    let other = args
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("pinned OTHER_BIN [PUSHES] [CONNECTIONS] [RUNS]"));
    let n = arg(args, 1, 10_000.0) as usize;
    let connections = arg(args, 2, 32.0) as usize;
    let runs = arg(args, 3, 3.0) as usize;
    let own = std::process::id().to_string();
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &own])
        .stdout(Stdio::null())
        .status();
    assert!(
        pinned.is_ok_and(|s| s.success()),
        "taskset pinned the client"
    );
    std::env::set_var("WXRELAY_RELAY_CPUS", "1");
    println!("pinned: relay on core 1, client and sinks on core 0; {n} pushes over {connections} connections, until delivered; {runs} runs each, alternating");
    let builds = [RELAY.to_string(), other];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (which, bin) in builds.iter().enumerate() {
            let (rate, busy) = pinned_run(bin, n, connections).await;
            println!(
                "  run {} {:<6} {rate:>8.0} pushes/s  relay core busy {:>3.0} %  ({bin})",
                run + 1,
                ["this", "other"][which],
                busy * 100.0
            );
            rates[which].push(rate);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let pairs: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(a, b)| a / b).collect();
    let (low, high) = pairs
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
    println!(
        "ratio this/other: {:.2} (medians {:.0} / {:.0} pushes/s); run pairs {low:.2}..{high:.2}",
        median(&rates[0]) / median(&rates[1]),
        median(&rates[0]),
        median(&rates[1]),
    );
}

/// Pushes per second from the first push to the last delivery recorded by
/// the sinks, after a warm-up of a quarter as many; and how busy the relay
/// kept its core meanwhile (its CPU time over the time taken): below 100 %
/// it was waiting, not computing.
async fn pinned_run(bin: &str, n: usize, connections: usize) -> (f64, f64) {
    let (sink, at) = Sink::start_local().await;
    let relay = start_relay_bin(
        bin,
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
        false,
    )
    .await;
    let warm = harness::drive(
        relay.server.addr,
        10_000_000,
        n / 4,
        connections,
        None,
        harness::unix_now(),
    )
    .await;
    check_delivered(&sink, &warm, Duration::from_secs(120)).await;
    let (hooks, broker) = (sink.count("/hooks"), sink.count("/broker"));
    let pid = relay.server.child.id();
    let cpu = cpu_seconds(pid).unwrap_or(0.0);
    let started = Instant::now();
    let report = harness::drive(
        relay.server.addr,
        0,
        n,
        connections,
        None,
        harness::unix_now(),
    )
    .await;
    let delivered = common::eventually(Duration::from_secs(300), || async {
        sink.count("/hooks") >= hooks + report.success as u64
            && sink.count("/broker") >= broker + report.login_success as u64
    })
    .await;
    assert!(delivered, "every answered push was delivered: {report:?}");
    assert_eq!(report.success, n, "every push answered success");
    let took = started.elapsed().as_secs_f64();
    let busy = (cpu_seconds(pid).unwrap_or(0.0) - cpu) / took;
    (n as f64 / took, busy)
}

/// The CPU time a process has used, user and system, all its threads
/// (`/proc/PID/stat`'s utime and stime, in Linux's 100 ticks a second).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: the state (field 3) first,
    // so utime (field 14) and stime (15) are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|t| t.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
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
    let (sink, at) = Sink::start_local().await;
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
    let (broker, broker_at) = Sink::start_local().await;
    let hooks_at = common::free_port();
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

/// How the flood's requests were answered.
#[derive(Default)]
struct FloodCounts {
    connections: AtomicU64,
    answered: AtomicU64,
    refused_503: AtomicU64,
    failed: AtomicU64,
}

/// What each attacker connection does, over and over until the flood ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attack {
    /// An unsigned POST with a 256 KiB body, then wait for the answer.
    Send,
    /// The same without the body's last byte, so a relay that reads bodies
    /// before checking the signature holds the rest until its reply budget ends.
    Hold,
    /// Connect and send nothing until the relay closes the connection.
    Idle,
}

impl Attack {
    fn parse(arg: Option<&String>) -> Attack {
        match arg.map(String::as_str) {
            Some("hold") => Attack::Hold,
            Some("idle") => Attack::Idle,
            _ => Attack::Send,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Attack::Send => "send",
            Attack::Hold => "hold",
            Attack::Idle => "idle",
        }
    }
}

/// One attacker connection after another, until `until`.
async fn flood_connection(
    addr: SocketAddr,
    until: Instant,
    attack: Attack,
    counts: Arc<FloodCounts>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: usize = 256 * 1024;
    let head = format!(
        "POST /wx/main?signature=0&timestamp={}&nonce=1 HTTP/1.1\r\nhost: relay\r\ncontent-type: text/xml\r\ncontent-length: {BODY}\r\n\r\n",
        harness::unix_now()
    );
    let body = vec![b'x'; BODY];
    while Instant::now() < until {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            if attack != Attack::Idle {
                stream.write_all(head.as_bytes()).await.ok()?;
                // The relay may answer and close before the body is in: fine.
                let sent = if attack == Attack::Hold {
                    &body[..BODY - 1]
                } else {
                    &body[..]
                };
                let _ = stream.write_all(sent).await;
            }
            let mut answer = [0u8; 64];
            let n = stream.read(&mut answer).await.ok()?;
            Some(answer[..n].starts_with(b"HTTP/1.1 503"))
        };
        let left = until.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        match tokio::time::timeout(left, exchange).await {
            Ok(Some(true)) => counts.refused_503.fetch_add(1, Ordering::Relaxed),
            Ok(Some(false)) => counts.answered.fetch_add(1, Ordering::Relaxed),
            _ => counts.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The attacker, in its own process (`flood-client ADDR CONNECTIONS
/// SECONDS`) so its tasks do not share a runtime with the client timing the
/// real pushes. Prints `ramped` once every connection has been opened, then
/// one line of counts.
async fn flood_client(args: &[String]) {
    let addr: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("flood-client ADDR CONNECTIONS SECONDS"));
    let connections = arg(args, 1, 4000.0) as usize;
    let seconds = arg(args, 2, 15.0);
    let attack = Attack::parse(args.get(3));
    let counts = Arc::new(FloodCounts::default());
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let flooders: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(flood_connection(addr, until, attack, counts.clone())))
        .collect();
    while counts.connections.load(Ordering::Relaxed) < connections as u64 && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("ramped");
    for f in flooders {
        let _ = f.await;
    }
    println!(
        "flood      {} connections opened, {} answered (503: {}), {} failed or cut",
        counts.connections.load(Ordering::Relaxed),
        counts.answered.load(Ordering::Relaxed) + counts.refused_503.load(Ordering::Relaxed),
        counts.refused_503.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
}

async fn flood(args: &[String]) {
    use std::io::BufRead;
    let connections = arg(args, 0, 4000.0) as usize;
    let seconds = arg(args, 1, 15.0);
    let attack = Attack::parse(args.get(2));
    let rate = 50.0;
    let (sink, at) = Sink::start_local().await;
    let relay = start_relay(
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
    )
    .await;
    let pid = relay.server.child.id();
    println!(
        "flood: {connections} connections, {} for {seconds:.0} s, real signed pushes at {rate:.0}/s meanwhile; relay {} RSS idle {:.1} MiB",
        match attack {
            Attack::Send => "each sending unsigned POSTs with 256 KiB bodies",
            Attack::Hold => "each sending unsigned POSTs with all but the last byte of 256 KiB bodies",
            Attack::Idle => "each opened and left idle",
        },
        std::env::var("WXRELAY_BIN").unwrap_or_else(|_| "(this build)".into()),
        harness::rss_mib(pid).unwrap_or(0.0)
    );
    let mut attacker = Command::new(std::env::current_exe().unwrap_or_else(|e| panic!("{e}")))
        .args([
            "flood-client".to_string(),
            relay.server.addr.to_string(),
            connections.to_string(),
            seconds.to_string(),
            attack.name().to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = attacker.stdout.take().unwrap_or_else(|| panic!("stdout"));
    let (ramped_tx, ramped) = tokio::sync::oneshot::channel();
    let lines = std::thread::spawn(move || {
        let mut ramped_tx = Some(ramped_tx);
        let mut rest = Vec::new();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            match (line.as_str(), ramped_tx.take()) {
                ("ramped", Some(tx)) => {
                    let _ = tx.send(());
                }
                (_, tx) => {
                    ramped_tx = tx;
                    rest.push(line);
                }
            }
        }
        rest
    });
    // The flood first, then the real pushes in the middle of it.
    let _ = ramped.await;
    let flood_ends = Instant::now() + Duration::from_secs_f64(seconds);
    let sampler = tokio::spawn(async move {
        let mut peak = 0.0f64;
        while Instant::now() < flood_ends {
            peak = peak.max(harness::rss_mib(pid).unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peak
    });
    let pushes = ((seconds / 2.0).max(1.0) * rate) as usize;
    // One connection per push, as WeChat does: each push competes with the
    // flood for accept too.
    let real = harness::drive(
        relay.server.addr,
        0,
        pushes,
        pushes,
        Some(rate),
        harness::unix_now(),
    )
    .await;
    let _ = attacker.wait();
    let attacker_lines = lines.join().unwrap_or_default();
    let during = sampler.await.unwrap_or(0.0);
    // Give the relay a moment to drop what the closed connections held.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("{}", real.line("real"));
    for line in attacker_lines {
        println!("{line}");
    }
    println!(
        "relay RSS  peak (VmHWM) {:.1} MiB, highest sampled during the flood {during:.1} MiB, after the flood {:.1} MiB",
        harness::status_mib(pid, "VmHWM:").unwrap_or(0.0),
        harness::rss_mib(pid).unwrap_or(0.0)
    );
    check_delivered(&sink, &real, Duration::from_secs(60)).await;
}

/// The webhooks target down for `SECONDS` (default 60) under a stream of
/// pushes at saturation, then back: ingest during the outage against ingest
/// with every target healthy, the attempts the dead target receives, the
/// spool writes its failures cost, the circuit metric, and whether every
/// event arrives once it is back. With `WXRELAY_BIN`, that build is run
/// first ("before"), then this one ("after"), in the same run.
async fn outage(args: &[String]) {
    let down = Duration::from_secs_f64(arg(args, 0, 60.0));
    let connections = arg(args, 1, 32.0) as usize;
    println!(
        "outage: 15 s all healthy, then webhooks answering 503 for {} s, then back for 10 s; pushes at saturation over {connections} connections",
        down.as_secs()
    );
    let mut runs = vec![("after", RELAY.to_string())];
    if let Ok(old) = std::env::var("WXRELAY_BIN") {
        runs.insert(0, ("before", old));
    }
    for (label, bin) in runs {
        outage_run(label, &bin, down, connections).await;
    }
}

/// What the relay's metrics say about the webhooks target.
#[derive(Debug, Clone, Copy, Default)]
struct TargetSample {
    circuit: f64,
    /// Failed attempts recorded (each a spool write), and dead letters.
    failure_writes: f64,
    pending: f64,
}

async fn sample_webhooks(admin: SocketAddr) -> Option<TargetSample> {
    let answer = common::try_send(admin, http::Method::GET, "/metrics", bytes::Bytes::new())
        .await
        .ok()?;
    let text = answer.text();
    let on = |name: &str, outcome: Option<&str>| {
        let mut labels = vec![("target", "webhooks")];
        labels.extend(outcome.map(|o| ("outcome", o)));
        common::metric(&text, name, &labels)
    };
    Some(TargetSample {
        // + 0.0: a build without the metric sums nothing, -0.0.
        circuit: on("wxrelay_target_circuit", None) + 0.0,
        failure_writes: on("wxrelay_deliveries_total", Some("retried"))
            + on("wxrelay_deliveries_total", Some("dead_lettered")),
        pending: on("wxrelay_spool_pending", None),
    })
}

/// Pushes at saturation in chunks until `window` has passed; returns what
/// was answered and how long it took.
async fn stream_for(
    relay: &RelayProcess,
    next: &mut u64,
    window: Duration,
    connections: usize,
    total: &mut Report,
) -> (usize, f64) {
    const CHUNK: usize = 4_000;
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < window {
        let r = harness::drive(
            relay.server.addr,
            *next,
            CHUNK,
            connections,
            None,
            harness::unix_now(),
        )
        .await;
        *next += CHUNK as u64;
        answered += r.success;
        total.success += r.success;
        total.login_success += r.login_success;
        total.non_success += r.non_success;
        total.errors += r.errors;
    }
    (answered, started.elapsed().as_secs_f64())
}

/// The webhooks target's metrics, sampled once a second in the background.
struct Sampler {
    samples: Arc<std::sync::Mutex<Vec<TargetSample>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(admin: SocketAddr) -> Sampler {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let seen = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Some(s) = sample_webhooks(admin).await {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped.changed() => break,
                }
            }
        });
        Sampler {
            samples,
            stop,
            task,
        }
    }

    fn latest(&self) -> TargetSample {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.last().copied().unwrap_or_default()
    }

    /// Stops sampling; the circuit's values, each change kept.
    async fn circuit(self) -> Vec<f64> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let mut circuit: Vec<f64> = Vec::new();
        for s in self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if circuit.last() != Some(&s.circuit) {
                circuit.push(s.circuit);
            }
        }
        circuit
    }
}

/// What the outage cost: pushes answered and seconds, attempts at the dead
/// target, failure writes.
struct Outage {
    answered: usize,
    secs: f64,
    attempts: u64,
    writes: f64,
}

/// Streams pushes while the webhooks answer 503, a line per 10 s.
#[allow(clippy::too_many_arguments)]
async fn stream_while_down(
    relay: &RelayProcess,
    sink: &Sink,
    sampler: &Sampler,
    down: Duration,
    connections: usize,
    healthy: f64,
    next: &mut u64,
    total: &mut Report,
) -> Outage {
    sink.set_down(Some("/hooks"));
    let (refused0, writes0) = (sink.refused(), sampler.latest().failure_writes);
    let started = Instant::now();
    let (mut answered, mut secs) = (0, 0.0);
    while started.elapsed() < down {
        let window = (down - started.elapsed()).min(Duration::from_secs(10));
        let refused = sink.refused();
        let (ok, took) = stream_for(relay, next, window, connections, total).await;
        (answered, secs) = (answered + ok, secs + took);
        let s = sampler.latest();
        println!(
            "  down {:>3.0} s   ingest {:>7.0}/s ({:.2} of healthy)  dead target {:>7.1} attempts/s  failure writes so far {:>8.0}  circuit {}  webhooks pending {:>8.0}",
            started.elapsed().as_secs_f64(),
            ok as f64 / took,
            ok as f64 / took / healthy,
            (sink.refused() - refused) as f64 / took,
            s.failure_writes - writes0,
            s.circuit,
            s.pending
        );
    }
    sink.set_down(None);
    Outage {
        answered,
        secs,
        attempts: sink.refused() - refused0,
        writes: sampler.latest().failure_writes - writes0,
    }
}

async fn outage_run(label: &str, bin: &str, down: Duration, connections: usize) {
    let (sink, at) = Sink::start_local().await;
    let relay = start_relay_bin(
        bin,
        &format!("http://{at}/broker"),
        &format!("http://{at}/hooks"),
        false,
    )
    .await;
    println!("{label}: {bin}");
    let sampler = Sampler::start(relay.admin);
    let (mut next, mut total) = (0u64, Report::default());
    let window = Duration::from_secs(15);
    let (ok, secs) = stream_for(&relay, &mut next, window, connections, &mut total).await;
    let healthy = ok as f64 / secs;
    println!("  healthy      ingest {healthy:>7.0}/s");
    let o = stream_while_down(
        &relay,
        &sink,
        &sampler,
        down,
        connections,
        healthy,
        &mut next,
        &mut total,
    )
    .await;
    let window = Duration::from_secs(10);
    let (ok, secs) = stream_for(&relay, &mut next, window, connections, &mut total).await;
    println!("  back         ingest {:>7.0}/s", ok as f64 / secs);
    let drain = check_delivered(&sink, &total, Duration::from_secs(900)).await;
    let circuit = sampler.circuit().await;
    println!(
        "  {label}: ingest during the outage {:.0}/s = {:.2} of healthy; the dead target got {} attempts ({:.1}/s); failure writes {:.0}; every event delivered within {:.1} s of the last push; circuit sampled each second {circuit:?}",
        o.answered as f64 / o.secs,
        o.answered as f64 / o.secs / healthy,
        o.attempts,
        o.attempts as f64 / down.as_secs_f64(),
        o.writes,
        drain.as_secs_f64()
    );
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
            Some("flood") => flood(&rest).await,
            Some("flood-client") => flood_client(&rest).await,
            Some("outage") => outage(&rest).await,
            Some("pinned") => pinned(&rest).await,
            Some(other) => {
                eprintln!("unknown run {other}: compare | rate | backlog | flood | outage | pinned")
            }
        }
    });
}
