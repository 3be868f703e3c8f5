//! The integration tests, one module per area, in one binary so that the
//! harness in [`common`] and the relay are built and linked once.
// clippy.toml lets #[test] functions unwrap; this lets the helpers they call
// do the same, as everything in this crate is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// The load harness, shared with the benchmarks.
#[path = "../bench/harness/mod.rs"]
mod harness;

mod ambiguity;
mod browser;
mod capacity;
mod circuit;
mod cli;
mod config;
mod crash;
mod delivery;
mod documented_paths;
mod expiry;
mod families;
mod flapping;
mod full_disk;
mod interop;
mod late;
mod leases;
mod load_smoke;
mod logs;
mod operations;
mod ordering;
mod outage;
mod pending;
mod postgres;
mod protocol_pure;
mod replay;
mod replicas;
mod retire_race;
mod spool_health;
mod supervision;
mod ticket;
mod traces;
mod trail;
mod ui;
mod vectors_http;
mod wechat_format;
