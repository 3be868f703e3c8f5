//! Wires the relay together: configuration, spool, listeners, delivery workers;
//! owns reload and the order of shutdown (stop accepting → finish requests →
//! end delivery attempts → close the spool).

use crate::clock::{Clock, SystemClock};
use crate::config::{ConfigError, Settings};
use crate::deliver::Dispatcher;
use crate::handler;
use crate::metrics::{Metrics, MetricsError};
use crate::server::{self, Limits};
use crate::spool::{Spool, SpoolError, SqliteSpool};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Connections on the admin address: an operator, a scraper, a probe.
const ADMIN_CONNECTIONS: usize = 64;

/// What every request and worker reads: the current configuration (swapped
/// atomically on reload; a request keeps the view it started with), the spool,
/// the clock, the outbound client and the metrics.
pub struct Shared {
    pub config: Arc<ArcSwap<Settings>>,
    pub spool: Arc<dyn Spool>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub dispatcher: Arc<Dispatcher>,
    /// Where the configuration is reloaded from; `None` when it came from elsewhere.
    pub config_path: Option<PathBuf>,
    /// Serialises reloads, so two at once cannot interleave.
    reloading: tokio::sync::Mutex<()>,
    /// One permit per byte of `max_body_bytes_in_flight`: a push reserves its
    /// body's size before reading it and keeps it until answered.
    pub body_budget: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Loads, validates and swaps in the configuration file. An invalid file
    /// changes nothing: the running configuration stays, the reasons are
    /// returned and logged, and the failure is counted.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let result = self.try_reload().await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => {
                tracing::error!(reasons = %e, "configuration reload refused; the running configuration stays")
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let next = Settings::load(path)?;
        let current = self.config.load();
        if next.server.listen != current.server.listen
            || next.server.admin_listen != current.server.admin_listen
            || next.spool.path != current.spool.path
            || next.server.max_connections != current.server.max_connections
            || next.server.max_body_bytes_in_flight != current.server.max_body_bytes_in_flight
        {
            tracing::warn!(
                "listen, admin_listen, max_connections, max_body_bytes_in_flight and spool.path take effect at the next start only"
            );
        }
        let next = Arc::new(next);
        self.config.store(next.clone());
        self.dispatcher.reconfigured();
        // After the swap, so no worker starts on a removed target again; a
        // request still finishing under the previous view is caught by the
        // workers' periodic retire.
        self.dispatcher.retire_removed_targets(&next).await?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the relay was not started from a configuration file")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// How to start: the defaults bind the configured addresses, open the
/// configured spool file and read the system clock; tests pass their own.
#[derive(Default)]
pub struct Options {
    pub public: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub spool: Option<Arc<dyn Spool>>,
    pub clock: Option<Arc<dyn Clock>>,
    /// The file that `SIGHUP` and `POST /admin/reload` read again.
    pub config_path: Option<PathBuf>,
}

/// A running relay.
pub struct Relay {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    listeners: JoinSet<()>,
    workers: JoinSet<()>,
    drain: Duration,
    owned_spool: Option<Arc<SqliteSpool>>,
}

async fn bind(listener: Option<TcpListener>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    match listener {
        Some(l) => Ok(l),
        None => listen(addr).map_err(|source| StartError::Listen { addr, source }),
    }
}

/// Connections the kernel queues for accept (it caps this at
/// `net.core.somaxconn`). Its usual default, 1024, overflows under a flood of
/// short connections, and a dropped SYN costs a real push a 1 s, then 3 s,
/// retransmission: longer than WeChat waits.
const ACCEPT_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's bind does, so a restart need not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

fn local_addr(l: &TcpListener, configured: SocketAddr) -> Result<SocketAddr, StartError> {
    l.local_addr().map_err(|source| StartError::Listen {
        addr: configured,
        source,
    })
}

impl Relay {
    pub async fn start(settings: Settings, options: Options) -> Result<Relay, StartError> {
        let public = bind(options.public, settings.server.listen).await?;
        let admin = bind(options.admin, settings.server.admin_listen).await?;
        let public_addr = local_addr(&public, settings.server.listen)?;
        let admin_addr = local_addr(&admin, settings.server.admin_listen)?;
        let (spool, owned_spool): (Arc<dyn Spool>, _) = match options.spool {
            Some(spool) => (spool, None),
            None => {
                let sqlite = Arc::new(SqliteSpool::open(&settings.spool.path)?);
                (sqlite.clone(), Some(sqlite))
            }
        };
        let limits = |max_connections| Limits {
            header_timeout: settings.server.header_timeout,
            drain: settings.server.shutdown_timeout,
            max_connections,
            counters: None,
        };
        let mut public_limits = limits(settings.server.max_connections);
        let admin_limits = limits(ADMIN_CONNECTIONS);
        if !server::fits_open_files(settings.server.max_connections) {
            tracing::warn!(
                max_connections = settings.server.max_connections,
                open_files = server::open_files_limit(),
                "max_connections is more than the open-file limit allows: raise the limit (ulimit -n) or lower max_connections"
            );
        }
        let drain = settings.server.shutdown_timeout;
        let body_budget = Arc::new(tokio::sync::Semaphore::new(
            settings.server.max_body_bytes_in_flight,
        ));
        let config = Arc::new(ArcSwap::from_pointee(settings));
        let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let metrics = Arc::new(Metrics::new()?);
        let dispatcher = Dispatcher::new(
            config.clone(),
            spool.clone(),
            clock.clone(),
            metrics.clone(),
        );
        let shared = Arc::new(Shared {
            config,
            spool,
            clock,
            metrics,
            dispatcher,
            config_path: options.config_path,
            reloading: tokio::sync::Mutex::new(()),
            body_budget,
        });
        public_limits.counters = Some(shared.metrics.connection_counters());
        shared
            .dispatcher
            .retire_removed_targets(&shared.config.load())
            .await?;
        let (stop, stopped) = watch::channel(false);
        let mut listeners = JoinSet::new();

        let s = shared.clone();
        let public_handler = move |req: Request<Incoming>| handler::handle(s.clone(), req);
        listeners.spawn(server::serve(
            public,
            public_handler,
            public_limits,
            stopped.clone(),
        ));

        let s = shared.clone();
        let admin_handler = move |req: Request<Incoming>| serve_admin(s.clone(), req);
        listeners.spawn(server::serve(
            admin,
            admin_handler,
            admin_limits,
            stopped.clone(),
        ));

        listeners.spawn(reload_on_hangup(shared.clone(), stopped.clone()));
        let workers = shared.dispatcher.start(stopped);

        tracing::info!(%public_addr, %admin_addr, version = env!("CARGO_PKG_VERSION"), "wxrelay listening");
        Ok(Relay {
            public_addr,
            admin_addr,
            shared,
            stop,
            listeners,
            workers,
            drain,
            owned_spool,
        })
    }

    /// Stops accepting, lets open requests and delivery attempts finish (each
    /// up to the drain deadline), then closes the spool. An attempt cut off at
    /// the deadline keeps its lease and is sent again after the next start.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.listeners.join_next().await.is_some() {}
        let dispatcher = self.shared.dispatcher.clone();
        let workers_done = async {
            while self.workers.join_next().await.is_some() {}
            dispatcher.records_written().await;
        };
        if tokio::time::timeout(self.drain, workers_done)
            .await
            .is_err()
        {
            tracing::warn!("delivery attempts still running at the drain deadline");
            self.workers.abort_all();
        }
        if let Some(spool) = self.owned_spool.take() {
            let _ = tokio::task::spawn_blocking(move || spool.close()).await;
        }
        tracing::info!("wxrelay stopped");
    }
}

/// SIGHUP reloads the configuration file, as `systemctl reload` sends it.
async fn reload_on_hangup(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if shared.config_path.is_none() {
            return;
        }
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => { let _ = shared.reload().await; }
                _ = server::stopping(&mut stop) => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (shared, server::stopping(&mut stop).await);
    }
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, and `/admin/*`
/// behind the admin token when one is configured.
async fn serve_admin(
    shared: Arc<Shared>,
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
            let config = shared.config.load();
            let targets: Vec<String> = config.targets.keys().cloned().collect();
            let text = shared
                .metrics
                .render(&*shared.spool, &targets, shared.clock.now_ms())
                .await;
            let mut response = plain(StatusCode::OK, text);
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => match shared.spool.probe().await {
            Ok(()) => plain(StatusCode::OK, "ready\n".into()),
            Err(e) => {
                tracing::warn!(error = %e, "not ready: the spool does not accept writes");
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("spool not writable: {e}\n"),
                )
            }
        },
        (_, p) if p.starts_with("/admin/") && !authorized(&shared, &req) => {
            tracing::warn!(path = p, "admin request without a valid token");
            plain(StatusCode::UNAUTHORIZED, "admin token required\n".into())
        }
        (&Method::POST, "/admin/reload") => match shared.reload().await {
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
fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let config = shared.config.load();
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
