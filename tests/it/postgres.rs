//! The relay on the PostgreSQL spool: a push stored and delivered through
//! the real server, the schema applied by `wxrelay migrate` (again and again
//! to no effect) and a newer schema refused, the operator commands on the
//! shared queue, a database outage answered 503 and recovered from without
//! a restart, and the database password kept out of what the relay prints. The tests that need the database skip (saying so once) unless
//! `WXRELAY_TEST_POSTGRES_URL` names one.

use crate::common;

use common::proxy::{self, CutProxy};
use common::target::{Behaviour, FakeTarget};
use common::{body, generated, hooks_config, path, reference_now, vector, TestRelay};
use std::process::Command;
use std::time::Duration;
use wxrelay::app::{Options, Relay};
use wxrelay::clock::{Clock, SystemClock};
use wxrelay::config::{Secret, Settings, SslMode};
use wxrelay::spool::postgres::testing::{test_url, TestSchema};
use wxrelay::spool::postgres::{latest_schema_version, OnOpen};
use wxrelay::spool::{DeadFilter, Health, PostgresSpool};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "Pg-S3cret-pw";

async fn wxrelay(args: Vec<String>, env: Vec<(&'static str, String)>) -> (Option<i32>, String) {
    common::run_wxrelay(args, env).await
}

/// A configuration on the PostgreSQL spool `spool` (its TOML lines) with the
/// vectors' accounts, written to a file in `dir`.
fn config_file(dir: &tempfile::TempDir, spool: &str) -> String {
    config_file_with(dir, spool, &common::generated_config(&generated()))
}

/// As [`config_file`], with `rest` (accounts, targets, routes) after the spool.
fn config_file_with(dir: &tempfile::TempDir, spool: &str, rest: &str) -> String {
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!("[spool]\nbackend = \"postgres\"\n{spool}\n{rest}"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn spool_lines(schema: &TestSchema) -> String {
    format!(
        "url = \"{}\"\nschema = \"{}\"\n",
        schema.settings.url.expose(),
        schema.settings.schema
    )
}

#[tokio::test]
async fn a_push_is_stored_and_delivered_through_postgres() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let toml = hooks_config(&g, &hooks.url("/"), "");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let v = vector(&g, "secure.CLICK");
    let answer = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(hooks.wait_for(1, WAIT).await, "delivered");
    assert!(relay.until_nothing_pending("hooks").await);
    // The same push again is a duplicate: stored once, delivered once.
    let again = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(again.status, 200);
    assert!(relay.metrics().await.contains("verdict=\"duplicate\""));
    assert_eq!(hooks.count(), 1);
    assert_eq!(
        relay.admin(http::Method::GET, "/readyz", None).await.status,
        200
    );
    relay.stop().await;
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_then_changes_nothing() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::new(&url);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, &spool_lines(&schema));
    let migrate = || {
        wxrelay(
            vec!["migrate".into(), "--config".into(), config.clone()],
            vec![],
        )
    };

    let (code, first) = migrate().await;
    assert_eq!(code, Some(0), "{first}");
    let latest = latest_schema_version();
    assert!(first.contains("applied 1 queue"), "{first}");
    assert!(
        first.contains(&format!(
            "schema {} migrated from version 0 to {latest}",
            schema.settings.schema
        )),
        "{first}"
    );
    let (code, second) = migrate().await;
    assert_eq!(code, Some(0), "{second}");
    assert!(
        second.contains(&format!("up to date at version {latest}")),
        "{second}"
    );
    assert!(!second.contains("applied"), "{second}");
    // The operator commands use the migrated schema as it is.
    let (code, out) = wxrelay(
        vec!["dlq".into(), "list".into(), "--config".into(), config],
        vec![],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::new(&url);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir, &spool_lines(&schema));
    let (code, out) = wxrelay(
        vec!["migrate".into(), "--config".into(), config.clone()],
        vec![],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    // A later release has been here.
    schema.execute(&format!(
        "INSERT INTO \"{}\".schema_migrations (version, name) VALUES (99, 'from the future')",
        schema.settings.schema
    ));

    let settings = Settings::load(std::path::Path::new(&config)).unwrap();
    let refused = Relay::start(
        settings,
        Options {
            public: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            admin: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            ..Options::default()
        },
    )
    .await;
    let Err(e) = refused else {
        panic!("started on a newer schema")
    };
    let message = e.to_string();
    assert!(
        message.contains(&format!(
            "at version 99, newer than this wxrelay knows ({})",
            latest_schema_version()
        )),
        "{message}"
    );
    let (code, out) = wxrelay(
        vec!["migrate".into(), "--config".into(), config.clone()],
        vec![],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("newer than this wxrelay knows"), "{out}");
    let (code, out) = wxrelay(
        vec!["dlq".into(), "list".into(), "--config".into(), config],
        vec![],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("newer than this wxrelay knows"), "{out}");
}

#[tokio::test]
async fn the_operator_commands_work_on_the_shared_queue_beside_a_running_relay() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(400));
    let toml = hooks_config(&g, &hooks.url("/"), "");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_file_with(&dir, &spool_lines(relay.schema.as_ref().unwrap()), &toml);
    let command = |name: &str, args: &[&str]| {
        let mut all = vec![name.to_owned()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--config".to_owned(), config.clone()]);
        wxrelay(all, vec![])
    };
    let dlq = |args: &[&str]| command("dlq", args);
    let v = vector(&g, "secure.CLICK");
    let answer = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(answer.status, 200);
    assert!(relay.until_dead_letter(DeadFilter::default()).await);

    let (code, listed) = dlq(&["list"]).await;
    assert_eq!(code, Some(0), "{listed}");
    assert!(listed.contains("rejected"), "{listed}");
    let (code, pending) = command("pending", &["list", "--target", "hooks"]).await;
    assert_eq!(code, Some(0), "{pending}");
    assert!(
        pending.contains("no delivery of hooks is pending"),
        "{pending}"
    );
    hooks.set_default(Behaviour::status(200));
    let (code, replayed) = dlq(&["replay", "--target", "hooks"]).await;
    assert_eq!(code, Some(0), "{replayed}");
    // Replayed deliveries are due at the command's (the system's) time.
    let behind = SystemClock.now_ms() - Clock::now_ms(&*relay.clock);
    relay.clock.advance_ms(behind.max(0) + 1);
    assert!(hooks.wait_for(2, WAIT).await, "sent again");
    assert!(relay.until_nothing_pending("hooks").await);
    let (code, listed) = dlq(&["list"]).await;
    assert_eq!(code, Some(0), "{listed}");
    assert!(!listed.contains("rejected"), "{listed}");
    relay.stop().await;
}

#[tokio::test]
async fn the_database_password_never_shows_in_check_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://relay:{PASSWORD}@db.internal:5432/relay");
    let config = config_file(&dir, &format!("url = \"{url}\"\n"));
    let (code, out) = wxrelay(vec!["check".into(), "--config".into(), config], vec![]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("postgres://relay@db.internal:5432/relay"),
        "{out}"
    );
    assert!(!out.contains(PASSWORD), "{out}");

    // From the environment, and with a mistake in it.
    let config = config_file(&dir, "");
    let bad = format!("postgres://relay:{PASSWORD}@db.internal:notaport/relay");
    let (code, out) = wxrelay(
        vec!["check".into(), "--config".into(), config.clone()],
        vec![("WXRELAY_SPOOL__URL", bad)],
    )
    .await;
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("spool.url: not a PostgreSQL connection string"),
        "{out}"
    );
    assert!(!out.contains(PASSWORD), "{out}");
    let (code, out) = wxrelay(
        vec!["check".into(), "--config".into(), config.clone()],
        vec![("WXRELAY_SPOOL__URL", url)],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains(PASSWORD), "{out}");

    // An '@' left unescaped in the password: refused, and no part of it shown.
    let slip = "postgres://relay:Tr0ub@dor-SECRET@db.internal:5432/relay".to_owned();
    let (code, out) = wxrelay(
        vec!["check".into(), "--config".into(), config.clone()],
        vec![("WXRELAY_SPOOL__URL", slip)],
    )
    .await;
    assert_eq!(code, Some(64), "{out}");
    assert!(!out.contains("SECRET") && !out.contains("Tr0ub"), "{out}");

    // A database that refuses the connection: the error names it without the password.
    let unreachable = format!("postgres://relay:{PASSWORD}@127.0.0.1:9/relay");
    let (code, out) = wxrelay(
        vec!["dlq".into(), "list".into(), "--config".into(), config],
        vec![("WXRELAY_SPOOL__URL", unreachable)],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("database"), "{out}");
    assert!(!out.contains(PASSWORD), "{out}");
}

#[tokio::test]
async fn a_database_outage_is_answered_503_and_the_relay_recovers_by_itself() {
    let Some(url) = test_url() else { return };
    let g = generated();
    let hooks = FakeTarget::start().await;
    let proxy = CutProxy::start(proxy::upstream(&url)).await;
    let mut schema = TestSchema::new(&url);
    schema.settings.url = Secret::new(proxy.url_through(&url));
    let toml = hooks_config(&g, &hooks.url("/"), "");
    let relay = TestRelay::start_on_schema(&toml, reference_now(&g), schema).await;
    let push = |id: &str| {
        let v = vector(&g, id);
        relay.post_later(path("secure", &v["request"]), body(&v["request"]))
    };
    let ready = || async { relay.admin(http::Method::GET, "/readyz", None).await.status };

    assert_eq!(push("secure.CLICK").await.status, 200);
    assert!(hooks.wait_for(1, WAIT).await);

    proxy.cut();
    let refused = push("secure.VIEW").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("spool unavailable"),
        "{}",
        refused.text()
    );
    assert_eq!(ready().await, 503);

    proxy.restore();
    let recovered = common::eventually(WAIT, || async { ready().await == 200 }).await;
    assert!(recovered, "ready again without a restart");
    // WeChat's re-send of the refused push is stored now, not a duplicate:
    // the 503 stored nothing.
    assert_eq!(push("secure.VIEW").await.status, 200);
    assert!(hooks.wait_for(2, WAIT).await, "delivered after the outage");
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("wxrelay_pushes_total{account=\"secure\",verdict=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("wxrelay_pushes_total{account=\"secure\",verdict=\"spool_unavailable\"} 1"),
        "{metrics}"
    );
    assert_eq!(hooks.count(), 2);
    relay.stop().await;
}

#[tokio::test]
async fn a_commit_slower_than_the_reply_budget_is_a_503_and_stores_at_most_once() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let toml = hooks_config(&g, &hooks.url("/"), "");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let schema = relay.schema.as_ref().unwrap();
    // Another session holds the dedup table: the commit waits for it past
    // the reply budget (1 s here).
    let (other, connection) = tokio_postgres::connect(&test_url().unwrap(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    other
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{}\".dedup IN EXCLUSIVE MODE",
            schema.settings.schema
        ))
        .await
        .unwrap();
    let v = vector(&g, "secure.CLICK");
    let send = || relay.post_later(path("secure", &v["request"]), body(&v["request"]));
    let late = send().await;
    assert_eq!(late.status, 503, "{}", late.text());
    assert!(late.text().contains("reply budget"), "{}", late.text());
    other.batch_execute("ROLLBACK").await.unwrap();

    // The commit WeChat was not told about may have gone through after
    // all: its re-send is then a duplicate. Either way one delivery.
    assert_eq!(send().await.status, 200);
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    assert_eq!(hooks.count(), 1);
    relay.stop().await;
}

/// A push's trail row goes out with its commit's `COMMIT`, which after a
/// failed statement answers `ROLLBACK` without an error: a trail row the
/// database refuses must fail the push (503, nothing stored), so that
/// WeChat's re-send is stored and delivered, not taken for a duplicate.
#[tokio::test]
async fn a_trail_row_the_database_refuses_fails_the_push_and_stores_nothing() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let toml = hooks_config(&g, &hooks.url("/"), "");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let schema = relay.schema.as_ref().unwrap();
    let trail = format!("\"{}\".trail_events", schema.settings.schema);
    schema.execute(&format!(
        "ALTER TABLE {trail} ADD CONSTRAINT no_rows CHECK (false) NOT VALID"
    ));
    let v = vector(&g, "secure.CLICK");
    let send = || relay.post_later(path("secure", &v["request"]), body(&v["request"]));
    let refused = send().await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.text().contains("spool unavailable"),
        "{}",
        refused.text()
    );
    for table in ["events", "deliveries", "dedup", "trail_events"] {
        assert_eq!(schema.count(table), 0, "{table} after the failed commit");
    }

    schema.execute(&format!("ALTER TABLE {trail} DROP CONSTRAINT no_rows"));
    assert_eq!(send().await.status, 200);
    assert!(hooks.wait_for(1, WAIT).await, "the re-send is delivered");
    assert_eq!(schema.count("trail_events"), 1);
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains("wxrelay_pushes_total{account=\"secure\",verdict=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("verdict=\"duplicate\""), "{metrics}");
    relay.stop().await;
}

/// The test database's certificate, when it serves TLS and the file is
/// readable here (a database on this host).
async fn server_certificate(url: &str) -> Option<String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    if show("ssl").await != "on" {
        return None;
    }
    let file = show("ssl_cert_file").await;
    std::fs::metadata(&file).ok().map(|_| file)
}

/// The `sslmode` values as libpq has them, against the test database's own
/// certificate (which no public root signed, and which names `localhost`).
#[tokio::test]
async fn tls_require_verifies_nothing_verify_ca_the_chain_and_verify_full_the_name_too() {
    let Some(url) = test_url() else { return };
    let Some(cert) = server_certificate(&url).await else {
        eprintln!("the test database serves no TLS here: TLS test skipped");
        return;
    };
    let name = |cert_file: &str| -> Option<String> {
        // The certificate's first DNS name, for verify-full to match.
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in", cert_file])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("DNS:")
            .nth(1)
            .map(|n| n.split([',', '\n']).next().unwrap_or("").trim().to_owned())
    };
    let open = |host: &str, sslmode: SslMode, ca_file: Option<&str>| {
        let mut schema = TestSchema::new(&url);
        let mut with_host = url::Url::parse(&url).unwrap();
        with_host.set_host(Some(host)).unwrap();
        schema.settings.url = Secret::new(with_host.to_string());
        schema.settings.sslmode = sslmode;
        schema.settings.ca_file = ca_file.map(Into::into);
        async move {
            let opened = PostgresSpool::open(&schema.settings, OnOpen::Migrate).await;
            if let Ok(spool) = &opened {
                spool.probe().await.unwrap();
                spool.close().await;
            }
            opened.map(|_| ()).map_err(|e| wxrelay::error_chain(&e))
        }
    };
    // The certificate does not name 127.0.0.1: verify-ca takes it, its
    // chain being good, and so does require given the CA (as libpq with a
    // root certificate); verify-full does not.
    open("127.0.0.1", SslMode::VerifyCa, Some(&cert))
        .await
        .unwrap();
    open("127.0.0.1", SslMode::Require, Some(&cert))
        .await
        .unwrap();
    let refused = open("127.0.0.1", SslMode::VerifyFull, Some(&cert))
        .await
        .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    // Against the public roots alone the chain does not verify.
    let refused = open("127.0.0.1", SslMode::VerifyCa, None)
        .await
        .unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    // Without a CA of its own, require encrypts and verifies nothing, as in
    // libpq: the database's certificate, which no public root signed, is taken.
    open("127.0.0.1", SslMode::Require, None).await.unwrap();
    if let Some(host) = name(&cert).filter(|h| h == "localhost") {
        open(&host, SslMode::VerifyFull, Some(&cert)).await.unwrap();
    }
}

#[tokio::test]
async fn a_connection_gone_silent_is_replaced_not_reused() {
    let Some(url) = test_url() else { return };
    let proxy = CutProxy::start(proxy::upstream(&url)).await;
    let mut schema = TestSchema::new(&url);
    schema.settings.url = Secret::new(proxy.url_through(&url));
    schema.settings.pool_size = 2;
    let spool = PostgresSpool::open(&schema.settings, OnOpen::Migrate)
        .await
        .unwrap();
    // Both of the pool's connections in use once.
    let (a, b) = tokio::join!(spool.probe(), spool.probe());
    a.unwrap();
    b.unwrap();
    proxy.stall();
    // Each silent connection fails its operation when its time is up...
    let (a, b) = tokio::join!(spool.probe(), spool.probe());
    assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    // ...and is not handed out again: the next one is new, and works.
    spool.probe().await.unwrap();
    spool.close().await;
}

/// The shared queue's gauges count the whole backlog in the database: they
/// are read at most every few seconds, however often `/metrics` is scraped,
/// and follow the queue once that time has passed.
#[tokio::test]
async fn the_queue_gauges_are_read_at_most_every_few_seconds_whatever_the_scrapes() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let toml = hooks_config(&g, &hooks.url("/"), "paused = true");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let pending = || async {
        let text = relay.metrics().await;
        common::metric(&text, "wxrelay_spool_pending", &[("target", "hooks")])
    };
    let push = |id: &str| {
        let v = vector(&g, id);
        relay.post_later(path("secure", &v["request"]), body(&v["request"]))
    };
    assert_eq!(push("secure.CLICK").await.status, 200);
    assert_eq!(pending().await, 1.0);
    assert_eq!(push("secure.text").await.status, 200);
    for scrape in 0..20 {
        assert_eq!(pending().await, 1.0, "scrape {scrape}: the last reading");
    }
    let followed = common::eventually(WAIT, || async { pending().await == 2.0 }).await;
    assert!(followed, "read again once its time has passed");
    relay.stop().await;
}
