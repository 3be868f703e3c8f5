//! WeChat's SHA-1 signatures.
//!
//! Every signature WeChat uses is the same construction: sort the parts
//! byte-wise, join them with no separator, and take the lower-case hex SHA-1.
//! `signature` covers `[token, timestamp, nonce]`; `msg_signature` (and the
//! `MsgSignature` of a reply envelope) covers `[token, timestamp, nonce, Encrypt]`.
//!
//! * `signature` is in the query of the URL check and of every push, in every
//!   mode. It proves the sender knows the Token and nothing more: the body is
//!   not part of it, so a captured query verifies with any body until its
//!   `timestamp` is too old for the account's freshness window.
//! * `msg_signature` is in the query of an encrypted push (`encrypt_type=aes`).
//!   Because it covers the `<Encrypt>` value, it is what binds the body to the
//!   query; it is checked before anything is decrypted, so a forged ciphertext
//!   never reaches the decryption code.
//! * `MsgSignature` in a reply envelope is made the same way by whoever seals
//!   the reply ([`crate::wechat::reply::envelope`]).
//!
//! The Token never leaves the server; only these digests do. `timestamp` and
//! `nonce` are sorted as text, like everything else: numbers do not sort as
//! their digits do, so a numeric or locale-aware sort gives another digest.
//!
//! A check compares the whole digest in constant time ([`verify`]). An `==`
//! on strings stops at the first differing byte, and the time that takes tells
//! an attacker how many leading characters of a forged signature were right.

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// The lower-case hex SHA-1 of `parts` sorted byte-wise and concatenated.
///
/// The sort is on bytes, not numbers: base64's `+`, `/` and `=` sort before
/// digits, and timestamps and nonces are compared as text.
///
/// ```
/// use wxrelay::wechat::signature::{sign, verify};
///
/// // WeChat's GET check: signature = sign([token, timestamp, nonce]).
/// let parts = ["AAAAA", "1714036504", "1514711492"];
/// assert_eq!(sign(&parts), "f464b24fc39322e44b38aa78f5edd27bd1441696");
/// assert!(verify("f464b24fc39322e44b38aa78f5edd27bd1441696", &parts));
/// ```
pub fn sign(parts: &[&str]) -> String {
    let mut sorted = parts.to_vec();
    // `str`'s `Ord` is byte-wise lexicographic, which is what WeChat does.
    sorted.sort_unstable();
    let mut hasher = Sha1::new();
    for part in sorted {
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Whether `expected` is the signature of `parts`, compared in constant time.
///
/// `expected` must be the lower-case hex WeChat sends; anything else
/// (another length, upper case) is simply not a match.
pub fn verify(expected: &str, parts: &[&str]) -> bool {
    sign(parts).as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_byte_wise_sorted_concatenation() {
        // sha1("abc")
        assert_eq!(
            sign(&["c", "a", "b"]),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn base64_punctuation_sorts_before_digits() {
        // A numeric or locale-aware sort would put "9" first; bytes put '+' (0x2b)
        // and '/' (0x2f) before '0' (0x30).
        let parts = ["9", "/x", "+y", "10"];
        let expected = {
            let mut hasher = Sha1::new();
            hasher.update(b"+y/x109");
            hex::encode(hasher.finalize())
        };
        assert_eq!(sign(&parts), expected);
    }

    #[test]
    fn timestamps_sort_as_text() {
        // As numbers 9 < 10; as text "10" < "9", and text is what WeChat sorts.
        let mut hasher = Sha1::new();
        hasher.update(b"109");
        assert_eq!(sign(&["9", "10"]), hex::encode(hasher.finalize()));
    }

    #[test]
    fn verify_accepts_only_the_exact_lower_case_signature() {
        let parts = ["test", "1410685589", "test"];
        let good = "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff";
        assert!(verify(good, &parts));
        assert!(!verify("f21891de399b4e33a1a93c9a7b8a8fffb5a443fe", &parts));
        assert!(!verify(&good.to_uppercase(), &parts));
        assert!(!verify(&good[..39], &parts));
        assert!(!verify("", &parts));
        assert!(!verify(&format!("{good}0"), &parts));
    }
}
