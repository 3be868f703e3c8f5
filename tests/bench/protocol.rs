//! Micro-benchmarks of the per-push protocol work, per message mode: verify
//! the signatures, decrypt, parse, route — everything the handler does before
//! the spool; and the other families' verification as the request path does
//! it ([`Callback`]): WeCom's URL check (answered within WeCom's second, with
//! no spool access), a WeCom push, a Mini Program's JSON push.
//! `cargo bench --bench protocol`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use wxrelay::config::Settings;
use wxrelay::route;
use wxrelay::wechat::crypto::{encrypt, AesKey, KeyRing};
use wxrelay::wechat::family::{Codec, Family};
use wxrelay::wechat::inbound::{Callback, Credentials};
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

/// The families' verification through the relay's own path.
fn families(c: &mut Criterion) {
    let key = AesKey::from_encoding(KEY).unwrap_or_else(|e| panic!("{e}"));
    let ring = KeyRing {
        current: key.clone(),
        previous: None,
    };
    let corp = "ww0123456789abcdef";
    let creds = |receive_id| Credentials {
        token: TOKEN,
        app_id: receive_id,
        keys: Some(&ring),
        timestamp_window: None,
        accepts_plaintext: false,
        accepts_encrypted: true,
    };
    let mut group = c.benchmark_group("families");
    let echostr = encrypt(&key, &[b'e'; 16], "6480519872014652389", corp);
    let msg_signature = signature::sign(&[TOKEN, "1716999970", "1816087198", &echostr]);
    let url_check = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("msg_signature", msg_signature.as_str()),
            ("timestamp", "1716999970"),
            ("nonce", "1816087198"),
            ("echostr", &echostr),
        ])
        .finish();
    let wecom = Callback::new(Family::Wecom, Codec::Xml, None).unwrap_or_else(|e| panic!("{e}"));
    let (wecom_creds, now) = (creds(corp), 1_716_999_970);
    group.bench_function("wecom URL check", |b| {
        b.iter(|| wecom.check_url(&wecom_creds, black_box(&url_check), now))
    });
    let params = |receive_id| PushParams {
        token: TOKEN,
        app_id: receive_id,
        timestamp: now,
        nonce: "1816087198",
        openid: None,
        random: &[b'r'; 16],
    };
    let xml = XML.replace("</xml>", "<AgentID>1000002</AgentID></xml>");
    let sealed = push::build_wecom(&xml, &key, &params(corp));
    group.bench_function("wecom push", |b| {
        b.iter(|| {
            let query = wecom.check_push_query(&wecom_creds, black_box(&sealed.query), now);
            let query = query.unwrap_or_else(|e| panic!("{e}"));
            wecom.verify_push(&wecom_creds, query, black_box(sealed.body.as_bytes()))
        })
    });
    let json = r#"{"ToUserName":"gh_3f1a2b9c8d7e","FromUserName":"oRlyT3stUserOpenId0000000001","CreateTime":1716999970,"MsgType":"event","Event":"subscribe","EventKey":"qrscene_login:7f3c2a9e1b","MsgId":24602152426471537123}"#;
    let mp =
        Callback::new(Family::MiniProgram, Codec::Json, None).unwrap_or_else(|e| panic!("{e}"));
    let sealed = push::build_json(json, Sealing::Secure(&key), &params(APP_ID));
    let mp_creds = creds(APP_ID);
    group.bench_function("mini program JSON push, secure", |b| {
        b.iter(|| {
            let query = mp.check_push_query(&mp_creds, black_box(&sealed.query), now);
            let query = query.unwrap_or_else(|e| panic!("{e}"));
            mp.verify_push(&mp_creds, query, black_box(sealed.body.as_bytes()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench, families);
criterion_main!(benches);
