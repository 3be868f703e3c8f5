//! What the pages' forms do: signing in, and replaying a dead letter.

use super::session::Session;
use super::{pages, Outcome, PageError, Refusal, Ui, Visit};
use crate::spool::{DeadFilter, DeliveryId, EventId, UnixMs};
use http::StatusCode;

/// The sign-in form; with no admin token there is none to ask for.
pub(super) fn signin_form(visit: &Visit) -> Outcome {
    if !visit.guarded || visit.session.is_some() {
        return Outcome::Redirect(super::ROOT.into());
    }
    Outcome::Page(StatusCode::OK, pages::signin(None))
}

/// Signing in: the admin token, compared in constant time after the wait
/// the client's failed tries ask for, opens a session.
pub(super) async fn sign_in(ui: &Ui, visit: &Visit) -> Result<Outcome, PageError> {
    let config = ui.config.load();
    let Some(token) = &config.server.admin_token else {
        return Ok(Outcome::Redirect(super::ROOT.into()));
    };
    let given = visit.field("token").ok_or(Refusal::BadForm)?.trim();
    if !ui.token_holds(visit.peer, given, token.expose()).await {
        return Err(Refusal::BadToken.into());
    }
    let session = Session::issue(ui.clock.now_ms());
    tracing::info!("signed in to the pages");
    let cookie = session.set_cookie(&visit.key, config.server.ui_secure_cookie);
    let home = Outcome::Redirect(back(visit));
    Ok(Outcome::WithCookie(cookie, Box::new(home)))
}

/// Replays one dead letter: due again now, its attempts reset.
pub(super) async fn replay(ui: &Ui, visit: &Visit) -> Result<Outcome, PageError> {
    let delivery_id = visit
        .field("delivery_id")
        .and_then(|id| id.parse().ok())
        .map(DeliveryId)
        .ok_or(Refusal::BadForm)?;
    let filter = DeadFilter {
        delivery_id: Some(delivery_id),
        ..Default::default()
    };
    let replayed = ui
        .operator
        .replay(filter, UnixMs(ui.clock.now_ms()))
        .await?;
    tracing::info!(%delivery_id, replayed, "dead letter replayed from the pages");
    if let Some(target) = visit.field("target") {
        if ui.config.load().targets.contains_key(target) {
            ui.dispatcher.wake(target);
        }
    }
    Ok(Outcome::Redirect(back(visit)))
}

/// Sends a kept event to a configured target again, as a new delivery.
pub(super) async fn redeliver(ui: &Ui, visit: &Visit) -> Result<Outcome, PageError> {
    let event_id = visit
        .field("event_id")
        .and_then(|id| id.parse().ok())
        .map(EventId)
        .ok_or(Refusal::BadForm)?;
    let target = visit
        .field("target")
        .filter(|t| ui.config.load().targets.contains_key(*t))
        .ok_or(Refusal::BadForm)?;
    let now = UnixMs(ui.clock.now_ms());
    let delivery = ui.trail.redeliver(event_id, target.to_owned(), now).await?;
    tracing::info!(%event_id, target, %delivery, "event redelivered from the pages");
    ui.dispatcher.wake(target);
    Ok(Outcome::Redirect(back(visit)))
}

/// The page a form asks to return to: one of ours, else the overview.
fn back(visit: &Visit) -> String {
    visit
        .field("back")
        .filter(|b| b.starts_with("/ui") && !b.contains("//") && !b.contains('\\'))
        .unwrap_or(super::ROOT)
        .to_owned()
}
