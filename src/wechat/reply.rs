//! Answers to WeChat.
//!
//! WeChat accepts exactly three bodies: `success`, an empty body, or a passive
//! reply XML, which in secure mode must be wrapped in the encrypted
//! [`envelope`]. Anything else makes WeChat show the user "该公众号暂时无法提供服务".
//! [`answer`] turns a reply target's answer into WeChat's, and says what it
//! became ([`Outcome`]): [`classify_reply`] is the gate that keeps a reply
//! target's JSON, HTML or error page from ever reaching WeChat, and
//! [`open_envelope`] the one that keeps out an envelope the target sealed
//! with keys WeChat does not use.
//!
//! # The deadline
//!
//! The answer is due within 5 seconds of WeChat sending the push. A late
//! answer counts as none: WeChat retries the push, and after the last try
//! shows the user the same error message as for a malformed answer. `success`
//! and an empty body both mean "received, nothing to say"; the relay answers
//! `success` unless a reply target gave a valid passive reply in time.
//!
//! # Passive replies
//!
//! A passive reply is one message back to the user, as XML with root `<xml>`:
//! `ToUserName` (the user's OpenID), `FromUserName` (the account), `CreateTime`,
//! `MsgType` and the fields of that type. Composing it is the reply target's
//! business; this module only judges whether WeChat can take it.
//!
//! `success` and an empty body are never encrypted, in any mode. A reply XML
//! to a secure-mode push must be sealed: encrypted into a frame with the
//! account's AppID ([`crate::wechat::crypto`]) and wrapped as
//!
//! ```text
//! <xml>
//! <Encrypt>base64 of the frame</Encrypt>
//! <MsgSignature>sign([token, TimeStamp, Nonce, Encrypt])</MsgSignature>
//! <TimeStamp>unix seconds</TimeStamp>
//! <Nonce>any string</Nonce>
//! </xml>
//! ```
//!
//! WeChat checks `MsgSignature` with the Token and decrypts with the key it
//! holds; while a new key is being rolled out, that is the key that sealed
//! the push, so the reply is sealed with whichever key of the ring decrypted
//! it. A target's own envelope goes out only if it opens with the account's
//! Token, keys and AppID, as WeChat would open it, and is re-sealed when the
//! target used the other key of a rotation. To an encrypted compat-mode push,
//! plaintext reply XML goes out as it is, since WeChat takes either form
//! there; to an unencrypted push, an envelope goes out as its plaintext
//! content.

use crate::wechat::crypto::{encrypt, AesKey, DecryptError, KeyRing, KeySlot};
use crate::wechat::message::{Message, XmlError};
use crate::wechat::signature::{sign, verify};
use rand::distributions::Alphanumeric;
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Encrypts `reply_xml` and wraps it in WeChat's envelope, signed with
/// `MsgSignature = sign([token, timestamp, nonce, Encrypt])`.
///
/// Use the key that decrypted the request (see the module docs). WeChat takes
/// the request's own `timestamp` and `nonce` or fresh ones; the nonce must be
/// fresh when someone other than the account's server chose `reply_xml`: the
/// frame has the shape of a push's, and the envelope's `Encrypt` and
/// `MsgSignature` under the request's signed `timestamp` and `nonce` are a
/// push.
pub fn envelope(
    key: &AesKey,
    token: &str,
    app_id: &str,
    reply_xml: &str,
    timestamp: &str,
    nonce: &str,
    random: &[u8; 16],
) -> String {
    let encrypted = encrypt(key, random, reply_xml, app_id);
    let signature = sign(&[token, timestamp, nonce, &encrypted]);
    format!(
        "<xml>\n<Encrypt><![CDATA[{encrypted}]]></Encrypt>\n\
         <MsgSignature><![CDATA[{signature}]]></MsgSignature>\n\
         <TimeStamp>{timestamp}</TimeStamp>\n\
         <Nonce><![CDATA[{nonce}]]></Nonce>\n</xml>"
    )
}

/// What a reply target answered, once judged fit for WeChat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// `success` or an empty body: pass on `success` as is, never encrypted.
    Ack,
    /// A passive reply in plaintext; the caller encrypts it for a secure account.
    PlainXml(String),
    /// A reply already wrapped in an envelope (it has a non-empty `Encrypt`).
    Envelope(String),
}

/// The most reply XML passed to WeChat, in bytes: WeChat limits a text
/// reply's `Content` to 2,048 bytes, and the fields around it (the OpenID,
/// the account's id, the time, the type, CDATA) take a few hundred more;
/// twice that leaves room for a news, music or video reply's titles and
/// URLs. A bigger reply is one WeChat would refuse or cut: `success` is
/// answered instead. The limit is on the reply XML, sealed or not.
pub const MAX_REPLY: usize = 4 * 1024;

/// Why a reply target's body is not a reply for WeChat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    /// JSON, HTML, plain text, malformed XML, a DOCTYPE, a root other than
    /// `xml`: not something WeChat takes at all.
    #[error("not reply XML")]
    NotXml,
    /// Reply XML that parsers could read two ways, like a push with a
    /// top-level field twice.
    #[error("ambiguous: {0}")]
    Ambiguous(XmlError),
    #[error("{0} bytes, over the {MAX_REPLY} a reply may have")]
    TooLarge(usize),
}

/// Judges a reply target's body: whether it is fit for WeChat, and which
/// kind of answer it is. Reply XML is held to what a push is
/// ([`Message::unambiguous`]) and to [`MAX_REPLY`] (an envelope's once it is
/// opened). The XML variants carry the body unchanged.
pub fn classify_reply(body: &[u8]) -> Result<ReplyBody, Unfit> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"success" {
        return Ok(ReplyBody::Ack);
    }
    let message = Message::parse(body).map_err(|_| Unfit::NotXml)?;
    if message.root != "xml" {
        return Err(Unfit::NotXml);
    }
    message.unambiguous().map_err(Unfit::Ambiguous)?;
    // `parse` succeeded, so the body is UTF-8.
    let text = String::from_utf8(body.to_vec()).map_err(|_| Unfit::NotXml)?;
    match message.get("Encrypt") {
        Some(encrypted) if !encrypted.is_empty() => Ok(ReplyBody::Envelope(text)),
        _ if text.len() > MAX_REPLY => Err(Unfit::TooLarge(text.len())),
        _ => Ok(ReplyBody::PlainXml(text)),
    }
}

/// Why a reply target's own envelope would not open for WeChat. The messages
/// never quote the ciphertext or the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the account has no EncodingAESKey to check it with")]
    NoKey,
    #[error("not an envelope: no Encrypt, MsgSignature, TimeStamp or Nonce")]
    Incomplete,
    #[error("bad MsgSignature")]
    Signature,
    #[error("ambiguous: {0}")]
    Ambiguous(XmlError),
    #[error("not sealed with the account's keys and AppID: {0}")]
    Decrypt(DecryptError),
    #[error("the sealed content is not reply XML")]
    Content,
    #[error("the sealed reply is {0}")]
    Sealed(Unfit),
}

/// Opens a reply target's envelope as WeChat will: `MsgSignature` over
/// (token, TimeStamp, Nonce, Encrypt), then decryption with the current or
/// previous key for `app_id`, and the content must be reply XML. Returns the
/// decrypted reply and the key that opened it. A broker that sealed with a
/// key or AppID it has not been told about yet would otherwise make WeChat
/// show the user its error page.
pub fn open_envelope(
    keys: Option<&KeyRing>,
    token: &str,
    app_id: &str,
    body: &[u8],
) -> Result<(String, KeySlot), EnvelopeError> {
    open_stamped(keys, token, app_id, body).map(|o| (o.reply, o.slot))
}

/// An envelope opened, with what it was dated and salted with.
struct Unsealed {
    reply: String,
    slot: KeySlot,
    timestamp: String,
    nonce: String,
}

/// [`open_envelope`], keeping the envelope's `TimeStamp` and `Nonce`.
fn open_stamped(
    keys: Option<&KeyRing>,
    token: &str,
    app_id: &str,
    body: &[u8],
) -> Result<Unsealed, EnvelopeError> {
    let keys = keys.ok_or(EnvelopeError::NoKey)?;
    let envelope = Message::parse(body).map_err(|_| EnvelopeError::Incomplete)?;
    envelope.unambiguous().map_err(EnvelopeError::Ambiguous)?;
    let field = |name| envelope.get(name).ok_or(EnvelopeError::Incomplete);
    let (encrypted, timestamp, nonce) = (field("Encrypt")?, field("TimeStamp")?, field("Nonce")?);
    if !verify(
        field("MsgSignature")?,
        &[token, timestamp, nonce, encrypted],
    ) {
        return Err(EnvelopeError::Signature);
    }
    let (reply, slot) = keys
        .decrypt(encrypted, app_id)
        .map_err(EnvelopeError::Decrypt)?;
    match classify_reply(reply.as_bytes()) {
        Ok(ReplyBody::PlainXml(_)) => Ok(Unsealed {
            reply,
            slot,
            timestamp: timestamp.to_owned(),
            nonce: nonce.to_owned(),
        }),
        Ok(ReplyBody::Ack | ReplyBody::Envelope(_)) | Err(Unfit::NotXml) => {
            Err(EnvelopeError::Content)
        }
        Err(unfit) => Err(EnvelopeError::Sealed(unfit)),
    }
}

/// The `MsgType`s of WeChat's passive replies.
const REPLY_TYPES: [&str; 7] = [
    "text",
    "image",
    "voice",
    "video",
    "music",
    "news",
    "transfer_customer_service",
];

/// Why reply XML is not a passive reply to the push it answers. The messages
/// never quote the reply or an OpenID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAReply {
    #[error("not XML read one way only: {0}")]
    Xml(XmlError),
    #[error("its MsgType is not a passive reply's")]
    MsgType,
    #[error("not addressed back: ToUserName must be the push's sender, FromUserName its account")]
    Addressed,
}

/// Checks that `reply` is a passive reply to `push`: a reply's `MsgType`,
/// `ToUserName` the push's sender and `FromUserName` the account it was sent
/// to. What the relay seals for an account under the account's key must be
/// no more than that: the frame has the shape of a push's.
pub fn check_answers(reply: &str, push: &Message) -> Result<(), NotAReply> {
    let reply = Message::parse_push(reply.as_bytes()).map_err(NotAReply::Xml)?;
    if !reply.msg_type().is_some_and(|t| REPLY_TYPES.contains(&t)) {
        return Err(NotAReply::MsgType);
    }
    let to_sender =
        reply.get("ToUserName").is_some() && reply.get("ToUserName") == push.from_user();
    let from_account = reply.from_user().is_some() && reply.from_user() == push.get("ToUserName");
    if !(to_sender && from_account) {
        return Err(NotAReply::Addressed);
    }
    Ok(())
}

/// What WeChat's answer to one push is judged and sealed with: the
/// account's credentials and what the push was.
#[derive(Clone, Copy)]
pub struct Answering<'a> {
    pub token: &'a str,
    pub app_id: &'a str,
    pub keys: Option<&'a KeyRing>,
    /// The account is in secure mode: a plaintext reply must be sealed.
    pub secure: bool,
    /// The (decrypted) push the reply answers.
    pub push: &'a Message,
    /// The key that decrypted the push; `None` for an unencrypted push.
    pub key_slot: Option<KeySlot>,
    /// The push's signed `timestamp`, which a sealed answer is dated with.
    pub timestamp: &'a str,
}

/// The credentials of the server a `wechat` target plays: its reply is
/// judged as WeChat would judge it from a server holding them.
#[derive(Clone, Copy)]
pub struct OwnServer<'a> {
    /// The target's name: what its envelopes' stamps are remembered under.
    pub target: &'a str,
    pub token: &'a str,
    pub keys: Option<&'a KeyRing>,
    /// The target's AppID, or else the account's.
    pub app_id: &'a str,
    /// In secure mode WeChat refuses a plaintext reply.
    pub secure: bool,
    /// The relay's clock, which the envelope's `TimeStamp` must be near.
    pub now_secs: i64,
    /// The stamps of the envelopes the targets sealed lately.
    pub seen: &'a SeenStamps,
}

/// How far a `wechat` target's envelope may be dated from the relay's
/// clock: the default freshness window of the pushes themselves.
pub const REPLY_WINDOW_SECS: i64 = 300;

/// The most stamps [`SeenStamps`] holds: a stamp is kept while its envelope
/// is fresh, so this is about 200 sealed replies a second from `wechat`
/// targets over the window; beyond that, the oldest are forgotten early.
const MAX_SEEN: usize = 65_536;

/// The (`TimeStamp`, `Nonce`) pairs of the envelopes `wechat` targets
/// sealed, per target, while they are fresh: an envelope sealed once is
/// never sealed for the account a second time. Bounded by [`MAX_SEEN`].
#[derive(Default)]
pub struct SeenStamps(Mutex<Seen>);

/// A target's name, and an envelope's `TimeStamp` and `Nonce`.
type Stamp = (String, String, String);

#[derive(Default)]
struct Seen {
    /// Each stamp and when it goes stale (unix seconds).
    stale_at: HashMap<Stamp, i64>,
    /// The stamps in the order they came, for forgetting the oldest.
    order: VecDeque<Stamp>,
}

impl SeenStamps {
    /// Remembers `stamp` until it goes stale at `stale_at`: false when it
    /// was remembered already.
    fn first_use(&self, stamp: Stamp, stale_at: i64, now: i64) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Seen {
            stale_at: map,
            order,
        } = &mut *seen;
        while let Some(oldest) = order.front() {
            let gone = map.get(oldest).is_none_or(|at| *at <= now);
            if !gone && order.len() < MAX_SEEN {
                break;
            }
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
        if map.get(&stamp).is_some_and(|at| *at > now) {
            return false;
        }
        map.insert(stamp.clone(), stale_at);
        order.push_back(stamp);
        true
    }
}

/// What a relay-sealed envelope is salted with: fresh for every answer.
#[derive(Clone, Copy)]
pub struct Salt<'a> {
    pub nonce: &'a str,
    pub random: &'a [u8; 16],
}

/// What a reply target's answer became for WeChat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its reply as it was (or a target's envelope opened for an
    /// unencrypted push), or `success`.
    Passed,
    /// Sealed by the relay, or a target's envelope re-sealed with the key
    /// that decrypted the push.
    Sealed,
    /// Not something WeChat takes (JSON, HTML, text): `success` instead.
    Ignored,
    /// A reply the relay will not vouch for: `success` instead.
    Unverifiable(Unverifiable),
}

impl Outcome {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Sealed => "encrypted",
            Outcome::Ignored => "ignored",
            Outcome::Unverifiable(_) => "unverifiable",
        }
    }
}

/// Why a reply was not passed to WeChat. The messages never quote the reply,
/// an OpenID or the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverifiable {
    #[error("the target's envelope would not open for WeChat: {0}")]
    AccountEnvelope(EnvelopeError),
    #[error("the target's envelope does not open with its own credentials: {0}")]
    OwnEnvelope(EnvelopeError),
    #[error("the target has no EncodingAESKey to open its envelope with")]
    NoOwnKey,
    #[error("a plaintext reply from a server in secure mode")]
    PlaintextFromSecure,
    #[error("the reply is {0}")]
    NotAReply(NotAReply),
    #[error("the reply is {0}")]
    Unfit(Unfit),
    #[error(
        "the target's envelope is dated further than {REPLY_WINDOW_SECS} s from the relay's clock"
    )]
    Stale,
    #[error("the target's envelope has the TimeStamp and Nonce of one it sent before")]
    Replayed,
}

/// WeChat's answer to a push, from its reply target's answer `body`: the
/// bytes to answer, and what became of the reply. Valid reply XML goes as
/// it is, except that a secure account's plaintext reply is sealed with the
/// key that decrypted the push, and an envelope the target sealed itself
/// passes only if WeChat could open it (re-sealed when the target used the
/// other key of a rotation). A `wechat` target (`own`) must verify with its
/// own credentials and answer the push with a passive reply, which is then
/// sealed with the account's. Anything else is `success`.
pub fn answer(
    body: &[u8],
    to: &Answering<'_>,
    own: Option<&OwnServer<'_>>,
    salt: &Salt<'_>,
) -> (String, Outcome) {
    let success = || "success".to_owned();
    let reply = match classify_reply(body) {
        Ok(reply) => reply,
        Err(Unfit::NotXml) => return (success(), Outcome::Ignored),
        Err(unfit) => return (success(), Outcome::Unverifiable(Unverifiable::Unfit(unfit))),
    };
    let opened = match own {
        None => Ok(Opened::Plain(reply)),
        Some(server) => from_own_server(server, to.push, reply),
    };
    let reply = match opened {
        Err(why) => return (success(), Outcome::Unverifiable(why)),
        Ok(Opened::Sealed(xml)) => return sealed_for(to, salt, xml),
        Ok(Opened::Plain(reply)) => reply,
    };
    match reply {
        ReplyBody::Ack => (success(), Outcome::Passed),
        ReplyBody::Envelope(xml) => {
            match open_envelope(to.keys, to.token, to.app_id, xml.as_bytes()) {
                // A target still sealing with the other key of a rotation: its
                // reply is re-sealed with the key WeChat used for this push.
                Ok((plain, opened_with)) => match (to.keys, to.key_slot) {
                    (Some(keys), Some(slot)) if slot != opened_with => {
                        (seal(to, salt, keys, slot, &plain), Outcome::Sealed)
                    }
                    (_, Some(_)) => (xml, Outcome::Passed),
                    // An unencrypted push: WeChat expects its reply in plaintext.
                    (_, None) => (plain, Outcome::Passed),
                },
                Err(e) => (
                    success(),
                    Outcome::Unverifiable(Unverifiable::AccountEnvelope(e)),
                ),
            }
        }
        ReplyBody::PlainXml(xml) if to.secure => sealed_for(to, salt, xml),
        ReplyBody::PlainXml(xml) => (xml, Outcome::Passed),
    }
}

/// `xml` as WeChat expects the answer to this push: sealed with the key that
/// decrypted it, or in plaintext for an unencrypted push.
fn sealed_for(to: &Answering<'_>, salt: &Salt<'_>, xml: String) -> (String, Outcome) {
    match (to.keys, to.key_slot) {
        (Some(keys), Some(slot)) => (seal(to, salt, keys, slot, &xml), Outcome::Sealed),
        _ => (xml, Outcome::Passed),
    }
}

/// Sealed as WeChat expects: with the key that decrypted the push, dated
/// with its timestamp. The nonce is fresh: under the push's own, the
/// envelope's `Encrypt` and `MsgSignature` beside the push's `signature`
/// would make a push whose content the reply target chose.
fn seal(to: &Answering<'_>, salt: &Salt<'_>, keys: &KeyRing, slot: KeySlot, xml: &str) -> String {
    let key = keys.key(slot);
    envelope(
        key,
        to.token,
        to.app_id,
        xml,
        to.timestamp,
        salt.nonce,
        salt.random,
    )
}

/// A `wechat` target's reply, judged as WeChat would judge it from a server
/// holding the target's credentials.
enum Opened {
    /// Its envelope opened: the reply inside, to be sealed for the account.
    Sealed(String),
    /// `success`, or plaintext reply XML from a server not in secure mode.
    Plain(ReplyBody),
}

/// Opens a `wechat` target's reply with its own Token, keys and AppID. A
/// plaintext reply carries no signature; from a server in secure mode WeChat
/// would refuse it, and so does this. What is to be sealed for the account
/// must be a passive reply to the push: the target holds none of the
/// account's credentials, and must not get more than that sealed under them.
fn from_own_server(
    server: &OwnServer<'_>,
    push: &Message,
    reply: ReplyBody,
) -> Result<Opened, Unverifiable> {
    let answers = |xml: &str| check_answers(xml, push).map_err(Unverifiable::NotAReply);
    match reply {
        ReplyBody::Envelope(xml) => {
            let keys = server.keys.ok_or(Unverifiable::NoOwnKey)?;
            let opened = open_stamped(Some(keys), server.token, server.app_id, xml.as_bytes())
                .map_err(Unverifiable::OwnEnvelope)?;
            fresh_once(server, &opened)?;
            answers(&opened.reply)?;
            Ok(Opened::Sealed(opened.reply))
        }
        ReplyBody::PlainXml(_) if server.secure => Err(Unverifiable::PlaintextFromSecure),
        ReplyBody::PlainXml(xml) => {
            answers(&xml)?;
            Ok(Opened::Plain(ReplyBody::PlainXml(xml)))
        }
        ReplyBody::Ack => Ok(Opened::Plain(ReplyBody::Ack)),
    }
}

/// A `wechat` target's envelope is dated and salted as a push is: it must be
/// dated within [`REPLY_WINDOW_SECS`] of the relay's clock, and its stamp
/// not used before, or a reply recorded once could be had sealed again.
fn fresh_once(server: &OwnServer<'_>, opened: &Unsealed) -> Result<(), Unverifiable> {
    let dated: i64 = opened.timestamp.parse().map_err(|_| Unverifiable::Stale)?;
    if (server.now_secs - dated).abs() > REPLY_WINDOW_SECS {
        return Err(Unverifiable::Stale);
    }
    let stamp = (
        server.target.to_owned(),
        opened.timestamp.clone(),
        opened.nonce.clone(),
    );
    let stale_at = dated + REPLY_WINDOW_SECS;
    if !server.seen.first_use(stamp, stale_at, server.now_secs) {
        return Err(Unverifiable::Replayed);
    }
    Ok(())
}

/// The frame's 16-byte random prefix: letters and digits, as WeChat's own
/// samples use.
pub fn random_bytes() -> [u8; 16] {
    let mut rng = rand::thread_rng();
    std::array::from_fn(|_| rng.sample(Alphanumeric))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::crypto::decrypt;
    use proptest::prelude::*;

    #[test]
    fn envelope_decrypts_and_verifies() {
        let key = AesKey::from_encoding("R3layV3ct0rsEncodingAesKeyForTests0123456Zq").unwrap();
        let reply =
            "<xml><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[欢迎]]></Content></xml>";
        let body = envelope(
            &key,
            "Token",
            "wx5f3c9a1e7d2b4c60",
            reply,
            "1717000000",
            "42",
            &random_bytes(),
        );
        let parsed = Message::parse(body.as_bytes()).unwrap();
        let encrypted = parsed.get("Encrypt").unwrap();
        let signature = parsed.get("MsgSignature").unwrap();
        assert_eq!(parsed.get("TimeStamp"), Some("1717000000"));
        assert_eq!(parsed.get("Nonce"), Some("42"));
        assert!(verify(signature, &["Token", "1717000000", "42", encrypted]));
        assert_eq!(
            decrypt(&key, encrypted, "wx5f3c9a1e7d2b4c60").unwrap(),
            reply
        );
        assert_eq!(
            classify_reply(body.as_bytes()),
            Ok(ReplyBody::Envelope(body.clone()))
        );
    }

    #[test]
    fn an_envelope_opens_only_with_the_token_keys_and_appid_wechat_uses() {
        let key = AesKey::from_encoding("R3layV3ct0rsEncodingAesKeyForTests0123456Zq").unwrap();
        let ring = KeyRing {
            current: key.clone(),
            previous: None,
        };
        let app = "wx5f3c9a1e7d2b4c60";
        let reply = "<xml><MsgType><![CDATA[text]]></MsgType></xml>";
        let seal = |key: &AesKey, token: &str, app_id: &str, xml: &str| {
            envelope(key, token, app_id, xml, "1", "2", &random_bytes())
        };
        let open = |body: String| open_envelope(Some(&ring), "Token", app, body.as_bytes());
        assert_eq!(
            open(seal(&key, "Token", app, reply)).unwrap(),
            (reply.to_string(), KeySlot::Current)
        );
        assert_eq!(
            open(seal(&key, "Other", app, reply)),
            Err(EnvelopeError::Signature)
        );
        assert_eq!(
            open(seal(&key, "Token", "wx0000000000000000", reply)),
            Err(EnvelopeError::Decrypt(DecryptError::AppId))
        );
        assert_eq!(
            open(seal(&key, "Token", app, "{\"not\": \"xml\"}")),
            Err(EnvelopeError::Content)
        );
        assert_eq!(
            open("<xml><Encrypt>abc</Encrypt></xml>".into()),
            Err(EnvelopeError::Incomplete)
        );
        let body = seal(&key, "Token", app, reply);
        assert_eq!(
            open_envelope(None, "Token", app, body.as_bytes()),
            Err(EnvelopeError::NoKey)
        );
    }

    /// The account, a broker with credentials of its own, and a push.
    mod judged {
        use super::*;

        pub const APP: &str = "wx5f3c9a1e7d2b4c60";
        pub const TOKEN: &str = "AccountToken";
        pub const OWN_TOKEN: &str = "BrokerOwnToken";
        pub const SENDER: &str = "oSender";
        pub const NOW: &str = "1717000000";
        pub const NOW_SECS: i64 = 1_717_000_000;

        pub fn current() -> AesKey {
            AesKey::from_bytes([1; 32])
        }
        pub fn previous() -> AesKey {
            AesKey::from_bytes([2; 32])
        }
        pub fn own_key() -> AesKey {
            AesKey::from_bytes([3; 32])
        }

        /// The broker's own server, in secure mode or not.
        pub fn own<'a>(ring: &'a KeyRing, secure: bool, seen: &'a SeenStamps) -> OwnServer<'a> {
            OwnServer {
                target: "broker",
                token: OWN_TOKEN,
                keys: Some(ring),
                app_id: APP,
                secure,
                now_secs: NOW_SECS,
                seen,
            }
        }

        pub fn own_ring() -> KeyRing {
            KeyRing {
                current: own_key(),
                previous: None,
            }
        }

        pub fn ring() -> KeyRing {
            KeyRing {
                current: current(),
                previous: Some(previous()),
            }
        }

        pub fn push() -> Message {
            let xml = format!(
                "<xml><ToUserName>gh_account</ToUserName><FromUserName>{SENDER}</FromUserName>\
                 <CreateTime>1</CreateTime><MsgType>event</MsgType><Event>SCAN</Event></xml>"
            );
            Message::parse_push(xml.as_bytes()).unwrap()
        }

        pub fn reply(to: &str, msg_type: &str) -> String {
            format!(
                "<xml><ToUserName>{to}</ToUserName><FromUserName>gh_account</FromUserName>\
                 <CreateTime>2</CreateTime><MsgType>{msg_type}</MsgType><Content>hi</Content></xml>"
            )
        }

        /// Sealed now, with a fresh nonce, as a server does.
        pub fn sealed(key: &AesKey, token: &str, xml: &str) -> String {
            sealed_at(key, token, xml, NOW, &crate::wechat::push::digits(9))
        }

        pub fn sealed_at(key: &AesKey, token: &str, xml: &str, at: &str, nonce: &str) -> String {
            envelope(key, token, APP, xml, at, nonce, &random_bytes())
        }

        /// Judges `body` for a secure push that `slot` decrypted.
        pub fn judge(body: &str, slot: KeySlot, own: Option<&OwnServer<'_>>) -> (String, Outcome) {
            let (ring, push) = (ring(), push());
            let to = Answering {
                token: TOKEN,
                app_id: APP,
                keys: Some(&ring),
                secure: true,
                push: &push,
                key_slot: Some(slot),
                timestamp: NOW,
            };
            let salt = Salt {
                nonce: "77",
                random: &random_bytes(),
            };
            answer(body.as_bytes(), &to, own, &salt)
        }

        /// What WeChat reads in an answer: the reply and the key that opens it.
        pub fn opened(answer: &str) -> (String, KeySlot) {
            open_envelope(Some(&ring()), TOKEN, APP, answer.as_bytes()).unwrap()
        }
    }

    #[test]
    fn a_reply_sealed_with_the_other_key_of_a_rotation_is_resealed_with_the_pushs() {
        use judged::*;
        let reply = reply(SENDER, "text");
        let by_previous = sealed(&previous(), TOKEN, &reply);
        let (answer, outcome) = judge(&by_previous, KeySlot::Current, None);
        assert_eq!(outcome, Outcome::Sealed);
        assert_eq!(opened(&answer), (reply.clone(), KeySlot::Current));
        // Sealed with the key WeChat used for the push: passed as it is.
        let (answer, outcome) = judge(&by_previous, KeySlot::Previous, None);
        assert_eq!((answer, outcome), (by_previous, Outcome::Passed));
        // A plaintext reply to a secure push is sealed with the push's key.
        let (answer, outcome) = judge(&reply, KeySlot::Previous, None);
        assert_eq!(outcome, Outcome::Sealed);
        assert_eq!(opened(&answer), (reply, KeySlot::Previous));
    }

    #[test]
    fn a_wechat_targets_reply_opens_with_its_own_credentials_and_is_sealed_with_the_accounts() {
        use judged::*;
        let (own_ring, seen) = (own_ring(), SeenStamps::default());
        let own = own(&own_ring, true, &seen);
        let reply = reply(SENDER, "text");
        let (answer, outcome) = judge(
            &sealed(&own_key(), OWN_TOKEN, &reply),
            KeySlot::Current,
            Some(&own),
        );
        assert_eq!(outcome, Outcome::Sealed);
        assert_eq!(opened(&answer), (reply.clone(), KeySlot::Current));
        // Sealed with the account's own credentials: the broker must not hold them.
        let (answer, outcome) = judge(
            &sealed(&current(), TOKEN, &reply),
            KeySlot::Current,
            Some(&own),
        );
        assert_eq!(answer, "success");
        assert_eq!(
            outcome,
            Outcome::Unverifiable(Unverifiable::OwnEnvelope(EnvelopeError::Signature))
        );
        // Plaintext from a server in secure mode: WeChat would refuse it.
        let (answer, outcome) = judge(&reply, KeySlot::Current, Some(&own));
        assert_eq!(
            (answer.as_str(), outcome),
            (
                "success",
                Outcome::Unverifiable(Unverifiable::PlaintextFromSecure)
            )
        );
        // `success` is passed in every mode.
        assert_eq!(
            judge("success", KeySlot::Current, Some(&own)),
            ("success".to_owned(), Outcome::Passed)
        );
    }

    #[test]
    fn an_envelope_sealed_with_a_key_the_account_does_not_hold_is_unverifiable() {
        use judged::*;
        let stranger = AesKey::from_bytes([9; 32]);
        let (answer, outcome) = judge(
            &sealed(&stranger, TOKEN, &reply(SENDER, "text")),
            KeySlot::Current,
            None,
        );
        assert_eq!(answer, "success");
        assert!(
            matches!(
                outcome,
                Outcome::Unverifiable(Unverifiable::AccountEnvelope(EnvelopeError::Decrypt(_)))
            ),
            "{outcome:?}"
        );
        let (_, outcome) = judge("{\"reply\": \"hi\"}", KeySlot::Current, None);
        assert_eq!(outcome, Outcome::Ignored);
    }

    #[test]
    fn a_wechat_target_gets_only_a_passive_reply_to_the_push_sealed() {
        use judged::*;
        let (own_ring, seen) = (own_ring(), SeenStamps::default());
        let own = own(&own_ring, false, &seen);
        let not_replies = [
            (reply(SENDER, "event"), NotAReply::MsgType),
            (reply("oSomeoneElse", "text"), NotAReply::Addressed),
        ];
        for (xml, why) in not_replies {
            for body in [sealed(&own_key(), OWN_TOKEN, &xml), xml.clone()] {
                let (answer, outcome) = judge(&body, KeySlot::Current, Some(&own));
                assert_eq!(answer, "success");
                assert_eq!(
                    outcome,
                    Outcome::Unverifiable(Unverifiable::NotAReply(why.clone()))
                );
            }
        }
    }

    #[test]
    fn a_wechat_targets_envelope_must_be_fresh_and_its_stamp_unused() {
        use judged::*;
        let (own_ring, seen) = (own_ring(), SeenStamps::default());
        let own = own(&own_ring, true, &seen);
        let reply = reply(SENDER, "text");
        let at = |offset: i64, nonce: &str| {
            let at = (NOW_SECS + offset).to_string();
            let body = sealed_at(&own_key(), OWN_TOKEN, &reply, &at, nonce);
            judge(&body, KeySlot::Current, Some(&own)).1
        };
        assert_eq!(at(-301, "1"), Outcome::Unverifiable(Unverifiable::Stale));
        assert_eq!(at(301, "2"), Outcome::Unverifiable(Unverifiable::Stale));
        assert_eq!(at(300, "3"), Outcome::Sealed);
        assert_eq!(at(300, "3"), Outcome::Unverifiable(Unverifiable::Replayed));
        assert_eq!(at(300, "4"), Outcome::Sealed, "another nonce");
        assert_eq!(at(-300, "3"), Outcome::Sealed, "another timestamp");
        // Another target's stamps are its own.
        let other = OwnServer {
            target: "other",
            ..own
        };
        let body = sealed_at(
            &own_key(),
            OWN_TOKEN,
            &reply,
            &(NOW_SECS + 300).to_string(),
            "3",
        );
        assert_eq!(
            judge(&body, KeySlot::Current, Some(&other)).1,
            Outcome::Sealed
        );
    }

    #[test]
    fn seen_stamps_are_forgotten_once_stale_and_bounded() {
        let seen = SeenStamps::default();
        let stamp = |nonce: usize| ("t".to_owned(), "100".to_owned(), nonce.to_string());
        assert!(seen.first_use(stamp(0), 400, 100));
        assert!(!seen.first_use(stamp(0), 400, 399));
        assert!(seen.first_use(stamp(0), 700, 400), "stale: forgotten");
        for nonce in 1..=MAX_SEEN {
            assert!(seen.first_use(stamp(nonce), 1_000, 500));
        }
        let held = seen.0.lock().unwrap();
        assert!(held.order.len() <= MAX_SEEN && held.stale_at.len() <= MAX_SEEN);
        assert!(
            held.stale_at.contains_key(&stamp(MAX_SEEN)),
            "the newest is kept"
        );
    }

    #[test]
    fn a_reply_with_a_repeated_top_level_field_is_unverifiable() {
        use judged::*;
        let (own_ring, seen) = (own_ring(), SeenStamps::default());
        let reply = reply(SENDER, "text");
        let twice = |field: &str, value: &str| {
            reply.replacen(
                "<CreateTime>",
                &format!("<{field}>{value}</{field}><CreateTime>"),
                1,
            )
        };
        for doubled in [
            twice("ToUserName", "oVictim"),
            twice("FromUserName", "gh_other"),
            twice("MsgType", "event"),
        ] {
            let repeated = |e: &Outcome| matches!(e, Outcome::Unverifiable(why) if why.to_string().contains("more than once"));
            for own_server in [None, Some(own(&own_ring, false, &seen))] {
                let (answer, outcome) = judge(&doubled, KeySlot::Current, own_server.as_ref());
                assert_eq!(answer, "success");
                assert!(repeated(&outcome), "{outcome:?}");
            }
            let by_broker = sealed(&own_key(), OWN_TOKEN, &doubled);
            let own_server = own(&own_ring, true, &seen);
            let (_, outcome) = judge(&by_broker, KeySlot::Current, Some(&own_server));
            assert!(repeated(&outcome), "{outcome:?}");
            let by_account = sealed(&current(), TOKEN, &doubled);
            let (_, outcome) = judge(&by_account, KeySlot::Current, None);
            assert!(repeated(&outcome), "{outcome:?}");
        }
        // An envelope with two of its own fields is no better.
        let envelope = sealed(&current(), TOKEN, &reply);
        let two = envelope.replacen("<Nonce>", "<Nonce><![CDATA[1]]></Nonce><Nonce>", 1);
        let (_, outcome) = judge(&two, KeySlot::Current, None);
        assert!(matches!(outcome, Outcome::Unverifiable(_)), "{outcome:?}");
    }

    #[test]
    fn a_reply_over_the_cap_is_unverifiable_plain_or_sealed() {
        use judged::*;
        let sized = |len: usize| {
            let reply = reply(SENDER, "text");
            let pad = "x".repeat(len - reply.len() + 2);
            reply.replace(
                "<Content>hi</Content>",
                &format!("<Content>{pad}</Content>"),
            )
        };
        assert_eq!(sized(MAX_REPLY).len(), MAX_REPLY);
        let (_, outcome) = judge(&sized(MAX_REPLY), KeySlot::Current, None);
        assert_eq!(outcome, Outcome::Sealed, "at the cap");
        let over = sized(MAX_REPLY + 1);
        let too_large = Outcome::Unverifiable(Unverifiable::Unfit(Unfit::TooLarge(MAX_REPLY + 1)));
        assert_eq!(
            judge(&over, KeySlot::Current, None),
            ("success".to_owned(), too_large)
        );
        let sealed_over = sealed(&current(), TOKEN, &over);
        let (answer, outcome) = judge(&sealed_over, KeySlot::Current, None);
        assert_eq!(answer, "success");
        assert_eq!(
            outcome,
            Outcome::Unverifiable(Unverifiable::AccountEnvelope(EnvelopeError::Sealed(
                Unfit::TooLarge(MAX_REPLY + 1)
            )))
        );
    }

    #[test]
    fn success_and_empty_bodies_are_acks() {
        for body in ["", "success", " success\r\n", "\n\t"] {
            assert_eq!(
                classify_reply(body.as_bytes()),
                Ok(ReplyBody::Ack),
                "{body:?}"
            );
        }
    }

    #[test]
    fn reply_xml_is_kept_verbatim() {
        let xml = "<?xml version=\"1.0\"?>\n<xml><ToUserName><![CDATA[o1]]></ToUserName>\
                   <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content></xml>\n";
        assert_eq!(
            classify_reply(xml.as_bytes()),
            Ok(ReplyBody::PlainXml(xml.to_owned()))
        );
        // An empty Encrypt is no envelope.
        let empty = "<xml><Encrypt></Encrypt></xml>";
        assert_eq!(
            classify_reply(empty.as_bytes()),
            Ok(ReplyBody::PlainXml(empty.to_owned()))
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for body in [
            "OK",
            "Success",
            "successful",
            "{\"reply\":\"hi\"}",
            "<html><body>502 Bad Gateway</body></html>",
            "<xml><Content>unclosed</xml>",
            "<!DOCTYPE xml><xml><Content>x</Content></xml>",
            "<reply><Content>x</Content></reply>",
            "<xml/>trailing",
        ] {
            assert_eq!(
                classify_reply(body.as_bytes()),
                Err(Unfit::NotXml),
                "{body:?}"
            );
        }
        assert_eq!(classify_reply(b"<xml>\xff</xml>"), Err(Unfit::NotXml));
    }

    #[test]
    fn random_bytes_are_letters_and_digits() {
        let first = random_bytes();
        assert!(first.iter().all(u8::is_ascii_alphanumeric));
        // 62^16 possibilities: two equal draws mean the generator is broken.
        assert_ne!(first, random_bytes());
    }

    proptest! {
        #[test]
        fn classify_reply_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = classify_reply(&bytes);
        }
    }
}
