//! The WeChat-facing request path.
//!
//! GET `/wx/{account}` is the URL check: verify `signature`, echo `echostr`.
//! POST `/wx/{account}` is a push: verify `signature` → check freshness, the
//! mode and `encrypt_type` → reserve and read the body under the size caps →
//! parse the outer XML → (encrypted) verify
//! `msg_signature`, decrypt with the key ring, check the AppID → parse the
//! message → route → one durable spool commit → answer `success`.
//!
//! [`handle`] is the outer shell: it runs the inner `?` chain and turns its one
//! error type, [`Rejection`], into a status, a reason, a verdict label and a log
//! line, in one exhaustive `match`.

use crate::app::Shared;
use crate::config::{Account, Mode, Settings, Target};
use crate::deliver::retry::Verdict;
use crate::route;
use crate::spool::{
    Enqueued, NewDelivery, NewEvent, ReplayGuard, SpoolError, StoredEvent, REASON_UNROUTED,
};
use crate::wechat::crypto::{DecryptError, KeyRing, KeySlot};
use crate::wechat::inbound::{self, Credentials, Refused, VerifiedPush};
use crate::wechat::message::XmlError;
use crate::wechat::reply::{self, ReplyBody};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::sync::Arc;
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
    #[error("missing {0}")]
    MissingSignature(&'static str),
    #[error("missing echostr")]
    MissingEchostr,
    #[error("repeated query parameter: {0}")]
    RepeatedParam(&'static str),
    #[error("bad signature")]
    BadSignature,
    #[error("stale timestamp")]
    Stale,
    #[error("unknown encrypt_type")]
    BadEncryptType,
    #[error("plaintext push refused: the account is in secure mode")]
    PlaintextRefused,
    #[error("encrypted push refused: the account is in plaintext mode")]
    EncryptedRefused,
    #[error("missing Encrypt")]
    MissingEncrypt,
    #[error("bad msg_signature")]
    BadMsgSignature,
    #[error("bad XML: {0}")]
    BadXml(#[from] XmlError),
    #[error("AppID mismatch")]
    BadAppId,
    #[error("undecryptable: {0}")]
    Decrypt(DecryptError),
    #[error("spool unavailable: {0}")]
    Spool(SpoolError),
    #[error("spool commit took longer than the reply budget")]
    SpoolTimeout,
    #[error("replayed: this signed query was already used with another body")]
    Replayed,
    #[error("too many request bodies in flight")]
    Busy,
}

impl From<Refused> for Rejection {
    fn from(e: Refused) -> Self {
        match e {
            Refused::MissingSignature(name) => Rejection::MissingSignature(name),
            Refused::MissingEchostr => Rejection::MissingEchostr,
            Refused::RepeatedParam(name) => Rejection::RepeatedParam(name),
            Refused::BadSignature => Rejection::BadSignature,
            Refused::Stale => Rejection::Stale,
            Refused::BadEncryptType => Rejection::BadEncryptType,
            Refused::PlaintextRefused => Rejection::PlaintextRefused,
            Refused::EncryptedRefused => Rejection::EncryptedRefused,
            Refused::MissingEncrypt => Rejection::MissingEncrypt,
            Refused::BadMsgSignature => Rejection::BadMsgSignature,
            Refused::BadXml(e) => Rejection::BadXml(e),
            Refused::Decrypt(e) => e.into(),
        }
    }
}

impl From<DecryptError> for Rejection {
    fn from(e: DecryptError) -> Self {
        match e {
            DecryptError::AppId => Rejection::BadAppId,
            other => Rejection::Decrypt(other),
        }
    }
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::UnknownAccount | Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyRead
            | Rejection::MissingEchostr
            | Rejection::RepeatedParam(_)
            | Rejection::BadEncryptType
            | Rejection::MissingEncrypt
            | Rejection::BadXml(_)
            | Rejection::Decrypt(_) => StatusCode::BAD_REQUEST,
            Rejection::MissingSignature(_)
            | Rejection::BadSignature
            | Rejection::BadMsgSignature => StatusCode::UNAUTHORIZED,
            Rejection::Stale
            | Rejection::PlaintextRefused
            | Rejection::EncryptedRefused
            | Rejection::BadAppId
            | Rejection::Replayed => StatusCode::FORBIDDEN,
            Rejection::Spool(_) | Rejection::SpoolTimeout | Rejection::Busy => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What the client is told: the reason, except that a storage failure's
    /// cause (a path, the disk's state) is for the log only.
    fn client_reason(&self) -> String {
        match self {
            Rejection::Spool(_) => "spool unavailable".to_string(),
            other => other.to_string(),
        }
    }

    /// The label this outcome is counted and logged under.
    pub fn verdict(&self) -> &'static str {
        match self {
            Rejection::UnknownAccount | Rejection::NotFound => "unknown_account",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::TooLarge => "too_large",
            Rejection::BodyRead
            | Rejection::BodyTimeout
            | Rejection::MissingEchostr
            | Rejection::RepeatedParam(_)
            | Rejection::BadEncryptType => "bad_request",
            Rejection::MissingSignature(_) | Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale",
            Rejection::PlaintextRefused | Rejection::EncryptedRefused => "mode_refused",
            Rejection::MissingEncrypt | Rejection::Decrypt(_) => "decrypt_error",
            Rejection::BadMsgSignature => "bad_msg_signature",
            Rejection::BadXml(_) => "bad_xml",
            Rejection::BadAppId => "bad_appid",
            Rejection::Replayed => "replayed",
            Rejection::Spool(_) | Rejection::SpoolTimeout => "spool_unavailable",
            Rejection::Busy => "busy",
        }
    }
}

/// What a request that was not refused gets.
#[derive(Debug)]
enum Answer {
    Echo(String),
    Accepted(Accepted),
}

#[derive(Debug)]
struct Accepted {
    duplicate: bool,
    event_id: Option<i64>,
    /// Stored as an `unrouted` dead letter: no rule matched.
    unrouted: bool,
    msg_type: String,
    event: String,
    /// What the reply target's inline attempt gave WeChat, when there was one.
    reply: Option<&'static str>,
    kind: String,
    key_hash: String,
    key_slot: Option<KeySlot>,
    body: Bytes,
}

/// Serves one request on the public listener. Never fails: every outcome is an
/// HTTP answer, counted and logged once here.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let config = shared.config.load_full();
    let method = req.method().clone();
    // Only configured accounts become label values; anything else is "-".
    let account = account_of(req.uri().path())
        .filter(|id| config.accounts.contains_key(*id))
        .unwrap_or("-")
        .to_string();
    let outcome = answer(&shared, &config, req, started).await;
    let account = account.as_str();
    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let m = &shared.metrics;
    let verdict = match &outcome {
        Ok(Answer::Accepted(a)) if a.duplicate => "duplicate",
        Ok(_) => "ok",
        Err(rejection) => rejection.verdict(),
    };
    if method == Method::POST {
        m.pushes.with_label_values(&[account, verdict]).inc();
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
        Ok(Answer::Accepted(a)) => {
            if !a.duplicate {
                let (msg_type, event) = crate::metrics::event_labels(&a.msg_type, &a.event);
                m.events
                    .with_label_values(&[account, msg_type, event])
                    .inc();
                if a.unrouted {
                    m.dead_letters
                        .with_label_values(&["", REASON_UNROUTED])
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
                kind = %a.kind,
                verdict,
                latency_ms,
                key = %a.key_hash,
                event_id = a.event_id,
                unrouted = a.unrouted,
                reply = a.reply,
                "push answered"
            );
            text(StatusCode::OK, answer_content_type(&a.body), a.body)
        }
        Err(rejection) => {
            let status = rejection.status();
            if status.is_server_error() {
                tracing::error!(account, %method, verdict, latency_ms, reason = %rejection, "push not accepted");
            } else {
                tracing::warn!(account, %method, verdict, latency_ms, reason = %rejection, "request refused");
            }
            text(
                status,
                "text/plain; charset=utf-8",
                format!("{}\n", rejection.client_reason()).into(),
            )
        }
    })
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

/// `/wx/{account}` → the account id.
fn account_of(path: &str) -> Option<&str> {
    path.strip_prefix("/wx/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

async fn answer(
    shared: &Shared,
    config: &Settings,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Answer, Rejection> {
    let account_id = account_of(req.uri().path()).ok_or(Rejection::NotFound)?;
    let account = config
        .accounts
        .get(account_id)
        .ok_or(Rejection::UnknownAccount)?;
    let query = req.uri().query().unwrap_or("");
    let creds = credentials(account);
    let now_secs = shared.clock.now_secs();
    match *req.method() {
        Method::GET => Ok(Answer::Echo(inbound::check_url(&creds, query, now_secs)?)),
        Method::POST => {
            // `signature` covers only the query, so everything the query
            // decides is checked before a byte of the body is read: an
            // unsigned flood costs no memory and holds no connection.
            let signed = inbound::check_push_query(&creds, query, now_secs)?;
            let reserved = reserve_body(shared, &req, config.server.max_body)?;
            // The body must arrive within the reply budget too: WeChat sends it
            // at once, and a client trickling it holds a connection for nothing.
            let read = read_body(req, config.server.max_body);
            let body = tokio::time::timeout(config.server.reply_budget, read)
                .await
                .map_err(|_| Rejection::BodyTimeout)??;
            let verified = inbound::verify_push(&creds, signed, &body)?;
            let accepted = accept_push(shared, config, account, verified, body, started).await;
            drop(reserved);
            accepted.map(Answer::Accepted)
        }
        _ => Err(Rejection::MethodNotAllowed),
    }
}

/// What the account's pushes are verified with.
fn credentials(account: &Account) -> Credentials<'_> {
    Credentials {
        account: &account.id,
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
    shared: &Shared,
    req: &Request<Incoming>,
    max_body: usize,
) -> Result<Reserved, Rejection> {
    let declared = declared_length(req);
    if declared.is_some_and(|len| len > max_body as u64) {
        return Err(Rejection::TooLarge);
    }
    let bytes = declared.map_or(max_body, |len| len as usize);
    let permits = u32::try_from(bytes).map_err(|_| Rejection::TooLarge)?;
    let permit = shared
        .body_budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| Rejection::Busy)?;
    let gauge = shared.metrics.body_bytes_in_flight.clone();
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
    shared: &Shared,
    config: &Settings,
    account: &Account,
    verified: VerifiedPush,
    body: Bytes,
    started: Instant,
) -> Result<Accepted, Rejection> {
    let message = &verified.message;
    let now = shared.clock.now_ms();

    let input = route::route_input(&account.id, message);
    let rule = route::route(&config.routes, &input).map(|(_, rule)| rule);
    let reply_budget = config.server.reply_budget;
    let targets = rule
        .map(|rule| {
            rule.to
                .iter()
                .map(|target| NewDelivery {
                    target: target.clone(),
                    // The reply target is tried inline first; the workers wait
                    // until that attempt is over.
                    due_at: if rule.reply_from.as_ref() == Some(target) {
                        shared.dispatcher.reply_due_at(now, reply_budget)
                    } else {
                        now
                    },
                })
                .collect()
        })
        .unwrap_or_default();

    let dedup_key = format!("{}|{}", account.id, message.dedup_key());
    let kind = match message.event() {
        Some(event) => format!("event/{event}"),
        None => input.msg_type.to_string(),
    };
    let dedup_window = config.spool.dedup_window.as_millis() as i64;
    // Until the query goes stale, a replay of it must still find its guard and
    // its dedup key, even when the timestamp is ahead of the relay's clock.
    let stale_at = stale_at(account, &verified.timestamp).unwrap_or(now + dedup_window);
    let event = NewEvent {
        replay: replay_guard(account, &verified, stale_at),
        event: StoredEvent {
            event_id: 0,
            dedup_key: dedup_key.clone(),
            account: account.id.clone(),
            received_at: now,
            query: verified.query.clone(),
            body: body.to_vec(),
            xml: verified.xml.clone(),
            fields: message.fields_json().to_string(),
            msg_type: input.msg_type.to_string(),
            event: message.event().map(str::to_string),
        },
        targets,
    };
    let window = dedup_window.max(stale_at - now);
    // The reply target needs the event again after the commit; only then is it copied.
    let reply_from = rule.and_then(|r| r.reply_from.as_deref()).and_then(|name| {
        let position = event.targets.iter().position(|t| t.target == name)?;
        // A paused target gets no inline attempt either: its delivery waits.
        let target = config.targets.get(name).filter(|t| !t.paused)?;
        Some((target.clone(), position, event.event.clone()))
    });
    let routed: Vec<String> = event.targets.iter().map(|t| t.target.clone()).collect();
    let commit = shared.spool.enqueue(event, now, window);
    let remaining = reply_budget.saturating_sub(started.elapsed());
    let enqueued = tokio::time::timeout(remaining, commit)
        .await
        .map_err(|_| Rejection::SpoolTimeout)?
        .map_err(Rejection::Spool)?;
    if enqueued == Enqueued::Replayed {
        return Err(Rejection::Replayed);
    }

    let mut accepted = Accepted {
        duplicate: true,
        event_id: None,
        unrouted: routed.is_empty(),
        msg_type: input.msg_type.to_string(),
        event: message.event().unwrap_or("").to_string(),
        reply: None,
        kind,
        key_hash: short_hash(&dedup_key),
        key_slot: verified.key_slot,
        body: Bytes::from_static(b"success"),
    };
    let Enqueued::Stored {
        event_id,
        deliveries,
    } = enqueued
    else {
        return Ok(accepted);
    };
    accepted.duplicate = false;
    accepted.event_id = Some(event_id);
    for target in &routed {
        shared.dispatcher.wake(target);
    }
    if let Some((target, position, mut stored)) = reply_from {
        stored.event_id = event_id;
        let remaining = reply_budget.saturating_sub(started.elapsed());
        let delivery_id = deliveries.get(position).copied().unwrap_or_default();
        // With no time left, an attempt could not even be sent: leave the
        // delivery to the workers rather than count an attempt never made.
        let reply = if remaining < MIN_INLINE_ATTEMPT {
            InlineReply::Failed
        } else {
            reply_inline(shared, &target, delivery_id, &stored, remaining).await
        };
        let (body, outcome) = answer_with(account, &target.name, &verified, reply);
        accepted.body = body;
        accepted.reply = Some(outcome);
    }
    Ok(accepted)
}

/// When the account starts refusing a query with this timestamp as stale,
/// unix milliseconds; `None` when it does not check freshness.
fn stale_at(account: &Account, timestamp: &str) -> Option<i64> {
    let window = account.timestamp_window?;
    let sent: i64 = timestamp.parse().ok()?;
    // Accepted while the clock's whole seconds are within the window.
    let last_second = sent.saturating_add(window.as_secs() as i64);
    Some(last_second.saturating_add(1).saturating_mul(1000))
}

/// `signature` covers (token, timestamp, nonce), never the body, so a
/// captured query can carry any body until it goes stale; the guard refuses
/// it with any body other than the first. In secure mode every accepted push
/// is also under `msg_signature`, which covers the `<Encrypt>` that is all the
/// relay reads of the body: another `<Encrypt>` fails it and the same one is
/// the same message, a duplicate. So secure accounts need no guard and spend
/// no write on one. Compat accounts take unencrypted pushes, and an encrypted
/// push's query without `encrypt_type` and `msg_signature` is a valid
/// unencrypted one, so their encrypted pushes are guarded too. What is
/// compared is the message the relay acts on (the decrypted XML of an
/// encrypted push), so WeChat re-sending a push sealed afresh under the same
/// query stays a duplicate rather than a replay.
fn replay_guard(account: &Account, push: &VerifiedPush, stale_at: i64) -> Option<ReplayGuard> {
    if account.mode == Mode::Secure {
        return None;
    }
    Some(ReplayGuard {
        key: format!(
            "{}|{}|{}|{}",
            push.account, push.timestamp, push.nonce, push.signature
        ),
        body_hash: Sha256::digest(push.xml.as_bytes()).into(),
        expires_at: stale_at,
    })
}

/// The least time worth an inline attempt at the reply target.
const MIN_INLINE_ATTEMPT: Duration = Duration::from_millis(50);

/// What the reply target's inline attempt gave.
enum InlineReply {
    /// Delivered, with an answer WeChat can take.
    Valid(ReplyBody),
    /// Delivered, but the answer is not for WeChat (JSON, HTML, text…).
    Invalid,
    /// Not delivered in time; the workers will retry it.
    Failed,
}

/// One attempt at the rule's reply target within what is left of the budget.
/// Its outcome is recorded like any worker's; a failure leaves the delivery to
/// the workers.
async fn reply_inline(
    shared: &Shared,
    target: &Target,
    delivery_id: i64,
    event: &StoredEvent,
    remaining: Duration,
) -> InlineReply {
    let timeout = remaining.min(target.timeout);
    let result = shared
        .dispatcher
        .attempt_inline(target, delivery_id, event, timeout)
        .await;
    let delivered = result.verdict == Verdict::Delivered;
    if !delivered {
        return InlineReply::Failed;
    }
    match reply::classify_reply(&result.body) {
        Some(body) => InlineReply::Valid(body),
        None => {
            tracing::info!(target = %target.name, "reply target answered something WeChat cannot take; answering success");
            InlineReply::Invalid
        }
    }
}

/// What WeChat gets for the reply target's answer: `success` unless it was
/// valid; valid reply XML as is, except that a secure-mode account's plaintext
/// reply is sealed into the envelope with the key that decrypted the push,
/// and an envelope the target sealed itself passes only if WeChat could open it.
fn answer_with(
    account: &Account,
    target: &str,
    verified: &VerifiedPush,
    reply: InlineReply,
) -> (Bytes, &'static str) {
    let success = Bytes::from_static(b"success");
    let reply = match reply {
        InlineReply::Failed => return (success, "none"),
        InlineReply::Invalid => return (success, "ignored"),
        InlineReply::Valid(reply) => reply,
    };
    // Sealed as WeChat expects: with the key that decrypted the push.
    let seal = |keys: &KeyRing, slot: KeySlot, xml: &str| {
        let sealed = reply::envelope(
            keys.key(slot),
            account.token.expose(),
            &account.app_id,
            xml,
            &verified.timestamp,
            &verified.nonce,
            &reply::random_bytes(),
        );
        (Bytes::from(sealed), "encrypted")
    };
    match reply {
        ReplyBody::Ack => (success, "passed"),
        ReplyBody::Envelope(xml) => {
            let keys = account.keys.as_ref();
            let token = account.token.expose();
            match reply::open_envelope(keys, token, &account.app_id, xml.as_bytes()) {
                // A target still sealing with the other key of a rotation: its
                // reply is re-sealed with the key WeChat used for this push.
                Ok((plain, opened_with)) => match (keys, verified.key_slot) {
                    (Some(keys), Some(slot)) if slot != opened_with => seal(keys, slot, &plain),
                    (_, Some(_)) => (Bytes::from(xml), "passed"),
                    // An unencrypted push: WeChat expects its reply in plaintext.
                    (_, None) => (Bytes::from(plain), "passed"),
                },
                Err(e) => {
                    tracing::warn!(account = %account.id, target, reason = %e, "reply target's envelope would not open for WeChat; answering success");
                    (success, "unverifiable")
                }
            }
        }
        ReplyBody::PlainXml(xml) => match (account.mode, &account.keys, verified.key_slot) {
            (Mode::Secure, Some(keys), Some(slot)) => seal(keys, slot, &xml),
            _ => (Bytes::from(xml), "passed"),
        },
    }
}

/// A short, non-reversible stand-in for an identifier that carries an OpenID,
/// so logs can correlate without holding personal data.
pub fn short_hash(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..6])
}
