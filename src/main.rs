//! The `wxrelay` command line: `serve` runs the relay, `check` validates a
//! configuration; `simulate`, `route`, `dlq`, `pending`, `migrate`, `target` and `keygen` are the operator's
//! tools (see [`wxrelay::cli`]). Usage and configuration errors exit with
//! status 64 (EX_USAGE), other failures with 1; a relay that stops because
//! a spool task failed exits with 70 (EX_SOFTWARE), for its supervisor to
//! start it again.

use clap::{Parser, Subcommand, ValueEnum};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wxrelay::app::{Options, Relay};
use wxrelay::cli::dlq::{self, DlqCommand};
use wxrelay::cli::pending::{self, PendingCommand};
use wxrelay::cli::route::{self, RouteArgs};
use wxrelay::cli::simulate::{self, FamilyOptions, SimulateArgs};
use wxrelay::cli::target::{self, TargetCommand};
use wxrelay::cli::trail::{self, TrailArgs, TrailCommand};
use wxrelay::cli::{self, keygen, migrate, ticket, CliError, Report};
use wxrelay::clock::{Clock, SystemClock};
use wxrelay::config::{render_check, Settings};
use wxrelay::spool::{OpenSpool, UnixMs};

const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;
/// EX_SOFTWARE: the relay stopped on an internal failure (a spool task).
const EXIT_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(
    name = "wxrelay",
    version,
    about = "A relay for WeChat Official Account server pushes"
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// The configuration file (TOML); WXRELAY_* environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and print its accounts, targets and routes.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send a push (or the URL check) to a running relay exactly as WeChat would.
    Simulate {
        /// The configuration of the relay to push to: its accounts' credentials.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        args: SimulateArgs,
        #[command(flatten)]
        family: FamilyOptions,
    },
    /// Say which route a push would take, without sending it.
    Route {
        /// The configuration whose routes to try.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        args: RouteArgs,
        #[command(flatten)]
        family: FamilyOptions,
    },
    /// List, show, replay or purge dead letters (safe while the relay runs).
    Dlq {
        /// The configuration file (required): the spool path is read from it.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// List a target's pending deliveries, or make them due now (safe while
    /// the relay runs).
    Pending {
        /// The configuration file (required): the spool path is read from it.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: PendingCommand,
    },
    /// What became of a push: search the event trail by OpenID, MsgId,
    /// scene, event id, target, outcome or time (newest first), or
    /// redeliver a retained event.
    #[command(args_conflicts_with_subcommands = true)]
    Trail {
        /// The configuration file (required): the spool is read from it.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: TrailArgs,
        #[command(subcommand)]
        command: Option<TrailCommand>,
    },
    /// Apply the PostgreSQL spool's schema migrations and say what was done
    /// (safe while the relay runs; the relay also applies them at start).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print an Open Platform's latest component_verify_ticket and its age.
    Ticket {
        #[arg(long, short)]
        config: PathBuf,
        /// The Open Platform account; optional when there is only one.
        #[arg(long)]
        account: Option<String>,
    },
    /// Check a `format = "wechat"` target: WeChat's URL check signed with its Token.
    Target {
        /// The configuration that holds the target.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: TargetCommand,
    },
    /// Print a fresh Token and EncodingAESKey for a new account or a `wechat` target.
    Keygen,
    /// Run a local target that prints every delivery it receives and answers
    /// `success`, for trying routes and formats without a broker.
    Sink {
        /// Where to listen; the example configuration's webhook target is 127.0.0.1:8082.
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap would exit 2 on a bad command line; scripts expect EX_USAGE.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logs(cli.log_format);
    match cli.command {
        Command::Check { config } => run_check(&config),
        Command::Serve { config } => run_serve(config),
        Command::Simulate {
            config,
            args,
            family,
        } => finish(run_simulate(config, args, family)),
        Command::Route {
            config,
            args,
            family,
        } => finish(run_route(config, args, family).map(done)),
        Command::Dlq { config, command } => finish(run_dlq(config, command).map(done)),
        Command::Pending { config, command } => finish(run_pending(config, command).map(done)),
        Command::Trail {
            config,
            args,
            command,
        } => finish(run_trail(config, args, command).map(done)),
        Command::Migrate { config } => finish(
            cli::load(&config)
                .and_then(|settings| block_on(async move { migrate::run(&settings).await })?)
                .map(done),
        ),
        Command::Ticket { config, account } => finish(run_ticket(config, account).map(done)),
        Command::Target { config, command } => finish(run_target(config, command)),
        Command::Keygen => finish(Ok(done(keygen::run()))),
        Command::Sink { listen } => finish(block_on(run_sink(listen)).and_then(|r| r)),
    }
}

/// Validates the configuration and prints what it holds.
fn run_check(config: &Path) -> ExitCode {
    match load_settings(config) {
        Ok(settings) => {
            print!("{}", render_check(&settings));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Runs the relay until a stop signal or a failure.
fn run_serve(config: PathBuf) -> ExitCode {
    let settings = match load_settings(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(serve(settings, config))
}

/// The configuration's settings, or the exit status after saying what is
/// wrong with it.
fn load_settings(config: &Path) -> Result<Settings, ExitCode> {
    Settings::load(config).map_err(|e| {
        eprintln!("{}: invalid configuration\n{e}", config.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn run_simulate(
    config: PathBuf,
    args: SimulateArgs,
    family: FamilyOptions,
) -> Result<Report, CliError> {
    let settings = cli::load(&config)?;
    block_on(async move { simulate::run_with(&settings, &args, &family, &SystemClock).await })?
}

fn run_route(config: PathBuf, args: RouteArgs, family: FamilyOptions) -> Result<String, CliError> {
    route::run_with(&cli::load(&config)?, &args, &family, &SystemClock)
}

fn run_dlq(config: Option<PathBuf>, command: DlqCommand) -> Result<String, CliError> {
    let config = config.ok_or_else(|| CliError::Usage("--config is required".to_owned()))?;
    let settings = cli::load(&config)?;
    on_spool(&settings, async |spool| {
        dlq::run(
            (&*spool.operator(), &*spool.late_replies()),
            &command,
            SystemClock.now_ms(),
        )
        .await
    })
}

fn run_trail(
    config: Option<PathBuf>,
    args: TrailArgs,
    command: Option<TrailCommand>,
) -> Result<String, CliError> {
    let config = config.ok_or_else(|| CliError::Usage("--config is required".to_owned()))?;
    let settings = cli::load(&config)?;
    let now = UnixMs(SystemClock.now_ms());
    on_spool(&settings, async |spool| {
        trail::start(spool, &settings).await?;
        match &command {
            None => {
                let scan = settings.trail.search_rows;
                trail::search(&*spool.trail(), &args, (now, scan)).await
            }
            Some(TrailCommand::Redeliver { event_id, target }) => {
                trail::redeliver(&*spool.trail(), &settings, (*event_id, target), now).await
            }
        }
    })
}

fn run_ticket(config: PathBuf, account: Option<String>) -> Result<String, CliError> {
    let settings = cli::load(&config)?;
    on_spool(&settings, async |spool| {
        let tickets = spool.tickets();
        ticket::run(
            &settings,
            &*tickets,
            account.as_deref(),
            SystemClock.now_ms(),
        )
        .await
    })
}

fn run_pending(config: Option<PathBuf>, command: PendingCommand) -> Result<String, CliError> {
    let config = config.ok_or_else(|| CliError::Usage("--config is required".to_owned()))?;
    let settings = cli::load(&config)?;
    pending::check_target(&settings, &command)?;
    on_spool(&settings, async |spool| {
        pending::run(&*spool.operator(), &command, SystemClock.now_ms()).await
    })
}

/// Opens the configured spool, runs `command` on it, and closes it.
fn on_spool(
    settings: &Settings,
    command: impl AsyncFnOnce(&OpenSpool) -> Result<String, CliError>,
) -> Result<String, CliError> {
    block_on(async move {
        let opened = dlq::open(settings).await?;
        let result = command(&opened).await;
        opened.close().await;
        result
    })?
}

fn run_target(config: Option<PathBuf>, command: TargetCommand) -> Result<Report, CliError> {
    let config = config.ok_or_else(|| CliError::Usage("--config is required".to_owned()))?;
    let settings = cli::load(&config)?;
    block_on(async move { target::run(&settings, &command, &SystemClock).await })?
}

/// Prints deliveries until interrupted.
async fn run_sink(listen: std::net::SocketAddr) -> Result<Report, CliError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on {listen}: {e}")))?;
    eprintln!("wxrelay sink listening on {listen}; Ctrl-C to stop");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    let show = std::sync::Arc::new(|text: String| println!("{text}"));
    cli::sink::serve(listener, show, stopped).await;
    Ok(done(String::new()))
}

/// A report for a command that succeeds whenever it runs to the end.
fn done(text: String) -> Report {
    Report { text, ok: true }
}

/// Prints the outcome and picks the exit status.
fn finish(outcome: Result<Report, CliError>) -> ExitCode {
    match outcome {
        Ok(report) => {
            print!("{}", report.text);
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(match e {
                CliError::Config { .. } | CliError::Usage(_) => EXIT_CONFIG,
                CliError::Failed(_) => EXIT_FAILURE,
            })
        }
    }
}

/// Runs a command's async part on a runtime of its own.
fn block_on<F: Future>(future: F) -> Result<F::Output, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map(|runtime| runtime.block_on(future))
        .map_err(|e| CliError::Failed(format!("cannot start the runtime: {e}")))
}

async fn serve(settings: Settings, config: PathBuf) -> ExitCode {
    let options = Options {
        config_path: Some(config),
        ..Options::default()
    };
    let relay = match Relay::start(settings, options).await {
        Ok(relay) => relay,
        Err(e) => {
            tracing::error!(error = %wxrelay::error_chain(&e), "cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let stop = async {
        wait_for_stop_signal().await;
        tracing::info!("stop signal received; draining");
    };
    match relay.run(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, exit_code = EXIT_SOFTWARE, "wxrelay stopped on a failure; exiting for its supervisor to start it again");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}

#[cfg(unix)]
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(wxrelay::config::LOG_FILTER_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a file or a journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
