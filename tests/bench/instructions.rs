//! Instructions per push, counted by callgrind: a count, not a timing, so two
//! runs agree within a few tenths of a percent, on a busy machine too. Release
//! build, from the repository root, with valgrind installed (Debian:
//! `apt-get install valgrind`):
//!
//! ```text
//! cargo bench --bench instructions -- [sqlite] [PUSHES] [WARM_UP]
//! cargo bench --bench instructions -- postgres [URL] [PUSHES] [WARM_UP]
//! cargo bench --bench instructions -- guard [PUSHES] [WARM_UP]
//! cargo bench --bench instructions -- report DIR
//! cargo bench --bench instructions -- diff DIR_BEFORE DIR_AFTER [ROWS]
//! ```
//!
//! The relay's release binary (this build's, or `WXRELAY_BIN`) runs under
//! `valgrind --tool=callgrind` with the load harness's configuration: secure
//! mode, login events (30 %) to a `raw` broker that is also `reply_from`, every
//! push to a `json` webhook with an HMAC secret; its spool is a fresh SQLite
//! file in a temp dir, or with `postgres` a fresh schema on the server at URL
//! (default `WXRELAY_TEST_POSTGRES_URL`), where only the relay process is
//! counted. One keep-alive connection sends WARM_UP pushes (default 200), and
//! once every delivery has reached the local sinks and left the spool, the
//! counters are zeroed (`callgrind_control -z`); then PUSHES pushes (default
//! 2,000) of the same fixed mix, and once their deliveries too have reached the
//! sinks and left the spool, the counters are dumped (`callgrind_control -d`).
//! So start-up and warm-up do not count, and every delivery does.
//!
//! It prints the instructions per push (ingest and its deliveries) and a
//! breakdown by part: whole threads; on tokio's workers, each kind of task
//! (the future the runtime polls: a server connection, a delivery attempt, a
//! client connection...) with all it calls; and functions' inclusive costs (a
//! part matching several functions counts once what they call of each other).
//! Parts overlap: malloc is also inside the writer thread. Under valgrind,
//! SHA-1 and SHA-256 run in software (it does not emulate the CPU's SHA
//! extensions), so their share is larger than natively. The profiles, one
//! per thread, and `functions.txt` (every function's self and inclusive
//! instructions per push, over all threads) are kept under
//! `target/instructions/<binary>-<spool>/`; `callgrind_annotate --inclusive=yes`
//! reads the profiles, `report` prints the breakdown again from them, and
//! `diff` prints the functions whose cost per push changed most between two
//! such directories.
//!
//! `guard` measures SQLite (default 500 pushes after 100) and fails when the
//! instructions per push exceed the budget in `instructions.budget` by more
//! than 10 %.

// The integration tests' helpers, which the load harness builds on; a bench
// uses only a few of them.
#[path = "../it/common/mod.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
mod common;
#[path = "harness/mod.rs"]
mod harness;

use common::database::Database;
use harness::{Report, Sink};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const RELAY: &str = env!("CARGO_BIN_EXE_wxrelay");
const BUDGET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/bench/instructions.budget"
);
/// How far above the budget the guard lets the count go.
const TOLERANCE: f64 = 0.10;
/// Under valgrind the relay runs some fifty times slower than natively.
const PATIENCE: Duration = Duration::from_secs(300);

/// Where the relay under measurement keeps its spool.
enum SpoolAt {
    Sqlite(tempfile::TempDir),
    Postgres(Database),
}

impl SpoolAt {
    fn name(&self) -> &'static str {
        match self {
            SpoolAt::Sqlite(_) => "sqlite",
            SpoolAt::Postgres(_) => "postgres",
        }
    }

    fn toml(&self) -> String {
        match self {
            SpoolAt::Sqlite(dir) => harness::sqlite_spool(&dir.path().join("spool.db")),
            SpoolAt::Postgres(database) => database.spool_toml(),
        }
    }

    /// Deliveries still in the spool: delivered ones are deleted (on both
    /// spools, old builds included), so none means every outcome is recorded.
    /// Read from outside the relay, so that waiting costs it nothing.
    fn deliveries_left(&self) -> i64 {
        match self {
            SpoolAt::Sqlite(dir) => {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
                rusqlite::Connection::open_with_flags(dir.path().join("spool.db"), flags)
                    .and_then(|c| c.query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0)))
                    .unwrap_or(-1)
            }
            SpoolAt::Postgres(database) => database.schema.count("deliveries"),
        }
    }
}

/// The relay running under callgrind; killed (without a final dump) on drop.
struct Callgrind {
    child: Child,
    public: SocketAddr,
}

impl Callgrind {
    async fn start(bin: &str, spool: &SpoolAt, sinks: SocketAddr, out: &Path) -> Callgrind {
        let (public, admin) = (common::free_port(), common::free_port());
        let config = out.join("relay.toml");
        let toml = harness::relay_config_paused(
            public,
            admin,
            &spool.toml(),
            &format!("http://{sinks}/broker"),
            &format!("http://{sinks}/hooks"),
            false,
        );
        std::fs::write(&config, toml).unwrap_or_else(|e| panic!("{e}"));
        let log = std::fs::File::create(out.join("valgrind.log")).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg("--separate-threads=yes")
            .arg("--dump-instr=no")
            .arg("--compress-strings=no")
            .arg("--compress-pos=no")
            .arg(format!(
                "--callgrind-out-file={}",
                out.join("callgrind.out").display()
            ))
            .arg(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .env("WXRELAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("valgrind: {e} (Debian: apt-get install valgrind)"));
        let relay = Callgrind { child, public };
        let up = common::eventually(PATIENCE, || async {
            common::try_send(admin, http::Method::GET, "/healthz", bytes::Bytes::new())
                .await
                .is_ok_and(|answer| answer.status == 200)
        })
        .await;
        assert!(
            up,
            "the relay came up under callgrind (see {})",
            out.display()
        );
        relay
    }

    /// `callgrind_control -z` (zero) or `-d` (dump) on the relay.
    fn control(&self, flag: &str) {
        let status = Command::new("callgrind_control")
            .arg(flag)
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "callgrind_control {flag} ran"
        );
    }
}

/// The profiles of a measurement's dump, one per thread.
fn dumped(out: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("callgrind.out.1-"))
        })
        .collect();
    files.sort();
    files
}

impl Drop for Callgrind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends pushes `first..first + n` over one keep-alive connection, then waits
/// until the sinks have every delivery and the spool has recorded them.
async fn pushes_delivered(relay: &Callgrind, spool: &SpoolAt, sink: &Sink, first: u64, n: usize) {
    let before = (sink.count("/hooks"), sink.count("/broker"));
    let report: Report = harness::drive(relay.public, first, n, 1, None, harness::unix_now()).await;
    assert_eq!(report.success, n, "every push answered success: {report:?}");
    let delivered = common::eventually(PATIENCE, || async {
        sink.count("/hooks") >= before.0 + n as u64
            && sink.count("/broker") >= before.1 + report.login_success as u64
            && spool.deliveries_left() == 0
    })
    .await;
    assert!(
        delivered,
        "every delivery reached the sinks and left the spool: webhooks {}, broker {}, left {}",
        sink.count("/hooks") - before.0,
        sink.count("/broker") - before.1,
        spool.deliveries_left()
    );
}

/// One measurement: the relay's profile over `pushes` pushes and their
/// deliveries, after `warm_up` pushes that do not count.
async fn measure(bin: &str, spool: SpoolAt, pushes: usize, warm_up: usize) -> Measured {
    let label = Path::new(bin)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| bin != RELAY)
        .unwrap_or("this-build");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/instructions")
        .join(format!("{label}-{}", spool.name()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{e}"));
    let (sink, at) = Sink::start_local().await;
    let relay = Callgrind::start(bin, &spool, at, &out).await;
    pushes_delivered(&relay, &spool, &sink, 0, warm_up).await;
    relay.control("-z");
    pushes_delivered(&relay, &spool, &sink, warm_up as u64, pushes).await;
    relay.control("-d");
    let threads: Vec<Profile> = dumped(&out).iter().map(|f| Profile::read(f)).collect();
    drop(relay);
    assert!(!threads.is_empty(), "callgrind dumped profiles");
    let measured = Measured {
        bin: bin.to_owned(),
        spool: spool.name().to_owned(),
        pushes,
        warm_up,
        threads,
        out,
    };
    measured.write_functions();
    measured
}

/// One thread's profile: instructions by function, and by call.
#[derive(Default)]
struct Profile {
    total: u64,
    own: HashMap<String, u64>,
    /// (caller, callee) → instructions spent in the callee and below.
    calls: HashMap<(String, String), u64>,
    /// The source file each function is in.
    files: HashMap<String, String>,
}

impl Profile {
    /// Reads a profile written with `--compress-strings=no --compress-pos=no
    /// --dump-instr=no` (one event, Ir, after one position column).
    fn read(path: &Path) -> Profile {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
        let mut p = Profile::default();
        let (mut function, mut callee, mut call) = (String::new(), String::new(), false);
        let mut file = "";
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("fl=") {
                file = name;
            } else if let Some(name) = line.strip_prefix("fn=") {
                function = name.to_owned();
                p.files.insert(function.clone(), file.to_owned());
            } else if let Some(name) = line.strip_prefix("cfn=") {
                callee = name.to_owned();
            } else if line.starts_with("calls=") {
                call = true;
            } else if let Some(total) = line.strip_prefix("totals:") {
                p.total = total.trim().parse().unwrap_or(0);
            } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
                let ir: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if std::mem::take(&mut call) {
                    if callee != function {
                        *p.calls
                            .entry((function.clone(), callee.clone()))
                            .or_default() += ir;
                    }
                } else {
                    *p.own.entry(function.clone()).or_default() += ir;
                }
            }
        }
        if p.total == 0 {
            p.total = p.own.values().sum();
        }
        p
    }

    /// What the tokio workers spent in each kind of task: the futures that
    /// the runtime polls as tasks, by name, and all they call.
    fn tasks(&self, into: &mut HashMap<String, u64>) {
        for ((caller, callee), c) in &self.calls {
            let runtime = callee.starts_with("tokio::runtime::")
                || callee.starts_with("<tokio::runtime::")
                || callee.starts_with("core::ptr::drop_in_place");
            if caller.starts_with("tokio::runtime::task::core::Core<T,S>::poll") && !runtime {
                *into.entry(callee.clone()).or_default() += c;
            }
        }
    }

    fn has(&self, name: impl Fn(&str) -> bool) -> bool {
        self.own.keys().any(|f| name(f))
    }

    /// Instructions executed in the functions `part` matches (by name and
    /// file) and in what they call: their inclusive costs, less what they
    /// call of each other.
    fn inclusive(&self, part: fn(&str, &str) -> bool) -> u64 {
        let file = |f: &str| self.files.get(f).map_or("", String::as_str);
        let name = |f: &str| part(f, file(f));
        let own: u64 = self
            .own
            .iter()
            .filter(|(f, _)| name(f))
            .map(|(_, c)| c)
            .sum();
        let called: u64 = self
            .calls
            .iter()
            .filter(|((caller, callee), _)| name(caller) && !name(callee))
            .map(|(_, c)| c)
            .sum();
        own + called
    }
}

/// Which of the relay's threads a profile is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    SpoolWriter,
    SpoolReader,
    /// The tokio workers, the main thread and any blocking-pool thread.
    Other,
}

fn thread_of(p: &Profile) -> Thread {
    // By what the thread does, not by the names of the spool's functions,
    // which move from one layout of the code to the next: only the writer
    // appends pages to the WAL, and only the spool's threads have a
    // connection (tokio's workers reach them through channels).
    if p.has(|f| f == "pagerWalFrames" || f == "sqlite3WalFrames") {
        Thread::SpoolWriter
    } else if p.has(|f| f == "sqlite3_step") {
        Thread::SpoolReader
    } else {
        Thread::Other
    }
}

/// A part of the breakdown: the functions whose inclusive cost it is, by
/// name and source file. Where several functions match, what they call of
/// each other counts once; a part is exact when what they call outside it
/// never calls back into it (a leaf, a library, an entry point).
struct Part {
    name: &'static str,
    functions: fn(&str, &str) -> bool,
}

/// The parts reported besides threads and tasks. Names cover the older
/// layouts of the code too (`verify_push` was the handler's before it had a
/// module).
const PARTS: &[Part] = &[
    Part {
        name: "verify_push (signature, decrypt, parse)",
        functions: |f, _| f.ends_with("::verify_push"),
    },
    Part {
        name: "accept_push (route, store, inline reply)",
        functions: |f, _| f == "wxrelay::handler::accept_push::{{closure}}",
    },
    Part {
        name: "format::build",
        functions: |f, _| f == "wxrelay::deliver::format::build",
    },
    Part {
        name: "SQLite library (sqlite3.c), all threads",
        functions: |_, file| file.ends_with("/sqlite3.c"),
    },
    Part {
        name: "  SQL compiled (sqlite3Prepare)",
        functions: |f, _| f == "sqlite3Prepare",
    },
    Part {
        name: "  rusqlite execute_batch (BEGIN, SAVEPOINT, COMMIT...)",
        functions: |f, _| f == "rusqlite::Connection::execute_batch",
    },
    Part {
        name: "malloc, free, realloc",
        functions: |f, _| {
            matches!(
                f,
                "malloc" | "free" | "realloc" | "calloc" | "posix_memalign" | "aligned_alloc"
            )
        },
    },
    Part {
        name: "memcpy, memmove, memset",
        functions: |f, _| {
            let f = f.trim_start_matches('_');
            f.starts_with("memcpy") || f.starts_with("memmove") || f.starts_with("memset")
        },
    },
    Part {
        name: "hashing for maps (hash_one, SipHash)",
        functions: |f, _| {
            // With the `Hash` impls between `hash_one` and the hasher, so
            // that what they call of each other counts once.
            f.starts_with("core::hash::")
                || f.contains("core::hash::sip::")
                || f.contains("std::hash::random::DefaultHasher")
                || f.ends_with(" as core::hash::Hash>::hash")
        },
    },
    Part {
        name: "SHA-1, SHA-256 blocks (software under valgrind)",
        functions: |f, _| {
            (f.starts_with("sha1::") || f.starts_with("sha2::")) && f.contains("compress")
        },
    },
    Part {
        name: "AES",
        functions: |f, _| f.contains("aes::") && f.contains("Aes"),
    },
];

/// A measurement's profiles and what produced them.
struct Measured {
    bin: String,
    spool: String,
    pushes: usize,
    warm_up: usize,
    threads: Vec<Profile>,
    out: PathBuf,
}

impl Measured {
    fn total(&self) -> u64 {
        self.threads.iter().map(|t| t.total).sum()
    }

    fn per_push(&self) -> f64 {
        self.total() as f64 / self.pushes as f64
    }

    fn threads_of(&self, kind: Thread) -> (usize, u64) {
        let of: Vec<u64> = self
            .threads
            .iter()
            .filter(|t| thread_of(t) == kind)
            .map(|t| t.total)
            .collect();
        (of.len(), of.iter().sum())
    }

    fn line(&self, name: &str, instructions: u64) -> String {
        format!(
            "  {name:<60} {:>9.0}  {:>5.1} %",
            instructions as f64 / self.pushes as f64,
            100.0 * instructions as f64 / self.total().max(1) as f64
        )
    }

    fn print(&self) {
        println!(
            "{}, {} spool: {} pushes after {} of warm-up, one keep-alive connection",
            self.bin, self.spool, self.pushes, self.warm_up
        );
        println!(
            "instructions per push: {:.0}  ({} over {} pushes, with their deliveries)",
            self.per_push(),
            self.total(),
            self.pushes
        );
        println!("  {:<60} {:>9}  {:>7}", "threads", "per push", "share");
        for (name, kind) in [
            ("SQLite writer thread", Thread::SpoolWriter),
            ("SQLite reader thread (leases)", Thread::SpoolReader),
            ("tokio workers and other threads", Thread::Other),
        ] {
            let (count, instructions) = self.threads_of(kind);
            if count > 0 {
                println!("{}", self.line(&format!("{name} ({count})"), instructions));
            }
        }
        self.print_tasks();
        println!("  {:<60}", "functions (inclusive; parts overlap)");
        for part in PARTS {
            let instructions = self
                .threads
                .iter()
                .map(|t| t.inclusive(part.functions))
                .sum();
            // None of SQLite's parts on PostgreSQL, say.
            if instructions > 0 {
                println!("{}", self.line(part.name, instructions));
            }
        }
        println!("profiles and functions.txt in {}", self.out.display());
    }
}

impl Measured {
    /// The tokio workers' instructions by task, largest first; the rest is
    /// the scheduler's own (polling, parking, waking).
    fn print_tasks(&self) {
        let mut tasks = HashMap::new();
        for t in self
            .threads
            .iter()
            .filter(|t| thread_of(t) == Thread::Other)
        {
            t.tasks(&mut tasks);
        }
        let mut tasks: Vec<(String, u64)> = tasks.into_iter().collect();
        tasks.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        println!("  {:<60}", "tokio tasks, by the future polled");
        let shown = 6;
        for (name, instructions) in tasks.iter().take(shown) {
            let name: String = name.chars().take(58).collect();
            println!("{}", self.line(&format!("  {name}"), *instructions));
        }
        let rest: u64 = tasks.iter().skip(shown).map(|t| t.1).sum();
        let polled: u64 = tasks.iter().map(|t| t.1).sum();
        println!("{}", self.line("  other tasks", rest));
        let workers = self.threads_of(Thread::Other).1;
        println!(
            "{}",
            self.line("  scheduler, outside tasks", workers.saturating_sub(polled))
        );
    }

    /// Every function's own and inclusive instructions per push, summed over
    /// the threads, largest inclusive first: what `diff` compares.
    fn write_functions(&self) {
        let mut own: HashMap<&str, u64> = HashMap::new();
        let mut inclusive: HashMap<&str, u64> = HashMap::new();
        for t in &self.threads {
            for (f, c) in &t.own {
                *own.entry(f).or_default() += c;
                *inclusive.entry(f).or_default() += c;
            }
            for ((caller, _), c) in &t.calls {
                *inclusive.entry(caller).or_default() += c;
            }
        }
        let mut rows: Vec<(&str, u64)> = inclusive.into_iter().collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let n = self.pushes as f64;
        let mut text = format!(
            "# {} {} pushes={} warm_up={} per_push={:.0}\n# self/push\tinclusive/push\tfunction\n",
            self.bin,
            self.spool,
            self.pushes,
            self.warm_up,
            self.per_push()
        );
        for (f, c) in rows {
            let own = own.get(f).copied().unwrap_or(0) as f64 / n;
            text.push_str(&format!("{own:.1}\t{:.1}\t{f}\n", c as f64 / n));
        }
        std::fs::write(self.out.join("functions.txt"), text).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A `functions.txt`: its header line and (self, inclusive) per function.
fn read_functions(dir: &str) -> (String, HashMap<String, (f64, f64)>) {
    let path = Path::new(dir).join("functions.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = text.lines().next().unwrap_or_default().to_owned();
    let rows = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut cols = l.splitn(3, '\t');
            let own = cols.next()?.parse().ok()?;
            let inclusive = cols.next()?.parse().ok()?;
            Some((cols.next()?.to_owned(), (own, inclusive)))
        })
        .collect();
    (header, rows)
}

/// Prints a measurement again from the profiles kept in its directory.
fn report(args: &[String]) {
    let Some(dir) = args.first() else {
        panic!("report DIR");
    };
    let (header, _) = read_functions(dir);
    let words: Vec<&str> = header.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let measured = Measured {
        bin: words.get(1).copied().unwrap_or_default().to_owned(),
        spool: words.get(2).copied().unwrap_or_default().to_owned(),
        pushes: field("pushes").unwrap_or_else(|| panic!("{dir}/functions.txt: no pushes")),
        warm_up: field("warm_up").unwrap_or(0),
        threads: dumped(Path::new(dir))
            .iter()
            .map(|f| Profile::read(f))
            .collect(),
        out: PathBuf::from(dir),
    };
    measured.print();
}

/// The functions whose cost per push changed most from one measurement to
/// another, by self and by inclusive cost.
fn diff(args: &[String]) {
    let (Some(before), Some(after)) = (args.first(), args.get(1)) else {
        panic!("diff DIR_BEFORE DIR_AFTER [ROWS]");
    };
    let rows = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(25);
    let (header_before, a) = read_functions(before);
    let (header_after, b) = read_functions(after);
    println!("before {header_before}\nafter  {header_after}");
    let zero = (0.0, 0.0);
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    for (title, pick) in [
        ("self", (|c: &(f64, f64)| c.0) as fn(&(f64, f64)) -> f64),
        ("inclusive", |c: &(f64, f64)| c.1),
    ] {
        let mut deltas: Vec<(f64, f64, f64, &str)> = names
            .iter()
            .map(|n| {
                let (x, y) = (
                    pick(a.get(*n).unwrap_or(&zero)),
                    pick(b.get(*n).unwrap_or(&zero)),
                );
                (y - x, x, y, n.as_str())
            })
            .filter(|d| d.0.abs() >= 1.0)
            .collect();
        deltas.sort_by(|p, q| q.0.abs().total_cmp(&p.0.abs()));
        println!(
            "\nlargest changes of {title} instructions per push:\n  {:>9} {:>9} {:>9}  function",
            "delta", "before", "after"
        );
        for (d, x, y, n) in deltas.into_iter().take(rows) {
            println!("  {d:>+9.0} {x:>9.0} {y:>9.0}  {n}");
        }
    }
}

/// The budget recorded in the repository: SQLite instructions per push.
fn budget() -> f64 {
    let text = std::fs::read_to_string(BUDGET).unwrap_or_else(|e| panic!("{BUDGET}: {e}"));
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            l.trim()
                .strip_prefix("sqlite_per_push")?
                .trim()
                .strip_prefix('=')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{BUDGET}: no `sqlite_per_push = N` line"))
}

/// Fails (exit 1) when SQLite's instructions per push are more than
/// [`TOLERANCE`] above the budget.
async fn guard(args: &[String]) {
    let pushes = arg(args, 0, 500);
    let warm_up = arg(args, 1, 100);
    let budget = budget();
    let measured = measure(&relay_bin(), sqlite(), pushes, warm_up).await;
    measured.print();
    let limit = budget * (1.0 + TOLERANCE);
    let verdict = if measured.per_push() > limit {
        "FAIL"
    } else {
        "ok"
    };
    println!(
        "guard: {:.0} instructions per push, budget {budget:.0}, limit {limit:.0} (+{:.0} %): {verdict}",
        measured.per_push(),
        TOLERANCE * 100.0
    );
    if verdict == "FAIL" {
        std::process::exit(1);
    }
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn relay_bin() -> String {
    std::env::var("WXRELAY_BIN").unwrap_or_else(|_| RELAY.to_owned())
}

fn sqlite() -> SpoolAt {
    SpoolAt::Sqlite(tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let rest = args.get(1..).unwrap_or_default().to_vec();
    runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("guard") => guard(&rest).await,
            Some("diff") => diff(&rest),
            Some("report") => report(&rest),
            Some("postgres") => {
                let url = rest.first().filter(|a| a.contains("://"));
                if let Some(url) = url {
                    std::env::set_var(common::database::TEST_URL_VAR, url);
                }
                let rest = &rest[usize::from(url.is_some())..];
                let database = Database::create().unwrap_or_else(|| {
                    panic!("postgres needs a URL or {}", common::database::TEST_URL_VAR)
                });
                let spool = SpoolAt::Postgres(database);
                measure(&relay_bin(), spool, arg(rest, 0, 2000), arg(rest, 1, 200))
                    .await
                    .print();
            }
            Some("sqlite") => {
                measure(
                    &relay_bin(),
                    sqlite(),
                    arg(&rest, 0, 2000),
                    arg(&rest, 1, 200),
                )
                .await
                .print();
            }
            None => measure(&relay_bin(), sqlite(), 2000, 200).await.print(),
            Some(other) => {
                eprintln!("unknown run {other}: sqlite | postgres | guard | report | diff")
            }
        }
    });
}
