//! The accept loop shared by the public and admin listeners: HTTP/1.1 with
//! keep-alive and a header-read timeout, over a listener the caller binds (so
//! tests can use port 0), with a bounded graceful drain.
//!
//! Connections are capped, so a flood cannot exhaust file descriptors (accept
//! failing with EMFILE would stall real pushes too) or memory. At the cap, the
//! connection idle the longest (open, but with no request in progress) is
//! closed to make room, and the new one waits for the slot it frees: idle
//! connections cannot starve real pushes. Only when every connection has a
//! request in progress, or as many new ones as the cap already wait, does a
//! new one get a canned `503` and a close.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub struct Limits {
    pub header_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub drain: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Where connection events are counted; `None` counts nothing.
    pub counters: Option<Counters>,
}

/// The connection metrics of a listener (see [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct Counters {
    pub open: IntGauge,
    pub refused: IntCounter,
    pub idle_closed: IntCounter,
    /// Requests hyper refused itself (malformed, too large) and connections
    /// that ended in an error, by kind.
    pub http_errors: IntCounterVec,
}

/// Room for a request head: a URI up to hyper's own 64 KiB limit (a longer
/// one gets 414) and headers. hyper's default lets every connection buffer
/// 400 KiB of headers, which across thousands of connections is the memory
/// a flood is after.
const MAX_HEAD_BUFFER: usize = 80 * 1024;

/// How long a new connection at the cap waits for a slot to come free.
const ADMISSION_WAIT: Duration = Duration::from_secs(1);

/// File descriptors kept for everything but public connections: the spool,
/// the admin listener, outbound connections to targets, logs.
const RESERVED_FDS: u64 = 256;

/// The default cap on connections: half of the descriptors the open-file
/// limit leaves (the other half absorbs connections being refused or
/// waiting for a displaced one to close), at most 4096, at least 16.
pub fn default_max_connections() -> usize {
    let limit = open_files_limit().unwrap_or(1024);
    let spare = limit.saturating_sub(RESERVED_FDS) / 2;
    spare.clamp(16, 4096) as usize
}

/// The soft RLIMIT_NOFILE of this process, from `/proc/self/limits`; `None`
/// where that does not exist, or when it is unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether `max_connections` public connections fit in the open-file limit.
pub fn fits_open_files(max_connections: usize) -> bool {
    open_files_limit().is_none_or(|limit| max_connections as u64 + RESERVED_FDS <= limit)
}

/// Open connections: whether each has a request in progress, and since when
/// it has been idle.
#[derive(Default)]
struct Registry {
    next_id: u64,
    connections: HashMap<u64, Tracked>,
    /// New connections waiting for a slot that a closing one will free.
    waiting: usize,
}

struct Tracked {
    in_flight: usize,
    idle_since: Instant,
    close: Arc<Notify>,
    closing: bool,
}

type Connections = Arc<Mutex<Registry>>;

fn lock(connections: &Connections) -> std::sync::MutexGuard<'_, Registry> {
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a new connection at the cap can get a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Room {
    /// The connection idle the longest was asked to close for it.
    Displaced,
    /// Connections asked to close earlier will free slots; it waits its turn.
    Pending,
    /// Every connection has a request in progress, or too many wait already.
    Full,
}

/// Finds a slot for a new connection at the cap; unless [`Room::Full`], the
/// caller is counted as waiting until it calls [`done_waiting`]. At most
/// `max_waiting` wait at once, each holding a descriptor.
fn make_room(connections: &Connections, max_waiting: usize) -> Room {
    let mut registry = lock(connections);
    let registry = &mut *registry;
    if registry.waiting >= max_waiting {
        return Room::Full;
    }
    let closing = registry.connections.values().any(|c| c.closing);
    let idlest = registry
        .connections
        .values_mut()
        .filter(|c| c.in_flight == 0 && !c.closing)
        .min_by_key(|c| c.idle_since);
    let room = match idlest {
        Some(connection) => {
            connection.closing = true;
            // A stored permit: the connection may not be waiting on it yet.
            connection.close.notify_one();
            Room::Displaced
        }
        // Under churn every idle connection may already be closing for an
        // earlier arrival: the slots they free go to the waiters in turn.
        None if closing => Room::Pending,
        None => return Room::Full,
    };
    registry.waiting += 1;
    room
}

fn done_waiting(connections: &Connections) {
    let mut registry = lock(connections);
    registry.waiting = registry.waiting.saturating_sub(1);
}

/// Marks a connection busy while a request of it is being answered.
struct InFlight {
    connections: Connections,
    id: u64,
}

impl InFlight {
    fn start(connections: &Connections, id: u64) -> InFlight {
        if let Some(c) = lock(connections).connections.get_mut(&id) {
            c.in_flight += 1;
        }
        InFlight {
            connections: connections.clone(),
            id,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.connections).connections.get_mut(&self.id) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.idle_since = Instant::now();
        }
    }
}

/// A served connection's slot: its permit, registry entry and gauge, all
/// released together when the connection ends.
struct Slot {
    connections: Connections,
    id: u64,
    open: Option<IntGauge>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections).connections.remove(&self.id);
        if let Some(open) = &self.open {
            open.dec();
        }
    }
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
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER)
        .keep_alive(true);
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let connections: Connections = Arc::default();
    let counters = limits.counters;
    let errors = Arc::new(ErrorLog::default());
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
                let Some(admission) = admit(&permits, &connections, max, counters.as_ref()) else {
                    refuse(&stream, counters.as_ref(), &errors);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let connection = Connection {
                    http: http.clone(),
                    handler: handler.clone(),
                    connections: connections.clone(),
                    counters: counters.clone(),
                    errors: errors.clone(),
                    shutdown: shutdown.clone(),
                };
                tokio::spawn(connection.take_slot_and_run(stream, admission, permits.clone()));
            }
            _ = stopping(&mut shutdown) => break,
        }
    }
    drop(listener);
    // Every connection holds a permit until it ends: all of them back means
    // every connection has finished.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            drain_secs = limits.drain.as_secs_f64(),
            "requests still open at the drain deadline"
        );
    }
}

/// How a new connection gets its slot.
enum Admission {
    Free(OwnedSemaphorePermit),
    /// None is free, but one is being freed for it: it waits its turn.
    Awaited,
}

/// A slot for a new connection, or `None` when it must be refused: every
/// connection has a request in progress, or too many are already waiting.
fn admit(
    permits: &Arc<Semaphore>,
    connections: &Connections,
    max: usize,
    counters: Option<&Counters>,
) -> Option<Admission> {
    if let Ok(permit) = permits.clone().try_acquire_owned() {
        return Some(Admission::Free(permit));
    }
    match make_room(connections, max) {
        Room::Full => None,
        room => {
            if let (Room::Displaced, Some(c)) = (room, counters) {
                c.idle_closed.inc();
            }
            Some(Admission::Awaited)
        }
    }
}

/// The client's address, in each request's extensions: what a refused
/// push's trail row names as its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub std::net::SocketAddr);

/// One accepted connection and what serving it needs.
struct Connection<H> {
    http: http1::Builder,
    handler: H,
    connections: Connections,
    counters: Option<Counters>,
    errors: Arc<ErrorLog>,
    shutdown: watch::Receiver<bool>,
}

impl<H, F> Connection<H>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    /// Serves the connection once it has its slot.
    async fn take_slot_and_run(
        self,
        stream: TcpStream,
        admission: Admission,
        permits: Arc<Semaphore>,
    ) {
        let permit = match admission {
            Admission::Free(permit) => permit,
            // Fair: the permit the displaced connection frees goes to the
            // oldest waiter, not to a newer arrival.
            Admission::Awaited => {
                let wait = tokio::time::timeout(ADMISSION_WAIT, permits.acquire_owned()).await;
                done_waiting(&self.connections);
                match wait {
                    Ok(Ok(permit)) => permit,
                    _ => return refuse(&stream, self.counters.as_ref(), &self.errors),
                }
            }
        };
        self.run(stream, permit).await;
    }

    async fn run(mut self, stream: TcpStream, permit: OwnedSemaphorePermit) {
        if *self.shutdown.borrow() {
            return;
        }
        let close = Arc::new(Notify::new());
        let id = {
            let mut registry = lock(&self.connections);
            registry.next_id += 1;
            let id = registry.next_id;
            registry.connections.insert(
                id,
                Tracked {
                    in_flight: 0,
                    idle_since: Instant::now(),
                    close: close.clone(),
                    closing: false,
                },
            );
            id
        };
        let open = self.counters.as_ref().map(|c| c.open.clone());
        if let Some(open) = &open {
            open.inc();
        }
        let _slot = Slot {
            connections: self.connections.clone(),
            id,
            open,
            _permit: permit,
        };
        let (connections, handler) = (self.connections.clone(), self.handler.clone());
        let peer = stream.peer_addr().ok().map(Peer);
        let service = service_fn(move |mut req: Request<Incoming>| {
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            let busy = InFlight::start(&connections, id);
            let answer = handler(req);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        });
        let conn = self.http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = close.notified() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = stopping(&mut self.shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            let kind = error_kind(&e);
            if let Some(c) = &self.counters {
                c.http_errors.with_label_values(&[kind]).inc();
            }
            self.errors.record(kind);
        }
    }
}

/// The canned answer for a connection over the cap; the connection is
/// closed without reading from it.
fn refuse(stream: &TcpStream, counters: Option<&Counters>, log: &ErrorLog) {
    const BODY: &str = "too many connections open\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{BODY}",
        BODY.len()
    );
    // A fresh socket's send buffer is empty, so this never blocks; if it
    // cannot be written, the close alone tells the client.
    let _ = stream.try_write(answer.as_bytes());
    if let Some(c) = counters {
        c.refused.inc();
    }
    log.at_capacity();
}

/// The `kind` label of a connection that ended in an error. hyper answers
/// the first three itself (400, 414, 431) before any handler runs.
fn error_kind(e: &hyper::Error) -> &'static str {
    if e.is_parse_too_large() {
        // hyper tells the two apart only in its message.
        if e.to_string().contains("URI") {
            "uri_too_long"
        } else {
            "headers_too_large"
        }
    } else if e.is_parse() {
        "malformed"
    } else if e.is_timeout() {
        "header_timeout"
    } else if e.is_incomplete_message() {
        "incomplete"
    } else {
        "other"
    }
}

/// Logs at most once per [`RateLimited::EVERY`], with how many lines were
/// not logged since: a flood of junk must not become a flood of logs.
#[derive(Default)]
struct RateLimited {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(lines skipped since the last one)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, skipped) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < Self::EVERY) {
            *skipped += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(skipped))
    }
}

/// A listener's rate-limited log lines.
#[derive(Default)]
struct ErrorLog {
    refused: RateLimited,
    at_capacity: RateLimited,
}

impl ErrorLog {
    fn record(&self, kind: &'static str) {
        // Timeouts and early closes are what idle keep-alive and impatient
        // clients do; the metric is enough for them.
        if !matches!(kind, "malformed" | "uri_too_long" | "headers_too_large") {
            tracing::debug!(kind, "connection ended with an error");
            return;
        }
        if let Some(not_logged) = self.refused.allow() {
            tracing::warn!(kind, not_logged, "request refused by the HTTP layer");
        }
    }

    fn at_capacity(&self) {
        if let Some(not_logged) = self.at_capacity.allow() {
            tracing::warn!(
                not_logged,
                "connection refused: max_connections reached and none idle"
            );
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(states: &[(usize, bool)]) -> Connections {
        let connections: Connections = Arc::default();
        {
            let mut r = lock(&connections);
            for (id, &(in_flight, closing)) in states.iter().enumerate() {
                r.connections.insert(
                    id as u64,
                    Tracked {
                        in_flight,
                        idle_since: Instant::now(),
                        close: Arc::new(Notify::new()),
                        closing,
                    },
                );
            }
        }
        connections
    }

    #[tokio::test]
    async fn room_at_the_cap_comes_from_idle_then_closing_connections() {
        // One idle, one busy: the idle one is asked to close.
        let c = registry(&[(0, false), (1, false)]);
        assert!(make_room(&c, 4) == Room::Displaced);
        assert!(lock(&c).connections[&0].closing);
        assert_eq!(lock(&c).waiting, 1);
        // Now none idle, but one closing: the next waits for a slot.
        assert!(make_room(&c, 4) == Room::Pending);
        assert_eq!(lock(&c).waiting, 2);
        // No more waiters than allowed.
        assert!(make_room(&c, 2) == Room::Full);
        done_waiting(&c);
        done_waiting(&c);
        assert_eq!(lock(&c).waiting, 0);
        // Every connection busy and none closing: refused.
        let busy = registry(&[(1, false), (2, false)]);
        assert!(make_room(&busy, 4) == Room::Full);
        assert_eq!(lock(&busy).waiting, 0);
    }

    #[tokio::test]
    async fn the_longest_idle_connection_is_the_one_asked_to_close() {
        let c = registry(&[(0, false), (0, false)]);
        lock(&c)
            .connections
            .get_mut(&1)
            .into_iter()
            .for_each(|t| t.idle_since -= Duration::from_secs(5));
        assert!(make_room(&c, 4) == Room::Displaced);
        let r = lock(&c);
        assert!(r.connections[&1].closing && !r.connections[&0].closing);
    }
}
