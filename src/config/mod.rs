//! `relay.toml`: loading, validation, and the report of `wxrelay check`.
//!
//! The contract: [`Settings::load`] reads the file, applies `WXRELAY_`
//! environment overrides, and either returns a [`Settings`] that the rest of
//! the relay can trust without re-checking, or a [`ConfigError`] listing every
//! problem found, each with its key path (`accounts.main.encoding_aes_key:
//! must be 43 characters, got 42`). Secrets are held in [`Secret`], whose
//! `Debug` and `Display` print `***`, so neither a `Settings` dump nor an
//! error message nor the `check` report ever shows a token, key or secret.
//!
//! Environment overrides name a key path with `__` between keys, e.g.
//! `WXRELAY_ACCOUNTS__MAIN__TOKEN` or `WXRELAY_SERVER__LISTEN`; keys are
//! lowercased and `__` splits them, which is why account ids and target names
//! must be lower-case and may neither contain `__` nor end in `_`. Variables
//! without `__` (`WXRELAY_LOG`, …) are not config keys and are left alone. A value made only of digits is read as a number: quote
//! it (`"0123"`) where a string is expected.
//!
//! Layout: `raw` is the file as serde sees it; `validate` turns it into
//! [`Settings`]; `check` renders the report.

mod check;
mod raw;
mod secret;
mod settings;
mod units;
mod validate;

pub use check::{masked_url, render_check};
pub use secret::Secret;
pub use settings::{
    decode_webhook_secret, Account, Adapters, Breaker, Format, Mode, Ordering, PostgresSettings,
    RetryClass, RetryPolicy, ServerSettings, Settings, SpoolBackend, SpoolSettings, SslMode,
    Target, TelemetrySettings, TrailSettings, WechatServer,
};

/// The environment variable the relay reads its log filter from
/// (`WXRELAY_LOG=debug`, or any `tracing` filter): not a config key.
pub const LOG_FILTER_ENV: &str = "WXRELAY_LOG";

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use std::fmt;
use std::path::Path;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "WXRELAY_";

/// Why a config was refused: every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", lines(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One thing wrong with the config, at a key path such as
/// `routes[2].reply_from` (empty when the problem is not about one key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        let problem = Problem {
            path: path.into(),
            message: message.into(),
        };
        Self {
            problems: vec![problem],
        }
    }
}

/// The sources [`Settings::load`] reads: the TOML file, then the `WXRELAY_`
/// environment variables on top.
pub fn figment_for(path: &Path) -> Figment {
    Figment::from(Toml::file_exact(path)).merge(env_overrides())
}

fn env_overrides() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

impl Settings {
    /// Reads `path` and the `WXRELAY_` environment, and validates the result.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        // figment treats a missing file as an empty one; that would surface
        // as "no accounts configured", which hides the real mistake.
        std::fs::File::open(path).map_err(|e| {
            ConfigError::one(
                path.display().to_string(),
                format!("cannot read config file: {e}"),
            )
        })?;
        Self::from_figment(figment_for(path))
    }

    /// Validates whatever `figment` provides.
    pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
        let raw = figment
            .extract::<raw::RawConfig>()
            .map_err(|error| ConfigError {
                problems: error.into_iter().map(problem_from_figment).collect(),
            })?;
        validate::settings(raw)
    }

    /// Validates a TOML document alone, without the environment.
    pub fn from_toml_str(toml: &str) -> Result<Settings, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)))
    }

    /// Things that are valid but probably not meant, for `check` and the log
    /// at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.routes.is_empty() {
            warnings.push("no routes: every event will be dead-lettered as `unrouted`".to_owned());
        } else if !self.routes.iter().any(|r| r.matcher.is_catch_all()) {
            warnings.push(
                "no catch-all rule: events that match no rule become `unrouted` dead letters"
                    .to_owned(),
            );
        }
        let server = &self.server;
        if server.admin_token.is_none() && !server.admin_listen.ip().is_loopback() {
            warnings.push(format!(
                "the admin API on {} has no token: anyone who reaches it can reload the configuration",
                server.admin_listen
            ));
        }
        for name in self.targets.keys() {
            if !self.routes.iter().any(|r| r.to.contains(name)) {
                warnings.push(format!("target {name:?} is not named by any route"));
            }
        }
        let reply_targets: std::collections::BTreeSet<&str> = self
            .routes
            .iter()
            .filter_map(|r| r.reply_from.as_deref())
            .collect();
        for name in reply_targets {
            if self.targets.get(name).map(|t| t.ordering) == Some(Ordering::PerUser) {
                warnings.push(format!(
                    "target {name:?} is a reply_from with ordering = \"per_user\": its inline \
                     reply attempt is not held back by the user's earlier deliveries"
                ));
            }
        }
        if let SpoolBackend::Postgres(pg) = &self.spool.backend {
            if pg.sslmode == SslMode::Require && pg.ca_file.is_none() {
                warnings.push(
                    "spool.sslmode = \"require\" encrypts but verifies nothing: whoever can \
                     intercept the connection can pose as the database; use \"verify-full\" \
                     (or \"verify-ca\" with ca_file)"
                        .to_owned(),
                );
            }
        }
        warnings.extend(self.shared_credentials());
        warnings
    }

    /// `wechat` targets that hold an account's own Token or key: the point of
    /// the format is that the broker never does.
    fn shared_credentials(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for target in self.targets.values() {
            let Some(server) = &target.wechat else {
                continue;
            };
            for account in self.accounts.values() {
                let keys = |ring: Option<&crate::wechat::crypto::KeyRing>| {
                    ring.map(|r| [Some(&r.current), r.previous.as_ref()])
                        .into_iter()
                        .flatten()
                        .flatten()
                        .cloned()
                        .collect::<Vec<_>>()
                };
                let account_keys = keys(account.keys.as_ref());
                let shares_key = keys(server.keys.as_ref())
                    .iter()
                    .any(|k| account_keys.contains(k));
                if server.token == account.token || shares_key {
                    warnings.push(format!(
                        "target {:?} uses account {:?}'s own Token or EncodingAESKey: give it \
                         its own (wxrelay keygen), so the broker never holds the account's",
                        target.name, account.id
                    ));
                }
            }
        }
        warnings
    }
}

/// A serde error as a problem at its key path. The message names the kind of
/// value found, never the value: it may be a secret.
fn problem_from_figment(error: figment::Error) -> Problem {
    use figment::error::{Actual, Kind};

    let mut keys = error.path.as_slice();
    // figment puts an unknown field's own name at the end of its path; the
    // table that does not know it is the place to look.
    if let (Kind::UnknownField(field, _), [table @ .., last]) = (&error.kind, keys) {
        if last == field {
            keys = table;
        }
    }
    let mut path = key_path(keys);
    let found = |actual: &Actual| match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "a number",
        Actual::Float(_) => "a decimal number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another kind of value",
    };
    let mut message = match &error.kind {
        Kind::Message(message) => message.clone(),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!("expected {expected}, found {}", found(actual))
        }
        Kind::InvalidLength(len, expected) => format!("expected {expected}, found {len} items"),
        Kind::UnknownVariant(variant, expected) => {
            format!(
                "unknown value `{variant}`, expected one of {}",
                ticked(expected)
            )
        }
        Kind::UnknownField(field, expected) => {
            format!(
                "unknown field `{field}`, expected one of {}",
                ticked(expected)
            )
        }
        Kind::MissingField(field) => {
            push_key(&mut path, field);
            "required".to_owned()
        }
        Kind::DuplicateField(field) => {
            push_key(&mut path, field);
            "set more than once".to_owned()
        }
        other => other.to_string(),
    };
    if let Some(metadata) = &error.metadata {
        if metadata.name.contains("environment") {
            message.push_str(&format!(" (from the {ENV_PREFIX} environment variables)"));
        }
    }
    Problem { path, message }
}

/// `["routes", "1", "match"]` → `routes[1].match`. Numbers under `accounts`
/// and `targets` are ids, not list indexes.
fn key_path(keys: &[String]) -> String {
    let mut path = String::new();
    let mut parent: Option<&str> = None;
    for key in keys {
        let is_index = key.bytes().all(|b| b.is_ascii_digit())
            && !matches!(parent, Some("accounts" | "targets") | None);
        if is_index {
            path.push_str(&format!("[{key}]"));
        } else {
            push_key(&mut path, key);
        }
        parent = Some(key);
    }
    path
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn ticked(names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn key_paths_bracket_list_indexes_only() {
        assert_eq!(
            key_path(&keys(&["routes", "1", "match"])),
            "routes[1].match"
        );
        assert_eq!(
            key_path(&keys(&["accounts", "123", "token"])),
            "accounts.123.token"
        );
        assert_eq!(
            key_path(&keys(&["targets", "t", "retry_schedule", "0"])),
            "targets.t.retry_schedule[0]"
        );
        assert_eq!(key_path(&[]), "");
    }

    #[test]
    fn display_is_one_problem_per_line() {
        let error = ConfigError {
            problems: vec![
                Problem {
                    path: "server.listen".into(),
                    message: "bad".into(),
                },
                Problem {
                    path: String::new(),
                    message: "worse".into(),
                },
            ],
        };
        assert_eq!(error.to_string(), "server.listen: bad\nworse");
    }

    #[test]
    fn type_errors_do_not_quote_the_value() {
        let err = Settings::from_toml_str("[accounts.main]\ntoken = 123456\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("accounts.main.token"), "{text}");
        assert!(!text.contains("123456"), "{text}");
    }
}
