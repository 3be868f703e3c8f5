//! Reloading the configuration file: validate it whole, swap it in
//! atomically, tell the dispatcher, and retire the removed targets' work.

use crate::config::{ConfigError, Settings};
use crate::deliver::Dispatcher;
use crate::metrics::Metrics;
use crate::spool::SpoolError;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;

/// What a reload reads and changes: the running configuration (a request
/// keeps the view it started with) and the dispatcher that follows it.
pub struct Reloader {
    config: Arc<ArcSwap<Settings>>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    /// Where the configuration is reloaded from; `None` when it came from elsewhere.
    config_path: Option<PathBuf>,
    /// Serialises reloads, so two at once cannot interleave.
    reloading: tokio::sync::Mutex<()>,
    /// Whether the relay started with the trail on: only then is its store
    /// open (its key read), so only then can a reload turn it on.
    trail_opened: bool,
}

impl Reloader {
    pub fn new(
        config: Arc<ArcSwap<Settings>>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        config_path: Option<PathBuf>,
    ) -> Reloader {
        let trail_opened = config.load().trail.enabled;
        Reloader {
            trail_opened,
            config,
            dispatcher,
            metrics,
            config_path,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether there is a file to reload from.
    pub fn has_file(&self) -> bool {
        self.config_path.is_some()
    }
}

impl Reloader {
    /// Loads, validates and swaps in the configuration file. An invalid file
    /// changes nothing: the running configuration stays, the reasons are
    /// returned and logged, and the failure is counted. A valid file is
    /// taken whole; what of it waits for the next start is returned (and
    /// logged), empty when nothing does.
    pub async fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload().await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        match &result {
            Ok(later) => {
                for what in later {
                    tracing::warn!("{what} take effect at the next start only");
                }
                tracing::info!("configuration reloaded")
            }
            Err(e) => {
                tracing::error!(reasons = %e, "configuration reload refused; the running configuration stays")
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let next = Settings::load(path)?;
        let current = self.config.load();
        if next.trail.enabled && !self.trail_opened {
            return Err(ReloadError::RestartNeeded(
                "[trail] enabled = true: the relay started with the trail off, so its store is \
                 not open; restart the relay to turn the trail on (or set enabled = false)",
            ));
        }
        let later = waiting_for_a_start(&current, &next);
        let next = Arc::new(next);
        self.config.store(next.clone());
        self.dispatcher.reconfigured();
        // After the swap, so no worker starts on a removed target again; a
        // request still finishing under the previous view is caught by the
        // workers' periodic retire.
        self.dispatcher.retire_removed_targets(&next).await?;
        Ok(later)
    }
}

/// The changes from `current` to `next` that only a start applies: the
/// listeners and their bounds, the spool, traces, and the settings the
/// trail's store was opened with.
fn waiting_for_a_start(current: &Settings, next: &Settings) -> Vec<&'static str> {
    let (s, n) = (&current.server, &next.server);
    let (t, u) = (&current.trail, &next.trail);
    let secret = |k: &Option<crate::config::Secret>| k.as_ref().map(|k| k.expose().to_owned());
    let changes = [
        (
            s.listen != n.listen
                || s.admin_listen != n.admin_listen
                || s.max_connections != n.max_connections
                || s.max_body_bytes_in_flight != n.max_body_bytes_in_flight,
            "listen, admin_listen, max_connections and max_body_bytes_in_flight",
        ),
        (
            current.spool.backend != next.spool.backend,
            "the spool's backend and location",
        ),
        (current.telemetry != next.telemetry, "[telemetry]"),
        (
            secret(&t.key) != secret(&u.key)
                || t.keep_bodies != u.keep_bodies
                || t.retain != u.retain
                || t.max_events != u.max_events
                || t.max_refusals != u.max_refusals,
            "[trail] key, keep_bodies, retain, max_events and max_refusals",
        ),
    ];
    changes
        .into_iter()
        .filter_map(|(changed, what)| changed.then_some(what))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the relay was not started from a configuration file")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A change that takes a restart, refused whole.
    #[error("{0}")]
    RestartNeeded(&'static str),
}
