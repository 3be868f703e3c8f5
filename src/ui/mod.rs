//! The pages at `/ui` on the admin listener: server-rendered HTML and one
//! stylesheet, both from the binary, no script. Every answer carries
//! `Content-Security-Policy: default-src 'self'`, so a page can load nothing
//! from another host, and everything shown is escaped by the templates (a
//! target's response body is whatever the target sent).
//!
//! Who owns what:
//!
//! - this file: the routes, who may use them, and the one place a refused
//!   request becomes an answer, a metric and a log line;
//! - `session`: the session cookie, its CSRF token and signing out;
//! - `limit`: failed tries of the admin token per client, here and on
//!   `/admin/*`;
//! - `pages`: the templates: the layout, signing in, the overview, the
//!   search and an event's timeline.
//!
//! Signing in takes the admin token and sets the session cookie; without an
//! admin token there is no form, and a session is handed out with the first
//! page (its CSRF token still guards every change). Every `POST` carries the
//! session's CSRF token, except signing in: its only effect is a session for
//! whoever knows the admin token, which a forged form cannot supply.

mod actions;
mod limit;
mod pages;
pub mod session;

use crate::clock::Clock;
use crate::config::Settings;
use crate::deliver::Dispatcher;
use crate::metrics::Metrics;
use crate::spool::{Health, Operator, SpoolError, TrailLog};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use limit::SignInLimit;
use maud::Markup;
use session::{Session, SessionKey, SignedOut};
use std::sync::Arc;

/// Where the pages live on the admin listener.
pub const ROOT: &str = "/ui";

/// The policy every answer carries: nothing from another host, no frames.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// A form is a few fields: more is not one of ours.
const MAX_FORM: usize = 16 * 1024;

/// What the pages read and act on.
pub struct Ui {
    pub config: Arc<ArcSwap<Settings>>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// Depth per target, for the overview.
    pub health: Arc<dyn Health>,
    /// Dead letters and replaying them.
    pub operator: Arc<dyn Operator>,
    /// The targets' circuits, and waking a target's workers after a change.
    pub dispatcher: Arc<Dispatcher>,
    /// Searching the trail and redelivering a kept event.
    pub trail: Arc<dyn TrailLog>,
    /// MACs the sessions while no admin token is configured.
    open_key: SessionKey,
    /// Failed tries of the admin token per client.
    sign_ins: SignInLimit,
    /// The sessions signed out on this process.
    signed_out: SignedOut,
}

impl Ui {
    pub fn new(
        config: Arc<ArcSwap<Settings>>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        spool: (Arc<dyn Health>, Arc<dyn Operator>, Arc<dyn TrailLog>),
        dispatcher: Arc<Dispatcher>,
    ) -> Self {
        Ui {
            config,
            clock,
            metrics,
            health: spool.0,
            operator: spool.1,
            trail: spool.2,
            dispatcher,
            open_key: SessionKey::random(),
            sign_ins: SignInLimit::default(),
            signed_out: SignedOut::default(),
        }
    }
}

/// Why a request to the pages was refused: each is a metric label, a log
/// line and a 4xx with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A change without a session (or with an expired one).
    SignedOut,
    /// A change whose CSRF token is missing or not its session's.
    Csrf,
    /// Signing in with a wrong admin token.
    BadToken,
    /// A form that is not one of the pages' own.
    BadForm,
    /// A search the trail cannot read (an unknown outcome, a bad time).
    BadQuery,
    NotFound,
    MethodNotAllowed,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::SignedOut => "signed_out",
            Refusal::Csrf => "csrf",
            Refusal::BadToken => "bad_token",
            Refusal::BadForm => "bad_form",
            Refusal::BadQuery => "bad_query",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Refusal::SignedOut | Refusal::BadToken => StatusCode::UNAUTHORIZED,
            Refusal::Csrf => StatusCode::FORBIDDEN,
            Refusal::BadForm | Refusal::BadQuery => StatusCode::BAD_REQUEST,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::SignedOut => "not signed in, or the session has expired: sign in again",
            Refusal::Csrf => "the form's CSRF token is missing or not this session's: reload the page and try again",
            Refusal::BadToken => "wrong admin token",
            Refusal::BadForm => "malformed form",
            Refusal::BadQuery => "the search cannot be read",
            Refusal::NotFound => "no such page",
            Refusal::MethodNotAllowed => "method not allowed",
        }
    }
}

/// Why a page could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PageError {
    #[error("refused: {}", .0.reason())]
    Refused(Refusal),
    #[error("spool unavailable: {}", crate::error_chain(.0))]
    Spool(#[from] SpoolError),
}

impl From<Refusal> for PageError {
    fn from(r: Refusal) -> Self {
        PageError::Refused(r)
    }
}

/// One request to the pages, as the routes see it.
pub(crate) struct Visit {
    pub method: Method,
    pub path: String,
    /// The query string's pairs, decoded.
    pub query: Vec<(String, String)>,
    /// The form of a `POST`, decoded.
    pub form: Vec<(String, String)>,
    pub session: Option<Session>,
    pub key: SessionKey,
    /// Whether signing in takes the admin token (one is configured).
    pub guarded: bool,
    /// The client's address, when known.
    pub peer: Option<std::net::IpAddr>,
}

impl Visit {
    /// A form field's value.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The signed-in session, the CSRF token checked for a change.
    fn signed_in(&self) -> Result<&Session, Refusal> {
        let session = self.session.as_ref().ok_or(Refusal::SignedOut)?;
        if self.method == Method::POST
            && !session.csrf_holds(&self.key, self.field("csrf").unwrap_or(""))
        {
            return Err(Refusal::Csrf);
        }
        Ok(session)
    }
}

/// What a route answers.
pub(crate) enum Outcome {
    Page(StatusCode, Markup),
    /// See other: after a change, the page to show.
    Redirect(String),
    /// The stylesheet every page links.
    Style,
    /// The answer also sets or clears the session cookie.
    WithCookie(String, Box<Outcome>),
}

/// Serves one request under `/ui`. Never fails: every outcome is an answer.
pub async fn serve(ui: &Ui, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/ui/style.css" {
        return respond(Outcome::Style);
    }
    let secure = ui.config.load().server.ui_secure_cookie;
    let mut visit = match visit(ui, req).await {
        Ok(v) => v,
        Err(refusal) => return respond(refuse(ui, refusal, "-", None)),
    };
    let mut fresh = None;
    if visit.session.is_none() && !visit.guarded {
        // No token to ask for: the first page opens a session.
        let session = Session::issue(ui.clock.now_ms());
        fresh = Some(session.set_cookie(&visit.key, secure));
        visit.session = Some(session);
    }
    let outcome = match route(ui, &visit).await {
        Ok(outcome) => outcome,
        Err(PageError::Refused(r)) => refuse(ui, r, &visit.path, visit.session.as_ref()),
        Err(PageError::Spool(SpoolError::Refused(reason))) => {
            // Asked of the spool and declined (an event whose body was not kept).
            tracing::warn!(path = %visit.path, %reason, "page action declined");
            Outcome::Page(StatusCode::CONFLICT, pages::failure(&reason))
        }
        Err(e @ PageError::Spool(_)) => {
            tracing::warn!(path = %visit.path, error = %e, "page not served");
            let body = pages::failure(&e.to_string());
            Outcome::Page(StatusCode::SERVICE_UNAVAILABLE, body)
        }
    };
    respond(match fresh {
        Some(cookie) => Outcome::WithCookie(cookie, Box::new(outcome)),
        None => outcome,
    })
}

/// The request read: its form (bounded), its session.
async fn visit(ui: &Ui, req: Request<Incoming>) -> Result<Visit, Refusal> {
    let config = ui.config.load();
    let (key, guarded) = match &config.server.admin_token {
        Some(token) => (SessionKey::from_token(token.expose()), true),
        None => (ui.open_key.clone(), false),
    };
    let cookies = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    let session = Session::from_cookies(&key, &cookies, ui.clock.now_ms())
        .filter(|s| !ui.signed_out.ended(s));
    let peer = req
        .extensions()
        .get::<crate::server::Peer>()
        .map(|p| p.0.ip());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let form = match method {
        Method::POST => {
            let body = Limited::new(req.into_body(), MAX_FORM)
                .collect()
                .await
                .map_err(|_| Refusal::BadForm)?
                .to_bytes();
            url::form_urlencoded::parse(&body).into_owned().collect()
        }
        _ => Vec::new(),
    };
    Ok(Visit {
        method,
        path,
        query,
        form,
        session,
        key,
        guarded,
        peer,
    })
}

/// The route a visit asks for.
async fn route(ui: &Ui, visit: &Visit) -> Result<Outcome, PageError> {
    let path = visit.path.trim_end_matches('/');
    match (&visit.method, path) {
        (&Method::GET, "/ui/signin") => Ok(actions::signin_form(visit)),
        (&Method::POST, "/ui/signin") => actions::sign_in(ui, visit).await,
        _ if visit.session.is_none() && visit.method == Method::GET => {
            Ok(Outcome::Redirect("/ui/signin".into()))
        }
        (&Method::GET, "/ui") => {
            let csrf = visit.signed_in()?.csrf(&visit.key);
            let page = pages::overview::page(ui, chrome(visit, &csrf)).await?;
            Ok(Outcome::Page(StatusCode::OK, page))
        }
        (&Method::GET | &Method::POST, "/ui/search") => {
            let csrf = visit.signed_in()?.csrf(&visit.key);
            let chrome = chrome(visit, &csrf);
            let asked = match visit.method {
                Method::POST => &visit.form,
                _ => &visit.query,
            };
            let (status, page) = pages::search::show(ui, asked, chrome).await?;
            Ok(Outcome::Page(status, page))
        }
        (&Method::GET, p) if p.starts_with(EVENT) => {
            let csrf = visit.signed_in()?.csrf(&visit.key);
            let id = &p[EVENT.len()..];
            let page = pages::event::show(ui, id, chrome(visit, &csrf)).await?;
            Ok(Outcome::Page(StatusCode::OK, page))
        }
        (&Method::POST, "/ui/redeliver") => {
            visit.signed_in()?;
            actions::redeliver(ui, visit).await
        }
        (&Method::POST, "/ui/signout") => {
            let session = visit.signed_in()?;
            ui.signed_out.sign_out(session, ui.clock.now_ms());
            let secure = ui.config.load().server.ui_secure_cookie;
            let target = Outcome::Redirect("/ui/signin".into());
            Ok(Outcome::WithCookie(
                Session::clear_cookie(secure),
                Box::new(target),
            ))
        }
        (&Method::POST, "/ui/replay") => {
            visit.signed_in()?;
            actions::replay(ui, visit).await
        }
        (
            _,
            "/ui" | "/ui/signin" | "/ui/signout" | "/ui/replay" | "/ui/redeliver" | "/ui/search",
        ) => Err(Refusal::MethodNotAllowed.into()),
        _ => Err(Refusal::NotFound.into()),
    }
}

/// An event's page, by its spool id.
const EVENT: &str = "/ui/event/";

fn chrome<'a>(visit: &Visit, csrf: &'a str) -> pages::Chrome<'a> {
    pages::Chrome {
        csrf: Some(csrf),
        guarded: visit.guarded,
    }
}

impl Ui {
    /// Whether `given` is the admin `token`, compared in constant time once
    /// the wait the client's failed tries ask for is over (see [`limit`]); a
    /// wrong one is counted against the client. Without a known address
    /// (never on a TCP listener) all share one count.
    pub(crate) async fn token_holds(
        &self,
        peer: Option<std::net::IpAddr>,
        given: &str,
        token: &str,
    ) -> bool {
        let peer = peer.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let wait = self.sign_ins.wait(peer, self.clock.now_ms());
        if wait > 0 {
            tracing::info!(
                wait_ms = wait,
                "a try of the admin token waits after failed tries from its client"
            );
            let wait = std::time::Duration::from_millis(wait.unsigned_abs());
            tokio::time::sleep(wait).await;
        }
        let holds = session::same(given, token);
        if !holds {
            self.sign_ins.failed(peer, self.clock.now_ms());
        }
        holds
    }

    /// The one place a refused request is counted and logged.
    pub(crate) fn count_refusal(&self, refusal: Refusal, path: &str) {
        let reason = refusal.label();
        self.metrics.ui_refusals.with_label_values(&[reason]).inc();
        tracing::warn!(path, reason, "page request refused");
    }
}

/// A refused request's answer, counted and logged.
fn refuse(ui: &Ui, refusal: Refusal, path: &str, session: Option<&Session>) -> Outcome {
    ui.count_refusal(refusal, path);
    let page = match refusal {
        // The form again, to try once more.
        Refusal::BadToken => pages::signin(Some(refusal.reason())),
        _ => pages::refused(refusal.reason(), session.is_some()),
    };
    Outcome::Page(refusal.status(), page)
}

/// The answer, with the headers every page carries.
fn respond(outcome: Outcome) -> Response<Full<Bytes>> {
    let mut response = match outcome {
        Outcome::Page(status, markup) => {
            let mut r = Response::new(Full::new(Bytes::from(markup.into_string())));
            *r.status_mut() = status;
            r.with_type("text/html; charset=utf-8")
        }
        Outcome::Style => Response::new(Full::new(Bytes::from_static(pages::STYLE.as_bytes())))
            .with_type("text/css; charset=utf-8"),
        Outcome::Redirect(to) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SEE_OTHER;
            if let Ok(to) = HeaderValue::from_str(&to) {
                r.headers_mut().insert(LOCATION, to);
            }
            r
        }
        Outcome::WithCookie(cookie, inner) => {
            let mut r = respond(*inner);
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                r.headers_mut().append(SET_COOKIE, cookie);
            }
            return r;
        }
    };
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

trait WithType {
    fn with_type(self, content_type: &'static str) -> Self;
}

impl WithType for Response<Full<Bytes>> {
    fn with_type(mut self, content_type: &'static str) -> Self {
        self.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        self
    }
}
