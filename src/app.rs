//! Wires the relay together: configuration, spool, listeners; owns the order of
//! shutdown (stop accepting → finish requests → close the spool).

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::deliver::{self, HttpClient};
use crate::handler;
use crate::server::{self, Limits};
use crate::spool::{Spool, SpoolError, SqliteSpool};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// What every request and worker reads: the current configuration (swapped
/// atomically on reload), the spool, the clock and the outbound client.
pub struct Shared {
    pub config: ArcSwap<Settings>,
    pub spool: Arc<dyn Spool>,
    pub clock: Arc<dyn Clock>,
    pub client: HttpClient,
    /// Signalled after a reload, so new targets get a worker.
    pub config_changed: Notify,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Shared {
    /// The signal a target's worker waits on when it has nothing due.
    pub fn waker(&self, target: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.entry(target.to_string()).or_default().clone()
    }

    /// Tells a target's worker that a delivery is due now.
    pub fn wake(&self, target: &str) {
        self.waker(target).notify_one();
    }
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
}

/// How to start: the defaults bind the configured addresses, open the
/// configured spool file and read the system clock; tests pass their own.
#[derive(Default)]
pub struct Options {
    pub public: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub spool: Option<Arc<dyn Spool>>,
    pub clock: Option<Arc<dyn Clock>>,
}

/// A running relay.
pub struct Relay {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    listeners: JoinSet<()>,
    workers: JoinSet<()>,
    drain: std::time::Duration,
    owned_spool: Option<Arc<SqliteSpool>>,
}

async fn bind(listener: Option<TcpListener>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    match listener {
        Some(l) => Ok(l),
        None => TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source }),
    }
}

impl Relay {
    pub async fn start(settings: Settings, options: Options) -> Result<Relay, StartError> {
        let public = bind(options.public, settings.server.listen).await?;
        let admin = bind(options.admin, settings.server.admin_listen).await?;
        let public_addr = public.local_addr().map_err(|source| StartError::Listen {
            addr: settings.server.listen,
            source,
        })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Listen {
            addr: settings.server.admin_listen,
            source,
        })?;
        let (spool, owned_spool): (Arc<dyn Spool>, _) = match options.spool {
            Some(spool) => (spool, None),
            None => {
                let sqlite = Arc::new(SqliteSpool::open(&settings.spool.path)?);
                (sqlite.clone(), Some(sqlite))
            }
        };
        let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let limits = || Limits {
            header_timeout: settings.server.header_timeout,
            drain: settings.server.shutdown_timeout,
        };
        let (public_limits, admin_limits) = (limits(), limits());
        let drain = settings.server.shutdown_timeout;
        // Deliveries to targets that are no longer configured can never be
        // sent: they become dead letters an operator can see and replay.
        let targets: Vec<String> = settings.targets.keys().cloned().collect();
        let retired = spool.retire_targets(targets, clock.now_ms()).await?;
        if retired > 0 {
            tracing::warn!(
                retired,
                "pending deliveries of removed targets dead-lettered as target_removed"
            );
        }
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(settings),
            spool,
            clock,
            client: deliver::client(),
            config_changed: Notify::new(),
            wakers: Mutex::new(HashMap::new()),
        });
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

        let workers = deliver::start(shared.clone(), stopped);

        tracing::info!(%public_addr, %admin_addr, "wxrelay listening");
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
        let workers_done = async { while self.workers.join_next().await.is_some() {} };
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

async fn serve_admin(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" => match shared.spool.probe().await {
            Ok(()) => (StatusCode::OK, "ready\n"),
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "spool not writable\n"),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}
