//! The WeChat Official Account server-URL protocol: signatures, the AES frame,
//! the XML of pushes and replies. Everything here is pure: no I/O, no clock.
//!
//! An Official Account (公众号 / 服务号) has one server URL, set in the admin
//! console together with a Token, an EncodingAESKey and a message mode. WeChat
//! talks to that URL in two ways, and the relay serves both on
//! `/wx/{account}` (the request handler).
//!
//! # The URL check (GET)
//!
//! When the server configuration is saved, WeChat sends a GET with four query
//! parameters: `signature`, `timestamp`, `nonce` and `echostr`. The server
//! proves it holds the Token by checking `signature` (see [`signature`]) and
//! answering `echostr` as the whole body, byte for byte. For an Official
//! Account `echostr` is a plain random string in every message mode, never
//! ciphertext: trying to decrypt it fails the check. (WeCom's callbacks do
//! encrypt it: see [`family`].)
//!
//! # Pushes (POST)
//!
//! Every message a user sends and every event (follow, QR scan, menu click,
//! location…) arrives as a POST whose body is XML with root `<xml>`. The query
//! always carries `signature`, `timestamp` and `nonce`, and newer pushes add
//! `openid`, the sender. `signature` covers only the Token, `timestamp` and
//! `nonce`, never the body, and `openid` is covered by nothing, so the relay
//! takes the sender from the message's own `FromUserName`, in an encrypted
//! push from the decrypted message, and refuses a push whose `openid` names
//! anyone else. What the body looks like depends on the
//! account's message mode:
//!
//! * **Plaintext** (明文): the body is the message, e.g. `<xml><ToUserName>…
//!   <FromUserName>…<CreateTime>…<MsgType>…</xml>`. The query has no
//!   `encrypt_type` (or `encrypt_type=raw`); nothing but its `signature`
//!   vouches for the request, and that does not cover the body.
//! * **Compat** (兼容): the query adds `encrypt_type=aes` and `msg_signature`;
//!   the body holds the plaintext fields *and* an `<Encrypt>` element with the
//!   same message encrypted. Only `<Encrypt>` is covered by `msg_signature`,
//!   so the copies beside it are ignored: the relay acts on the decrypted
//!   message only.
//! * **Secure** (安全): the same query as compat; the body holds only
//!   `<ToUserName>` and `<Encrypt>`.
//!
//! `msg_signature` is the same SHA-1 construction as `signature` with the
//! `<Encrypt>` value added to the parts. `<Encrypt>` is base64 of an
//! AES-256-CBC frame that carries the message and the account's AppID
//! ([`crypto`]). Decrypted, it is the same XML a plaintext push carries
//! ([`message`]). Which mode an account is in comes from the relay's
//! configuration ([`crate::config::Mode`]), never from the request: a secure
//! account refuses a push without `encrypt_type=aes` as a downgrade.
//!
//! # The answer
//!
//! WeChat waits 5 seconds for the answer; without one it drops the connection
//! and retries the same push, three times at most, which is why every push has
//! a dedup key ([`message::Message::dedup_key`]). The body must be
//! `success`, empty, or a passive reply XML (in secure mode sealed in an
//! encrypted envelope); anything else, like a late answer, makes WeChat show
//! the user an error instead of the account's reply ([`reply`]).
//!
//! # Where implementations go wrong
//!
//! Each of these breaks real accounts, and each is guarded against here:
//!
//! * Padding to 16-byte blocks, as AES libraries do, instead of WeChat's 32,
//!   or accepting only pad values 1..=16 ([`crypto`]).
//! * Decoding the EncodingAESKey with a strict base64 decoder, which refuses
//!   most real keys ([`crypto::AesKey::from_encoding`]).
//! * Trying to decrypt `echostr` in the URL check (see above).
//! * Skipping the AppID check after decryption: it is the only thing that
//!   tells the right key from a wrong one ([`crypto::decrypt`]).
//! * Trusting the plaintext copies in a compat body, which no signature covers.
//! * Comparing signatures with `==`, which leaks through timing how much of a
//!   guess was right ([`signature::verify`]).
//!
//! # Modules
//!
//! [`signature`] the SHA-1 signatures; [`crypto`] the EncodingAESKey, the AES
//! frame and the key ring; [`message`] the XML of pushes and the dedup key;
//! [`json`] a Mini Program's JSON pushes, read as strictly; [`family`] the
//! other callback families (Mini Programs, Open Platforms, WeCom) beside
//! this one; [`inbound`] verifying what each family sends; [`reply`] what
//! WeChat accepts as an answer and the encrypted envelope; [`push`] builds a
//! push exactly as WeChat would, for simulation and tests.

pub mod crypto;
pub mod customer_service;
pub mod family;
pub mod inbound;
pub mod json;
pub mod message;
pub mod push;
pub mod reply;
pub mod signature;
