//! What operators rely on: metrics that move with what happened, readiness
//! that follows the spool, reloads that apply a valid file atomically and keep
//! the running configuration on an invalid one, and an admin API behind its token.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{
    admin_request_authorized, body, generated, generated_config, metric, path, reference_now,
    vector, TestRelay,
};
use http::Method;
use serde_json::Value;
use std::time::Duration;
use wxrelay::spool::DeadFilter;

const WAIT: Duration = Duration::from_secs(20);

fn config(g: &Value, hooks_url: &str, routes: &str, server_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n{}\n\
         [targets.hooks]\nurl = \"{hooks_url}\"\nretry_schedule = [\"1s\"]\n\n{routes}",
        generated_config(g)
    )
}

#[tokio::test]
async fn metrics_follow_valid_invalid_duplicate_pushes_and_failed_deliveries() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::body(400, "text/plain", "no"));
    let routes = "[[routes]]\nmatch = { msg_type = \"event\" }\nto = [\"hooks\"]\n";
    let relay = TestRelay::start(&config(&g, &hooks.url("/"), routes, ""), reference_now(&g)).await;
    let before = relay.metrics().await;
    assert_eq!(metric(&before, "wxrelay_build_info", &[]), 1.0);
    assert_eq!(
        metric(&before, "wxrelay_spool_pending", &[("target", "hooks")]),
        0.0
    );

    let click = vector(&g, "secure.CLICK");
    assert_eq!(
        relay
            .post(&path("secure", &click["request"]), body(&click["request"]))
            .await
            .status,
        200
    );
    assert_eq!(
        relay
            .post(&path("secure", &click["request"]), body(&click["request"]))
            .await
            .status,
        200
    );
    let text = vector(&g, "secure.text");
    assert_eq!(
        relay
            .post(&path("secure", &text["request"]), body(&text["request"]))
            .await
            .status,
        200
    );
    let forged = path("secure", &click["request"]).replace("signature=", "signature=0");
    assert_eq!(
        relay.post(&forged, body(&click["request"])).await.status,
        401
    );
    assert_eq!(relay.post("/wx/nobody?signature=x", "x").await.status, 404);
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(
        relay
            .until_dead_letter(DeadFilter {
                target: Some("hooks".into()),
                ..Default::default()
            })
            .await
    );

    let m = relay.metrics().await;
    let pushes = |verdict| {
        metric(
            &m,
            "wxrelay_pushes_total",
            &[("account", "secure"), ("verdict", verdict)],
        )
    };
    assert_eq!(pushes("ok"), 2.0, "the click and the text");
    assert_eq!(pushes("duplicate"), 1.0);
    assert_eq!(pushes("bad_signature"), 1.0);
    assert_eq!(
        metric(
            &m,
            "wxrelay_pushes_total",
            &[("account", "-"), ("verdict", "unknown_account")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_answer_duration_seconds_count",
            &[("account", "secure")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_answer_duration_seconds_bucket",
            &[("account", "secure"), ("le", "5")]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_events_total",
            &[("msg_type", "event"), ("event", "CLICK")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "wxrelay_events_total", &[("msg_type", "text")]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_deliveries_total",
            &[("target", "hooks"), ("outcome", "dead_lettered")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_dead_letters_total",
            &[("target", "hooks"), ("reason", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_dead_letters_total",
            &[("target", ""), ("reason", "unrouted")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_delivery_duration_seconds_count",
            &[("target", "hooks")]
        ),
        1.0
    );

    // A target that is down: its backlog and the age of its oldest event show.
    hooks.set_default(Behaviour::status(503));
    let location = vector(&g, "secure.LOCATION");
    assert_eq!(
        relay
            .post(
                &path("secure", &location["request"]),
                body(&location["request"])
            )
            .await
            .status,
        200
    );
    assert!(hooks.wait_for(2, WAIT).await);
    assert!(relay.until_attempts("hooks", 1).await);
    relay.clock.advance_ms(30_000);
    let m = relay.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wxrelay_deliveries_total",
            &[("target", "hooks"), ("outcome", "retried")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "wxrelay_spool_pending", &[("target", "hooks")]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_spool_oldest_pending_age_seconds",
            &[("target", "hooks")]
        ),
        30.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn previous_key_decrypts_are_counted() {
    let g = generated();
    let relay = TestRelay::start(
        &config(&g, "http://127.0.0.1:9/", "", ""),
        reference_now(&g),
    )
    .await;
    let v = g["special"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == "special.key_rotation_previous_key")
        .unwrap();
    assert_eq!(
        relay
            .post(&path("rotating", &v["request"]), body(&v["request"]))
            .await
            .status,
        200
    );
    let m = relay.metrics().await;
    assert_eq!(
        metric(
            &m,
            "wxrelay_previous_key_decrypts_total",
            &[("account", "rotating")]
        ),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_spool_and_health_the_process() {
    let g = generated();
    let relay = TestRelay::start(
        &config(&g, "http://127.0.0.1:9/", "", ""),
        reference_now(&g),
    )
    .await;
    assert_eq!(relay.admin(Method::GET, "/readyz", None).await.status, 200);
    relay.close_spool().await;
    let ready = relay.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("spool"));
    assert_eq!(relay.admin(Method::GET, "/healthz", None).await.status, 200);
    // And WeChat is told to come back, not success.
    let v = vector(&g, "secure.CLICK");
    assert_eq!(
        relay
            .post(&path("secure", &v["request"]), body(&v["request"]))
            .await
            .status,
        503
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_reload_adds_a_route_and_the_next_push_follows_it() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let only_clicks = "[[routes]]\nmatch = { event = \"CLICK\" }\nto = [\"hooks\"]\n";
    let relay = TestRelay::start(
        &config(&g, &hooks.url("/"), only_clicks, ""),
        reference_now(&g),
    )
    .await;
    let text = vector(&g, "secure.text");
    assert_eq!(
        relay
            .post(&path("secure", &text["request"]), body(&text["request"]))
            .await
            .status,
        200
    );
    assert_eq!(relay.unrouted().await.len(), 1, "no route for text yet");

    let with_catch_all = config(
        &g,
        &hooks.url("/"),
        &format!("{only_clicks}\n[[routes]]\nto = [\"hooks\"]\n"),
        "",
    );
    std::fs::write(relay.config_path(), with_catch_all).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let image = vector(&g, "secure.image");
    assert_eq!(
        relay
            .post(&path("secure", &image["request"]), body(&image["request"]))
            .await
            .status,
        200
    );
    assert!(hooks.wait_for(1, WAIT).await);
    assert_eq!(
        hooks.received()[0].body,
        body(&image["request"]),
        "delivered raw"
    );
    assert_eq!(relay.unrouted().await.len(), 1, "the image was routed");
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_running_routes_and_is_counted() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let relay = TestRelay::start(
        &config(&g, &hooks.url("/"), "[[routes]]\nto = [\"hooks\"]\n", ""),
        reference_now(&g),
    )
    .await;

    let broken = config(&g, &hooks.url("/"), "[[routes]]\nto = [\"nowhere\"]\n", "");
    std::fs::write(relay.config_path(), broken).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 422);
    assert!(answer.text().contains("routes[0].to"), "{}", answer.text());

    let v = vector(&g, "secure.CLICK");
    assert_eq!(
        relay
            .post(&path("secure", &v["request"]), body(&v["request"]))
            .await
            .status,
        200
    );
    assert!(
        hooks.wait_for(1, WAIT).await,
        "the old route still delivers"
    );
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_config_reloads_total", &[("result", "failed")]),
        1.0
    );
    assert_eq!(
        metric(&m, "wxrelay_config_reloads_total", &[("result", "ok")]),
        0.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_admin_api_requires_the_admin_token_when_one_is_set() {
    let g = generated();
    let cfg = config(
        &g,
        "http://127.0.0.1:9/",
        "",
        "admin_token = \"s3cret-admin-token\"\n",
    );
    let relay = TestRelay::start(&cfg, reference_now(&g)).await;
    assert_eq!(
        relay
            .admin(Method::POST, "/admin/reload", None)
            .await
            .status,
        401
    );
    assert_eq!(
        relay
            .admin(Method::POST, "/admin/reload", Some("wrong"))
            .await
            .status,
        401
    );
    assert_eq!(
        relay
            .admin(Method::POST, "/admin/reload", Some("s3cret-admin-token"))
            .await
            .status,
        200
    );
    // The scheme is case-insensitive (RFC 7235 §2.1); the token is not.
    for (authorization, status) in [
        ("bearer s3cret-admin-token", 200),
        ("BEARER s3cret-admin-token", 200),
        ("BeArEr s3cret-admin-token", 200),
        ("Bearer S3CRET-ADMIN-TOKEN", 401),
        ("Basic s3cret-admin-token", 401),
        ("Bearers3cret-admin-token", 401),
        ("s3cret-admin-token", 401),
    ] {
        let answer = admin_request_authorized(
            relay.admin,
            Method::POST,
            "/admin/reload",
            Some(authorization),
        )
        .await;
        assert_eq!(answer.status, status, "{authorization}");
    }
    // Metrics and health stay open for scrapers and probes.
    assert_eq!(relay.admin(Method::GET, "/metrics", None).await.status, 200);
    assert_eq!(relay.admin(Method::GET, "/healthz", None).await.status, 200);
    relay.stop().await;
}

#[tokio::test]
async fn a_paused_target_holds_its_deliveries_until_a_reload_releases_them() {
    let g = generated();
    let (held, live) = (FakeTarget::start().await, FakeTarget::start().await);
    let with = |paused: bool| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}\n\
             [targets.held]\nurl = \"{}\"\npaused = {paused}\n\n[targets.live]\nurl = \"{}\"\n\n[[routes]]\nto = [\"held\", \"live\"]\n",
            generated_config(&g),
            held.url("/"),
            live.url("/")
        )
    };
    let relay = TestRelay::start(&with(true), reference_now(&g)).await;
    let ids = ["secure.CLICK", "secure.text", "secure.LOCATION"];
    for id in ids {
        let v = vector(&g, id);
        assert_eq!(
            relay
                .post(&path("secure", &v["request"]), body(&v["request"]))
                .await
                .status,
            200
        );
    }
    assert!(
        live.wait_for(ids.len(), WAIT).await,
        "the other target is not held"
    );
    assert_eq!(held.count(), 0, "nothing is sent to a paused target");
    assert_eq!(
        relay.spool.waiting("held", 10).await.unwrap().len(),
        ids.len()
    );

    std::fs::write(relay.config_path(), with(false)).unwrap();
    assert_eq!(
        relay
            .admin(Method::POST, "/admin/reload", None)
            .await
            .status,
        200
    );
    assert!(
        held.wait_for(ids.len(), WAIT).await,
        "released by the reload"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_body_that_never_finishes_is_refused_with_408_and_stores_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = generated();
    let cfg = config(&g, "http://127.0.0.1:9/", "", "reply_budget = \"1s\"\n");
    let relay = TestRelay::start(&cfg, reference_now(&g)).await;
    let v = vector(&g, "secure.CLICK");
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: relay\r\ncontent-type: text/xml\r\ncontent-length: 1000\r\n\r\n<xml>",
        path("secure", &v["request"])
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(relay.nothing_pending().await && relay.unrouted().await.is_empty());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "bad_request")]),
        1.0
    );
    relay.stop().await;
}
