//! The operator's commands beside `serve` and `check`. Each is a library
//! function that returns what it would print, so tests run it as the binary
//! does; `main.rs` only parses arguments, prints and picks the exit status.
//!
//! - [`simulate`]: send a push (or the URL check) exactly as WeChat would, to
//!   see a deployed relay accept it end to end.
//! - [`route`]: say which rule and targets a push would get, without sending.
//! - [`dlq`]: list, inspect, replay and purge dead letters in the spool file,
//!   safely while the relay runs.
//! - [`pending`]: list a target's pending deliveries, or make them due now,
//!   safely while the relay runs.
//! - [`migrate`]: bring a PostgreSQL spool's schema up to date ahead of a
//!   rollout.
//! - [`keygen`]: a fresh Token and EncodingAESKey for a new account or a
//!   `format = "wechat"` target.
//! - [`target`]: check that a `wechat` target holds the Token the relay
//!   signs with (WeChat's URL check).
//! - [`sink`]: a local target that prints what it receives.
//! - [`ticket`]: an Open Platform's latest `component_verify_ticket` and
//!   its age.
//! - [`trail`]: what became of a push, and redelivering a retained one.
//!
//! None of them prints message content or an OpenID unless asked to (the sink
//! prints what it is sent: that is what it is for).

pub mod dlq;
pub mod keygen;
pub mod migrate;
pub mod pending;
pub mod route;
pub mod simulate;
pub mod sink;
pub mod target;
pub mod ticket;
pub mod trail;

use crate::config::{Account, ConfigError, Settings};
use std::path::{Path, PathBuf};

/// Why a command did not run to the end. [`CliError::Config`] and
/// [`CliError::Usage`] are the operator's to fix before trying again.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{}: invalid configuration\n{source}", path.display())]
    Config { path: PathBuf, source: ConfigError },
    /// The command line asks for something the configuration cannot give.
    #[error("{0}")]
    Usage(String),
    /// The command ran and failed: the relay or the spool could not be used.
    #[error("{0}")]
    Failed(String),
}

/// What a command printed and whether it got what it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub text: String,
    pub ok: bool,
}

/// Loads and validates the configuration, as `serve` does.
pub fn load(path: &Path) -> Result<Settings, CliError> {
    Settings::load(path).map_err(|source| CliError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// The account named by `--account`, or the only one when it is omitted.
pub fn account<'s>(settings: &'s Settings, id: Option<&str>) -> Result<&'s Account, CliError> {
    let ids = || {
        let ids: Vec<&str> = settings.accounts.keys().map(String::as_str).collect();
        ids.join(", ")
    };
    match id {
        Some(id) => settings.accounts.get(id).ok_or_else(|| {
            CliError::Usage(format!(
                "no account {id:?} in the configuration (it has: {})",
                ids()
            ))
        }),
        None => match settings.accounts.values().collect::<Vec<_>>().as_slice() {
            [only] => Ok(only),
            _ => Err(CliError::Usage(format!(
                "--account is required: the configuration has {}",
                ids()
            ))),
        },
    }
}
