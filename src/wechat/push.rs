//! Builds a push exactly as WeChat sends it: the query with `signature` (and,
//! encrypted, `encrypt_type=aes` and `msg_signature`) and the body of the
//! chosen mode. For `wxrelay simulate`, the load harness and tests.
//!
//! ```text
//! plaintext  ?signature=…&timestamp=…&nonce=…[&openid=…]
//!            <xml>…the message…</xml>
//! compat     ?signature=…&timestamp=…&nonce=…[&openid=…]&encrypt_type=aes&msg_signature=…
//!            <xml>…the message's fields…<Encrypt>…</Encrypt></xml>
//! secure     the same query as compat
//!            <xml><ToUserName>…</ToUserName><Encrypt>…</Encrypt></xml>
//! ```
//!
//! `signature` is over `[token, timestamp, nonce]` and `msg_signature` adds
//! the `Encrypt` value ([`crate::wechat::signature`]); `Encrypt` is the
//! message sealed with the account's key and AppID ([`crate::wechat::crypto`]).
//! The plaintext fields of a compat body are copied from the message, as
//! WeChat does, but nothing vouches for them; the relay reads only `Encrypt`.
//!
//! The other families frame the same frame otherwise ([`crate::wechat::family`]):
//!
//! ```text
//! JSON (a Mini Program)  the same query; {"ToUserName":…,"Encrypt":…} in secure
//!                        mode, the message's own keys and "Encrypt" in compat
//! WeCom                  ?msg_signature=…&timestamp=…&nonce=…
//!                        <xml><ToUserName>…</ToUserName><AgentID>…</AgentID><Encrypt>…</Encrypt></xml>
//! ```
//!
//! An Open Platform's authorisation event, which has no `ToUserName`, is
//! sealed under its `AppId` instead: `<xml><AppId>…</AppId><Encrypt>…</Encrypt></xml>`.

use super::crypto::{encrypt, AesKey};
use super::json;
use super::message::Message;
use super::signature::sign;

/// How the message is sealed, as the account's message mode in the WeChat console.
#[derive(Debug, Clone, Copy)]
pub enum Sealing<'k> {
    Plaintext,
    /// The plaintext fields plus an `<Encrypt>` element.
    Compat(&'k AesKey),
    /// Only `ToUserName` and `<Encrypt>`.
    Secure(&'k AesKey),
}

/// A push ready to POST: `/wx/{account}?{query}` with `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub query: String,
    pub body: String,
}

/// What identifies the account and the request.
#[derive(Debug, Clone, Copy)]
pub struct PushParams<'a> {
    pub token: &'a str,
    pub app_id: &'a str,
    pub timestamp: i64,
    pub nonce: &'a str,
    /// The sender, repeated in the query as newer pushes do.
    pub openid: Option<&'a str>,
    pub random: &'a [u8; 16],
}

/// `len` random decimal digits, the first not zero, as WeChat's nonces are.
pub fn digits(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|i| char::from(b'0' + rng.gen_range(u8::from(i == 0)..10)))
        .collect()
}

/// Seals `xml` (a whole `<xml>…</xml>` message) as WeChat would.
pub fn build(xml: &str, sealing: Sealing<'_>, e: &PushParams<'_>) -> Push {
    let (mut query, sealed) = signed(sealing, xml, e);
    let Some((compat, encrypted)) = sealed else {
        return Push {
            query,
            body: xml.to_string(),
        };
    };
    query += &format!("&encrypt_type=aes&msg_signature={}", encrypted.signature);
    let element = format!("<Encrypt><![CDATA[{}]]></Encrypt>", encrypted.text);
    let body = match xml.trim_end().strip_suffix("</xml>") {
        Some(open) if compat => format!("{open}\n{element}\n</xml>"),
        _ => {
            let (name, value) = addressee(&Message::parse(xml.as_bytes()).ok());
            format!("<xml>\n<{name}><![CDATA[{value}]]></{name}>\n{element}\n</xml>")
        }
    };
    Push { query, body }
}

/// Seals `json` (a whole JSON object, a Mini Program's message) as WeChat
/// would: the query as for XML, the body JSON.
pub fn build_json(json: &str, sealing: Sealing<'_>, e: &PushParams<'_>) -> Push {
    let (mut query, sealed) = signed(sealing, json, e);
    let Some((compat, encrypted)) = sealed else {
        return Push {
            query,
            body: json.to_string(),
        };
    };
    query += &format!("&encrypt_type=aes&msg_signature={}", encrypted.signature);
    let member = format!("\"Encrypt\":{}", quoted(&encrypted.text));
    let open = json.trim_end().strip_suffix('}');
    let body = match open {
        Some(open) if compat => {
            let empty = open.trim_end().ends_with('{');
            format!("{open}{}{member}}}", if empty { "" } else { "," })
        }
        _ => {
            let to_user = json::parse_push(json.as_bytes())
                .ok()
                .and_then(|p| p.message.get("ToUserName").map(str::to_owned))
                .unwrap_or_default();
            format!("{{\"ToUserName\":{},{member}}}", quoted(&to_user))
        }
    };
    Push { query, body }
}

/// Seals `xml` as WeCom does: always encrypted with `key` for the receive
/// id `e.app_id` (the CorpID or SuiteID), under a query of `msg_signature`,
/// `timestamp` and `nonce` alone; the body names the corporation and the
/// app as the message does.
pub fn build_wecom(xml: &str, key: &AesKey, e: &PushParams<'_>) -> Push {
    let timestamp = e.timestamp.to_string();
    let encrypted = encrypt(key, e.random, xml, e.app_id);
    let msg_signature = sign(&[e.token, &timestamp, e.nonce, &encrypted]);
    let message = Message::parse(xml.as_bytes()).ok();
    let field = |name| {
        message
            .as_ref()
            .and_then(|m| m.get(name).map(str::to_owned))
            .unwrap_or_default()
    };
    Push {
        query: format!(
            "msg_signature={msg_signature}&timestamp={timestamp}&nonce={}",
            e.nonce
        ),
        body: format!(
            "<xml><ToUserName><![CDATA[{}]]></ToUserName><AgentID><![CDATA[{}]]></AgentID>\
             <Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>",
            field("ToUserName"),
            field("AgentID")
        ),
    }
}

/// An `Encrypt` value and its `msg_signature`.
struct Encrypted {
    text: String,
    signature: String,
}

/// The signed query (`signature`, `timestamp`, `nonce`, any `openid`) and,
/// when the mode seals, whether it is compat and the sealed message.
fn signed(
    sealing: Sealing<'_>,
    message: &str,
    e: &PushParams<'_>,
) -> (String, Option<(bool, Encrypted)>) {
    let timestamp = e.timestamp.to_string();
    let mut query = format!(
        "signature={}&timestamp={timestamp}&nonce={}",
        sign(&[e.token, &timestamp, e.nonce]),
        e.nonce
    );
    if let Some(openid) = e.openid {
        query += &format!("&openid={openid}");
    }
    let (key, compat) = match sealing {
        Sealing::Plaintext => return (query, None),
        Sealing::Compat(key) => (key, true),
        Sealing::Secure(key) => (key, false),
    };
    let text = encrypt(key, e.random, message, e.app_id);
    let signature = sign(&[e.token, &timestamp, e.nonce, &text]);
    (query, Some((compat, Encrypted { text, signature })))
}

/// The element a secure body keeps beside `Encrypt`: `ToUserName`, or an
/// authorisation event's `AppId`.
fn addressee(message: &Option<Message>) -> (&'static str, String) {
    let get = |name| {
        message
            .as_ref()
            .and_then(|m| m.get(name))
            .map(str::to_owned)
    };
    match (get("ToUserName"), get("AppId")) {
        (None, Some(app_id)) => ("AppId", app_id),
        (to_user, _) => ("ToUserName", to_user.unwrap_or_default()),
    }
}

/// A JSON string.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::crypto::decrypt;
    use crate::wechat::message::Message;
    use crate::wechat::signature::verify;

    const XML: &str = "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o1]]></FromUserName><CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content><MsgId>1</MsgId></xml>";

    fn envelope<'a>(random: &'a [u8; 16]) -> PushParams<'a> {
        PushParams {
            token: "tok123",
            app_id: "wx0123456789abcdef",
            timestamp: 1_717_000_000,
            nonce: "42",
            openid: Some("o1"),
            random,
        }
    }

    fn param<'q>(query: &'q str, name: &str) -> &'q str {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap()
    }

    #[test]
    fn secure_pushes_carry_only_the_envelope_and_verify() {
        let key = AesKey::from_bytes([7; 32]);
        let push = build(XML, Sealing::Secure(&key), &envelope(&[b'a'; 16]));
        let outer = Message::parse(push.body.as_bytes()).unwrap();
        assert_eq!(outer.get("ToUserName"), Some("gh_1"));
        assert_eq!(outer.get("Content"), None);
        let encrypted = outer.get("Encrypt").unwrap();
        let q = &push.query;
        assert!(verify(
            param(q, "signature"),
            &["tok123", "1717000000", "42"]
        ));
        assert!(verify(
            param(q, "msg_signature"),
            &["tok123", "1717000000", "42", encrypted]
        ));
        assert_eq!(decrypt(&key, encrypted, "wx0123456789abcdef").unwrap(), XML);
    }

    #[test]
    fn compat_pushes_keep_the_plaintext_beside_the_ciphertext() {
        let key = AesKey::from_bytes([7; 32]);
        let push = build(XML, Sealing::Compat(&key), &envelope(&[b'a'; 16]));
        let outer = Message::parse(push.body.as_bytes()).unwrap();
        assert_eq!(outer.get("Content"), Some("hi"));
        assert!(outer.get("Encrypt").is_some());
        assert_eq!(param(&push.query, "encrypt_type"), "aes");
    }

    #[test]
    fn plaintext_pushes_are_the_message_itself() {
        let push = build(XML, Sealing::Plaintext, &envelope(&[b'a'; 16]));
        assert_eq!(push.body, XML);
        assert!(!push.query.contains("encrypt_type"));
    }
}
