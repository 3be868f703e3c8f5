//! An Open Platform's `component_verify_ticket` is kept: durably with the
//! spool, the newest `CreateTime` winning, shared by every replica, served by
//! `GET /admin/ticket/{account}` and `wxrelay ticket`, its age a metric. And
//! it is routed like any event. Across restarts (`kill -9`, the real binary)
//! and replicas (two relays on one PostgreSQL schema).

use crate::common;
use crate::families::{accounts, relay_config, ticket_xml, OP};

use common::database::Database;
use common::replicas::Replicas;
use common::target::FakeTarget;
use common::{admin_request, metric, try_send, wxrelay, TestRelay};
use http::Method;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wxrelay::wechat::push::{self, PushParams, Sealing};

const ADMIN_TOKEN: &str = "admin-token-for-tickets";
const AGE: &str = "wxrelay_component_ticket_age_seconds";

/// The ticket push WeChat sends the platform's authorisation URL, stamped
/// `timestamp`.
fn ticket_push(ticket: &str, create_time: i64, timestamp: i64) -> (String, String) {
    let key = OP.aes();
    let nonce = format!("{create_time}{}", ticket.len());
    let push = push::build(
        &ticket_xml(ticket, create_time),
        Sealing::Secure(&key),
        &PushParams {
            token: OP.token,
            app_id: OP.receive_id,
            timestamp,
            nonce: &nonce,
            openid: None,
            random: &[b'T'; 16],
        },
    );
    (format!("/wx/platform?{}", push.query), push.body)
}

async fn send_ticket(to: SocketAddr, ticket: &str, create_time: i64, timestamp: i64) {
    let (path, body) = ticket_push(ticket, create_time, timestamp);
    let answer = try_send(to, Method::POST, &path, body.into())
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "success");
}

/// `GET /admin/ticket/{account}`: the status and, when there is one, the body.
async fn served(admin: SocketAddr, account: &str) -> (u16, Value) {
    let answer = admin_request(
        admin,
        Method::GET,
        &format!("/admin/ticket/{account}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    let body = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    (answer.status.as_u16(), body)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn an_open_platforms_ticket_is_kept_served_aged_and_routed() {
    let logs = common::logs::logs();
    let tickets = FakeTarget::start().await;
    let rest = format!(
        "{}[[routes]]\nmatch = {{ info_type = \"component_verify_ticket\" }}\nto = [\"tickets\"]\n",
        common::target("tickets", &tickets.url("/t"), "")
    );
    let toml = relay_config(&accounts("secure"), &rest).replacen(
        "[server]\n",
        &format!("[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n"),
        1,
    );
    let t0 = 1_717_000_000;
    let relay = TestRelay::start(&toml, t0).await;
    assert_eq!(served(relay.admin, "platform").await.0, 404, "none yet");
    // No ticket is infinitely old (Prometheus reads the exposition's `inf`
    // as +Inf), so the staleness alert fires for a platform that never got one.
    let age = metric(&relay.metrics().await, AGE, &[("account", "platform")]);
    assert!(age.is_infinite() && age > 0.0, "{age}");

    send_ticket(relay.addr, "ticket@@@first-kept", t0, t0).await;
    let (status, body) = served(relay.admin, "platform").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"ticket": "ticket@@@first-kept", "received_at": "2024-05-29T16:26:40.000Z"})
    );
    assert!(tickets.wait_for(1, Duration::from_secs(20)).await, "routed");
    assert!(
        tickets.received()[0].text().contains("<AppId>"),
        "raw, as it came"
    );

    relay.clock.advance_ms(90_000);
    let age = metric(&relay.metrics().await, AGE, &[("account", "platform")]);
    assert_eq!(age, 90.0, "the age moves with the clock");
    // An older ticket arriving late (another replica, a re-send) changes nothing.
    let now = t0 + 90;
    send_ticket(relay.addr, "ticket@@@older", t0 - 600, now).await;
    assert_eq!(
        served(relay.admin, "platform").await.1["ticket"],
        "ticket@@@first-kept"
    );
    send_ticket(relay.addr, "ticket@@@newer", t0 + 600, now).await;
    assert_eq!(
        served(relay.admin, "platform").await.1["ticket"],
        "ticket@@@newer"
    );
    let age = metric(&relay.metrics().await, AGE, &[("account", "platform")]);
    assert_eq!(age, 0.0);

    // The admin token guards it; only an Open Platform has one.
    let anonymous = admin_request(relay.admin, Method::GET, "/admin/ticket/platform", None).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(served(relay.admin, "main").await.0, 404);
    assert_eq!(served(relay.admin, "nobody").await.0, 404);
    // Every platform's at once.
    let all = admin_request(relay.admin, Method::GET, "/admin/ticket", Some(ADMIN_TOKEN)).await;
    let all: Value = serde_json::from_slice(&all.body).unwrap();
    assert_eq!(all["platform"]["ticket"], "ticket@@@newer");
    assert_eq!(all.as_object().unwrap().len(), 1, "{all}");
    let log = logs.text();
    assert!(log.contains("ticket=\"kept\"") && log.contains("ticket=\"older\""));
    assert!(
        !log.contains("first-kept") && !log.contains("ticket@@@newer"),
        "a ticket is a credential"
    );
    relay.stop().await;
}

/// A relay's configuration: the four kinds, on `spool`, with the admin token.
fn binary_config(public: SocketAddr, admin: SocketAddr, spool: &str) -> String {
    format!(
        "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\
         shutdown_timeout = \"3s\"\n\n[spool]\n{spool}\n{}",
        accounts("secure")
    )
}

#[tokio::test]
async fn the_ticket_survives_kill_9_and_wxrelay_ticket_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("path = \"{}\"\n", dir.path().join("spool.db").display());
    let config_path = dir.path().join("relay.toml");
    let config = {
        let (spool, path) = (spool.clone(), config_path.clone());
        move |public, admin| {
            let toml = binary_config(public, admin, &spool);
            std::fs::write(&path, &toml).unwrap();
            toml
        }
    };
    let mut relays = Replicas::start(1, &[], Box::new(config)).await;
    let now = now_secs();
    send_ticket(
        relays.replica(0).public,
        "ticket@@@before-the-kill",
        now,
        now,
    )
    .await;
    // SIGKILL: no drain, no close. Answered 200, so it is on the disk.
    relays.kill(0);
    let (code, out) = wxrelay(vec![
        "ticket".into(),
        "--config".into(),
        config_path.display().to_string(),
    ])
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ticket       ticket@@@before-the-kill"),
        "{out}"
    );
    assert!(
        out.contains("account      platform") && out.contains(" ago)"),
        "{out}"
    );
    let (code, out) = wxrelay(vec![
        "ticket".into(),
        "--config".into(),
        config_path.display().to_string(),
        "--account".into(),
        "corp".into(),
    ])
    .await;
    assert_eq!(code, Some(64), "not an Open Platform: {out}");

    relays.restart(0).await;
    let (status, body) = served(relays.replica(0).admin, "platform").await;
    assert_eq!(status, 200);
    assert_eq!(body["ticket"], "ticket@@@before-the-kill");
}

#[tokio::test]
async fn replicas_on_one_database_share_the_ticket() {
    let Some(db) = Database::create() else { return };
    let spool = db.spool_toml();
    let config = move |public, admin| binary_config(public, admin, &spool);
    let mut relays = Replicas::start(2, &[], Box::new(config)).await;
    let now = now_secs();
    send_ticket(
        relays.replica(0).public,
        "ticket@@@from-replica-0",
        now,
        now,
    )
    .await;
    // The other replica serves it, and measures its age, from the database.
    let (status, body) = served(relays.replica(1).admin, "platform").await;
    assert_eq!(
        (status, &body["ticket"]),
        (200, &Value::from("ticket@@@from-replica-0"))
    );
    let scrape = admin_request(relays.replica(1).admin, Method::GET, "/metrics", None).await;
    let age = metric(&scrape.text(), AGE, &[("account", "platform")]);
    assert!((0.0..60.0).contains(&age), "{age}");

    // The replica that stored it dies; the other takes a newer one, and the
    // first, started again, serves that.
    relays.kill(0);
    send_ticket(
        relays.replica(1).public,
        "ticket@@@from-replica-1",
        now + 1,
        now,
    )
    .await;
    relays.restart(0).await;
    let (_, body) = served(relays.replica(0).admin, "platform").await;
    assert_eq!(body["ticket"], "ticket@@@from-replica-1");
    // An older one, reaching replica 0 after the newer reached replica 1.
    send_ticket(relays.replica(0).public, "ticket@@@late", now - 5, now).await;
    let (_, body) = served(relays.replica(1).admin, "platform").await;
    assert_eq!(body["ticket"], "ticket@@@from-replica-1");
}
