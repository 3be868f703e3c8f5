//! Raw config → [`Settings`] in one fallible step. Every check records a
//! [`Problem`] at its key path and moves on, so one run of `wxrelay check`
//! lists everything that is wrong, not just the first thing.

use super::raw::{
    OneOrMany, RawAccount, RawApi, RawBreaker, RawConfig, RawMatch, RawRoute, RawServer, RawSpool,
    RawTarget, RawTelemetry, RawTrail, StringOrNumber,
};
use super::settings::{
    decode_webhook_secret, Account, AccountApi, Adapters, Breaker, Format, Mode, Ordering,
    PostgresSettings, RetryClass, RetryPolicy, ServerSettings, Settings, Signer, SpoolBackend,
    SpoolSettings, SslMode, Target, TelemetrySettings, TokenSource, TrailSettings, WechatServer,
};
use super::units::{parse_duration, parse_size};
use super::{ConfigError, Problem, Secret, ENV_PREFIX};
use crate::route::{LateReply, Match, Rule, DEFAULT_LATE_REPLY_TTL};
use crate::wechat::crypto::{AesKey, KeyRing};
use crate::wechat::family::{is_app_id, Codec, Family};
use crate::wechat::inbound::SINGLE_PARAMS;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_MAX_BODY: usize = 256 * 1024;
const MAX_BODY_RANGE: std::ops::RangeInclusive<usize> = 1024..=16 * 1024 * 1024;
const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i64> = 1..=1_000_000;
/// 128 bodies of the default `max_body`: far more than WeChat sends at once,
/// and a bounded share of a 512 MiB container.
const DEFAULT_BODY_BYTES_IN_FLIGHT: usize = 32 * 1024 * 1024;
const MAX_BODY_BYTES_IN_FLIGHT: usize = 1024 * 1024 * 1024;
/// WeChat abandons a push it has no answer for after five seconds.
const WECHAT_DEADLINE: Duration = Duration::from_secs(5);
const DEFAULT_REPLY_BUDGET: Duration = Duration::from_secs(4);
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SPOOL_PATH: &str = "./data/spool.db";
const DEFAULT_SCHEMA: &str = "wxrelay";
const DEFAULT_SERVICE_NAME: &str = "wxrelay";
/// Enough for the group commit, the lease queries and the operator
/// commands at once; PostgreSQL's own default limit is 100 connections.
const DEFAULT_POOL_SIZE: usize = 8;
const POOL_SIZE_RANGE: std::ops::RangeInclusive<i64> = 2..=256;
const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);
const DEFAULT_TIMESTAMP_WINDOW: Duration = Duration::from_secs(300);
const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_CONCURRENCY: usize = 8;
const CONCURRENCY_RANGE: std::ops::RangeInclusive<i64> = 1..=1024;
/// WeChat's API host, where access tokens and Customer Service messages go.
const DEFAULT_API_BASE: &str = "https://api.weixin.qq.com";
/// The longest a reply target may think on a route whose late answers are
/// kept: past two minutes a user has stopped waiting for this answer.
const MAX_LATE_TIMEOUT: Duration = Duration::from_secs(120);
const BREAKER_FAILURES_RANGE: std::ops::RangeInclusive<i64> = 0..=100_000;

pub(crate) fn settings(raw: RawConfig) -> Result<Settings, ConfigError> {
    let mut p = Problems::default();
    let server = server(raw.server, &mut p);
    let found = p.0.len();
    let spool = spool(raw.spool, &mut p);
    let dedup_window_valid = p.0.len() == found;
    if raw.accounts.is_empty() {
        p.add(
            "accounts",
            "no accounts configured: add an [accounts.<id>] section",
        );
    }
    // Routes are checked against the names in the file, not against the
    // entries that validated, so one bad target does not also make every
    // route that names it an error.
    let names = Names::of(&raw.accounts, &raw.targets);
    let accounts = raw
        .accounts
        .into_iter()
        .filter_map(|(id, raw)| Some((id.clone(), account(id, raw, &mut p)?)))
        .collect();
    let targets = raw
        .targets
        .into_iter()
        .filter_map(|(name, raw)| Some((name.clone(), target(name, raw, &mut p)?)))
        .collect();
    if dedup_window_valid {
        dedup_outlasts_timestamp_windows(&spool, &accounts, &mut p);
    }
    let routes = routes(raw.routes, &names, &mut p);
    let telemetry = telemetry(raw.telemetry, &mut p);
    let trail = trail(raw.trail, &mut p);
    let settings = Settings {
        server,
        spool,
        accounts,
        targets,
        routes,
        telemetry,
        trail,
    };
    if p.0.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigError { problems: p.0 })
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The value, or `None` with the error recorded at `path`.
    fn ok<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.add(path, message)).ok()
    }

    /// A duration key: its default when absent, and the default again (with
    /// the problem recorded) when it does not parse or is zero.
    fn duration(&mut self, path: &str, raw: Option<String>, default: Duration) -> Duration {
        let Some(text) = raw else { return default };
        match self.ok(path, parse_duration(&text)) {
            Some(Duration::ZERO) => {
                self.add(path, "must be greater than zero");
                default
            }
            Some(duration) => duration,
            None => default,
        }
    }
}

fn server(raw: RawServer, p: &mut Problems) -> ServerSettings {
    let (listen, admin_listen) = listeners(p, raw.listen, raw.admin_listen);
    let max_body = max_body(p, raw.max_body);
    let (max_connections, max_body_bytes_in_flight) = capacity(
        p,
        raw.max_connections,
        raw.max_body_bytes_in_flight,
        max_body,
    );
    let reply_budget = p.duration(
        "server.reply_budget",
        raw.reply_budget,
        DEFAULT_REPLY_BUDGET,
    );
    if reply_budget >= WECHAT_DEADLINE {
        p.add(
            "server.reply_budget",
            "must be less than 5s: WeChat gives up on a push after 5 seconds",
        );
    }
    let allow_unauthenticated_admin = raw.allow_unauthenticated_admin.unwrap_or(false);
    let admin_token = admin_token(
        p,
        (raw.admin_token, raw.admin_token_file),
        admin_listen,
        allow_unauthenticated_admin,
    );
    ServerSettings {
        listen,
        admin_listen,
        max_body,
        max_connections,
        max_body_bytes_in_flight,
        reply_budget,
        header_timeout: p.duration(
            "server.header_timeout",
            raw.header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        ),
        shutdown_timeout: p.duration(
            "server.shutdown_timeout",
            raw.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        ),
        admin_token,
        allow_unauthenticated_admin,
        ui_secure_cookie: raw.ui_secure_cookie.unwrap_or(false),
        admin_hosts: admin_hosts(p, raw.admin_hosts.unwrap_or_default()),
    }
}

/// The host names the admin listener also answers under: lower case,
/// without a trailing dot; a name only (no port, no scheme, no path).
fn admin_hosts(p: &mut Problems, names: Vec<String>) -> Vec<String> {
    let mut hosts = Vec::new();
    for name in names {
        let host = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let fits = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if host.is_empty() || !host.chars().all(fits) {
            p.add(
                "server.admin_hosts",
                format!(
                    "{name:?} is not a host name: list names such as \"relay.internal\", \
                     without a port or scheme"
                ),
            );
        } else {
            hosts.push(host);
        }
    }
    hosts
}

/// The shortest admin token taken, in bytes: long enough that guessing it
/// at the pages' sign-in rate is hopeless.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// The public and admin addresses, which must differ.
fn listeners(
    p: &mut Problems,
    listen: Option<String>,
    admin_listen: Option<String>,
) -> (SocketAddr, SocketAddr) {
    let listen = address(p, "server.listen", listen, DEFAULT_LISTEN);
    let admin_listen = address(p, "server.admin_listen", admin_listen, DEFAULT_ADMIN_LISTEN);
    if same_socket(listen, admin_listen) {
        p.add(
            "server.admin_listen",
            "must differ from server.listen: the admin API must never be reachable on the public address",
        );
    }
    (listen, admin_listen)
}

fn max_body(p: &mut Problems, raw: Option<StringOrNumber>) -> usize {
    let Some(text) = raw else {
        return DEFAULT_MAX_BODY;
    };
    match p.ok("server.max_body", parse_size(&text.0)) {
        Some(size) if MAX_BODY_RANGE.contains(&size) => size,
        Some(_) => {
            p.add("server.max_body", "must be between 1KiB and 16MiB");
            DEFAULT_MAX_BODY
        }
        None => DEFAULT_MAX_BODY,
    }
}

/// `max_connections` and `max_body_bytes_in_flight`: what a flood can take.
fn capacity(
    p: &mut Problems,
    max_connections: Option<i64>,
    max_body_bytes_in_flight: Option<StringOrNumber>,
    max_body: usize,
) -> (usize, usize) {
    let max_connections = match max_connections {
        None => crate::server::default_max_connections(),
        Some(n) if MAX_CONNECTIONS_RANGE.contains(&n) => n as usize,
        Some(_) => {
            p.add("server.max_connections", "must be between 1 and 1000000");
            crate::server::default_max_connections()
        }
    };
    let max_body_bytes_in_flight = match max_body_bytes_in_flight {
        None => DEFAULT_BODY_BYTES_IN_FLIGHT.max(max_body),
        Some(text) => match p.ok("server.max_body_bytes_in_flight", parse_size(&text.0)) {
            Some(size) if size > MAX_BODY_BYTES_IN_FLIGHT => {
                p.add("server.max_body_bytes_in_flight", "must be at most 1GiB");
                DEFAULT_BODY_BYTES_IN_FLIGHT
            }
            Some(size) if size < max_body => {
                p.add(
                    "server.max_body_bytes_in_flight",
                    "must be at least server.max_body: a push of the largest allowed size could never be read",
                );
                max_body
            }
            Some(size) => size,
            None => DEFAULT_BODY_BYTES_IN_FLIGHT,
        },
    };
    (max_connections, max_body_bytes_in_flight)
}

/// The admin token, required unless the admin listener is on loopback or an
/// open admin API is allowed explicitly.
fn admin_token(
    p: &mut Problems,
    (inline, file): (Option<Secret>, Option<PathBuf>),
    admin_listen: SocketAddr,
    allow_unauthenticated_admin: bool,
) -> Option<Secret> {
    let admin_token = secret_source(p, "server.admin_token", inline, file);
    // Another host reaching an open admin listener could reload the
    // configuration at will: that takes a token or a deliberate choice.
    if matches!(admin_token, Ok(None))
        && !admin_listen.ip().is_loopback()
        && !allow_unauthenticated_admin
    {
        p.add(
            "server.admin_token",
            format!(
                "required when admin_listen ({admin_listen}) is not a loopback address: \
                 set admin_token or admin_token_file, or allow_unauthenticated_admin = true \
                 if only trusted hosts can reach it"
            ),
        );
    }
    admin_token.ok().flatten().map(|(token, path)| {
        if token.expose().is_empty() {
            p.add(path, "must not be empty");
        } else if token.expose().len() < MIN_ADMIN_TOKEN {
            p.add(
                path,
                format!(
                    "must be at least {MIN_ADMIN_TOKEN} bytes long: a short token can be \
                     guessed (generate one with `openssl rand -hex 32`)"
                ),
            );
        } else if !token.expose().bytes().all(|b| b.is_ascii_graphic()) {
            // It travels in an Authorization header, which trims white space
            // and may carry only visible ASCII: another token never matches.
            p.add(
                path,
                "must be visible ASCII characters, without spaces: it is sent in an \
                 Authorization header",
            );
        }
        token
    })
}

fn address(p: &mut Problems, path: &str, raw: Option<String>, default: &str) -> SocketAddr {
    let text = raw.as_deref().unwrap_or(default);
    let parsed = text.parse().map_err(|_| {
        format!(
            "invalid address {text:?}: expected an IP address and port, e.g. \"127.0.0.1:8080\""
        )
    });
    p.ok(path, parsed)
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Whether binding both would collide. Port 0 asks the OS for a fresh port
/// each time, so two such addresses never collide.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn spool(mut raw: RawSpool, p: &mut Problems) -> SpoolSettings {
    let dedup_window = p.duration(
        "spool.dedup_window",
        raw.dedup_window.take(),
        DEFAULT_DEDUP_WINDOW,
    );
    let backend = match raw.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            let postgres_keys = [
                ("url", raw.url.is_some()),
                ("url_file", raw.url_file.is_some()),
                ("schema", raw.schema.is_some()),
                ("pool_size", raw.pool_size.is_some()),
                ("sslmode", raw.sslmode.is_some()),
                ("ca_file", raw.ca_file.is_some()),
            ];
            for (key, _) in postgres_keys.iter().filter(|(_, set)| *set) {
                p.add(
                    format!("spool.{key}"),
                    "only for backend = \"postgres\" (the spool is SQLite)",
                );
            }
            SpoolBackend::Sqlite {
                path: raw
                    .path
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_PATH)),
            }
        }
        "postgres" => {
            if raw.path.is_some() {
                p.add(
                    "spool.path",
                    "only for backend = \"sqlite\" (the spool is PostgreSQL)",
                );
            }
            SpoolBackend::Postgres(postgres(raw, p))
        }
        other => {
            p.add(
                "spool.backend",
                format!("unknown backend {other:?}: expected \"sqlite\" or \"postgres\""),
            );
            SpoolBackend::Sqlite {
                path: PathBuf::from(DEFAULT_SPOOL_PATH),
            }
        }
    };
    SpoolSettings {
        backend,
        dedup_window,
    }
}

/// Kept a week by default: long enough for "it failed on Monday".
const DEFAULT_TRAIL_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_TRAIL_MAX_EVENTS: u64 = 1_000_000;
const DEFAULT_TRAIL_MAX_REFUSALS: u64 = 100_000;

fn trail(raw: RawTrail, p: &mut Problems) -> TrailSettings {
    let key = secret_source(p, "trail.key", raw.key, raw.key_file)
        .ok()
        .flatten()
        .map(|(key, path)| {
            if key.expose().len() < 16 {
                p.add(
                    path,
                    "must be at least 16 characters: it keys the OpenIDs' hashes",
                );
            }
            key
        });
    let max_events = at_least_one(
        p,
        "trail.max_events",
        raw.max_events,
        DEFAULT_TRAIL_MAX_EVENTS,
    );
    let max_refusals = at_least_one(
        p,
        "trail.max_refusals",
        raw.max_refusals,
        DEFAULT_TRAIL_MAX_REFUSALS,
    );
    let search_rows = at_least_one(
        p,
        "trail.search_rows",
        raw.search_rows,
        crate::trail::SEARCH_ROWS as u64,
    );
    let search_rows = usize::try_from(search_rows).unwrap_or(usize::MAX);
    TrailSettings {
        enabled: raw.enabled.unwrap_or(true),
        key,
        keep_bodies: raw.keep_bodies.unwrap_or(false),
        retain: p.duration("trail.retain", raw.retain, DEFAULT_TRAIL_RETAIN),
        max_events,
        search_rows,
        max_refusals,
    }
}

/// A count of rows to keep: `default` when unset, at least 1.
fn at_least_one(p: &mut Problems, key: &str, raw: Option<i64>, default: u64) -> u64 {
    match raw {
        None => default,
        Some(n) if n >= 1 => n as u64,
        Some(_) => {
            p.add(key, "must be at least 1");
            default
        }
    }
}

fn telemetry(raw: RawTelemetry, p: &mut Problems) -> TelemetrySettings {
    let otlp_endpoint = raw
        .otlp_endpoint
        .and_then(|text| p.ok("telemetry.otlp_endpoint", otlp_endpoint(&text)));
    let service_name = raw
        .service_name
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    if service_name.trim().is_empty() || service_name.chars().any(char::is_control) {
        p.add(
            "telemetry.service_name",
            "must be a name: not empty, no control characters",
        );
    }
    TelemetrySettings {
        otlp_endpoint,
        service_name,
    }
}

/// A collector's base URL: the relay posts to its `/v1/traces`, so a
/// query or a fragment would be lost, and credentials go in a header.
fn otlp_endpoint(text: &str) -> Result<url::Url, String> {
    let url = check_url(text)?;
    if url.query().is_some() {
        return Err("must not have a query: spans are posted to its /v1/traces".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials: set a header with OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
        );
    }
    Ok(url)
}

fn postgres(raw: RawSpool, p: &mut Problems) -> PostgresSettings {
    let (url, display) = postgres_url_setting(p, raw.url, raw.url_file);
    let schema = raw.schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned());
    if !is_identifier(&schema) {
        p.add(
            "spool.schema",
            format!(
                "{schema:?} is not a plain identifier: use lower-case letters, digits and _, \
                 starting with a letter or _, at most 63 characters"
            ),
        );
    }
    let pool_size = match raw.pool_size {
        None => DEFAULT_POOL_SIZE,
        Some(n) if POOL_SIZE_RANGE.contains(&n) => n as usize,
        Some(n) => {
            p.add(
                "spool.pool_size",
                format!(
                    "must be between {} and {}, got {n}",
                    POOL_SIZE_RANGE.start(),
                    POOL_SIZE_RANGE.end()
                ),
            );
            DEFAULT_POOL_SIZE
        }
    };
    let sslmode = sslmode(p, raw.sslmode.as_deref(), raw.ca_file.as_deref());
    PostgresSettings {
        url,
        display,
        schema,
        pool_size,
        sslmode,
        ca_file: raw.ca_file,
    }
}

/// The database URL, from `url`, `url_file` or the environment, and how it
/// is shown (without its password).
fn postgres_url_setting(
    p: &mut Problems,
    url: Option<Secret>,
    url_file: Option<PathBuf>,
) -> (Secret, String) {
    match secret_source(p, "spool.url", url, url_file) {
        Ok(Some((url, path))) => match postgres_url(url.expose()) {
            Ok(display) => (url, display),
            Err(message) => {
                p.add(path, message);
                (url, String::new())
            }
        },
        Ok(None) => {
            p.add(
                "spool.url",
                format!(
                    "required with backend = \"postgres\": set url, url_file or \
                     {ENV_PREFIX}SPOOL__URL (e.g. postgres://relay@db.internal:5432/relay)"
                ),
            );
            (Secret::new(""), String::new())
        }
        Err(()) => (Secret::new(""), String::new()),
    }
}

/// `sslmode`, and the `ca_file` it needs or cannot use.
fn sslmode(p: &mut Problems, raw: Option<&str>, ca_file: Option<&std::path::Path>) -> SslMode {
    let sslmode = match raw {
        None => SslMode::Disable,
        Some(text) => SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .unwrap_or_else(|| {
                p.add(
                    "spool.sslmode",
                    format!(
                        "unknown sslmode {text:?}: expected one of disable, require, verify-ca, \
                         verify-full"
                    ),
                );
                SslMode::Disable
            }),
    };
    if let Some(file) = ca_file {
        if sslmode == SslMode::Disable {
            p.add(
                "spool.ca_file",
                "needs sslmode = \"verify-ca\" or \"verify-full\": without TLS it is not used",
            );
        } else if let Err(e) = std::fs::read(file) {
            p.add(
                "spool.ca_file",
                format!("cannot read {}: {e}", file.display()),
            );
        }
    }
    sslmode
}

/// Checks a PostgreSQL connection string (a URL or `key=value` pairs) and
/// returns it without its password. Errors never quote it: it may hold one.
fn postgres_url(text: &str) -> Result<String, String> {
    let config: tokio_postgres::Config = text.parse().map_err(|e| {
        format!("not a PostgreSQL connection string ({e}); expected postgres://user:password@host:5432/database")
    })?;
    if config.get_hosts().is_empty() {
        return Err("must name a host, e.g. postgres://relay@db.internal:5432/relay".to_owned());
    }
    let at_in_host = config
        .get_hosts()
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(name) if name.contains('@')));
    if at_in_host {
        return Err("its host part holds an '@': write an '@' in the password as %40".to_owned());
    }
    if config.get_ssl_mode() != tokio_postgres::config::SslMode::Prefer {
        return Err(
            "sets sslmode: remove it from the URL and set spool.sslmode instead".to_owned(),
        );
    }
    Ok(crate::spool::postgres_display(&config))
}

/// A name PostgreSQL takes unquoted and unchanged: the schema name is
/// written into statements, so nothing else is accepted.
fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    first_ok
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A push stays acceptable for its account's timestamp window, so a replay of
/// it is only recognised as a duplicate if its dedup key lives that long.
fn dedup_outlasts_timestamp_windows(
    spool: &SpoolSettings,
    accounts: &BTreeMap<String, Account>,
    p: &mut Problems,
) {
    for account in accounts.values() {
        if let Some(window) = account.timestamp_window.filter(|w| *w > spool.dedup_window) {
            p.add(
                "spool.dedup_window",
                format!(
                    "must be at least accounts.{}.timestamp_window ({}): a push replayed within \
                     that window would be stored and delivered again",
                    account.id,
                    humantime::format_duration(window)
                ),
            );
        }
    }
}

fn account(id: String, raw: RawAccount, p: &mut Problems) -> Option<Account> {
    let at = |key: &str| format!("accounts.{id}.{key}");
    let found = p.0.len();
    check_name(p, &format!("accounts.{id}"), &id, "account id");
    let kind = match raw.kind.as_deref() {
        None => Some(Family::OfficialAccount),
        Some(text) => p.ok(
            &at("kind"),
            choice(&Family::ALL, Family::as_str, text, "kind"),
        ),
    };
    let app_id = kind.and_then(|kind| receive_id(p, &at, kind, raw.app_id, raw.corp_id));
    let codec = kind.map(|kind| data_format(p, &at, kind, raw.data_format));
    let always_sealed = matches!(kind, Some(Family::OpenPlatform | Family::Wecom));
    let creds = server_credentials(
        p,
        &at,
        RawCredentials {
            token: raw.token,
            token_file: raw.token_file,
            encoding_aes_key: raw.encoding_aes_key,
            previous_encoding_aes_key: raw.previous_encoding_aes_key,
            // Every push of these families is encrypted: secure is the only mode.
            mode: raw
                .mode
                .or_else(|| always_sealed.then(|| "secure".to_owned())),
        },
        "as set in the WeChat admin console",
    );
    if let (Some(kind), Some(mode)) = (kind, creds.mode) {
        if always_sealed && mode != Mode::Secure {
            p.add(
                at("mode"),
                format!(
                    "must be \"secure\" (or left out) for kind = {:?}: WeChat encrypts every push of this kind",
                    kind.as_str()
                ),
            );
        }
    }

    // "0s" is how the file says "off"; `None` says it to the handler.
    let timestamp_window = match raw.timestamp_window {
        None => Some(DEFAULT_TIMESTAMP_WINDOW),
        Some(text) => p.ok(&at("timestamp_window"), parse_duration(&text)),
    }
    .filter(|window| !window.is_zero());
    let api = raw.api.and_then(|raw| api(p, &at, raw));
    if api.is_some() && kind.is_some_and(|k| k != Family::OfficialAccount) {
        p.add(
            at("api"),
            "only an Official Account sends late replies through the Customer Service API",
        );
    }

    if p.0.len() > found {
        return None;
    }
    Some(Account {
        id,
        kind: kind?,
        codec: codec?,
        app_id: app_id?,
        token: creds.token?,
        keys: creds.keys,
        mode: creds.mode?,
        timestamp_window,
        api,
    })
}

/// The receive id the kind's frames end in: `app_id` for the AppID
/// families, `corp_id` for WeCom; the other key is refused.
fn receive_id(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    kind: Family,
    app_id: Option<String>,
    corp_id: Option<String>,
) -> Option<String> {
    let (used, unused, required) = match kind {
        Family::Wecom => (
            ("corp_id", corp_id),
            ("app_id", app_id),
            "required for kind = \"wecom\": the CorpID (a self-built app) or SuiteID (a suite) \
             its pushes are sealed for",
        ),
        Family::OfficialAccount => (
            ("app_id", app_id),
            ("corp_id", corp_id),
            "required: the AppID from the WeChat admin console (\"wx\" and 16 hex digits)",
        ),
        Family::MiniProgram => (
            ("app_id", app_id),
            ("corp_id", corp_id),
            "required for kind = \"mini_program\": the Mini Program's AppID (\"wx\" and 16 hex digits)",
        ),
        Family::OpenPlatform => (
            ("app_id", app_id),
            ("corp_id", corp_id),
            "required for kind = \"open_platform\": the platform's own (component) AppID, \
             which every authoriser's push is sealed for",
        ),
    };
    if unused.1.is_some() {
        p.add(
            at(unused.0),
            format!(
                "not used for kind = {:?}: its pushes are sealed for {}",
                kind.as_str(),
                used.0
            ),
        );
    }
    let valid = |id: &str| match kind {
        Family::Wecom => is_corp_id(id),
        _ => is_app_id(id),
    };
    match used.1 {
        None => {
            p.add(at(used.0), required);
            None
        }
        Some(id) if valid(&id) => Some(id),
        Some(_) if kind == Family::Wecom => {
            p.add(
                at(used.0),
                "must be 2 to 64 letters and digits, e.g. ww and 16 hex digits",
            );
            None
        }
        Some(_) => {
            p.add(at(used.0), "must be \"wx\" followed by 16 hex digits");
            None
        }
    }
}

/// A CorpID or SuiteID: `ww` and 16 hex digits today, `wx…` for older
/// corporations, `tj…` for some suites; letters and digits, whatever the form.
fn is_corp_id(id: &str) -> bool {
    (2..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A Mini Program's `data_format`, as its console's 数据格式; the other
/// kinds' pushes are XML.
fn data_format(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    kind: Family,
    raw: Option<String>,
) -> Codec {
    match (kind, raw) {
        (_, None) => Codec::Xml,
        (Family::MiniProgram, Some(text)) => p
            .ok(
                &at("data_format"),
                choice(&Codec::ALL, Codec::as_str, &text, "data_format"),
            )
            .unwrap_or_default(),
        (kind, Some(_)) => {
            p.add(
                at("data_format"),
                format!(
                    "only for kind = \"mini_program\", not {:?}: the other kinds' pushes are XML",
                    kind.as_str()
                ),
            );
            Codec::Xml
        }
    }
}

/// What a WeChat server is configured with, as written: an account's, or a
/// `format = "wechat"` target's, which mirrors the account's keys.
struct RawCredentials {
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    encoding_aes_key: Option<Secret>,
    previous_encoding_aes_key: Option<Secret>,
    mode: Option<String>,
}

/// The checked credentials; a field is `None` when a problem was recorded.
struct Credentials {
    token: Option<Secret>,
    mode: Option<Mode>,
    keys: Option<KeyRing>,
}

/// Checks a Token, a mode and the keys by WeChat's rules; `mode_source` says
/// where the operator finds the mode.
fn server_credentials(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    raw: RawCredentials,
    mode_source: &str,
) -> Credentials {
    let token = match secret_source(p, &at("token"), raw.token, raw.token_file) {
        Ok(None) => {
            p.add(at("token"), "required: set token or token_file");
            None
        }
        Ok(Some((token, path))) => p.ok(&path, check_token(token.expose()).map(|()| token)),
        Err(()) => None,
    };

    let mode = match raw.mode {
        None => {
            p.add(
                at("mode"),
                format!("required: plaintext, compat or secure, {mode_source}"),
            );
            None
        }
        Some(text) => p.ok(&at("mode"), choice(&Mode::ALL, Mode::as_str, &text, "mode")),
    };

    let mut decode = |key: &str, value: Option<Secret>| {
        value.and_then(|v| {
            p.ok(
                &at(key),
                AesKey::from_encoding(v.expose()).map_err(|e| e.to_string()),
            )
        })
    };
    let has_current = raw.encoding_aes_key.is_some();
    let current = decode("encoding_aes_key", raw.encoding_aes_key);
    let has_previous = raw.previous_encoding_aes_key.is_some();
    let previous = decode("previous_encoding_aes_key", raw.previous_encoding_aes_key);
    if has_previous && !has_current {
        p.add(
            at("previous_encoding_aes_key"),
            "requires encoding_aes_key: it is the key being rotated out",
        );
    }
    if current.is_some() && current == previous {
        p.add(
            at("previous_encoding_aes_key"),
            "must differ from encoding_aes_key",
        );
    }
    if let Some(mode @ (Mode::Compat | Mode::Secure)) = mode {
        if !has_current {
            p.add(
                at("encoding_aes_key"),
                format!("required when mode is {}", mode.as_str()),
            );
        }
    }
    Credentials {
        token,
        mode,
        keys: current.map(|current| KeyRing { current, previous }),
    }
}

/// WeChat's own rule for the server Token.
fn check_token(token: &str) -> Result<(), String> {
    let len = token.chars().count();
    if !(3..=32).contains(&len) {
        return Err(format!(
            "must be 3 to 32 letters or digits, got {len} characters"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("must contain only ASCII letters and digits".to_owned());
    }
    Ok(())
}

/// Account ids and target names appear in URLs, metric labels and logs.
/// They are lower-case because figment lower-cases the keys of `WXRELAY_`
/// variables and splits them at `__`: an id with capitals, a `__` or a
/// trailing `_` could never be overridden.
fn check_name(p: &mut Problems, path: &str, name: &str, what: &str) {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        p.add(
            path,
            format!("{what} must be 1 to 64 characters of a-z, 0-9, _ and -"),
        );
    } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
        let env = format!("{ENV_PREFIX}{}__", path.replace('.', "__").to_uppercase());
        p.add(
            path,
            format!(
                "{what} must be lower-case: {env}… variables are read as {:?}, so they \
                 could never override it; rename it to {:?}",
                name.to_lowercase(),
                name.to_lowercase()
            ),
        );
    } else if name.contains("__") || name.ends_with('_') {
        p.add(
            path,
            format!(
                "{what} must not contain \"__\" or end in \"_\": {ENV_PREFIX} variables use \"__\" \
                 between keys, so such a name could never be overridden from the environment"
            ),
        );
    }
}

/// A secret given inline or as a file (for container secrets): the value
/// and the key path it came from, for the caller's further checks; `Err`
/// once a problem is recorded, so the caller adds no second one.
fn secret_source(
    p: &mut Problems,
    path: &str,
    inline: Option<Secret>,
    file: Option<PathBuf>,
) -> Result<Option<(Secret, String)>, ()> {
    let file_path = format!("{path}_file");
    match (inline, file) {
        (Some(_), Some(_)) => {
            let key = last_key(path);
            p.add(file_path, format!("set {key} or {key}_file, not both"));
            Err(())
        }
        (Some(secret), None) => Ok(Some((secret, path.to_owned()))),
        (None, Some(file)) => {
            let read = std::fs::read_to_string(&file)
                .map(|text| Secret::new(text.trim()))
                .map_err(|e| format!("cannot read {}: {e}", file.display()));
            let secret = p.ok(&file_path, read).ok_or(())?;
            Ok(Some((secret, file_path)))
        }
        (None, None) => Ok(None),
    }
}

/// `[accounts.X.api]`: where the API is and where its access token comes from.
fn api(p: &mut Problems, at: &dyn Fn(&str) -> String, raw: RawApi) -> Option<AccountApi> {
    let base_text = raw.api_base.unwrap_or_else(|| DEFAULT_API_BASE.to_owned());
    let api_base = p.ok(&at("api.api_base"), check_api_url(&base_text));
    let secret = secret_source(
        p,
        &at("api.app_secret"),
        raw.app_secret,
        raw.app_secret_file,
    );
    let token_source = match raw.token_source.as_deref().unwrap_or("stable_token") {
        "stable_token" => match secret {
            Ok(Some((app_secret, _))) => Some(TokenSource::StableToken { app_secret }),
            Ok(None) => {
                p.add(
                    at("api.app_secret"),
                    "required for token_source = \"stable_token\": set app_secret or app_secret_file",
                );
                None
            }
            Err(()) => None,
        },
        "url" => match raw.token_url {
            Some(text) => p
                .ok(&at("api.token_url"), check_api_url(&text))
                .map(TokenSource::Url),
            None => {
                p.add(
                    at("api.token_url"),
                    "required for token_source = \"url\": the token service's URL",
                );
                None
            }
        },
        other => {
            let names = TokenSource::NAMES.join(", ");
            p.add(
                at("api.token_source"),
                format!("unknown token_source {other:?} (one of: {names})"),
            );
            None
        }
    };
    Some(AccountApi {
        api_base: api_base?,
        token_source: token_source?,
    })
}

fn last_key(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn target(name: String, mut raw: RawTarget, p: &mut Problems) -> Option<Target> {
    let at = |key: &str| format!("targets.{name}.{key}");
    let found = p.0.len();
    check_name(p, &format!("targets.{name}"), &name, "target name");
    // `None` when invalid: the rules below that depend on the format skip.
    let format = match raw.format.take() {
        None => Some(Format::Raw),
        Some(text) => p.ok(
            &at("format"),
            choice(&Format::ALL, Format::as_str, &text, "format"),
        ),
    };
    let url = target_url(p, &at, raw.url.take(), format);
    let (class, retry) = retry(p, &at, raw.retry.take(), raw.retry_schedule.take());
    let timeout = p.duration(&at("timeout"), raw.timeout.take(), DEFAULT_TARGET_TIMEOUT);
    let concurrency = concurrency(p, &at, raw.concurrency);
    let adapters = adapters(
        p,
        &at,
        format,
        (
            raw.event_key.take(),
            raw.subscribe_as_scan.take(),
            raw.content_type.take(),
        ),
    );
    let secret = secret(p, &at, format, raw.secret.take());
    let max_age = max_age(p, &at, raw.max_age.take(), class);
    let ordering = raw.ordering.take().map_or(Ordering::Unordered, |text| {
        let ordering = choice(&Ordering::ALL, Ordering::as_str, &text, "ordering");
        p.ok(&at("ordering"), ordering)
            .unwrap_or(Ordering::Unordered)
    });
    let breaker = breaker(
        &at("breaker"),
        raw.breaker.take(),
        class.default_breaker(),
        p,
    );
    let paused = raw.paused.unwrap_or(false);
    let credentials = RawCredentials {
        token: raw.token,
        token_file: raw.token_file,
        encoding_aes_key: raw.encoding_aes_key,
        previous_encoding_aes_key: raw.previous_encoding_aes_key,
        mode: raw.mode,
    };
    let wechat = wechat_server(p, &at, format, (raw.app_id, raw.corp_id), credentials);

    if p.0.len() > found {
        return None;
    }
    Some(Target {
        name,
        url: url?,
        format: format?,
        retry,
        timeout,
        concurrency,
        signer: secret.as_ref().and_then(Signer::of),
        secret,
        paused,
        max_age,
        ordering,
        breaker,
        wechat,
        adapters,
    })
}

/// A target's URL: required, http or https, and fit for its format.
fn target_url(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    raw: Option<String>,
    format: Option<Format>,
) -> Option<url::Url> {
    let Some(text) = raw else {
        p.add(at("url"), "required: where deliveries are POSTed");
        return None;
    };
    let url = p.ok(&at("url"), check_url(&text))?;
    match format {
        Some(format) => p
            .ok(&at("url"), check_query_for(&url, format))
            .map(|()| url),
        None => Some(url),
    }
}

/// The retry class, and its schedule or the one the target sets.
fn retry(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    class: Option<String>,
    schedule: Option<Vec<String>>,
) -> (RetryClass, RetryPolicy) {
    let class = match class {
        None => RetryClass::Durable,
        Some(text) => p
            .ok(
                &at("retry"),
                choice(&RetryClass::ALL, RetryClass::as_str, &text, "retry class"),
            )
            .unwrap_or(RetryClass::Durable),
    };
    let mut retry = RetryPolicy::for_class(class);
    if let Some(schedule) = schedule {
        retry.delays = schedule
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                p.duration(
                    &format!("{}[{i}]", at("retry_schedule")),
                    Some(text),
                    Duration::ZERO,
                )
            })
            .collect();
    }
    (class, retry)
}

fn concurrency(p: &mut Problems, at: &dyn Fn(&str) -> String, raw: Option<i64>) -> usize {
    match raw {
        None => DEFAULT_CONCURRENCY,
        Some(n) if CONCURRENCY_RANGE.contains(&n) => {
            usize::try_from(n).unwrap_or(DEFAULT_CONCURRENCY)
        }
        Some(_) => {
            p.add(at("concurrency"), "must be between 1 and 1024");
            DEFAULT_CONCURRENCY
        }
    }
}

/// The Standard Webhooks secret: required for `json`, refused elsewhere.
fn secret(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    format: Option<Format>,
    secret: Option<Secret>,
) -> Option<Secret> {
    match (format, secret) {
        (Some(Format::Json), None) => {
            p.add(
                at("secret"),
                "required when format is json: a Standard Webhooks secret, \"whsec_\" followed by base64",
            );
            None
        }
        (Some(Format::Json), Some(secret)) => p.ok(
            &at("secret"),
            decode_webhook_secret(secret.expose()).map(|_| secret),
        ),
        (Some(other), Some(_)) => {
            let message = format!(
                "is only used with format = \"json\", not {:?}",
                other.as_str()
            );
            p.add(at("secret"), message);
            None
        }
        (Some(_), None) | (None, _) => None,
    }
}

/// `max_age`: a duration, `off`, or the retry class's default.
fn max_age(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    raw: Option<String>,
    class: RetryClass,
) -> Option<Duration> {
    match raw.as_deref() {
        None => class.default_max_age(),
        Some("off") => None,
        Some(text) => Some(p.duration(
            &at("max_age"),
            Some(text.to_owned()),
            Duration::from_secs(1),
        )),
    }
}

/// A `format = "wechat"` target's credentials; the keys are refused on any
/// other format, where nothing would use them.
fn wechat_server(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    format: Option<Format>,
    (app_id, corp_id): (Option<String>, Option<String>),
    raw: RawCredentials,
) -> Option<WechatServer> {
    let given = [
        ("token", raw.token.is_some()),
        ("token_file", raw.token_file.is_some()),
        ("encoding_aes_key", raw.encoding_aes_key.is_some()),
        (
            "previous_encoding_aes_key",
            raw.previous_encoding_aes_key.is_some(),
        ),
        ("app_id", app_id.is_some()),
        ("corp_id", corp_id.is_some()),
        ("mode", raw.mode.is_some()),
    ];
    match format {
        Some(Format::Wechat) => {}
        Some(other) => {
            for (key, _) in given.iter().filter(|(_, set)| *set) {
                p.add(
                    at(key),
                    format!(
                        "is only used with format = \"wechat\", not {:?}",
                        other.as_str()
                    ),
                );
            }
            return None;
        }
        None => return None,
    }
    let app_id = app_id.filter(|app_id| {
        let valid = is_app_id(app_id);
        if !valid {
            p.add(at("app_id"), "must be \"wx\" followed by 16 hex digits");
        }
        valid
    });
    let corp_id = corp_id.filter(|corp_id| {
        let valid = is_corp_id(corp_id);
        if !valid {
            p.add(
                at("corp_id"),
                "must be 2 to 64 letters and digits, e.g. ww and 16 hex digits",
            );
        }
        valid
    });
    let creds = server_credentials(p, at, raw, "as set in the broker's WeChat settings");
    Some(WechatServer {
        token: creds.token?,
        keys: creds.keys,
        app_id,
        corp_id,
        mode: creds.mode?,
    })
}

/// The adapters, which rewrite the body or its type: only for the formats
/// whose body the relay writes.
fn adapters(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    format: Option<Format>,
    (event_key, subscribe_as_scan, content_type): (Option<String>, Option<bool>, Option<String>),
) -> Adapters {
    let strip_qrscene = match event_key.as_deref() {
        None => false,
        Some("strip_qrscene") => true,
        Some(other) => {
            p.add(
                at("event_key"),
                format!("unknown adapter {other:?}: expected \"strip_qrscene\""),
            );
            false
        }
    };
    let set = [
        ("event_key", event_key.is_some()),
        ("subscribe_as_scan", subscribe_as_scan.is_some()),
        ("content_type", content_type.is_some()),
    ];
    let content_type = content_type.filter(|value| {
        let valid = is_media_type(value);
        if !valid {
            p.add(
                at("content_type"),
                "must be a media type such as \"application/xml\" or \"text/xml; charset=utf-8\" \
                 (type/subtype, then optional name=value parameters)",
            );
        }
        valid
    });
    let adapters = Adapters {
        strip_qrscene,
        subscribe_as_scan: subscribe_as_scan.unwrap_or(false),
        content_type,
    };
    let why = match format {
        Some(Format::Plain | Format::Wechat) | None => return adapters,
        Some(Format::Raw) => "format = \"raw\": it forwards WeChat's request byte for byte, and \
                              WeChat's signatures would not hold for a changed body; use \
                              format = \"plain\" or \"wechat\""
            .to_owned(),
        Some(other) => format!(
            "format = {:?}: adapters apply to format = \"plain\" or \"wechat\"",
            other.as_str()
        ),
    };
    for (key, _) in set.iter().filter(|(_, given)| *given) {
        p.add(at(key), format!("cannot be used with {why}"));
    }
    Adapters::default()
}

/// A `Content-Type` value as HTTP defines it (RFC 9110, 8.3.1):
/// `type/subtype` followed by `; name=value` parameters, each a token, a
/// value a token or a quoted string.
fn is_media_type(value: &str) -> bool {
    fn token(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    }
    fn quoted(s: &str) -> bool {
        let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
            return false;
        };
        let mut escaped = false;
        inner.bytes().all(|b| {
            let ok = (b == b'\t' || b == b' ' || b.is_ascii_graphic()) && (escaped || b != b'"');
            escaped = !escaped && b == b'\\';
            ok
        }) && !escaped
    }
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("");
    let essence_ok = essence
        .split_once('/')
        .is_some_and(|(kind, subtype)| token(kind) && token(subtype));
    essence_ok
        && parts.all(|parameter| {
            parameter
                .trim_matches([' ', '\t'])
                .split_once('=')
                .is_some_and(|(name, value)| token(name) && (token(value) || quoted(value)))
        })
}

/// A target's breaker: the class's defaults, with what the file sets.
fn breaker(at: &str, raw: Option<RawBreaker>, default: Breaker, p: &mut Problems) -> Breaker {
    let Some(raw) = raw else { return default };
    let key = |k: &str| format!("{at}.{k}");
    let failures = match raw.failures {
        None => default.failures,
        Some(n) if BREAKER_FAILURES_RANGE.contains(&n) => {
            u32::try_from(n).unwrap_or(default.failures)
        }
        Some(_) => {
            p.add(
                key("failures"),
                "must be between 0 (never opens) and 100000",
            );
            default.failures
        }
    };
    let backoff = p.duration(&key("backoff"), raw.backoff, default.backoff);
    let max_backoff = p.duration(&key("max_backoff"), raw.max_backoff, default.max_backoff);
    if max_backoff < backoff {
        p.add(key("max_backoff"), "must not be less than backoff");
    }
    Breaker {
        failures,
        backoff,
        max_backoff,
        ..default
    }
}

fn check_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("invalid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must have a host".to_owned());
    }
    if url.fragment().is_some() {
        return Err(
            "must not have a #fragment: it is never sent, and a query appended to the URL \
             would end up inside it"
                .to_owned(),
        );
    }
    Ok(url)
}

/// A URL that access tokens or the app secret travel to: https, or plain
/// http to a loopback host only (a token service beside the relay, a test).
fn check_api_url(text: &str) -> Result<url::Url, String> {
    let url = check_url(text)?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    if url.scheme() != "https" && !loopback {
        return Err(
            "must be an https URL (plain http only to a loopback host): access tokens travel to it"
                .to_owned(),
        );
    }
    Ok(url)
}

/// A `raw`, `plain` or `wechat` target gets WeChat's query appended to its
/// URL: one that already carries a parameter of it would reach the target
/// twice, and the target might read the one no signature covers. Names are
/// compared percent-decoded, as the target reads them.
fn check_query_for(url: &url::Url, format: Format) -> Result<(), String> {
    if !matches!(format, Format::Raw | Format::Plain | Format::Wechat) {
        return Ok(());
    }
    let carried = url
        .query_pairs()
        .find(|(name, _)| SINGLE_PARAMS.contains(&name.as_ref()));
    match carried {
        Some((name, _)) => Err(format!(
            "its query carries `{name}`, which the relay sets from WeChat's query for format \
             = {:?}: remove it",
            format.as_str()
        )),
        None => Ok(()),
    }
}

/// What rules are checked against: the names in the file (so that one bad
/// account or target does not also make every rule naming it an error),
/// each account's kind as far as it reads, and the `wechat` targets that
/// have no key to seal with.
struct Names {
    accounts: BTreeSet<String>,
    targets: BTreeSet<String>,
    kinds: BTreeMap<String, Family>,
    keyless_wechat: BTreeSet<String>,
    /// Accounts with an `[accounts.X.api]` section.
    with_api: BTreeSet<String>,
    /// Each target's `timeout` as written.
    timeouts: BTreeMap<String, Option<String>>,
}

impl Names {
    fn of(accounts: &BTreeMap<String, RawAccount>, targets: &BTreeMap<String, RawTarget>) -> Names {
        let kinds = accounts.iter().filter_map(|(id, account)| {
            let kind = match account.kind.as_deref() {
                None => Some(Family::OfficialAccount),
                Some(text) => Family::ALL.into_iter().find(|k| k.as_str() == text),
            };
            kind.map(|kind| (id.clone(), kind))
        });
        let keyless_wechat = targets.iter().filter(|(_, t)| {
            t.format.as_deref() == Some(Format::Wechat.as_str()) && t.encoding_aes_key.is_none()
        });
        Names {
            accounts: accounts.keys().cloned().collect(),
            targets: targets.keys().cloned().collect(),
            kinds: kinds.collect(),
            keyless_wechat: keyless_wechat.map(|(name, _)| name.clone()).collect(),
            with_api: accounts
                .iter()
                .filter(|(_, a)| a.api.is_some())
                .map(|(id, _)| id.clone())
                .collect(),
            timeouts: targets
                .iter()
                .map(|(name, t)| (name.clone(), t.timeout.clone()))
                .collect(),
        }
    }

    /// The kinds of the accounts a rule can match: those it names, and of
    /// those the kinds whose pushes carry the identifiers it asks for.
    fn kinds_matched(&self, matcher: &Match) -> BTreeSet<&'static str> {
        let platform_only = matcher.appid.is_some() || matcher.info_type.is_some();
        let wecom_only = matcher.agent_id.is_some();
        self.kinds
            .iter()
            .filter(|(id, _)| matcher.account.as_ref().is_none_or(|ids| ids.contains(id)))
            .filter(|(_, kind)| !platform_only || **kind == Family::OpenPlatform)
            .filter(|(_, kind)| !wecom_only || **kind == Family::Wecom)
            .map(|(_, kind)| kind.as_str())
            .collect()
    }
}

fn routes(raw: Vec<RawRoute>, names: &Names, p: &mut Problems) -> Vec<Rule> {
    let rules: Vec<Option<Rule>> = raw
        .into_iter()
        .enumerate()
        .map(|(i, raw)| rule(&format!("routes[{i}]"), raw, names, p))
        .collect();
    for (later, rule) in rules.iter().enumerate() {
        let Some(rule) = rule else { continue };
        let covering = rules[..later].iter().enumerate().find_map(|(i, earlier)| {
            earlier
                .as_ref()
                .filter(|e| e.matcher.covers(&rule.matcher))
                .map(|e| (i, e))
        });
        if let Some((earlier, by)) = covering {
            p.add(
                format!("routes[{later}]"),
                format!(
                    "unreachable: routes[{earlier}] ({}) already matches every event this rule matches",
                    by.matcher.describe()
                ),
            );
        }
    }
    rules.into_iter().flatten().collect()
}

fn rule(at: &str, raw: RawRoute, names: &Names, p: &mut Problems) -> Option<Rule> {
    let found = p.0.len();
    let matcher = matcher(&format!("{at}.match"), raw.matcher, &names.accounts, p);
    let to = rule_targets(&format!("{at}.to"), raw.to, &names.targets, p);
    if let Some(reply_from) = &raw.reply_from {
        if !to.contains(reply_from) {
            let path = format!("{at}.reply_from");
            if names.targets.contains(reply_from) {
                p.add(path, format!("must be one of `to` ({})", to.join(", ")));
            } else {
                p.add(path, unknown("target", reply_from, &names.targets));
            }
        }
    }
    fits_families(at, &matcher, &to, raw.reply_from.is_some(), names, p);
    let late = late_reply(
        at,
        (
            raw.late_reply,
            raw.late_reply_ttl,
            raw.reply_from.as_deref(),
        ),
        &matcher,
        names,
        p,
    );
    if p.0.len() > found {
        return None;
    }
    Some(Rule {
        matcher,
        to,
        reply_from: raw.reply_from,
        late_reply: late.0,
        late_reply_ttl: late.1,
    })
}

/// A rule's `late_reply` and `late_reply_ttl`: only with a `reply_from`,
/// whose `timeout` is what the late answer is waited for (at most 120 s);
/// `customer_service` needs the API of every account the rule can match.
fn late_reply(
    at: &str,
    (late_reply, ttl, reply_from): (Option<String>, Option<String>, Option<&str>),
    matcher: &Match,
    names: &Names,
    p: &mut Problems,
) -> (LateReply, Duration) {
    let path = format!("{at}.late_reply");
    let late = match late_reply.as_deref() {
        None => LateReply::None,
        Some(text) => p
            .ok(
                &path,
                choice(&LateReply::ALL, LateReply::as_str, text, "late_reply"),
            )
            .unwrap_or(LateReply::None),
    };
    let ttl = p.duration(&format!("{at}.late_reply_ttl"), ttl, DEFAULT_LATE_REPLY_TTL);
    if late == LateReply::None {
        return (late, ttl);
    }
    let Some(reply_from) = reply_from else {
        p.add(
            path,
            "needs reply_from: it is that target's answer that comes late",
        );
        return (late, ttl);
    };
    let timeout = names
        .timeouts
        .get(reply_from)
        .and_then(|t| t.as_deref().map(parse_duration))
        .and_then(Result::ok);
    if timeout.is_some_and(|t| t > MAX_LATE_TIMEOUT) {
        p.add(
            format!("targets.{reply_from}.timeout"),
            "must be at most 120s for the reply_from of a route with late_reply",
        );
    }
    if late == LateReply::CustomerService {
        let without: Vec<&str> = names
            .accounts
            .iter()
            .filter(|id| matcher.account.as_ref().is_none_or(|ids| ids.contains(id)))
            .filter(|id| !names.with_api.contains(*id))
            .map(String::as_str)
            .collect();
        if !without.is_empty() {
            p.add(
                path,
                format!(
                    "customer_service needs [accounts.<id>.api] for every account the rule matches; missing for: {} (an account without the Customer Service API, error 48001, takes late_reply = \"next_message\")",
                    without.join(", ")
                ),
            );
        }
    }
    (late, ttl)
}

/// A rule's `to`: at least one configured target, each once.
fn rule_targets(
    path: &str,
    to: Option<Vec<String>>,
    targets: &BTreeSet<String>,
    p: &mut Problems,
) -> Vec<String> {
    let to = match to {
        None => {
            p.add(
                path,
                "required: the targets that receive the matching events",
            );
            Vec::new()
        }
        Some(to) => {
            if to.is_empty() {
                p.add(path, "must name at least one target");
            }
            to
        }
    };
    let mut seen = BTreeSet::new();
    for name in &to {
        if !targets.contains(name) {
            p.add(path, unknown("target", name, targets));
        } else if !seen.insert(name) {
            p.add(path, format!("names target {name:?} twice"));
        }
    }
    to
}

/// What the families of the accounts a rule can match allow: a Mini
/// Program answers `success` only, so no `reply_from`; a WeCom push is
/// always sealed, so a `wechat` target needs a key for it.
fn fits_families(
    at: &str,
    matcher: &Match,
    to: &[String],
    reply_from: bool,
    names: &Names,
    p: &mut Problems,
) {
    let kinds = names.kinds_matched(matcher);
    let mini_program = Family::MiniProgram.as_str();
    if reply_from && kinds.contains(mini_program) {
        p.add(
            format!("{at}.reply_from"),
            format!(
                "refused for kind = {mini_program:?}: a Mini Program is answered `success`, never \
                 a passive reply, and this rule matches one; name the other accounts in match.account"
            ),
        );
    }
    if kinds.contains(Family::Wecom.as_str()) {
        for name in to.iter().filter(|t| names.keyless_wechat.contains(*t)) {
            p.add(
                format!("{at}.to"),
                format!(
                    "target {name:?} has no encoding_aes_key, and this rule matches a kind = \"wecom\" \
                     account, whose pushes the format = \"wechat\" seals for the target always"
                ),
            );
        }
    }
}

fn matcher(at: &str, raw: RawMatch, accounts: &BTreeSet<String>, p: &mut Problems) -> Match {
    let mut list = |key: &str, values: Option<OneOrMany>| {
        let values = values?.0;
        if values.is_empty() {
            p.add(
                format!("{at}.{key}"),
                "must not be empty: an empty list never matches",
            );
        }
        Some(values)
    };
    let matcher = Match {
        account: list("account", raw.account),
        msg_type: list("msg_type", raw.msg_type),
        event: list("event", raw.event),
        event_key: list("event_key", raw.event_key),
        event_key_prefix: list("event_key_prefix", raw.event_key_prefix),
        has_ticket: raw.has_ticket,
        from_user: list("from_user", raw.from_user),
        appid: list("appid", raw.appid),
        agent_id: list("agent_id", raw.agent_id),
        info_type: list("info_type", raw.info_type),
    };
    for id in matcher.account.iter().flatten() {
        if !accounts.contains(id) {
            p.add(format!("{at}.account"), unknown("account", id, accounts));
        }
    }
    for appid in matcher.appid.iter().flatten().filter(|a| !is_app_id(a)) {
        p.add(
            format!("{at}.appid"),
            format!("{appid:?} is not an AppID: \"wx\" followed by 16 hex digits"),
        );
    }
    matcher
}

/// One of a fixed set of names, or a message listing them.
fn choice<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    text: &str,
    what: &str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            format!(
                "unknown {what} {text:?}: expected one of {}",
                names.join(", ")
            )
        })
}

fn unknown(what: &str, name: &str, known: &BTreeSet<String>) -> String {
    if known.is_empty() {
        format!("unknown {what} {name:?}: none are configured")
    } else {
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        format!(
            "unknown {what} {name:?}: configured are {}",
            known.join(", ")
        )
    }
}
