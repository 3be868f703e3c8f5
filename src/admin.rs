//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and `/admin/*`
//! behind the admin token when one is configured.

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::spool::Health;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What the admin routes read: the configuration (for the token and the
/// targets' names), the spool and the clock (for the gauges and readiness),
/// the metrics and the reloader.
pub struct Admin {
    pub config: Arc<ArcSwap<Settings>>,
    pub spool: Arc<dyn Health>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub reloader: Arc<Reloader>,
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
            let config = admin.config.load();
            let targets: Vec<String> = config.targets.keys().cloned().collect();
            let text = admin
                .metrics
                .render(&*admin.spool, &targets, admin.clock.now_ms())
                .await;
            let mut response = plain(StatusCode::OK, text);
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => match admin.spool.probe().await {
            Ok(()) => plain(StatusCode::OK, "ready\n".into()),
            Err(e) => {
                let e = crate::error_chain(&e);
                tracing::warn!(error = %e, "not ready: the spool does not accept writes");
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("spool not writable: {e}\n"),
                )
            }
        },
        (_, p) if p.starts_with("/admin/") && !authorized(&admin, &req) => {
            tracing::warn!(path = p, "admin request without a valid token");
            plain(StatusCode::UNAUTHORIZED, "admin token required\n".into())
        }
        (&Method::POST, "/admin/reload") => match admin.reloader.reload().await {
            Ok(()) => plain(StatusCode::OK, "reloaded\n".into()),
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

/// `Authorization: Bearer <admin_token>`, compared in constant time; open when
/// no token is configured (validation allows that only on loopback or when
/// explicitly allowed). The scheme is case-insensitive (RFC 7235 §2.1).
fn authorized(admin: &Admin, req: &Request<Incoming>) -> bool {
    let config = admin.config.load();
    let Some(token) = &config.server.admin_token else {
        return true;
    };
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, given)| {
            bool::from(given.trim().as_bytes().ct_eq(token.expose().as_bytes()))
        })
}
