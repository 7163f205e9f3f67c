//! The operator binary: `run` (the default) starts the controller with
//! leader election, metrics and JSON logs; `crd` prints the CRD.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::crd::{crd_yaml, ConnectionService};
use crate::gateway::HttpGatewayAdmin;
use crate::leader::LeaderElector;
use crate::metrics::Metrics;
use crate::reconcile::{error_policy, reconcile, Context};
use crate::resources::{FIELD_MANAGER, MANAGED_BY_LABEL};
use crate::telemetry::{self, LogFormat};

/// Switchyard's Kubernetes operator.
#[derive(Debug, Parser)]
#[command(name = "switchyard-operator", version)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the ConnectionService CRD as YAML.
    Crd,
    /// Print, as YAML, every object the operator would apply for the
    /// ConnectionService in FILE (both colors), without a cluster.
    Render {
        /// The ConnectionService (YAML); `-` for standard input.
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
}

/// Settings of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Address of /metrics and /healthz. Without it: every address on
    /// `--metrics-port`, IPv6 and IPv4 (`[::]`, or `0.0.0.0` where the host
    /// has no IPv6), so kubelet probes reach it on IPv4, IPv6 and
    /// dual-stack pods.
    #[arg(long, env = "SWITCHYARD_OPERATOR_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Port of /metrics and /healthz when `--metrics-addr` is not given.
    #[arg(long, env = "SWITCHYARD_OPERATOR_METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SWITCHYARD_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader-election Lease (default: POD_NAMESPACE, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "switchyard-operator")]
    lease_name: String,
    /// Seconds a leader holds the Lease without renewing it.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Run without leader election (a single replica, or local development).
    #[arg(long)]
    no_leader_election: bool,
    /// Timeout of each call to a gateway's admin API, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    admin_timeout_ms: u64,
    /// Log format.
    #[arg(
        long,
        env = "SWITCHYARD_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
}

/// Parses arguments and runs. Exit codes: 0 after a clean shutdown, 1 on an
/// error or a lost leader Lease (the pod restarts and campaigns again).
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", crd_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    if let Some(Command::Render { file }) = &args.command {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(file)
        };
        let rendered = text
            .map_err(|e| format!("reading {}: {e}", file.display()))
            .and_then(|text| crate::render::parse(&text).map_err(|e| e.to_string()))
            .map(|cs| crate::render::render(&cs));
        return match rendered {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let tracing = telemetry::init(args.run.log_format)?;
        let result = run(args.run).await;
        if let Some(tracing) = tracing {
            // Flushing blocks; off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            error!(error = format!("{err:#}"), "operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

async fn until_true(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

/// The metrics listener: `addr`, or every address on `port` — `[::]`
/// (dual-stack on Linux: IPv4 clients arrive as IPv4-mapped), else
/// `0.0.0.0` on a host without IPv6.
async fn bind_metrics(
    addr: Option<SocketAddr>,
    port: u16,
) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(addr) = addr {
        return tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"));
    }
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match tokio::net::TcpListener::bind(any6).await {
        Ok(listener) => Ok(listener),
        Err(err) => {
            let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            warn!(error = %err, "no IPv6 here; metrics on IPv4 only");
            tokio::net::TcpListener::bind(any4)
                .await
                .with_context(|| format!("binding {any4}"))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("registering metrics")?;
    let listener = bind_metrics(args.metrics_addr, args.metrics_port).await?;
    info!(addr = %listener.local_addr()?, "metrics listening");
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(crate::serve::serve(
        listener,
        metrics.clone(),
        until_true(stopped.clone()),
    ));
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;

    let elector = if args.no_leader_election {
        None
    } else {
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("switchyard-operator-{}", std::process::id()));
        let elector = Arc::new(LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &namespace),
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_seconds),
        ));
        let acquired = tokio::select! {
            at = elector.acquire() => at,
            _ = shutdown_signal() => return Ok(()),
        };
        Some((elector, acquired))
    };
    metrics.set_leader(true);

    let (lost_tx, lost) = watch::channel(false);
    if let Some((elector, acquired)) = elector.clone() {
        tokio::spawn(async move {
            elector.hold(acquired).await;
            let _ = lost_tx.send(true);
        });
    }
    {
        let stop = stop.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => info!("shutting down"),
                _ = until_true(lost) => warn!("leadership lost; stopping"),
            }
            let _ = stop.send(true);
        });
    }

    let (resources, deployments) = match &args.watch_namespace {
        Some(ns) => (
            Api::<ConnectionService>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let admin = Arc::new(HttpGatewayAdmin::new(Duration::from_millis(
        args.admin_timeout_ms,
    )));
    let context = Arc::new(Context::new(client, admin, metrics.clone()));
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}"));
    // Debounce: the operator's own status writes trigger a reconcile; without
    // it a drain (whose counts change constantly) would poll the gateways in
    // a tight loop instead of about once a second.
    let config = ControllerConfig::default().debounce(Duration::from_secs(1));
    let forget = metrics.clone();
    let controller = Controller::new(resources, watcher::Config::default())
        .owns(deployments, owned)
        .with_config(config)
        .graceful_shutdown_on(until_true(stopped))
        .run(reconcile, error_policy, context)
        .for_each(move |result| {
            match result {
                // A deleted resource is not reconciled again; the garbage
                // collection of its Deployments asks for it once more, and
                // its metric series go then (they would stay at their last
                // values until a restart).
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    if let Some(namespace) = &object.namespace {
                        forget.forget(namespace, &object.name);
                    }
                }
                Err(err) => warn!(error = %err, "controller event"),
                Ok(_) => {}
            }
            std::future::ready(())
        });
    // On SIGTERM the controller finishes its reconciles. A lost Lease
    // drops it at once, cancelling reconciles in flight: another replica
    // may take over a third of a lease later, and a graceful shutdown can
    // hang on the very API server that stopped answering.
    tokio::select! {
        () = controller => {}
        () = until_true(lost.clone()) => {}
    }

    metrics.set_leader(false);
    if *lost.borrow() {
        anyhow::bail!("leader Lease lost");
    }
    if let Some((elector, _)) = elector {
        elector.release().await;
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19, defect 3: the operator's listener bound 0.0.0.0, which an
    /// IPv6-only kubelet's probes cannot reach. By default it now answers on
    /// IPv6 and IPv4 alike.
    #[tokio::test]
    async fn by_default_metrics_answer_on_ipv6_and_ipv4() {
        let listener = bind_metrics(None, 0).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(listener.local_addr().expect("addr").is_ipv6());
        for target in [
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
        ] {
            let connect = tokio::net::TcpStream::connect(target);
            let (connected, accepted) = tokio::join!(connect, listener.accept());
            connected.unwrap_or_else(|e| panic!("{target}: {e}"));
            accepted.expect("accepted");
        }
        let explicit = bind_metrics(Some("127.0.0.1:0".parse().expect("addr")), 9)
            .await
            .expect("bind");
        assert!(explicit.local_addr().expect("addr").is_ipv4());
    }
}
