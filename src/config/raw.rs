//! The config file as written: every section `deny_unknown_fields`, and almost
//! every value optional or a plain string. Types are loose on purpose: serde
//! stops at its first error, while [`super::validate`] reports every problem at
//! once with its key path, so the checks live there.

use super::Secret;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub spool: RawSpool,
    #[serde(default)]
    pub accounts: BTreeMap<String, RawAccount>,
    #[serde(default)]
    pub targets: BTreeMap<String, RawTarget>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub trail: RawTrail,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrail {
    pub enabled: Option<bool>,
    pub key: Option<Secret>,
    pub key_file: Option<PathBuf>,
    pub keep_bodies: Option<bool>,
    pub retain: Option<String>,
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub max_events: Option<i64>,
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub search_rows: Option<i64>,
    /// Signed, as `max_events`.
    pub max_refusals: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub max_body: Option<StringOrNumber>,
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub max_connections: Option<i64>,
    pub max_body_bytes_in_flight: Option<StringOrNumber>,
    pub reply_budget: Option<String>,
    pub header_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub admin_token: Option<Secret>,
    pub admin_token_file: Option<PathBuf>,
    pub allow_unauthenticated_admin: Option<bool>,
    pub ui_secure_cookie: Option<bool>,
    pub admin_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpool {
    pub backend: Option<String>,
    pub path: Option<PathBuf>,
    pub dedup_window: Option<String>,
    pub url: Option<Secret>,
    pub url_file: Option<PathBuf>,
    pub schema: Option<String>,
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub pool_size: Option<i64>,
    pub sslmode: Option<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccount {
    /// The callback family: official_account (the default), mini_program,
    /// open_platform or wecom.
    pub kind: Option<String>,
    pub app_id: Option<String>,
    /// `kind = "wecom"`: the receive id, a CorpID or SuiteID.
    pub corp_id: Option<String>,
    /// `kind = "mini_program"`: xml (the default) or json.
    pub data_format: Option<String>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub encoding_aes_key: Option<Secret>,
    pub previous_encoding_aes_key: Option<Secret>,
    pub mode: Option<String>,
    pub timestamp_window: Option<String>,
    /// WeChat's server API: what late replies are sent through.
    pub api: Option<RawApi>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApi {
    pub app_secret: Option<Secret>,
    pub app_secret_file: Option<PathBuf>,
    pub api_base: Option<String>,
    /// stable_token (the default) or url.
    pub token_source: Option<String>,
    /// `token_source = "url"`: the central token service.
    pub token_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTarget {
    pub url: Option<String>,
    pub format: Option<String>,
    pub retry: Option<String>,
    pub retry_schedule: Option<Vec<String>>,
    pub timeout: Option<String>,
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub concurrency: Option<i64>,
    pub secret: Option<Secret>,
    pub paused: Option<bool>,
    /// A duration, or "off".
    pub max_age: Option<String>,
    pub ordering: Option<String>,
    pub breaker: Option<RawBreaker>,
    /// `format = "wechat"`: the WeChat server the target is told it is.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub encoding_aes_key: Option<Secret>,
    pub previous_encoding_aes_key: Option<Secret>,
    pub app_id: Option<String>,
    /// The receive id WeCom events are sealed for.
    pub corp_id: Option<String>,
    pub mode: Option<String>,
    /// Adapters for brokers that read WeChat's events their own way.
    pub event_key: Option<String>,
    pub subscribe_as_scan: Option<bool>,
    pub content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    /// Signed so that `-1` is reported as out of range, not as a type error.
    pub failures: Option<i64>,
    pub backoff: Option<String>,
    pub max_backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub to: Option<Vec<String>>,
    pub reply_from: Option<String>,
    /// none (the default), customer_service or next_message.
    pub late_reply: Option<String>,
    pub late_reply_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub account: Option<OneOrMany>,
    pub msg_type: Option<OneOrMany>,
    pub event: Option<OneOrMany>,
    pub event_key: Option<OneOrMany>,
    pub event_key_prefix: Option<OneOrMany>,
    pub has_ticket: Option<bool>,
    pub from_user: Option<OneOrMany>,
    pub appid: Option<OneOrMany>,
    pub agent_id: Option<OneOrMany>,
    pub info_type: Option<OneOrMany>,
}

/// A match value: `"subscribe"` or `["subscribe", "SCAN"]`.
#[derive(Debug)]
pub(crate) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;

        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut values = Vec::new();
                while let Some(value) = seq.next_element::<String>()? {
                    values.push(value);
                }
                Ok(OneOrMany(values))
            }
        }

        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// `max_body = 65536` and `max_body = "64KiB"` both read naturally, and an
/// environment variable holding only digits arrives as a number.
#[derive(Debug)]
pub(crate) struct StringOrNumber(pub String);

impl<'de> Deserialize<'de> for StringOrNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringOrNumberVisitor;

        impl Visitor<'_> for StringOrNumberVisitor {
            type Value = StringOrNumber;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256KiB\" or a number of bytes")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StringOrNumber, E> {
                Ok(StringOrNumber(v.to_string()))
            }
        }

        deserializer.deserialize_any(StringOrNumberVisitor)
    }
}
