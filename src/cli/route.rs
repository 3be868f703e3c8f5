//! `wxrelay route`: a dry run of the route table. It builds the push that
//! `simulate` would send (or reads one), sees it as the relay does, and says
//! which rule takes it and where it would go — without sending anything.

use super::simulate::{plan, FamilyOptions, MessageOptions, Payload};
use super::CliError;
use crate::clock::Clock;
use crate::config::Settings;
use crate::route::{self, Subject};
use crate::wechat::inbound::Callback;
use crate::wechat::message::Message;
use std::fmt::Write as _;

/// `wxrelay route`'s options, beside `--config`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RouteArgs {
    /// The account the push arrives at; optional when there is only one.
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub message: MessageOptions,
    #[command(subcommand)]
    pub payload: Payload,
}

/// Says which rule matches the push, its targets (with their formats) and
/// its reply target, or that the push would be dead-lettered as `unrouted`.
pub fn run(settings: &Settings, args: &RouteArgs, clock: &dyn Clock) -> Result<String, CliError> {
    run_with(settings, args, &FamilyOptions::default(), clock)
}

/// [`run`], with the other families' fields from `family`: the push is seen
/// as the relay sees it at the account's family's URL.
pub fn run_with(
    settings: &Settings,
    args: &RouteArgs,
    family: &FamilyOptions,
    clock: &dyn Clock,
) -> Result<String, CliError> {
    let account = super::account(settings, args.account.as_deref())?;
    let (opts, family, authorizer) = plan(account, &args.payload, &args.message, family)?;
    let xml = args.payload.xml_with(&opts, &family, clock.now_secs())?;
    let message = Message::parse(xml.as_bytes())
        .map_err(|e| CliError::Usage(format!("the message is not WeChat XML: {e}")))?;
    let origin = Callback::new(account.kind, account.codec, authorizer.as_deref())
        .and_then(|callback| callback.origin(&message))
        .map_err(|e| CliError::Usage(format!("the relay would refuse this push: {e}")))?;
    let push = route::subject(&account.id, &message, &origin);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "push      {}", describe(&push));
    let Some((index, rule)) = route::route(&settings.routes, push) else {
        let _ = writeln!(
            out,
            "rule      none matches: the relay would answer `success` and dead-letter \
             the event as `unrouted`"
        );
        return Ok(out);
    };
    let _ = writeln!(out, "rule      [{index}] {}", rule.matcher.describe());
    for name in &rule.to {
        let format = settings
            .targets
            .get(name)
            .map_or("?", |t| t.format.as_str());
        let _ = writeln!(out, "target    {name} ({format})");
    }
    match &rule.reply_from {
        Some(_) if !origin.takes_reply() => {
            let _ = writeln!(
                out,
                "reply     none: WeChat takes no reply to this push (a Mini Program's, an Open \
                 Platform's authorisation event): `success`"
            );
        }
        Some(name) => {
            let _ = writeln!(
                out,
                "reply     {name}: its answer, if it is valid reply XML within the reply \
                 budget, goes to WeChat"
            );
        }
        None => {
            let _ = writeln!(out, "reply     none: WeChat gets `success`");
        }
    }
    Ok(out)
}

/// The keys a rule can match on, except the sender's OpenID.
fn describe(push: &Subject<'_>) -> String {
    let (input, ids) = (&push.input, &push.ids);
    let mut text = format!("account={} msg_type={}", input.account, input.msg_type);
    if let Some(event) = input.event {
        let _ = write!(text, " event={event}");
    }
    if let Some(key) = input.event_key {
        let _ = write!(text, " event_key={key:?}");
    }
    let _ = write!(text, " has_ticket={}", input.has_ticket);
    for (key, value) in [
        ("appid", ids.appid),
        ("agent_id", ids.agent_id),
        ("info_type", ids.info_type),
    ] {
        if let Some(value) = value {
            let _ = write!(text, " {key}={value}");
        }
    }
    text
}
