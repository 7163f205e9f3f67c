//! The `switchyard-server` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchyard_telemetry::Tracing;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::server::{serve, Gateway, Listeners, Stop};

/// Switchyard gateway: WebSocket connections, topics that resume, lossless drains.
#[derive(Debug, Parser)]
#[command(name = "switchyard-server", version)]
pub struct Args {
    /// YAML configuration file. Without it, built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener address (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listener address (overrides `admin_listen`).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Gateway id (overrides `server_id`).
    #[arg(long, value_name = "ID")]
    pub server_id: Option<String>,
    /// Log format: text or json (overrides `log.format`).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Any setting as `section.field=value`, e.g. `connection.keepalive_interval_ms=5000`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl Args {
    /// The `--set` style overrides these flags amount to, in order.
    fn overrides(&self) -> Vec<String> {
        let mut overrides = Vec::new();
        let named = [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
            ("server_id", &self.server_id),
            ("log.format", &self.log_format),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                overrides.push(format!("{key}={value}"));
            }
        }
        overrides.extend(self.set.iter().cloned());
        overrides
    }
}

/// Installs the log subscriber, and the OTLP trace exporter when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Runs inside the runtime (the
/// exporter's batches are sent from it).
fn init_logging(config: &Config) -> anyhow::Result<Option<Tracing>> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = config.log.format == LogFormat::Json;
    Ok(switchyard_telemetry::init_subscriber(
        "switchyard-gateway",
        json,
        filter,
    )?)
}

/// Parses arguments, loads configuration and runs the gateway. Exit codes:
/// 0 after a clean shutdown, 2 for invalid arguments or configuration, 1 for
/// a runtime failure (e.g. a port already in use).
pub fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), std::env::vars(), &args.overrides()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("switchyard-server: {err}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        match serde_yaml::to_string(&config.redacted()) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("switchyard-server: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    // rustls (TLS to Redis) needs a process-wide crypto provider; ring is the one we build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("switchyard-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let tracing = init_logging(&config)?;
        let result = run(config).await;
        if let Some(tracing) = tracing {
            // Flushing blocks; off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("switchyard-server: {err:#}");
            // Every configuration error exits 2, naming its setting, whether
            // found while loading or only at startup.
            if err.downcast_ref::<crate::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // The state first: a setting only startup can check (a key file, a
    // certificate) is reported before anything is bound.
    let gateway = Gateway::new(config.clone())?;
    let listeners = Listeners::bind(&config)?;
    let (trigger, stop) = watch::channel(Stop::Running);
    tokio::spawn(async move {
        // SIGTERM drains, SIGINT stops now; a second signal always stops now.
        let first = wait_for_signal().await;
        let _ = trigger.send(first);
        if first == Stop::Drain {
            wait_for_signal().await;
            let _ = trigger.send(Stop::Now);
        }
    });
    serve(gateway, listeners, stop).await
}

/// Resolves on SIGTERM (drain) or SIGINT (now).
async fn wait_for_signal() -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM received: draining");
            Stop::Drain
        }
        _ = int.recv() => {
            tracing::info!("SIGINT received: closing now");
            Stop::Now
        }
    }
}
