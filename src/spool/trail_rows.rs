//! The trail's rows in both engines: the search's statement (each engine
//! names its parameters its own way), and the rows read back into
//! [`TrailEvent`]s with their attempts and ends.

use super::rows::Columns;
use super::{EventId, SpoolError, UnixMs};
use crate::trail::{
    outcome_of, Dedup, ReplyOutcome, TrailAttempt, TrailEnd, TrailEvent, TrailFilter, TrailKey,
    TrailOutcome, TrailRefusal, TrailReply,
};

/// A trail event's columns, `t` being `trail_events`.
pub(super) const TRAIL_COLUMNS: &str =
    "t.id, t.event_id, t.received_at, t.account, t.mode, t.msg_type, t.event, t.scene, t.msg_id, \
     t.ticket, t.openid_mask, t.duplicate, t.route, t.reply, t.reply_ms, t.budget_ms, t.refusal, \
     t.source, CASE WHEN EXISTS (SELECT 1 FROM trail_bodies b WHERE b.event_id = t.event_id) \
     THEN 1 ELSE 0 END AS body_kept";

/// A step's columns, by event, in the order they were written.
pub(super) const STEP_COLUMNS: &str =
    "at, target, attempt, inline, status, error, latency_ms, response, circuit, end_kind, reason";

/// A kept copy of an event back in the queue, under the id it had, for a
/// redelivery (`$1`: the event id; SQLite takes `$1` too).
pub(super) const RESTORE_EVENT: &str = "INSERT INTO events (id, dedup_key, account, received_at, query, body, xml, fields,
         msg_type, event, family, codec, appid, agent_id, info_type, trace_context)
     SELECT event_id, dedup_key, account, received_at, query, body, xml, fields, msg_type, event,
         family, codec, appid, agent_id, info_type, trace_context FROM trail_bodies WHERE event_id = $1";

/// The routed targets as stored: each preceded and followed by a space
/// (target names have none), so that a search matches one whole name.
pub(super) fn route_text(targets: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut route = String::new();
    for t in targets {
        if route.is_empty() {
            route.push(' ');
        }
        route.push_str(t.as_ref());
        route.push(' ');
    }
    route
}

/// A parameter of the search's statement.
#[derive(Debug, Clone)]
pub(super) enum Param {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// Whether the search selects by one push's or one user's own rows (the
/// event id, which is indexed; the OpenID's hash, which is not, so that
/// search reads the kept events back to the oldest, bounded by
/// `max_events`), so that it is not windowed. Otherwise it reads the newest
/// [`TrailFilter::scan`] rows of its time range at most: those below its
/// `until` and above the floor [`FLOOR`] finds (see [`Window`]).
pub(super) fn indexed(filter: &TrailFilter) -> bool {
    filter.openid.is_some() || filter.event_id.is_some()
}

/// The trail id a search without an indexed field reads above: the id of
/// the newest row past the `scan` newest it may match in its time's rows,
/// those below `$1` and above `$2` (see [`Window`]) (`$3`: how many to
/// skip; SQLite takes `$1` too, numbering them in the order they appear). None while there are no more rows than
/// that. Refused pushes are kept apart (`trail_refusals`), so they neither
/// count toward a search's rows nor push answered ones out of its window.
pub(super) const FLOOR: &str =
    "SELECT id FROM trail_events WHERE id < $1 AND id > $2 ORDER BY id DESC LIMIT 1 OFFSET $3";

/// How far out of their ids' order two pushes' times may be: a push is
/// stored within seconds of its arrival (WeChat waits 5 s for the answer),
/// and the replicas' clocks agree to well within that. A search placed by
/// time reads this much beyond its time range, so that it misses none.
pub(super) const OUT_OF_ORDER_MS: i64 = 10_000;

/// The first trail id from which every row was received at `$1` or later,
/// found by halving the range of ids: rows are stored in about the order
/// they arrive, so `received_at` grows with the id (within
/// [`OUT_OF_ORDER_MS`]), and each step reads one row by its primary key,
/// however many rows the table holds. One past the newest id when no row
/// was received that late; none when the table is empty. The same in
/// both engines (SQLite takes `$1` too), for `trail_events` and
/// `trail_refusals` alike.
pub(super) fn position_query(table: &str) -> String {
    let probe = format!(
        "(SELECT received_at FROM {table} WHERE id >= (lo + hi) / 2 ORDER BY id LIMIT 1) >= $1"
    );
    format!(
        "WITH RECURSIVE b(lo, hi) AS (
             SELECT min(id), max(id) + 1 FROM {table}
             UNION ALL
             SELECT CASE WHEN {probe} THEN lo ELSE (lo + hi) / 2 + 1 END,
                    CASE WHEN {probe} THEN (lo + hi) / 2 ELSE hi END
             FROM b WHERE lo < hi)
         SELECT lo FROM b WHERE lo >= hi"
    )
}

/// The times a search places its rows by, for [`position_query`]: the
/// first id received at or after its `until` (plus the slack) bounds it
/// from above, the first received at or after its `since` (less the slack)
/// from below.
pub(super) fn positions(filter: &TrailFilter) -> (Option<i64>, Option<i64>) {
    (
        filter.until.map(|t| t.0.saturating_add(OUT_OF_ORDER_MS)),
        filter.since.map(|t| t.0.saturating_sub(OUT_OF_ORDER_MS)),
    )
}

/// The ids a search reads between, newest first: below `before`, above
/// `floor`. `capped` when the floor is its cap of rows, not the start of
/// its time range: older rows of its time were not read, and may match.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Window {
    pub before: Option<i64>,
    pub floor: Option<i64>,
    pub capped: bool,
}

impl Window {
    /// The window from the ids [`position_query`] found for
    /// [`positions`] (`top`, `bottom`) and the cap's [`FLOOR`], if any.
    pub(super) fn of(top: Option<i64>, bottom: Option<i64>, cap: Option<i64>) -> Self {
        Window {
            before: top,
            floor: cap.or(bottom.map(|b| b - 1)),
            capped: cap.is_some(),
        }
    }

    /// [`FLOOR`]'s `$1` and `$2`: the ids its rows lie between.
    pub(super) fn floor_bounds(top: Option<i64>, bottom: Option<i64>) -> (i64, i64) {
        (top.unwrap_or(i64::MAX), bottom.map_or(i64::MIN, |b| b - 1))
    }
}

/// How many rows the floor's statement skips.
pub(super) fn floor_offset(filter: &TrailFilter) -> i64 {
    i64::try_from(filter.scan).unwrap_or(i64::MAX)
}

/// The search's statement for one page: events older than `before` and
/// newer than `floor` (trail ids), newest first. `placeholder(n)` names the
/// n-th parameter.
pub(super) fn page_query(
    filter: &TrailFilter,
    key: &TrailKey,
    (before, floor): (Option<i64>, Option<i64>),
    page: usize,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut clauses = Vec::new();
    let mut add = |clause: &str, param: Param| {
        params.push(param);
        clauses.push(clause.replace('?', &placeholder(params.len())));
    };
    if let Some(openid) = &filter.openid {
        add("t.openid_hash = ?", Param::Blob(key.hash(openid)));
    }
    if let Some(msg_id) = &filter.msg_id {
        add("t.msg_id = ?", Param::Text(msg_id.clone()));
    }
    if let Some(scene) = &filter.scene {
        add("t.scene = ?", Param::Text(scene.clone()));
    }
    if let Some(id) = filter.event_id {
        add("t.event_id = ?", Param::Int(id.0));
    }
    if let Some(target) = &filter.target {
        let escaped = escape_like(target);
        add(
            "t.route LIKE ? ESCAPE '\\'",
            Param::Text(format!("% {escaped} %")),
        );
    }
    if let Some(since) = filter.since {
        add("t.received_at >= ?", Param::Int(since.0));
    }
    if let Some(until) = filter.until {
        add("t.received_at < ?", Param::Int(until.0));
    }
    if let Some(before) = before {
        add("t.id < ?", Param::Int(before));
    }
    if let Some(floor) = floor {
        add("t.id > ?", Param::Int(floor));
    }
    let filtered = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql = format!(
        "SELECT {TRAIL_COLUMNS} FROM trail_events t {filtered} ORDER BY t.id DESC LIMIT {page}"
    );
    (sql, params)
}

/// Whether refused pushes can match `filter`: they have no OpenID, MsgId,
/// scene, event or route, and their outcome is `refused`.
pub(super) fn wants_refusals(filter: &TrailFilter) -> bool {
    filter.openid.is_none()
        && filter.msg_id.is_none()
        && filter.scene.is_none()
        && filter.event_id.is_none()
        && filter.target.is_none()
        && filter.outcome.is_none_or(|o| o == TrailOutcome::Refused)
}

/// Whether answered pushes can match `filter`.
pub(super) fn wants_answered(filter: &TrailFilter) -> bool {
    filter.outcome != Some(TrailOutcome::Refused)
}

/// The newest `filter.limit` refused pushes in its time range, newest first
/// (see [`wants_refusals`] for whether any can match), read between the
/// ids of `window` (placed by time, never capped: refusals are bounded by
/// `max_refusals`).
pub(super) fn refusals_query(
    filter: &TrailFilter,
    window: Window,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Param>) {
    let mut params = Vec::new();
    let mut clauses = Vec::new();
    for (clause, bound) in [
        ("received_at >= ", filter.since.map(|t| t.0)),
        ("received_at < ", filter.until.map(|t| t.0)),
        ("id < ", window.before),
        ("id > ", window.floor),
    ] {
        if let Some(at) = bound {
            params.push(Param::Int(at));
            clauses.push(format!("{clause}{}", placeholder(params.len())));
        }
    }
    let filtered = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql = format!(
        "SELECT id, received_at, account, refusal, source FROM trail_refusals {filtered} \
         ORDER BY id DESC LIMIT {}",
        filter.limit
    );
    (sql, params)
}

/// A refused push's row.
pub(super) fn refusal_event(row: &impl Columns) -> Result<TrailEvent, SpoolError> {
    Ok(TrailEvent {
        id: row.int("id")?,
        event_id: None,
        received_at: row.time("received_at")?,
        account: row.text("account")?,
        mode: String::new(),
        msg_type: None,
        event: None,
        scene: None,
        msg_id: None,
        ticket: false,
        openid: None,
        dedup: Dedup::New,
        route: Vec::new(),
        reply: None,
        refusal: Some(TrailRefusal {
            reason: row.text("refusal")?,
            source: row.text("source")?,
        }),
        body_kept: false,
        outcome: TrailOutcome::Refused,
        attempts: Vec::new(),
        ends: Vec::new(),
    })
}

/// The answered and the refused pushes found, each newest first, as one
/// list newest first, at most `limit`.
pub(super) fn merged(
    answered: Vec<TrailEvent>,
    refused: Vec<TrailEvent>,
    limit: usize,
) -> Vec<TrailEvent> {
    if refused.is_empty() {
        return answered;
    }
    let mut all = Vec::with_capacity(limit.min(answered.len() + refused.len()));
    let (mut a, mut r) = (
        answered.into_iter().peekable(),
        refused.into_iter().peekable(),
    );
    while all.len() < limit {
        let refusal_first = match (a.peek(), r.peek()) {
            (Some(x), Some(y)) => y.received_at > x.received_at,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        match if refusal_first { r.next() } else { a.next() } {
            Some(event) => all.push(event),
            None => break,
        }
    }
    all
}

/// `target` with LIKE's wildcards and the escape character escaped.
fn escape_like(target: &str) -> String {
    let mut out = String::with_capacity(target.len());
    for c in target.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How many rows one page of a search reads: the outcome is judged from
/// each event's steps, so a page reads more than it may keep.
pub(super) fn page_size(filter: &TrailFilter) -> usize {
    if filter.outcome.is_some() {
        (filter.limit * 4).clamp(100, 2_000)
    } else {
        filter.limit
    }
}

/// A trail event's row, its steps not read yet.
pub(super) fn trail_event(row: &impl Columns) -> Result<TrailEvent, SpoolError> {
    let reply = match row.opt_text("reply")? {
        None => None,
        Some(name) => Some(TrailReply {
            outcome: reply_outcome(&name),
            latency_ms: row.opt_int("reply_ms")?.unwrap_or(0).max(0) as u64,
            budget_ms: row.opt_int("budget_ms")?.unwrap_or(0).max(0) as u64,
        }),
    };
    let refusal = match row.opt_text("refusal")? {
        None => None,
        Some(reason) => Some(TrailRefusal {
            reason,
            source: row.opt_text("source")?.unwrap_or_default(),
        }),
    };
    let route = row.text("route")?;
    Ok(TrailEvent {
        id: row.int("id")?,
        event_id: row.opt_int("event_id")?.map(EventId),
        received_at: row.time("received_at")?,
        account: row.text("account")?,
        mode: row.text("mode")?,
        msg_type: row.opt_text("msg_type")?,
        event: row.opt_text("event")?,
        scene: row.opt_text("scene")?,
        msg_id: row.opt_text("msg_id")?,
        ticket: row.int("ticket")? != 0,
        openid: row.opt_text("openid_mask")?,
        dedup: if row.int("duplicate")? != 0 {
            Dedup::Duplicate
        } else {
            Dedup::New
        },
        route: route.split_whitespace().map(str::to_owned).collect(),
        reply,
        refusal,
        body_kept: row.int("body_kept")? != 0,
        outcome: TrailOutcome::Pending,
        attempts: Vec::new(),
        ends: Vec::new(),
    })
}

/// Adds one step's row to its event: an attempt, an end, or both.
pub(super) fn add_step(event: &mut TrailEvent, row: &impl Columns) -> Result<(), SpoolError> {
    let at = row.time("at")?;
    let target = row.text("target")?;
    if let Some(attempt) = row.opt_int("attempt")? {
        event.attempts.push(TrailAttempt {
            at,
            target: target.clone(),
            attempt: attempt.max(0) as u32,
            inline: row.int("inline")? != 0,
            status: row.opt_int("status")?.map(|s| s.clamp(0, 999) as u16),
            error: row.opt_text("error")?,
            latency_ms: row.opt_int("latency_ms")?.unwrap_or(0).max(0) as u64,
            response: row.opt_text("response")?.unwrap_or_default(),
            circuit: row.opt_text("circuit")?.unwrap_or_default(),
        });
    }
    if let Some(end) = row.opt_text("end_kind")? {
        event.ends.push(TrailEnd {
            at,
            target,
            end,
            reason: row.opt_text("reason")?,
        });
    }
    Ok(())
}

/// Judges the event's outcome once its steps are in; whether the filter
/// keeps it.
pub(super) fn judged(event: &mut TrailEvent, filter: &TrailFilter) -> bool {
    event.outcome = outcome_of(event);
    filter.outcome.is_none_or(|o| o == event.outcome)
}

/// The reply's outcome by its stored name; one written by a newer version
/// is [`ReplyOutcome::Unknown`], so that the search still answers.
fn reply_outcome(name: &str) -> ReplyOutcome {
    ReplyOutcome::ALL
        .into_iter()
        .find(|o| o.as_str() == name)
        .unwrap_or(ReplyOutcome::Unknown)
}

/// The end a settlement or a retirement writes: `delivered`, `dead` or
/// `expired`.
pub(super) fn end_of_dead(reason: super::DeadReason) -> &'static str {
    if reason == super::DeadReason::Expired {
        "expired"
    } else {
        "dead"
    }
}

/// The time `span` before `now`, for pruning.
pub(super) fn cutoff(now: UnixMs, span: std::time::Duration) -> UnixMs {
    UnixMs(
        now.0
            .saturating_sub(span.as_millis().min(i64::MAX as u128) as i64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_outcome_of_a_newer_version_reads_as_unknown() {
        assert_eq!(reply_outcome("failed"), ReplyOutcome::Failed);
        assert_eq!(reply_outcome("from_the_future"), ReplyOutcome::Unknown);
    }
}
