//! What the cluster does besides the API: the Deployment and ReplicaSet
//! controllers (a ReplicaSet per pod template, each keeping its replica
//! count of active pods), a kubelet that runs every pod as a real gateway
//! process on its own loopback address, probes its readiness, restarts it
//! when it exits, stops a deleted pod gracefully and can evict one for node
//! pressure, the disruption controller (PodDisruptionBudget status), the
//! EndpointSlice controller (each Service's slice follows the pods its
//! selector matches after a propagation delay), and kube-proxy: a loopback
//! port per Service forwarding new connections to the ready endpoints of
//! its EndpointSlices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::disruption::controller_uid;
use super::selector::Selector;
use super::store::{labels, ResourceType, Store};
use crate::{gateway_bin, ServiceProxy};

/// Loopback addresses handed out as pod IPs, shared by every emulator in
/// the process (tests run in parallel).
static POD_IPS: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

fn allocate_ip() -> Option<u8> {
    let mut used = POD_IPS.lock().expect("ip pool");
    let free = (10..=250u8).find(|x| !used.contains(x))?;
    used.insert(free);
    Some(free)
}

fn release_ip(octet: u8) {
    POD_IPS.lock().expect("ip pool").remove(&octet);
}

/// (namespace, name) of a pod or Service.
type PodKey = (String, String);
/// A Service's proxy and the backends it routes to.
type Routed = (Arc<ServiceProxy>, Vec<SocketAddr>);
/// A readiness probe: port and path.
type Probe = (u16, String);

/// A pod's IP: `127.0.0.N`, or on an IPv6 cluster the same loopback
/// address written as IPv6 (`::ffff:127.0.0.N`, IPv4-mapped), so every
/// place a pod IP is written (`$(POD_IP):8080`, probes, endpoints) meets an
/// IPv6 literal while the traffic stays on loopback.
fn pod_ip(octet: u8, ipv6: bool) -> IpAddr {
    let v4 = Ipv4Addr::new(127, 0, 0, octet);
    if ipv6 {
        IpAddr::V6(v4.to_ipv6_mapped())
    } else {
        IpAddr::V4(v4)
    }
}

/// One pod's gateway process.
struct PodProcess {
    namespace: String,
    name: String,
    octet: u8,
    ipv6: bool,
    child: Option<Child>,
    command: Option<Command>,
    log: PathBuf,
    ready: bool,
    restarts: u32,
    probe: Option<Probe>,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u16>,
    /// Why the container is not running, as a kubelet reports it in
    /// `containerStatuses[].state.waiting` (an image that cannot be pulled;
    /// a process that keeps exiting).
    waiting: Option<(String, String)>,
    /// What the Pod's status says now (ready, waiting): written again only
    /// when it changes.
    reported: Option<(bool, Option<(String, String)>)>,
    /// Deleted: SIGTERM sent, SIGKILL due at this instant.
    terminating: Option<Instant>,
    /// Evicted by the node ([`Cluster::evict_for_node_pressure`]): never
    /// restarted, never probed.
    failed: bool,
    /// How the last process ended (exit code, reason), as
    /// `containerStatuses[].lastState.terminated` says once it restarted.
    last_exit: Option<(i32, &'static str)>,
}

impl PodProcess {
    fn ip(&self) -> IpAddr {
        pod_ip(self.octet, self.ipv6)
    }
}

/// The field managers the cluster's own writes are recorded under, as on
/// a cluster.
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
const KUBELET: &str = "kubelet";

/// The node every emulated pod runs on (`spec.nodeName`).
const NODE_NAME: &str = "emulator-node";

/// Kills a pod's process at once and frees its address (its Pod object
/// is gone).
fn kill_now(mut process: PodProcess) {
    if let Some(mut child) = process.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    release_ip(process.octet);
}

/// The label naming an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long a change of a Service's endpoints takes to reach its
/// EndpointSlice unless a test says otherwise
/// ([`Cluster::set_endpoint_delay`]): the EndpointSlice controller and
/// kube-proxy each take a while on a cluster, so every emulated rollout
/// meets a Service whose traffic moves after its selector.
const ENDPOINT_DELAY: Duration = Duration::from_secs(1);

/// One Service's EndpointSlice as the controller last wrote it, and a
/// change waiting out the propagation delay (since when).
#[derive(Default)]
struct SliceState {
    name: Option<String>,
    published: Value,
    pending: Option<(Instant, Value)>,
}

/// The simulated nodes.
pub struct Cluster {
    store: Arc<Store>,
    dir: PathBuf,
    pods: Mutex<HashMap<PodKey, PodProcess>>,
    services: Mutex<HashMap<PodKey, Routed>>,
    /// Pods get IPv6 addresses ([`Cluster::use_ipv6_pod_ips`]).
    ipv6: std::sync::atomic::AtomicBool,
    /// Images no pod can pull ([`Cluster::refuse_image`]).
    unpullable: Mutex<BTreeSet<String>>,
    slices: Mutex<HashMap<PodKey, SliceState>>,
    endpoint_delay: Mutex<Duration>,
}

fn template_hash(template: &Value) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    format!("{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

fn kind(store: &Store, group: &str, plural: &str) -> ResourceType {
    store
        .resource_type(group, "v1", plural)
        .expect("built-in kind")
}

impl Cluster {
    /// A cluster over `store`, keeping pod files under `dir`.
    pub fn new(store: Arc<Store>, dir: PathBuf) -> Cluster {
        Cluster {
            store,
            dir,
            pods: Mutex::new(HashMap::new()),
            services: Mutex::new(HashMap::new()),
            ipv6: std::sync::atomic::AtomicBool::new(false),
            unpullable: Mutex::new(BTreeSet::new()),
            slices: Mutex::new(HashMap::new()),
            endpoint_delay: Mutex::new(ENDPOINT_DELAY),
        }
    }

    /// How long a change of the pods behind a Service (a new selector, a
    /// pod Ready or gone) takes to reach its EndpointSlice, and so its
    /// proxy: one second unless set.
    pub fn set_endpoint_delay(&self, delay: Duration) {
        *self.endpoint_delay.lock().expect("delay") = delay;
    }

    /// Pods of `image` never start: their container waits in
    /// `ErrImagePull`, as with an image that does not exist.
    pub fn refuse_image(&self, image: &str) {
        self.unpullable
            .lock()
            .expect("images")
            .insert(image.to_owned());
    }

    /// Pods started from now on have IPv6 pod IPs, as on an IPv6 (or
    /// IPv6-first dual-stack) cluster: see [`pod_ip`].
    pub fn use_ipv6_pod_ips(&self) {
        self.ipv6.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where a Service listens, once it has a proxy.
    pub fn service_addr(&self, namespace: &str, name: &str) -> Option<SocketAddr> {
        self.service_proxy(namespace, name).map(|p| p.addr)
    }

    /// A Service's proxy (to look at its open and close times).
    pub fn service_proxy(&self, namespace: &str, name: &str) -> Option<Arc<ServiceProxy>> {
        self.services
            .lock()
            .expect("services")
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(proxy, _)| proxy.clone())
    }

    /// The log file of a pod's process.
    pub fn pod_log(&self, name: &str) -> Option<PathBuf> {
        self.pods
            .lock()
            .expect("pods")
            .values()
            .find(|p| p.name == name)
            .map(|p| p.log.clone())
    }

    /// Kills every process now (the emulator is going away).
    pub fn kill_all(&self) {
        let mut pods = self.pods.lock().expect("pods");
        for (_, mut pod) in pods.drain() {
            if let Some(mut child) = pod.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            release_ip(pod.octet);
        }
    }

    /// Runs the controllers every 200 ms, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(err) = self.tick().await {
                eprintln!("emulator cluster: {err:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn tick(&self) -> Result<()> {
        self.deployments()?;
        self.replica_sets()?;
        self.terminations()?;
        self.kubelet().await?;
        self.disruption_budgets()?;
        self.endpoint_slices()?;
        self.proxies().await?;
        Ok(())
    }

    /// The Deployment controller: each Deployment has one ReplicaSet per
    /// pod template (`NAME-HASH`, labelled with the template's labels and
    /// `pod-template-hash`, owned by it); the current template's gets the
    /// Deployment's replicas, older ones 0 (a changed template replaces
    /// the pods at once). Status follows the ReplicaSets' pods.
    fn deployments(&self) -> Result<()> {
        let deployments = kind(&self.store, "apps", "deployments");
        let sets_kind = kind(&self.store, "apps", "replicasets");
        let (items, _) = self.store.list(&deployments, None, &Selector::default());
        let (sets, _) = self.store.list(&sets_kind, None, &Selector::default());
        for deployment in items {
            let meta = &deployment["metadata"];
            let uid = meta["uid"].as_str().unwrap_or_default();
            let namespace = meta["namespace"].as_str().unwrap_or_default();
            let name = meta["name"].as_str().unwrap_or_default();
            let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1);
            let template = &deployment["spec"]["template"];
            let hash = template_hash(template);
            let current = format!("{name}-{hash}");
            let owned: Vec<&Value> = sets
                .iter()
                .filter(|rs| controller_uid(rs) == Some(uid))
                .collect();
            if !owned
                .iter()
                .any(|rs| rs["metadata"]["name"] == current.as_str())
            {
                let mut labels = template["metadata"]["labels"].clone();
                labels["pod-template-hash"] = json!(hash);
                let mut pod_template = template.clone();
                pod_template["metadata"]["labels"] = labels.clone();
                let rs = json!({
                    "metadata": {"name": current, "labels": labels,
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                            "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                    "spec": {"replicas": replicas,
                             "selector": {"matchLabels": {"pod-template-hash": hash}},
                             "template": pod_template},
                });
                self.store
                    .create(&sets_kind, namespace, rs, Some(CONTROLLER_MANAGER))
                    .map_err(|e| anyhow::anyhow!("creating ReplicaSet {current}: {}", e.message))?;
            }
            for rs in &owned {
                let rs_name = rs["metadata"]["name"].as_str().unwrap_or_default();
                let want = if rs_name == current { replicas } else { 0 };
                if rs["spec"]["replicas"].as_u64() != Some(want) {
                    self.store
                        .merge(
                            &sets_kind,
                            namespace,
                            rs_name,
                            &json!({"spec": {"replicas": want}}),
                            false,
                            CONTROLLER_MANAGER,
                        )
                        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                }
            }
            let count = |rs: &Value, field: &str| rs["status"][field].as_u64().unwrap_or(0);
            let all: u64 = owned.iter().map(|rs| count(rs, "replicas")).sum();
            let updated = owned
                .iter()
                .find(|rs| rs["metadata"]["name"] == current.as_str())
                .map_or((0, 0), |rs| {
                    (count(rs, "replicas"), count(rs, "readyReplicas"))
                });
            let status = json!({"status": {
                "observedGeneration": meta["generation"],
                "replicas": all, "updatedReplicas": updated.0,
                "readyReplicas": updated.1, "availableReplicas": updated.1,
            }});
            self.write_status(&deployments, &deployment, &status)?;
        }
        Ok(())
    }

    /// A controller's status write: only when a field it reports changed
    /// (a no-op write would wake every watcher of the object).
    fn write_status(&self, kind: &ResourceType, object: &Value, status: &Value) -> Result<()> {
        let fields = status["status"].as_object().into_iter().flatten();
        let same = fields
            .filter(|(k, _)| *k != "availableReplicas")
            .all(|(k, v)| object["status"][k.as_str()] == *v);
        if same {
            return Ok(());
        }
        let meta = &object["metadata"];
        self.store
            .merge(
                kind,
                meta["namespace"].as_str().unwrap_or_default(),
                meta["name"].as_str().unwrap_or_default(),
                status,
                true,
                CONTROLLER_MANAGER,
            )
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(())
    }

    /// The ReplicaSet controller: each ReplicaSet keeps `spec.replicas`
    /// active pods (not terminating, not Failed), named `RS-xxxxx` and
    /// owned by it, deleting (gracefully) the newest extra ones; status
    /// counts its active and Ready pods. Processes whose Pod object is gone
    /// (a deletion with grace period 0) are killed.
    fn replica_sets(&self) -> Result<()> {
        let sets_kind = kind(&self.store, "apps", "replicasets");
        let pods_kind = kind(&self.store, "", "pods");
        let (sets, _) = self.store.list(&sets_kind, None, &Selector::default());
        let (pods, _) = self.store.list(&pods_kind, None, &Selector::default());
        let in_store: BTreeSet<(String, String)> = pods
            .iter()
            .map(|p| {
                let meta = &p["metadata"];
                (
                    meta["namespace"].as_str().unwrap_or_default().to_string(),
                    meta["name"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let orphans: Vec<PodKey> = self
            .pods
            .lock()
            .expect("pods")
            .keys()
            .filter(|key| !in_store.contains(*key))
            .cloned()
            .collect();
        for key in orphans {
            if let Some(process) = self.pods.lock().expect("pods").remove(&key) {
                kill_now(process);
            }
        }
        for rs in sets {
            let meta = &rs["metadata"];
            let uid = meta["uid"].as_str().unwrap_or_default();
            let namespace = meta["namespace"].as_str().unwrap_or_default();
            let name = meta["name"].as_str().unwrap_or_default();
            let replicas = rs["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            let mut active: Vec<&Value> = pods
                .iter()
                .filter(|p| controller_uid(p) == Some(uid))
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded")))
                .collect();
            active.sort_by_key(|p| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            });
            for pod in active.iter().skip(replicas) {
                self.delete_pod(pod);
            }
            for _ in active.len()..replicas {
                self.start_pod(&rs, namespace, name)?;
            }
            let ready = {
                let processes = self.pods.lock().expect("pods");
                active
                    .iter()
                    .take(replicas)
                    .filter(|p| {
                        let key = (
                            namespace.to_string(),
                            p["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        );
                        processes.get(&key).is_some_and(|process| process.ready)
                    })
                    .count()
            };
            let status = json!({"status": {"observedGeneration": meta["generation"],
                "replicas": replicas,
                "readyReplicas": ready, "availableReplicas": ready}});
            self.write_status(&sets_kind, &rs, &status)?;
        }
        Ok(())
    }

    /// The disruption controller: every PodDisruptionBudget's status from
    /// the pods it selects ([`super::disruption::budget_status`]).
    fn disruption_budgets(&self) -> Result<()> {
        let budgets_kind = kind(&self.store, "policy", "poddisruptionbudgets");
        let (budgets, _) = self.store.list(&budgets_kind, None, &Selector::default());
        if budgets.is_empty() {
            return Ok(());
        }
        let (pods, _) = self
            .store
            .list(&kind(&self.store, "", "pods"), None, &Selector::default());
        let (sets, _) = self.store.list(
            &kind(&self.store, "apps", "replicasets"),
            None,
            &Selector::default(),
        );
        for budget in budgets {
            let namespace = budget["metadata"]["namespace"].as_str().unwrap_or_default();
            let in_namespace = |o: &&Value| o["metadata"]["namespace"] == namespace;
            let pods: Vec<Value> = pods.iter().filter(in_namespace).cloned().collect();
            let sets: Vec<Value> = sets.iter().filter(in_namespace).cloned().collect();
            let status = super::disruption::budget_status(&budget, &pods, &sets);
            if budget["status"] != status {
                let name = budget["metadata"]["name"].as_str().unwrap_or_default();
                self.store
                    .merge(
                        &budgets_kind,
                        namespace,
                        name,
                        &json!({"status": status}),
                        true,
                        CONTROLLER_MANAGER,
                    )
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            }
        }
        Ok(())
    }

    fn start_pod(&self, rs: &Value, namespace: &str, rs_name: &str) -> Result<()> {
        let template = &rs["spec"]["template"];
        let octet = allocate_ip().context("no free loopback address for a pod")?;
        let ipv6 = self.ipv6.load(std::sync::atomic::Ordering::Relaxed);
        let ip = pod_ip(octet, ipv6);
        let suffix: u32 = rand::random();
        let pod_name = format!("{rs_name}-{:05x}", suffix & 0xfffff);
        let mut spec = template["spec"].clone();
        spec["nodeName"] = json!(NODE_NAME);
        let pod = json!({
            "metadata": {
                "name": pod_name, "labels": template["metadata"]["labels"],
                "annotations": template["metadata"]["annotations"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                    "uid": rs["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": spec,
            "status": {"phase": "Running", "podIP": ip.to_string(), "hostIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "False"}]},
        });
        let pods_kind = kind(&self.store, "", "pods");
        let created = self
            .store
            .create(&pods_kind, namespace, pod, Some(CONTROLLER_MANAGER));
        let created = match created {
            Ok(created) => created,
            Err(err) => {
                release_ip(octet);
                anyhow::bail!("{}", err.message);
            }
        };
        let process = self.prepare(&created, namespace, &pod_name, octet, ipv6)?;
        self.pods
            .lock()
            .expect("pods")
            .insert((namespace.to_string(), pod_name), process);
        Ok(())
    }

    /// Builds the container's command: the gateway binary (whatever the
    /// image), the template's args with mounted paths mapped to files on
    /// disk, and exactly the template's environment.
    fn prepare(
        &self,
        pod: &Value,
        namespace: &str,
        name: &str,
        octet: u8,
        ipv6: bool,
    ) -> Result<PodProcess> {
        let spec = &pod["spec"];
        let container = &spec["containers"][0];
        let root = self.dir.join(namespace).join(name);
        std::fs::create_dir_all(&root)?;
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume_name = mount["name"].as_str().unwrap_or_default();
            let mount_path = mount["mountPath"].as_str().unwrap_or_default();
            let volume = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == volume_name)
                .with_context(|| format!("volume {volume_name} not in the pod"))?;
            let config_map = volume["configMap"]["name"].as_str().with_context(|| {
                format!("volume {volume_name}: only configMap volumes are emulated")
            })?;
            let maps = kind(&self.store, "", "configmaps");
            let data = self
                .store
                .get(&maps, namespace, config_map)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let local = root.join(mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&local)?;
            for (key, value) in data["data"].as_object().into_iter().flatten() {
                std::fs::write(local.join(key), value.as_str().unwrap_or_default())?;
            }
            mounts.push((mount_path.to_string(), local));
        }
        let env = self.environment(pod, container, namespace, pod_ip(octet, ipv6))?;
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .map(|arg| {
                mounts
                    .iter()
                    .find(|(path, _)| arg.starts_with(path.as_str()))
                    .map_or(arg.to_string(), |(path, local)| {
                        format!("{}{}", local.display(), &arg[path.len()..])
                    })
            })
            .collect();
        let log = root.join("gateway.log");
        let mut command = Command::new(gateway_bin());
        command
            .args(&args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null());
        command.env("PATH", std::env::var("PATH").unwrap_or_default());
        let ports: BTreeMap<String, u16> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["name"].as_str()?.to_string(),
                    p["containerPort"].as_u64()? as u16,
                ))
            })
            .collect();
        let probe = container["readinessProbe"]["httpGet"]
            .as_object()
            .map(|get| {
                let port = match &get["port"] {
                    Value::String(name) => ports.get(name).copied().unwrap_or(0),
                    other => other.as_u64().unwrap_or(0) as u16,
                };
                (port, get["path"].as_str().unwrap_or("/").to_string())
            });
        let mut process = PodProcess {
            namespace: namespace.to_string(),
            name: name.to_string(),
            octet,
            ipv6,
            child: None,
            command: Some(command),
            log,
            ready: false,
            restarts: 0,
            probe,
            labels: labels(pod),
            ports,
            waiting: None,
            reported: None,
            terminating: None,
            failed: false,
            last_exit: None,
        };
        let image = container["image"].as_str().unwrap_or_default();
        if self.unpullable.lock().expect("images").contains(image) {
            process.waiting = Some((
                "ErrImagePull".into(),
                format!("failed to pull image \"{image}\": not found"),
            ));
        } else {
            spawn(&mut process)?;
        }
        Ok(process)
    }

    /// The container's environment as a kubelet builds it: literal values
    /// with `$(VAR)` expanded from earlier variables, the downward API, and
    /// Secret and ConfigMap keys.
    fn environment(
        &self,
        pod: &Value,
        container: &Value,
        namespace: &str,
        ip: IpAddr,
    ) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap_or_default().to_string();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    "metadata.namespace" => namespace.to_string(),
                    "status.podIP" => ip.to_string(),
                    other => anyhow::bail!("fieldRef {other} is not emulated"),
                }
            } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_object() {
                let object = self
                    .store
                    .get(
                        &kind(&self.store, "", "secrets"),
                        namespace,
                        secret["name"].as_str().unwrap_or_default(),
                    )
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                let encoded = object["data"][secret["key"].as_str().unwrap_or_default()]
                    .as_str()
                    .context("secret key missing")?;
                let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
                String::from_utf8(bytes)?
            } else if let Some(map) = var["valueFrom"]["configMapKeyRef"].as_object() {
                let object = self
                    .store
                    .get(
                        &kind(&self.store, "", "configmaps"),
                        namespace,
                        map["name"].as_str().unwrap_or_default(),
                    )
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                object["data"][map["key"].as_str().unwrap_or_default()]
                    .as_str()
                    .context("configmap key missing")?
                    .to_string()
            } else {
                anyhow::bail!("env {name}: this valueFrom is not emulated");
            };
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        let image = container["image"].as_str().unwrap_or_default();
        env.push(("KUBE_EMULATOR_IMAGE".to_string(), image.to_string()));
        Ok(env)
    }

    /// Deletes a pod (gracefully: the kubelet stops it, see
    /// [`Cluster::terminations`]).
    fn delete_pod(&self, pod: &Value) {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let _ = self
            .store
            .delete(&kind(&self.store, "", "pods"), namespace, name);
    }

    /// The kubelet's side of graceful deletion: a pod with a
    /// `deletionTimestamp` gets SIGTERM once, SIGKILL when its grace period
    /// is over, and is removed from the API (its address freed) once its
    /// process has exited. Until then it stays listed with its IP.
    fn terminations(&self) -> Result<()> {
        let pods_kind = kind(&self.store, "", "pods");
        let (pods, _) = self.store.list(&pods_kind, None, &Selector::default());
        for pod in pods
            .iter()
            .filter(|p| !p["metadata"]["deletionTimestamp"].is_null())
        {
            let meta = &pod["metadata"];
            let key = (
                meta["namespace"].as_str().unwrap_or_default().to_string(),
                meta["name"].as_str().unwrap_or_default().to_string(),
            );
            let grace =
                Duration::from_secs(meta["deletionGracePeriodSeconds"].as_u64().unwrap_or(30));
            let gone = {
                let mut processes = self.pods.lock().expect("pods");
                match processes.get_mut(&key) {
                    None => true,
                    Some(process) => {
                        let deadline = *process.terminating.get_or_insert_with(|| {
                            if let Some(child) = &process.child {
                                let _ = crate::send_signal(child.id(), libc::SIGTERM);
                            }
                            Instant::now() + grace
                        });
                        let exited = match process.child.as_mut() {
                            None => true,
                            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
                        };
                        if !exited && Instant::now() >= deadline {
                            if let Some(child) = process.child.as_mut() {
                                let _ = child.kill();
                                let _ = child.wait();
                            }
                        }
                        exited || Instant::now() >= deadline
                    }
                }
            };
            if gone {
                if let Some(process) = self.pods.lock().expect("pods").remove(&key) {
                    release_ip(process.octet);
                }
                self.store.remove_terminated(&key.0, &key.1);
            }
        }
        Ok(())
    }

    /// Kills a pod's gateway process with SIGKILL (a crash, an OOM kill): no
    /// close frames, no drain. The kubelet sees it exit on its next tick,
    /// restarts it in the same pod (same IP), counts the restart and
    /// reports `lastState.terminated` (exit code 137, `Error`).
    pub fn kill_process(&self, namespace: &str, name: &str) -> Result<()> {
        let key = (namespace.to_string(), name.to_string());
        let mut processes = self.pods.lock().expect("pods");
        let process = processes.get_mut(&key).context("no such pod process")?;
        let child = process.child.as_mut().context("the pod has no process")?;
        child.kill().context("SIGKILL")?;
        Ok(())
    }

    /// The node evicts a pod for resource pressure, as a kubelet does: its
    /// container is killed, the pod goes to phase `Failed` with reason
    /// `Evicted` and stays in the API with its IP (nothing answers there),
    /// and its ReplicaSet starts a replacement.
    pub fn evict_for_node_pressure(&self, namespace: &str, name: &str) -> Result<()> {
        let key = (namespace.to_string(), name.to_string());
        {
            let mut processes = self.pods.lock().expect("pods");
            let process = processes.get_mut(&key).context("no such pod process")?;
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            process.failed = true;
            process.ready = false;
        }
        let status = json!({"status": {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi.",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "gateway", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}],
        }});
        self.store
            .merge(
                &kind(&self.store, "", "pods"),
                namespace,
                name,
                &status,
                true,
                KUBELET,
            )
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(())
    }

    /// Restarts exited processes, probes readiness, reflects it in the Pod.
    async fn kubelet(&self) -> Result<()> {
        let probes: Vec<(PodKey, IpAddr, Option<Probe>)> = {
            let mut pods = self.pods.lock().expect("pods");
            for pod in pods.values_mut() {
                if pod.failed || pod.terminating.is_some() {
                    continue;
                }
                let exited = pod.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    // A process killed by a signal exits with 128 + signal
                    // (137 for SIGKILL), and the kubelet says "Error" for any
                    // non-zero exit ("OOMKilled" only for the OOM killer).
                    use std::os::unix::process::ExitStatusExt;
                    let code = status
                        .code()
                        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                    pod.last_exit = Some((code, if code == 0 { "Completed" } else { "Error" }));
                    pod.restarts += 1;
                    pod.ready = false;
                    pod.waiting = Some((
                        "CrashLoopBackOff".into(),
                        format!(
                            "back-off restarting failed container gateway (restarted {} times)",
                            pod.restarts
                        ),
                    ));
                    let _ = spawn(pod);
                }
            }
            pods.iter()
                .filter(|(_, p)| !p.failed)
                .map(|(key, p)| (key.clone(), p.ip(), p.probe.clone()))
                .collect()
        };
        let results =
            futures_util::future::join_all(probes.into_iter().map(|(key, ip, probe)| async move {
                let ready = match probe {
                    Some((port, path)) => http_ok(SocketAddr::from((ip, port)), &path).await,
                    None => true,
                };
                (key, ready)
            }))
            .await;
        let pods_kind = kind(&self.store, "", "pods");
        for (key, ready) in results {
            let (changed, restarts, waiting, ready, last_exit) = {
                let mut pods = self.pods.lock().expect("pods");
                let Some(pod) = pods.get_mut(&key) else {
                    continue;
                };
                // An image that cannot be pulled is never ready; a ready
                // process waits for nothing.
                let ready = ready && pod.child.is_some();
                pod.ready = ready;
                if ready {
                    pod.waiting = None;
                } else if let Some((reason, message)) = &mut pod.waiting {
                    if reason == "ErrImagePull" && pod.reported.is_some() {
                        // After the first failed pull, the kubelet backs off.
                        *reason = "ImagePullBackOff".into();
                        *message = message.replace("failed to pull", "back-off pulling");
                    }
                }
                let now = (pod.ready, pod.waiting.clone());
                let changed = pod.reported.as_ref() != Some(&now);
                pod.reported = Some(now);
                (
                    changed,
                    pod.restarts,
                    pod.waiting.clone(),
                    ready,
                    pod.last_exit,
                )
            };
            if changed {
                let state = match &waiting {
                    Some((reason, message)) => {
                        json!({"waiting": {"reason": reason, "message": message}})
                    }
                    None => json!({"running": {}}),
                };
                let mut container = json!({"name": "gateway", "ready": ready,
                                           "restartCount": restarts, "state": state});
                if let Some((code, reason)) = last_exit {
                    container["lastState"] =
                        json!({"terminated": {"exitCode": code, "reason": reason}});
                }
                let status = json!({"status": {
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                    "containerStatuses": [container],
                }});
                let _ = self
                    .store
                    .merge(&pods_kind, &key.0, &key.1, &status, true, KUBELET);
            }
        }
        Ok(())
    }

    /// The EndpointSlice controller: one slice per Service with a selector
    /// (`NAME-xxxxx`, labelled `kubernetes.io/service-name`, owned by the
    /// Service), listing every pod the selector matches with its `ready`
    /// condition and the Service's ports resolved to container ports. A
    /// change is written once it has waited the propagation delay (later
    /// changes ride along with it, as the controller batches them).
    fn endpoint_slices(&self) -> Result<()> {
        let services_kind = kind(&self.store, "", "services");
        let slices_kind = kind(&self.store, "discovery.k8s.io", "endpointslices");
        let (services, _) = self.store.list(&services_kind, None, &Selector::default());
        let delay = *self.endpoint_delay.lock().expect("delay");
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for service in services {
            let meta = &service["metadata"];
            let namespace = meta["namespace"].as_str().unwrap_or_default().to_string();
            let name = meta["name"].as_str().unwrap_or_default().to_string();
            let Some(selector) = service["spec"]["selector"]
                .as_object()
                .filter(|m| !m.is_empty())
            else {
                continue;
            };
            let selector: BTreeMap<String, String> = selector
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            let desired =
                self.desired_slice(&namespace, &service, &Selector::from_labels(&selector));
            let key = (namespace.clone(), name.clone());
            seen.insert(key.clone());
            let mut slices = self.slices.lock().expect("slices");
            let state = slices.entry(key).or_default();
            if desired == state.published {
                state.pending = None;
                continue;
            }
            let since = state.pending.as_ref().map_or(now, |(since, _)| *since);
            if now.duration_since(since) < delay {
                state.pending = Some((since, desired));
                continue;
            }
            let written = match &state.name {
                Some(slice) => self.store.merge(
                    &slices_kind,
                    &namespace,
                    slice,
                    &desired,
                    false,
                    CONTROLLER_MANAGER,
                ),
                None => Err(super::store::ApiError::not_found("endpointslice")),
            };
            if let Err(err) = written {
                if err.code != 404 {
                    anyhow::bail!(
                        "updating the EndpointSlice of {namespace}/{name}: {}",
                        err.message
                    );
                }
                let slice_name = format!("{name}-{:05x}", rand::random::<u32>() & 0xfffff);
                let mut object = desired.clone();
                object["metadata"] = json!({
                    "name": slice_name,
                    "labels": {SERVICE_NAME_LABEL: name,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                        "uid": meta["uid"], "controller": true, "blockOwnerDeletion": true}],
                });
                self.store
                    .create(&slices_kind, &namespace, object, Some(CONTROLLER_MANAGER))
                    .map_err(|e| anyhow::anyhow!("creating an EndpointSlice: {}", e.message))?;
                state.name = Some(slice_name);
            }
            state.published = desired;
            state.pending = None;
        }
        self.slices
            .lock()
            .expect("slices")
            .retain(|key, _| seen.contains(key));
        Ok(())
    }

    /// What a Service's EndpointSlice should say now: `addressType`,
    /// `endpoints` (sorted by pod name) and `ports`.
    fn desired_slice(&self, namespace: &str, service: &Value, selector: &Selector) -> Value {
        let pods = self.pods.lock().expect("pods");
        let mut matched: Vec<&PodProcess> = pods
            .values()
            .filter(|p| p.namespace == namespace && !p.failed && selector.matches(&p.labels))
            .collect();
        matched.sort_by(|a, b| a.name.cmp(&b.name));
        let endpoints: Vec<Value> = matched
            .iter()
            .map(|p| {
                json!({
                    "addresses": [p.ip().to_string()],
                    "conditions": {"ready": p.ready && p.terminating.is_none(), "serving": p.ready,
                                   "terminating": p.terminating.is_some()},
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": p.name},
                })
            })
            .collect();
        let ports: Vec<Value> = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|port| {
                let number = match &port["targetPort"] {
                    Value::String(named) => {
                        matched.iter().find_map(|p| p.ports.get(named).copied())?
                    }
                    Value::Null => port["port"].as_u64()? as u16,
                    other => other.as_u64()? as u16,
                };
                Some(json!({"name": port["name"].as_str().unwrap_or_default(),
                            "port": number, "protocol": "TCP"}))
            })
            .collect();
        let ipv6 = matched.first().is_some_and(|p| p.ipv6);
        json!({
            "addressType": if ipv6 { "IPv6" } else { "IPv4" },
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    /// Where kube-proxy sends a Service's new connections: the ready
    /// endpoints of its EndpointSlices, on the port named like the
    /// Service's first port.
    fn slice_backends(&self, namespace: &str, name: &str, service: &Value) -> Vec<SocketAddr> {
        let slices_kind = kind(&self.store, "discovery.k8s.io", "endpointslices");
        let selector = Selector::parse(&format!("{SERVICE_NAME_LABEL}={name}")).unwrap_or_default();
        let (slices, _) = self.store.list(&slices_kind, Some(namespace), &selector);
        let port_name = service["spec"]["ports"][0]["name"]
            .as_str()
            .unwrap_or_default();
        let mut backends: Vec<SocketAddr> = slices
            .iter()
            .flat_map(|slice| {
                let port = slice["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
                    .and_then(|p| p["port"].as_u64());
                slice["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| e["conditions"]["ready"].as_bool().unwrap_or(true))
                    .filter_map(move |e| {
                        let ip: IpAddr = e["addresses"][0].as_str()?.parse().ok()?;
                        Some(SocketAddr::from((ip, port? as u16)))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        backends.sort();
        backends
    }

    /// kube-proxy: one loopback port per Service, routing new connections to
    /// the ready endpoints of its EndpointSlices (the first Service port
    /// only), never to the selector's pods directly.
    async fn proxies(&self) -> Result<()> {
        let services_kind = kind(&self.store, "", "services");
        let (services, _) = self.store.list(&services_kind, None, &Selector::default());
        let mut seen = BTreeSet::new();
        for service in services {
            let namespace = service["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let name = service["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let backends = self.slice_backends(&namespace, &name, &service);
            let key = (namespace, name);
            seen.insert(key.clone());
            let existing = self
                .services
                .lock()
                .expect("services")
                .get(&key)
                .map(|(p, b)| (p.clone(), b.clone()));
            match existing {
                Some((proxy, current)) if current == backends => drop(proxy),
                Some((proxy, _)) => {
                    proxy.switch(backends.clone());
                    self.services
                        .lock()
                        .expect("services")
                        .insert(key, (proxy, backends));
                }
                None => {
                    let proxy = Arc::new(ServiceProxy::start(backends.clone()).await?);
                    let store = self.store.clone();
                    proxy.set_admission(Arc::new(move |peer, backend| {
                        network_allows(&store, peer, backend)
                    }));
                    self.services
                        .lock()
                        .expect("services")
                        .insert(key, (proxy, backends));
                }
            }
        }
        self.services
            .lock()
            .expect("services")
            .retain(|key, _| seen.contains(key));
        Ok(())
    }
}

/// The network plugin: whether the NetworkPolicies of the backend pod's
/// namespace let `peer` (a pod, known by its IP, or something outside the
/// pod network) reach it on that port ([`super::netpol`]).
fn network_allows(store: &Store, peer: SocketAddr, backend: SocketAddr) -> bool {
    use super::netpol::canonical;
    // Asked for every connection a proxy forwards: without a policy (most
    // tests) nothing more is looked up.
    let policies_kind = kind(store, "networking.k8s.io", "networkpolicies");
    let (policies, _) = store.list(&policies_kind, None, &Selector::default());
    if policies.is_empty() {
        return true;
    }
    let (pods, _) = store.list(&kind(store, "", "pods"), None, &Selector::default());
    let at = |ip: IpAddr| {
        pods.iter().find(|p| {
            p["status"]["podIP"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(|a| canonical(a) == canonical(ip))
                && !matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded"))
        })
    };
    let Some(target) = at(backend.ip()) else {
        return true;
    };
    let namespace = target["metadata"]["namespace"].as_str().unwrap_or_default();
    let target_labels = labels(target);
    let port_name = target["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["containerPort"].as_u64() == Some(u64::from(backend.port())))
        .and_then(|p| p["name"].as_str());
    let source = match at(peer.ip()) {
        Some(pod) => super::netpol::Source::Pod {
            namespace: pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            labels: labels(pod),
            ip: peer.ip(),
        },
        None => super::netpol::Source::External(peer.ip()),
    };
    super::netpol::ingress_allowed(
        &policies,
        &super::netpol::Target {
            namespace,
            labels: &target_labels,
            port: backend.port(),
            port_name,
        },
        &source,
    )
}

/// Expands `$(VAR)` from variables defined earlier, as Kubernetes does.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (key, val) in env {
        out = out.replace(&format!("$({key})"), val);
    }
    out
}

fn spawn(process: &mut PodProcess) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&process.log)?;
    let command = process.command.as_mut().context("no command")?;
    command.stdout(log.try_clone()?).stderr(log);
    process.child = Some(command.spawn().context("spawning the gateway")?);
    Ok(())
}

/// One HTTP/1.0 GET; true on a 200.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.ends_with(b"200"))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_uses_earlier_variables() {
        let env = vec![("POD_IP".to_string(), "127.0.0.9".to_string())];
        assert_eq!(expand("$(POD_IP):8080", &env), "127.0.0.9:8080");
        assert_eq!(expand("$(OTHER)", &env), "$(OTHER)");
    }
}
