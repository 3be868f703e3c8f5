//! Micro-benchmarks of the per-push protocol work, per message mode: verify
//! the signatures, decrypt, parse, route — everything the handler does before
//! the spool. `cargo bench --bench protocol`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use wxrelay::config::Settings;
use wxrelay::route;
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::message::Message;
use wxrelay::wechat::push::{self, PushParams, Sealing};
use wxrelay::wechat::signature;

const TOKEN: &str = "Relay2024Token";
const KEY: &str = "R3layV3ct0rsEncodingAesKeyForTests0123456Zq";
const APP_ID: &str = "wx5f3c9a1e7d2b4c60";
const XML: &str = "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\n<FromUserName><![CDATA[oRlyT3stUserOpenId0000000001]]></FromUserName>\n<CreateTime>1716999970</CreateTime>\n<MsgType><![CDATA[event]]></MsgType>\n<Event><![CDATA[subscribe]]></Event>\n<EventKey><![CDATA[qrscene_login:7f3c2a9e1b]]></EventKey>\n<Ticket><![CDATA[gQH47joAAAAAAAAAAS5odHRwOi8vd2VpeGluLnFxLmNvbS9xLzAyX0RUcE1GTHJlVGkxMDAwMHcwM2UAAgQ0a1lmAwQsAQAA]]></Ticket>\n</xml>";

fn param<'q>(query: &'q str, name: &str) -> &'q str {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("")
}

fn routes() -> Vec<route::Rule> {
    let toml = format!(
        "[accounts.main]\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\nencoding_aes_key = \"{KEY}\"\nmode = \"secure\"\n\
         [targets.broker]\nurl = \"http://127.0.0.1:1/b\"\n[targets.hooks]\nurl = \"http://127.0.0.1:1/h\"\n\
         [[routes]]\nmatch = {{ event = [\"subscribe\", \"SCAN\"] }}\nto = [\"broker\", \"hooks\"]\nreply_from = \"broker\"\n\
         [[routes]]\nto = [\"hooks\"]\n"
    );
    Settings::from_toml_str(&toml)
        .unwrap_or_else(|e| panic!("{e}"))
        .routes
}

/// Verify → decrypt (when sealed) → parse → route: the handler's work for one push.
fn process(query: &str, body: &[u8], key: Option<&AesKey>, rules: &[route::Rule]) -> usize {
    let (ts, nonce) = (param(query, "timestamp"), param(query, "nonce"));
    assert!(signature::verify(
        param(query, "signature"),
        &[TOKEN, ts, nonce]
    ));
    let outer = Message::parse(body).unwrap_or_else(|e| panic!("{e}"));
    let message = match key {
        None => outer,
        Some(key) => {
            let encrypt = outer.get("Encrypt").unwrap_or_default();
            assert!(signature::verify(
                param(query, "msg_signature"),
                &[TOKEN, ts, nonce, encrypt]
            ));
            let xml = wxrelay::wechat::crypto::decrypt(key, encrypt, APP_ID)
                .unwrap_or_else(|e| panic!("{e}"));
            Message::parse(xml.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let rule = route::route(rules, &route::route_input("main", &message)).map(|(i, _)| i);
    black_box(message.dedup_key()).len() + rule.unwrap_or(99)
}

fn bench(c: &mut Criterion) {
    let key = AesKey::from_encoding(KEY).unwrap_or_else(|e| panic!("{e}"));
    let rules = routes();
    let envelope = PushParams {
        token: TOKEN,
        app_id: APP_ID,
        timestamp: 1_716_999_970,
        nonce: "1816087198",
        openid: None,
        random: &[b'r'; 16],
    };
    let mut group = c.benchmark_group("verify+decrypt+parse+route");
    for (mode, sealing, k) in [
        ("plaintext", Sealing::Plaintext, None),
        ("compat", Sealing::Compat(&key), Some(&key)),
        ("secure", Sealing::Secure(&key), Some(&key)),
    ] {
        let p = push::build(XML, sealing, &envelope);
        group.bench_function(mode, |b| {
            b.iter(|| process(black_box(&p.query), black_box(p.body.as_bytes()), k, &rules))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
