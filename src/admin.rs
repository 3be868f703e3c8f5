//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/admin/*`
//! (`POST /admin/reload`, `GET /admin/ticket/{account}`, `GET /admin/trail`)
//! behind the admin token when one is configured, and the pages at `/ui`
//! (see [`crate::ui`]), which sign in with the same token.
//!
//! `/admin/*` and `/ui` answer only a request whose `Host` names this
//! listener: its own address, `localhost`, or a name in
//! `server.admin_hosts`. A page of another site that rebinds its own name
//! to this address (DNS rebinding) sends that name, and is refused with
//! 421. `/metrics`, `/healthz` and `/readyz` answer under any name, for
//! probes and scrapers that reach the relay by a service name.

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::spool::{EventId, Health, SpoolError, Tickets, TrailLog, UnixMs};
use crate::trail::parse_filter;
use crate::ui::Ui;
use crate::wechat::family::Family;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// What the admin routes read: the configuration (for the token and the
/// targets' names), the spool and the clock (for the gauges and readiness),
/// the metrics and the reloader.
pub struct Admin {
    pub config: Arc<ArcSwap<Settings>>,
    pub spool: Arc<dyn Health>,
    /// The Open Platforms' tickets, for their gauge and `/admin/ticket`.
    pub tickets: Arc<dyn Tickets>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub reloader: Arc<Reloader>,
    /// The event trail, for `/admin/trail`.
    pub trail: Arc<dyn TrailLog>,
    /// The pages, which check their own session.
    pub ui: Arc<Ui>,
    /// The address the admin listener is bound to: a `Host` it answers to.
    pub listening: SocketAddr,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, and `/admin/*`
/// behind the admin token when one is configured.
pub async fn serve(
    admin: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    let path = req.uri().path().to_string();
    Ok(match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let mut response = plain(StatusCode::OK, exposition(&admin).await);
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => ready(&admin, plain).await,
        (_, p) if guarded(p) && !host_allowed(&admin, &req) => misdirected(&admin, &req, plain),
        (&Method::POST, p) if guarded(p) && cross_site(&req) => {
            let reason = "a POST from a page of another site (Origin or Sec-Fetch-Site) is refused";
            refused(
                &admin,
                ("origin", p),
                (StatusCode::FORBIDDEN, reason),
                plain,
            )
        }
        (_, p) if p == crate::ui::ROOT || p.starts_with("/ui/") => {
            crate::ui::serve(&admin.ui, req).await
        }
        (_, p) if p.starts_with("/admin/") && !authorized(&admin, &req).await => {
            let reason = "admin token required";
            refused(
                &admin,
                ("token", p),
                (StatusCode::UNAUTHORIZED, reason),
                plain,
            )
        }
        (&Method::GET, p) if p.starts_with(TICKET) || p == TICKETS => {
            json_or_reason(ticket(&admin, p).await, plain)
        }
        (&Method::GET, p) if p.starts_with(TRAIL_ONE) || p == TRAIL => {
            let now = UnixMs(admin.clock.now_ms());
            let scan = admin.config.load().trail.search_rows;
            let answer = trail(&*admin.trail, p, req.uri().query(), (now, scan)).await;
            trail_answer(answer, plain)
        }
        (&Method::POST, "/admin/reload") => match admin.reloader.reload().await {
            Ok(later) => {
                let later: String = later
                    .iter()
                    .map(|what| format!("{what} take effect at the next start only\n"))
                    .collect();
                plain(StatusCode::OK, format!("reloaded\n{later}"))
            }
            Err(e) => plain(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload refused; still running the previous configuration\n{e}\n"),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz" | "/admin/reload") => plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ),
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

/// `/readyz`: 200 while the spool accepts writes, else 503 with why.
async fn ready(
    admin: &Admin,
    plain: impl Fn(StatusCode, String) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    match admin.spool.probe().await {
        Ok(()) => plain(StatusCode::OK, "ready\n".into()),
        Err(e) => {
            let e = crate::error_chain(&e);
            tracing::warn!(error = %e, "not ready: the spool does not accept writes");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("spool not writable: {e}\n"),
            )
        }
    }
}

/// A refused admin request: its status and reason, counted under `label`
/// and logged with its path.
fn refused(
    admin: &Admin,
    (label, path): (&str, &str),
    (status, reason): (StatusCode, &str),
    plain: impl Fn(StatusCode, String) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    admin
        .metrics
        .admin_refusals
        .with_label_values(&[label])
        .inc();
    tracing::warn!(path, reason, "admin request refused");
    plain(status, format!("{reason}\n"))
}

/// The refusal of a request naming another host: 421, counted and logged.
fn misdirected(
    admin: &Admin,
    req: &Request<Incoming>,
    plain: impl Fn(StatusCode, String) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    admin
        .metrics
        .admin_refusals
        .with_label_values(&["host"])
        .inc();
    let host: String = request_host(req).unwrap_or("").chars().take(100).collect();
    let path = req.uri().path();
    tracing::warn!(path, host = ?host, "admin request naming another host refused");
    plain(
        StatusCode::MISDIRECTED_REQUEST,
        "the Host header does not name this admin listener: use its address or localhost, \
         or list the name in server.admin_hosts\n"
            .into(),
    )
}

/// The trail's JSON, with the note when the search was cut short as a
/// header; or the status and reason why there is none.
fn trail_answer(
    answer: Result<(String, Option<String>), (StatusCode, String)>,
    plain: impl Fn(StatusCode, String) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let (answer, cut_short) = match answer {
        Ok((json, note)) => (Ok(json), note),
        Err(e) => (Err(e), None),
    };
    let mut response = json_or_reason(answer, plain);
    if let Some(note) = cut_short.and_then(|n| http::HeaderValue::try_from(n).ok()) {
        response.headers_mut().insert(CUT_SHORT, note);
    }
    response
}

/// The paths only a request naming this listener gets: what reads the trail
/// or changes anything.
fn guarded(path: &str) -> bool {
    path == crate::ui::ROOT || path.starts_with("/ui/") || path.starts_with("/admin/")
}

/// The host a request names: its URI's authority (absolute form), else its
/// `Host` header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req.headers().get(http::header::HOST)?.to_str().ok(),
    }
}

/// Whether a request was sent by a page of another site: its
/// `Sec-Fetch-Site` says `cross-site`, or its `Origin` names another host
/// than the request. Without either header (curl, scripts) it is not, nor
/// with `Origin: null` alone (a browser sends that for its own pages'
/// forms under `Referrer-Policy: no-referrer`, with `Sec-Fetch-Site`).
fn cross_site(req: &Request<Incoming>) -> bool {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site")) {
        return true;
    }
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("");
    if origin == "null" {
        return false;
    }
    let host = origin.split_once("://").map(|(_, host)| host);
    match (host, request_host(req)) {
        (Some(origin), Some(asked)) => !origin.eq_ignore_ascii_case(asked),
        _ => true,
    }
}

/// Whether the request names this listener: its IP address (any IP address
/// when it listens on all of them), `localhost`, or a configured name. An
/// IP address cannot be rebound; a name can, so names must be listed.
fn host_allowed(admin: &Admin, req: &Request<Incoming>) -> bool {
    let Some(host) = request_host(req) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || admin.config.load().server.admin_hosts.contains(&name) {
        return true;
    }
    let own = admin.listening.ip();
    name.parse::<IpAddr>()
        .is_ok_and(|ip| ip == own || own.is_unspecified())
}

/// A JSON answer, or the status and reason why there is none.
fn json_or_reason(
    answer: Result<String, (StatusCode, String)>,
    plain: impl Fn(StatusCode, String) -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    match answer {
        Ok(json) => {
            let mut response = plain(StatusCode::OK, json);
            let json = http::HeaderValue::from_static("application/json");
            response.headers_mut().insert(CONTENT_TYPE, json);
            response
        }
        Err((status, reason)) => plain(status, reason),
    }
}

/// The header a search's answer carries when it stopped at its cap of rows
/// read, saying so: older events may match.
pub const CUT_SHORT: &str = "wxrelay-search-cut-short";

/// The trail's search, and one event's trail below it, by its event id.
const TRAIL: &str = "/admin/trail";
const TRAIL_ONE: &str = "/admin/trail/";

/// `GET /admin/trail?openid=…&msg_id=…&scene=…&target=…&outcome=…&since=…&until=…&limit=…`:
/// a JSON array of the matching events, newest first, each with its
/// `attempts` and `ends`. `GET /admin/trail/{event_id}`: that event's, as
/// one object (404 when the trail has none). With the JSON, the note when
/// the search stopped at its cap of rows read (see [`CUT_SHORT`]).
async fn trail(
    log: &dyn TrailLog,
    path: &str,
    query: Option<&str>,
    (now, scan): (UnixMs, usize),
) -> Result<(String, Option<String>), (StatusCode, String)> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, format!("{e}\n"));
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let mut filter =
        parse_filter(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), now).map_err(bad)?;
    filter.scan = scan;
    let one = path.strip_prefix(TRAIL_ONE);
    if let Some(id) = one {
        let id = id
            .parse()
            .map_err(|_| bad(format!("not an event id: {id:?}")))?;
        filter.event_id = Some(EventId(id));
        filter.limit = 1;
    }
    let found = log.find(filter.clone()).await.map_err(|e| match e {
        SpoolError::Refused(why) => (StatusCode::NOT_FOUND, format!("{why}\n")),
        // Too many searches at once, or one too long: said as is.
        SpoolError::Limited(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        e => {
            let e = crate::error_chain(&e);
            tracing::warn!(error = %e, "cannot search the trail");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("spool unavailable: {e}\n"),
            )
        }
    })?;
    let note = found.cut_short_note(&filter);
    let json = match one {
        None => serde_json::to_string(&found.events),
        Some(_) => match found.events.first() {
            Some(event) => serde_json::to_string(event),
            None => return Err((StatusCode::NOT_FOUND, "no such event in the trail\n".into())),
        },
    };
    json.map(|json| (json, note))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
}

/// The configured Open Platform accounts.
fn platforms(config: &Settings) -> Vec<String> {
    config
        .accounts
        .values()
        .filter(|a| a.kind == Family::OpenPlatform)
        .map(|a| a.id.clone())
        .collect()
}

/// The metrics, with the spool's gauges and the Open Platforms' tickets
/// read now, and the late-reply failures of the configuration as it is now.
async fn exposition(admin: &Admin) -> String {
    let config = admin.config.load();
    let targets: Vec<String> = config.targets.keys().cloned().collect();
    let now = admin.clock.now_ms();
    let platforms = platforms(&config);
    if !platforms.is_empty() {
        let tickets = &*admin.tickets;
        admin.metrics.read_tickets(tickets, &platforms, now).await;
    }
    crate::late::Late::show_failures(&admin.metrics, &config);
    admin.metrics.render(&*admin.spool, &targets, now).await
}

/// Every Open Platform's latest ticket; one's below it, at its account.
const TICKETS: &str = "/admin/ticket";
const TICKET: &str = "/admin/ticket/";

/// `GET /admin/ticket/{account}`: an Open Platform's latest ticket,
/// `{"ticket", "received_at"}`, or the status and reason why there is none.
/// `GET /admin/ticket`: every Open Platform's, by account (`null` for one
/// that has none yet).
async fn ticket(admin: &Admin, path: &str) -> Result<String, (StatusCode, String)> {
    let platforms = platforms(&admin.config.load());
    let account = path.strip_prefix(TICKET);
    if account.is_some_and(|a| !platforms.iter().any(|p| p == a)) {
        let reason = "no such Open Platform account (kind = \"open_platform\")\n";
        return Err((StatusCode::NOT_FOUND, reason.into()));
    }
    let kept = admin.tickets.tickets().await.map_err(|e| {
        let e = crate::error_chain(&e);
        tracing::warn!(error = %e, "cannot read the tickets");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("spool unavailable: {e}\n"),
        )
    })?;
    let json = |account: &str| {
        kept.iter().find(|t| t.account == account).map(|t| {
            let received_at = humantime::format_rfc3339_millis(t.received_at.to_system_time());
            serde_json::json!({"ticket": t.ticket, "received_at": received_at.to_string()})
        })
    };
    match account {
        Some(account) => json(account)
            .map(|ticket| ticket.to_string())
            .ok_or((StatusCode::NOT_FOUND, "no ticket received yet\n".to_owned())),
        None => {
            let all: serde_json::Map<String, serde_json::Value> = platforms
                .iter()
                .map(|p| (p.clone(), json(p).into()))
                .collect();
            Ok(serde_json::Value::Object(all).to_string())
        }
    }
}

/// `Authorization: Bearer <admin_token>`, compared in constant time after
/// the wait the client's failed tries ask for, the same as signing in to the
/// pages (a wrong token counts for both); open when no token is configured
/// (validation allows that only on loopback or when explicitly allowed). The
/// scheme is case-insensitive (RFC 7235 §2.1).
async fn authorized(admin: &Admin, req: &Request<Incoming>) -> bool {
    let config = admin.config.load();
    let Some(token) = &config.server.admin_token else {
        return true;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
    let Some((_, given)) = given else {
        return false;
    };
    let peer = req
        .extensions()
        .get::<crate::server::Peer>()
        .map(|p| p.0.ip());
    admin
        .ui
        .token_holds(peer, given.trim(), token.expose())
        .await
}
