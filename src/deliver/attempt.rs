//! One attempt at a target over HTTP, and what its answer means: the status
//! decides (through [`retry::classify`]), and the body is read within what is
//! left of the timeout for a passive reply and a dead letter's evidence.

use super::format;
use super::retry::{self, Verdict};
use crate::clock::Clock;
use crate::config::Target;
use crate::spool::{Event, UnixMs};
use crate::telemetry::TRACEPARENT;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::borrow::Cow;
use std::time::Duration;

/// The outbound HTTP client: pooled keep-alive connections, HTTP and HTTPS
/// (rustls with the webpki roots).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The most of a target's answer that is read: enough for a passive reply.
const MAX_ANSWER: usize = 64 * 1024;
/// How much of a refusing answer is kept in the dead-letter record.
const SNIPPET: usize = 200;

pub fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

/// The request for `outbound`: its URI and header values taken over
/// without a copy, the header map sized once for the headers it gets.
fn request(
    outbound: format::Outbound,
    traceparent: Option<&HeaderValue>,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let uri = Uri::try_from(outbound.uri)?;
    let content_type = match outbound.content_type {
        Cow::Borrowed(named) => HeaderValue::from_static(named),
        Cow::Owned(named) => HeaderValue::try_from(named)?,
    };
    let mut request = Request::new(Full::new(outbound.body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.reserve(3 + outbound.headers.len());
    headers.append(CONTENT_TYPE, content_type);
    headers.append(USER_AGENT, HeaderValue::from_static(AGENT));
    for (name, value) in outbound.headers {
        headers.append(name, HeaderValue::try_from(value)?);
    }
    if let Some(value) = traceparent {
        headers.append(TRACEPARENT, value.clone());
    }
    Ok(request)
}

/// What the relay says it is.
const AGENT: &str = concat!("wxrelay/", env!("CARGO_PKG_VERSION"));

/// The result of one attempt.
#[derive(Debug)]
pub struct Attempt {
    pub verdict: Verdict,
    pub status: Option<StatusCode>,
    /// The target's answer (up to 64 KiB), for a passive reply; or why
    /// there is none to read (the status still counts).
    pub body: Result<Bytes, Unread>,
}

/// Why an attempt has no answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// No answer, or a body that did not arrive whole within the timeout.
    Missing,
    /// More than the 64 KiB read of an answer: far more than any reply.
    TooLarge,
}

/// Sends `event` to `target` once, within `timeout`. `receive_id` is the
/// receive id of the event's account (its AppID, a WeCom app's CorpID),
/// which a `wechat` target may seal for; `traceparent` names the attempt's
/// span when traces are exported.
pub async fn attempt(
    client: &HttpClient,
    clock: &dyn Clock,
    target: &Target,
    (event, receive_id, traceparent): (&Event, Option<&str>, Option<&HeaderValue>),
    timeout: Duration,
) -> Attempt {
    let failed = |verdict| Attempt {
        verdict,
        status: None,
        body: Err(Unread::Missing),
    };
    let stamp = format::Stamp {
        now_secs: clock.now_secs(),
        receive_id,
    };
    let outbound = match format::build(target, event, stamp) {
        Ok(outbound) => outbound,
        Err(e) => {
            return failed(Verdict::Reject {
                error: e.to_string(),
            })
        }
    };
    let request = match request(outbound, traceparent) {
        Ok(request) => request,
        Err(e) => {
            return failed(Verdict::Reject {
                error: format!("bad request: {e}"),
            })
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let response = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => {
            return failed(Verdict::Retry {
                error: format!("no answer within {}", humantime::format_duration(timeout)),
                retry_after: None,
            })
        }
        Ok(Err(e)) => {
            return failed(Verdict::Retry {
                error: crate::error_chain(&e),
                retry_after: None,
            })
        }
        Ok(Ok(response)) => response,
    };
    let (parts, body) = response.into_parts();
    // The status is the answer: a 2xx is the delivery even if the body then
    // stalls, and a refusal's body is only evidence. Neither an unreadable
    // nor a late body changes what the status says.
    let read = Limited::new(body, MAX_ANSWER).collect();
    let body = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Unread::TooLarge),
        Ok(Err(_)) | Err(_) => Err(Unread::Missing),
    };
    answered(parts, body, clock)
}

/// What an HTTP answer means for the delivery.
fn answered(
    parts: http::response::Parts,
    body: Result<Bytes, Unread>,
    clock: &dyn Clock,
) -> Attempt {
    let retry_after = parts
        .headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, UnixMs(clock.now_ms()).to_system_time()));
    let snippet: String = String::from_utf8_lossy(body.as_deref().unwrap_or_default())
        .chars()
        .take(SNIPPET)
        .collect::<String>()
        .replace(['\r', '\n'], " ");
    Attempt {
        verdict: retry::classify(parts.status, retry_after, snippet.trim()),
        status: Some(parts.status),
        body,
    }
}
