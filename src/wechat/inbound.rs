//! Verifying what WeChat sends to the server URL, in the order the request
//! path can afford it: the query (signature, freshness, `encrypt_type`, the
//! account's mode) before a byte of the body is read, then the body
//! (`msg_signature`, the AES frame, the receive id, the message in the
//! account's codec).
//!
//! Each family ([`crate::wechat::family`]) is verified by one [`Callback`]
//! value: what differs between them (WeCom's encrypted URL check and its
//! query of `msg_signature` alone, a Mini Program's JSON, an Open Platform's
//! two URLs and the authoriser in the path, whose receive id ends the frame)
//! is decided there, and the result, [`VerifiedPush`], is the same for all.
//! It carries everything that was verified, its [`Origin`] included, so what
//! comes after (storing, sealing a reply) never reads the request again.

use crate::wechat::crypto::{decrypt_frame, DecryptError, KeyRing, KeySlot};
use crate::wechat::family::{is_app_id, Codec, Family, Origin};
use crate::wechat::json::{self, JsonError};
use crate::wechat::message::{Message, XmlError};
use crate::wechat::signature;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// What one account's server URL is checked with.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub token: &'a str,
    /// The receive id every frame must end in: the AppID, the platform's
    /// component AppID, or WeCom's CorpID or SuiteID.
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
    #[error("bad JSON: {0}")]
    BadJson(#[from] JsonError),
    #[error("AppID mismatch")]
    BadAppId { found: ReceiveId },
    /// WeCom's error -40007: the CorpID or SuiteID the frame ends in is not
    /// the account's `corp_id`, its most common support thread.
    #[error("receive id mismatch: not sealed for corp_id (WeCom error -40007)")]
    BadReceiveId { found: ReceiveId },
    #[error("openid does not match FromUserName")]
    OpenidMismatch,
    #[error("undecryptable: {0}")]
    Decrypt(DecryptError),
    /// WeChat fills the message URL's `$APPID$` with an authoriser's AppID.
    #[error("authoriser is not an AppID (wx and 16 hex digits): the message URL is /wx/{{account}}/$APPID$")]
    BadAuthorizer,
    /// A message at the authorisation URL has lost its authoriser.
    #[error("not an authorisation event: messages go to the message URL, /wx/{{account}}/$APPID$")]
    NotAuthorizationEvent,
}

/// The receive id a frame ended in, when it was not the account's: for the
/// log line that says which one was found. It is an AppID, CorpID or
/// SuiteID, never a secret; shown escaped and cut short, as it is whatever
/// the sender sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveId(Option<String>);

impl fmt::Display for ReceiveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("(not text)"),
            Some(id) => {
                let shown: String = id.chars().take(64).collect();
                write!(f, "{}", shown.escape_debug())?;
                if shown.len() < id.len() {
                    f.write_str("…")?;
                }
                Ok(())
            }
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
fn params(query: &str) -> Result<Params<'_>, Refused> {
    let mut params = Params(Vec::with_capacity(8));
    for (k, v) in pairs(query) {
        if params.position(&k).is_none() {
            params.0.push((k, v));
        } else if let Some(name) = SINGLE_PARAMS.iter().find(|&&name| name == k) {
            return Err(Refused::RepeatedParam(name));
        }
    }
    Ok(params)
}

/// The query's `name=value` pairs as `application/x-www-form-urlencoded`
/// reads them. WeChat's own have nothing to decode, so a pair without `%`
/// or `+` is borrowed as it is (the query is already UTF-8); one with either
/// is decoded by the form reader itself.
fn pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            if pair.bytes().any(|b| b == b'%' || b == b'+') {
                let mut decoded = url::form_urlencoded::parse(pair.as_bytes());
                // A pair that is not empty reads as one pair.
                decoded.next().unwrap_or_default()
            } else {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (Cow::Borrowed(name), Cow::Borrowed(value))
            }
        })
}

/// A query's parameters, each name once, as read: a handful, so found by
/// a scan, and borrowed from the query unless percent-decoding changed them.
struct Params<'q>(Vec<(Cow<'q, str>, Cow<'q, str>)>);

impl Params<'_> {
    fn position(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == name)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|i| self.0[i].1.as_ref())
    }

    fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.position(name)?;
        Some(self.0.swap_remove(i).1.into_owned())
    }
}

fn take(q: &mut Params<'_>, name: &'static str) -> Result<String, Refused> {
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
    q: &mut Params<'_>,
    now_secs: i64,
) -> Result<Signed, Refused> {
    let signature = take(q, "signature")?;
    let timestamp = take(q, "timestamp")?;
    let nonce = take(q, "nonce")?;
    if !signature::verify(&signature, &[creds.token, &timestamp, &nonce]) {
        return Err(Refused::BadSignature);
    }
    fresh(creds, &timestamp, now_secs)?;
    Ok(Signed {
        timestamp,
        nonce,
        signature,
    })
}

/// The freshness window, once a signature has vouched for the timestamp.
fn fresh(creds: &Credentials<'_>, timestamp: &str, now_secs: i64) -> Result<(), Refused> {
    if let Some(window) = creds.timestamp_window {
        let sent: i64 = timestamp.parse().map_err(|_| Refused::Stale)?;
        if (now_secs - sent).unsigned_abs() > window.as_secs() {
            return Err(Refused::Stale);
        }
    }
    Ok(())
}

/// The URL check: the `echostr` to answer, once the signature verifies. For
/// an Official Account it is never encrypted, in any mode.
pub fn check_url(creds: &Credentials<'_>, query: &str, now_secs: i64) -> Result<String, Refused> {
    Callback::OFFICIAL_ACCOUNT.check_url(creds, query, now_secs)
}

/// WeCom's URL check: `msg_signature` over (token, timestamp, nonce,
/// echostr), then `echostr` decrypted and its receive id checked; the
/// plaintext is the answer, exactly. Pure work on the query, a few
/// microseconds: well inside the second WeCom allows.
fn wecom_url_check(creds: &Credentials<'_>, query: &str, now_secs: i64) -> Result<String, Refused> {
    let mut q = params(query)?;
    let signed = msg_signed(&mut q)?;
    let echostr = q.remove("echostr").ok_or(Refused::MissingEchostr)?;
    let parts = [creds.token, &signed.timestamp, &signed.nonce, &echostr];
    if !signature::verify(&signed.signature, &parts) {
        return Err(Refused::BadMsgSignature);
    }
    fresh(creds, &signed.timestamp, now_secs)?;
    let keys = creds.keys.ok_or(Refused::EncryptedRefused)?;
    let (plaintext, _) = open(Family::Wecom, keys, &echostr, creds.app_id)?;
    Ok(plaintext)
}

/// WeCom's query: `msg_signature`, `timestamp` and `nonce`, and no
/// `signature`; the `msg_signature` is checked with what it covers, the
/// `echostr` or the body's `Encrypt`.
fn msg_signed(q: &mut Params<'_>) -> Result<Signed, Refused> {
    let signature = take(q, "msg_signature")?;
    let timestamp = take(q, "timestamp")?;
    let nonce = take(q, "nonce")?;
    Ok(Signed {
        timestamp,
        nonce,
        signature,
    })
}

/// Decrypts with the ring and checks the receive id: a mismatch is refused
/// with the receive id that was found, named as the family names it.
fn open(
    family: Family,
    keys: &KeyRing,
    encrypt: &str,
    receive_id: &str,
) -> Result<(String, KeySlot), Refused> {
    match keys.decrypt(encrypt, receive_id) {
        Ok(opened) => Ok(opened),
        Err(DecryptError::AppId) => {
            // The ring reports the current key's error: its frame held another id.
            let found = ReceiveId(decrypt_frame(&keys.current, encrypt).ok().map(|(_, id)| id));
            Err(match family {
                Family::Wecom => Refused::BadReceiveId { found },
                _ => Refused::BadAppId { found },
            })
        }
        Err(other) => Err(Refused::Decrypt(other)),
    }
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
    Callback::OFFICIAL_ACCOUNT.check_push_query(creds, query, now_secs)
}

/// A push's query as an Official Account's (and a Mini Program's and an
/// Open Platform's) is written.
fn signed_push_query(
    creds: &Credentials<'_>,
    query: &str,
    now_secs: i64,
) -> Result<PushQuery, Refused> {
    let mut q = params(query)?;
    let signed = check_signature(creds, &mut q, now_secs)?;
    let encrypted = match q.get("encrypt_type") {
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
    /// The signed `timestamp`, `nonce` and `signature` of the query, as sent
    /// (WeCom's `msg_signature`, its only one).
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
    /// The query as it arrived, kept with the stored event.
    pub query: String,
    /// The message as written: the decrypted text of an encrypted push, XML
    /// or (a Mini Program's JSON) JSON.
    pub xml: String,
    pub message: Message,
    /// The message's fields for the `json` format, as JSON text: text as
    /// strings, lists as arrays ([`Message::fields_text`], or a JSON push's
    /// own object).
    pub fields: String,
    /// The family, the codec and the family's identifiers.
    pub origin: Origin,
}

/// One family's callback as the request path meets it: the account's family
/// and codec, and for an Open Platform's message URL the authoriser the path
/// names. Each step of verification asks it what its family does.
#[derive(Debug, Clone, Copy)]
pub struct Callback<'a> {
    pub family: Family,
    pub codec: Codec,
    /// The authoriser's AppID from `/wx/{account}/{appid}`, an Open
    /// Platform's message URL; `None` at `/wx/{account}`.
    pub authorizer: Option<&'a str>,
}

impl<'a> Callback<'a> {
    /// An Official Account's server URL.
    pub const OFFICIAL_ACCOUNT: Callback<'static> = Callback {
        family: Family::OfficialAccount,
        codec: Codec::Xml,
        authorizer: None,
    };

    /// The callback at a path: `authorizer` is the second segment of an Open
    /// Platform's message URL, which must be an AppID.
    pub fn new(family: Family, codec: Codec, authorizer: Option<&'a str>) -> Result<Self, Refused> {
        if authorizer.is_some_and(|appid| !is_app_id(appid)) {
            return Err(Refused::BadAuthorizer);
        }
        Ok(Callback {
            family,
            codec,
            authorizer,
        })
    }

    /// The URL check: the text to answer, once the query verifies.
    pub fn check_url(
        &self,
        creds: &Credentials<'_>,
        query: &str,
        now_secs: i64,
    ) -> Result<String, Refused> {
        if self.family == Family::Wecom {
            return wecom_url_check(creds, query, now_secs);
        }
        let mut q = params(query)?;
        check_signature(creds, &mut q, now_secs)?;
        q.remove("echostr").ok_or(Refused::MissingEchostr)
    }

    /// What a push's query decides, before its body is read. A WeCom push's
    /// query is `msg_signature`, `timestamp` and `nonce`: it is always
    /// encrypted, and its signature is checked with the body it covers.
    pub fn check_push_query(
        &self,
        creds: &Credentials<'_>,
        query: &str,
        now_secs: i64,
    ) -> Result<PushQuery, Refused> {
        if self.family != Family::Wecom {
            return signed_push_query(creds, query, now_secs);
        }
        let mut q = params(query)?;
        let signed = msg_signed(&mut q)?;
        // Stale or not is known now; whether it is signed, only with the body.
        fresh(creds, &signed.timestamp, now_secs)?;
        Ok(PushQuery {
            raw: query.to_string(),
            msg_signature: Some(signed.signature.clone()),
            signed,
            openid: None,
            encrypted: true,
        })
    }

    /// Reads a body (or the decrypted message) in the callback's codec.
    fn read(&self, body: &[u8]) -> Result<(Message, Option<Value>), Refused> {
        match self.codec {
            Codec::Xml => Ok((Message::parse_push(body)?, None)),
            Codec::Json => {
                let push = json::parse_push(body)?;
                Ok((push.message, Some(push.fields)))
            }
        }
    }

    /// What the family's identifiers are for this message. An Open
    /// Platform's authorisation URL takes authorisation events only: a
    /// message there has lost its authoriser (the message URL is missing
    /// its `$APPID$`).
    pub fn origin(&self, message: &Message) -> Result<Origin, Refused> {
        let mut origin = Origin::of(self.family, self.codec);
        match self.family {
            Family::OpenPlatform => {
                origin.appid = self.authorizer.map(str::to_owned);
                origin.info_type = message.get("InfoType").map(str::to_owned);
                if self.authorizer.is_none() && origin.info_type.is_none() {
                    return Err(Refused::NotAuthorizationEvent);
                }
            }
            Family::Wecom => origin.agent_id = message.get("AgentID").map(str::to_owned),
            Family::OfficialAccount | Family::MiniProgram => {}
        }
        Ok(origin)
    }
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
    Callback::OFFICIAL_ACCOUNT.verify_push(creds, query, body)
}

impl Callback<'_> {
    /// Checks a push's body against its verified query, in the callback's
    /// codec: for an encrypted push `msg_signature`, the AES frame and the
    /// receive id, then the message. A query's `openid` must name the
    /// sender the (decrypted) message names: no signature covers it, and
    /// whoever reads the query would take it for the sender.
    pub fn verify_push(
        &self,
        creds: &Credentials<'_>,
        query: PushQuery,
        body: &[u8],
    ) -> Result<VerifiedPush, Refused> {
        let (outer, outer_fields) = self.read(body)?;
        let (xml, (message, fields), key_slot) = if query.encrypted {
            let (text, slot) = self.unseal(creds, &query, &outer)?;
            let read = self.read(text.as_bytes())?;
            (text, read, Some(slot))
        } else {
            let text = std::str::from_utf8(body).map_err(|_| match self.codec {
                Codec::Xml => Refused::BadXml(XmlError::Utf8),
                Codec::Json => Refused::BadJson(JsonError::Utf8),
            })?;
            (text.to_string(), (outer, outer_fields), None)
        };
        if query
            .openid
            .as_deref()
            .is_some_and(|openid| message.from_user() != Some(openid))
        {
            return Err(Refused::OpenidMismatch);
        }
        let origin = self.origin(&message)?;
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
            fields: fields.map_or_else(|| message.fields_text(), |f| f.to_string()),
            message,
            origin,
        })
    }

    /// An encrypted push's message: only `Encrypt` is authenticated (in
    /// compatibility mode the plaintext copies beside it are ignored), by
    /// `msg_signature`, before anything is decrypted.
    fn unseal(
        &self,
        creds: &Credentials<'_>,
        query: &PushQuery,
        outer: &Message,
    ) -> Result<(String, KeySlot), Refused> {
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
        open(self.family, keys, encrypt, creds.app_id)
    }
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
    fn a_query_reads_as_the_form_reader_reads_it() {
        let queries = [
            "signature=abc&timestamp=1&nonce=n1&openid=o_1&encrypt_type=aes&msg_signature=f0",
            "%74imestamp=1&nonce=a+b&x=%E4%B8%AD&bad=%ff%&y=%zz",
            "&&a&=b&c=d=e&&",
            "a=1&a=2&&=&=x",
            "",
            "é=ü&ö",
        ];
        for query in queries {
            let ours: Vec<_> = pairs(query).collect();
            let form: Vec<_> = url::form_urlencoded::parse(query.as_bytes()).collect();
            assert_eq!(ours, form, "{query}");
        }
        let plain = pairs("nonce=n1").next().unwrap();
        assert!(matches!(
            plain,
            (Cow::Borrowed("nonce"), Cow::Borrowed("n1"))
        ));
    }

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

    mod families {
        use super::*;
        use crate::wechat::push::{build_json, build_wecom, PushParams, Sealing};

        const CORP_ID: &str = "ww0123456789abcdef";

        fn callback(family: Family, codec: Codec, authorizer: Option<&str>) -> Callback<'_> {
            Callback::new(family, codec, authorizer).unwrap()
        }

        fn params(app_id: &str) -> PushParams<'_> {
            PushParams {
                token: TOKEN,
                app_id,
                timestamp: NOW,
                nonce: "n1",
                openid: None,
                random: &[3; 16],
            }
        }

        fn wecom_creds(keys: &KeyRing) -> Credentials<'_> {
            Credentials {
                app_id: CORP_ID,
                ..creds(Some(keys), false, true)
            }
        }

        #[test]
        fn wecom_answers_the_decrypted_echostr_of_tencents_sample() {
            // Tencent's WeCom sample VerifyURL: the values of its C++ and Java samples.
            let keys = KeyRing {
                current: AesKey::from_encoding("jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C")
                    .unwrap(),
                previous: None,
            };
            let c = Credentials {
                token: "QDG6eK",
                app_id: "wx5823bf96d3bd56c7",
                keys: Some(&keys),
                timestamp_window: None,
                accepts_plaintext: false,
                accepts_encrypted: true,
            };
            let echostr = "P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D";
            let q = format!("msg_signature=5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3&timestamp=1409659589&nonce=263014780&echostr={echostr}");
            let wecom = callback(Family::Wecom, Codec::Xml, None);
            assert_eq!(
                wecom.check_url(&c, &q, NOW).as_deref(),
                Ok("1616140317555161061")
            );
            // An Official Account never decrypts it: there is no `signature` to check.
            assert_eq!(
                check_url(&c, &q, NOW),
                Err(Refused::MissingSignature("signature"))
            );
            let tampered = q.replace("P9nA", "P9nB");
            assert_eq!(
                wecom.check_url(&c, &tampered, NOW),
                Err(Refused::BadMsgSignature)
            );
            let other = Credentials {
                app_id: "ww5823bf96d3bd56c7",
                ..c
            };
            assert_eq!(
                wecom.check_url(&other, &q, NOW),
                Err(Refused::BadReceiveId {
                    found: ReceiveId(Some("wx5823bf96d3bd56c7".into()))
                })
            );
        }

        #[test]
        fn a_wecom_push_verifies_only_with_its_corp_id_and_key() {
            let keys = ring();
            let c = wecom_creds(&keys);
            let xml = "<xml><ToUserName>ww0123456789abcdef</ToUserName><FromUserName>zhangsan</FromUserName>\
                <CreateTime>1</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>7</MsgId><AgentID>1000002</AgentID></xml>";
            let wecom = callback(Family::Wecom, Codec::Xml, None);
            let push = build_wecom(xml, &keys.current, &params(CORP_ID));
            assert!(
                push.query.starts_with("msg_signature=") && !push.query.contains("&signature=")
            );
            let query = wecom.check_push_query(&c, &push.query, NOW).unwrap();
            let verified = wecom.verify_push(&c, query, push.body.as_bytes()).unwrap();
            assert_eq!(verified.xml, xml);
            assert_eq!(verified.origin.agent_id.as_deref(), Some("1000002"));
            assert_eq!(verified.origin.family, Family::Wecom);

            // Sealed for an Official Account's AppID (its key shared): refused, saying which.
            let oa = build_wecom(xml, &keys.current, &params(APP_ID));
            let query = wecom.check_push_query(&c, &oa.query, NOW).unwrap();
            let refused = wecom
                .verify_push(&c, query, oa.body.as_bytes())
                .unwrap_err();
            assert_eq!(
                refused,
                Refused::BadReceiveId {
                    found: ReceiveId(Some(APP_ID.into()))
                }
            );
            assert_eq!(format!("{}", ReceiveId(Some(APP_ID.into()))), APP_ID);
            let hostile = ReceiveId(Some(format!("a\n{}", "x".repeat(100))));
            assert_eq!(hostile.to_string(), format!("a\\n{}…", "x".repeat(62)));
            // Sealed with another key: not a frame at all.
            let other = build_wecom(xml, &AesKey::from_bytes([8; 32]), &params(CORP_ID));
            let query = wecom.check_push_query(&c, &other.query, NOW).unwrap();
            assert!(matches!(
                wecom.verify_push(&c, query, other.body.as_bytes()),
                Err(Refused::Decrypt(_) | Refused::BadReceiveId { .. })
            ));
            // Its query has no `signature`: an Official Account's would be refused.
            assert_eq!(
                wecom
                    .check_push_query(&c, &oa.query.replace("msg_signature", "signature"), NOW)
                    .err(),
                Some(Refused::MissingSignature("msg_signature"))
            );
        }

        const JSON: &str = r#"{"ToUserName":"gh_1","FromUserName":"o1","CreateTime":1700000000,"MsgType":"text","Content":"hi","MsgId":24602152426471537123}"#;

        #[test]
        fn mini_program_json_verifies_in_every_mode() {
            let keys = ring();
            let mp = callback(Family::MiniProgram, Codec::Json, None);
            let key = &keys.current;
            for (sealing, accepts) in [
                (Sealing::Plaintext, (true, false)),
                (Sealing::Compat(key), (true, true)),
                (Sealing::Secure(key), (false, true)),
            ] {
                let c = creds(Some(&keys), accepts.0, accepts.1);
                let push = build_json(JSON, sealing, &params(APP_ID));
                let query = mp.check_push_query(&c, &push.query, NOW).unwrap();
                let verified = mp.verify_push(&c, query, push.body.as_bytes()).unwrap();
                assert_eq!(verified.xml, JSON, "{sealing:?}");
                assert_eq!(verified.message.get("MsgId"), Some("24602152426471537123"));
                let fields: Value = serde_json::from_str(&verified.fields).unwrap();
                assert_eq!(fields["CreateTime"], "1700000000");
                assert_eq!(verified.origin.codec, Codec::Json);
            }
        }

        #[test]
        fn mini_program_json_is_checked_before_it_is_decrypted() {
            let keys = ring();
            let c = creds(Some(&keys), false, true);
            let mp = callback(Family::MiniProgram, Codec::Json, None);
            let push = build_json(JSON, Sealing::Secure(&keys.current), &params(APP_ID));
            // A msg_signature over another Encrypt: refused, never decrypted.
            let forged = push.query.replace("msg_signature=", "msg_signature=0");
            let query = mp.check_push_query(&c, &forged, NOW).unwrap();
            assert_eq!(
                mp.verify_push(&c, query, push.body.as_bytes()).err(),
                Some(Refused::BadMsgSignature)
            );
            let twice = push.body.replacen('{', r#"{"Encrypt":"x","#, 1);
            let query = mp.check_push_query(&c, &push.query, NOW).unwrap();
            assert!(matches!(
                mp.verify_push(&c, query, twice.as_bytes()),
                Err(Refused::BadJson(JsonError::Repeated(_)))
            ));
            let xml = push::build(XML, Sealing::Secure(&keys.current), &params(APP_ID));
            let query = mp.check_push_query(&c, &xml.query, NOW).unwrap();
            assert!(matches!(
                mp.verify_push(&c, query, xml.body.as_bytes()),
                Err(Refused::BadJson(_))
            ));
        }

        #[test]
        fn an_open_platform_has_two_urls() {
            let keys = ring();
            let c = creds(Some(&keys), false, true);
            let ticket = "<xml><AppId>wx0123456789abcdef</AppId><CreateTime>1</CreateTime>\
                <InfoType>component_verify_ticket</InfoType><ComponentVerifyTicket>t@@@1</ComponentVerifyTicket></xml>";
            let sealed = push::build(ticket, Sealing::Secure(&keys.current), &params(APP_ID));
            assert!(sealed.body.contains("<AppId>"), "{}", sealed.body);
            let authorisation = callback(Family::OpenPlatform, Codec::Xml, None);
            let query = authorisation
                .check_push_query(&c, &sealed.query, NOW)
                .unwrap();
            let verified = authorisation
                .verify_push(&c, query, sealed.body.as_bytes())
                .unwrap();
            assert_eq!(
                verified.origin.info_type.as_deref(),
                Some("component_verify_ticket")
            );
            assert_eq!(verified.origin.appid, None);

            let message = push::build(XML, Sealing::Secure(&keys.current), &params(APP_ID));
            let query = authorisation
                .check_push_query(&c, &message.query, NOW)
                .unwrap();
            assert_eq!(
                authorisation
                    .verify_push(&c, query, message.body.as_bytes())
                    .err(),
                Some(Refused::NotAuthorizationEvent)
            );
            let authoriser = callback(Family::OpenPlatform, Codec::Xml, Some("wx00000000000000aa"));
            let query = authoriser
                .check_push_query(&c, &message.query, NOW)
                .unwrap();
            let verified = authoriser
                .verify_push(&c, query, message.body.as_bytes())
                .unwrap();
            assert_eq!(verified.origin.appid.as_deref(), Some("wx00000000000000aa"));
            assert_eq!(
                Callback::new(Family::OpenPlatform, Codec::Xml, Some("$APPID$")).err(),
                Some(Refused::BadAuthorizer)
            );
        }
    }
}
