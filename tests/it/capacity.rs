//! What an unauthenticated flood can and cannot take: the query is checked
//! before a byte of the body is read, connections and body bytes in flight
//! are capped, and idle connections make room for real pushes.

use crate::common;

use common::{
    body, eventually, generated, generated_config, metric, path, reference_now, status_line,
    vector, TestRelay,
};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

fn config(g: &Value, server_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nreply_budget = \"4s\"\n{server_extra}\n{}",
        generated_config(g)
    )
}

/// Sends a request head (and `body_part` of its body) on a new connection.
async fn open(relay: &TestRelay, target: &str, length: usize, body_part: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST {target} HTTP/1.1\r\nhost: relay\r\ncontent-type: text/xml\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body_part).await.unwrap();
    stream
}

async fn until_metric(relay: &TestRelay, name: &str, labels: &[(&str, &str)], value: f64) -> bool {
    eventually(WAIT, || async {
        metric(&relay.metrics().await, name, labels) == value
    })
    .await
}

#[tokio::test]
async fn an_unsigned_push_is_refused_before_its_body_is_sent() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, ""), reference_now(&g)).await;
    let v = vector(&g, "secure.CLICK");
    let signed = path("secure", &v["request"]);
    let declared = 256 * 1024;
    let cases = [
        ("/wx/secure?timestamp=1&nonce=2", "401"),
        (&*signed.replace("signature=", "signature=0"), "401"),
        // Signed, but a plaintext push to a secure account.
        (
            &*signed.replace("encrypt_type=aes", "encrypt_type=raw"),
            "403",
        ),
        (
            &*signed.replace("encrypt_type=aes", "encrypt_type=rot13"),
            "400",
        ),
    ];
    for (target, status) in cases {
        // Only the head: a relay that waited for the body would answer 408.
        let mut stream = open(&relay, target, declared, b"").await;
        let line = status_line(&mut stream).await;
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {line}"
        );
    }
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "bad_signature")]),
        2.0
    );
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "mode_refused")]),
        1.0
    );
    assert_eq!(
        metric(&m, "wxrelay_body_bytes_in_flight", &[]),
        0.0,
        "nothing was reserved for the refused bodies"
    );
    relay.stop().await;
}

#[tokio::test]
async fn idle_connections_at_the_cap_make_room_for_a_real_push() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, "max_connections = 4\n"), reference_now(&g)).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    assert!(
        until_metric(&relay, "wxrelay_open_connections", &[], 4.0).await,
        "the four idle connections were accepted"
    );
    let v = vector(&g, "secure.text");
    let answer = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let m = relay.metrics().await;
    assert!(
        metric(&m, "wxrelay_idle_connections_closed_total", &[]) >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "wxrelay_connections_refused_total", &[]), 0.0);
    assert!(metric(&m, "wxrelay_open_connections", &[]) <= 4.0);
    // The oldest idle connection is the one that was closed.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), idle[0].read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
    relay.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_get_503_while_a_signed_push_is_answered() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, "max_connections = 2\n"), reference_now(&g)).await;
    let (a, b) = (vector(&g, "secure.text"), vector(&g, "secure.image"));
    let (body_a, body_b) = (body(&a["request"]), body(&b["request"]));
    // Two pushes in progress: their heads are in, their bodies are not.
    let mut first = open(
        &relay,
        &path("secure", &a["request"]),
        body_a.len(),
        &body_a[..10],
    )
    .await;
    let _second = open(
        &relay,
        &path("secure", &b["request"]),
        body_b.len(),
        &body_b[..10],
    )
    .await;
    let reserved = (body_a.len() + body_b.len()) as f64;
    assert!(
        until_metric(&relay, "wxrelay_body_bytes_in_flight", &[], reserved).await,
        "both pushes are being read"
    );

    let mut third = TcpStream::connect(relay.addr).await.unwrap();
    let line = status_line(&mut third).await;
    assert!(line.starts_with("HTTP/1.1 503"), "over the cap: {line}");

    first.write_all(&body_a[10..]).await.unwrap();
    let line = status_line(&mut first).await;
    assert!(
        line.starts_with("HTTP/1.1 200"),
        "the push in progress: {line}"
    );
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "wxrelay_connections_refused_total", &[]), 1.0);
    relay.stop().await;
}

#[tokio::test]
async fn bodies_over_the_in_flight_budget_get_503() {
    let g = generated();
    let cfg = config(
        &g,
        "max_body = \"1KiB\"\nmax_body_bytes_in_flight = \"1KiB\"\n",
    );
    let relay = TestRelay::start(&cfg, reference_now(&g)).await;
    // A push padded with trailing whitespace to the whole budget.
    let a = vector(&g, "secure.text");
    let mut padded = body(&a["request"]);
    padded.resize(1024, b'\n');
    let mut first = open(
        &relay,
        &path("secure", &a["request"]),
        padded.len(),
        &padded[..10],
    )
    .await;
    assert!(
        until_metric(&relay, "wxrelay_body_bytes_in_flight", &[], 1024.0).await,
        "the first body holds the budget"
    );

    let b = vector(&g, "secure.image");
    let refused = relay
        .post(&path("secure", &b["request"]), body(&b["request"]))
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.text().len() < 120 && !refused.text().trim().is_empty());

    first.write_all(&padded[10..]).await.unwrap();
    let line = status_line(&mut first).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let again = relay
        .post(&path("secure", &b["request"]), body(&b["request"]))
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "busy")]),
        1.0
    );
    assert_eq!(metric(&m, "wxrelay_body_bytes_in_flight", &[]), 0.0);
    relay.stop().await;
}
