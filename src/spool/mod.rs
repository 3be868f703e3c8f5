//! The spool: where every accepted push waits until each of its targets has it.
//!
//! # Contract
//!
//! - [`Intake::enqueue`] resolves `Ok` only once the event, its deliveries and its
//!   dedup key are durable: for the SQLite spool, committed in WAL mode with
//!   `synchronous=FULL`, so the commit survives `kill -9` and power loss. The
//!   handler answers WeChat only after that, so a crash can lose nothing that
//!   WeChat was told `success` for. Concurrent enqueues share one commit.
//! - The dedup key is inserted in the same transaction as the deliveries and is
//!   unique: of two racing enqueues with one key, exactly one is stored and the
//!   other resolves to [`Enqueued::Duplicate`]. A key expires after the spool's
//!   dedup window.
//! - A replay guard, when the event has one, is checked and recorded in the
//!   same transaction, before the dedup key: a guard key already recorded
//!   with another body hash and not expired makes the enqueue resolve to
//!   [`Enqueued::Replayed`] with nothing stored; with the same body hash the
//!   dedup key decides as usual. Of two racing enqueues with one guard key and
//!   different bodies, exactly one gets past it.
//! - A delivery is handed out by [`Work::lease`] only when due, and is hidden
//!   until it is settled or the lease duration ends: if its worker dies, or
//!   its outcome cannot be written, it is due again when the lease ends, or at
//!   the next start after a crash (at least once, never silently dropped).
//! - Each lease carries a fresh [`LeaseToken`], and an outcome is recorded
//!   with the token of the lease its attempt was made under: once the
//!   delivery has been leased again (the first lease ended and another worker,
//!   perhaps on another replica, took it), the late outcome changes nothing.
//! - A delivery with an order key is not leased while an earlier delivery
//!   (a lower id) of the same target with the same key is pending, leased or
//!   backing off; delivered and dead-lettered ones do not hold it back.
//! - A delivery ends in exactly one of two ways: delivered (removed with its
//!   event once no delivery of the event remains), or dead-lettered with a
//!   reason, where it stays until an operator replays or purges it. A
//!   delivered outcome also settles a delivery retired while its attempt was
//!   in flight (reason `target_removed`): the target has it, so a replay
//!   would send it twice.
//! - An event routed to no target is stored as a dead letter with reason
//!   `unrouted`, with no target.

//! - Every task a spool runs (writers, readers, settlers, pruners,
//!   listeners) is supervised: one that panics, or ends while the spool is
//!   open, fails the spool ([`Supervision`]); every operation then answers
//!   [`SpoolError::Failed`], and the relay stops so that its supervisor
//!   starts it again.
//!
//! - An Open Platform's `component_verify_ticket` is kept per account, the
//!   one with the newest `CreateTime` (see [`Tickets`]): durable when
//!   [`Tickets::keep`] resolves, and shared by every replica of the spool.
//!
//! # Roles
//!
//! A spool is handed out by [`OpenSpool`] in roles, one per audience, and
//! each component takes only the roles it uses: ingest [`Intake`], the
//! delivery workers [`Work`], the operator's commands [`Operator`],
//! readiness and metrics [`Health`], the workers' wake-ups from other
//! replicas [`DueListener`], and an Open Platform's ticket [`Tickets`].

mod backend;
pub mod late;
mod migration;
pub mod postgres;
mod rows;
mod sqlite;
mod supervise;
mod trail_rows;
pub mod vocab;

pub use backend::OpenSpool;
#[cfg(any(test, feature = "test-util"))]
pub use backend::FAIL_WRITER_VAR;
pub use late::{
    ApiToken, DeadLateReply, HeldLateReply, LateOutcome, LateReplies, LateReplyId, NewLateReply,
};
pub use migration::Migrated;
pub use postgres::{postgres_display, PostgresSpool};
pub use sqlite::SqliteSpool;
pub use supervise::Supervision;

use crate::trail::{
    TrailAttempt, TrailEvent, TrailFilter, TrailFound, TrailKey, TrailNote, TrailPush,
};
use crate::wechat::family::Origin;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Defines an id the spool assigns: a row id, a number only at the SQL,
/// log and command-line edges.
macro_rules! spool_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

spool_id!(
    /// An event's id in the spool.
    EventId
);
spool_id!(
    /// A delivery's id in the spool: one event has one per target.
    DeliveryId
);

/// Which lease of a delivery an attempt was made under; [`Work::record`]
/// ignores an outcome whose delivery has since been leased again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseToken(pub i64);

impl LeaseToken {
    /// The token of a delivery never leased: what the request path's inline
    /// attempt records under, before any worker may take the delivery.
    pub const NONE: LeaseToken = LeaseToken(0);
}

/// A point in time, as unix milliseconds: how the spool stores, compares and
/// schedules times. Spans between two are plain milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct UnixMs(pub i64);

impl UnixMs {
    /// The same instant; one before 1970 is taken as 1970.
    pub fn to_system_time(self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.0.max(0) as u64)
    }
}

impl std::ops::Add<i64> for UnixMs {
    type Output = UnixMs;

    fn add(self, ms: i64) -> UnixMs {
        UnixMs(self.0.saturating_add(ms))
    }
}

impl std::ops::Add<Duration> for UnixMs {
    type Output = UnixMs;

    /// A span later, to the millisecond.
    fn add(self, span: Duration) -> UnixMs {
        self + i64::try_from(span.as_millis()).unwrap_or(i64::MAX)
    }
}

impl std::ops::Sub for UnixMs {
    type Output = i64;

    /// Milliseconds from `earlier` to `self`.
    fn sub(self, earlier: UnixMs) -> i64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A spool operation in flight; resolves once its effect is durable.
pub type SpoolFuture<T> = Pin<Box<dyn Future<Output = Result<T, SpoolError>> + Send>>;

/// Deliveries being leased ([`Work::lease`]).
pub type Leases = SpoolFuture<Vec<Lease>>;

/// What caused a storage error: shared, as one failed commit answers every
/// request of its batch.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The file or the database failed; `source` is the driver's error (and
    /// its own causes), when there is one: [`crate::error_chain`] prints it all.
    #[error("spool storage: {what}")]
    Storage {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("spool is closed")]
    Closed,
    #[error("spool is busy: too many requests waiting to be stored")]
    Busy,
    #[error("the spool file {0} was removed or replaced; restart the relay")]
    Gone(String),
    /// The database's schema cannot be used by this binary: newer than it
    /// knows, or older and not migrated yet.
    #[error("spool schema: {0}")]
    Schema(String),
    /// One of the spool's tasks panicked or ended: the relay must be
    /// restarted (see [`Supervision`]).
    #[error("a spool task failed: {0}")]
    Failed(Arc<str>),
    /// The operation cannot be done, for the reason given (no secret in it).
    #[error("{0}")]
    Refused(String),
    /// The operation was declined, or stopped, at a bound that keeps the
    /// database free for the queue (the reason given): later, or narrowed,
    /// it may succeed.
    #[error("{0}")]
    Limited(String),
}

impl SpoolError {
    /// A storage error with no cause beyond its text.
    pub(crate) fn storage(what: impl Into<String>) -> Self {
        SpoolError::Storage {
            what: what.into(),
            source: None,
        }
    }

    /// A storage error caused by `source`.
    pub(crate) fn caused(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        SpoolError::Storage {
            what: what.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl From<rusqlite::Error> for SpoolError {
    fn from(e: rusqlite::Error) -> Self {
        SpoolError::caused("the spool file", e)
    }
}

/// A verified push to store, with a delivery per target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event as it will be stored; the spool gives it its id.
    pub event: Event,
    /// One delivery per target; empty means the event matched no route.
    pub targets: Vec<NewDelivery>,
    /// Set when the request's signature does not cover its body.
    pub replay: Option<ReplayGuard>,
    /// What the trail keeps of it, while the trail is on: written in the
    /// same commit, whether the push is stored or a duplicate.
    pub trail: Option<Box<TrailPush>>,
}

/// A signed query whose signature does not cover the body: once taken with
/// one body, it is refused with any other until it would be stale anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayGuard {
    /// The account and the query's timestamp, nonce and signature.
    pub key: String,
    /// SHA-256 of the message the relay acts on (the decrypted XML of an
    /// encrypted push, the body of a plaintext one).
    pub body_hash: [u8; 32],
    /// Unix milliseconds from which the guard is forgotten: when the query
    /// is refused as stale anyway.
    pub expires_at: UnixMs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub target: String,
    /// Unix milliseconds when the delivery first becomes due. A reply target
    /// that the handler tries inline is due only after the reply budget, so
    /// that workers do not send it at the same time.
    pub due_at: UnixMs,
    /// Set for a target that takes one user's events in arrival order: the
    /// account and the sender. A delivery with a key is not leased while an
    /// earlier delivery (a lower id) of the same target and key is pending.
    pub order_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Stored {
        event_id: EventId,
        /// Delivery ids, in the order of [`NewEvent::targets`].
        deliveries: Vec<DeliveryId>,
        /// The event as stored, handed back rather than copied beforehand.
        event: Box<Event>,
    },
    Duplicate,
    /// The guard's query was already taken with another body: nothing stored.
    Replayed,
}

/// A due delivery handed to a worker, with the event it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub delivery_id: DeliveryId,
    pub target: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Where the delivery stands on its retry schedule.
    pub schedule: Schedule,
    pub event_id: EventId,
    pub event: Event,
    /// What the attempt's outcome is recorded under.
    pub token: LeaseToken,
}

/// A delivery's place on its retry schedule, kept apart from when it is next
/// due: a released backlog is sent before its schedule has it due, and an
/// attempt made that early neither uses up a step nor moves the schedule on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Failed attempts that counted against the schedule.
    pub step: u32,
    /// When the schedule has the next attempt, unix milliseconds.
    pub due_at: UnixMs,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Delivered {
        delivery_id: DeliveryId,
    },
    Retry {
        delivery_id: DeliveryId,
        next_at: UnixMs,
        /// The schedule after this attempt.
        schedule: Schedule,
        /// The target asked (Retry-After) not to be called before this, unix
        /// milliseconds; 0 when it did not.
        not_before: UnixMs,
        error: String,
    },
    /// Counts as an attempt, except with reason `expired`: that one was
    /// dead-lettered instead of sent.
    Dead {
        delivery_id: DeliveryId,
        reason: DeadReason,
        error: String,
    },
}

impl Settlement {
    pub fn delivery_id(&self) -> DeliveryId {
        match self {
            Settlement::Delivered { delivery_id }
            | Settlement::Retry { delivery_id, .. }
            | Settlement::Dead { delivery_id, .. } => *delivery_id,
        }
    }
}

/// An outcome to record, with the lease its attempt was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub lease: LeaseToken,
    pub settlement: Settlement,
    /// The attempt, for the trail (while it is on): written with the
    /// outcome, and only if the outcome is.
    pub trail: Option<Box<TrailAttempt>>,
}

/// A delivery in the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub delivery_id: DeliveryId,
    pub event_id: EventId,
    /// `None` for an event that matched no route.
    pub target: Option<String>,
    pub reason: DeadReason,
    pub last_error: String,
    pub attempts: u32,
    pub account: String,
    pub dedup_key: String,
    pub msg_type: String,
    pub event_type: Option<String>,
    pub received_at: UnixMs,
    /// When it was dead-lettered, unix milliseconds.
    pub dead_at: UnixMs,
}

/// Selects dead letters; every field narrows the selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    pub target: Option<String>,
    pub reason: Option<DeadReason>,
    /// Dead-lettered at or after, unix milliseconds.
    pub since: Option<UnixMs>,
    /// Dead-lettered before, unix milliseconds.
    pub until: Option<UnixMs>,
    pub delivery_id: Option<DeliveryId>,
}

/// A delivery still waiting for its target: one in the pending state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingDelivery {
    pub delivery_id: DeliveryId,
    pub event_id: EventId,
    pub attempts: u32,
    /// When it is next due, unix milliseconds; one being sent shows when it
    /// was due (leases are not listed).
    pub next_at: UnixMs,
    pub schedule: Schedule,
    /// Not to be sent before this (the target's Retry-After), unix
    /// milliseconds; 0 when the target did not ask.
    pub not_before: UnixMs,
    pub last_error: String,
}

/// Which waiting deliveries of one target to make due now. Only deliveries
/// that have failed are moved (one not tried yet keeps its time: a reply
/// target's delivery waits for its inline attempt); their schedule and
/// attempts stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub target: String,
    /// Only this delivery.
    pub delivery_id: Option<DeliveryId>,
    /// Also those the target asked, with Retry-After, not to be sent yet.
    pub past_retry_after: bool,
}

impl Release {
    /// A target's backed-off deliveries, sparing those held by Retry-After.
    pub fn backlog(target: &str) -> Self {
        Release {
            target: target.to_owned(),
            delivery_id: None,
            past_retry_after: false,
        }
    }
}

/// Pending work of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDepth {
    pub target: String,
    pub pending: u64,
    /// Unix milliseconds of the oldest pending event's arrival.
    pub oldest_received_at: Option<UnixMs>,
}

/// What ingest needs: storing pushes. See the module doc for the contract.
pub trait Intake: Send + Sync + 'static {
    /// Stores an event with its deliveries and dedup key, durably, in one
    /// commit; the key makes a push a duplicate for `window` (the dedup window).
    fn enqueue(&self, event: NewEvent, now: UnixMs, window: Duration) -> SpoolFuture<Enqueued>;
    /// Adds to the trail what is known only after a push's commit (its
    /// reply) or of a push never stored (a refusal). Nothing waits for it:
    /// it rides with the next commit, or is written without an fsync of its
    /// own. Returns false when it was dropped (the spool is busy or closed).
    fn note(&self, note: TrailNote) -> bool;
    /// The key the trail hashes OpenIDs with, once the trail is on.
    fn trail_key(&self) -> Option<TrailKey>;
}

/// What the command line and the pages use: the event trail.
pub trait TrailLog: Send + Sync + 'static {
    /// Events matching `filter`, newest first, each with its attempts and
    /// ends, and whether the search stopped at its cap of rows read
    /// ([`TrailFilter::scan`]). Never on the path that hands out leases.
    fn find(&self, filter: TrailFilter) -> SpoolFuture<TrailFound>;
    /// The events [`TrailLog::find`] finds.
    fn search(&self, filter: TrailFilter) -> SpoolFuture<Vec<TrailEvent>> {
        let found = self.find(filter);
        Box::pin(async move { found.await.map(|f| f.events) })
    }
    /// Sends a retained event to `target` again, as a new delivery. Refused (an error naming
    /// why) when the event is gone, or was delivered and its body was not kept.
    fn redeliver(&self, event_id: EventId, target: String, now: UnixMs) -> SpoolFuture<DeliveryId>;
}

/// What the relay turns the trail on with: the configured key, if any
/// (otherwise the spool's own), and how much to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailSetup {
    pub key: Option<TrailKey>,
    pub keep_bodies: bool,
    pub retain: Duration,
    pub max_events: u64,
    pub max_refusals: u64,
}

impl TrailSetup {
    pub(crate) fn store(self, key: TrailKey) -> TrailStore {
        TrailStore {
            key,
            keep_bodies: self.keep_bodies,
            retain: self.retain,
            max_events: self.max_events,
            max_refusals: self.max_refusals,
        }
    }
}

/// Where an engine's threads find the trail's settings: empty while the
/// trail is off, and then nothing of it is written.
pub(crate) type TrailSlot = Arc<arc_swap::ArcSwapOption<TrailStore>>;

/// How the spool keeps the trail, once the relay has turned it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailStore {
    pub key: TrailKey,
    /// Keep each push's message with its trail, for redelivery.
    pub keep_bodies: bool,
    /// Events older than this are pruned.
    pub retain: Duration,
    /// At most this many answered pushes are kept: the oldest are pruned.
    pub max_events: u64,
    /// At most this many refused pushes are kept, apart: a flood of
    /// refusals never evicts the answered pushes' history.
    pub max_refusals: u64,
}

/// What the delivery workers need: taking due deliveries, recording what
/// became of them, and the spool's side of a target's health.
pub trait Work: Send + Sync + 'static {
    /// Up to `n` due deliveries of `target`, each held (hidden from other
    /// leases) for `hold`: the lease's length.
    fn lease(&self, target: &str, now: UnixMs, n: usize, hold: Duration) -> Leases;
    /// Records what became of leased deliveries (see `deliver::retry::decide`),
    /// each only while its delivery holds no later lease than its own.
    fn record(&self, settlements: Vec<Settle>, now: UnixMs) -> SpoolFuture<()>;
    /// Makes every backed-off delivery of `target` due now (it answers
    /// again), sparing those held by Retry-After. Returns how many.
    fn release_backoff(&self, target: &str, now: UnixMs) -> SpoolFuture<u64>;
    /// Dead-letters every pending delivery whose target is not in `targets`,
    /// with reason [`DeadReason::TargetRemoved`]. Returns how many, per removed target.
    fn retire_targets(&self, targets: Vec<String>, now: UnixMs) -> SpoolFuture<Vec<(String, u64)>>;
}

/// What the operator's commands need: the dead letters, the waiting
/// deliveries, and the events they carry.
pub trait Operator: Send + Sync + 'static {
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>>;
    /// Makes the selected dead letters due again, with their attempts reset.
    /// Unrouted ones have no target and are left alone. Returns how many.
    fn replay(&self, filter: DeadFilter, now: UnixMs) -> SpoolFuture<u64>;
    /// Deletes the selected dead letters. Returns how many.
    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64>;
    /// The deliveries of `target` still waiting for it (pending, leased or
    /// not), soonest due first.
    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>>;
    /// Makes the selected deliveries due now, leaving their schedules as they
    /// are. Returns how many were waiting and now are due.
    fn release(&self, release: Release, now: UnixMs) -> SpoolFuture<u64>;
    /// The stored XML and fields of an event, while it is in the spool.
    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>>;
}

/// What readiness and the metrics read.
pub trait Health: Send + Sync + 'static {
    /// Checks that the spool still stores pushes: a real write through the
    /// writer that stores them, behind the pushes already waiting for it.
    fn probe(&self) -> SpoolFuture<()>;
    /// Pending work per target, for the gauges: a shared spool may answer
    /// with a reading a few seconds old.
    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>>;
}

/// Wake-ups for this process's workers when another process makes
/// deliveries due (a shared spool).
pub trait DueListener: Send + Sync + 'static {
    /// Wakes the named target's workers through `wake` from now on; a spool
    /// only this process writes has no use for it.
    fn on_due_elsewhere(&self, wake: DueWaker);
}

/// Wakes the local workers of the named target.
pub type DueWaker = Box<dyn Fn(&str) + Send + Sync>;

/// An Open Platform's `component_verify_ticket`: WeChat sends a new one
/// every 10 minutes, each valid for 12 hours, and the platform's every API
/// call needs the latest. Lost, the platform is stuck until the next one
/// (the SDKs' "works on one machine, breaks when distributed"), so it is
/// kept with the spool: durably, and shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentTicket {
    /// The Open Platform account it came to.
    pub account: String,
    /// The ticket, a credential of the platform: never logged.
    pub ticket: String,
    /// The push's `CreateTime` (unix seconds): the newest wins, whichever
    /// replica stores it first.
    pub create_time: i64,
    /// When the relay received it.
    pub received_at: UnixMs,
}

/// What the Open Platform's ticket needs: ingest keeps each one, the admin
/// API, `wxrelay ticket` and the metrics read the latest.
pub trait Tickets: Send + Sync + 'static {
    /// Stores `ticket` as its account's latest unless one with a later (or
    /// the same) `CreateTime` is kept already: durable when it resolves.
    /// Returns whether it is now the latest.
    fn keep(&self, ticket: ComponentTicket) -> SpoolFuture<bool>;
    /// Every account's latest ticket, by account.
    fn tickets(&self) -> SpoolFuture<Vec<ComponentTicket>>;
}

/// An event as the spool holds it: the request as WeChat sent it, and what
/// the relay made of it, so any target format can be built from it later.
/// Its id is the spool's, kept beside it ([`Enqueued::Stored`], [`Lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub dedup_key: String,
    pub account: String,
    /// Unix milliseconds.
    pub received_at: UnixMs,
    /// The request's query string, byte for byte.
    pub query: String,
    /// The request's body, byte for byte; each attempt shares it.
    pub body: Bytes,
    /// The decrypted (or, in plaintext mode, received) message: XML, or a
    /// Mini Program's JSON (`origin.codec`).
    pub xml: String,
    /// The message's fields as a JSON object of strings.
    pub fields: String,
    pub msg_type: String,
    /// The `Event` element of an event message (`subscribe`, `CLICK`…).
    pub event_type: Option<String>,
    /// The family, the codec and the family's identifiers, as verified.
    pub origin: Origin,
    /// The W3C trace context (a `traceparent` value) of the push's span, so
    /// that every attempt, by any worker on any replica, joins its trace;
    /// `None` when traces are not exported.
    pub trace_context: Option<String>,
}

/// Where a delivery stands. A delivered one is removed, so it has no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its target: due, backing off, or leased.
    Pending,
    /// Dead-lettered, until an operator replays or purges it.
    Dead,
}

/// Why a delivery was dead-lettered. Its name is what the spool stores, the
/// metrics label and the logs show, and `dlq --reason` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The target refused it (a 4xx other than 408 and 429).
    Rejected,
    /// Every attempt of the target's retry schedule failed.
    Exhausted,
    /// The event matched no route; it has no target.
    Unrouted,
    /// Its target was removed from the configuration.
    TargetRemoved,
    /// It waited longer than its target's `max_age`: sent now, it would
    /// arrive too late to mean anything (a QR-code login the user gave up).
    Expired,
}

impl DeadReason {
    pub const ALL: [DeadReason; 5] = [
        DeadReason::Rejected,
        DeadReason::Exhausted,
        DeadReason::Unrouted,
        DeadReason::TargetRemoved,
        DeadReason::Expired,
    ];
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeadReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown reason {s:?} (one of: {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod trail_contract_tests;
