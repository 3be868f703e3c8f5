//! Durable ingest with and without group commit, in one run on one machine.
//!
//! `cargo bench --bench ingest [-- PUSHES CONNECTIONS]` starts the real relay
//! in this process twice, each on a fresh SQLite spool (WAL,
//! synchronous=FULL): once with group commit (the default, up to 512 requests
//! per commit) and once with one commit per push. The same client sends the
//! same mix of distinct, signed and sealed pushes over keep-alive connections
//! (the load harness's), with the targets paused so that only ingest is timed,
//! and the run prints pushes/s for each and their ratio.

// The integration tests' helpers, which the load harness builds on; a bench
// uses only a few of them.
#[path = "../it/common/mod.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
mod common;
#[path = "harness/mod.rs"]
mod harness;

use std::sync::Arc;
use wxrelay::spool::{OpenSpool, SqliteSpool};

async fn run(max_batch: usize, n: usize, connections: usize, first: u64) -> harness::Report {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("spool.db");
    let spool =
        Arc::new(SqliteSpool::open_with_batch(&path, max_batch).unwrap_or_else(|e| panic!("{e}")));
    let toml = harness::sqlite_spool(&path);
    let report = harness::ingest_in_process(
        OpenSpool::Sqlite(spool.clone()),
        &toml,
        first,
        n,
        connections,
    )
    .await;
    spool.close();
    report
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
        run(512, 500, connections, 90_000_000).await; // warm-up
        let grouped = run(512, n, connections, 0).await;
        let single = run(1, n, connections, 10_000_000).await;
        assert_eq!((grouped.success, single.success), (n, n), "every push answered success");
        println!("durable ingest, {n} pushes over {connections} keep-alive connections (secure mode, fsync per commit)");
        println!("  group commit (up to 512 per commit): {:>8.0} pushes/s", grouped.throughput());
        println!("  one commit per push:                 {:>8.0} pushes/s", single.throughput());
        println!("  ratio group/single:                  {:>8.2}x", grouped.throughput() / single.throughput());
    });
}
