//! `wxrelay ticket`: an Open Platform's latest `component_verify_ticket`,
//! as the spool keeps it (the one every replica shares), with its age. The
//! platform's backend needs it for every `component_access_token`; WeChat
//! sends a new one every 10 minutes and each is valid for 12 hours, so an
//! age past 20 minutes means the pushes stopped reaching the relay.

use super::CliError;
use crate::config::Settings;
use crate::spool::Tickets;
use crate::wechat::family::Family;
use std::time::Duration;

/// The ticket of `account` (the only Open Platform when `None`), now `now_ms`.
pub async fn run(
    settings: &Settings,
    tickets: &dyn Tickets,
    account: Option<&str>,
    now_ms: i64,
) -> Result<String, CliError> {
    let account = match account {
        Some(id) => super::account(settings, Some(id))?,
        None => only_platform(settings)?,
    };
    if account.kind != Family::OpenPlatform {
        return Err(CliError::Usage(format!(
            "account {} is a {}, not an Open Platform (kind = \"open_platform\"): it has no ticket",
            account.id,
            account.kind.as_str()
        )));
    }
    let kept = tickets.tickets().await.map_err(super::dlq::failed)?;
    let Some(ticket) = kept.into_iter().find(|t| t.account == account.id) else {
        return Err(CliError::Failed(format!(
            "no ticket received yet for {}: WeChat pushes one to its authorisation URL every 10 minutes",
            account.id
        )));
    };
    let age = Duration::from_millis((now_ms - ticket.received_at.0).max(0) as u64 / 1000 * 1000);
    let received = humantime::format_rfc3339_millis(ticket.received_at.to_system_time());
    Ok(format!(
        "account      {}\nticket       {}\nreceived_at  {received} ({} ago)\ncreate_time  {}\n",
        account.id,
        ticket.ticket,
        humantime::format_duration(age),
        ticket.create_time
    ))
}

/// The configuration's one Open Platform account, when `--account` is left out.
fn only_platform(settings: &Settings) -> Result<&crate::config::Account, CliError> {
    let mut platforms = settings
        .accounts
        .values()
        .filter(|a| a.kind == Family::OpenPlatform);
    match (platforms.next(), platforms.next()) {
        (Some(only), None) => Ok(only),
        (None, _) => Err(CliError::Usage(
            "the configuration has no Open Platform account (kind = \"open_platform\")".to_owned(),
        )),
        (Some(_), Some(_)) => Err(CliError::Usage(
            "--account is required: the configuration has several Open Platform accounts"
                .to_owned(),
        )),
    }
}
