//! Verifying what WeChat sends to the server URL, in the order the request
//! path can afford it: the query (signature, freshness, `encrypt_type`, the
//! account's mode) before a byte of the body is read, then the body
//! (`msg_signature`, the AES frame, the AppID, the message XML).
//!
//! The result, [`VerifiedPush`], carries everything that was verified, so what
//! comes after (storing, sealing a reply) never reads the request again.

use crate::wechat::crypto::{DecryptError, KeyRing, KeySlot};
use crate::wechat::message::{Message, XmlError};
use crate::wechat::signature;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Duration;

/// What one account's server URL is checked with.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub token: &'a str,
    pub app_id: &'a str,
    pub keys: Option<&'a KeyRing>,
    /// Pushes whose timestamp is further from now are refused; `None` = off.
    pub timestamp_window: Option<Duration>,
    pub accepts_plaintext: bool,
    pub accepts_encrypted: bool,
}

/// Why WeChat's request did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing {0}")]
    MissingSignature(&'static str),
    #[error("missing echostr")]
    MissingEchostr,
    #[error("repeated query parameter: {0}")]
    RepeatedParam(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("stale timestamp")]
    Stale,
    #[error("unknown encrypt_type")]
    BadEncryptType,
    #[error("plaintext push refused: the account is in secure mode")]
    PlaintextRefused,
    #[error("encrypted push refused: the account is in plaintext mode")]
    EncryptedRefused,
    #[error("missing Encrypt")]
    MissingEncrypt,
    #[error("bad msg_signature")]
    BadMsgSignature,
    #[error("bad XML: {0}")]
    BadXml(#[from] XmlError),
    #[error("AppID mismatch")]
    BadAppId,
    #[error("openid does not match FromUserName")]
    OpenidMismatch,
    #[error("undecryptable: {0}")]
    Decrypt(DecryptError),
}

impl From<DecryptError> for Refused {
    fn from(e: DecryptError) -> Self {
        match e {
            DecryptError::AppId => Refused::BadAppId,
            other => Refused::Decrypt(other),
        }
    }
}

/// The parameters the relay verifies or forwards on. Each may appear once:
/// with two, another parser could take the other one than the relay checked.
/// A target URL that WeChat's query is appended to must carry none of them.
pub const SINGLE_PARAMS: &[&str] = &[
    "signature",
    "timestamp",
    "nonce",
    "msg_signature",
    "encrypt_type",
    "openid",
    "echostr",
];

/// The query's parameters by name; WeChat's order varies. A repeated
/// parameter of [`SINGLE_PARAMS`] is refused; of any other name, unused,
/// the first is kept.
fn params(query: &str) -> Result<HashMap<String, String>, Refused> {
    let mut map = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match map.entry(k.into_owned()) {
            Entry::Vacant(entry) => {
                entry.insert(v.into_owned());
            }
            Entry::Occupied(entry) => {
                if let Some(name) = SINGLE_PARAMS.iter().find(|&&name| name == entry.key()) {
                    return Err(Refused::RepeatedParam(name));
                }
            }
        }
    }
    Ok(map)
}

fn take(q: &mut HashMap<String, String>, name: &'static str) -> Result<String, Refused> {
    q.remove(name).ok_or(Refused::MissingSignature(name))
}

/// The signed part of a query, once `signature` and freshness have passed.
struct Signed {
    timestamp: String,
    nonce: String,
    signature: String,
}

/// Checks `signature` over (token, timestamp, nonce) and the freshness window.
fn check_signature(
    creds: &Credentials<'_>,
    q: &mut HashMap<String, String>,
    now_secs: i64,
) -> Result<Signed, Refused> {
    let signature = take(q, "signature")?;
    let timestamp = take(q, "timestamp")?;
    let nonce = take(q, "nonce")?;
    if !signature::verify(&signature, &[creds.token, &timestamp, &nonce]) {
        return Err(Refused::BadSignature);
    }
    if let Some(window) = creds.timestamp_window {
        let sent: i64 = timestamp.parse().map_err(|_| Refused::Stale)?;
        if (now_secs - sent).unsigned_abs() > window.as_secs() {
            return Err(Refused::Stale);
        }
    }
    Ok(Signed {
        timestamp,
        nonce,
        signature,
    })
}

/// The URL check: the `echostr` to answer, once the signature verifies. For
/// an Official Account it is never encrypted, in any mode.
pub fn check_url(creds: &Credentials<'_>, query: &str, now_secs: i64) -> Result<String, Refused> {
    let mut q = params(query)?;
    check_signature(creds, &mut q, now_secs)?;
    q.remove("echostr").ok_or(Refused::MissingEchostr)
}

/// A push's query that has passed [`check_push_query`].
pub struct PushQuery {
    raw: String,
    signed: Signed,
    /// Present when the push is encrypted.
    msg_signature: Option<String>,
    /// The sender as the query names it, covered by no signature.
    openid: Option<String>,
    encrypted: bool,
}

/// Everything about a push its query decides: the signature, freshness,
/// `encrypt_type` and whether the account takes that kind of push. A
/// signature covers only the query, so this runs before the body is read.
pub fn check_push_query(
    creds: &Credentials<'_>,
    query: &str,
    now_secs: i64,
) -> Result<PushQuery, Refused> {
    let mut q = params(query)?;
    let signed = check_signature(creds, &mut q, now_secs)?;
    let encrypted = match q.get("encrypt_type").map(String::as_str) {
        None | Some("raw") => false,
        Some("aes") => true,
        Some(_) => return Err(Refused::BadEncryptType),
    };
    if encrypted && !creds.accepts_encrypted {
        return Err(Refused::EncryptedRefused);
    }
    if !encrypted && !creds.accepts_plaintext {
        return Err(Refused::PlaintextRefused);
    }
    Ok(PushQuery {
        raw: query.to_string(),
        signed,
        msg_signature: q.remove("msg_signature"),
        openid: q.remove("openid"),
        encrypted,
    })
}

/// A push whose query and body verified: what the relay acts on.
#[derive(Debug)]
pub struct VerifiedPush {
    /// The key that decrypted it; `None` for an unencrypted push.
    pub key_slot: Option<KeySlot>,
    /// The signed `timestamp`, `nonce` and `signature` of the query, as sent.
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
    /// The query as it arrived, kept with the stored event.
    pub query: String,
    /// The message's XML: the decrypted XML of an encrypted push.
    pub xml: String,
    pub message: Message,
}

/// Checks a push's body against its verified query: the XML, and for an
/// encrypted push `msg_signature`, the AES frame and the AppID. A query's
/// `openid` must name the sender the (decrypted) message names: no signature
/// covers it, and whoever reads the query would take it for the sender.
pub fn verify_push(
    creds: &Credentials<'_>,
    query: PushQuery,
    body: &[u8],
) -> Result<VerifiedPush, Refused> {
    let outer = Message::parse_push(body)?;
    let (xml, message, key_slot) = if query.encrypted {
        // Only <Encrypt> is authenticated; in compatibility mode the
        // plaintext copies beside it are ignored.
        let encrypt = outer
            .get("Encrypt")
            .filter(|e| !e.is_empty())
            .ok_or(Refused::MissingEncrypt)?;
        let msg_signature = query
            .msg_signature
            .as_deref()
            .ok_or(Refused::MissingSignature("msg_signature"))?;
        let Signed {
            timestamp, nonce, ..
        } = &query.signed;
        if !signature::verify(msg_signature, &[creds.token, timestamp, nonce, encrypt]) {
            return Err(Refused::BadMsgSignature);
        }
        let keys = creds.keys.ok_or(Refused::EncryptedRefused)?;
        let (xml, slot) = keys.decrypt(encrypt, creds.app_id)?;
        let message = Message::parse_push(xml.as_bytes())?;
        (xml, message, Some(slot))
    } else {
        let xml = std::str::from_utf8(body)
            .map_err(|_| Refused::BadXml(XmlError::Utf8))?
            .to_string();
        (xml, outer, None)
    };
    if query
        .openid
        .as_deref()
        .is_some_and(|openid| message.from_user() != Some(openid))
    {
        return Err(Refused::OpenidMismatch);
    }
    let Signed {
        timestamp,
        nonce,
        signature,
    } = query.signed;
    Ok(VerifiedPush {
        key_slot,
        timestamp,
        nonce,
        signature,
        query: query.raw,
        xml,
        message,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wechat::crypto::AesKey;
    use crate::wechat::push;

    const TOKEN: &str = "token";
    const APP_ID: &str = "wx0123456789abcdef";
    const NOW: i64 = 1_700_000_000;

    fn ring() -> KeyRing {
        KeyRing {
            current: AesKey::from_bytes([7; 32]),
            previous: None,
        }
    }

    fn creds(keys: Option<&KeyRing>, plaintext: bool, encrypted: bool) -> Credentials<'_> {
        Credentials {
            token: TOKEN,
            app_id: APP_ID,
            keys,
            timestamp_window: Some(Duration::from_secs(300)),
            accepts_plaintext: plaintext,
            accepts_encrypted: encrypted,
        }
    }

    fn signed_query(timestamp: i64, extra: &str) -> String {
        let (ts, nonce) = (timestamp.to_string(), "n1");
        let sig = signature::sign(&[TOKEN, &ts, nonce]);
        format!("signature={sig}&timestamp={ts}&nonce={nonce}{extra}")
    }

    const XML: &str = "<xml><ToUserName>to</ToUserName><FromUserName>from</FromUserName><CreateTime>1</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId></xml>";

    #[test]
    fn the_url_check_answers_echostr_only_when_signed_and_fresh() {
        let c = creds(None, true, false);
        let q = signed_query(NOW, "&echostr=abc");
        assert_eq!(check_url(&c, &q, NOW).as_deref(), Ok("abc"));
        assert_eq!(check_url(&c, &q, NOW + 301), Err(Refused::Stale));
        let forged = q.replace("nonce=n1", "nonce=n2");
        assert_eq!(check_url(&c, &forged, NOW), Err(Refused::BadSignature));
        let no_echo = signed_query(NOW, "");
        assert_eq!(check_url(&c, &no_echo, NOW), Err(Refused::MissingEchostr));
        let twice = format!("{q}&echostr=other");
        assert_eq!(
            check_url(&c, &twice, NOW),
            Err(Refused::RepeatedParam("echostr"))
        );
    }

    #[test]
    fn the_query_decides_the_mode_before_the_body() {
        let keys = ring();
        let secure = creds(Some(&keys), false, true);
        let plain = signed_query(NOW, "");
        assert_eq!(
            check_push_query(&secure, &plain, NOW).err(),
            Some(Refused::PlaintextRefused)
        );
        let plaintext = creds(None, true, false);
        let aes = signed_query(NOW, "&encrypt_type=aes&msg_signature=x");
        assert_eq!(
            check_push_query(&plaintext, &aes, NOW).err(),
            Some(Refused::EncryptedRefused)
        );
        let odd = signed_query(NOW, "&encrypt_type=rot13");
        assert_eq!(
            check_push_query(&plaintext, &odd, NOW).err(),
            Some(Refused::BadEncryptType)
        );
    }

    #[test]
    fn a_plaintext_push_carries_its_signed_parameters_and_xml() {
        let c = creds(None, true, false);
        let q = signed_query(NOW, "&openid=from");
        let query = check_push_query(&c, &q, NOW).unwrap();
        let push = verify_push(&c, query, XML.as_bytes()).unwrap();
        assert_eq!(push.timestamp, NOW.to_string());
        assert_eq!(push.nonce, "n1");
        assert_eq!(push.query, q);
        assert_eq!(push.xml, XML);
        assert_eq!(push.key_slot, None);
        assert_eq!(push.message.get("Content"), Some("hi"));
    }

    #[test]
    fn an_openid_other_than_the_sender_is_refused() {
        let c = creds(None, true, false);
        for (openid, expected) in [
            ("&openid=from", Ok(())),
            ("", Ok(())),
            ("&openid=other", Err(Refused::OpenidMismatch)),
            ("&openid=", Err(Refused::OpenidMismatch)),
        ] {
            let query = check_push_query(&c, &signed_query(NOW, openid), NOW).unwrap();
            let verified = verify_push(&c, query, XML.as_bytes());
            assert_eq!(verified.map(|_| ()), expected, "{openid:?}");
        }
    }

    #[test]
    fn an_encrypted_push_is_checked_decrypted_and_says_which_key_opened_it() {
        let keys = ring();
        let c = creds(Some(&keys), false, true);
        let envelope = push::PushParams {
            token: TOKEN,
            app_id: APP_ID,
            timestamp: NOW,
            nonce: "n1",
            openid: None,
            random: &[1; 16],
        };
        let sealed = push::build(
            XML,
            push::Sealing::Secure(keys.key(KeySlot::Current)),
            &envelope,
        );
        let q = sealed.query.clone();
        let body = sealed.body.as_bytes();
        let query = check_push_query(&c, &q, NOW).unwrap();
        let verified = verify_push(&c, query, body).unwrap();
        assert_eq!(verified.xml, XML);
        assert_eq!(verified.key_slot, Some(KeySlot::Current));

        let tampered = q.replace("msg_signature=", "msg_signature=0");
        let query = check_push_query(&c, &tampered, NOW).unwrap();
        assert_eq!(
            verify_push(&c, query, body).err(),
            Some(Refused::BadMsgSignature)
        );
        let query = check_push_query(&c, &q, NOW).unwrap();
        assert_eq!(
            verify_push(&c, query, b"<xml><Encrypt></Encrypt></xml>").err(),
            Some(Refused::MissingEncrypt)
        );
    }
}
