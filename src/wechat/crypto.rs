//! WeChat's AES-256-CBC frame and the EncodingAESKey.
//!
//! ```text
//! frame   = random(16) | msg_len (u32, big-endian, in bytes) | msg (UTF-8) | receive id
//! padded  = frame | PKCS#7 padding to a multiple of 32 bytes (pad value 1..=32)
//! Encrypt = base64(AES-256-CBC(key, iv = key[..16], padded))
//! ```
//!
//! # The key
//!
//! The EncodingAESKey shown in the console is 43 characters of standard base64
//! with the trailing `=` left off: 43 × 6 = 258 bits, the 256 of the AES key
//! plus two spare bits in the last character. WeChat does not zero those bits,
//! so a decoder that insists on canonical base64 refuses most real keys; the
//! key is decoded leniently ([`AesKey::from_encoding`]), after checking it is
//! 43 letters and digits (WeChat's keys never contain `+` or `/`). The IV is not
//! sent anywhere: it is the first 16 bytes of the key, the same for every
//! message, which is why the random prefix of the frame exists.
//!
//! # The frame
//!
//! The plaintext is 16 random bytes, the message length as a 4-byte
//! big-endian count of bytes (not characters), the message as UTF-8, then the
//! receive id: the AppID for an Official Account (the CorpID for WeCom). It is
//! padded PKCS#7-style but to a 32-byte block, so the pad value runs from 1 to
//! 32; a whole block of 32 is added when the frame is already a multiple of 32.
//! AES libraries pad to their 16-byte block and their unpadders refuse any pad
//! value over 16, which breaks about half of real messages, so padding is
//! done here by hand, both ways. Decryption only asks for a whole number of
//! 16-byte blocks: a sender that padded to 16 still yields a valid frame.
//!
//! Decryption never trusts the ciphertext: the length, the padding, `msg_len`
//! and the receive id are all checked before anything is sliced or returned,
//! and no input can make it panic.
//!
//! # The AppID check
//!
//! There is no MAC on the frame. `msg_signature` proves that the sender knows
//! the Token, not which key it encrypted with, so the receive id is the only
//! integrity check on the key: decrypting with a wrong key gives noise that
//! may, now and then, even pass the padding and length checks, but never ends
//! in the exact AppID. Skipping that comparison turns a wrong key, or another
//! account's push, into garbage accepted as a message. It is also what decides
//! a key rotation: [`KeyRing::decrypt`] tries the current key, then the
//! previous one, and the first whose frame ends in the AppID is the key the
//! push was sealed with, and the key its passive reply must be sealed with.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::fmt;

/// Decodes the 43-character EncodingAESKey. The 43rd character carries two bits
/// beyond the 256 of the key; WeChat sets them at random, so a strict decoder
/// rejects most real keys. They are ignored here, as every WeChat SDK does.
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an EncodingAESKey was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must be 43 characters, got {0}")]
    Length(usize),
    #[error("must contain only letters and digits")]
    Alphabet,
    #[error("does not decode to 32 bytes")]
    Decode,
}

/// A 32-byte AES key. `Debug` shows a fingerprint, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct AesKey([u8; 32]);

impl AesKey {
    /// Decodes an EncodingAESKey as configured in the WeChat admin console.
    pub fn from_encoding(encoding_aes_key: &str) -> Result<Self, KeyError> {
        let len = encoding_aes_key.chars().count();
        if len != 43 {
            return Err(KeyError::Length(len));
        }
        if !encoding_aes_key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyError::Alphabet);
        }
        let bytes = KEY_ENGINE
            .decode(encoding_aes_key)
            .map_err(|_| KeyError::Decode)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Decode)?;
        Ok(Self(key))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The IV is the first 16 bytes of the key.
    pub fn iv(&self) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&self.0[..16]);
        iv
    }

    /// A short, non-reversible identifier for logs and `wxrelay check`.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0);
        format!("sha256:{}", hex::encode(&digest[..6]))
    }
}

impl fmt::Debug for AesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AesKey({})", self.fingerprint())
    }
}

/// Which key of a [`KeyRing`] decrypted a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Current,
    Previous,
}

impl KeySlot {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySlot::Current => "current",
            KeySlot::Previous => "previous",
        }
    }
}

/// The account's current key and, during a rotation, the one before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    pub current: AesKey,
    pub previous: Option<AesKey>,
}

impl KeyRing {
    pub fn key(&self, slot: KeySlot) -> &AesKey {
        match (slot, &self.previous) {
            (KeySlot::Previous, Some(previous)) => previous,
            _ => &self.current,
        }
    }

    /// Decrypts with the current key, then the previous one, and says which
    /// worked, so a passive reply can be encrypted with the same key.
    ///
    /// The frame checks (padding, length, AppID) pick the key: a wrong key
    /// yields noise that fails them. When both keys fail, the current key's
    /// error is the one reported, as it is the key WeChat should be using.
    pub fn decrypt(
        &self,
        encrypt_b64: &str,
        app_id: &str,
    ) -> Result<(String, KeySlot), DecryptError> {
        let current_err = match decrypt(&self.current, encrypt_b64, app_id) {
            Ok(msg) => return Ok((msg, KeySlot::Current)),
            Err(err) => err,
        };
        match &self.previous {
            Some(previous) => decrypt(previous, encrypt_b64, app_id)
                .map(|msg| (msg, KeySlot::Previous))
                .map_err(|_| current_err),
            None => Err(current_err),
        }
    }
}

/// WeChat pads to a 32-byte block, not AES's 16 (see the module docs).
const PAD_BLOCK: usize = 32;
/// The random prefix plus `msg_len`.
const FRAME_HEADER: usize = 20;
const AES_BLOCK: usize = 16;

/// Why an `Encrypt` value did not yield a message. The messages never quote
/// the ciphertext or the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("not canonical base64")]
    Base64,
    #[error("ciphertext is empty or not a multiple of 16 bytes")]
    Length,
    #[error("bad padding")]
    Padding,
    #[error("frame too short or msg_len out of range")]
    Frame,
    #[error("receive id does not match the appid")]
    AppId,
    #[error("message is not UTF-8")]
    Utf8,
}

/// Decrypts an `Encrypt` value and checks that its receive id is `app_id`.
pub fn decrypt(key: &AesKey, encrypt_b64: &str, app_id: &str) -> Result<String, DecryptError> {
    let (msg, receive_id) = decrypt_frame(key, encrypt_b64)?;
    // This is the only integrity check on the key itself; keep it exact.
    if receive_id != app_id {
        return Err(DecryptError::AppId);
    }
    Ok(msg)
}

/// Decrypts an `Encrypt` value into `(msg, receive_id)` without judging the
/// receive id. [`decrypt`] is the entry point for pushes; this one serves
/// callers whose receive id is not an AppID (a WeCom CorpID).
///
/// A receive id that is not UTF-8 cannot be anyone's AppID and is reported as
/// [`DecryptError::AppId`].
pub fn decrypt_frame(key: &AesKey, encrypt_b64: &str) -> Result<(String, String), DecryptError> {
    // WeChat's base64 is canonical, so the strict engine is right here (unlike the key's).
    let mut buf = STANDARD
        .decode(encrypt_b64)
        .map_err(|_| DecryptError::Base64)?;
    // 16-aligned is enough: encoders with a 16-byte PKCS#7 produce valid frames too.
    if buf.is_empty() || buf.len() % AES_BLOCK != 0 {
        return Err(DecryptError::Length);
    }
    let mut cipher = cbc::Decryptor::<aes::Aes256>::new(
        GenericArray::from_slice(key.as_bytes()),
        GenericArray::from_slice(&key.iv()),
    );
    for block in buf.chunks_exact_mut(AES_BLOCK) {
        cipher.decrypt_block_mut(GenericArray::from_mut_slice(block));
    }

    // PKCS#7 by hand: a library unpadder allows only 1..=16 and fails on half of
    // real messages. Checking every pad byte is stricter than WeChat's samples;
    // it costs nothing, as WeChat always pads correctly. The signature is
    // checked before decryption, so this is no padding oracle.
    let pad = usize::from(buf[buf.len() - 1]);
    if pad == 0 || pad > PAD_BLOCK || pad > buf.len() {
        return Err(DecryptError::Padding);
    }
    let (frame, padding) = buf.split_at(buf.len() - pad);
    if padding.iter().any(|&b| usize::from(b) != pad) {
        return Err(DecryptError::Padding);
    }

    let len_bytes: [u8; 4] = frame
        .get(16..FRAME_HEADER)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(DecryptError::Frame)?;
    // msg_len counts bytes; it is untrusted until checked against the frame.
    let msg_len = u32::from_be_bytes(len_bytes);
    let msg_end = usize::try_from(msg_len)
        .ok()
        .and_then(|len| FRAME_HEADER.checked_add(len))
        .filter(|&end| end <= frame.len())
        .ok_or(DecryptError::Frame)?;
    let msg = std::str::from_utf8(&frame[FRAME_HEADER..msg_end]).map_err(|_| DecryptError::Utf8)?;
    let receive_id = std::str::from_utf8(&frame[msg_end..]).map_err(|_| DecryptError::AppId)?;
    Ok((msg.to_owned(), receive_id.to_owned()))
}

/// Encrypts `msg` into an `Encrypt` value with receive id `app_id`.
///
/// `random` is the frame's 16-byte prefix ([`crate::wechat::reply::random_bytes`]
/// in production, fixed in tests so results are reproducible).
pub fn encrypt(key: &AesKey, random: &[u8; 16], msg: &str, app_id: &str) -> String {
    let frame_len = FRAME_HEADER + msg.len() + app_id.len();
    let pad = PAD_BLOCK - frame_len % PAD_BLOCK;
    let mut buf = Vec::with_capacity(frame_len + pad);
    buf.extend_from_slice(random);
    // A message is bounded by the request body cap, far below 4 GiB.
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(msg.as_bytes());
    buf.extend_from_slice(app_id.as_bytes());
    // `pad` is 1..=32, so it fits a byte.
    buf.resize(frame_len + pad, pad as u8);

    let mut cipher = cbc::Encryptor::<aes::Aes256>::new(
        GenericArray::from_slice(key.as_bytes()),
        GenericArray::from_slice(&key.iv()),
    );
    for block in buf.chunks_exact_mut(AES_BLOCK) {
        cipher.encrypt_block_mut(GenericArray::from_mut_slice(block));
    }
    STANDARD.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const APP_ID: &str = "wx5f3c9a1e7d2b4c60";
    const RANDOM: &[u8; 16] = b"0123456789abcdef";

    fn key() -> AesKey {
        AesKey::from_encoding("R3layV3ct0rsEncodingAesKeyForTests0123456Zq").unwrap()
    }

    /// Encrypts `plain` as is, padding included, so tests can build broken frames.
    fn encrypt_raw(key: &AesKey, plain: &[u8]) -> String {
        let mut buf = plain.to_vec();
        let mut cipher = cbc::Encryptor::<aes::Aes256>::new(
            GenericArray::from_slice(key.as_bytes()),
            GenericArray::from_slice(&key.iv()),
        );
        for block in buf.chunks_exact_mut(AES_BLOCK) {
            cipher.encrypt_block_mut(GenericArray::from_mut_slice(block));
        }
        STANDARD.encode(buf)
    }

    /// A frame with a given `msg_len` field and body, padded with `padding`.
    fn frame(msg_len: u32, body: &[u8], padding: &[u8]) -> Vec<u8> {
        let mut plain = RANDOM.to_vec();
        plain.extend_from_slice(&msg_len.to_be_bytes());
        plain.extend_from_slice(body);
        plain.extend_from_slice(padding);
        plain
    }

    fn decrypted_len(encrypt_b64: &str) -> usize {
        STANDARD.decode(encrypt_b64).unwrap().len()
    }

    #[test]
    fn round_trips_multi_byte_text() {
        let msg = "你好 relay & <test> 🚀";
        let enc = encrypt(&key(), RANDOM, msg, APP_ID);
        assert_eq!(decrypt(&key(), &enc, APP_ID).unwrap(), msg);
    }

    #[test]
    fn pads_to_32_bytes_with_pad_values_1_and_32() {
        // The frame is 20 + n + 18 bytes. n = 26 fills two blocks exactly, so a
        // whole block of 32 is added; n = 25 leaves room for a single pad byte.
        for (n, total) in [(26, 96), (25, 64)] {
            let msg = "p".repeat(n);
            let enc = encrypt(&key(), RANDOM, &msg, APP_ID);
            assert_eq!(decrypted_len(&enc), total);
            assert_eq!(decrypt(&key(), &enc, APP_ID).unwrap(), msg);
        }
    }

    #[test]
    fn round_trips_every_message_length_and_pad_value() {
        let mut pads_seen = [false; PAD_BLOCK + 1];
        for len in 0..=200 {
            let msg = "é".repeat(len / 2) + &"a".repeat(len % 2);
            let enc = encrypt(&key(), RANDOM, &msg, APP_ID);
            let raw_len = decrypted_len(&enc);
            assert_eq!(raw_len % PAD_BLOCK, 0);
            pads_seen[raw_len - (FRAME_HEADER + msg.len() + APP_ID.len())] = true;
            assert_eq!(decrypt(&key(), &enc, APP_ID).unwrap(), msg);
        }
        assert!(pads_seen[1..].iter().all(|&seen| seen), "{pads_seen:?}");
    }

    #[test]
    fn accepts_a_frame_padded_to_16_bytes() {
        // 20 + 12 + 4 = 36 bytes, padded the AES way to 48 with twelve 12s:
        // 16-aligned but not 32-aligned, as a 16-byte PKCS#7 encoder makes it.
        let plain = frame(12, b"hello world!rust", &[12; 12]);
        assert_eq!(plain.len(), 48);
        let enc = encrypt_raw(&key(), &plain);
        assert_eq!(decrypt(&key(), &enc, "rust").unwrap(), "hello world!");
    }

    #[test]
    fn refuses_pad_values_outside_1_to_32() {
        let mut body = b"hi".to_vec();
        body.extend_from_slice(APP_ID.as_bytes());
        // 20 + 20 = 40 bytes; 24 more to reach 64.
        let zero = frame(2, &body, &[0; 24]);
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &zero), APP_ID),
            Err(DecryptError::Padding)
        );
        let mut p33 = frame(2, &body, &[33; 24]);
        p33.extend_from_slice(&[33; 32]);
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &p33), APP_ID),
            Err(DecryptError::Padding)
        );
        let good = frame(2, &body, &[24; 24]);
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &good), APP_ID).unwrap(),
            "hi"
        );
    }

    #[test]
    fn refuses_inconsistent_padding() {
        let mut body = b"hi".to_vec();
        body.extend_from_slice(APP_ID.as_bytes());
        let mut padding = [24u8; 24];
        padding[0] = 23;
        let plain = frame(2, &body, &padding);
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &plain), APP_ID),
            Err(DecryptError::Padding)
        );
    }

    #[test]
    fn refuses_a_pad_longer_than_the_ciphertext() {
        // One block, all 0x20: the pad claims 32 bytes of a 16-byte buffer.
        let enc = encrypt_raw(&key(), &[32; 16]);
        assert_eq!(decrypt(&key(), &enc, APP_ID), Err(DecryptError::Padding));
    }

    #[test]
    fn refuses_a_frame_shorter_than_its_header() {
        // 16 bytes of which 1 is padding: 15 < 20.
        let mut plain = [b'x'; 16];
        plain[15] = 1;
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &plain), APP_ID),
            Err(DecryptError::Frame)
        );
        // A whole block of padding leaves nothing.
        let enc = encrypt_raw(&key(), &[16; 16]);
        assert_eq!(decrypt(&key(), &enc, APP_ID), Err(DecryptError::Frame));
    }

    #[test]
    fn refuses_msg_len_past_the_end() {
        for msg_len in [21, 0x7fff_fff0, u32::MAX] {
            let mut body = b"hi".to_vec();
            body.extend_from_slice(APP_ID.as_bytes());
            let plain = frame(msg_len, &body, &[24; 24]);
            let enc = encrypt_raw(&key(), &plain);
            assert_eq!(
                decrypt(&key(), &enc, APP_ID),
                Err(DecryptError::Frame),
                "{msg_len}"
            );
        }
        // Exactly up to the end is fine: the whole rest is the message, the receive id empty.
        let plain = frame(20, &[b'm'; 20], &[24; 24]);
        let enc = encrypt_raw(&key(), &plain);
        assert_eq!(
            decrypt_frame(&key(), &enc).unwrap(),
            ("m".repeat(20), String::new())
        );
    }

    #[test]
    fn refuses_truncated_ciphertexts() {
        let enc = encrypt(&key(), RANDOM, "some message", APP_ID);
        let raw = STANDARD.decode(&enc).unwrap();
        let cut = STANDARD.encode(&raw[..raw.len() - 5]);
        assert_eq!(decrypt(&key(), &cut, APP_ID), Err(DecryptError::Length));
        assert_eq!(decrypt(&key(), "", APP_ID), Err(DecryptError::Length));
        // Dropping the last block leaves a random-looking last byte: must fail cleanly.
        let block_cut = STANDARD.encode(&raw[..raw.len() - 16]);
        assert!(decrypt(&key(), &block_cut, APP_ID).is_err());
    }

    #[test]
    fn refuses_non_canonical_base64() {
        let enc = encrypt(&key(), RANDOM, "x", APP_ID);
        for bad in [
            "!!!not*base64%%%".to_owned(),
            format!("{enc}\n"),
            format!(" {enc}"),
            enc.trim_end_matches('=').to_owned(),
            enc.replace('+', "-").replace('/', "_") + "-",
        ] {
            assert_eq!(
                decrypt(&key(), &bad, APP_ID),
                Err(DecryptError::Base64),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_another_appid_exactly() {
        let enc = encrypt(&key(), RANDOM, "hello", APP_ID);
        for other in [
            "wxffffffffffffffff",
            "",
            "wx5f3c9a1e7d2b4c6",
            "WX5F3C9A1E7D2B4C60",
        ] {
            assert_eq!(
                decrypt(&key(), &enc, other),
                Err(DecryptError::AppId),
                "{other}"
            );
        }
        assert_eq!(
            decrypt_frame(&key(), &enc).unwrap(),
            ("hello".to_owned(), APP_ID.to_owned())
        );
    }

    #[test]
    fn refuses_a_non_utf8_message() {
        let mut body = vec![b'h', 0xff];
        body.extend_from_slice(APP_ID.as_bytes());
        let plain = frame(2, &body, &[24; 24]);
        assert_eq!(
            decrypt(&key(), &encrypt_raw(&key(), &plain), APP_ID),
            Err(DecryptError::Utf8)
        );
    }

    #[test]
    fn a_key_of_43_as_is_all_zero_and_works() {
        let zero = AesKey::from_encoding(&"A".repeat(43)).unwrap();
        assert_eq!(zero.as_bytes(), &[0u8; 32]);
        assert_eq!(zero.iv(), [0u8; 16]);
        let enc = encrypt(&zero, RANDOM, "<xml/>", APP_ID);
        assert_eq!(decrypt(&zero, &enc, APP_ID).unwrap(), "<xml/>");
        assert!(decrypt(&key(), &enc, APP_ID).is_err());
    }

    #[test]
    fn error_messages_do_not_quote_the_input() {
        let errors = [
            DecryptError::Base64,
            DecryptError::Length,
            DecryptError::Padding,
            DecryptError::Frame,
            DecryptError::AppId,
            DecryptError::Utf8,
        ];
        for err in errors {
            let text = err.to_string();
            assert!(!text.is_empty() && text.len() < 60, "{text}");
        }
    }

    #[test]
    fn key_ring_reports_the_key_that_worked() {
        let old = AesKey::from_encoding("0ldKeyBeforeRotationXyz9876543210abcdefghIJ").unwrap();
        let ring = KeyRing {
            current: key(),
            previous: Some(old.clone()),
        };
        let by_current = encrypt(&key(), RANDOM, "new", APP_ID);
        let by_previous = encrypt(&old, RANDOM, "old", APP_ID);
        assert_eq!(
            ring.decrypt(&by_current, APP_ID).unwrap(),
            ("new".to_owned(), KeySlot::Current)
        );
        assert_eq!(
            ring.decrypt(&by_previous, APP_ID).unwrap(),
            ("old".to_owned(), KeySlot::Previous)
        );

        let current_err = decrypt(&key(), &by_previous, APP_ID).unwrap_err();
        let only_current = KeyRing {
            current: key(),
            previous: None,
        };
        assert_eq!(
            only_current.decrypt(&by_previous, APP_ID).unwrap_err(),
            current_err
        );
        // Both keys fail: the previous key would say AppId, the current key's error wins.
        let other_app = "wx0000000000000000";
        assert_eq!(
            decrypt(&old, &by_previous, other_app),
            Err(DecryptError::AppId)
        );
        assert_eq!(
            ring.decrypt(&by_previous, other_app).unwrap_err(),
            current_err
        );
        assert_ne!(current_err, DecryptError::AppId);
    }

    proptest! {
        #[test]
        fn round_trips_any_text_and_appid(
            msg in any::<String>(),
            app_id in "[A-Za-z0-9]{0,40}",
            random in any::<[u8; 16]>(),
            key_bytes in any::<[u8; 32]>(),
        ) {
            let key = AesKey::from_bytes(key_bytes);
            let enc = encrypt(&key, &random, &msg, &app_id);
            prop_assert_eq!(decrypted_len(&enc) % PAD_BLOCK, 0);
            prop_assert_eq!(decrypt(&key, &enc, &app_id).unwrap(), msg.clone());
            prop_assert_eq!(decrypt_frame(&key, &enc).unwrap(), (msg, app_id));
        }

        #[test]
        fn decrypt_never_panics_on_any_string(s in any::<String>()) {
            let _ = decrypt(&key(), &s, APP_ID);
        }

        #[test]
        fn decrypt_never_panics_on_any_ciphertext(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decrypt(&key(), &STANDARD.encode(&bytes), APP_ID);
        }

        #[test]
        fn decrypt_never_panics_on_block_aligned_ciphertext(blocks in proptest::collection::vec(any::<[u8; 16]>(), 1..8)) {
            let _ = decrypt(&key(), &STANDARD.encode(blocks.concat()), APP_ID);
        }
    }
}
