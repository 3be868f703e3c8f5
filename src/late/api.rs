//! WeChat's server API as the late path calls it: an access token per
//! account, kept on the spool for every replica and refreshed ahead of its
//! expiry, and a call that refreshes it once when WeChat says it is invalid.
//!
//! The token comes from `POST {api_base}/cgi-bin/stable_token` with
//! `force_refresh = false` (which hands out the token every holder of the
//! AppID shares, rather than a new one that would end the identity broker's)
//! or from a central token service (`token_source = "url"`). The secret and
//! the token never appear in a log line or an error: an error names the
//! account, the API path and WeChat's `errcode`/`errmsg` only.

use crate::clock::Clock;
use crate::config::{Account, AccountApi, TokenSource};
use crate::deliver::HttpClient;
use crate::spool::{ApiToken, LateReplies, UnixMs};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A token this close to its expiry is fetched again before it is used:
/// WeChat's stable token then already answers with the next one. A token
/// with a shorter life is fetched again half way through it.
const REFRESH_AHEAD_MS: i64 = 5 * 60 * 1000;
/// Any one call to WeChat's API, at most.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of WeChat's answer that is read: its JSON is a few dozen bytes.
const MAX_ANSWER: usize = 16 * 1024;

/// WeChat's errcodes that say the access token is invalid (40001) or
/// expired (42001, and 40014 for a malformed one): fetch one and call again.
const TOKEN_ERRCODES: [i64; 3] = [40001, 40014, 42001];

/// Why a call to WeChat's API did not succeed. Never carries the token,
/// the secret or the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{path}: {error}")]
    Transport { path: &'static str, error: String },
    #[error("{path}: HTTP {status}")]
    Status { path: &'static str, status: u16 },
    #[error("{path}: errcode {errcode}: {errmsg}")]
    WeChat {
        path: &'static str,
        errcode: i64,
        errmsg: String,
    },
    #[error("{path}: an answer that is not WeChat's JSON")]
    Answer { path: &'static str },
    /// The account (or its `[accounts.<id>.api]`) is no longer configured.
    #[error("the account has no [accounts.<id>.api] to send with")]
    NoApi,
    /// The late reply's stored message does not read back.
    #[error("the stored message does not read back")]
    Unreadable,
    /// The send's time ran out before its post: past it, its lease may have
    /// ended and another sender may hold the late reply.
    #[error("{path}: the send's time ran out before it was posted")]
    TimeUp { path: &'static str },
}

impl ApiError {
    /// WeChat's errcode, 0 when the error is not WeChat's.
    pub fn errcode(&self) -> i64 {
        match self {
            ApiError::WeChat { errcode, .. } => *errcode,
            _ => 0,
        }
    }

    /// WeChat's errmsg, or what went wrong otherwise.
    pub fn errmsg(&self) -> String {
        match self {
            ApiError::WeChat { errmsg, .. } => errmsg.clone(),
            other => other.to_string(),
        }
    }
}

pub const CUSTOM_SEND: &str = "/cgi-bin/message/custom/send";
pub const CUSTOM_TYPING: &str = "/cgi-bin/message/custom/typing";
const STABLE_TOKEN: &str = "/cgi-bin/stable_token";
const TOKEN_SERVICE: &str = "token_url";

/// Calls WeChat's API for the accounts; shared by the request path (typing)
/// and the late replies' sender.
pub struct WechatApi {
    client: HttpClient,
    spool: Arc<dyn LateReplies>,
    clock: Arc<dyn Clock>,
    /// One fetch at a time in this process: the others then find its token.
    fetching: tokio::sync::Mutex<()>,
}

impl WechatApi {
    pub fn new(client: HttpClient, spool: Arc<dyn LateReplies>, clock: Arc<dyn Clock>) -> Self {
        WechatApi {
            client,
            spool,
            clock,
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// `POST {api_base}{path}?access_token=…` with `body`; on an invalid or
    /// expired token, one fresh token and one more call. No post starts
    /// after `last_post`, and fetching the token (behind other fetches)
    /// waits no longer than that.
    pub async fn call(
        &self,
        (account, api): (&Account, &AccountApi),
        path: &'static str,
        body: &Value,
        last_post: Instant,
    ) -> Result<(), ApiError> {
        let token = |refused| async move {
            tokio::time::timeout_at(last_post, self.token(account, api, refused))
                .await
                .unwrap_or(Err(ApiError::TimeUp { path }))
        };
        let first = token(None).await?;
        match self.post(api, path, &first, body, last_post).await {
            Err(ApiError::WeChat { errcode, .. }) if TOKEN_ERRCODES.contains(&errcode) => {
                tracing::info!(account = %account.id, errcode, "access token refused; fetching a fresh one");
                let fresh = token(Some(&first)).await?;
                self.post(api, path, &fresh, body, last_post).await
            }
            other => other,
        }
    }

    /// The account's token: the spool's while it is not near its expiry
    /// (and not `refused`), else a fresh one, kept on the spool.
    async fn token(
        &self,
        account: &Account,
        api: &AccountApi,
        refused: Option<&str>,
    ) -> Result<String, ApiError> {
        let (id, app_id) = (account.id.as_str(), account.app_id.as_str());
        let usable = |kept: &Option<ApiToken>, now: i64| {
            kept.as_ref()
                .filter(|t| t.expires_at.0 > now)
                .filter(|t| Some(t.token.as_str()) != refused)
                .map(|t| t.token.clone())
        };
        let kept = self.kept(id).await;
        if let Some(token) = usable(&kept, self.clock.now_ms()) {
            return Ok(token);
        }
        let _one = self.fetching.lock().await;
        // Another task (or replica) may have fetched while this one waited.
        let kept = self.kept(id).await;
        if let Some(token) = usable(&kept, self.clock.now_ms()) {
            return Ok(token);
        }
        let (token, expires_in) = self.fetch(app_id, api).await?;
        let expires_at = used_until(UnixMs(self.clock.now_ms()), expires_in);
        let fresh = ApiToken {
            account: id.to_owned(),
            token: token.clone(),
            expires_at,
        };
        if let Err(e) = self.spool.keep_api_token(fresh).await {
            tracing::warn!(account = id, error = %crate::error_chain(&e), "cannot keep the access token on the spool; using it once");
        }
        tracing::info!(account = id, expires_in, "access token fetched");
        Ok(token)
    }

    async fn kept(&self, account: &str) -> Option<ApiToken> {
        match self.spool.api_token(account).await {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(account, error = %crate::error_chain(&e), "cannot read the kept access token");
                None
            }
        }
    }

    /// A token and its lifetime in seconds from the account's source.
    async fn fetch(&self, app_id: &str, api: &AccountApi) -> Result<(String, u64), ApiError> {
        let answer = match &api.token_source {
            TokenSource::StableToken { app_secret } => {
                let body = serde_json::json!({
                    "grant_type": "client_credential",
                    "appid": app_id,
                    "secret": app_secret.expose(),
                    "force_refresh": false,
                });
                let url = joined(&api.api_base, STABLE_TOKEN, None);
                self.request(STABLE_TOKEN, Method::POST, &url, Some(&body))
                    .await?
            }
            TokenSource::Url(url) => {
                self.request(TOKEN_SERVICE, Method::GET, url.as_str(), None)
                    .await?
            }
        };
        let path = match api.token_source {
            TokenSource::StableToken { .. } => STABLE_TOKEN,
            TokenSource::Url(_) => TOKEN_SERVICE,
        };
        let token = answer["access_token"].as_str().filter(|t| !t.is_empty());
        let expires_in = answer["expires_in"].as_u64().filter(|s| *s > 0);
        match (token, expires_in) {
            (Some(token), Some(expires_in)) => Ok((token.to_owned(), expires_in)),
            _ => Err(ApiError::Answer { path }),
        }
    }

    async fn post(
        &self,
        api: &AccountApi,
        path: &'static str,
        token: &str,
        body: &Value,
        last_post: Instant,
    ) -> Result<(), ApiError> {
        if Instant::now() >= last_post {
            return Err(ApiError::TimeUp { path });
        }
        let url = joined(&api.api_base, path, Some(token));
        self.request(path, Method::POST, &url, Some(body))
            .await
            .map(drop)
    }

    /// One request; WeChat's JSON answer, or its `errcode` as an error.
    async fn request(
        &self,
        path: &'static str,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let transport = |error: String| ApiError::Transport { path, error };
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .map_err(|_| transport("not a valid request URL".to_owned()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| transport(crate::error_chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| transport("the answer could not be read".to_owned()))?;
            Ok::<_, ApiError>((status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))??;
        if !status.is_success() {
            return Err(ApiError::Status {
                path,
                status: status.as_u16(),
            });
        }
        let answer: Value = serde_json::from_slice(&body).map_err(|_| ApiError::Answer { path })?;
        match answer["errcode"].as_i64() {
            None | Some(0) => Ok(answer),
            Some(errcode) => Err(ApiError::WeChat {
                path,
                errcode,
                errmsg: answer["errmsg"].as_str().unwrap_or("").to_owned(),
            }),
        }
    }
}

/// Until when a token fetched at `fetched` that lives `expires_in` seconds
/// is used: [`REFRESH_AHEAD_MS`] before it expires, or half way through a
/// life shorter than twice that.
fn used_until(fetched: UnixMs, expires_in: u64) -> UnixMs {
    let life_ms = i64::try_from(expires_in.saturating_mul(1000)).unwrap_or(i64::MAX);
    UnixMs(
        fetched
            .0
            .saturating_add(life_ms - REFRESH_AHEAD_MS.min(life_ms / 2)),
    )
}

/// `{base}{path}`, with the token as `access_token` when there is one.
fn joined(base: &url::Url, path: &str, token: Option<&str>) -> String {
    let mut url = base.clone();
    let prefix = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(None);
    if let Some(token) = token {
        url.query_pairs_mut().append_pair("access_token", token);
    }
    url.to_string()
}

/// What a send's failure means for the late reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Worth another try later: WeChat busy (-1), a rate limit, the
    /// network, a 5xx.
    Transient,
    /// The account's setup that WeChat refused: an IP not in the account's
    /// allowlist (40164), a wrong secret (40125) or AppID (40013). The
    /// operator can fix it: tried again, and alerted on.
    Setup,
    /// Never going to work for this reply: outside the 48-hour window
    /// (45015), too many messages without an answer (45047), no permission
    /// (48001), an unknown user, any other errcode.
    Permanent,
}

/// WeChat's errcodes that pass: system busy, API rate limits.
const TRANSIENT_ERRCODES: [i64; 3] = [-1, 45009, 45011];
/// WeChat's errcodes for the account's setup: the IP allowlist, the
/// secret, the AppID.
const SETUP_ERRCODES: [i64; 3] = [40164, 40125, 40013];

pub fn classify(error: &ApiError) -> Failed {
    match error {
        ApiError::Transport { .. } | ApiError::Answer { .. } | ApiError::TimeUp { .. } => {
            Failed::Transient
        }
        ApiError::Status { status, .. } if *status >= 500 || *status == 429 => Failed::Transient,
        ApiError::Status { .. } | ApiError::NoApi | ApiError::Unreadable => Failed::Permanent,
        ApiError::WeChat { errcode, .. } if TRANSIENT_ERRCODES.contains(errcode) => {
            Failed::Transient
        }
        ApiError::WeChat { errcode, .. } if SETUP_ERRCODES.contains(errcode) => Failed::Setup,
        // A token refused even fresh: the token source is at fault, and may recover.
        ApiError::WeChat { errcode, .. } if TOKEN_ERRCODES.contains(errcode) => Failed::Transient,
        ApiError::WeChat { .. } => Failed::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wechat(errcode: i64) -> ApiError {
        ApiError::WeChat {
            path: CUSTOM_SEND,
            errcode,
            errmsg: String::new(),
        }
    }

    #[test]
    fn the_window_the_rate_and_the_permission_are_final_and_busy_is_not() {
        for errcode in [45015, 45047, 48001, 40003] {
            assert_eq!(classify(&wechat(errcode)), Failed::Permanent, "{errcode}");
        }
        for errcode in [-1, 45009, 40001] {
            assert_eq!(classify(&wechat(errcode)), Failed::Transient, "{errcode}");
        }
        let status = |status| ApiError::Status {
            path: CUSTOM_SEND,
            status,
        };
        assert_eq!(classify(&status(502)), Failed::Transient);
        assert_eq!(classify(&status(404)), Failed::Permanent);
    }

    /// A send whose lease has ended (another sender may hold it now) posts
    /// nothing; one within it does.
    #[tokio::test]
    async fn no_post_starts_once_the_sends_time_is_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = url::Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::spool::SqliteSpool::open(&dir.path().join("s.db")).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let api = WechatApi::new(crate::deliver::client(), Arc::new(spool), clock);
        let to = AccountApi {
            token_source: TokenSource::Url(base.clone()),
            api_base: base,
        };
        let body = serde_json::json!({});
        let ended = tokio::time::Instant::now();
        let refused = api.post(&to, CUSTOM_SEND, "t", &body, ended).await;
        assert_eq!(refused, Err(ApiError::TimeUp { path: CUSTOM_SEND }));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        let within = ended + Duration::from_secs(60);
        let posted = api.post(&to, CUSTOM_SEND, "t", &body, within).await;
        assert!(
            matches!(posted, Err(ApiError::Transport { .. })),
            "{posted:?}"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A token is fetched again 5 minutes before it expires, or half way
    /// through a shorter life: a token service's 200-second token is used.
    #[test]
    fn a_token_is_used_until_shortly_before_it_expires_however_short_its_life() {
        let fetched = UnixMs(1_000_000);
        assert_eq!(used_until(fetched, 7200), UnixMs(1_000_000 + 6_900_000));
        assert_eq!(used_until(fetched, 600), UnixMs(1_000_000 + 300_000));
        assert_eq!(used_until(fetched, 200), UnixMs(1_000_000 + 100_000));
        assert!(used_until(fetched, 1) > fetched);
    }

    #[test]
    fn the_token_goes_in_the_query_of_the_api_path() {
        let base = url::Url::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(
            joined(&base, CUSTOM_SEND, Some("a b&c")),
            "http://127.0.0.1:9/cgi-bin/message/custom/send?access_token=a+b%26c"
        );
        let prefixed = url::Url::parse("http://h/wechat/").unwrap();
        assert_eq!(
            joined(&prefixed, STABLE_TOKEN, None),
            "http://h/wechat/cgi-bin/stable_token"
        );
    }
}
