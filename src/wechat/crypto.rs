//! WeChat's AES-256-CBC frame and the EncodingAESKey.

use base64::alphabet;
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
}
