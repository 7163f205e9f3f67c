//! A real Prometheus (Debian's package) configured the way the Prometheus
//! Operator configures one from PodMonitors and ServiceMonitors, discovering
//! the emulator's pods and Services the way Kubernetes service discovery
//! does.
//!
//! - [`scrape_configs`] turns each monitor endpoint into the scrape job the
//!   operator generates (`pkg/prometheus/promcfg.go`, as its golden files
//!   show it): the selector as `keep` rules on the discovered labels, the
//!   port `keep`, the `namespace`, `pod`, `container`, `service`, `job` and
//!   `endpoint` target labels, then the monitor's own `relabelings`,
//!   `honorLabels`, path and interval.
//! - [`discover`] gives the targets `kubernetes_sd_configs` would find
//!   (roles `pod` and `endpoints`), with their `__meta_kubernetes_*`
//!   labels as Prometheus documents them.
//!
//! One substitution, because Debian builds Prometheus without Kubernetes
//! discovery ("field kubernetes_sd_configs not found"): each job reads its
//! targets from a file ([`Prometheus::discover`] keeps it current) through
//! `file_sd_configs`. Everything after discovery (relabeling, keeping and
//! dropping targets, label collisions and `honor_labels`) is Prometheus's
//! own, so a label problem the chart's monitors create shows here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// The discovery role of a generated job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A PodMonitor's: every container port of every pod.
    Pod,
    /// A ServiceMonitor's: every address and port of every Service's
    /// endpoints.
    Endpoints,
}

/// One scrape job the operator generated: what it discovers.
#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    pub role: Role,
    /// `None`: every namespace (`namespaceSelector: {any: true}`).
    pub namespaces: Option<Vec<String>>,
}

impl Job {
    fn watches(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == namespace))
    }
}

/// Prometheus's `SanitizeLabelName`: every character outside
/// `[a-zA-Z0-9_]` becomes `_`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn relabel(pairs: &[(&str, Value)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

/// A label selector as the operator writes it: `keep`/`drop` rules on the
/// discovered `<prefix>_<label>` and `<prefix>present_<label>` labels.
fn selector_rules(selector: &Value, prefix: &str) -> Result<Vec<Value>> {
    let mut rules = Vec::new();
    let sources = |key: &str| {
        json!([
            format!("{prefix}_{}", sanitize(key)),
            format!("{prefix}present_{}", sanitize(key))
        ])
    };
    // matchLabels in key order, as the operator sorts them.
    let mut labels: Vec<_> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .collect();
    labels.sort_by_key(|(key, _)| key.as_str());
    for (key, value) in labels {
        let value = value.as_str().context("a matchLabels value")?;
        rules.push(relabel(&[
            ("action", json!("keep")),
            ("source_labels", sources(key)),
            ("regex", json!(format!("({value});true"))),
        ]));
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().context("matchExpressions key")?;
        let values = crate::kube::selector::strings(&expression["values"]);
        let present = json!([format!("{prefix}present_{}", sanitize(key))]);
        let rule = match expression["operator"].as_str() {
            Some("In") => [
                ("action", json!("keep")),
                ("source_labels", sources(key)),
                ("regex", json!(format!("({});true", values.join("|")))),
            ],
            Some("NotIn") => [
                ("action", json!("drop")),
                ("source_labels", sources(key)),
                ("regex", json!(format!("({});true", values.join("|")))),
            ],
            Some("Exists") => [
                ("action", json!("keep")),
                ("source_labels", present),
                ("regex", json!("true")),
            ],
            Some("DoesNotExist") => [
                ("action", json!("drop")),
                ("source_labels", present),
                ("regex", json!("true")),
            ],
            other => bail!("matchExpressions operator {other:?}"),
        };
        rules.push(relabel(&rule));
    }
    Ok(rules)
}

/// A monitor's `relabelings` / `metricRelabelings` entry in Prometheus's
/// spelling.
fn relabel_config(rule: &Value) -> Result<Value> {
    let mut out = Map::new();
    for (key, value) in rule.as_object().context("a relabeling")? {
        let key = match key.as_str() {
            "sourceLabels" => "source_labels",
            "targetLabel" => "target_label",
            "separator" | "regex" | "modulus" | "replacement" => key,
            "action" => {
                out.insert(
                    "action".into(),
                    json!(value.as_str().unwrap_or_default().to_lowercase()),
                );
                continue;
            }
            other => bail!("relabeling field {other} is not generated here"),
        };
        out.insert(key.into(), value.clone());
    }
    Ok(Value::Object(out))
}

/// The operator's sharding rules (one shard: every target kept).
fn shard_rules() -> [Value; 2] {
    [
        relabel(&[
            ("source_labels", json!(["__address__"])),
            ("target_label", json!("__tmp_hash")),
            ("modulus", json!(1)),
            ("action", json!("hashmod")),
        ]),
        relabel(&[
            ("source_labels", json!(["__tmp_hash"])),
            ("regex", json!("0")),
            ("action", json!("keep")),
        ]),
    ]
}

fn copy(from: &str, to: &str) -> Value {
    relabel(&[
        ("source_labels", json!([from])),
        ("target_label", json!(to)),
    ])
}

fn set(label: &str, value: &str) -> Value {
    relabel(&[
        ("target_label", json!(label)),
        ("replacement", json!(value)),
    ])
}

/// The scrape jobs the Prometheus Operator generates for `monitor` (a
/// PodMonitor or ServiceMonitor object), one per endpoint, each with the
/// file its targets are read from under `dir`.
pub fn scrape_configs(monitor: &Value, dir: &Path) -> Result<Vec<(Job, Value)>> {
    let kind = monitor["kind"].as_str().unwrap_or_default();
    let namespace = monitor["metadata"]["namespace"]
        .as_str()
        .context("the monitor's namespace")?;
    let name = monitor["metadata"]["name"]
        .as_str()
        .context("the monitor's name")?;
    let spec = &monitor["spec"];
    let (role, endpoints_key, prefix, job_prefix) = match kind {
        "PodMonitor" => (
            Role::Pod,
            "podMetricsEndpoints",
            "__meta_kubernetes_pod_label",
            "podMonitor",
        ),
        "ServiceMonitor" => (
            Role::Endpoints,
            "endpoints",
            "__meta_kubernetes_service_label",
            "serviceMonitor",
        ),
        other => bail!("{other} is not a monitor"),
    };
    let selector = &spec["namespaceSelector"];
    let namespaces = if selector["any"] == true {
        None
    } else if let Some(names) = selector["matchNames"].as_array() {
        Some(
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect(),
        )
    } else {
        Some(vec![namespace.to_string()])
    };
    let mut jobs = Vec::new();
    for (index, endpoint) in spec[endpoints_key]
        .as_array()
        .context("the monitor's endpoints")?
        .iter()
        .enumerate()
    {
        let job_name = format!("{job_prefix}/{namespace}/{name}/{index}");
        let port = endpoint["port"]
            .as_str()
            .context("only named ports (`port`) are generated here")?;
        let mut rules = vec![copy("job", "__tmp_prometheus_job_name")];
        if role == Role::Pod {
            rules.push(relabel(&[
                ("action", json!("drop")),
                ("source_labels", json!(["__meta_kubernetes_pod_phase"])),
                ("regex", json!("(Failed|Succeeded)")),
            ]));
        }
        rules.extend(selector_rules(&spec["selector"], prefix)?);
        let port_label = match role {
            Role::Pod => "__meta_kubernetes_pod_container_port_name",
            Role::Endpoints => "__meta_kubernetes_endpoint_port_name",
        };
        rules.push(relabel(&[
            ("action", json!("keep")),
            ("source_labels", json!([port_label])),
            ("regex", json!(port)),
        ]));
        match role {
            Role::Pod => {
                rules.push(copy("__meta_kubernetes_namespace", "namespace"));
                rules.push(copy("__meta_kubernetes_pod_container_name", "container"));
                rules.push(copy("__meta_kubernetes_pod_name", "pod"));
            }
            Role::Endpoints => {
                for (kind, label) in [("Node", "node"), ("Pod", "pod")] {
                    rules.push(relabel(&[
                        (
                            "source_labels",
                            json!([
                                "__meta_kubernetes_endpoint_address_target_kind",
                                "__meta_kubernetes_endpoint_address_target_name"
                            ]),
                        ),
                        ("separator", json!(";")),
                        ("regex", json!(format!("{kind};(.*)"))),
                        ("replacement", json!("${1}")),
                        ("target_label", json!(label)),
                    ]));
                }
                rules.push(copy("__meta_kubernetes_namespace", "namespace"));
                rules.push(copy("__meta_kubernetes_service_name", "service"));
                rules.push(copy("__meta_kubernetes_pod_name", "pod"));
                rules.push(copy("__meta_kubernetes_pod_container_name", "container"));
                rules.push(relabel(&[
                    ("action", json!("drop")),
                    ("source_labels", json!(["__meta_kubernetes_pod_phase"])),
                    ("regex", json!("(Failed|Succeeded)")),
                ]));
            }
        }
        let (target_labels, pod_target_labels) = (
            spec["targetLabels"].as_array(),
            spec["podTargetLabels"].as_array(),
        );
        for (labels, source_prefix) in [
            (target_labels, "__meta_kubernetes_service_label"),
            (pod_target_labels, "__meta_kubernetes_pod_label"),
        ] {
            for label in labels.into_iter().flatten().filter_map(Value::as_str) {
                rules.push(relabel(&[
                    (
                        "source_labels",
                        json!([format!("{source_prefix}_{}", sanitize(label))]),
                    ),
                    ("target_label", json!(sanitize(label))),
                    ("regex", json!("(.+)")),
                    ("replacement", json!("${1}")),
                ]));
            }
        }
        match role {
            Role::Pod => rules.push(set("job", &format!("{namespace}/{name}"))),
            Role::Endpoints => rules.push(relabel(&[
                ("source_labels", json!(["__meta_kubernetes_service_name"])),
                ("target_label", json!("job")),
                ("replacement", json!("${1}")),
            ])),
        }
        if let Some(label) = spec["jobLabel"].as_str() {
            rules.push(relabel(&[
                (
                    "source_labels",
                    json!([format!("{prefix}_{}", sanitize(label))]),
                ),
                ("target_label", json!("job")),
                ("regex", json!("(.+)")),
                ("replacement", json!("${1}")),
            ]));
        }
        rules.push(set("endpoint", port));
        for rule in endpoint["relabelings"].as_array().into_iter().flatten() {
            rules.push(relabel_config(rule)?);
        }
        rules.extend(shard_rules());
        let metric_rules = endpoint["metricRelabelings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(relabel_config)
            .collect::<Result<Vec<_>>>()?;
        let file = dir.join(format!("sd-{}.json", sanitize(&job_name)));
        let mut config = json!({
            "job_name": job_name,
            "honor_labels": endpoint["honorLabels"] == true,
            "file_sd_configs": [{"files": [file], "refresh_interval": "1s"}],
            "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
            "relabel_configs": rules,
        });
        if let Some(interval) = endpoint["interval"].as_str() {
            config["scrape_interval"] = json!(interval);
        }
        if !metric_rules.is_empty() {
            config["metric_relabel_configs"] = json!(metric_rules);
        }
        jobs.push((
            Job {
                name: job_name,
                role,
                namespaces: namespaces.clone(),
            },
            config,
        ));
    }
    Ok(jobs)
}

type Labels = BTreeMap<String, String>;

/// `<prefix>_<name>` and `<prefix>present_<name>` for each label or
/// annotation of an object.
fn object_labels(out: &mut Labels, map: &Value, prefix: &str) {
    for (key, value) in map.as_object().into_iter().flatten() {
        out.insert(
            format!("{prefix}_{}", sanitize(key)),
            value.as_str().unwrap_or_default().to_string(),
        );
        out.insert(format!("{prefix}present_{}", sanitize(key)), "true".into());
    }
}

/// The pod-level labels of the pod role (and of pod targets of the
/// endpoints role).
fn pod_labels(pod: &Value) -> Labels {
    let meta = &pod["metadata"];
    let status = &pod["status"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str())
        .map(str::to_lowercase)
        .unwrap_or_else(|| "unknown".into());
    let mut labels = Labels::from([
        (
            "__meta_kubernetes_namespace".into(),
            text(&meta["namespace"]),
        ),
        ("__meta_kubernetes_pod_name".into(), text(&meta["name"])),
        ("__meta_kubernetes_pod_ip".into(), text(&status["podIP"])),
        ("__meta_kubernetes_pod_ready".into(), ready),
        ("__meta_kubernetes_pod_phase".into(), text(&status["phase"])),
        (
            "__meta_kubernetes_pod_node_name".into(),
            text(&pod["spec"]["nodeName"]),
        ),
        (
            "__meta_kubernetes_pod_host_ip".into(),
            text(&status["hostIP"]),
        ),
        ("__meta_kubernetes_pod_uid".into(), text(&meta["uid"])),
    ]);
    if let Some(owner) = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["controller"] == true)
    {
        labels.insert(
            "__meta_kubernetes_pod_controller_kind".into(),
            text(&owner["kind"]),
        );
        labels.insert(
            "__meta_kubernetes_pod_controller_name".into(),
            text(&owner["name"]),
        );
    }
    object_labels(&mut labels, &meta["labels"], "__meta_kubernetes_pod_label");
    object_labels(
        &mut labels,
        &meta["annotations"],
        "__meta_kubernetes_pod_annotation",
    );
    labels
}

/// The container-level labels of one container port.
fn container_labels(container: &Value, port: &Value, init: bool) -> Labels {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Labels::from([
        (
            "__meta_kubernetes_pod_container_name".into(),
            text(&container["name"]),
        ),
        (
            "__meta_kubernetes_pod_container_image".into(),
            text(&container["image"]),
        ),
        (
            "__meta_kubernetes_pod_container_init".into(),
            init.to_string(),
        ),
        (
            "__meta_kubernetes_pod_container_port_name".into(),
            text(&port["name"]),
        ),
        (
            "__meta_kubernetes_pod_container_port_number".into(),
            port["containerPort"]
                .as_u64()
                .unwrap_or_default()
                .to_string(),
        ),
        (
            "__meta_kubernetes_pod_container_port_protocol".into(),
            port["protocol"].as_str().unwrap_or("TCP").to_string(),
        ),
    ])
}

/// `host:port` as Prometheus joins them (brackets for IPv6).
fn address(ip: &str, port: u64) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Every (container, port, init) of a pod.
fn container_ports(pod: &Value) -> Vec<(&Value, &Value, bool)> {
    let spec = &pod["spec"];
    [("containers", false), ("initContainers", true)]
        .into_iter()
        .flat_map(|(key, init)| {
            spec[key]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(move |c| {
                    c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |p| (c, p, init))
                })
        })
        .collect()
}

/// The address and labels of a target on one container port of the pod at
/// `ip`: `base`, then the container port's labels.
fn port_target(
    ip: &str,
    base: &Labels,
    (container, port, init): (&Value, &Value, bool),
) -> (String, Labels) {
    let mut labels = base.clone();
    labels.extend(container_labels(container, port, init));
    let number = port["containerPort"].as_u64().unwrap_or_default();
    (address(ip, number), labels)
}

fn group((address, labels): (String, Labels)) -> Value {
    json!({"targets": [address], "labels": labels})
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// The targets `kubernetes_sd_configs` finds for `job` among `pods` and
/// `services` (of every namespace), as `file_sd` target groups.
///
/// Pod role: one target per container port of each pod with an IP.
/// Endpoints role: the Endpoints the endpoints controller keeps for each
/// Service with a selector (its pods that have an IP and are not
/// terminating, ready or not, each Service port resolved to the pod's
/// container port), one target per address and port, plus the pods' other
/// container ports without endpoint labels, as Prometheus adds them.
pub fn discover(job: &Job, pods: &[Value], services: &[Value]) -> Vec<Value> {
    let namespace_of = |o: &Value| {
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let has_ip = |p: &&Value| {
        p["status"]["podIP"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty())
    };
    let mut groups = Vec::new();
    match job.role {
        Role::Pod => {
            for pod in pods
                .iter()
                .filter(|p| job.watches(&namespace_of(p)))
                .filter(has_ip)
            {
                let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
                let labels = pod_labels(pod);
                for container_port in container_ports(pod) {
                    groups.push(group(port_target(ip, &labels, container_port)));
                }
            }
        }
        Role::Endpoints => {
            for service in services.iter().filter(|s| job.watches(&namespace_of(s))) {
                let namespace = namespace_of(service);
                let meta = &service["metadata"];
                let mut service_labels = Labels::from([
                    ("__meta_kubernetes_namespace".into(), namespace.clone()),
                    (
                        "__meta_kubernetes_service_name".into(),
                        meta["name"].as_str().unwrap_or_default().to_string(),
                    ),
                    (
                        "__meta_kubernetes_endpoints_name".into(),
                        meta["name"].as_str().unwrap_or_default().to_string(),
                    ),
                ]);
                object_labels(
                    &mut service_labels,
                    &meta["labels"],
                    "__meta_kubernetes_service_label",
                );
                object_labels(
                    &mut service_labels,
                    &meta["labels"],
                    "__meta_kubernetes_endpoints_label",
                );
                object_labels(
                    &mut service_labels,
                    &meta["annotations"],
                    "__meta_kubernetes_service_annotation",
                );
                let selector = &service["spec"]["selector"];
                let members = pods.iter().filter(|p| {
                    namespace_of(p) == namespace
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && !matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded"))
                        && selects(selector, &p["metadata"]["labels"])
                });
                for pod in members.filter(has_ip) {
                    let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
                    let mut labels = service_labels.clone();
                    labels.extend(pod_labels(pod));
                    let ready = labels["__meta_kubernetes_pod_ready"] == "true";
                    let ports = container_ports(pod);
                    let mut covered = Vec::new();
                    for service_port in service["spec"]["ports"].as_array().into_iter().flatten() {
                        let target = &service_port["targetPort"];
                        let found = ports.iter().find(|(_, p, _)| match target {
                            Value::String(name) => p["name"] == *name,
                            Value::Number(_) => p["containerPort"] == *target,
                            _ => p["containerPort"] == service_port["port"],
                        });
                        let Some(&container_port) = found else {
                            continue;
                        };
                        covered.push(container_port.1["containerPort"].clone());
                        let (address, mut target_labels) = port_target(ip, &labels, container_port);
                        target_labels.extend([
                            ("__meta_kubernetes_endpoint_ready".into(), ready.to_string()),
                            (
                                "__meta_kubernetes_endpoint_port_name".into(),
                                service_port["name"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                            ),
                            (
                                "__meta_kubernetes_endpoint_port_protocol".into(),
                                service_port["protocol"]
                                    .as_str()
                                    .unwrap_or("TCP")
                                    .to_string(),
                            ),
                            (
                                "__meta_kubernetes_endpoint_address_target_kind".into(),
                                "Pod".into(),
                            ),
                            (
                                "__meta_kubernetes_endpoint_address_target_name".into(),
                                pod["metadata"]["name"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                            ),
                            (
                                "__meta_kubernetes_endpoint_node_name".into(),
                                pod["spec"]["nodeName"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                            ),
                        ]);
                        groups.push(group((address, target_labels)));
                    }
                    for &container_port in &ports {
                        if !covered.contains(&container_port.1["containerPort"]) {
                            groups.push(group(port_target(ip, &labels, container_port)));
                        }
                    }
                }
            }
        }
    }
    groups
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The Prometheus process, killed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: std::net::SocketAddr,
    jobs: Vec<Job>,
}

impl Prometheus {
    /// Starts Prometheus in `dir` with the jobs of `monitors` (the ones the
    /// Prometheus resource selects), evaluating every second.
    pub fn start(dir: &Path, monitors: &[Value]) -> Result<Prometheus> {
        let mut jobs = Vec::new();
        let mut configs = Vec::new();
        for monitor in monitors {
            for (job, config) in scrape_configs(monitor, dir)? {
                std::fs::write(
                    config["file_sd_configs"][0]["files"][0]
                        .as_str()
                        .context("the job's file")?,
                    "[]",
                )?;
                jobs.push(job);
                configs.push(config);
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // JSON is YAML.
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": configs,
        });
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("prometheus (the test command installs Debian's package)")?;
        let prometheus = Prometheus { child, addr, jobs };
        if !crate::wait_status(addr, "/-/ready", 200, Duration::from_secs(60)) {
            bail!(
                "Prometheus never became ready: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        Ok(prometheus)
    }

    /// The generated jobs.
    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    /// Writes every job's targets for the cluster as `pods` and `services`
    /// (of every namespace) show it now.
    pub fn discover(&self, dir: &Path, pods: &[Value], services: &[Value]) -> Result<()> {
        for job in &self.jobs {
            let file = dir.join(format!("sd-{}.json", sanitize(&job.name)));
            let tmp: PathBuf = file.with_extension("tmp");
            std::fs::write(
                &tmp,
                Value::Array(discover(job, pods, services)).to_string(),
            )?;
            std::fs::rename(tmp, file)?;
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) =
            crate::http_request(self.addr, "GET", path, None).expect("Prometheus's API");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("json")
    }

    /// Every metric name scraped so far.
    pub fn metric_names(&self) -> Vec<String> {
        self.get("/api/v1/label/__name__/values")["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    /// The label sets of every series `matcher` selects over the last
    /// `seconds`.
    pub fn series(&self, matcher: &str, seconds: f64) -> Vec<Value> {
        let now = unix_now();
        self.get(&format!(
            "/api/v1/series?match[]={}&start={:.3}&end={now:.3}",
            encode(matcher),
            now - seconds
        ))["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The active targets: (job, health, labels).
    pub fn targets(&self) -> Vec<Value> {
        self.get("/api/v1/targets?state=active")["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `expr` now.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/query?query={}", encode(expr)))["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `expr` over [start, end] (unix seconds) at a 1 s step: the series
    /// that had a value at any moment of it.
    pub fn query_range(&self, expr: &str, start: f64, end: f64) -> Vec<Value> {
        self.get(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            encode(expr)
        ))["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds since the epoch, as Prometheus's API takes them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str, labels: Value, ready: &str) -> Value {
        json!({
            "metadata": {"namespace": namespace, "name": name, "labels": labels, "uid": "u1",
                "ownerReferences": [{"kind": "ReplicaSet", "name": "rs", "controller": true}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "gateway", "image": "gw:1",
                "ports": [{"name": "ws", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "admin", "containerPort": 9090, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.7", "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": ready}]}
        })
    }

    /// The rules as the operator's golden files show them: selector keeps
    /// on label and labelpresent, the port keep, the target labels, the
    /// monitor's relabelings after them, and the shard rules last.
    #[test]
    fn a_pod_monitor_becomes_the_operators_job() {
        let monitor = json!({"kind": "PodMonitor",
            "metadata": {"namespace": "mon", "name": "gw"},
            "spec": {"namespaceSelector": {"any": true},
                "selector": {"matchLabels": {"app.kubernetes.io/name": "switchyard"},
                    "matchExpressions": [{"key": "switchyard.dev/color", "operator": "In", "values": ["blue", "green"]},
                                         {"key": "canary", "operator": "DoesNotExist"}]},
                "podMetricsEndpoints": [{"port": "ws", "interval": "5s", "relabelings": [
                    {"sourceLabels": ["__meta_kubernetes_pod_label_switchyard_dev_color"], "targetLabel": "color", "action": "Replace"}]}]}});
        let jobs = scrape_configs(&monitor, Path::new("/d")).expect("jobs");
        assert_eq!(jobs.len(), 1);
        let (job, config) = &jobs[0];
        assert_eq!(job.name, "podMonitor/mon/gw/0");
        assert_eq!(job.namespaces, None);
        assert_eq!(config["scrape_interval"], "5s");
        assert_eq!(config["honor_labels"], false);
        let rules = config["relabel_configs"].as_array().expect("rules");
        assert_eq!(
            rules[2],
            json!({"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"], "regex": "(switchyard);true"})
        );
        assert_eq!(rules[3]["regex"], "(blue|green);true");
        assert_eq!(
            rules[4],
            json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_labelpresent_canary"], "regex": "true"})
        );
        assert_eq!(
            rules[5]["source_labels"][0],
            "__meta_kubernetes_pod_container_port_name"
        );
        assert_eq!(
            rules[9],
            json!({"target_label": "job", "replacement": "mon/gw"})
        );
        assert_eq!(
            rules[10],
            json!({"target_label": "endpoint", "replacement": "ws"})
        );
        assert_eq!(
            rules[11],
            json!({"source_labels": ["__meta_kubernetes_pod_label_switchyard_dev_color"], "target_label": "color", "action": "replace"})
        );
        assert_eq!(rules.last().expect("shard")["action"], "keep");
        // A field the generator does not know is refused, not dropped.
        let mut odd = monitor.clone();
        odd["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["sourceLabel"] = json!("x");
        assert!(scrape_configs(&odd, Path::new("/d")).is_err());
    }

    #[test]
    fn pod_discovery_gives_one_target_per_container_port_with_its_labels() {
        let job = Job {
            name: "j".into(),
            role: Role::Pod,
            namespaces: Some(vec!["prod".into()]),
        };
        let pods = [
            pod(
                "prod",
                "chat-blue-1",
                json!({"switchyard.dev/color": "blue"}),
                "True",
            ),
            pod("staging", "chat-blue-2", json!({}), "True"),
        ];
        let groups = discover(&job, &pods, &[]);
        assert_eq!(groups.len(), 2, "{groups:?}");
        let labels = &groups[0]["labels"];
        assert_eq!(groups[0]["targets"][0], "127.0.0.7:8080");
        assert_eq!(
            labels["__meta_kubernetes_pod_label_switchyard_dev_color"],
            "blue"
        );
        assert_eq!(
            labels["__meta_kubernetes_pod_labelpresent_switchyard_dev_color"],
            "true"
        );
        assert_eq!(labels["__meta_kubernetes_pod_container_port_name"], "ws");
        assert_eq!(labels["__meta_kubernetes_pod_ready"], "true");
        assert_eq!(
            labels["__meta_kubernetes_pod_controller_kind"],
            "ReplicaSet"
        );
        assert_eq!(
            groups[1]["labels"]["__meta_kubernetes_pod_container_port_number"],
            "9090"
        );
    }

    #[test]
    fn endpoints_discovery_resolves_named_target_ports() {
        let job = Job {
            name: "j".into(),
            role: Role::Endpoints,
            namespaces: None,
        };
        let pods = [
            pod("prod", "p", json!({"app": "op"}), "False"),
            pod("prod", "q", json!({"app": "other"}), "True"),
        ];
        let services = [
            json!({"metadata": {"namespace": "prod", "name": "op-metrics", "labels": {"app": "op"}},
            "spec": {"selector": {"app": "op"}, "ports": [{"name": "metrics", "port": 80, "targetPort": "admin"}]}}),
        ];
        let groups = discover(&job, &pods, &services);
        // 9090 through the Service's port, 8080 as the pod's other port.
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0]["targets"][0], "127.0.0.7:9090");
        let labels = &groups[0]["labels"];
        assert_eq!(labels["__meta_kubernetes_endpoint_port_name"], "metrics");
        assert_eq!(labels["__meta_kubernetes_endpoint_ready"], "false");
        assert_eq!(labels["__meta_kubernetes_service_label_app"], "op");
        assert_eq!(
            labels["__meta_kubernetes_endpoint_address_target_name"],
            "p"
        );
        assert!(groups[1]["labels"]
            .get("__meta_kubernetes_endpoint_port_name")
            .is_none());
    }
}
