//! Waking the workers of other replicas when deliveries become due.
//!
//! A process wakes its own workers in-process; the others hear of it by
//! `LISTEN`/`NOTIFY` on a channel named after the schema, the payload the
//! targets' names. `NOTIFY` takes a database-wide lock while its transaction
//! commits, so it is never sent in a push's commit: the targets made due
//! are collected and sent at most once per [`DEBOUNCE`], in a statement of
//! its own. A notification lost (the listener reconnecting, a debounce
//! window still open) costs only latency: every worker also polls.
//!
//! The payload starts with the sending replica's id and a `|`: a replica
//! hears its own notifications too, and drops them, its workers already
//! woken in-process (woken again, they would lease for nothing). A payload
//! without the id (from a relay of an earlier version) wakes every target
//! it names; such a relay reads the id as part of the first target's name,
//! which it does not know, so that target waits for its next poll.

use super::connect::CONNECT_TIMEOUT;
use crate::spool::DueWaker;
use deadpool_postgres::Pool;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

/// At most one `NOTIFY` per this, per process.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// `NOTIFY` payloads must stay under 8000 bytes.
const PAYLOAD_MAX: usize = 7_000;
/// Waits between attempts to reconnect the listener, at most.
pub(super) const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Collects the targets made due and announces them.
#[derive(Clone)]
pub(super) struct Notifier {
    inner: Arc<Pending>,
}

struct Pending {
    pool: Pool,
    channel: String,
    /// This replica's id, which starts every payload it sends.
    replica: String,
    targets: Mutex<BTreeSet<String>>,
    signal: Notify,
}

impl Notifier {
    pub(super) fn new(pool: Pool, channel: String, replica: String) -> Self {
        Self {
            inner: Arc::new(Pending {
                pool,
                channel,
                replica,
                targets: Mutex::default(),
                signal: Notify::new(),
            }),
        }
    }

    /// These targets have deliveries due now.
    pub(super) fn due(&self, targets: impl IntoIterator<Item = String>) {
        let mut pending = self.inner.targets.lock().unwrap_or_else(|e| e.into_inner());
        let before = pending.len();
        pending.extend(targets);
        if pending.len() > before {
            self.inner.signal.notify_one();
        }
    }

    /// Sends what is pending, once per [`DEBOUNCE`] at most, until aborted.
    pub(super) async fn run(self) {
        loop {
            self.inner.signal.notified().await;
            self.flush().await;
            tokio::time::sleep(DEBOUNCE).await;
        }
    }

    /// Sends what is pending now (also when the spool closes).
    pub(super) async fn flush(&self) {
        let targets =
            std::mem::take(&mut *self.inner.targets.lock().unwrap_or_else(|e| e.into_inner()));
        if targets.is_empty() {
            return;
        }
        let Pending {
            pool,
            channel,
            replica,
            ..
        } = &*self.inner;
        for payload in payloads(replica, targets) {
            let channel = channel.clone();
            let sent = super::on_connection(pool, "notify", move |client| {
                Box::pin(async move {
                    client
                        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                        .await?;
                    Ok(())
                })
            })
            .await;
            if let Err(e) = sent {
                tracing::debug!(error = %crate::error_chain(&e), "cannot notify the other replicas; they poll");
            }
        }
    }
}

/// `replica|` and target names joined by commas, split to fit a payload.
fn payloads(replica: &str, targets: BTreeSet<String>) -> Vec<String> {
    let start = format!("{replica}|");
    let mut payloads = vec![start.clone()];
    for target in targets {
        let last = payloads.last().map_or(0, |p| p.len());
        if last + target.len() + 1 > PAYLOAD_MAX {
            payloads.push(start.clone());
        }
        if let Some(p) = payloads.last_mut() {
            if p.len() > start.len() {
                p.push(',');
            }
            p.push_str(&target);
        }
    }
    payloads
}

/// The targets a payload names, unless this replica sent it.
fn heard<'p>(payload: &'p str, replica: &str) -> Option<&'p str> {
    match payload.split_once('|') {
        Some((sender, _)) if sender == replica => None,
        Some((_, targets)) => Some(targets),
        None => Some(payload),
    }
}

/// Listens on `channel` on a connection of its own, waking the named
/// targets' workers, and reconnects whenever the connection drops; runs
/// until aborted.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channel: String,
    replica: String,
    wake: DueWaker,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls.clone())).await {
            Ok(Ok((client, mut connection))) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let _ = tx.send(n.payload().to_owned());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Some(e),
                            None => return None,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        tracing::debug!(channel, "listening for deliveries due on other replicas");
                        while let Some(payload) = rx.recv().await {
                            if let Some(targets) = heard(&payload, &replica) {
                                targets.split(',').for_each(&wake);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other replicas' deliveries")
                    }
                }
                drop(client);
                match driver.await {
                    Ok(Some(e)) => {
                        tracing::warn!(error = %e, "the listening connection dropped; reconnecting")
                    }
                    // The listener fails with it (see `Supervision`).
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Ok(None) | Err(_) => {}
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot connect to listen for other replicas' deliveries")
            }
            Err(_) => {
                tracing::warn!("cannot connect to listen for other replicas' deliveries: timed out")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_drops_its_own_payloads_and_hears_the_others_and_the_older() {
        let targets = BTreeSet::from(["broker".to_owned(), "hooks".to_owned()]);
        let sent = payloads("r1", targets);
        assert_eq!(sent, ["r1|broker,hooks"]);
        assert_eq!(heard(&sent[0], "r1"), None);
        assert_eq!(heard(&sent[0], "r2"), Some("broker,hooks"));
        assert_eq!(heard("broker,hooks", "r1"), Some("broker,hooks"));
    }

    #[test]
    fn every_split_payload_names_its_replica() {
        let targets: BTreeSet<String> = (0..2_000).map(|i| format!("target_{i:04}")).collect();
        let sent = payloads("r1", targets.clone());
        assert!(sent.len() > 1);
        let mut named = BTreeSet::new();
        for payload in &sent {
            assert!(payload.len() <= PAYLOAD_MAX);
            assert_eq!(heard(payload, "r1"), None);
            named.extend(heard(payload, "r2").unwrap().split(',').map(str::to_owned));
        }
        assert_eq!(named, targets);
    }
}
