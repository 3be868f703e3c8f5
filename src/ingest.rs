//! Taking in a verified push: route it, build the event to store with a
//! delivery per routed target, commit it (with its dedup key and replay
//! guard) within what is left of the reply budget, and wake the targets'
//! workers. The result is a value, [`Ingested`], from which the request path
//! derives its metrics and log line in one place.

use crate::clock::Clock;
use crate::config::{Account, Mode, Ordering, Settings, Target};
use crate::deliver::Dispatcher;
use crate::route::{self, LateReply};
use crate::spool::{
    ComponentTicket, DeliveryId, Enqueued, Event, EventId, Intake, NewDelivery, NewEvent,
    ReplayGuard, SpoolError, SpoolFuture, Tickets, UnixMs,
};
use crate::trail::TrailPush;
use crate::wechat::family::{Family, TICKET_INFO_TYPE};
use crate::wechat::inbound::VerifiedPush;
use crate::wechat::message::{LoginEvent, Message};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What ingesting needs: where events (and an Open Platform's tickets) go,
/// what time it is, and who delivers.
pub struct Ingest {
    pub spool: Arc<dyn Intake>,
    pub tickets: Arc<dyn Tickets>,
    pub clock: Arc<dyn Clock>,
    pub dispatcher: Arc<Dispatcher>,
}

/// Why a verified push was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("spool unavailable: {}", crate::error_chain(.0))]
    Spool(SpoolError),
    #[error("spool commit took longer than the reply budget")]
    Timeout,
    #[error("replayed: this signed query was already used with another body")]
    Replayed,
}

/// A push taken in: stored, or a duplicate of one that was.
#[derive(Debug)]
pub struct Ingested {
    /// `None` for a duplicate: nothing was stored.
    pub stored: Option<Stored>,
    /// No rule matched: stored as an `unrouted` dead letter.
    pub unrouted: bool,
    pub msg_type: String,
    /// The `Event` of an event push, empty otherwise.
    pub event_name: String,
    /// Its part in a QR-code login, if any.
    pub login: Option<LoginEvent>,
    /// `event/{Event}` or the MsgType, for the log line.
    pub kind: String,
    /// The dedup key, shown hashed: it carries the sender's OpenID.
    pub key_hash: KeyHash,
    /// An Open Platform's ticket push: whether its ticket is now the
    /// latest kept (`false`: one as new or newer was kept already).
    pub ticket: Option<bool>,
}

#[derive(Debug)]
pub struct Stored {
    pub event_id: EventId,
    /// The rule's reply target, when it is to be tried inline.
    pub reply: Option<ReplyTo>,
}

/// The delivery the request path attempts inline for WeChat's answer.
#[derive(Debug)]
pub struct ReplyTo {
    pub target: Target,
    pub event_id: EventId,
    pub delivery_id: DeliveryId,
    pub event: Event,
    /// Where the target's answer goes when it comes after the budget, and
    /// how long a `next_message` one is kept.
    pub late: (LateReply, Duration),
    /// How long after the push came in the inline attempt holds the
    /// delivery: past it, the workers may send it.
    pub hold: Duration,
}

impl ReplyTo {
    /// How long the inline attempt may take, `elapsed` after the push came
    /// in: what is left of its hold, so that it is over before any worker
    /// may call the target again.
    pub fn attempt_time(&self, elapsed: Duration) -> Duration {
        attempt_time(self.hold, elapsed, self.target.timeout)
    }
}

fn attempt_time(hold: Duration, elapsed: Duration, timeout: Duration) -> Duration {
    hold.saturating_sub(elapsed).min(timeout)
}

/// What a push is stored as: its event and deliveries, the reply target
/// and where its delivery is among them, and how long its key lives.
struct Planned {
    new_event: NewEvent,
    reply: Option<(Target, usize, (LateReply, Duration))>,
    window: Duration,
}

impl Ingest {
    /// Routes and stores `push`, with the W3C trace context of its span when
    /// it is traced; the commits must end by `deadline`.
    pub async fn ingest(
        &self,
        config: &Settings,
        account: &Account,
        push: &VerifiedPush,
        (body, trace_context): (Bytes, Option<String>),
        deadline: Instant,
    ) -> Result<Ingested, IngestError> {
        let now = UnixMs(self.clock.now_ms());
        // An Open Platform's ticket is kept before its event is stored: a
        // push WeChat sends again after a failed commit keeps it again.
        let ticket = match ticket_of(account, push, now) {
            Some(ticket) => Some(within(deadline, self.tickets.keep(ticket)).await?),
            None => None,
        };
        let Planned {
            mut new_event,
            reply,
            window,
        } = plan(config, account, push, body, now, &self.dispatcher);
        new_event.event.trace_context = trace_context;
        if config.trail.enabled {
            let started = deadline.into_std() - config.server.reply_budget;
            let inline = reply.is_some();
            let key = self.spool.trail_key();
            let trail = trail_push(config, account, push, (started, inline), key.as_ref());
            new_event.trail = Some(Box::new(trail));
        }
        let dedup_key = new_event.event.dedup_key.clone();
        let msg_type = new_event.event.msg_type.clone();
        let unrouted = new_event.targets.is_empty();
        // The reply target's delivery waits for the inline attempt: its
        // worker woken now would find nothing due.
        let due_now: Vec<String> = (new_event.targets.iter())
            .filter(|t| t.due_at <= now)
            .map(|t| t.target.clone())
            .collect();
        let enqueued = within(deadline, self.spool.enqueue(new_event, now, window)).await?;
        let mut ingested = Ingested::taken(&push.message, msg_type, dedup_key, unrouted);
        ingested.ticket = ticket;
        let (event_id, deliveries, stored) = match enqueued {
            Enqueued::Replayed => return Err(IngestError::Replayed),
            Enqueued::Duplicate => return Ok(ingested),
            Enqueued::Stored {
                event_id,
                deliveries,
                event,
            } => (event_id, deliveries, event),
        };
        for target in &due_now {
            self.dispatcher.wake(target);
        }
        // Without its delivery there is nothing to attempt inline.
        let reply = reply.and_then(|(target, position, late)| {
            Some(ReplyTo {
                hold: inline_hold(config, Some(&target.name), late.0),
                target,
                event_id,
                delivery_id: *deliveries.get(position)?,
                event: *stored,
                late,
            })
        });
        ingested.stored = Some(Stored { event_id, reply });
        Ok(ingested)
    }
}

/// A spool operation that must end by `deadline`.
async fn within<T>(deadline: Instant, operation: SpoolFuture<T>) -> Result<T, IngestError> {
    tokio::time::timeout_at(deadline, operation)
        .await
        .map_err(|_| IngestError::Timeout)?
        .map_err(IngestError::Spool)
}

/// Routes `push` and builds what is stored of it.
fn plan(
    config: &Settings,
    account: &Account,
    push: &VerifiedPush,
    body: Bytes,
    now: UnixMs,
    dispatcher: &Dispatcher,
) -> Planned {
    let message = &push.message;
    let subject = route::subject(&account.id, message, &push.origin);
    let rule = route::route(&config.routes, subject).map(|(_, rule)| rule);
    // A family that answers `success` only has no reply to wait for.
    let reply_from = rule
        .and_then(|r| r.reply_from.as_deref())
        .filter(|_| push.origin.takes_reply());
    let late = rule.map_or((LateReply::None, route::DEFAULT_LATE_REPLY_TTL), |r| {
        (r.late_reply, r.late_reply_ttl)
    });
    let reply_due_at = dispatcher.reply_due_at(now, inline_hold(config, reply_from, late.0));
    let user = (account.id.as_str(), message.from_user().unwrap_or(""));
    let targets = rule.map_or_else(Vec::new, |rule| {
        deliveries(config, &rule.to, reply_from, now, reply_due_at, user)
    });
    let dedup_window = config.spool.dedup_window;
    // Until the query goes stale, a replay of it must still find its guard
    // and its dedup key, even when the timestamp is ahead of the clock.
    let stale_at = stale_at(account, &push.timestamp).unwrap_or(now + dedup_window);
    let msg_type = subject.input.msg_type;
    let new_event = NewEvent {
        trail: None,
        replay: replay_guard(account, push, stale_at),
        event: stored_event(account, push, body, dedup_key(account, push), now, msg_type),
        targets,
    };
    // The reply target is sent the event as the spool hands it back.
    let reply = reply_from
        .and_then(|name| reply_plan(config, name, &new_event))
        .map(|(target, position)| (target, position, late));
    Planned {
        new_event,
        reply,
        window: dedup_window.max(Duration::from_millis((stale_at - now).max(0) as u64)),
    }
}

/// What the trail keeps of `push`: how it arrived and what identifies it
/// (the OpenID goes to the spool, which keeps only its keyed hash).
fn trail_push(
    config: &Settings,
    account: &Account,
    push: &VerifiedPush,
    (started, reply_inline): (std::time::Instant, bool),
    key: Option<&crate::trail::TrailKey>,
) -> TrailPush {
    let message = &push.message;
    let openid = message.from_user().filter(|o| !o.is_empty());
    let owned = |name: &str| {
        message
            .get(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    TrailPush {
        mode: match push.key_slot {
            None => Mode::Plaintext.as_str(),
            Some(_) => account.mode.as_str(),
        },
        scene: owned("EventKey"),
        msg_id: owned("MsgId"),
        ticket: message.get("Ticket").is_some_and(|t| !t.is_empty()),
        openid_hash: key.zip(openid).map(|(key, o)| key.hash(o)),
        openid_mask: openid.map(crate::trail::mask),
        budget_ms: config.server.reply_budget.as_millis() as u64,
        reply_inline,
        started,
    }
}

/// An Open Platform's `component_verify_ticket`, as the spool keeps it; a
/// push without a ticket or its `CreateTime` is routed but has none to keep.
fn ticket_of(account: &Account, push: &VerifiedPush, now: UnixMs) -> Option<ComponentTicket> {
    let origin = &push.origin;
    let is_ticket = origin.family == Family::OpenPlatform
        && origin.info_type.as_deref() == Some(TICKET_INFO_TYPE);
    if !is_ticket {
        return None;
    }
    let ticket = push
        .message
        .get("ComponentVerifyTicket")
        .filter(|t| !t.is_empty());
    let create_time = push.message.get("CreateTime").and_then(|t| t.parse().ok());
    let (Some(ticket), Some(create_time)) = (ticket, create_time) else {
        tracing::warn!(account = %account.id, "a component_verify_ticket push without its ticket or CreateTime: nothing to keep");
        return None;
    };
    Some(ComponentTicket {
        account: account.id.clone(),
        ticket: ticket.to_owned(),
        create_time,
        received_at: now,
    })
}

impl Ingested {
    /// What the request path counts and logs of a push taken in, before
    /// the spool says whether it was stored.
    /// Takes the copies of the event's type and key made before it was
    /// stored, rather than copying them again.
    fn taken(message: &Message, msg_type: String, dedup_key: String, unrouted: bool) -> Ingested {
        Ingested {
            stored: None,
            unrouted,
            kind: kind(message, &msg_type),
            msg_type,
            event_name: message.event().unwrap_or("").to_string(),
            login: message.login(),
            key_hash: KeyHash(dedup_key),
            ticket: None,
        }
    }
}

/// How long the inline attempt may hold the reply target's delivery: the
/// reply budget, or with `late_reply` the target's whole `timeout`, so that
/// no worker calls the target again while it is still thinking. A restart
/// that cuts the wait short leaves the delivery due after that.
fn inline_hold(config: &Settings, reply_from: Option<&str>, late: LateReply) -> Duration {
    let budget = config.server.reply_budget;
    let timeout = reply_from
        .and_then(|name| config.targets.get(name))
        .map(|t| t.timeout);
    match (late, timeout) {
        (LateReply::None, _) | (_, None) => budget,
        (_, Some(timeout)) => budget.max(timeout),
    }
}

/// The reply target and where its delivery is among the event's. A paused
/// target gets no inline attempt: its delivery waits.
fn reply_plan(config: &Settings, name: &str, new_event: &NewEvent) -> Option<(Target, usize)> {
    let position = new_event.targets.iter().position(|t| t.target == name)?;
    let target = config.targets.get(name).filter(|t| !t.paused)?;
    Some((target.clone(), position))
}

/// The event as stored; its id is the spool's to give.
fn stored_event(
    account: &Account,
    push: &VerifiedPush,
    body: Bytes,
    dedup_key: String,
    now: UnixMs,
    msg_type: &str,
) -> Event {
    Event {
        dedup_key,
        account: account.id.clone(),
        received_at: now,
        query: push.query.clone(),
        body,
        xml: push.xml.clone(),
        fields: push.fields.clone(),
        msg_type: msg_type.to_string(),
        event_type: push.message.event().map(str::to_string),
        origin: push.origin.clone(),
        trace_context: None,
    }
}

/// A delivery per routed target, due now, except the reply target's: it is
/// tried inline first, and the workers wait until that attempt is over. A
/// target that takes one user's events in order gets the user's key.
fn deliveries(
    config: &Settings,
    to: &[String],
    reply_from: Option<&str>,
    now: UnixMs,
    reply_due_at: UnixMs,
    (account, from_user): (&str, &str),
) -> Vec<NewDelivery> {
    to.iter()
        .map(|target| NewDelivery {
            target: target.clone(),
            due_at: if reply_from == Some(target.as_str()) {
                reply_due_at
            } else {
                now
            },
            order_key: config
                .targets
                .get(target)
                .filter(|t| t.ordering == Ordering::PerUser)
                .map(|_| format!("{account}|{from_user}")),
        })
        .collect()
}

/// The account, what the family adds to tell its senders apart (an Open
/// Platform's authoriser, a WeCom corporation and app), and the message's key.
fn dedup_key(account: &Account, push: &VerifiedPush) -> String {
    let message = push.message.dedup_key();
    match push.origin.dedup_scope(&push.message) {
        None => format!("{}|{message}", account.id),
        Some(scope) => format!("{}|{scope}|{message}", account.id),
    }
}

/// `event/{Event}` for an event, `info/{InfoType}` for an Open Platform's
/// authorisation event, the MsgType otherwise.
fn kind(message: &Message, msg_type: &str) -> String {
    match (message.event(), message.get("InfoType")) {
        (Some(event), _) => format!("event/{event}"),
        (None, Some(info_type)) if msg_type.is_empty() => format!("info/{info_type}"),
        (None, _) => msg_type.to_string(),
    }
}

/// When the account starts refusing a query with this timestamp as stale,
/// unix milliseconds; `None` when it does not check freshness.
fn stale_at(account: &Account, timestamp: &str) -> Option<UnixMs> {
    let window = account.timestamp_window?;
    let sent: i64 = timestamp.parse().ok()?;
    // Accepted while the clock's whole seconds are within the window.
    let last_second = sent.saturating_add(window.as_secs() as i64);
    Some(UnixMs(last_second.saturating_add(1).saturating_mul(1000)))
}

/// `signature` covers (token, timestamp, nonce), never the body, so a
/// captured query can carry any body until it goes stale; the guard refuses
/// it with any body other than the first. In secure mode every accepted push
/// is also under `msg_signature`, which covers the `<Encrypt>` that is all the
/// relay reads of the body: another `<Encrypt>` fails it and the same one is
/// the same message, a duplicate. So secure accounts need no guard and spend
/// no write on one. Compat accounts take unencrypted pushes, and an encrypted
/// push's query without `encrypt_type` and `msg_signature` is a valid
/// unencrypted one, so their encrypted pushes are guarded too. What is
/// compared is the message the relay acts on (the decrypted XML of an
/// encrypted push), so WeChat re-sending a push sealed afresh under the same
/// query stays a duplicate rather than a replay.
fn replay_guard(account: &Account, push: &VerifiedPush, stale_at: UnixMs) -> Option<ReplayGuard> {
    if account.mode == Mode::Secure {
        return None;
    }
    Some(ReplayGuard {
        key: format!(
            "{}|{}|{}|{}",
            account.id, push.timestamp, push.nonce, push.signature
        ),
        body_hash: Sha256::digest(push.xml.as_bytes()).into(),
        expires_at: stale_at,
    })
}

/// A short, non-reversible stand-in for an identifier that carries an OpenID,
/// so logs can correlate without holding personal data.
pub fn short_hash(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..6])
}

/// A dedup key that shows only as its [`short_hash`], worked out when it is
/// shown: a log line filtered out costs no hashing.
pub struct KeyHash(String);

impl std::fmt::Display for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&short_hash(&self.0))
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key carries an OpenID: however it is shown, only its hash shows.
    #[test]
    fn a_key_hash_shows_only_the_hash() {
        let key = KeyHash("main|oOpenId123|1".into());
        assert_eq!(key.to_string(), short_hash("main|oOpenId123|1"));
        let debug = format!("{key:?} {:?}", Some(&key));
        assert!(!debug.contains("oOpenId123"), "{debug}");
        assert!(debug.contains(&short_hash("main|oOpenId123|1")), "{debug}");
    }

    /// The inline attempt ends by the end of its hold, however long the
    /// commit took: past it the workers may send the delivery, and the
    /// target would be called twice.
    #[test]
    fn the_inline_attempt_ends_within_what_is_left_of_its_hold() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // A 30 s target on a late route: a 30 s hold, 1.5 s of it spent.
        assert_eq!(attempt_time(s(30), ms(1_500), s(30)), ms(28_500));
        // A target faster than the hold keeps its own timeout.
        assert_eq!(attempt_time(s(5), ms(200), s(2)), s(2));
        // Nothing left: no attempt outlasts the hold.
        assert_eq!(attempt_time(s(5), s(6), s(30)), Duration::ZERO);
    }
}
