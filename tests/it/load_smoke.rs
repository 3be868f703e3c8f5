//! A small run of the load harness, so it cannot rot: a few hundred pushes of
//! the realistic mix against the real relay (in-process, real SQLite spool),
//! every one answered `success`, and every one delivered to its targets.

use crate::common;
use crate::harness;

use std::time::Duration;
use tokio::net::TcpListener;
use wxrelay::app::{Options, Relay};
use wxrelay::config::Settings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_harness_drives_the_relay_and_every_push_reaches_its_targets() {
    let dir = tempfile::tempdir().unwrap();
    let sink_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink_listener.local_addr().unwrap();
    let sink = harness::Sink::start(sink_listener).await;
    let (public, admin) = (common::free_port(), common::free_port());
    let toml = harness::relay_config(
        public,
        admin,
        &dir.path().join("spool.db"),
        &format!("http://{sink_addr}/broker"),
        &format!("http://{sink_addr}/hooks"),
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let relay = Relay::start(settings, Options::default()).await.unwrap();

    let n = 300;
    let report = harness::drive(relay.public_addr, 0, n, 8, None, harness::unix_now()).await;
    println!("{}", report.line("smoke"));
    assert_eq!(
        (report.success, report.non_success, report.errors),
        (n, 0, 0)
    );
    assert_eq!(
        report.login_success,
        n * 3 / 10,
        "the mix is 30 % login events"
    );

    let delivered = common::eventually(Duration::from_secs(30), || async {
        sink.count("/hooks") == n as u64 && sink.count("/broker") == report.login_success as u64
    })
    .await;
    assert!(
        delivered,
        "hooks {} of {n}, broker {} of {}",
        sink.count("/hooks"),
        sink.count("/broker"),
        report.login_success
    );
    relay.shutdown().await;
}
