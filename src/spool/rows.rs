//! Reading the spool's rows, by column name, into its types: one mapper per
//! type for both engines, over what each engine's row can give ([`Columns`]).
//! A column missing or of another type is an error, never a panic.

use super::{
    ComponentTicket, DeadLetter, DeliveryId, Event, EventId, Lease, LeaseToken, Schedule,
    SpoolError, TargetDepth, UnixMs, WaitingDelivery,
};
use crate::wechat::family::{Codec, Family, Origin};

/// A row of either engine, read by column name.
pub(super) trait Columns {
    /// An integer column (any width).
    fn int(&self, name: &str) -> Result<i64, SpoolError>;
    /// A text column that may be NULL.
    fn opt_text(&self, name: &str) -> Result<Option<String>, SpoolError>;
    /// A blob (`BLOB`, `bytea`) column.
    fn blob(&self, name: &str) -> Result<Vec<u8>, SpoolError>;

    /// An integer column that may be NULL.
    fn opt_int(&self, name: &str) -> Result<Option<i64>, SpoolError>;

    fn text(&self, name: &str) -> Result<String, SpoolError> {
        self.opt_text(name)?
            .ok_or_else(|| SpoolError::storage(format!("column {name} is NULL")))
    }

    fn time(&self, name: &str) -> Result<UnixMs, SpoolError> {
        self.int(name).map(UnixMs)
    }

    /// A count (attempts, a schedule's step).
    fn count(&self, name: &str) -> Result<u32, SpoolError> {
        let n = self.int(name)?;
        u32::try_from(n).map_err(|_| SpoolError::storage(format!("column {name} holds {n}")))
    }
}

/// The event in the row's [`super::vocab::EVENT_COLUMNS`].
pub(super) fn event(row: &impl Columns) -> Result<Event, SpoolError> {
    Ok(Event {
        dedup_key: row.text("dedup_key")?,
        account: row.text("account")?,
        received_at: row.time("received_at")?,
        query: row.text("query")?,
        body: row.blob("body")?.into(),
        xml: row.text("xml")?,
        fields: row.text("fields")?,
        msg_type: row.text("msg_type")?,
        event_type: row.opt_text("event")?,
        origin: origin(row)?,
        trace_context: row.opt_text("trace_context")?,
    })
}

/// An event's origin: `family` and `codec` by name, NULL for an Official
/// Account's XML (what every event before them was), and the identifiers.
fn origin(row: &impl Columns) -> Result<Origin, SpoolError> {
    let named = |column: &str, names: &[&'static str]| -> Result<Option<usize>, SpoolError> {
        row.opt_text(column)?
            .map(|name| {
                names.iter().position(|n| *n == name).ok_or_else(|| {
                    SpoolError::storage(format!("column {column} holds an unknown {name:?}"))
                })
            })
            .transpose()
    };
    let families = Family::ALL.map(Family::as_str);
    let codecs = Codec::ALL.map(Codec::as_str);
    let family = named("family", &families)?.map_or(Family::OfficialAccount, |i| Family::ALL[i]);
    let codec = named("codec", &codecs)?.map_or(Codec::Xml, |i| Codec::ALL[i]);
    Ok(Origin {
        appid: row.opt_text("appid")?,
        agent_id: row.opt_text("agent_id")?,
        info_type: row.opt_text("info_type")?,
        ..Origin::of(family, codec)
    })
}

/// The stored form of an origin: `family`, `codec`, NULL where they are an
/// Official Account's XML, which costs its events nothing.
pub(super) fn origin_names(origin: &Origin) -> (Option<&'static str>, Option<&'static str>) {
    let family = (origin.family != Family::OfficialAccount).then(|| origin.family.as_str());
    let codec = (origin.codec != Codec::Xml).then(|| origin.codec.as_str());
    (family, codec)
}

/// A kept ticket: `account`, `ticket`, `create_time`, `received_at`.
pub(super) fn ticket(row: &impl Columns) -> Result<ComponentTicket, SpoolError> {
    Ok(ComponentTicket {
        account: row.text("account")?,
        ticket: row.text("ticket")?,
        create_time: row.int("create_time")?,
        received_at: row.time("received_at")?,
    })
}

/// A leased delivery: its `id`, `event_id`, `attempts`, `step` and
/// `scheduled_at`, and its event's columns.
pub(super) fn lease(
    row: &impl Columns,
    target: &str,
    token: LeaseToken,
) -> Result<Lease, SpoolError> {
    Ok(Lease {
        delivery_id: DeliveryId(row.int("id")?),
        target: target.to_owned(),
        attempts: row.count("attempts")?,
        schedule: schedule(row)?,
        event_id: EventId(row.int("event_id")?),
        event: event(row)?,
        token,
    })
}

fn schedule(row: &impl Columns) -> Result<Schedule, SpoolError> {
    Ok(Schedule {
        step: row.count("step")?,
        due_at: row.time("scheduled_at")?,
    })
}

/// A waiting delivery: `id`, `event_id`, `attempts`, `next_at`, `step`,
/// `scheduled_at`, `not_before` and `last_error`.
pub(super) fn waiting(row: &impl Columns) -> Result<WaitingDelivery, SpoolError> {
    Ok(WaitingDelivery {
        delivery_id: DeliveryId(row.int("id")?),
        event_id: EventId(row.int("event_id")?),
        attempts: row.count("attempts")?,
        next_at: row.time("next_at")?,
        schedule: schedule(row)?,
        not_before: row.time("not_before")?,
        last_error: row.text("last_error")?,
    })
}

/// A dead letter: the delivery's `id`, `event_id`, `target`, `reason`,
/// `last_error`, `attempts` and `updated_at` (when it died), and its event's
/// `account`, `dedup_key`, `msg_type`, `event` and `received_at`.
pub(super) fn dead_letter(row: &impl Columns) -> Result<DeadLetter, SpoolError> {
    Ok(DeadLetter {
        delivery_id: DeliveryId(row.int("id")?),
        event_id: EventId(row.int("event_id")?),
        target: row.opt_text("target")?,
        reason: row.text("reason")?.parse().map_err(SpoolError::storage)?,
        last_error: row.text("last_error")?,
        attempts: row.count("attempts")?,
        account: row.text("account")?,
        dedup_key: row.text("dedup_key")?,
        msg_type: row.text("msg_type")?,
        event_type: row.opt_text("event")?,
        received_at: row.time("received_at")?,
        dead_at: row.time("updated_at")?,
    })
}

/// One target's depth: `target`, `pending`, `oldest_received_at`.
pub(super) fn depth(row: &impl Columns) -> Result<TargetDepth, SpoolError> {
    Ok(TargetDepth {
        target: row.text("target")?,
        pending: row.int("pending")?.max(0) as u64,
        oldest_received_at: row.opt_int("oldest_received_at")?.map(UnixMs),
    })
}
