//! Every WeChat test vector, sent over real HTTP to the real relay with a real
//! SQLite spool. Accepted pushes are configured to match no route, so each one
//! lands in the spool as an `unrouted` dead letter whose stored XML, fields,
//! query and body the tests read back.

use crate::common;

use common::{body, fixture, generated, generated_config, path, reference_now, TestRelay};
use serde_json::Value;
use std::collections::BTreeMap;
use wxrelay::wechat::signature;

fn is_ack(text: &str) -> bool {
    text == "success" || text.is_empty()
}

#[tokio::test]
async fn every_positive_vector_is_accepted_with_its_exact_plaintext_and_fields() {
    let g = generated();
    let relay = TestRelay::start(&generated_config(&g), reference_now(&g)).await;
    let mut passed: BTreeMap<String, usize> = BTreeMap::new();
    for v in g["positive"].as_array().unwrap() {
        let id = v["id"].as_str().unwrap();
        let mode = v["mode"].as_str().unwrap();
        let answer = relay
            .post(&path(mode, &v["request"]), body(&v["request"]))
            .await;
        assert_eq!(answer.status, 200, "{id}: {}", answer.text());
        assert!(is_ack(&answer.text()), "{id}: answered {:?}", answer.text());

        let stored = relay.unrouted().await;
        assert_eq!(
            stored.len(),
            passed.values().sum::<usize>() + 1,
            "{id}: one event stored"
        );
        let event = stored.last().unwrap();
        let expected = &v["expected"];
        assert_eq!(
            event.xml,
            expected["plaintext_xml"].as_str().unwrap(),
            "{id}: plaintext"
        );
        let fields: Value = serde_json::from_str(&event.fields).unwrap();
        assert_eq!(fields, common::expected_fields(expected), "{id}: fields");
        assert_eq!(
            event.query,
            v["request"]["query_string"].as_str().unwrap(),
            "{id}: raw query"
        );
        assert_eq!(event.body, body(&v["request"]), "{id}: raw body");
        assert_eq!(event.account, mode);
        assert_eq!(
            event.msg_type,
            expected["classification"]["MsgType"].as_str().unwrap(),
            "{id}"
        );
        *passed.entry(mode.to_string()).or_default() += 1;
    }
    assert_eq!(
        passed.values().sum::<usize>(),
        g["counts"]["positive"].as_u64().unwrap() as usize
    );
    println!("positive vectors accepted per mode: {passed:?}");
    relay.stop().await;
}

/// Where a negative vector is sent: its mode's account, except the downgrade
/// vector, which is only an attack on an account configured for secure mode.
fn negative_accounts(v: &Value) -> Vec<&'static str> {
    let accepted = v["config"]["accepted_modes"].as_array();
    match (
        v["id"].as_str().unwrap(),
        v["mode"].as_str().unwrap(),
        accepted,
    ) {
        ("neg.downgrade_to_plaintext", _, _) => vec!["secure", "rotating"],
        ("neg.unknown_aes_key", _, _) => vec!["secure", "rotating"],
        (_, "plaintext", _) => vec!["plaintext", "compat"],
        (_, "secure", _) => vec!["secure", "compat", "rotating"],
        (id, mode, _) => panic!("{id}: no account for mode {mode}"),
    }
}

#[tokio::test]
async fn every_negative_vector_is_refused_with_a_4xx_and_stores_nothing() {
    let g = generated();
    let relay = TestRelay::start(&generated_config(&g), reference_now(&g)).await;
    let mut refused = 0;
    for v in g["negative"].as_array().unwrap() {
        let id = v["id"].as_str().unwrap();
        for account in negative_accounts(v) {
            let answer = relay
                .post(&path(account, &v["request"]), body(&v["request"]))
                .await;
            assert!(
                answer.status.is_client_error(),
                "{id} on {account}: got {} {}",
                answer.status,
                answer.text()
            );
            if let Some(status) = v["expected"]["response"]["status"].as_u64() {
                assert_eq!(answer.status.as_u16() as u64, status, "{id}");
            }
            assert!(!answer.text().trim().is_empty(), "{id}: a reason is given");
            assert!(
                answer.text().len() < 120,
                "{id}: the reason is one short line"
            );
        }
        refused += 1;
    }
    assert_eq!(refused, g["counts"]["negative"].as_u64().unwrap());
    assert!(
        relay.unrouted().await.is_empty(),
        "refused pushes write nothing"
    );
    assert!(relay.nothing_pending().await);
    println!("negative vectors refused: {refused}");
    relay.stop().await;
}

#[tokio::test]
async fn special_vectors_behave_as_expected() {
    let g = generated();
    let special: BTreeMap<&str, &Value> = g["special"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v))
        .collect();
    assert_eq!(
        special.len(),
        g["counts"]["special"].as_u64().unwrap() as usize
    );
    let relay = TestRelay::start(&generated_config(&g), reference_now(&g)).await;

    // Compatibility mode: route on the decrypted content, never the plaintext copies.
    let v = special["special.compat_plaintext_mismatch"];
    let answer = relay
        .post(&path("compat", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(answer.status, 200);
    let stored = relay.unrouted().await;
    assert_eq!(
        stored.last().unwrap().xml,
        v["expected"]["plaintext_xml"].as_str().unwrap()
    );
    assert!(!stored.last().unwrap().fields.contains("FORGED"));

    // Key rotation: refused without the previous key, accepted with it.
    let v = special["special.key_rotation_previous_key"];
    let refused = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert!(refused.status.is_client_error(), "{}", refused.status);
    let accepted = relay
        .post(&path("rotating", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    assert_eq!(
        relay.unrouted().await.last().unwrap().xml,
        v["expected"]["plaintext_xml"].as_str().unwrap()
    );

    // Padding of 32 and of 1 byte, and a pretty-printed body with a declaration.
    for id in [
        "special.pkcs7_pad_32",
        "special.pkcs7_pad_1",
        "special.pretty_body_with_declaration",
    ] {
        let v = special[id];
        let answer = relay
            .post(&path("secure", &v["request"]), body(&v["request"]))
            .await;
        assert_eq!(answer.status, 200, "{id}: {}", answer.text());
        assert!(is_ack(&answer.text()));
        assert_eq!(
            relay.unrouted().await.last().unwrap().xml,
            v["expected"]["plaintext_xml"].as_str().unwrap(),
            "{id}"
        );
    }

    // A retried push (new timestamp and nonce, same content) is one event.
    let before = relay.unrouted().await.len();
    let v = special["special.retry_duplicate"];
    for r in v["requests"].as_array().unwrap() {
        let answer = relay.post(&path("secure", r), body(r)).await;
        assert_eq!(answer.status, 200);
        assert!(is_ack(&answer.text()));
    }
    let forward_count = v["expected"]["forward_count"].as_u64().unwrap() as usize;
    assert_eq!(relay.unrouted().await.len(), before + forward_count);

    // Two different events from one user in the same second are two events.
    let before = relay.unrouted().await.len();
    let v = special["special.same_second_different_events"];
    for r in v["requests"].as_array().unwrap() {
        assert_eq!(relay.post(&path("secure", r), body(r)).await.status, 200);
    }
    let forward_count = v["expected"]["forward_count"].as_u64().unwrap() as usize;
    assert_eq!(relay.unrouted().await.len(), before + forward_count);
    println!("special vectors handled: {}", special.len());
    relay.stop().await;
}

#[tokio::test]
async fn identical_pushes_sent_concurrently_store_one_event() {
    let g = generated();
    let relay = TestRelay::start(&generated_config(&g), reference_now(&g)).await;
    let v = &g["positive"].as_array().unwrap()[40];
    let mode = v["mode"].as_str().unwrap();
    let sends: Vec<_> = (0..8)
        .map(|_| tokio::spawn(relay.post_later(path(mode, &v["request"]), body(&v["request"]))))
        .collect();
    for send in sends {
        let answer = send.await.unwrap();
        assert_eq!(answer.status, 200);
        assert!(is_ack(&answer.text()));
    }
    assert_eq!(relay.unrouted().await.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn url_verification_vectors_echo_exactly_or_refuse() {
    let g = generated();
    let relay = TestRelay::start(&generated_config(&g), reference_now(&g)).await;
    let vectors = g["url_verification"].as_array().unwrap();
    for v in vectors {
        let id = v["id"].as_str().unwrap();
        for account in ["plaintext", "compat", "secure"] {
            let answer = relay.get(&path(account, &v["request"])).await;
            let expected = &v["expected"];
            if expected["verdict"] == "accept" {
                assert_eq!(answer.status, 200, "{id}");
                assert_eq!(
                    answer.text(),
                    expected["response"]["body_exact"].as_str().unwrap(),
                    "{id}"
                );
                let ct = answer.headers["content-type"].to_str().unwrap();
                assert!(ct.starts_with("text/plain"), "{id}: {ct}");
            } else {
                assert!(answer.status.is_client_error(), "{id}: {}", answer.status);
                if let Some(echostr) = v["request"]["query"]["echostr"].as_str() {
                    assert!(!answer.text().contains(echostr), "{id}: must not echo");
                }
            }
        }
    }
    assert_eq!(
        vectors.len(),
        g["counts"]["url_verification"].as_u64().unwrap() as usize
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_freshness_window_follows_the_injected_clock() {
    let g = generated();
    let now = reference_now(&g);
    let relay = TestRelay::start(&generated_config(&g), now).await;
    let v = g["positive"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == "secure.scan_str")
        .unwrap();
    let sent: i64 = v["request"]["query"]["timestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for (clock, fresh) in [(sent + 301, false), (sent - 301, false), (sent + 300, true)] {
        relay.clock.set_secs(clock);
        let answer = relay
            .post(&path("secure", &v["request"]), body(&v["request"]))
            .await;
        if fresh {
            assert_eq!(answer.status, 200, "clock {clock}: {}", answer.text());
        } else {
            assert_eq!(answer.status, 403, "clock {clock}");
            assert!(answer.text().contains("stale"));
        }
    }
    relay.stop().await;

    // A window of 0 turns the check off.
    let off =
        generated_config(&g).replace("timestamp_window = \"300s\"", "timestamp_window = \"0s\"");
    let relay = TestRelay::start(&off, now + 86_400 * 365).await;
    let answer = relay
        .post(&path("secure", &v["request"]), body(&v["request"]))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    relay.stop().await;
}

// ---- the public vectors (official samples and SDK test suites) ----

fn public() -> Vec<Value> {
    fixture("public-vectors.json")["vectors"]
        .as_array()
        .unwrap()
        .clone()
}

/// Accounts for the public vectors that can travel over HTTP: decryption and
/// URL verification. Their timestamps are years old, so freshness is off.
fn public_config(vectors: &[&Value]) -> String {
    let mut toml = String::new();
    for (i, v) in vectors.iter().enumerate() {
        let input = &v["input"];
        let token = input["token"].as_str().unwrap_or("AccessGuide1");
        let mode = if input.get("body").is_some() {
            "compat"
        } else {
            "secure"
        };
        let app_id = input
            .get("appid")
            .or(input.get("corpid"))
            .and_then(Value::as_str)
            .unwrap_or("wx0000000000000000");
        let key = input["encoding_aes_key"]
            .as_str()
            .unwrap_or("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG");
        toml += &format!(
            "[accounts.pub{i}]\napp_id = \"{app_id}\"\ntoken = \"{token}\"\nencoding_aes_key = \"{key}\"\nmode = \"{mode}\"\ntimestamp_window = \"0s\"\n\n"
        );
    }
    toml
}

fn query(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[tokio::test]
async fn public_vectors_over_http() {
    let all = public();
    let over_http: Vec<&Value> = all
        .iter()
        .filter(|v| {
            matches!(
                v["kind"].as_str(),
                Some("decrypt" | "url_verify_plain" | "url_verify_encrypted")
            )
        })
        .collect();
    let relay = TestRelay::start(&public_config(&over_http), 1_717_000_000).await;
    let mut ran: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, v) in over_http.iter().enumerate() {
        let id = v["id"].as_str().unwrap();
        let input = &v["input"];
        let expected = &v["expected"];
        let token = input["token"].as_str().unwrap_or("AccessGuide1");
        let ts = input["timestamp"].as_str().unwrap_or("1717000000");
        let nonce = input["nonce"].as_str().unwrap_or("1");
        let kind = v["kind"].as_str().unwrap();
        match kind {
            "decrypt" => {
                let encrypt = input["encrypt"].as_str().unwrap();
                let signature = input["signature"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| signature::sign(&[token, ts, nonce]));
                let msg_signature = input["msg_signature"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| signature::sign(&[token, ts, nonce, encrypt]));
                let q = query(&[
                    ("signature", &signature),
                    ("timestamp", ts),
                    ("nonce", nonce),
                    ("encrypt_type", "aes"),
                    ("msg_signature", &msg_signature),
                ]);
                let body = input["body"].as_str().map(str::to_string).unwrap_or_else(|| {
                    format!("<xml><ToUserName><![CDATA[gh_0]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
                });
                let before = relay.unrouted().await.len();
                let answer = relay.post(&format!("/wx/pub{i}?{q}"), body).await;
                if expected["signature_valid"] == false {
                    assert_eq!(answer.status, 401, "{id}");
                    assert_eq!(relay.unrouted().await.len(), before, "{id}");
                } else {
                    assert_eq!(answer.status, 200, "{id}: {}", answer.text());
                    let stored = relay.unrouted().await;
                    assert_eq!(stored.len(), before + 1, "{id}");
                    assert_eq!(
                        stored.last().unwrap().xml,
                        expected["plaintext"].as_str().unwrap(),
                        "{id}"
                    );
                    if let Some(fields) = expected.get("fields").and_then(Value::as_object) {
                        let got: Value =
                            serde_json::from_str(&stored.last().unwrap().fields).unwrap();
                        for (name, value) in fields {
                            assert_eq!(&got[name], value, "{id}: {name}");
                        }
                    }
                }
            }
            "url_verify_plain" => {
                let echostr = input["echostr"].as_str().unwrap_or("4375120948345356249");
                let q = query(&[
                    ("signature", input["signature"].as_str().unwrap()),
                    ("echostr", echostr),
                    ("timestamp", ts),
                    ("nonce", nonce),
                ]);
                let answer = relay.get(&format!("/wx/pub{i}?{q}")).await;
                if expected["valid"] == true {
                    assert_eq!(answer.status, 200, "{id}");
                    let body = expected["response_body"].as_str().unwrap_or(echostr);
                    assert_eq!(answer.text(), body, "{id}");
                } else {
                    assert_eq!(answer.status, 401, "{id}");
                    assert!(!answer.text().contains(echostr), "{id}");
                }
            }
            "url_verify_encrypted" => {
                // WeCom's handshake (msg_signature over an encrypted echostr) is not
                // an Official Account's: the relay must neither decrypt nor echo it.
                let encrypt = input["encrypt"].as_str().unwrap();
                let q = query(&[
                    ("msg_signature", input["msg_signature"].as_str().unwrap()),
                    ("timestamp", ts),
                    ("nonce", nonce),
                    ("echostr", encrypt),
                ]);
                let answer = relay.get(&format!("/wx/pub{i}?{q}")).await;
                assert_eq!(answer.status, 401, "{id}");
                if let Some(plain) = expected["plaintext"].as_str() {
                    assert!(!answer.text().contains(plain), "{id}: never decrypted");
                }
                assert!(!answer.text().contains(encrypt), "{id}: never echoed");
            }
            other => unreachable!("{other}"),
        }
        *ran.entry(kind).or_default() += 1;
    }
    println!("public vectors over HTTP per kind: {ran:?}");
    assert_eq!(ran.values().sum::<usize>(), over_http.len());
    relay.stop().await;
}
