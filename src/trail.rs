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
    /// At most this many trail rows are read ([`SEARCH_ROWS`] unless set):
    /// without an OpenID or an event id (the indexed fields) the search reads
    /// only the newest this many events of its time (`since`, `until`).
    pub scan: usize,
}

/// How many trail rows one search reads at most, so that a search over a
/// large trail is bounded however little it matches.
pub const SEARCH_ROWS: usize = 100_000;

/// What a search found, and whether it stopped at its [`TrailFilter::scan`]
/// cap before finding `limit` events: older events may match too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrailFound {
    pub events: Vec<TrailEvent>,
    pub cut_short: bool,
}

impl TrailFound {
    pub fn of(events: Vec<TrailEvent>, cut_short: bool) -> Self {
        TrailFound { events, cut_short }
    }

    /// What the answer says when the cap cut the search short, for the
    /// search `filter` asked.
    pub fn cut_short_note(&self, filter: &TrailFilter) -> Option<String> {
        let scan = filter.scan;
        self.cut_short.then(|| {
            if filter.openid.is_some() || filter.event_id.is_some() {
                format!(
                    "the search stopped after reading {scan} matching trail rows (the newest):                      older events match too; narrow it by time (since, until) to reach them"
                )
            } else {
                format!(
                    "the search read the newest {scan} trail rows and older ones remain: older                      events may match; search by OpenID or event id to reach them, or narrow                      the search"
                )
            }
        })
    }
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
            scan: SEARCH_ROWS,
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
    /// The target failed inside the reply budget (unreachable, an error
    /// status): `success`.
    Failed,
    /// A name this version does not know, written by a newer one (during a
    /// rolling upgrade): shown as unknown rather than failing the search.
    Unknown,
}

impl ReplyOutcome {
    pub const ALL: [ReplyOutcome; 6] = [
        ReplyOutcome::None,
        ReplyOutcome::Sealed,
        ReplyOutcome::Passed,
        ReplyOutcome::Unverifiable,
        ReplyOutcome::TimedOut,
        ReplyOutcome::Failed,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyOutcome::None => "none",
            ReplyOutcome::Sealed => "sealed",
            ReplyOutcome::Passed => "passed",
            ReplyOutcome::Unverifiable => "unverifiable",
            ReplyOutcome::TimedOut => "timed_out",
            ReplyOutcome::Failed => "failed",
            ReplyOutcome::Unknown => "unknown",
        }
    }
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
    // Cut at character boundaries, with no list of the characters between:
    // every push the trail keeps is masked.
    if openid.chars().count() <= 10 {
        return openid
            .chars()
            .next()
            .map(|first| [first, '…'].iter().collect())
            .unwrap_or_default();
    }
    let head_end = openid.char_indices().nth(4).map_or(0, |(at, _)| at);
    let tail_start = openid.char_indices().nth_back(3).map_or(0, |(at, _)| at);
    let (head, tail) = (&openid[..head_end], &openid[tail_start..]);
    let mut masked = String::with_capacity(head.len() + '…'.len_utf8() + tail.len());
    masked.push_str(head);
    masked.push('…');
    masked.push_str(tail);
    masked
}

/// What the trail keeps of a push, written in the push's own commit. Built
/// only while the trail is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailPush {
    /// `plaintext`, `compat` or `secure`: how this push arrived.
    pub mode: &'static str,
    pub scene: Option<String>,
    pub msg_id: Option<String>,
    pub ticket: bool,
    /// The sender's OpenID, hashed with the spool's key ([`TrailKey::hash`])
    /// on the request path, so that the spool's one writer spends nothing on it.
    pub openid_hash: Option<Vec<u8>>,
    /// The sender's OpenID, [`mask`]ed.
    pub openid_mask: Option<String>,
    /// The reply budget, for the reply's latency against it.
    pub budget_ms: u64,
    /// A reply target is to be tried inline: the reply is noted once it is
    /// known. Without one the answer is `success` once the push is stored,
    /// and its reply is written with the push.
    pub reply_inline: bool,
    /// When the handler took the request: an answer that waits for no
    /// reply target leaves once the spool has the push, so its latency is
    /// taken then (up to the commit).
    pub started: std::time::Instant,
}

/// What the trail adds after a push's commit, riding with the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailNote {
    /// A stored push's answer, once it has left.
    Reply {
        event_id: EventId,
        reply: TrailReply,
    },
    /// A refused push.
    Refused {
        at: UnixMs,
        account: String,
        refusal: TrailRefusal,
    },
}

/// Refused pushes written to the trail per account and second, at most:
/// a flood of forged requests cannot fill the disk.
pub const REFUSALS_PER_SECOND: u32 = 50;

/// Lets through at most [`REFUSALS_PER_SECOND`] refusals per account in each
/// second of the clock; the rest are only counted.
#[derive(Debug, Default)]
pub struct RefusalGate {
    /// Per account (a configured id, or `-`): the second and how many so far.
    seen: std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>,
}

impl RefusalGate {
    /// Whether this refusal of `account` at `now` is written.
    pub fn admit(&self, account: &str, now: UnixMs) -> bool {
        let second = now.0.div_euclid(1_000);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match seen.get_mut(account) {
            Some(entry) => entry,
            None => seen.entry(account.to_owned()).or_insert((second, 0)),
        };
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        entry.1 <= REFUSALS_PER_SECOND
    }
}

/// How much of a target's answer an attempt's record keeps.
pub const RESPONSE_PREFIX: usize = 256;

/// The first [`RESPONSE_PREFIX`] bytes of an answer (cut at a character),
/// with control characters escaped (`\n`, `\u{1b}`…) so that a record never
/// carries a terminal's escape sequences.
pub fn escape_prefix(body: &[u8]) -> String {
    escape_prefix_masking(body, None)
}

/// What the trail keeps of a target's answer. A 2xx body is not kept: a
/// `reply_from` target's is a passive reply, which names the user and
/// carries the answer's text. Of any other, the first bytes, escaped, with
/// the sender's OpenID masked where the target echoed it.
/// `sender` is asked only for a body that is kept.
pub fn kept_response(
    status: Option<u16>,
    body: &[u8],
    sender: impl FnOnce() -> Option<String>,
) -> String {
    match status {
        Some(200..=299) => String::new(),
        _ => escape_prefix_masking(body, sender().as_deref()),
    }
}

fn escape_prefix_masking(body: &[u8], sender: Option<&str>) -> String {
    let head = &body[..body.len().min(RESPONSE_PREFIX)];
    let mut text = String::from_utf8_lossy(head);
    if let Some(openid) = sender.filter(|o| !o.is_empty() && text.contains(*o)) {
        text = text.replace(openid, &mask(openid)).into();
    }
    escape_controls(&text)
}

/// `text` with its control characters (`\n`, `\u{1b}`…), its backslashes
/// and the Unicode format and separator characters that reorder or break
/// lines (`\u{202e}`, `\u{2028}`…) escaped: what a push or a target sent,
/// safe to print on a terminal, and told apart from an escape.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || c == '\\' || invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode's format (Cf) and line/paragraph separator characters a
/// terminal would act on or hide: bidirectional controls, zero-width ones,
/// the byte order mark, the separators.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
        | '\u{e0001}' | '\u{e0020}'..='\u{e007f}')
}

/// The key of the OpenIDs' hashes: from the configuration, or made once and
/// kept in the spool, so that every replica hashes alike. The HMAC's keyed
/// state is prepared once: each hash starts from a copy of it.
#[derive(Clone)]
pub struct TrailKey {
    bytes: [u8; 32],
    mac: hmac::Hmac<sha2::Sha256>,
}

impl PartialEq for TrailKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for TrailKey {}

impl std::fmt::Debug for TrailKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrailKey(***)")
    }
}

/// Bytes of an OpenID's keyed hash that are kept: enough never to collide
/// among one account's users.
pub const OPENID_HASH_LEN: usize = 16;

impl TrailKey {
    /// A configured key, of any length: its SHA-256 is the key used.
    pub fn from_secret(secret: &str) -> Self {
        use sha2::Digest;
        Self::from_bytes(sha2::Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        use hmac::digest::KeyInit;
        type Keyed = hmac::Hmac<sha2::Sha256>;
        // HMAC takes a key of any length: the fallback is never taken.
        let mac = <Keyed as KeyInit>::new_from_slice(&bytes)
            .unwrap_or_else(|_| <Keyed as KeyInit>::new(&Default::default()));
        TrailKey { bytes, mac }
    }

    pub fn random() -> Self {
        Self::from_bytes(rand::random())
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// HMAC-SHA256 of the OpenID under this key, cut to
    /// [`OPENID_HASH_LEN`] bytes.
    pub fn hash(&self, openid: &str) -> Vec<u8> {
        use hmac::Mac;
        let mut mac = self.mac.clone();
        mac.update(openid.as_bytes());
        mac.finalize().into_bytes()[..OPENID_HASH_LEN].to_vec()
    }
}

/// A trail query as the command line, the admin API and the pages take it:
/// `name=value` pairs (`openid`, `msg_id`, `scene`, `event_id`, `target`,
/// `outcome`, `since`, `until`, `limit`), with `since` and `until` as RFC 3339
/// times or spans back from `now` (`2h`). Empty values are left out. The
/// error names the parameter.
pub fn parse_filter<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: UnixMs,
) -> Result<TrailFilter, String> {
    let mut filter = TrailFilter::default();
    for (name, value) in pairs {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let text = || Some(value.to_owned());
        match name {
            "openid" => filter.openid = text(),
            "msg_id" => filter.msg_id = text(),
            "scene" => filter.scene = text(),
            "target" => filter.target = text(),
            "event_id" => filter.event_id = Some(EventId(number(name, value)?)),
            "outcome" => filter.outcome = Some(value.parse().map_err(|e| format!("{name}: {e}"))?),
            "since" => {
                filter.since = Some(parse_time(value, now).map_err(|e| format!("{name}: {e}"))?)
            }
            "until" => {
                filter.until = Some(parse_time(value, now).map_err(|e| format!("{name}: {e}"))?)
            }
            "limit" => {
                let limit = number(name, value)?;
                if !(1..=MAX_LIMIT as i64).contains(&limit) {
                    return Err(format!("{name}: from 1 to {MAX_LIMIT}"));
                }
                filter.limit = limit as usize;
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(filter)
}

/// The most events one search returns.
pub const MAX_LIMIT: usize = 1_000;

fn number(name: &str, value: &str) -> Result<i64, String> {
    value
        .parse()
        .map_err(|_| format!("{name}: not a number: {value:?}"))
}

/// An RFC 3339 time, or a span back from `now` (`90s`, `2h`, `7d`).
pub fn parse_time(value: &str, now: UnixMs) -> Result<UnixMs, String> {
    if let Ok(span) = humantime::parse_duration(value) {
        return Ok(UnixMs(now.0.saturating_sub(span.as_millis() as i64)));
    }
    let at = humantime::parse_rfc3339_weak(value)
        .map_err(|_| format!("neither an RFC 3339 time nor a span like 2h: {value:?}"))?;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("before 1970: {value:?}"))?
        .as_millis();
    Ok(UnixMs(ms as i64))
}

/// Where a push stands, from its route, its ends (in the order they
/// happened) and whether it was refused: a target's last end counts, so a
/// dead letter replayed and then delivered is delivered.
pub fn outcome_of(event: &TrailEvent) -> TrailOutcome {
    if event.refusal.is_some() {
        return TrailOutcome::Refused;
    }
    if event.dedup == Dedup::Duplicate {
        return TrailOutcome::Delivered;
    }
    let last_end = |target: Option<&str>| {
        event
            .ends
            .iter()
            .rev()
            .find(|e| target.is_none_or(|t| e.target == t))
            .map(|e| e.end.as_str())
    };
    // An unrouted event has one end, with no target.
    if event.route.is_empty() {
        return match last_end(None) {
            Some("dead" | "expired") => TrailOutcome::Dead,
            _ => TrailOutcome::Delivered,
        };
    }
    let mut outcome = TrailOutcome::Delivered;
    for target in &event.route {
        match last_end(Some(target)) {
            Some("dead" | "expired") => return TrailOutcome::Dead,
            Some(_) => {}
            None => outcome = TrailOutcome::Pending,
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_four_and_four() {
        assert_eq!(mask("oAbcdefghijklmnopqrstuxyz9"), "oAbc…xyz9");
        assert_eq!(mask("oShort"), "o…");
        assert_eq!(mask(""), "");
        assert_eq!(
            mask("éabcdefghijkxyzö"),
            "éabc…xyzö",
            "cut between characters"
        );
        assert_eq!(mask("é"), "é…");
    }

    #[test]
    fn an_openids_hash_is_keyed_and_stable() {
        let key = TrailKey::from_secret("a key of the trail's tests");
        let again = TrailKey::from_bytes(*key.bytes());
        assert_eq!(key.hash("oAbc"), again.hash("oAbc"));
        assert_eq!(key.hash("oAbc").len(), OPENID_HASH_LEN);
        assert_ne!(key.hash("oAbc"), key.hash("oAbd"));
        assert_ne!(
            key.hash("oAbc"),
            TrailKey::from_secret("another").hash("oAbc")
        );
    }

    #[test]
    fn a_query_becomes_a_filter_and_a_bad_one_names_its_parameter() {
        let now = UnixMs(10_000_000);
        let pairs = [
            ("openid", "oAbc"),
            ("scene", ""),
            ("outcome", "dead"),
            ("since", "2h"),
            ("until", "1970-01-01T00:00:01Z"),
            ("event_id", "42"),
            ("limit", "5"),
        ];
        let filter = parse_filter(pairs, now).unwrap();
        assert_eq!(filter.openid.as_deref(), Some("oAbc"));
        assert_eq!(filter.scene, None, "an empty value is left out");
        assert_eq!(filter.outcome, Some(TrailOutcome::Dead));
        assert_eq!(filter.since, Some(UnixMs(10_000_000 - 7_200_000)));
        assert_eq!(filter.until, Some(UnixMs(1_000)));
        assert_eq!(filter.event_id, Some(EventId(42)));
        assert_eq!(filter.limit, 5);
        for (pair, named) in [
            (("since", "yesterday"), "since"),
            (("limit", "0"), "limit"),
            (("event_id", "x"), "event_id"),
            (("colour", "blue"), "colour"),
        ] {
            let e = parse_filter([pair], now).unwrap_err();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn backslashes_and_invisible_format_characters_are_escaped_too() {
        let sent = "a\\n\u{202e}txt.exe\u{2028}b\u{200b}c\u{feff}";
        assert_eq!(
            escape_controls(sent),
            "a\\\\n\\u{202e}txt.exe\\u{2028}b\\u{200b}c\\u{feff}"
        );
        assert_eq!(escape_controls("é 中文 ok"), "é 中文 ok");
    }

    #[test]
    fn an_answer_is_cut_to_256_bytes_with_control_characters_escaped() {
        assert_eq!(escape_prefix(b"ok\r\n\x1b[31m"), "ok\\r\\n\\u{1b}[31m");
        // A 2xx body may be a passive reply naming the user: not kept.
        let reply = b"<xml><ToUserName><![CDATA[oAbcdefghijklmnopqrstuxyz9]]></ToUserName></xml>";
        assert_eq!(kept_response(Some(200), reply, || None), "");
        // An error echoing the sender keeps it masked.
        let echoed = kept_response(Some(400), reply, || {
            Some("oAbcdefghijklmnopqrstuxyz9".into())
        });
        assert!(
            echoed.contains("oAbc…xyz9") && !echoed.contains("oAbcdefghij"),
            "{echoed}"
        );
        let long = "é".repeat(200);
        let cut = escape_prefix(long.as_bytes());
        assert!(cut.len() <= RESPONSE_PREFIX + 3, "{}", cut.len());
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn outcomes_parse_their_names() {
        for o in TrailOutcome::ALL {
            assert_eq!(o.as_str().parse::<TrailOutcome>(), Ok(o));
        }
        assert!("lost".parse::<TrailOutcome>().is_err());
    }
}
