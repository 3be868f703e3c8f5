//! A configured secret: a token, an EncodingAESKey, a signing secret.
//!
//! The value is reachable only through [`Secret::expose`], so it cannot reach a
//! log line, an error message or `wxrelay check` by way of `Debug` or `Display`.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;

/// A string that prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the code that signs, verifies or decrypts with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A hand-written visitor rather than a derive: serde's own error for a
        // wrong type quotes the value it found, and that value is the secret.
        struct SecretVisitor;

        impl Visitor<'_> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(digits_only())
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(digits_only())
            }
        }

        deserializer.deserialize_str(SecretVisitor)
    }
}

/// An environment variable whose value is only digits arrives as a number;
/// turning it back into a string would silently drop leading zeros.
fn digits_only<E: de::Error>() -> E {
    E::custom(
        "expected a string, found a number (quote a value made only of digits, e.g. \"0123\")",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("Relay2024Token");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(secret.to_string(), "***");
        assert_eq!(secret.expose(), "Relay2024Token");
    }
}
