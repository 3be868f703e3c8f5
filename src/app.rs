//! Wires the relay together: configuration, spool, listeners, delivery workers;
//! owns reload and the order of shutdown (stop accepting → finish requests →
//! end delivery attempts → close the spool). A spool task that fails stops
//! the relay the same way ([`Relay::run`]).

use crate::admin::{self, Admin};
use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::deliver::Dispatcher;
use crate::handler::{self, PushPath};
use crate::ingest::Ingest;
use crate::late::Late;
use crate::metrics::{Metrics, MetricsError};
use crate::reload::Reloader;
use crate::server::{self, Limits};
use crate::spool::postgres::OnOpen;
use crate::spool::{OpenSpool, SpoolError, Supervision};
use crate::telemetry::{Export, Telemetry, TelemetryError};
use crate::ui::Ui;
use crate::wechat::reply::SeenStamps;
use arc_swap::ArcSwap;
use http::Request;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Connections on the admin address: an operator, a scraper, a probe.
const ADMIN_CONNECTIONS: usize = 64;

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
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// Why a running relay stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The relay is to be started again (it exits with status 70).
    #[error("a spool task failed: {0}")]
    Spool(Arc<str>),
}

/// How to start: the defaults bind the configured addresses, open the
/// configured spool file and read the system clock; tests pass their own.
#[derive(Default)]
pub struct Options {
    pub public: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    /// A spool the caller opened, and closes: the relay leaves it open.
    pub spool: Option<OpenSpool>,
    pub clock: Option<Arc<dyn Clock>>,
    /// The file that `SIGHUP` and `POST /admin/reload` read again.
    pub config_path: Option<PathBuf>,
    /// How often an idle delivery worker looks in the spool unprompted
    /// (default 250 ms); tests lengthen it to show what wakes the workers.
    pub idle_poll: Option<Duration>,
}

/// A running relay.
pub struct Relay {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    dispatcher: Arc<Dispatcher>,
    stop: watch::Sender<bool>,
    listeners: JoinSet<()>,
    workers: JoinSet<()>,
    drain: Duration,
    owned_spool: Option<OpenSpool>,
    supervision: Supervision,
    /// The span export, when traces are on: flushed at shutdown.
    export: Option<Export>,
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

/// The spool in use and, when the relay opened it, the same spool to close.
type Spools = (OpenSpool, Option<OpenSpool>);

/// The spool passed in, or the configured one, which the relay then owns
/// and closes at shutdown. A PostgreSQL schema is brought up to date first.
async fn open_spool(given: Option<OpenSpool>, settings: &Settings) -> Result<Spools, StartError> {
    let spools = match given {
        Some(spool) => (spool, None),
        None => {
            let opened = OpenSpool::open(&settings.spool, OnOpen::MigrateWhenReachable).await?;
            (opened.clone(), Some(opened))
        }
    };
    if settings.trail.enabled {
        spools.0.start_trail(settings.trail.setup()).await?;
    }
    Ok(spools)
}

/// What the public listener's requests get: exactly the handles they use;
/// with the late replies' sender, which the push path keeps replies for.
/// The workers' answers to a reply target take the same way as inline ones.
fn push_path(
    config: &Arc<ArcSwap<Settings>>,
    spool: &OpenSpool,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
    (dispatcher, telemetry): (&Arc<Dispatcher>, Option<Arc<Telemetry>>),
) -> (Arc<PushPath>, Arc<Late>) {
    let late = Late::new(
        config.clone(),
        spool.late_replies(),
        (clock.clone(), metrics.clone()),
        crate::deliver::client(),
    );
    let in_flight = config.load().server.max_body_bytes_in_flight;
    let path = Arc::new(PushPath {
        config: config.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        body_budget: Arc::new(Semaphore::new(in_flight)),
        ingest: Ingest {
            spool: spool.intake(),
            tickets: spool.tickets(),
            clock: clock.clone(),
            dispatcher: dispatcher.clone(),
        },
        dispatcher: dispatcher.clone(),
        reply_stamps: SeenStamps::default(),
        telemetry,
        late: late.clone(),
        refusals: Default::default(),
    });
    dispatcher.on_worker_answer(handler::worker_answers(&path));
    (path, late)
}

/// What the admin listener's requests get, the pages included.
fn admin_routes(
    config: Arc<ArcSwap<Settings>>,
    spool: &OpenSpool,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    (dispatcher, reloader, listening): (&Arc<Dispatcher>, &Arc<Reloader>, SocketAddr),
) -> Arc<Admin> {
    let ui = Arc::new(Ui::new(
        config.clone(),
        clock.clone(),
        metrics.clone(),
        (spool.health(), spool.operator(), spool.trail()),
        dispatcher.clone(),
    ));
    Arc::new(Admin {
        config,
        spool: spool.health(),
        tickets: spool.tickets(),
        clock,
        metrics,
        reloader: reloader.clone(),
        trail: spool.trail(),
        ui,
        listening,
    })
}

/// The dispatcher, and where its spans and the pushes' go when traces are
/// exported, with their export.
type Delivery = (Arc<Dispatcher>, Option<Arc<Telemetry>>, Option<Export>);

/// The delivery side, and where its spans and the pushes' go when traces
/// are exported.
fn delivery(
    config: &Arc<ArcSwap<Settings>>,
    spool: &OpenSpool,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Delivery, StartError> {
    let traces = Telemetry::start(&config.load().telemetry, metrics, crate::deliver::client())?;
    let (telemetry, export) = traces.unzip();
    let (spool, clock, metrics) = (spool.work(), clock.clone(), metrics.clone());
    let dispatcher = Dispatcher::new(config.clone(), spool, clock, metrics, telemetry.clone());
    Ok((dispatcher, telemetry, export))
}

/// The public and admin listeners' limits.
fn limits(settings: &Settings) -> (Limits, Limits) {
    let limits = |max_connections| Limits {
        header_timeout: settings.server.header_timeout,
        drain: settings.server.shutdown_timeout,
        max_connections,
        counters: None,
    };
    if !server::fits_open_files(settings.server.max_connections) {
        tracing::warn!(
            max_connections = settings.server.max_connections,
            open_files = server::open_files_limit(),
            "max_connections is more than the open-file limit allows: raise the limit (ulimit -n) or lower max_connections"
        );
    }
    (
        limits(settings.server.max_connections),
        limits(ADMIN_CONNECTIONS),
    )
}

impl Relay {
    pub async fn start(settings: Settings, options: Options) -> Result<Relay, StartError> {
        let public = bind(options.public, settings.server.listen).await?;
        let admin = bind(options.admin, settings.server.admin_listen).await?;
        let public_addr = local_addr(&public, settings.server.listen)?;
        let admin_addr = local_addr(&admin, settings.server.admin_listen)?;
        let (spool, owned_spool) = open_spool(options.spool, &settings).await?;
        let (mut public_limits, admin_limits) = limits(&settings);
        let drain = settings.server.shutdown_timeout;
        let config = Arc::new(ArcSwap::from_pointee(settings));
        let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let metrics = Arc::new(Metrics::new()?);
        let (dispatcher, telemetry, export) = delivery(&config, &spool, &clock, &metrics)?;
        options
            .idle_poll
            .inspect(|every| dispatcher.poll_idle_every(*every));
        let reloader = Arc::new(Reloader::new(
            config.clone(),
            dispatcher.clone(),
            metrics.clone(),
            options.config_path,
        ));
        public_limits.counters = Some(metrics.connection_counters());
        retire_removed_targets(&dispatcher, &config.load()).await;
        let (stop, stopped) = watch::channel(false);
        let mut listeners = JoinSet::new();

        let (push_path, late) =
            push_path(&config, &spool, &clock, &metrics, (&dispatcher, telemetry));
        let public_handler = move |req: Request<Incoming>| handler::handle(push_path.clone(), req);
        listeners.spawn(server::serve(
            public,
            public_handler,
            public_limits,
            stopped.clone(),
        ));

        let admin_deps = (&dispatcher, &reloader, admin_addr);
        let admin_routes = admin_routes(config, &spool, clock, metrics, admin_deps);
        let admin_handler = move |req: Request<Incoming>| admin::serve(admin_routes.clone(), req);
        listeners.spawn(server::serve(
            admin,
            admin_handler,
            admin_limits,
            stopped.clone(),
        ));

        listeners.spawn(reload_on_hangup(reloader, stopped.clone()));
        let mut workers = dispatcher.start(stopped.clone());
        workers.spawn(late.send_loop(stopped));
        // Deliveries another replica makes due wake the workers here too.
        spool
            .due_listener()
            .on_due_elsewhere(dispatcher.due_waker());

        tracing::info!(%public_addr, %admin_addr, version = env!("CARGO_PKG_VERSION"), "wxrelay listening");
        Ok(Relay {
            public_addr,
            admin_addr,
            dispatcher,
            stop,
            listeners,
            workers,
            drain,
            owned_spool,
            supervision: spool.supervision(),
            export,
        })
    }

    /// Resolves when one of the spool's tasks has failed, with the reason:
    /// the spool then refuses all work, and the relay is to be shut down.
    pub async fn failed(&self) -> Arc<str> {
        self.supervision.failed().await
    }

    /// Runs until `stop` resolves or a spool task fails, then shuts down;
    /// returns the failure, if that is what stopped it.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), Failure> {
        let failed = tokio::select! {
            () = stop => None,
            reason = self.failed() => Some(reason),
        };
        if let Some(reason) = &failed {
            tracing::error!(%reason, "a spool task failed: stopping the relay");
        }
        self.shutdown().await;
        failed.map_or(Ok(()), |reason| Err(Failure::Spool(reason)))
    }

    /// Stops accepting, lets open requests and delivery attempts finish (each
    /// up to the drain deadline), then closes the spool. An attempt cut off at
    /// the deadline keeps its lease and is sent again after the next start.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.listeners.join_next().await.is_some() {}
        let dispatcher = self.dispatcher.clone();
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
        // The attempts' spans are made by now: send what is queued.
        if let Some(export) = self.export.take() {
            export.finish(self.drain).await;
        }
        if let Some(spool) = self.owned_spool.take() {
            spool.close().await;
        }
        tracing::info!("wxrelay stopped");
    }
}

/// Dead-letters the pending deliveries of targets no longer configured. A
/// spool that cannot yet (a database still away) leaves it to the workers'
/// supervisor, which tries again at once, then every 30 s.
async fn retire_removed_targets(dispatcher: &Dispatcher, settings: &Settings) {
    if let Err(e) = dispatcher.retire_removed_targets(settings).await {
        tracing::warn!(error = %e, "cannot retire the deliveries of removed targets yet");
    }
}

/// SIGHUP reloads the configuration file, as `systemctl reload` sends it.
async fn reload_on_hangup(reloader: Arc<Reloader>, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if !reloader.has_file() {
            return;
        }
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => { let _ = reloader.reload().await; }
                _ = server::stopping(&mut stop) => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, server::stopping(&mut stop).await);
    }
}
