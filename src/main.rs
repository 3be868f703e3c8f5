//! The `wxrelay` command line: `serve` runs the relay, `check` validates a
//! configuration. Configuration errors exit with status 64 (EX_USAGE).

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use wxrelay::app::{Options, Relay};
use wxrelay::config::{render_check, Settings};

const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Check { config } => match Settings::load(&config) {
            Ok(settings) => {
                print!("{}", render_check(&settings));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid configuration\n{e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config } => {
            let settings = match Settings::load(&config) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("{}: invalid configuration\n{e}", config.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
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
    }
}

async fn serve(settings: Settings, config: PathBuf) -> ExitCode {
    let options = Options {
        config_path: Some(config),
        ..Options::default()
    };
    let relay = match Relay::start(settings, options).await {
        Ok(relay) => relay,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    wait_for_stop_signal().await;
    tracing::info!("stop signal received; draining");
    relay.shutdown().await;
    ExitCode::SUCCESS
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("WXRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
