//! The event trail: what became of each push the relay answered, accepted or
//! refused, kept for a retention period so that an operator given an OpenID,
//! a MsgId, a scene or a time can find the push and everything that happened
//! to it.
//!
//! This module holds what the trail's readers see (the command line, the
//! admin API and the pages): a [`TrailFilter`] selects [`TrailEvent`]s, each
//! with its timeline. OpenIDs are never stored in the clear: the spool keeps
//! a keyed hash, a search by the full OpenID is hashed the same way, and what
//! is shown is [`mask`]ed.

use crate::spool::{EventId, UnixMs};
use serde::Serialize;

/// Selects trail events; every field set narrows the selection. Newest
/// first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailFilter {
    /// The full OpenID, in the clear: the store hashes it with its key and
    /// matches the hash.
    pub openid: Option<String>,
    pub msg_id: Option<String>,
    /// The `EventKey` (a QR code's scene).
    pub scene: Option<String>,
    pub event_id: Option<EventId>,
    /// Events with a delivery to this target.
    pub target: Option<String>,
    pub outcome: Option<TrailOutcome>,
    /// Received at or after, unix milliseconds.
    pub since: Option<UnixMs>,
    /// Received before, unix milliseconds.
    pub until: Option<UnixMs>,
    pub limit: usize,
}

/// The default number of events a search returns.
pub const DEFAULT_LIMIT: usize = 50;

impl Default for TrailFilter {
    fn default() -> Self {
        TrailFilter {
            openid: None,
            msg_id: None,
            scene: None,
            event_id: None,
            target: None,
            outcome: None,
            since: None,
            until: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Where a push stands as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailOutcome {
    /// Every delivery reached its target (or it had none to make and was a
    /// duplicate).
    Delivered,
    /// A delivery is still waiting for its target.
    Pending,
    /// A delivery was dead-lettered or expired.
    Dead,
    /// The push was refused; nothing was stored.
    Refused,
}

impl TrailOutcome {
    pub const ALL: [TrailOutcome; 4] = [
        TrailOutcome::Delivered,
        TrailOutcome::Pending,
        TrailOutcome::Dead,
        TrailOutcome::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TrailOutcome::Delivered => "delivered",
            TrailOutcome::Pending => "pending",
            TrailOutcome::Dead => "dead",
            TrailOutcome::Refused => "refused",
        }
    }
}

impl std::str::FromStr for TrailOutcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrailOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| {
                format!("unknown outcome {s:?} (one of: delivered, pending, dead, refused)")
            })
    }
}

/// Whether a push was new or a duplicate of one taken already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dedup {
    New,
    Duplicate,
}

/// What WeChat was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// No `reply_from` target: `success`.
    None,
    /// The target's passive reply, sealed for WeChat.
    Sealed,
    /// The target's passive reply, passed as it was (plaintext mode).
    Passed,
    /// The target answered something that could not be passed on.
    Unverifiable,
    /// The target did not answer inside the reply budget.
    TimedOut,
}

/// The reply to WeChat and how long it took against the budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrailReply {
    pub outcome: ReplyOutcome,
    pub latency_ms: u64,
    pub budget_ms: u64,
}

/// Why and from where a push was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrailRefusal {
    /// The short reason the 4xx carried (`bad signature`…).
    pub reason: String,
    /// The client's address.
    pub source: String,
}

/// One attempt to deliver to a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrailAttempt {
    pub at: UnixMs,
    pub target: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Made inline by the handler (a `reply_from` target), not by a worker.
    pub inline: bool,
    /// The HTTP status, when the target answered.
    pub status: Option<u16>,
    /// The error class when it did not (`timeout`, `connect`…).
    pub error: Option<String>,
    pub latency_ms: u64,
    /// The first 256 bytes of the response body, control characters escaped.
    pub response: String,
    /// The target's circuit when the attempt was sent: `closed`, `open`,
    /// `half_open`.
    pub circuit: String,
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrailEnd {
    pub at: UnixMs,
    pub target: String,
    /// `delivered`, `dead` or `expired`.
    pub end: String,
    /// The dead-letter reason, for `dead`.
    pub reason: Option<String>,
}

/// A push and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrailEvent {
    /// The trail's own id: refused and duplicate pushes have one too.
    pub id: i64,
    /// The spool's event id, for a push that was stored.
    pub event_id: Option<EventId>,
    pub received_at: UnixMs,
    pub account: String,
    /// `plaintext`, `compat` or `secure`.
    pub mode: String,
    pub msg_type: Option<String>,
    pub event: Option<String>,
    /// The `EventKey`.
    pub scene: Option<String>,
    pub msg_id: Option<String>,
    /// Whether a `Ticket` (a QR code's) was present.
    pub ticket: bool,
    /// The sender's OpenID, masked ([`mask`]).
    pub openid: Option<String>,
    pub dedup: Dedup,
    /// The targets the route chose, in order.
    pub route: Vec<String>,
    pub reply: Option<TrailReply>,
    pub refusal: Option<TrailRefusal>,
    /// Whether the message was kept, so that it can be redelivered.
    pub body_kept: bool,
    pub outcome: TrailOutcome,
    /// In the order they were made.
    pub attempts: Vec<TrailAttempt>,
    pub ends: Vec<TrailEnd>,
}

/// An OpenID as pages and output show it: its first four and last four
/// characters (`oAbc…xyz9`); a short one shows only its first character.
pub fn mask(openid: &str) -> String {
    let chars: Vec<char> = openid.chars().collect();
    if chars.len() <= 10 {
        return chars.first().map(|c| format!("{c}…")).unwrap_or_default();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_four_and_four() {
        assert_eq!(mask("oAbcdefghijklmnopqrstuxyz9"), "oAbc…xyz9");
        assert_eq!(mask("oShort"), "o…");
        assert_eq!(mask(""), "");
    }

    #[test]
    fn outcomes_parse_their_names() {
        for o in TrailOutcome::ALL {
            assert_eq!(o.as_str().parse::<TrailOutcome>(), Ok(o));
        }
        assert!("lost".parse::<TrailOutcome>().is_err());
    }
}
