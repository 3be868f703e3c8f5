//! Input two parsers could read two ways is refused: repeated query
//! parameters, repeated top-level XML elements, a root other than `<xml>`,
//! characters XML 1.0 forbids. And what hyper refuses before the relay sees a
//! request is counted.

use crate::common;

use common::{
    body, config, generated, metric, path, reference_now, status_line, vector, TestRelay,
};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::push::{self, PushParams, Sealing};

/// `xml` sealed for account `mode` of the vectors, signed as WeChat would,
/// with the `openid` of the sender the tests' messages name.
fn sealed(g: &Value, mode: &str, xml: &str) -> (String, String) {
    sealed_for(g, mode, xml, Some("o1"))
}

/// As [`sealed`], with `openid` in the query (or none).
fn sealed_for(g: &Value, mode: &str, xml: &str, openid: Option<&str>) -> (String, String) {
    let c = &g["config"];
    let key = AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap();
    let sealing = match mode {
        "plaintext" => Sealing::Plaintext,
        "compat" => Sealing::Compat(&key),
        _ => Sealing::Secure(&key),
    };
    let p = push::build(
        xml,
        sealing,
        &PushParams {
            token: c["token"].as_str().unwrap(),
            app_id: c["appid"].as_str().unwrap(),
            timestamp: reference_now(g),
            nonce: "4242",
            openid,
            random: &[b'A'; 16],
        },
    );
    (format!("/wx/{mode}?{}", p.query), p.body)
}

fn message(fields: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName><CreateTime>1716999999</CreateTime>\
         <MsgType><![CDATA[text]]></MsgType>{fields}<MsgId>77</MsgId></xml>"
    )
}

fn assert_refused(answer: &common::Answer, what: &str) {
    assert_eq!(answer.status, 400, "{what}: {}", answer.text());
    let reason = answer.text();
    assert!(
        !reason.trim().is_empty() && reason.len() < 120,
        "{what}: {reason}"
    );
}

#[tokio::test]
async fn a_repeated_query_parameter_is_refused() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    let v = vector(&g, "secure.text");
    for name in [
        "signature",
        "timestamp",
        "nonce",
        "msg_signature",
        "encrypt_type",
        "openid",
    ] {
        let target = format!("{}&{name}=other", path("secure", &v["request"]));
        let answer = relay.post(&target, body(&v["request"])).await;
        assert_refused(&answer, name);
        assert!(answer.text().contains(name), "{}", answer.text());
    }
    let check = &g["url_verification"][0]["request"];
    let target = format!(
        "/wx/secure?{}&echostr=other",
        check["query_string"].as_str().unwrap()
    );
    assert_refused(&relay.get(&target).await, "echostr");
    // A parameter the relay neither verifies nor forwards on may repeat.
    let target = format!("{}&utm=a&utm=b", path("secure", &v["request"]));
    assert_eq!(relay.post(&target, body(&v["request"])).await.status, 200);

    assert!(
        relay.unrouted().await.len() == 1,
        "only the last was stored"
    );
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "bad_request")]),
        6.0
    );
    assert_eq!(
        metric(
            &m,
            "wxrelay_url_checks_total",
            &[("verdict", "bad_request")]
        ),
        1.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_repeated_top_level_element_or_another_root_is_refused() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    let twice_from = message(
        "<FromUserName><![CDATA[oFirst]]></FromUserName><FromUserName><![CDATA[oSecond]]></FromUserName>",
    );
    for mode in ["plaintext", "compat", "secure"] {
        let (target, body) = sealed(&g, mode, &twice_from);
        assert_refused(
            &relay.post(&target, body).await,
            &format!("{mode}: two FromUserName"),
        );
    }
    // Two <Encrypt>: the first is the one msg_signature covers.
    let v = vector(&g, "secure.text");
    let outer = String::from_utf8(body(&v["request"])).unwrap();
    let doubled = outer.replacen(
        "</Encrypt>",
        "</Encrypt><Encrypt><![CDATA[AAAA]]></Encrypt>",
        1,
    );
    assert_ne!(doubled, outer);
    assert_refused(
        &relay.post(&path("secure", &v["request"]), doubled).await,
        "two Encrypt",
    );
    let (target, body) = sealed(
        &g,
        "plaintext",
        &message("<FromUserName>o1</FromUserName>").replace("xml>", "root>"),
    );
    assert_refused(&relay.post(&target, body).await, "root <root>");

    assert!(relay.unrouted().await.is_empty(), "nothing stored");
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_pushes_total", &[("verdict", "bad_xml")]),
        5.0
    );
    relay.stop().await;
}

#[tokio::test]
async fn characters_xml_forbids_are_refused_even_as_references() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    for (what, content) in [
        ("NUL", "<Content>a\u{0}b</Content>"),
        ("&#0;", "<Content>a&#0;b</Content>"),
        ("&#x1F;", "<Content>a&#x1F;b</Content>"),
        ("U+FFFE", "<Content>a\u{FFFE}b</Content>"),
        ("NUL in CDATA", "<Content><![CDATA[a\u{0}b]]></Content>"),
        (
            "&#0; in an attribute",
            "<Content kind=\"&#0;\">ab</Content>",
        ),
        ("VT in an attribute", "<Content kind=\"\u{b}\">ab</Content>"),
    ] {
        let xml = message(&format!("<FromUserName>o1</FromUserName>{content}"));
        for mode in ["plaintext", "secure"] {
            let (target, body) = sealed(&g, mode, &xml);
            assert_refused(&relay.post(&target, body).await, &format!("{mode}: {what}"));
        }
    }
    // Tab, newline and carriage return are allowed, as is the rest of Unicode.
    let (target, body) = sealed(
        &g,
        "plaintext",
        &message("<FromUserName>o1</FromUserName><Content>a\tb\r\nc&#9;你好\u{10000}</Content>"),
    );
    let answer = relay.post(&target, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    relay.stop().await;
}

/// The query's `openid` is covered by no signature: a push that names another
/// user there than in its (decrypted) `FromUserName` could be read as from
/// either by whoever reads the query, so it is refused in every mode.
#[tokio::test]
async fn an_openid_that_is_not_the_sender_is_refused_in_every_mode() {
    let g = generated();
    let logs = crate::common::logs::logs();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    let xml = message("<FromUserName><![CDATA[o1]]></FromUserName>");
    for mode in ["plaintext", "compat", "secure"] {
        let (target, body) = sealed_for(&g, mode, &xml, Some("oSomeoneElse"));
        let answer = relay.post(&target, body).await;
        assert_refused(&answer, &format!("{mode}: another openid"));
        assert_eq!(
            answer.text().trim(),
            "openid does not match FromUserName",
            "{mode}"
        );
    }
    assert!(relay.unrouted().await.is_empty(), "nothing stored");
    let m = relay.metrics().await;
    for mode in ["plaintext", "compat", "secure"] {
        let verdict = [("account", mode), ("verdict", "openid_mismatch")];
        assert_eq!(metric(&m, "wxrelay_pushes_total", &verdict), 1.0, "{m}");
    }
    let log = logs.text();
    assert!(
        log.lines()
            .any(|l| l.contains("openid_mismatch")
                && l.contains("openid does not match FromUserName")),
        "a log line per refusal"
    );
    assert!(!log.contains("oSomeoneElse"), "no OpenID in the log");

    // The same pushes with the sender's openid, or with none, are taken.
    for (mode, openid) in [
        ("plaintext", Some("o1")),
        ("compat", None),
        ("secure", Some("o1")),
    ] {
        let (target, body) = sealed_for(&g, mode, &xml.replace("77", mode), openid);
        let answer = relay.post(&target, body).await;
        assert_eq!(answer.status, 200, "{mode}: {}", answer.text());
    }
    assert_eq!(relay.unrouted().await.len(), 3);
    relay.stop().await;
}

/// Sends `request` as is and returns the status line of the answer.
async fn raw(relay: &TestRelay, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    // hyper may answer and close before all of a too-large head is in.
    let _ = stream.write_all(request).await;
    status_line(&mut stream).await
}

#[tokio::test]
async fn what_hyper_refuses_is_counted() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    let malformed = raw(&relay, b"POST /wx/secure HTTP/1.1\r\nhost relay\r\n\r\n").await;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    let long_uri = format!(
        "GET /wx/secure?{} HTTP/1.1\r\nhost: relay\r\n\r\n",
        "a".repeat(70_000)
    );
    let line = raw(&relay, long_uri.as_bytes()).await;
    assert!(line.starts_with("HTTP/1.1 414"), "{line}");
    let big_headers = format!(
        "GET /wx/secure HTTP/1.1\r\nhost: relay\r\nx-filler: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    let line = raw(&relay, big_headers.as_bytes()).await;
    assert!(line.starts_with("HTTP/1.1 431"), "{line}");

    let m = relay.metrics().await;
    for kind in ["malformed", "uri_too_long", "headers_too_large"] {
        assert_eq!(
            metric(&m, "wxrelay_http_errors_total", &[("kind", kind)]),
            1.0,
            "{kind}:\n{m}"
        );
    }
    relay.stop().await;
}
