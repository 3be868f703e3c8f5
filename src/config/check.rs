//! The report of `wxrelay check`: what the relay will do with this config,
//! in the order an operator reads it. Secrets appear as `***`, keys as
//! fingerprints, and URL passwords are masked.

use super::units::format_size;
use super::{
    Account, AccountApi, Adapters, Breaker, RetryPolicy, Secret, ServerSettings, Settings,
    SpoolBackend, SpoolSettings, Target, TelemetrySettings, TokenSource,
};
use crate::route::{LateReply, Rule};
use crate::wechat::crypto::KeyRing;
use crate::wechat::family::Family;
use humantime::format_duration;
use std::fmt::{self, Display, Write as _};

/// Renders the validated config, the route table and the warnings.
pub fn render_check(settings: &Settings) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = report(settings, &mut out);
    out
}

/// The report, one section after the other.
fn report(settings: &Settings, out: &mut String) -> fmt::Result {
    server(&settings.server, out)?;
    spool(&settings.spool, out)?;
    for account in settings.accounts.values() {
        self::account(account, out)?;
    }
    for target in settings.targets.values() {
        self::target(target, out)?;
    }
    routes(&settings.routes, out)?;
    telemetry(&settings.telemetry, out)?;
    let warnings = settings.warnings();
    if !warnings.is_empty() {
        writeln!(out, "\nwarnings")?;
        for warning in warnings {
            writeln!(out, "  - {warning}")?;
        }
    }
    Ok(())
}

fn server(s: &ServerSettings, out: &mut String) -> fmt::Result {
    writeln!(out, "server")?;
    row(out, "listen", format!("{} (WeChat pushes)", s.listen))?;
    row(
        out,
        "admin_listen",
        format!("{} (metrics, health, admin)", s.admin_listen),
    )?;
    row(out, "max_body", format_size(s.max_body))?;
    row(out, "max_connections", s.max_connections)?;
    // Longer than the column: one space keeps it readable.
    writeln!(
        out,
        "  max_body_bytes_in_flight {}",
        format_size(s.max_body_bytes_in_flight)
    )?;
    row(out, "reply_budget", format_duration(s.reply_budget))?;
    row(out, "header_timeout", format_duration(s.header_timeout))?;
    row(out, "shutdown_timeout", format_duration(s.shutdown_timeout))?;
    row(out, "admin_token", masked(s.admin_token.as_ref()))?;
    if !s.admin_hosts.is_empty() {
        row(out, "admin_hosts", s.admin_hosts.join(", "))?;
    }
    row(out, "ui_secure_cookie", s.ui_secure_cookie)
}

fn spool(spool: &SpoolSettings, out: &mut String) -> fmt::Result {
    writeln!(out, "\nspool")?;
    match &spool.backend {
        SpoolBackend::Sqlite { path } => {
            row(out, "backend", "sqlite")?;
            row(out, "path", path.display())?;
        }
        SpoolBackend::Postgres(pg) => {
            row(out, "backend", "postgres")?;
            row(out, "url", &pg.display)?;
            row(out, "schema", &pg.schema)?;
            row(out, "pool_size", pg.pool_size)?;
            row(out, "sslmode", pg.sslmode.as_str())?;
            if let Some(ca) = &pg.ca_file {
                row(out, "ca_file", ca.display())?;
            }
        }
    }
    row(out, "dedup_window", format_duration(spool.dedup_window))
}

/// Shown only when traces are exported: off is the default.
fn telemetry(telemetry: &TelemetrySettings, out: &mut String) -> fmt::Result {
    let Some(endpoint) = &telemetry.otlp_endpoint else {
        return Ok(());
    };
    writeln!(out, "\ntelemetry")?;
    row(out, "otlp_endpoint", endpoint)?;
    row(out, "service_name", &telemetry.service_name)
}

fn account(account: &Account, out: &mut String) -> fmt::Result {
    writeln!(out, "\naccount {} at /wx/{}", account.id, account.id)?;
    row(out, "kind", account.kind.as_str())?;
    for (field, url) in console_urls(account) {
        row(out, field, url)?;
    }
    match account.kind {
        Family::Wecom => row(out, "corp_id", &account.app_id)?,
        Family::OpenPlatform => row(
            out,
            "app_id",
            format!("{} (the platform's)", account.app_id),
        )?,
        Family::OfficialAccount | Family::MiniProgram => row(out, "app_id", &account.app_id)?,
    }
    if account.kind == Family::MiniProgram {
        row(out, "data_format", account.codec.as_str())?;
    }
    row(out, "mode", account.mode.as_str())?;
    row(out, "token", &account.token)?;
    keys(out, account.keys.as_ref())?;
    match account.timestamp_window {
        None => row(out, "timestamp_window", "off")?,
        Some(window) => row(out, "timestamp_window", format_duration(window))?,
    }
    api(account.api.as_ref(), out)
}

/// The API section: where the token comes from, never the secret or a token.
fn api(api: Option<&AccountApi>, out: &mut String) -> fmt::Result {
    let Some(api) = api else {
        return Ok(());
    };
    row(out, "api_base", masked_url(&api.api_base))?;
    match &api.token_source {
        TokenSource::StableToken { app_secret } => {
            row(out, "token_source", "stable_token")?;
            row(out, "app_secret", masked(Some(app_secret)))
        }
        TokenSource::Url(url) => {
            row(out, "token_source", "url")?;
            row(out, "token_url", masked_url(url))
        }
    }
}

/// The URLs to enter in the kind's console, with the console's field for
/// each; the relay does not know the host WeChat reaches it at.
pub fn console_urls(account: &Account) -> Vec<(&'static str, String)> {
    let url = format!("https://<host>/wx/{}", account.id);
    match account.kind {
        Family::OfficialAccount => vec![("URL", format!("{url}  (服务器配置 → 服务器地址)"))],
        Family::MiniProgram => vec![("URL", format!("{url}  (消息推送 → URL)"))],
        Family::OpenPlatform => vec![
            ("authorisation URL", format!("{url}  (授权事件接收URL)")),
            ("message URL", format!("{url}/$APPID$  (消息与事件接收URL)")),
        ],
        Family::Wecom => vec![("URL", format!("{url}  (接收消息 → 设置API接收 → URL)"))],
    }
}

fn target(target: &Target, out: &mut String) -> fmt::Result {
    writeln!(out, "\ntarget {}", target.name)?;
    row(out, "url", masked_url(&target.url))?;
    row(out, "format", target.format.as_str())?;
    row(out, "retry", retry(&target.retry))?;
    row(out, "timeout", format_duration(target.timeout))?;
    row(out, "concurrency", target.concurrency)?;
    if target.paused {
        row(out, "paused", "yes: deliveries wait in the spool")?;
    }
    match target.max_age {
        None => row(out, "max_age", "off")?,
        Some(age) => row(out, "max_age", format_duration(age))?,
    }
    row(out, "ordering", target.ordering.as_str())?;
    row(out, "breaker", breaker(&target.breaker))?;
    row(out, "secret", masked(target.secret.as_ref()))?;
    if let Some(server) = &target.wechat {
        row(out, "mode", server.mode.as_str())?;
        let app_id = server.app_id.as_deref().unwrap_or("the event's account's");
        row(out, "app_id", app_id)?;
        let corp_id = server.corp_id.as_deref().unwrap_or("the event's account's");
        row(out, "corp_id", corp_id)?;
        row(out, "token", &server.token)?;
        keys(out, server.keys.as_ref())?;
    }
    let adapters = adapters(&target.adapters);
    if !adapters.is_empty() {
        row(out, "adapters", adapters.join(", "))?;
    }
    Ok(())
}

/// `durable: 8 attempts over 1d (waits 5s, 30s, …)`.
fn retry(retry: &RetryPolicy) -> String {
    let delays: Vec<String> = retry
        .delays
        .iter()
        .map(|d| format_duration(*d).to_string())
        .collect();
    let schedule = if delays.is_empty() {
        "no retries".to_owned()
    } else {
        format!("waits {}", delays.join(", "))
    };
    format!(
        "{}: {} attempts over {} ({schedule})",
        retry.class.as_str(),
        retry.max_attempts(),
        format_duration(retry.span()),
    )
}

fn breaker(breaker: &Breaker) -> String {
    if breaker.failures == 0 {
        return "off".to_owned();
    }
    format!(
        "opens after {} failures in a row; probes after {}, up to every {}",
        breaker.failures,
        format_duration(breaker.backoff),
        format_duration(breaker.max_backoff)
    )
}

fn adapters(a: &Adapters) -> Vec<String> {
    [
        a.strip_qrscene
            .then(|| "event_key = strip_qrscene".to_owned()),
        a.subscribe_as_scan.then(|| "subscribe_as_scan".to_owned()),
        a.content_type
            .as_ref()
            .map(|c| format!("content_type = {c}")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn routes(routes: &[Rule], out: &mut String) -> fmt::Result {
    writeln!(out, "\nroutes (first match wins)")?;
    if routes.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (i, rule) in routes.iter().enumerate() {
        let to: Vec<String> = rule
            .to
            .iter()
            .map(|name| match &rule.reply_from {
                Some(replier) if replier == name => format!("{name} (replies)"),
                _ => name.clone(),
            })
            .collect();
        let described = rule.matcher.describe();
        let late = match rule.late_reply {
            LateReply::None => String::new(),
            LateReply::CustomerService => " (late: customer_service)".to_owned(),
            LateReply::NextMessage => format!(
                " (late: next_message within {})",
                format_duration(rule.late_reply_ttl)
            ),
        };
        writeln!(out, "  [{i}] {described} -> {}{late}", to.join(", "))?;
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for printing.
pub fn masked_url(url: &url::Url) -> url::Url {
    let mut url = url.clone();
    if url.password().is_some() {
        // Only fails for URLs that cannot carry a password at all.
        let _ = url.set_password(Some("***"));
    }
    url
}

/// The key fingerprints, never the keys.
fn keys(out: &mut String, keys: Option<&KeyRing>) -> fmt::Result {
    match keys {
        None => row(out, "encoding_aes_key", "none"),
        Some(ring) => {
            row(out, "encoding_aes_key", ring.current.fingerprint())?;
            match &ring.previous {
                Some(previous) => row(out, "previous key", previous.fingerprint()),
                None => Ok(()),
            }
        }
    }
}

fn row(out: &mut String, key: &str, value: impl Display) -> fmt::Result {
    writeln!(out, "  {key:<18}{value}")
}

fn masked(secret: Option<&Secret>) -> &'static str {
    if secret.is_some() {
        "***"
    } else {
        "none"
    }
}
