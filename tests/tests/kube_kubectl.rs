//! kubectl against the emulator: `kubectl get csvc` shows the CRD's printer
//! columns (server-side tables), and the `kubectl switchyard` plugin renders
//! the rollout and sets the promote annotation.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use switchyard_tests::kube::Emulator;

fn kubectl(kubeconfig: &Path, path: &str, args: &[&str]) -> String {
    // KUBECONFIG rather than --kubeconfig: kubectl refuses flags before a plugin name.
    let output = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", path)
        .output()
        .expect("kubectl (the test command installs it)");
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A directory holding `kubectl-switchyard`, prepended to PATH.
fn plugin_path(dir: &Path) -> String {
    let bin = dir.join("plugins");
    std::fs::create_dir_all(&bin).expect("plugin dir");
    let plugin = switchyard_tests::gateway_bin().with_file_name("sy-kubectl-switchyard");
    let link: PathBuf = bin.join("kubectl-switchyard");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(plugin, &link).expect("symlink");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_and_the_plugin() {
    let emu = Emulator::start().await.expect("emulator");
    emu.install("prod", "apiVersion: switchyard.dev/v1alpha1\nkind: ConnectionService\nmetadata: {name: chat}\nspec: {image: gw:2}\n")
        .expect("install");
    emu.patch_status(
        "switchyard.dev",
        "connectionservices",
        "prod",
        "chat",
        &json!({"status": {
            "phase": "Draining", "activeColor": "green", "activeRevision": "r2",
            "connections": {"blue": 240, "green": 260},
            "rollout": {"fromColor": "blue", "fromRevision": "r1", "toColor": "green", "toRevision": "r2",
                        "started": "2026-01-01T00:00:00Z", "phaseSince": "2026-01-01T00:00:20Z",
                        "drainStarted": "2026-01-01T00:00:20Z", "total": 500, "drained": 260, "remaining": 240},
            "message": "draining blue: 260 of 500 connections moved, 240 remain"
        }}),
    )
    .expect("status");
    let kubeconfig = emu.kubeconfig("prod").expect("kubeconfig");
    let path = plugin_path(emu.dir());

    let table = kubectl(&kubeconfig, &path, &["get", "csvc"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        words(lines[0]),
        ["NAME", "PHASE", "ACTIVE", "BLUE", "GREEN", "AGE"],
        "{table}"
    );
    assert_eq!(
        words(lines[1])[..5],
        ["chat", "Draining", "green", "240", "260"],
        "{table}"
    );
    let wide = kubectl(
        &kubeconfig,
        &path,
        &["get", "connectionservices", "-o", "wide"],
    );
    assert!(
        words(wide.lines().next().unwrap_or_default()).contains(&"REVISION"),
        "{wide}"
    );
    assert!(
        words(wide.lines().nth(1).unwrap_or_default()).contains(&"r2"),
        "{wide}"
    );

    let status = kubectl(
        &kubeconfig,
        &path,
        &["switchyard", "status", "chat", "--once"],
    );
    assert!(
        status.starts_with("chat (prod)  phase Draining  active green (r2)\n"),
        "{status}"
    );
    assert!(
        status
            .contains("drain [███████████████░░░░░░░░░░░░░░░]  52%  260 of 500 moved, 240 remain"),
        "{status}"
    );

    let promoted = kubectl(&kubeconfig, &path, &["switchyard", "promote", "chat"]);
    assert_eq!(promoted, "chat: promote requested\n");
    let resource = emu
        .get("switchyard.dev", "connectionservices", "prod", "chat")
        .expect("resource");
    assert!(resource["metadata"]["annotations"]["switchyard.dev/promote"].is_string());
}
