//! The logs of a real run hold no secret and no personal data: no Token, no
//! EncodingAESKey, no ciphertext, no message content, no OpenID; and they
//! hold one line per push and per delivery attempt.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{body, free_port, generated, path, try_send};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_log_holds_no_secret_and_no_content() {
    let g = generated();
    let c = &g["config"];
    let hooks = FakeTarget::start().await;
    hooks.script([Behaviour::body(400, "text/plain", "refused")]);
    let dir = tempfile::tempdir().unwrap();
    let accounts: String = ["plaintext", "compat", "secure"]
        .iter()
        .map(|mode| {
            format!(
                "[accounts.{mode}]\napp_id = {}\ntoken = {}\nencoding_aes_key = {}\nmode = \"{mode}\"\ntimestamp_window = \"0s\"\n\n",
                c["appid"], c["token"], c["encoding_aes_key"]
            )
        })
        .collect();
    let log = dir.path().join("relay.log");
    let config = dir.path().join("relay.toml");
    let mut tries = 0;
    let (mut child, public) = loop {
        let (public, admin) = (free_port(), free_port());
        let toml = format!(
            "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\n\n[spool]\npath = \"{}\"\n\n{accounts}\
             [targets.hooks]\nurl = \"{}\"\nformat = \"json\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\n[[routes]]\nto = [\"hooks\"]\n",
            dir.path().join("spool.db").display(),
            hooks.url("/hooks")
        );
        std::fs::write(&config, toml).unwrap();
        let args = [
            "--log-format".as_ref(),
            "json".as_ref(),
            "serve".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ];
        if let Some(child) =
            common::start_binary(&args, &[("WXRELAY_LOG", "debug")], &log, admin).await
        {
            break (child, public);
        }
        tries += 1;
        assert!(
            tries < 3,
            "the relay could not start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::fs::write(&log, "").unwrap();
    };

    let mut sent = 0;
    for v in g["positive"].as_array().unwrap() {
        let answer = try_send(
            public,
            http::Method::POST,
            &path(v["mode"].as_str().unwrap(), &v["request"]),
            body(&v["request"]).into(),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
        sent += 1;
    }
    for v in g["negative"].as_array().unwrap() {
        let account = if v["mode"] == "plaintext" {
            "plaintext"
        } else {
            "secure"
        };
        // The oversized body is refused before it is all sent: a write error here.
        let _ = try_send(
            public,
            http::Method::POST,
            &path(account, &v["request"]),
            body(&v["request"]).into(),
        )
        .await;
    }
    // What hyper refuses itself: logged once per interval, without content.
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(public).await.unwrap();
        let request = b"POST /wx/secure?hyperMarker42 HTTP/1.1\r\nhost relay\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut stream, request)
            .await
            .unwrap();
        assert!(common::status_line(&mut stream)
            .await
            .starts_with("HTTP/1.1 400"));
    }
    assert!(hooks.wait_for(sent, Duration::from_secs(30)).await);
    assert!(child.terminate().success(), "a graceful stop");

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("JSON log line: {l}")))
        .collect();
    let count = |msg: &str| lines.iter().filter(|l| l["message"] == msg).count();
    // The freshness window is off here, so the stale and future vectors are
    // accepted; each push still has exactly one line, answered or refused.
    let negatives = g["negative"].as_array().unwrap().len();
    assert!(count("push answered") >= sent);
    assert!(count("request refused") >= negatives - 3);
    assert_eq!(
        count("push answered") + count("request refused"),
        sent + negatives,
        "one line per push"
    );
    assert!(
        count("delivery attempt") >= sent,
        "one line per delivery attempt"
    );
    assert_eq!(
        count("request refused by the HTTP layer"),
        1,
        "rate-limited"
    );
    assert!(!text.contains("hyperMarker42"), "no request content");

    // Durations print rounded to the microsecond, not as 0.24564299999999997.
    let latencies: Vec<String> = lines
        .iter()
        .filter_map(|l| l.get("latency_ms"))
        .map(|v| v.to_string())
        .collect();
    assert!(
        latencies.len() >= count("push answered") + count("delivery attempt"),
        "every push and attempt has its latency"
    );
    let unrounded: Vec<&String> = latencies
        .iter()
        .filter(|v| {
            v.split_once('.')
                .is_some_and(|(_, decimals)| decimals.len() > 3)
        })
        .collect();
    assert!(unrounded.is_empty(), "latencies not rounded: {unrounded:?}");

    let mut forbidden: Vec<(String, String)> = vec![
        ("token".into(), c["token"].as_str().unwrap().into()),
        ("key".into(), c["encoding_aes_key"].as_str().unwrap().into()),
        (
            "previous key".into(),
            c["previous_encoding_aes_key"].as_str().unwrap().into(),
        ),
        (
            "webhook secret".into(),
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        ),
    ];
    for v in g["positive"].as_array().unwrap() {
        let fields = &v["expected"]["fields"];
        forbidden.push((
            "OpenID".into(),
            fields["FromUserName"].as_str().unwrap().into(),
        ));
        for name in ["Content", "Label", "Url", "Title", "Ticket", "PicUrl"] {
            if let Some(value) = fields[name].as_str().filter(|s| s.len() >= 6) {
                forbidden.push((format!("{name} content"), value.into()));
            }
        }
        if let Some(encrypt) = v["encrypt"].as_str() {
            forbidden.push(("ciphertext".into(), encrypt[..32].into()));
        }
    }
    for (what, value) in &forbidden {
        assert!(!text.contains(value.as_str()), "the log contains a {what}");
    }
}
