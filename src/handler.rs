//! The WeChat-facing request path.
//!
//! GET `/wx/{account}` is the URL check: verify `signature`, echo `echostr`
//! (WeCom: verify `msg_signature`, answer the decrypted `echostr`).
//! POST `/wx/{account}` is a push: the query's checks
//! ([`crate::wechat::inbound`], as the account's family does them) → reserve
//! and read the body under the size caps → the body's checks →
//! [`crate::ingest`] (route, one durable spool commit) → the reply target's
//! inline attempt through the dispatcher → answer `success` or the reply, as
//! [`crate::wechat::reply::answer`] judges it. An Open Platform also has its
//! message URL, `/wx/{account}/{authoriser's AppID}`.
//!
//! [`handle`] is the outer shell: it runs the inner `?` chain and turns its one
//! error type, [`Rejection`], into a status, a reason, a verdict label and a log
//! line, in one exhaustive `match`.

use crate::clock::Clock;
use crate::config::{Account, Mode, Settings, Target};
use crate::deliver::attempt::Attempt;
use crate::deliver::retry::Verdict;
use crate::deliver::{Dispatcher, InlineAnswer, Keeping, Unread, WorkerAnswers};
use crate::ingest::{Ingest, IngestError, Ingested, ReplyTo};
use crate::late::{Addressed, Late};
use crate::metrics::Metrics;
use crate::route::LateReply;
use crate::server::Peer;
use crate::spool::{DeadReason, Event, UnixMs};
use crate::telemetry::{PushFacts, PushTrace, Telemetry};
use crate::trail::{RefusalGate, ReplyOutcome, TrailNote, TrailRefusal, TrailReply};
use crate::wechat::crypto::KeySlot;
use crate::wechat::customer_service::LateMessage;
use crate::wechat::family::Family;
use crate::wechat::inbound::{Callback, Credentials, Refused, VerifiedPush};
use crate::wechat::message::Message;
use crate::wechat::push::digits;
use crate::wechat::reply;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Why a request was refused. Every variant maps to one status and one verdict
/// in [`Rejection::status`] and [`Rejection::verdict`].
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("unknown account")]
    UnknownAccount,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("body too large")]
    TooLarge,
    #[error("could not read the body")]
    BodyRead,
    #[error("body not received within the reply budget")]
    BodyTimeout,
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("too many request bodies in flight")]
    Busy,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::UnknownAccount | Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyRead => StatusCode::BAD_REQUEST,
            Rejection::Refused(refused) => match refused {
                Refused::MissingEchostr
                | Refused::RepeatedParam(_)
                | Refused::BadEncryptType
                | Refused::MissingEncrypt
                | Refused::BadXml(_)
                | Refused::BadJson(_)
                | Refused::Decrypt(_)
                | Refused::OpenidMismatch
                | Refused::BadAuthorizer
                | Refused::NotAuthorizationEvent => StatusCode::BAD_REQUEST,
                Refused::MissingSignature(_) | Refused::BadSignature | Refused::BadMsgSignature => {
                    StatusCode::UNAUTHORIZED
                }
                Refused::Stale
                | Refused::PlaintextRefused
                | Refused::EncryptedRefused
                | Refused::BadAppId { .. }
                | Refused::BadReceiveId { .. } => StatusCode::FORBIDDEN,
            },
            Rejection::Ingest(IngestError::Replayed) => StatusCode::FORBIDDEN,
            Rejection::Ingest(IngestError::Spool(_) | IngestError::Timeout) | Rejection::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What the client is told: the reason, except that a storage failure's
    /// cause (a path, the disk's state) is for the log only.
    fn client_reason(&self) -> String {
        match self {
            Rejection::Ingest(IngestError::Spool(_)) => "spool unavailable".to_string(),
            other => other.to_string(),
        }
    }

    /// What this outcome is counted and logged as.
    pub fn verdict(&self) -> PushVerdict {
        match self {
            Rejection::UnknownAccount | Rejection::NotFound => PushVerdict::UnknownAccount,
            Rejection::MethodNotAllowed => PushVerdict::MethodNotAllowed,
            Rejection::TooLarge => PushVerdict::TooLarge,
            Rejection::BodyRead | Rejection::BodyTimeout => PushVerdict::BadRequest,
            Rejection::Refused(refused) => match refused {
                Refused::MissingEchostr
                | Refused::RepeatedParam(_)
                | Refused::BadEncryptType
                | Refused::BadAuthorizer
                | Refused::NotAuthorizationEvent => PushVerdict::BadRequest,
                Refused::MissingSignature(_) | Refused::BadSignature => PushVerdict::BadSignature,
                Refused::Stale => PushVerdict::Stale,
                Refused::PlaintextRefused | Refused::EncryptedRefused => PushVerdict::ModeRefused,
                Refused::MissingEncrypt | Refused::Decrypt(_) => PushVerdict::DecryptError,
                Refused::BadMsgSignature => PushVerdict::BadMsgSignature,
                Refused::BadXml(_) => PushVerdict::BadXml,
                Refused::BadJson(_) => PushVerdict::BadJson,
                Refused::BadAppId { .. } => PushVerdict::BadAppId,
                Refused::BadReceiveId { .. } => PushVerdict::BadReceiveId,
                Refused::OpenidMismatch => PushVerdict::OpenidMismatch,
            },
            Rejection::Ingest(IngestError::Replayed) => PushVerdict::Replayed,
            Rejection::Ingest(IngestError::Spool(_) | IngestError::Timeout) => {
                PushVerdict::SpoolUnavailable
            }
            Rejection::Busy => PushVerdict::Busy,
        }
    }

    /// The receive id a frame held instead of the account's, for the log.
    fn receive_id_found(&self) -> Option<String> {
        match self {
            Rejection::Refused(Refused::BadAppId { found } | Refused::BadReceiveId { found }) => {
                Some(found.to_string())
            }
            _ => None,
        }
    }
}

/// How a request to `/wx/{account}` ended, as counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushVerdict {
    Ok,
    Duplicate,
    UnknownAccount,
    MethodNotAllowed,
    TooLarge,
    BadRequest,
    BadSignature,
    Stale,
    ModeRefused,
    DecryptError,
    BadMsgSignature,
    BadXml,
    BadJson,
    BadAppId,
    BadReceiveId,
    OpenidMismatch,
    Replayed,
    SpoolUnavailable,
    Busy,
}

impl PushVerdict {
    /// The metric label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            PushVerdict::Ok => "ok",
            PushVerdict::Duplicate => "duplicate",
            PushVerdict::UnknownAccount => "unknown_account",
            PushVerdict::MethodNotAllowed => "method_not_allowed",
            PushVerdict::TooLarge => "too_large",
            PushVerdict::BadRequest => "bad_request",
            PushVerdict::BadSignature => "bad_signature",
            PushVerdict::Stale => "stale",
            PushVerdict::ModeRefused => "mode_refused",
            PushVerdict::DecryptError => "decrypt_error",
            PushVerdict::BadMsgSignature => "bad_msg_signature",
            PushVerdict::BadXml => "bad_xml",
            PushVerdict::BadJson => "bad_json",
            PushVerdict::BadAppId => "bad_appid",
            PushVerdict::BadReceiveId => "bad_receive_id",
            PushVerdict::OpenidMismatch => "openid_mismatch",
            PushVerdict::Replayed => "replayed",
            PushVerdict::SpoolUnavailable => "spool_unavailable",
            PushVerdict::Busy => "busy",
        }
    }
}

/// What a request that was not refused gets.
#[derive(Debug)]
enum Answer {
    Echo(String),
    Accepted(Box<Accepted>),
}

#[derive(Debug)]
struct Accepted {
    ingested: Ingested,
    /// What the reply target's inline attempt gave WeChat, when there was one.
    reply: Option<&'static str>,
    key_slot: Option<KeySlot>,
    body: Bytes,
    /// Its ids and times, when traces are exported.
    trace: Option<PushTrace>,
}

impl Accepted {
    fn duplicate(&self) -> bool {
        self.ingested.stored.is_none()
    }
}

/// What the public listener's requests need: the running configuration, the
/// clock (freshness), the metrics, the bytes that bodies in flight may hold,
/// ingest, and the dispatcher for the reply target's inline attempt.
pub struct PushPath {
    pub config: Arc<ArcSwap<Settings>>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// One permit per byte of `max_body_bytes_in_flight`: a push reserves its
    /// body's size before reading it and keeps it until answered.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    pub ingest: Ingest,
    pub dispatcher: Arc<Dispatcher>,
    /// The stamps of the envelopes `wechat` reply targets sealed lately.
    pub reply_stamps: reply::SeenStamps,
    /// Where the spans of stored pushes go, when traces are exported.
    pub telemetry: Option<Arc<Telemetry>>,
    /// Late replies: kept, sent, and given with the next push.
    pub late: Arc<Late>,
    /// Which refused pushes the trail records.
    pub refusals: RefusalGate,
}

/// Serves one request on the public listener. Never fails: every outcome is an
/// HTTP answer, counted and logged once here.
pub async fn handle(
    path: Arc<PushPath>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let config = path.config.load_full();
    let method = req.method().clone();
    // Only configured accounts become label values; anything else is "-".
    let account = endpoint(req.uri().path())
        .map(|(id, _)| id)
        .filter(|id| config.accounts.contains_key(*id))
        .unwrap_or("-")
        .to_string();
    let source = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let outcome = answer(&path, &config, req, started).await;
    let account = account.as_str();
    let elapsed = started.elapsed();
    let latency_ms = crate::rounded_ms(elapsed);
    let verdict = match &outcome {
        Ok(Answer::Accepted(a)) if a.duplicate() => PushVerdict::Duplicate,
        Ok(_) => PushVerdict::Ok,
        Err(rejection) => rejection.verdict(),
    };
    let verdict = verdict.as_str();
    let m = &path.metrics;
    if method == Method::POST {
        m.pushes.with_label_values(&[account, verdict]).inc();
        if outcome.is_err() {
            m.recent.refused(path.clock.now_ms(), verdict);
        }
        m.answer_seconds
            .with_label_values(&[account])
            .observe(elapsed.as_secs_f64());
    } else {
        m.url_checks.with_label_values(&[account, verdict]).inc();
    }
    Ok(match outcome {
        Ok(Answer::Echo(echostr)) => {
            tracing::info!(account, verdict, latency_ms, "URL verification answered");
            text(StatusCode::OK, "text/plain; charset=utf-8", echostr.into())
        }
        Ok(Answer::Accepted(mut a)) => {
            observe_accepted(m, account, verdict, latency_ms, &a);
            if config.trail.enabled {
                note_reply(&path, &config, &a, elapsed);
            }
            if let Some(telemetry) = &path.telemetry {
                export_spans(telemetry, account, verdict, &mut a);
            }
            text(StatusCode::OK, answer_content_type(&a.body), a.body)
        }
        Err(rejection) => {
            if method == Method::POST && config.trail.enabled {
                note_refusal(&path, account, &rejection, source);
            }
            let status = rejection.status();
            if status.is_server_error() {
                tracing::error!(account, %method, verdict, latency_ms, reason = %rejection, "push not accepted");
            } else {
                let receive_id = rejection.receive_id_found();
                tracing::warn!(account, %method, verdict, latency_ms, reason = %rejection, receive_id, "request refused");
            }
            text(
                status,
                "text/plain; charset=utf-8",
                format!("{}\n", rejection.client_reason()).into(),
            )
        }
    })
}

/// The metrics and the log line of an accepted push, from what ingest and
/// the inline reply gave.
fn observe_accepted(m: &Metrics, account: &str, verdict: &str, latency_ms: f64, a: &Accepted) {
    let i = &a.ingested;
    if !a.duplicate() {
        let (msg_type, event) = crate::metrics::event_labels(&i.msg_type, &i.event_name);
        m.events
            .with_label_values(&[account, msg_type, event])
            .inc();
        if let Some(login) = i.login {
            m.login_events
                .with_label_values(&[account, login.as_str()])
                .inc();
        }
        if i.unrouted {
            m.dead_letters
                .with_label_values(&["", DeadReason::Unrouted.as_str()])
                .inc();
        }
    }
    if let Some(outcome) = a.reply {
        m.replies.with_label_values(&[account, outcome]).inc();
    }
    if a.key_slot == Some(KeySlot::Previous) {
        m.previous_key_decrypts.with_label_values(&[account]).inc();
        tracing::warn!(account, "push decrypted with the previous EncodingAESKey");
    }
    tracing::info!(
        account,
        kind = %i.kind,
        verdict,
        latency_ms,
        key = %i.key_hash,
        event_id = i.stored.as_ref().map(|s| s.event_id.0),
        unrouted = i.unrouted,
        reply = a.reply,
        ticket = i.ticket.map(|latest| if latest { "kept" } else { "older" }),
        "push answered"
    );
}

/// A refused push in the trail: its reason and where it came from, within
/// the account's rate; beyond it, only counted.
fn note_refusal(
    path: &PushPath,
    account: &str,
    rejection: &Rejection,
    source: Option<std::net::IpAddr>,
) {
    let now = UnixMs(path.clock.now_ms());
    if !path.refusals.admit(account, now) {
        path.metrics
            .trail_refusals_dropped
            .with_label_values(&[account])
            .inc();
        return;
    }
    let note = TrailNote::Refused {
        at: now,
        account: account.to_owned(),
        refusal: TrailRefusal {
            reason: rejection.client_reason(),
            source: source.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        },
    };
    if !path.ingest.spool.note(note) {
        path.metrics.trail_notes_dropped.inc();
    }
}

/// A stored push's reply in the trail, now that its answer leaves.
fn note_reply(path: &PushPath, config: &Settings, a: &Accepted, took: Duration) {
    // Without an inline reply the reply was written with the push.
    let Some(stored) = a.ingested.stored.as_ref().filter(|s| s.reply.is_some()) else {
        return;
    };
    let budget = config.server.reply_budget;
    let outcome = match a.reply {
        None | Some("ignored") => ReplyOutcome::None,
        Some("passed") => ReplyOutcome::Passed,
        Some("encrypted") => ReplyOutcome::Sealed,
        Some("unverifiable") => ReplyOutcome::Unverifiable,
        // No reply: the budget ran out, or the target failed within it
        // (unreachable, an error status).
        Some(_) if took + MIN_INLINE_ATTEMPT >= budget => ReplyOutcome::TimedOut,
        Some(_) => ReplyOutcome::Failed,
    };
    let note = TrailNote::Reply {
        event_id: stored.event_id,
        reply: TrailReply {
            outcome,
            latency_ms: took.as_millis() as u64,
            budget_ms: budget.as_millis() as u64,
        },
    };
    if !path.ingest.spool.note(note) {
        path.metrics.trail_notes_dropped.inc();
    }
}

/// The spans of a stored push, now that it is answered; a duplicate has no
/// event of its own to carry, and makes none.
fn export_spans(telemetry: &Telemetry, account: &str, verdict: &str, a: &mut Accepted) {
    let (Some(trace), Some(stored)) = (a.trace.take(), a.ingested.stored.as_ref()) else {
        return;
    };
    let reply = stored.reply.as_ref().zip(a.reply);
    let facts = PushFacts {
        event_id: stored.event_id,
        account,
        msg_type: &a.ingested.msg_type,
        event: &a.ingested.event_name,
        verdict,
        reply: reply.map(|(to, outcome)| (to.target.name.as_str(), outcome)),
    };
    telemetry.push_spans(trace, &facts);
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

/// `success` is the only answer that is not XML: a reply (plain or sealed)
/// is labelled as the XML it is.
fn answer_content_type(body: &[u8]) -> &'static str {
    if body == b"success" {
        "text/plain; charset=utf-8"
    } else {
        "application/xml; charset=utf-8"
    }
}

/// `/wx/{account}` → the account id; `/wx/{account}/{appid}` (an Open
/// Platform's message URL) → the account id and the authoriser's AppID.
fn endpoint(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/wx/")?;
    let (account, authorizer) = match rest.split_once('/') {
        None => (rest, None),
        Some((account, authorizer)) => (account, Some(authorizer)),
    };
    let segment = |s: &str| !s.is_empty() && !s.contains('/');
    (segment(account) && authorizer.is_none_or(segment)).then_some((account, authorizer))
}

async fn answer(
    path: &Arc<PushPath>,
    config: &Settings,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Answer, Rejection> {
    // The callback reads the path after the body is taken from the request.
    let uri = req.uri().clone();
    let (account_id, authorizer) = endpoint(uri.path()).ok_or(Rejection::NotFound)?;
    let account = config
        .accounts
        .get(account_id)
        .ok_or(Rejection::UnknownAccount)?;
    // Only an Open Platform has a URL below its own: its message URL.
    if authorizer.is_some() && account.kind != Family::OpenPlatform {
        return Err(Rejection::NotFound);
    }
    let callback = Callback::new(account.kind, account.codec, authorizer)?;
    let query = uri.query().unwrap_or("");
    let creds = credentials(account);
    let now_secs = path.clock.now_secs();
    match *req.method() {
        Method::GET => Ok(Answer::Echo(callback.check_url(&creds, query, now_secs)?)),
        Method::POST => {
            // A signature covers the query, so everything the query decides
            // is checked before a byte of the body is read: an unsigned
            // flood costs no memory and holds no connection.
            let signed = callback.check_push_query(&creds, query, now_secs)?;
            let reserved = reserve_body(path, &req, config.server.max_body)?;
            // The body must arrive within the reply budget too: WeChat sends it
            // at once, and a client trickling it holds a connection for nothing.
            let read = read_body(req, config.server.max_body);
            let body = tokio::time::timeout(config.server.reply_budget, read)
                .await
                .map_err(|_| Rejection::BodyTimeout)??;
            let verified = callback.verify_push(&creds, signed, &body)?;
            let from = verified.message.from_user();
            let trace = path.telemetry.as_ref().map(|t| t.push(started, from));
            let accepted =
                accept_push(path, config, account, verified, body, (started, trace)).await;
            drop(reserved);
            accepted.map(|a| Answer::Accepted(Box::new(a)))
        }
        _ => Err(Rejection::MethodNotAllowed),
    }
}

/// What the account's pushes are verified with.
fn credentials(account: &Account) -> Credentials<'_> {
    Credentials {
        token: account.token.expose(),
        app_id: &account.app_id,
        keys: account.keys.as_ref(),
        timestamp_window: account.timestamp_window,
        accepts_plaintext: account.mode != Mode::Secure,
        accepts_encrypted: account.mode != Mode::Plaintext,
    }
}

/// Bytes of `max_body_bytes_in_flight` held for one body until its push is
/// answered.
struct Reserved {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
    bytes: i64,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}

/// Reserves the declared body size (`max_body` when none is declared), or
/// refuses the push when that much is not free: bodies in flight are what a
/// flood of signed-looking pushes would grow memory with.
fn reserve_body(
    path: &PushPath,
    req: &Request<Incoming>,
    max_body: usize,
) -> Result<Reserved, Rejection> {
    let declared = declared_length(req);
    if declared.is_some_and(|len| len > max_body as u64) {
        return Err(Rejection::TooLarge);
    }
    let bytes = declared.map_or(max_body, |len| len as usize);
    let permits = u32::try_from(bytes).map_err(|_| Rejection::TooLarge)?;
    let permit = path
        .body_budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| Rejection::Busy)?;
    let gauge = path.metrics.body_bytes_in_flight.clone();
    gauge.add(bytes as i64);
    Ok(Reserved {
        _permit: permit,
        gauge,
        bytes: bytes as i64,
    })
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads the body, which [`reserve_body`] has let through.
async fn read_body(req: Request<Incoming>, max_body: usize) -> Result<Bytes, Rejection> {
    match Limited::new(req.into_body(), max_body).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::TooLarge),
        Err(_) => Err(Rejection::BodyRead),
    }
}

async fn accept_push(
    path: &Arc<PushPath>,
    config: &Settings,
    account: &Account,
    verified: VerifiedPush,
    body: Bytes,
    (started, mut trace): (Instant, Option<PushTrace>),
) -> Result<Accepted, Rejection> {
    let reply_budget = config.server.reply_budget;
    // Timed only when traced: off, nothing is measured.
    let commit_from = trace.as_ref().map(|_| Instant::now());
    let context = trace.as_ref().map(PushTrace::context);
    let ingested = path
        .ingest
        .ingest(
            config,
            account,
            &verified,
            (body, context),
            started + reply_budget,
        )
        .await?;
    if let (Some(trace), Some(from)) = (trace.as_mut(), commit_from) {
        trace.committed(from);
    }
    let mut answer = Bytes::from_static(b"success");
    let mut reply = None;
    // A late reply kept for this user is the answer to their next push.
    let given = match &ingested.stored {
        Some(_) => given_late_reply(path, config, account, &verified).await,
        None => None,
    };
    if let Some(to) = ingested.stored.as_ref().and_then(|s| s.reply.as_ref()) {
        let reply_from = trace.as_ref().map(|_| Instant::now());
        // With no time left, an attempt could not even be sent: leave the
        // delivery to the workers rather than count an attempt never made;
        // a route with late replies waits for the target all the same.
        let remaining = match given {
            Some(_) => Duration::ZERO,
            None => reply_budget.saturating_sub(started.elapsed()),
        };
        let pushed = Answered::of(&verified);
        let inline = reply_target(path, account, to, &pushed, (started, remaining)).await;
        let (body, outcome) = answer_with(path, account, Some(&to.target), &pushed, inline);
        answer = body;
        reply = Some(outcome);
        if let (Some(trace), Some(from)) = (trace.as_mut(), reply_from) {
            trace.replied(from);
        }
    }
    if let Some(xml) = given {
        let pushed = Answered::of(&verified);
        let (body, outcome) = answer_with(path, account, None, &pushed, Inline::Answered(xml));
        answer = body;
        reply = Some(outcome);
    }
    Ok(Accepted {
        ingested,
        reply,
        key_slot: verified.key_slot,
        body: answer,
        trace,
    })
}

/// What the reply target gives for WeChat's answer with `remaining` of the
/// budget: a route with late replies waits for it all the same; otherwise
/// it is attempted only with time enough left for an attempt.
async fn reply_target(
    path: &Arc<PushPath>,
    account: &Account,
    to: &ReplyTo,
    pushed: &Answered<'_>,
    (started, remaining): (Instant, Duration),
) -> Inline {
    if to.late.0 != LateReply::None {
        let attempt_time = to.attempt_time(started.elapsed());
        reply_or_late(path, account, to, pushed, (remaining, attempt_time)).await
    } else if remaining < MIN_INLINE_ATTEMPT {
        Inline::Nothing
    } else {
        reply_inline(path, to, remaining).await
    }
}

/// The least time worth an inline attempt at the reply target.
const MIN_INLINE_ATTEMPT: Duration = Duration::from_millis(50);

/// What the reply target's inline attempt gave for WeChat's answer.
enum Inline {
    /// Delivered, with this answer.
    Answered(Bytes),
    /// Delivered, with an answer larger than the relay reads: no reply.
    TooLarge,
    /// Not delivered (the workers will retry it), or a 2xx whose body did
    /// not arrive in time (delivered, with nothing to pass on).
    Nothing,
    /// Still thinking when the budget ran out: its answer becomes a late reply.
    Late,
}

/// One attempt at the rule's reply target within what is left of the budget.
/// Its outcome is recorded like any worker's; a failure leaves the delivery
/// to the workers.
async fn reply_inline(path: &PushPath, to: &ReplyTo, remaining: Duration) -> Inline {
    let target = &to.target;
    let timeout = remaining.min(target.timeout);
    let result = path
        .dispatcher
        .attempt_inline(
            target,
            (to.event_id, to.delivery_id),
            &to.event,
            (timeout, None),
        )
        .await;
    inline_of(&result)
}

fn inline_of(result: &Attempt) -> Inline {
    match (&result.verdict, &result.body) {
        (Verdict::Delivered, Ok(body)) => Inline::Answered(body.clone()),
        (Verdict::Delivered, Err(Unread::TooLarge)) => Inline::TooLarge,
        _ => Inline::Nothing,
    }
}

/// The push a reply answers, as judging and sealing the reply reads it:
/// borrowed from the request, or owned, so that a late answer is judged
/// after the request is gone.
#[derive(Debug, Clone)]
struct Answered<'a> {
    message: Cow<'a, Message>,
    /// `None` for an unencrypted push, and for a late answer: it is kept
    /// in plaintext, and sealed for the push it is finally given with.
    key_slot: Option<KeySlot>,
    timestamp: Cow<'a, str>,
    family: Family,
}

impl Answered<'_> {
    fn of(verified: &VerifiedPush) -> Answered<'_> {
        Answered {
            message: Cow::Borrowed(&verified.message),
            key_slot: verified.key_slot,
            timestamp: Cow::Borrowed(&verified.timestamp),
            family: verified.origin.family,
        }
    }

    /// The push as a late answer is judged against: owned, and unsealed.
    fn for_later(&self) -> Answered<'static> {
        Answered {
            message: Cow::Owned(self.message.clone().into_owned()),
            key_slot: None,
            timestamp: Cow::Owned(self.timestamp.clone().into_owned()),
            family: self.family,
        }
    }
}

/// The reply target of a route with late replies: attempted for up to
/// `attempt_time` (its `timeout`, less what the push has taken already). An
/// answer within `remaining` is WeChat's; one after it (WeChat has its
/// `success` by then) becomes a late reply, stored before the delivery is
/// recorded delivered.
async fn reply_or_late(
    path: &Arc<PushPath>,
    account: &Account,
    to: &ReplyTo,
    pushed: &Answered<'_>,
    (remaining, attempt_time): (Duration, Duration),
) -> Inline {
    let Some(openid) = pushed.message.from_user().filter(|o| !o.is_empty()) else {
        return reply_inline(path, to, remaining).await;
    };
    let taker = Arc::new(Mutex::new(Taker::Wechat));
    let answer = late_answer(path.clone(), taker.clone());
    let dispatcher = path.dispatcher.clone();
    let (target, event) = (to.target.clone(), to.event.clone());
    let ids = (to.event_id, to.delivery_id);
    let mut attempt = tokio::spawn(async move {
        dispatcher
            .attempt_inline(&target, ids, &event, (attempt_time, Some(answer)))
            .await
    });
    if let Ok(done) = tokio::time::timeout(remaining, &mut attempt).await {
        return done.map_or(Inline::Nothing, |result| inline_of(&result));
    }
    let (channel, ttl) = to.late;
    let later = Later {
        account: account.clone(),
        target: to.target.clone(),
        pushed: pushed.for_later(),
        addressed: Addressed {
            account: account.id.clone(),
            openid: openid.to_owned(),
            channel,
            ttl,
            pushed_at: to.event.received_at,
        },
    };
    if !taker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .hand_over(later)
    {
        // The answer came as the budget ran out: it is still WeChat's.
        return attempt
            .await
            .map_or(Inline::Nothing, |result| inline_of(&result));
    }
    if channel == LateReply::CustomerService {
        // Beside the wait, never before it: a slow API must not hold the answer.
        let (late, account, openid) = (path.late.clone(), account.id.clone(), openid.to_owned());
        tokio::spawn(async move { late.typing(&account, &openid).await });
    }
    Inline::Late
}

/// Who the reply target's answer on a route with late replies is for:
/// WeChat while the request waits for it, a late reply once it has stopped
/// waiting. Whichever comes first, the answer or the end of the wait, decides.
enum Taker {
    Wechat,
    Late(Box<Later>),
    Answered,
}

impl Taker {
    /// Hands the answer still to come over to a late reply; false when it
    /// has come already.
    fn hand_over(&mut self, later: Later) -> bool {
        match self {
            Taker::Wechat => {
                *self = Taker::Late(Box::new(later));
                true
            }
            Taker::Late(_) | Taker::Answered => false,
        }
    }

    /// The late reply an answer that has just come is for, if the request
    /// stopped waiting for it.
    fn answered(&mut self) -> Option<Later> {
        match std::mem::replace(self, Taker::Answered) {
            Taker::Late(later) => Some(*later),
            Taker::Wechat | Taker::Answered => None,
        }
    }
}

/// Keeps the inline attempt's answer as a late reply when the request has
/// stopped waiting for it, before the delivery is recorded delivered.
fn late_answer(path: Arc<PushPath>, taker: Arc<Mutex<Taker>>) -> InlineAnswer {
    Box::new(move |result: &Attempt| {
        let later = taker.lock().unwrap_or_else(|e| e.into_inner()).answered()?;
        let inline = inline_of(result);
        Some(Box::pin(async move { keep_late_answer(&path, &later, inline).await }) as Keeping)
    })
}

/// What a late answer is judged against and kept for.
struct Later {
    account: Account,
    target: Target,
    pushed: Answered<'static>,
    addressed: Addressed,
}

/// Keeps a reply target's late answer as a late reply when it is a message
/// WeChat would take, judged as any reply to the push; false when the spool
/// could not store it.
async fn keep_late_answer(path: &PushPath, later: &Later, inline: Inline) -> bool {
    if matches!(inline, Inline::Nothing) {
        return true;
    }
    let (to, target) = (&later.addressed, Some(&later.target));
    let (xml, outcome) = answer_with(path, &later.account, target, &later.pushed, inline);
    let message = match outcome {
        "passed" | "encrypted" => std::str::from_utf8(&xml)
            .ok()
            .and_then(|xml| LateMessage::from_reply(xml).ok()),
        _ => None,
    };
    match message {
        Some(message) => path.late.keep(to, &message).await,
        None => {
            path.late.no_message(to);
            true
        }
    }
}

/// The answers the workers get from reply targets of routes with late
/// replies: a delivery whose inline attempt a restart cut short (or that
/// failed) is sent again by a worker, and the user gets that answer, kept
/// before the delivery is recorded delivered.
pub fn worker_answers(path: &Arc<PushPath>) -> WorkerAnswers {
    let path = Arc::downgrade(path);
    Box::new(move |target: &Target, event: &Event, body: Bytes| {
        let path = path.upgrade()?;
        let config = path.config.load_full();
        let replies_late = config.routes.iter().any(|r| {
            r.late_reply != LateReply::None && r.reply_from.as_deref() == Some(&target.name)
        });
        if !replies_late {
            return None;
        }
        let later = later_for(&config, target, event)?;
        Some(
            Box::pin(async move { keep_late_answer(&path, &later, Inline::Answered(body)).await })
                as Keeping,
        )
    })
}

/// What a worker's answer from `target` to `event` is judged against and
/// kept for: only when the event's route still has `target` as its
/// `reply_from` with late replies.
fn later_for(config: &Settings, target: &Target, event: &Event) -> Option<Later> {
    let account = config.accounts.get(&event.account)?;
    let origin = &event.origin;
    if origin.codec != crate::wechat::family::Codec::Xml || !origin.takes_reply() {
        return None;
    }
    let message = Message::parse_push(event.xml.as_bytes()).ok()?;
    let subject = crate::route::subject(&account.id, &message, origin);
    let (_, rule) = crate::route::route(&config.routes, subject)?;
    if rule.reply_from.as_deref() != Some(&target.name) || rule.late_reply == LateReply::None {
        return None;
    }
    let openid = message.from_user().filter(|o| !o.is_empty())?.to_owned();
    let addressed = Addressed {
        account: account.id.clone(),
        openid,
        channel: rule.late_reply,
        ttl: rule.late_reply_ttl,
        pushed_at: event.received_at,
    };
    Some(Later {
        account: account.clone(),
        target: target.clone(),
        pushed: Answered {
            message: Cow::Owned(message),
            key_slot: None,
            timestamp: Cow::Owned(String::new()),
            family: origin.family,
        },
        addressed,
    })
}

/// The passive reply XML of a late reply kept for this push's sender, when
/// some route keeps them and WeChat shows the user this push's reply;
/// taken, so that it is given once.
async fn given_late_reply(
    path: &PushPath,
    config: &Settings,
    account: &Account,
    verified: &VerifiedPush,
) -> Option<Bytes> {
    let shown = verified.origin.takes_reply() && verified.message.shows_a_reply();
    if !shown || !Late::keeps_for_next_message(config, &account.id) {
        return None;
    }
    let openid = verified.message.from_user().filter(|o| !o.is_empty())?;
    let message = path.late.take_next(&account.id, openid).await?;
    let from = verified.message.get("ToUserName").unwrap_or("");
    let xml = message.passive_reply(openid, from, path.clock.now_secs());
    Some(Bytes::from(xml))
}

/// What WeChat gets for the reply target's answer ([`reply::answer`] judges
/// it), and the outcome's label; `success` and `none` without an answer,
/// `late` when the answer is still to come. A kept late reply is given with
/// no target: the relay wrote it. The log line says why a reply was not
/// passed on.
fn answer_with(
    path: &PushPath,
    account: &Account,
    target: Option<&Target>,
    pushed: &Answered<'_>,
    inline: Inline,
) -> (Bytes, &'static str) {
    let success = Bytes::from_static(b"success");
    let name = target.map_or("-", |t| t.name.as_str());
    let body = match inline {
        Inline::Answered(body) => body,
        Inline::Nothing => return (success, "none"),
        Inline::Late => return (success, "late"),
        Inline::TooLarge => {
            tracing::warn!(account = %account.id, target = name, "reply target answered more than the relay reads of an answer, far more than a reply may have; answering success");
            return (success, "unverifiable");
        }
    };
    let to = reply::Answering {
        token: account.token.expose(),
        app_id: &account.app_id,
        keys: account.keys.as_ref(),
        secure: account.mode == Mode::Secure,
        push: &pushed.message,
        key_slot: pushed.key_slot,
        timestamp: &pushed.timestamp,
    };
    let own = target
        .and_then(|t| t.wechat.as_ref().map(|server| (t, server)))
        .map(|(t, server)| reply::OwnServer {
            target: &t.name,
            token: server.token.expose(),
            keys: server.keys.as_ref(),
            app_id: server.receive_id(pushed.family).unwrap_or(&account.app_id),
            // WeCom takes a sealed reply only.
            secure: server.mode == Mode::Secure || pushed.family == Family::Wecom,
            now_secs: path.clock.now_secs(),
            seen: &path.reply_stamps,
        });
    let salt = reply::Salt {
        nonce: &digits(10),
        random: &reply::random_bytes(),
    };
    let (answer, outcome) = reply::answer(&body, &to, own.as_ref(), &salt);
    match &outcome {
        reply::Outcome::Ignored => {
            tracing::info!(account = %account.id, target = name, "reply target answered something WeChat cannot take; answering success")
        }
        reply::Outcome::Unverifiable(reason) => {
            tracing::warn!(account = %account.id, target = name, %reason, "reply target's answer is not one the relay can pass to WeChat; answering success")
        }
        reply::Outcome::Passed | reply::Outcome::Sealed => {}
    }
    (Bytes::from(answer), outcome.as_str())
}
