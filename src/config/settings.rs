//! The validated configuration: typed, defaults applied, secrets masked.
//! A `Settings` value is always consistent — every route names configured
//! targets, every secure account has a key — so the rest of the relay never
//! re-checks the file.

use super::Secret;
use crate::route::Rule;
use crate::wechat::crypto::KeyRing;
use crate::wechat::family::{Codec, Family};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub server: ServerSettings,
    pub spool: SpoolSettings,
    /// Keyed by id; account `main` is served at `/wx/main`.
    pub accounts: BTreeMap<String, Account>,
    pub targets: BTreeMap<String, Target>,
    /// In file order: the first matching rule decides.
    pub routes: Vec<Rule>,
    pub telemetry: TelemetrySettings,
    pub trail: TrailSettings,
}

/// The event trail: what became of each push, kept for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct TrailSettings {
    /// Off, nothing of the trail is written or run.
    pub enabled: bool,
    /// The key of the OpenIDs' hashes; `None`: one made once and kept in
    /// the spool.
    pub key: Option<Secret>,
    /// Keep each push's message with its trail, so that a delivered event
    /// can be redelivered.
    pub keep_bodies: bool,
    /// Events older than this are pruned.
    pub retain: Duration,
    /// At most this many answered pushes are kept.
    pub max_events: u64,
    /// At most this many trail rows are read by one search.
    pub search_rows: usize,
    /// At most this many refused pushes are kept, apart from `max_events`.
    pub max_refusals: u64,
}

impl TrailSettings {
    /// What the spool turns the trail on with.
    pub fn setup(&self) -> crate::spool::TrailSetup {
        crate::spool::TrailSetup {
            key: self
                .key
                .as_ref()
                .map(|k| crate::trail::TrailKey::from_secret(k.expose())),
            keep_bodies: self.keep_bodies,
            retain: self.retain,
            max_events: self.max_events,
            max_refusals: self.max_refusals,
        }
    }
}

/// Where the relay's traces go, if anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The collector's OTLP/HTTP base URL (spans are posted to its
    /// `/v1/traces`); `None`, the default: no spans are made at all.
    pub otlp_endpoint: Option<url::Url>,
    /// The `service.name` the spans are exported under.
    pub service_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Public address: WeChat's pushes only.
    pub listen: SocketAddr,
    /// Metrics, health and the admin API; never the public address.
    pub admin_listen: SocketAddr,
    /// Larger request bodies are refused before they are read.
    pub max_body: usize,
    /// Connections served at once on `listen`; at the cap the longest-idle
    /// connection is closed for a new one, or the new one gets 503.
    pub max_connections: usize,
    /// Request bodies being read or processed at once, in bytes; a signed
    /// push over it gets 503. Never less than `max_body`.
    pub max_body_bytes_in_flight: usize,
    /// WeChat gives up after 5 s; the answer must leave before this.
    pub reply_budget: Duration,
    /// Time allowed to receive request headers, against slow clients.
    pub header_timeout: Duration,
    /// Drain deadline on SIGTERM.
    pub shutdown_timeout: Duration,
    /// Bearer token for `/admin/*`; `None` leaves them to the admin address.
    pub admin_token: Option<Secret>,
    /// The operator's explicit choice to serve `/admin/*` without a token on
    /// an address other hosts can reach.
    pub allow_unauthenticated_admin: bool,
    /// Marks the pages' session cookie `Secure`: for an admin listener
    /// reached over HTTPS (a TLS proxy in front), where a browser must never
    /// send the cookie in the clear.
    pub ui_secure_cookie: bool,
    /// Names the admin listener answers `/admin/*` and `/ui` under, besides
    /// its own address and `localhost` (lower case, without a port): a
    /// request naming another `Host` is refused, against DNS rebinding.
    pub admin_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    pub backend: SpoolBackend,
    /// How long an event key is remembered to drop WeChat's re-sends.
    pub dedup_window: Duration,
}

/// Where the spool keeps its data.
#[derive(Debug, Clone, PartialEq)]
pub enum SpoolBackend {
    /// One SQLite file on the relay's own disk: one replica.
    Sqlite { path: PathBuf },
    /// A PostgreSQL database shared by any number of replicas.
    Postgres(PostgresSettings),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresSettings {
    /// The connection URL (or `key=value` string) as configured; it may hold
    /// a password, so it is a [`Secret`]. [`PostgresSettings::display`] is
    /// the form to show.
    pub url: Secret,
    /// The URL without its password, for `check`, logs and errors.
    pub display: String,
    /// The schema holding the relay's tables: a plain SQL identifier.
    pub schema: String,
    /// Connections open at once, at most.
    pub pool_size: usize,
    pub sslmode: SslMode,
    /// PEM root certificates to trust instead of the built-in (webpki) roots.
    pub ca_file: Option<PathBuf>,
}

/// TLS to the database, as libpq's `sslmode` values mean it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP: for a database on the same host or a private network.
    Disable,
    /// TLS, the server's certificate not verified: encrypted, but whoever
    /// can intercept the connection can pose as the database. With a
    /// `ca_file`, as libpq with a root certificate, it is verified as
    /// [`SslMode::VerifyCa`] does.
    Require,
    /// TLS, the server's certificate chain verified against the roots; its
    /// name is not checked (for servers reached by an address their
    /// certificate does not name).
    VerifyCa,
    /// TLS, the chain verified and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 4] = [
        SslMode::Disable,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: String,
    /// The callback family (`kind` in the file): how the account's URL is
    /// checked, its pushes read and answered.
    pub kind: Family,
    /// How its pushes are written: JSON only for a Mini Program whose
    /// `data_format` is json.
    pub codec: Codec,
    /// The receive id checked inside each decrypted push: the AppID (an
    /// Official Account, a Mini Program), the platform's component AppID
    /// (an Open Platform), or the CorpID or SuiteID (WeCom's `corp_id`).
    pub app_id: String,
    pub token: Secret,
    /// Present whenever `encoding_aes_key` is configured; always for
    /// compat and secure accounts.
    pub keys: Option<KeyRing>,
    pub mode: Mode,
    /// Pushes whose timestamp is further from now are refused; `None` = off.
    pub timestamp_window: Option<Duration>,
    /// WeChat's server API (`[accounts.X.api]`): how late replies reach the
    /// user through the Customer Service API.
    pub api: Option<AccountApi>,
}

/// How the relay calls WeChat's server API for an account.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountApi {
    /// `https://api.weixin.qq.com` unless set; tests point it at a local server.
    pub api_base: url::Url,
    pub token_source: TokenSource,
}

/// Where the account's access token comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    /// `POST {api_base}/cgi-bin/stable_token` with `force_refresh = false`:
    /// it hands out the token other services of the same AppID hold rather
    /// than a new one that would end theirs.
    StableToken { app_secret: Secret },
    /// A central token service (中控服务器) that answers GET with
    /// `{"access_token", "expires_in"}`.
    Url(url::Url),
}

impl TokenSource {
    pub const NAMES: [&'static str; 2] = ["stable_token", "url"];

    pub fn as_str(&self) -> &'static str {
        match self {
            TokenSource::StableToken { .. } => "stable_token",
            TokenSource::Url(_) => "url",
        }
    }
}

/// The message encryption mode chosen in the WeChat admin console. The
/// config decides it, never the request: a plaintext POST to a secure
/// account is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 明文模式: pushes arrive as plain XML.
    Plaintext,
    /// 兼容模式: plain and encrypted copies side by side.
    Compat,
    /// 安全模式: encrypted only.
    Secure,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Plaintext, Mode::Compat, Mode::Secure];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Plaintext => "plaintext",
            Mode::Compat => "compat",
            Mode::Secure => "secure",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub url: url::Url,
    pub format: Format,
    pub retry: RetryPolicy,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts in flight at once, so a slow target cannot take every worker.
    pub concurrency: usize,
    /// The Standard Webhooks secret (`whsec_…`); present exactly when
    /// `format` is [`Format::Json`].
    pub secret: Option<Secret>,
    /// `secret` decoded and keying an HMAC, once: present when it is.
    pub signer: Option<Signer>,
    /// Deliveries are held in the spool and not sent (a maintenance window);
    /// a reload with `paused = false` sends them.
    pub paused: bool,
    /// A delivery whose event arrived longer ago is dead-lettered as
    /// expired instead of sent; `None`: sent however late.
    pub max_age: Option<Duration>,
    pub ordering: Ordering,
    pub breaker: Breaker,
    /// The WeChat server the target is told it is; present exactly when
    /// `format` is [`Format::Wechat`].
    pub wechat: Option<WechatServer>,
    /// Changes to the event for brokers that read it their own way; only
    /// for the formats whose body the relay writes (`plain`, `wechat`).
    pub adapters: Adapters,
}

/// A `format = "wechat"` target's own credentials: the relay sends it each
/// event as WeChat would send it to a server configured with these, so the
/// broker never holds the account's Token or EncodingAESKey.
#[derive(Debug, Clone, PartialEq)]
pub struct WechatServer {
    pub token: Secret,
    /// Present whenever `encoding_aes_key` is configured; always for
    /// compat and secure targets.
    pub keys: Option<KeyRing>,
    /// `None`: the AppID of the account the event came from.
    pub app_id: Option<String>,
    /// The receive id a WeCom event is sealed for; `None`: the CorpID or
    /// SuiteID of the account the event came from.
    pub corp_id: Option<String>,
    /// WeCom events are always sealed, whatever the mode.
    pub mode: Mode,
}

impl WechatServer {
    /// The receive id the target names for an event of `family`: its
    /// `corp_id` for WeCom's, its `app_id` for the others'; `None` leaves it
    /// to the event's account.
    pub fn receive_id(&self, family: Family) -> Option<&str> {
        match family {
            Family::Wecom => self.corp_id.as_deref(),
            _ => self.app_id.as_deref(),
        }
    }
}

/// Per-target rewrites of the event, for brokers that handle WeChat's
/// events only partly. Each defaults to off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adapters {
    /// `event_key = "strip_qrscene"`: a first-time follower's `subscribe`
    /// carries `EventKey=qrscene_<scene>`; brokers that look the scene up as
    /// it is get `<scene>`.
    pub strip_qrscene: bool,
    /// A ticketed `subscribe` is sent as the `SCAN` (with the bare scene)
    /// a follower's scan would give, for brokers that handle only `SCAN`.
    pub subscribe_as_scan: bool,
    /// The delivery's `Content-Type` instead of the format's own.
    pub content_type: Option<String>,
}

impl Adapters {
    pub fn any(&self) -> bool {
        self.strip_qrscene || self.subscribe_as_scan || self.content_type.is_some()
    }
}

/// In what order a target gets one user's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// As they become due, many at once: the fastest.
    Unordered,
    /// One at a time per account and sender (`FromUserName`), in arrival
    /// order; other users' events are not held up.
    PerUser,
}

impl Ordering {
    pub const ALL: [Ordering; 2] = [Ordering::Unordered, Ordering::PerUser];

    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Unordered => "unordered",
            Ordering::PerUser => "per_user",
        }
    }
}

/// When a failing target is left alone, and how it is probed meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failures (no answer, 408, 429, 5xx) that open the
    /// circuit; 0 never opens it.
    pub failures: u32,
    /// The wait before the first probe once the circuit opens; it doubles
    /// after each failed probe.
    pub backoff: Duration,
    /// The longest wait between probes (a Retry-After may ask for longer,
    /// unless `retry_after_up_to_max`).
    pub max_backoff: Duration,
    /// A `Retry-After` holds the circuit no longer than `max_backoff`: for
    /// `login` targets, whose users wait at a QR code, so a broker back
    /// within seconds gets the next login within seconds whatever it asked.
    pub retry_after_up_to_max: bool,
}

impl Breaker {
    /// How much of a target's `Retry-After` is honoured, by its circuit and
    /// by the delivery that received it alike.
    pub fn honoured(&self, retry_after: Option<Duration>) -> Option<Duration> {
        match retry_after {
            Some(asked) if self.retry_after_up_to_max => Some(asked.min(self.max_backoff)),
            other => other,
        }
    }
}

impl Target {
    /// The HMAC key behind `secret`, for signing `json` deliveries.
    pub fn signing_key(&self) -> Option<Vec<u8>> {
        self.secret
            .as_ref()
            .and_then(|s| decode_webhook_secret(s.expose()).ok())
    }
}

/// A `json` target's HMAC-SHA256, keyed once with its decoded secret: each
/// signature clones the keyed state rather than decoding the secret and
/// hashing the key again. Its `Debug` shows no key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
    keyed: Hmac<Sha256>,
}

impl Signer {
    /// The signer for a Standard Webhooks `secret`, if it decodes.
    pub fn of(secret: &Secret) -> Option<Signer> {
        let key = decode_webhook_secret(secret.expose()).ok()?;
        let keyed = Hmac::<Sha256>::new_from_slice(&key).ok()?;
        Some(Signer { key, keyed })
    }

    /// A MAC keyed with the secret, ready for a message.
    pub fn mac(&self) -> Hmac<Sha256> {
        self.keyed.clone()
    }
}

impl PartialEq for Signer {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

/// Decodes a Standard Webhooks secret: `whsec_` then standard base64 of 24
/// to 64 random bytes. Errors never quote the secret.
pub fn decode_webhook_secret(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("must start with \"whsec_\"")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "must be \"whsec_\" followed by standard base64")?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("must decode to 24 to 64 bytes, got {}", key.len()));
    }
    Ok(key)
}

/// How a delivery's body is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// WeChat's request, byte for byte.
    Raw,
    /// The push as WeChat would send it in plaintext mode.
    Plain,
    /// A signed Standard Webhooks JSON envelope.
    Json,
    /// The body Authing's demo relay posts.
    AuthingDemoJson,
    /// The push as WeChat would send it to a server holding the target's
    /// own credentials: signed and, in compat or secure mode, sealed afresh.
    Wechat,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Raw,
        Format::Plain,
        Format::Json,
        Format::AuthingDemoJson,
        Format::Wechat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Plain => "plain",
            Format::Json => "json",
            Format::AuthingDemoJson => "authing-demo-json",
            Format::Wechat => "wechat",
        }
    }
}

/// How long a target's deliveries keep being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// QR tickets and login pages expire within minutes: try at once, then
    /// for about two minutes.
    Login,
    /// Business events must arrive eventually: back off for about a day.
    Durable,
}

impl RetryClass {
    pub const ALL: [RetryClass; 2] = [RetryClass::Login, RetryClass::Durable];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryClass::Login => "login",
            RetryClass::Durable => "durable",
        }
    }

    /// How long the class's events stay worth sending, when the target
    /// sets no `max_age`: a login is abandoned within minutes, and sent
    /// later it is noise at best and a surprise login at worst.
    pub fn default_max_age(self) -> Option<Duration> {
        match self {
            RetryClass::Login => Some(Duration::from_secs(10 * 60)),
            RetryClass::Durable => None,
        }
    }

    /// The class's breaker when the target sets no `breaker`. A login
    /// broker's users are waiting: it is probed often (at least every 5 s)
    /// so logins flow within seconds of its return. A webhook's events wait
    /// for hours anyway: it may fail longer before its circuit opens, and is
    /// probed at least every 30 s.
    pub fn default_breaker(self) -> Breaker {
        match self {
            RetryClass::Login => Breaker {
                failures: 5,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
                retry_after_up_to_max: true,
            },
            RetryClass::Durable => Breaker {
                failures: 10,
                backoff: Duration::from_secs(2),
                max_backoff: Duration::from_secs(30),
                retry_after_up_to_max: false,
            },
        }
    }

    /// The class's schedule when the target sets no `retry_schedule`.
    pub fn default_delays(self) -> Vec<Duration> {
        const LOGIN: &[u64] = &[1, 2, 4, 8, 15, 30, 30, 30];
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        const DURABLE: &[u64] = &[
            5,
            30,
            2 * MINUTE,
            10 * MINUTE,
            30 * MINUTE,
            HOUR,
            2 * HOUR,
            4 * HOUR,
            8 * HOUR,
            8 * HOUR,
        ];
        let secs = match self {
            RetryClass::Login => LOGIN,
            RetryClass::Durable => DURABLE,
        };
        secs.iter().copied().map(Duration::from_secs).collect()
    }
}

/// A retry schedule as data; the delivery worker applies it (and its jitter).
///
/// The first attempt is immediate; `delays[i]` is the wait before attempt
/// `i + 2`; after `delays.len() + 1` failed attempts the delivery is
/// dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub class: RetryClass,
    pub delays: Vec<Duration>,
}

impl RetryPolicy {
    pub fn for_class(class: RetryClass) -> Self {
        Self {
            class,
            delays: class.default_delays(),
        }
    }

    pub fn max_attempts(&self) -> usize {
        self.delays.len() + 1
    }

    /// The wait before the next attempt once `attempts_made` have failed
    /// (zero before the first), or `None` when the policy is exhausted.
    pub fn delay_after(&self, attempts_made: usize) -> Option<Duration> {
        match attempts_made {
            0 => Some(Duration::ZERO),
            n => self.delays.get(n - 1).copied(),
        }
    }

    /// The time from the first attempt to the last, before jitter.
    pub fn span(&self) -> Duration {
        self.delays.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_retries_for_about_two_minutes() {
        let policy = RetryPolicy::for_class(RetryClass::Login);
        assert_eq!(policy.max_attempts(), 9);
        assert_eq!(policy.span(), Duration::from_secs(120));
        assert_eq!(policy.delay_after(1), Some(Duration::from_secs(1)));
        assert_eq!(policy.delay_after(8), Some(Duration::from_secs(30)));
        assert_eq!(policy.delay_after(9), None);
    }

    #[test]
    fn durable_retries_for_about_a_day() {
        let policy = RetryPolicy::for_class(RetryClass::Durable);
        assert_eq!(policy.max_attempts(), 11);
        let hours = policy.span().as_secs_f64() / 3600.0;
        assert!((22.0..26.0).contains(&hours), "{hours}");
        assert_eq!(policy.delay_after(0), Some(Duration::ZERO));
        assert_eq!(policy.delay_after(1), Some(Duration::from_secs(5)));
    }

    #[test]
    fn names() {
        assert_eq!(Format::AuthingDemoJson.as_str(), "authing-demo-json");
        assert_eq!(Mode::Compat.as_str(), "compat");
        assert_eq!(RetryClass::Durable.as_str(), "durable");
    }
}
