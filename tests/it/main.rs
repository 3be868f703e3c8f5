//! The integration tests, one module per area, in one binary so that the
//! harness in [`common`] and the relay are built and linked once.

mod common;

mod ambiguity;
mod capacity;
mod cli;
mod config;
mod crash;
mod delivery;
mod documented_paths;
mod flapping;
mod full_disk;
mod load_smoke;
mod logs;
mod operations;
mod pending;
mod protocol_pure;
mod replay;
mod spool_health;
mod vectors_http;
