//! The in-memory twin of the SQLite spool: the same contract minus durability,
//! for unit tests of the code around the spool.

use super::{
    DeadFilter, DeadLetter, DeadReason, DeliveryId, DeliveryState, Enqueued, Event, EventId, Lease,
    NewEvent, Release, Schedule, Settlement, Spool, SpoolError, SpoolFuture, TargetDepth, UnixMs,
    WaitingDelivery,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Debug, Clone)]
struct Delivery {
    event_id: EventId,
    target: Option<String>,
    state: DeliveryState,
    attempts: u32,
    next_at: UnixMs,
    last_error: String,
    /// Set while dead.
    reason: Option<DeadReason>,
    updated_at: UnixMs,
    not_before: UnixMs,
    schedule: Schedule,
    /// Hidden from leases until then, unix milliseconds; apart from
    /// `next_at`, as the SQLite spool holds leases apart from the file.
    leased_until: UnixMs,
}

#[derive(Default)]
struct State {
    next_id: i64,
    events: HashMap<EventId, Event>,
    deliveries: BTreeMap<DeliveryId, Delivery>,
    dedup: HashMap<String, UnixMs>,
    /// Replay guard key → (body hash, expires at).
    replay: HashMap<String, ([u8; 32], UnixMs)>,
}

impl State {
    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// A delivery still waiting for its target: only those take an outcome.
    fn waiting_mut(&mut self, delivery_id: DeliveryId) -> Option<&mut Delivery> {
        self.deliveries
            .get_mut(&delivery_id)
            .filter(|d| d.state == DeliveryState::Pending)
    }

    fn drop_event_if_done(&mut self, event_id: EventId) {
        if !self.deliveries.values().any(|d| d.event_id == event_id) {
            self.events.remove(&event_id);
        }
    }

    fn dead_letter(&self, id: DeliveryId, d: &Delivery) -> Option<DeadLetter> {
        let e = self.events.get(&d.event_id)?;
        let reason = d.reason.filter(|_| d.state == DeliveryState::Dead)?;
        Some(DeadLetter {
            delivery_id: id,
            event_id: d.event_id,
            target: d.target.clone(),
            reason,
            last_error: d.last_error.clone(),
            attempts: d.attempts,
            account: e.account.clone(),
            dedup_key: e.dedup_key.clone(),
            msg_type: e.msg_type.clone(),
            event_type: e.event_type.clone(),
            received_at: e.received_at,
            dead_at: d.updated_at,
        })
    }

    fn selected_dead(&self, f: &DeadFilter) -> Vec<DeliveryId> {
        self.deliveries
            .iter()
            .filter(|(_, d)| d.state == DeliveryState::Dead)
            .filter_map(|(id, d)| self.dead_letter(*id, d))
            .filter(|dl| f.admits(dl))
            .map(|dl| dl.delivery_id)
            .collect()
    }
}

#[derive(Default)]
pub struct MemorySpool {
    state: Mutex<State>,
}

impl MemorySpool {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut State) -> T) -> SpoolFuture<T> {
        let result = self
            .state
            .lock()
            .map(|mut s| f(&mut s))
            .map_err(|_| SpoolError::Storage("memory spool poisoned".into()));
        Box::pin(async move { result })
    }
}

impl Spool for MemorySpool {
    fn enqueue(&self, new: NewEvent, now: UnixMs, window: i64) -> SpoolFuture<Enqueued> {
        self.with(move |s| {
            let NewEvent {
                event: e,
                targets,
                replay,
            } = new;
            if let Some(guard) = replay {
                match s.replay.get(&guard.key) {
                    Some((hash, expires)) if *expires > now && *hash != guard.body_hash => {
                        return Enqueued::Replayed;
                    }
                    Some((_, expires)) if *expires > now => {}
                    _ => {
                        s.replay
                            .insert(guard.key, (guard.body_hash, guard.expires_at));
                    }
                }
            }
            if s.dedup.get(&e.dedup_key).is_some_and(|&exp| exp > now) {
                return Enqueued::Duplicate;
            }
            s.dedup.insert(e.dedup_key.clone(), now + window);
            let event_id = EventId(s.id());
            if targets.is_empty() {
                let id = DeliveryId(s.id());
                s.deliveries.insert(
                    id,
                    Delivery {
                        event_id,
                        target: None,
                        state: DeliveryState::Dead,
                        attempts: 0,
                        next_at: UnixMs(0),
                        last_error: String::new(),
                        reason: Some(DeadReason::Unrouted),
                        updated_at: now,
                        not_before: UnixMs(0),
                        schedule: Schedule::default(),
                        leased_until: UnixMs(0),
                    },
                );
            }
            let mut deliveries = Vec::new();
            for t in &targets {
                let id = DeliveryId(s.id());
                s.deliveries.insert(
                    id,
                    Delivery {
                        event_id,
                        target: Some(t.target.clone()),
                        state: DeliveryState::Pending,
                        attempts: 0,
                        next_at: t.due_at,
                        last_error: String::new(),
                        reason: None,
                        updated_at: now,
                        not_before: UnixMs(0),
                        schedule: Schedule {
                            step: 0,
                            due_at: t.due_at,
                        },
                        leased_until: UnixMs(0),
                    },
                );
                deliveries.push(id);
            }
            s.events.insert(event_id, e.clone());
            Enqueued::Stored {
                event_id,
                deliveries,
                event: Box::new(e),
            }
        })
    }

    fn lease(
        &self,
        target: &str,
        now: UnixMs,
        limit: usize,
        lease_ms: i64,
    ) -> SpoolFuture<Vec<Lease>> {
        let target = target.to_string();
        self.with(move |s| {
            let mut due: Vec<(UnixMs, DeliveryId)> = s
                .deliveries
                .iter()
                .filter(|(_, d)| {
                    d.state == DeliveryState::Pending
                        && d.target.as_deref() == Some(&target)
                        && d.next_at <= now
                        && d.leased_until <= now
                })
                .map(|(id, d)| (d.next_at, *id))
                .collect();
            due.sort_unstable();
            due.truncate(limit);
            let mut leases = Vec::with_capacity(due.len());
            for (_, id) in due {
                let Some(d) = s.deliveries.get_mut(&id) else {
                    continue;
                };
                d.leased_until = now + lease_ms;
                let (event_id, attempts, schedule) = (d.event_id, d.attempts, d.schedule);
                let Some(e) = s.events.get(&event_id) else {
                    continue;
                };
                leases.push(Lease {
                    delivery_id: id,
                    target: target.clone(),
                    attempts,
                    schedule,
                    event_id,
                    event: e.clone(),
                });
            }
            leases
        })
    }

    fn record(&self, settlements: Vec<Settlement>, now: UnixMs) -> SpoolFuture<()> {
        self.with(move |s| {
            for settlement in settlements {
                match settlement {
                    Settlement::Delivered { delivery_id } => {
                        if s.deliveries
                            .get(&delivery_id)
                            .is_some_and(|d| d.state == DeliveryState::Pending)
                        {
                            if let Some(d) = s.deliveries.remove(&delivery_id) {
                                s.drop_event_if_done(d.event_id);
                            }
                        }
                    }
                    Settlement::Retry {
                        delivery_id,
                        next_at,
                        schedule,
                        not_before,
                        error,
                    } => {
                        if let Some(d) = s.waiting_mut(delivery_id) {
                            d.attempts += 1;
                            d.next_at = next_at;
                            d.schedule = schedule;
                            d.leased_until = UnixMs(0);
                            d.not_before = not_before;
                            d.last_error = error;
                            d.updated_at = now;
                        }
                    }
                    Settlement::Dead {
                        delivery_id,
                        reason,
                        error,
                    } => {
                        if let Some(d) = s.waiting_mut(delivery_id) {
                            d.state = DeliveryState::Dead;
                            d.attempts += 1;
                            d.leased_until = UnixMs(0);
                            d.reason = Some(reason);
                            d.last_error = error;
                            d.updated_at = now;
                        }
                    }
                }
            }
        })
    }

    fn release(&self, release: Release, now: UnixMs) -> SpoolFuture<u64> {
        self.with(move |s| {
            let mut n = 0;
            for (id, d) in s.deliveries.iter_mut() {
                let chosen =
                    release.admits(*id, d.target.as_deref(), d.attempts, d.not_before, now);
                if d.state == DeliveryState::Pending && d.next_at > now && chosen {
                    d.next_at = now;
                    n += 1;
                }
            }
            n
        })
    }

    fn retire_targets(&self, keep: Vec<String>, now: UnixMs) -> SpoolFuture<Vec<(String, u64)>> {
        self.with(move |s| {
            let mut retired: BTreeMap<String, u64> = BTreeMap::new();
            for d in s.deliveries.values_mut() {
                let Some(target) = d.target.clone() else {
                    continue;
                };
                if d.state == DeliveryState::Pending && !keep.contains(&target) {
                    d.state = DeliveryState::Dead;
                    d.reason = Some(DeadReason::TargetRemoved);
                    d.last_error = "the target is no longer in the configuration".into();
                    d.updated_at = now;
                    *retired.entry(target).or_default() += 1;
                }
            }
            retired.into_iter().collect()
        })
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>> {
        self.with(move |s| {
            let mut dead: Vec<DeadLetter> = s
                .selected_dead(&filter)
                .into_iter()
                .filter_map(|id| s.deliveries.get(&id).and_then(|d| s.dead_letter(id, d)))
                .collect();
            dead.sort_by_key(|d| (d.dead_at, d.delivery_id));
            dead.truncate(limit);
            dead
        })
    }

    fn replay(&self, filter: DeadFilter, now: UnixMs) -> SpoolFuture<u64> {
        self.with(move |s| {
            let mut n = 0;
            for id in s.selected_dead(&filter) {
                if let Some(d) = s.deliveries.get_mut(&id).filter(|d| d.target.is_some()) {
                    d.state = DeliveryState::Pending;
                    d.attempts = 0;
                    d.next_at = now;
                    d.not_before = UnixMs(0);
                    d.schedule = Schedule {
                        step: 0,
                        due_at: now,
                    };
                    d.reason = None;
                    d.updated_at = now;
                    n += 1;
                }
            }
            n
        })
    }

    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64> {
        self.with(move |s| {
            let ids = s.selected_dead(&filter);
            for id in &ids {
                if let Some(d) = s.deliveries.remove(id) {
                    s.drop_event_if_done(d.event_id);
                }
            }
            ids.len() as u64
        })
    }

    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>> {
        self.with(|s| {
            let mut by_target: BTreeMap<String, TargetDepth> = BTreeMap::new();
            for d in s
                .deliveries
                .values()
                .filter(|d| d.state == DeliveryState::Pending)
            {
                let Some(target) = &d.target else { continue };
                let received = s.events.get(&d.event_id).map(|e| e.received_at);
                let entry = by_target
                    .entry(target.clone())
                    .or_insert_with(|| TargetDepth {
                        target: target.clone(),
                        pending: 0,
                        oldest_received_at: None,
                    });
                entry.pending += 1;
                entry.oldest_received_at = match (entry.oldest_received_at, received) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            by_target.into_values().collect()
        })
    }

    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>> {
        let target = target.to_string();
        self.with(move |s| {
            let mut pending: Vec<WaitingDelivery> = s
                .deliveries
                .iter()
                .filter(|(_, d)| {
                    d.state == DeliveryState::Pending && d.target.as_deref() == Some(&target)
                })
                .map(|(id, d)| WaitingDelivery {
                    delivery_id: *id,
                    event_id: d.event_id,
                    attempts: d.attempts,
                    next_at: d.next_at,
                    schedule: d.schedule,
                    not_before: d.not_before,
                    last_error: d.last_error.clone(),
                })
                .collect();
            pending.sort_by_key(|p| (p.next_at, p.delivery_id));
            pending.truncate(limit);
            pending
        })
    }

    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>> {
        self.with(move |s| s.events.get(&event_id).cloned())
    }

    fn probe(&self) -> SpoolFuture<()> {
        self.with(|_| ())
    }
}
