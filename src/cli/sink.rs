//! `wxrelay sink`: a local target that prints every delivery it receives and
//! answers `success`, for trying routes and formats without a broker. It
//! prints what it is sent, message content included: it is the operator's own
//! terminal, on their own machine.

use crate::server::{self, Limits};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How much of a body is printed.
const SHOWN: usize = 4096;

/// Serves `listener` until `stop` turns true, passing a description of each
/// request to `show`.
pub async fn serve(
    listener: TcpListener,
    show: Arc<dyn Fn(String) + Send + Sync>,
    stop: watch::Receiver<bool>,
) {
    let handler = move |req: Request<Incoming>| {
        let show = show.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            show(describe(&parts, &body));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"success"))))
        }
    };
    let limits = Limits {
        header_timeout: Duration::from_secs(10),
        drain: Duration::from_secs(1),
        max_connections: 256,
        counters: None,
    };
    server::serve(listener, handler, limits, stop).await;
}

/// One request as printed: the request line, the headers that say what it
/// is, and the body.
pub fn describe(parts: &http::request::Parts, body: &[u8]) -> String {
    let mut out = format!("{} {}\n", parts.method, parts.uri);
    for name in [
        "content-type",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ] {
        if let Some(value) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            out += &format!("  {name}: {value}\n");
        }
    }
    let text = String::from_utf8_lossy(body);
    let shown: String = text.chars().take(SHOWN).collect();
    out += &format!("  ({} bytes)\n{shown}", body.len());
    if text.chars().count() > SHOWN {
        out += "…";
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_request_line_the_signature_headers_and_the_body() {
        let req = Request::post("/events?x=1")
            .header("content-type", "application/json")
            .header("webhook-id", "evt-1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let text = describe(&parts, b"{\"a\":1}");
        assert!(text.starts_with("POST /events?x=1\n"), "{text}");
        assert!(text.contains("content-type: application/json"));
        assert!(text.contains("webhook-id: evt-1"));
        assert!(text.contains("(7 bytes)\n{\"a\":1}"));
    }
}
