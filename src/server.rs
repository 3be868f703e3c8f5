//! The accept loop shared by the public and admin listeners: HTTP/1.1 with
//! keep-alive and a header-read timeout, over a listener the caller binds (so
//! tests can use port 0), with a bounded graceful drain.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Limits {
    pub header_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub drain: Duration,
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and waits
/// up to `limits.drain` for open requests to finish.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly
                        // rather than spin; the listener itself is still fine.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let conn = http.serve_connection(TokioIo::new(stream), service_fn(handler));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stopping(&mut shutdown) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_secs = limits.drain.as_secs_f64(),
            "requests still open at the drain deadline"
        );
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
