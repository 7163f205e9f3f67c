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

/// `tests/packaging/verify.py --cluster`: the chart with every option,
/// rendered as `helm install --dry-run=server` renders it against the
/// emulator, with the monitors `present` or `absent`, and every pod
/// selector in it evaluated against the operator's pods. The checks'
/// output when they fail.
fn verify_on_cluster(kubeconfig: &Path, monitors: &str) -> Result<(), String> {
    let output = switchyard_tests::verify_py(&[
        "--cluster".as_ref(),
        kubeconfig.as_os_str(),
        "--monitors".as_ref(),
        monitors.as_ref(),
    ]);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Issue 19, defect 11: with `podMonitor.enabled` and
/// `serviceMonitor.enabled`, the chart renders a PodMonitor and a
/// ServiceMonitor only on a cluster that serves the Prometheus Operator's
/// API (`.Capabilities.APIVersions`, from the API server's discovery), so an
/// install on a cluster without it does not fail on "no matches for kind".
/// (Before: both were rendered whatever the cluster had.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_renders_monitors_only_where_the_prometheus_operator_api_exists() {
    let emu = Emulator::start().await.expect("emulator");
    let kubeconfig = emu.kubeconfig("switchyard").expect("kubeconfig");
    // The chart's own CRD, as `helm install` creates it from crds/ first.
    emu.create(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "",
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../charts/switchyard/crds/connectionservices.yaml"),
        )
        .expect("the chart's CRD"),
    )
    .expect("crd");
    verify_on_cluster(&kubeconfig, "absent").expect("without the Prometheus Operator");
    let shown =
        verify_on_cluster(&kubeconfig, "present").expect_err("the checker sees them missing");
    assert!(
        shown.contains("0 PodMonitors where the Prometheus Operator's API is served"),
        "{shown}"
    );
    emu.serve_prometheus_operator_api()
        .expect("the Prometheus Operator's CRDs");
    verify_on_cluster(&kubeconfig, "present").expect("with the Prometheus Operator");
}

/// The gateway's admin token in the NetworkPolicy test.
const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// `GET path` (with the admin token) through `service` from the source
/// address `from` (as the
/// pod with that IP would send it): the status, or `None` when the
/// connection was closed without an answer (refused).
async fn reach(service: std::net::SocketAddr, from: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket
        .bind(std::net::SocketAddr::new(from.parse().ok()?, 0))
        .ok()?;
    let mut stream = socket.connect(service).await.ok()?;
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: {service}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .ok()?;
    let mut head = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut head),
    )
    .await;
    read.ok()?.ok()?;
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Issue 19: the emulator's network enforces NetworkPolicy ingress by the
/// connecting pod's IP, so the chart's policy is tested by connections
/// that are refused: a gateway's admin port takes the operator's pod (in
/// the release namespace) and pods of its own namespace labelled
/// `switchyard.dev/admin-client: "true"`, and refuses any other pod, the
/// same label in another namespace, and everything outside the pod
/// network; the public port takes everyone. Without the policy, the admin
/// port is open again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_network_policy_is_enforced_on_the_admin_port() {
    use std::time::{Duration, Instant};

    let emu = Emulator::start().await.expect("emulator");
    let chart = switchyard_tests::chart_objects(
        &json!({"networkPolicy": {"enabled": true, "namespaces": ["prod"]}}),
    );
    let policy = chart
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("the chart's NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], "prod");
    emu.create(
        "networking.k8s.io",
        "networkpolicies",
        "prod",
        &policy.to_string(),
    )
    .expect("policy");
    let operator_labels = chart
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the operator's Deployment")["spec"]["template"]["metadata"]["labels"]
        .clone();
    // Pods that only open connections: their IPs are who they are.
    for (namespace, name, labels, ip) in [
        ("switchyard", "operator", operator_labels, "127.0.0.251"),
        (
            "prod",
            "publisher",
            json!({"switchyard.dev/admin-client": "true"}),
            "127.0.0.252",
        ),
        ("prod", "intruder", json!({"app": "web"}), "127.0.0.253"),
        (
            "other",
            "publisher",
            json!({"switchyard.dev/admin-client": "true"}),
            "127.0.0.254",
        ),
    ] {
        emu.create(
            "",
            "pods",
            namespace,
            &json!({"metadata": {"name": name, "labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
            .to_string(),
        )
        .expect("pod");
        emu.patch_status(
            "",
            "pods",
            namespace,
            name,
            &json!({"status": {"phase": "Running", "podIP": ip}}),
        )
        .expect("pod ip");
    }
    // A gateway pod as the operator labels them, and its two ports behind
    // Services.
    let gateway_labels = json!({"app.kubernetes.io/name": "switchyard",
        "app.kubernetes.io/instance": "chat", "switchyard.dev/color": "blue"});
    emu.create("apps", "deployments", "prod", &json!({
        "metadata": {"name": "chat-blue"},
        "spec": {"replicas": 1, "selector": {"matchLabels": gateway_labels},
                 "template": {"metadata": {"labels": gateway_labels}, "spec": {
                     "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "gateway", "image": "switchyard/gateway:1",
                         "env": [
                             {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                             {"name": "SWITCHYARD_LISTEN", "value": "$(POD_IP):8080"},
                             {"name": "SWITCHYARD_ADMIN_LISTEN", "value": "$(POD_IP):9090"},
                             {"name": "SWITCHYARD_ADMIN__TOKEN", "value": ADMIN_TOKEN}],
                         "ports": [{"name": "http", "containerPort": 8080},
                                   {"name": "admin", "containerPort": 9090}],
                         "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}}]}}}
    }).to_string()).expect("deployment");
    for (name, target, port) in [("chat", "http", 80), ("chat-admin", "admin", 9090)] {
        emu.create("", "services", "prod", &json!({"metadata": {"name": name},
            "spec": {"selector": gateway_labels, "ports": [{"name": target, "port": port, "targetPort": target}]}})
            .to_string())
            .expect("service");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (public, admin) = loop {
        let found = (
            emu.cluster.service_addr("prod", "chat"),
            emu.cluster.service_addr("prod", "chat-admin"),
        );
        if let (Some(public), Some(admin)) = found {
            if reach(admin, "127.0.0.251", "/admin/status").await.is_some() {
                break (public, admin);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never came up behind its Services"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_eq!(
        reach(admin, "127.0.0.251", "/admin/status").await,
        Some(200),
        "the operator reaches it"
    );
    assert_eq!(
        reach(admin, "127.0.0.252", "/admin/status").await,
        Some(200),
        "an admin client here reaches it"
    );
    assert_eq!(
        reach(admin, "127.0.0.253", "/admin/status").await,
        None,
        "another pod is refused"
    );
    assert_eq!(
        reach(admin, "127.0.0.254", "/admin/status").await,
        None,
        "an admin client elsewhere is refused"
    );
    assert_eq!(
        reach(admin, "127.0.0.1", "/admin/status").await,
        None,
        "outside the pod network: refused"
    );
    assert_eq!(
        reach(public, "127.0.0.253", "/readyz").await,
        Some(200),
        "the public port is open"
    );
    let proxy = emu
        .cluster
        .service_proxy("prod", "chat-admin")
        .expect("proxy");
    assert_eq!(proxy.refused(), 3);

    emu.store
        .delete(
            &emu.kind("networking.k8s.io", "networkpolicies")
                .expect("kind"),
            "prod",
            policy["metadata"]["name"].as_str().expect("name"),
        )
        .expect("delete the policy");
    assert_eq!(
        reach(admin, "127.0.0.253", "/admin/status").await,
        Some(200),
        "no policy, no refusal"
    );
}
