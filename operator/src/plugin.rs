//! `kubectl switchyard`: status (with a live progress bar while a rollout
//! moves), promote and abort. Rendering is a pure function of the resource;
//! the commands are thin calls to the API server.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::crd::{Color, ConnectionService, Phase, ABORT_ANNOTATION, PROMOTE_ANNOTATION};

/// A bar of `width` cells, `done` of `total` filled.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "█".repeat(filled), "░".repeat(width - filled))
}

fn percent(done: u64, total: u64) -> u64 {
    (done.min(total) * 100).checked_div(total).unwrap_or(100)
}

/// The status as `kubectl switchyard status` prints it.
pub fn render(cs: &ConnectionService, now: Timestamp) -> String {
    let status = cs.status.clone().unwrap_or_default();
    let mut out = String::new();
    let phase = status.phase.map_or("Pending", Phase::as_str);
    let _ = writeln!(
        out,
        "{} ({})  phase {}  active {} ({})",
        cs.name_any(),
        cs.namespace().unwrap_or_default(),
        phase,
        status.active_color.map_or("-", Color::as_str),
        status.active_revision.as_deref().unwrap_or("-"),
    );
    for color in [Color::Blue, Color::Green] {
        let marker = if status.active_color == Some(color) {
            "▶"
        } else {
            " "
        };
        let _ = writeln!(
            out,
            "  {marker} {:<5} {:>8} connections",
            color.as_str(),
            status.connections.get(color)
        );
    }
    if let Some(rollout) = &status.rollout {
        let moving = matches!(
            status.phase,
            Some(Phase::Progressing | Phase::Switching | Phase::Draining)
        );
        let elapsed = (now.as_second() - rollout.started.0.as_second()).max(0);
        let label = if moving { "rollout" } else { "last rollout" };
        let _ = writeln!(
            out,
            "  {label}: {} {} → {} {}{}",
            rollout.from_color,
            rollout.from_revision,
            rollout.to_color,
            rollout.to_revision,
            if moving {
                format!(", {elapsed}s so far")
            } else {
                String::new()
            }
        );
        if rollout.drain_started.is_some() {
            let _ = writeln!(
                out,
                "  drain {} {:>3}%  {} of {} moved, {} remain",
                progress_bar(rollout.drained, rollout.total, 30),
                percent(rollout.drained, rollout.total),
                rollout.drained,
                rollout.total,
                rollout.remaining
            );
        }
    }
    if !status.conditions.is_empty() {
        let conditions: Vec<String> = status
            .conditions
            .iter()
            .map(|c| format!("{}={}({})", c.type_, c.status, c.reason))
            .collect();
        let _ = writeln!(out, "  {}", conditions.join("  "));
    }
    if let Some(message) = &status.message {
        let _ = writeln!(out, "  {message}");
    }
    out
}

fn moving(cs: &ConnectionService) -> bool {
    matches!(
        cs.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Progressing | Phase::Switching | Phase::Draining)
    )
}

/// Prints the status; while a rollout moves (and unless `once`), redraws it
/// every `interval` until it settles or `timeout` passes.
pub async fn status(
    api: &Api<ConnectionService>,
    name: &str,
    once: bool,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut previous = String::new();
    loop {
        let cs = api
            .get(name)
            .await
            .with_context(|| format!("reading ConnectionService {name}"))?;
        let text = render(&cs, Timestamp::now());
        let mut stdout = std::io::stdout().lock();
        if terminal && !previous.is_empty() {
            // Redraw in place: up over the previous rendering, clear below.
            write!(stdout, "\x1b[{}A\x1b[J", previous.lines().count())?;
        }
        if terminal || text != previous {
            write!(stdout, "{text}")?;
            if !terminal && moving(&cs) {
                writeln!(stdout)?;
            }
            stdout.flush()?;
        }
        drop(stdout);
        previous = text;
        if once || !moving(&cs) || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

/// Sets the promote or abort annotation (the operator acts and removes it).
pub async fn annotate(api: &Api<ConnectionService>, name: &str, key: &str) -> anyhow::Result<()> {
    let patch = json!({ "metadata": { "annotations": { key: Timestamp::now().to_string() } } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("annotating ConnectionService {name}"))?;
    Ok(())
}

/// The plugin's commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show phase, connections per color and rollout progress; follows a
    /// running rollout with a live progress bar.
    Status {
        /// The ConnectionService.
        name: String,
        /// Print once and exit, even while a rollout moves.
        #[arg(long)]
        once: bool,
        /// Stop following after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_seconds: u64,
    },
    /// Promote a rollout waiting for approval (autoPromote: false).
    Promote {
        /// The ConnectionService.
        name: String,
    },
    /// Abort the running rollout: drains cancelled, Service back on the old color.
    Abort {
        /// The ConnectionService.
        name: String,
    },
}

/// Follow and steer Switchyard rollouts.
#[derive(Debug, clap::Parser)]
#[command(name = "kubectl switchyard", version)]
pub struct Args {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The plugin's entry point: parses arguments, runs, maps errors to exit 1.
pub fn main() -> std::process::ExitCode {
    let args = <Args as clap::Parser>::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.namespace, args.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one command against the kubeconfig's cluster.
pub async fn run(namespace: Option<String>, command: Command) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig)")?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<ConnectionService> = Api::namespaced(client, &namespace);
    match command {
        Command::Status {
            name,
            once,
            timeout_seconds,
        } => {
            status(
                &api,
                &name,
                once,
                Duration::from_secs(1),
                Duration::from_secs(timeout_seconds),
            )
            .await
        }
        Command::Promote { name } => {
            annotate(&api, &name, PROMOTE_ANNOTATION).await?;
            println!("{name}: promote requested");
            Ok(())
        }
        Command::Abort { name } => {
            annotate(&api, &name, ABORT_ANNOTATION).await?;
            println!("{name}: abort requested");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ColorConnections, ConnectionServiceStatus, RolloutProgress};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn bars() {
        let table = [
            (0, 10, 10, "[░░░░░░░░░░]"),
            (5, 10, 10, "[█████░░░░░]"),
            (10, 10, 10, "[██████████]"),
            (12, 10, 10, "[██████████]"),
            (0, 0, 4, "[████]"),
            (1, 3, 3, "[█░░]"),
        ];
        for (done, total, width, expected) in table {
            assert_eq!(progress_bar(done, total, width), expected, "{done}/{total}");
        }
    }

    /// A refused reconcile shows in the plugin as it does in the status:
    /// the Degraded condition's reason and the server's message.
    #[test]
    fn renders_a_refused_reconcile() {
        let t = Timestamp::from_second(1_800_000_000).expect("timestamp");
        let spec = serde_json::from_value(json!({"image": "gw:2"})).expect("spec");
        let mut cs = ConnectionService::new("chat", spec);
        cs.metadata.namespace = Some("prod".into());
        let message = "reconcile failed: applying Deployment chat-blue: ApiError: Deployment.apps \"chat-blue\" is invalid: spec.template.spec.containers[0].env[9].name: Invalid value: \"BAD=NAME\"";
        cs.status = Some(ConnectionServiceStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Degraded".into(),
                status: "True".into(),
                reason: "ReconcileFailed".into(),
                message: message.into(),
                last_transition_time: Time(t),
                observed_generation: Some(1),
            }],
            message: Some(message.into()),
            ..ConnectionServiceStatus::default()
        });
        let text = render(&cs, t);
        assert!(text.contains("Degraded=True(ReconcileFailed)"), "{text}");
        assert!(text.contains(message), "{text}");
    }

    #[test]
    fn renders_a_draining_rollout() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).expect("timestamp");
        let spec = serde_json::from_value(json!({"image": "gw:2"})).expect("spec");
        let mut cs = ConnectionService::new("chat", spec);
        cs.metadata.namespace = Some("prod".into());
        cs.status = Some(ConnectionServiceStatus {
            phase: Some(Phase::Draining),
            active_color: Some(Color::Green),
            active_revision: Some("r2".into()),
            connections: ColorConnections {
                blue: 240,
                green: 260,
            },
            rollout: Some(RolloutProgress {
                from_color: Color::Blue,
                from_revision: "r1".into(),
                to_color: Color::Green,
                to_revision: "r2".into(),
                started: Time(t(0)),
                phase_since: Time(t(20)),
                drain_started: Some(Time(t(20))),
                drained_at: None,
                total: 500,
                drained: 260,
                remaining: 240,
                unready_since: None,
                aborting: None,
                traffic_moved: None,
                traffic_waiting_since: None,
            }),
            message: Some("draining blue: 260 of 500 connections moved, 240 remain".into()),
            ..ConnectionServiceStatus::default()
        });
        let text = render(&cs, t(35));
        let expected = "\
chat (prod)  phase Draining  active green (r2)
    blue       240 connections
  ▶ green      260 connections
  rollout: blue r1 → green r2, 35s so far
  drain [███████████████░░░░░░░░░░░░░░░]  52%  260 of 500 moved, 240 remain
  draining blue: 260 of 500 connections moved, 240 remain
";
        assert_eq!(text, expected);
        assert!(moving(&cs));
    }
}
