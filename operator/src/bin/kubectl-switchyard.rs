//! `kubectl switchyard`: a kubectl plugin (any `kubectl-*` binary on PATH is
//! one) for ConnectionService rollouts: status, promote, abort.

use clap::Parser;

/// Follow and steer Switchyard rollouts.
#[derive(Debug, Parser)]
#[command(name = "kubectl switchyard", version)]
struct Args {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: switchyard_operator::plugin::Command,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match switchyard_operator::plugin::run(args.namespace, args.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
