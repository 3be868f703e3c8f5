//! How a stored event becomes a request to a target, per the target's `format`
//! ([`Format`]; the README's "Routing and targets" describes each), with the
//! target's [`adapter`]s applied to the formats whose body the relay writes.
//! The same stored event and [`Stamp`] always give the same request, except
//! that a `wechat` delivery draws a fresh nonce and frame prefix per attempt,
//! as WeChat does per push.

use super::adapter;
use crate::config::{Format, Mode, Target, WechatServer};
use crate::spool::Event;
use crate::wechat::family::{Codec, Family, Origin};
use crate::wechat::message::{Message, Node};
use crate::wechat::push::{self, Push, PushParams, Sealing};
use crate::wechat::reply::random_bytes;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderName;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub uri: String,
    /// The format's own type, or the one a target's adapters name.
    pub content_type: Cow<'static, str>,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Bytes,
}

/// The `json` format's headers, named once rather than parsed per request.
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the stored fields are not a JSON object")]
    Fields,
    #[error("the stored request body is not XML WeChat's demo relay could read")]
    DemoBody,
    #[error("the target's secret is missing or invalid")]
    Secret,
    #[error("the target's WeChat credentials are missing")]
    Credentials,
    #[error("no AppID to seal with: the target sets none and the event's account is gone")]
    AppId,
}

/// What an attempt adds to the stored event.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// Dates `json` signatures and `wechat` pushes.
    pub now_secs: i64,
    /// The receive id of the event's account (its AppID, a WeCom app's
    /// CorpID): what a `wechat` target seals for unless it names its own,
    /// and a `$APPID$` in a target URL for an event without an authoriser.
    pub receive_id: Option<&'a str>,
}

/// Builds the request for `target`.
pub fn build(target: &Target, event: &Event, stamp: Stamp<'_>) -> Result<Outbound, FormatError> {
    let url = target_url(&target.url, event, stamp);
    let codec = event.origin.codec;
    let content_type = || match &target.adapters.content_type {
        Some(named) => Cow::Owned(named.clone()),
        None => Cow::Borrowed(codec.content_type()),
    };
    match target.format {
        Format::Raw => Ok(Outbound {
            uri: with_query(&url, &event.query),
            content_type: Cow::Borrowed(codec.content_type()),
            headers: Vec::new(),
            body: event.body.clone(),
        }),
        Format::Plain => Ok(Outbound {
            uri: with_query(&url, &plaintext_query(&event.query)),
            content_type: content_type(),
            headers: Vec::new(),
            body: Bytes::from(adapter::apply(&target.adapters, &event.xml).into_owned()),
        }),
        Format::Wechat => {
            let push = resealed(target, event, stamp)?;
            Ok(Outbound {
                uri: with_query(&url, &push.query),
                content_type: content_type(),
                headers: Vec::new(),
                body: Bytes::from(push.body),
            })
        }
        Format::Json => {
            let signer = target.signer.as_ref().ok_or(FormatError::Secret)?;
            let id = webhook_id(&event.dedup_key);
            let body = json_envelope(event, &id)?;
            let timestamp = stamp.now_secs.to_string();
            let signature = signed(signer.mac(), &id, &timestamp, &body);
            Ok(Outbound {
                uri: url.to_string(),
                content_type: Cow::Borrowed("application/json"),
                headers: vec![
                    (WEBHOOK_ID, id),
                    (WEBHOOK_TIMESTAMP, timestamp),
                    (WEBHOOK_SIGNATURE, signature),
                ],
                body: Bytes::from(body),
            })
        }
        Format::AuthingDemoJson => Ok(Outbound {
            uri: url.to_string(),
            content_type: Cow::Borrowed("application/json"),
            headers: Vec::new(),
            body: Bytes::from(authing_demo_body(&event.body)?.to_string()),
        }),
    }
}

/// A `wechat` delivery: the event sealed afresh for the target's own
/// credentials, as its family frames a push, for the receive id the target
/// names (or its account's).
fn resealed(target: &Target, event: &Event, stamp: Stamp<'_>) -> Result<Push, FormatError> {
    let server = target.wechat.as_ref().ok_or(FormatError::Credentials)?;
    let receive_id = server
        .receive_id(event.origin.family)
        .or(stamp.receive_id)
        .ok_or(FormatError::AppId)?;
    let text = adapter::apply(&target.adapters, &event.xml);
    let fresh = Fresh {
        timestamp: stamp.now_secs,
        nonce: &push::digits(9),
        random: &random_bytes(),
    };
    let framing = Framing::of(&event.origin);
    as_family_would(server, framing, receive_id, &event.query, &text, &fresh)
}

/// What a target URL holds where an Open Platform's authoriser goes, as in
/// the message URL entered in its console.
const PLACEHOLDER: &str = "$APPID$";

/// Whether building a request for `target` may need the receive id of the
/// event's account ([`Stamp::receive_id`]).
pub fn needs_receive_id(target: &Target) -> bool {
    target.format == Format::Wechat || target.url.as_str().contains(PLACEHOLDER)
}

/// The target's URL, with an Open Platform's authoriser in place of any
/// `$APPID$`, as WeChat fills the message URL: the authoriser's AppID, or
/// for an event that has none its account's own.
fn target_url<'u>(url: &'u url::Url, event: &Event, stamp: Stamp<'_>) -> Cow<'u, url::Url> {
    if !url.as_str().contains(PLACEHOLDER) {
        return Cow::Borrowed(url);
    }
    let appid = event.origin.appid.as_deref().or(stamp.receive_id);
    let filled =
        appid.and_then(|appid| url::Url::parse(&url.as_str().replace(PLACEHOLDER, appid)).ok());
    filled.map_or(Cow::Borrowed(url), Cow::Owned)
}

/// The target URL with WeChat's query appended to any query it already has.
fn with_query(url: &url::Url, query: &str) -> String {
    let mut uri = url.to_string();
    if query.is_empty() {
        return uri;
    }
    uri.push(if url.query().is_some() { '&' } else { '?' });
    uri.push_str(query);
    uri
}

/// The query WeChat sends in plaintext mode: the original, byte for byte,
/// without `encrypt_type` and `msg_signature`. `signature` still verifies: it
/// covers only the token, timestamp and nonce.
pub fn plaintext_query(query: &str) -> String {
    without(query, &["encrypt_type", "msg_signature"])
}

/// `query` without the parameters called `names`, the rest byte for byte.
/// A name is compared as the receiver reads it, percent-decoded: the relay
/// reads WeChat's query that way, so `%74imestamp` is a `timestamp` that must
/// not reach the target beside the fresh one.
fn without(query: &str, names: &[&str]) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(name, _)| name);
            !pair.is_empty() && !name.is_some_and(|name| names.contains(&name.as_ref()))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// What a push is dated and salted with.
struct Fresh<'a> {
    timestamp: i64,
    nonce: &'a str,
    random: &'a [u8; 16],
}

/// How a family frames a push: an Official Account's (and an Open
/// Platform's, and a Mini Program's) XML, a Mini Program's JSON, WeCom's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Xml,
    Json,
    Wecom,
}

impl Framing {
    fn of(origin: &Origin) -> Self {
        match (origin.family, origin.codec) {
            (Family::Wecom, _) => Framing::Wecom,
            (_, Codec::Json) => Framing::Json,
            (_, Codec::Xml) => Framing::Xml,
        }
    }
}

/// The push WeChat would send a server holding `server`'s credentials,
/// framed as the push's family frames it: the query signed with its Token
/// (the original's other parameters, `openid` among them, kept byte for
/// byte) and, in compat and secure mode, the message sealed with its key
/// for `receive_id` under a fresh `msg_signature`. WeCom seals every push,
/// whatever the server's mode, and signs it with `msg_signature` alone.
fn as_family_would(
    server: &WechatServer,
    framing: Framing,
    receive_id: &str,
    original_query: &str,
    text: &str,
    fresh: &Fresh<'_>,
) -> Result<Push, FormatError> {
    let key = || {
        server
            .keys
            .as_ref()
            .map(|k| &k.current)
            .ok_or(FormatError::Credentials)
    };
    let sealing = match server.mode {
        Mode::Plaintext => Sealing::Plaintext,
        Mode::Compat => Sealing::Compat(key()?),
        Mode::Secure => Sealing::Secure(key()?),
    };
    let params = PushParams {
        token: server.token.expose(),
        app_id: receive_id,
        timestamp: fresh.timestamp,
        nonce: fresh.nonce,
        openid: None,
        random: fresh.random,
    };
    let mut push = match framing {
        Framing::Xml => push::build(text, sealing, &params),
        Framing::Json => push::build_json(text, sealing, &params),
        Framing::Wecom => push::build_wecom(text, key()?, &params),
    };
    let kept = without(original_query, RESIGNED);
    if !kept.is_empty() {
        // After the signed three, before encrypt_type, as WeChat orders them.
        let at = push
            .query
            .find("&encrypt_type=")
            .unwrap_or(push.query.len());
        push.query.insert_str(at, &format!("&{kept}"));
    }
    Ok(push)
}

/// The parameters a `wechat` delivery signs afresh.
const RESIGNED: &[&str] = &[
    "signature",
    "timestamp",
    "nonce",
    "encrypt_type",
    "msg_signature",
];

/// The Standard Webhooks message id: `msg_` and a hash of the dedup key. The
/// key itself holds the sender's OpenID and any EventKey, which may be
/// non-ASCII: Python and Node servers read header bytes as Latin-1, so a raw
/// UTF-8 id makes every official verifier reject the signature. The hash is
/// ASCII and the same for every attempt, so receivers can dedup on it.
pub fn webhook_id(dedup_key: &str) -> String {
    format!(
        "msg_{}",
        hex::encode(&Sha256::digest(dedup_key.as_bytes())[..16])
    )
}

/// The `json` format's envelope, keys in the documented order: the decrypted
/// event's values as strings (`MsgId` exceeds 2^53 and must not become a JSON
/// number) or `null` when absent, and `fields` as stored, in document order.
/// An Official Account's envelope is as it always was; another family's
/// names the family and its identifiers after `account`, and a JSON push
/// carries its text as `json` where an XML push has `xml`.
///
/// Written field by field from the stored event, borrowing its text: the
/// stored fields are serde_json's own compact output, so they go into the
/// envelope as they are, and the values picked from them keep their JSON
/// text, as reading and writing them again would give.
fn json_envelope(event: &Event, id: &str) -> Result<String, FormatError> {
    let fields: &RawValue = serde_json::from_str(&event.fields).map_err(|_| FormatError::Fields)?;
    if !fields.get().starts_with('{') {
        return Err(FormatError::Fields);
    }
    let picked: Picked<'_> = serde_json::from_str(fields.get()).map_err(|_| FormatError::Fields)?;
    let origin = &event.origin;
    let other_family = origin.family != Family::OfficialAccount;
    let identifier = |id: &Option<String>| other_family.then(|| id.clone());
    let message = Some(event.xml.as_str());
    let received_at =
        humantime::format_rfc3339_millis(event.received_at.to_system_time()).to_string();
    let envelope = Envelope {
        id,
        account: &event.account,
        family: other_family.then_some(origin.family.as_str()),
        appid: identifier(&origin.appid),
        agent_id: identifier(&origin.agent_id),
        info_type: identifier(&origin.info_type),
        received_at: &received_at,
        msg_type: &event.msg_type,
        event: event.event_type.as_deref(),
        event_key: text(picked.event_key),
        from_user: text(picked.from_user),
        to_user: text(picked.to_user),
        create_time: text(picked.create_time),
        fields,
        xml: message.filter(|_| origin.codec == Codec::Xml),
        json: message.filter(|_| origin.codec == Codec::Json),
    };
    serde_json::to_string(&envelope).map_err(|_| FormatError::Fields)
}

/// A value of the stored fields if it is a string, as its JSON text.
fn text(value: Option<&RawValue>) -> Option<&RawValue> {
    value.filter(|v| v.get().starts_with('"'))
}

/// The stored fields the envelope repeats at its top level.
#[derive(serde::Deserialize)]
struct Picked<'a> {
    #[serde(rename = "EventKey", borrow, default)]
    event_key: Option<&'a RawValue>,
    #[serde(rename = "FromUserName", borrow, default)]
    from_user: Option<&'a RawValue>,
    #[serde(rename = "ToUserName", borrow, default)]
    to_user: Option<&'a RawValue>,
    #[serde(rename = "CreateTime", borrow, default)]
    create_time: Option<&'a RawValue>,
}

/// The `json` format's body, in the order the README documents. The family
/// and its identifiers are left out for an Official Account (`None`), and
/// are `null` where another family's event has none (`Some(None)`).
#[derive(serde::Serialize)]
struct Envelope<'a> {
    id: &'a str,
    account: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    appid: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info_type: Option<Option<String>>,
    received_at: &'a str,
    msg_type: &'a str,
    event: Option<&'a str>,
    event_key: Option<&'a RawValue>,
    from_user: Option<&'a RawValue>,
    to_user: Option<&'a RawValue>,
    create_time: Option<&'a RawValue>,
    fields: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    xml: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    json: Option<&'a str>,
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), as the
/// Standard Webhooks specification defines it, with `mac` keyed with the
/// target's secret.
fn signed(mut mac: Hmac<Sha256>, id: &str, timestamp: &str, body: &str) -> String {
    for part in [id, ".", timestamp, ".", body] {
        mac.update(part.as_bytes());
    }
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// What Authing's demo relay posts: WeChat's body read by
/// express-xml-bodyparser's defaults (xml2js with lower-cased tag names, every
/// value in an array, text trimmed and runs of white space collapsed).
fn authing_demo_body(body: &[u8]) -> Result<Value, FormatError> {
    let message = Message::parse(body).map_err(|_| FormatError::DemoBody)?;
    let root = message.root.to_lowercase();
    Ok(json!({ root: xml2js_children(&message.fields) }))
}

fn xml2js_children(children: &[(String, Node)]) -> Value {
    let mut object = Map::new();
    for (name, node) in children {
        let value = match node {
            Node::Text(text) => Value::String(xml2js_text(text)),
            Node::Children(grand) => xml2js_children(grand),
        };
        match object
            .entry(name.to_lowercase())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(values) => values.push(value),
            other => *other = Value::Array(vec![value]),
        }
    }
    Value::Object(object)
}

/// xml2js's `trim` then `normalize`: trim, then every run of two or more
/// white-space characters becomes one space (a single newline stays).
fn xml2js_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.trim().chars() {
        if c.is_whitespace() {
            run.push(c);
            continue;
        }
        match run.chars().count() {
            0 => {}
            1 => out.push_str(&run),
            _ => out.push(' '),
        }
        run.clear();
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fields: &str, origin: Origin) -> Event {
        Event {
            dedup_key: "main|o1|1".into(),
            account: "main".into(),
            received_at: crate::spool::UnixMs(1_700_000_000_123),
            query: String::new(),
            body: Bytes::new(),
            xml: "<xml>\"é\"</xml>".into(),
            fields: fields.into(),
            msg_type: "event".into(),
            event_type: Some("subscribe".into()),
            origin,
            trace_context: None,
        }
    }

    /// The envelope's text, byte for byte: keys in the documented order,
    /// the fields as stored, a value that is not a string as `null`.
    #[test]
    fn the_json_envelope_is_written_in_the_documented_order() {
        let fields = r#"{"ToUserName":"gh_1","FromUserName":"o\"1","CreateTime":"17","Event":"subscribe","EventKey":{"x":"1"}}"#;
        let official = json_envelope(&stored(fields, Origin::default()), "msg_1").unwrap();
        assert_eq!(
            official,
            format!(
                r#"{{"id":"msg_1","account":"main","received_at":"2023-11-14T22:13:20.123Z","msg_type":"event","event":"subscribe","event_key":null,"from_user":"o\"1","to_user":"gh_1","create_time":"17","fields":{fields},"xml":"<xml>\"é\"</xml>"}}"#
            )
        );
        let origin = Origin {
            appid: Some("wx1".into()),
            ..Origin::of(Family::MiniProgram, Codec::Json)
        };
        let mini = json_envelope(&stored("{}", origin), "msg_1").unwrap();
        assert_eq!(
            mini,
            r#"{"id":"msg_1","account":"main","family":"mini_program","appid":"wx1","agent_id":null,"info_type":null,"received_at":"2023-11-14T22:13:20.123Z","msg_type":"event","event":"subscribe","event_key":null,"from_user":null,"to_user":null,"create_time":null,"fields":{},"json":"<xml>\"é\"</xml>"}"#
        );
        for broken in ["[]", "\"text\"", "{", ""] {
            let refused = json_envelope(&stored(broken, Origin::default()), "msg_1");
            assert_eq!(refused, Err(FormatError::Fields), "{broken}");
        }
    }

    #[test]
    fn plaintext_query_drops_only_the_encryption_parameters() {
        assert_eq!(
            plaintext_query(
                "signature=a&timestamp=1&nonce=2&openid=o&encrypt_type=aes&msg_signature=m"
            ),
            "signature=a&timestamp=1&nonce=2&openid=o"
        );
        assert_eq!(
            plaintext_query("msg_signature=m&signature=a%2B"),
            "signature=a%2B"
        );
        assert_eq!(plaintext_query(""), "");
        // Named as the receiver's parser reads them: percent-decoded.
        assert_eq!(
            plaintext_query("signature=a&%65ncrypt_type=aes&msg%5Fsignature=m"),
            "signature=a"
        );
    }

    #[test]
    fn the_query_is_appended_to_the_targets_own() {
        let url = url::Url::parse("https://broker.example/events?tenant=7")
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            with_query(&url, "a=1"),
            "https://broker.example/events?tenant=7&a=1"
        );
        let bare = url::Url::parse("http://127.0.0.1:1/x").unwrap_or_else(|_| unreachable!());
        assert_eq!(with_query(&bare, "a=1"), "http://127.0.0.1:1/x?a=1");
    }

    mod wechat {
        use super::super::*;
        use crate::config::Secret;
        use crate::wechat::crypto::{decrypt, AesKey, KeyRing};
        use crate::wechat::signature::verify;

        const XML: &str = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName>\
            <FromUserName><![CDATA[o1]]></FromUserName><CreateTime>1</CreateTime>\
            <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content><MsgId>7</MsgId></xml>";
        const ORIGINAL: &str = "signature=a&timestamp=1&nonce=2&openid=o1&lang=zh_CN\
            &encrypt_type=aes&msg_signature=m";

        fn server(mode: Mode) -> WechatServer {
            WechatServer {
                token: Secret::new("brokerToken"),
                keys: Some(KeyRing {
                    current: AesKey::from_bytes([9; 32]),
                    previous: None,
                }),
                app_id: None,
                corp_id: None,
                mode,
            }
        }

        fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(&format!("{name}=")))
        }

        /// An Official Account's push, as a `wechat` target gets it.
        fn as_wechat_would(
            server: &WechatServer,
            app_id: &str,
            original_query: &str,
            xml: &str,
            fresh: &Fresh<'_>,
        ) -> Result<Push, FormatError> {
            as_family_would(server, Framing::Xml, app_id, original_query, xml, fresh)
        }

        fn fresh() -> Fresh<'static> {
            Fresh {
                timestamp: 1_717_000_123,
                nonce: "424242",
                random: &[b'r'; 16],
            }
        }

        #[test]
        fn secure_pushes_are_signed_and_sealed_with_the_targets_credentials() {
            let s = server(Mode::Secure);
            let push = as_wechat_would(&s, "wx0000000000000001", ORIGINAL, XML, &fresh()).unwrap();
            let q = &push.query;
            assert_eq!(param(q, "timestamp"), Some("1717000123"));
            assert_eq!(param(q, "nonce"), Some("424242"));
            assert_eq!(param(q, "openid"), Some("o1"));
            assert_eq!(param(q, "lang"), Some("zh_CN"));
            assert_eq!(param(q, "encrypt_type"), Some("aes"));
            assert!(!q.contains("signature=a&") && !q.contains("msg_signature=m"));
            let parts = ["brokerToken", "1717000123", "424242"];
            assert!(verify(param(q, "signature").unwrap(), &parts));
            let outer = Message::parse(push.body.as_bytes()).unwrap();
            let encrypted = outer.get("Encrypt").unwrap();
            let with_body = ["brokerToken", "1717000123", "424242", encrypted];
            assert!(verify(param(q, "msg_signature").unwrap(), &with_body));
            let key = AesKey::from_bytes([9; 32]);
            assert_eq!(decrypt(&key, encrypted, "wx0000000000000001").unwrap(), XML);
            assert_eq!(outer.get("Content"), None);
        }

        #[test]
        fn plaintext_pushes_carry_no_encryption_parameters() {
            let s = server(Mode::Plaintext);
            let push = as_wechat_would(&s, "wx0000000000000001", ORIGINAL, XML, &fresh()).unwrap();
            assert_eq!(push.body, XML);
            assert_eq!(param(&push.query, "encrypt_type"), None);
            assert_eq!(param(&push.query, "msg_signature"), None);
            assert_eq!(param(&push.query, "openid"), Some("o1"));
        }

        #[test]
        fn compat_pushes_keep_the_plaintext_beside_the_ciphertext() {
            let s = server(Mode::Compat);
            let push = as_wechat_would(&s, "wx0000000000000001", "", XML, &fresh()).unwrap();
            let outer = Message::parse(push.body.as_bytes()).unwrap();
            assert_eq!(outer.get("Content"), Some("hi"));
            assert!(outer.get("Encrypt").is_some());
            assert!(push.query.ends_with(&format!(
                "&encrypt_type=aes&msg_signature={}",
                param(&push.query, "msg_signature").unwrap()
            )));
        }
    }

    #[test]
    fn xml2js_text_trims_and_collapses_white_space() {
        assert_eq!(xml2js_text("  a  b\n c "), "a b c");
        assert_eq!(xml2js_text("a\nb"), "a\nb");
        assert_eq!(xml2js_text(""), "");
    }
}
