//! What the cluster does besides the API: a Deployment controller that keeps
//! each Deployment's pods at its replica count (recreating pods whose
//! template changed), a kubelet that runs every pod as a real gateway process
//! on its own loopback address, probes its readiness and restarts it when it
//! exits, and kube-proxy: a loopback port per Service forwarding new
//! connections to the Ready pods its selector matches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    grace: Duration,
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
}

impl PodProcess {
    fn ip(&self) -> IpAddr {
        pod_ip(self.octet, self.ipv6)
    }
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
        }
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
        self.kubelet().await?;
        self.proxies().await?;
        Ok(())
    }

    /// The Deployment controller.
    fn deployments(&self) -> Result<()> {
        let deployments = kind(&self.store, "apps", "deployments");
        let pods_kind = kind(&self.store, "", "pods");
        let (items, _) = self.store.list(&deployments, None, &Selector::default());
        let (pods, _) = self.store.list(&pods_kind, None, &Selector::default());
        let live: BTreeSet<String> = items
            .iter()
            .filter_map(|d| d["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        // Pods whose Deployment is gone stop; so do processes whose Pod
        // object was deleted (garbage collection, kubectl delete).
        for pod in &pods {
            let owner = pod["metadata"]["ownerReferences"][0]["uid"]
                .as_str()
                .unwrap_or_default();
            if !owner.is_empty() && !live.contains(owner) {
                self.stop_pod(pod)?;
            }
        }
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
        let orphans: Vec<(String, String)> = self
            .pods
            .lock()
            .expect("pods")
            .keys()
            .filter(|key| !in_store.contains(*key))
            .cloned()
            .collect();
        for (namespace, name) in orphans {
            self.stop_pod(&json!({"metadata": {"namespace": namespace, "name": name}}))?;
        }
        for deployment in items {
            self.reconcile_deployment(&deployment, &pods)?;
        }
        Ok(())
    }

    fn reconcile_deployment(&self, deployment: &Value, pods: &[Value]) -> Result<()> {
        let uid = deployment["metadata"]["uid"].as_str().unwrap_or_default();
        let namespace = deployment["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let template = &deployment["spec"]["template"];
        let hash = template_hash(template);
        let mut owned: Vec<&Value> = pods
            .iter()
            .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == uid)
            .collect();
        owned.sort_by_key(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        });
        // A changed template replaces the pods (the operator only changes a
        // color's template while that color is at zero replicas).
        let (current, stale): (Vec<&Value>, Vec<&Value>) = owned
            .into_iter()
            .partition(|p| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str());
        for pod in stale {
            self.stop_pod(pod)?;
        }
        let mut count = current.len();
        for pod in current.iter().skip(replicas) {
            self.stop_pod(pod)?;
        }
        count = count.min(replicas);
        while count < replicas {
            self.start_pod(deployment, namespace, name, &hash)?;
            count += 1;
        }
        let ready = self
            .pods
            .lock()
            .expect("pods")
            .values()
            .filter(|p| p.namespace == namespace && p.ready)
            .filter(|p| p.labels.get("pod-template-hash") == Some(&hash))
            .filter(|p| p.name.starts_with(&format!("{name}-")))
            .count()
            .min(replicas);
        let status = json!({"status": {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": count, "updatedReplicas": count,
            "readyReplicas": ready, "availableReplicas": ready,
        }});
        let same = [
            "observedGeneration",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
        ]
        .iter()
        .all(|k| deployment["status"][k] == status["status"][k]);
        if !same {
            let deployments = kind(&self.store, "apps", "deployments");
            self.store
                .merge(&deployments, namespace, name, &status, true)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        }
        Ok(())
    }

    fn start_pod(&self, deployment: &Value, namespace: &str, name: &str, hash: &str) -> Result<()> {
        let template = &deployment["spec"]["template"];
        let octet = allocate_ip().context("no free loopback address for a pod")?;
        let ipv6 = self.ipv6.load(std::sync::atomic::Ordering::Relaxed);
        let ip = pod_ip(octet, ipv6);
        let suffix: u32 = rand::random();
        let pod_name = format!("{name}-{}-{:05x}", &hash[..5], suffix & 0xfffff);
        let mut pod_labels = template["metadata"]["labels"].clone();
        pod_labels["pod-template-hash"] = json!(hash);
        let pod = json!({
            "metadata": {
                "name": pod_name, "labels": pod_labels,
                "annotations": template["metadata"]["annotations"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                    "uid": deployment["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": template["spec"],
            "status": {"phase": "Running", "podIP": ip.to_string(), "hostIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "False"}]},
        });
        let pods_kind = kind(&self.store, "", "pods");
        let created = self
            .store
            .create(&pods_kind, namespace, pod, None)
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
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
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
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
            grace: Duration::from_secs(grace),
            probe,
            labels: labels(pod),
            ports,
            waiting: None,
            reported: None,
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

    /// Deletes a pod object and stops its process like a kubelet: SIGTERM,
    /// SIGKILL after the grace period; the address is free once it exited.
    fn stop_pod(&self, pod: &Value) -> Result<()> {
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pods_kind = kind(&self.store, "", "pods");
        let _ = self.store.delete(&pods_kind, &namespace, &name);
        let process = self.pods.lock().expect("pods").remove(&(namespace, name));
        if let Some(mut process) = process {
            std::thread::spawn(move || {
                if let Some(mut child) = process.child.take() {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe {
                        libc::kill(child.id() as i32, libc::SIGTERM);
                    }
                    let deadline = std::time::Instant::now() + process.grace;
                    loop {
                        if let Ok(Some(_)) = child.try_wait() {
                            break;
                        }
                        if std::time::Instant::now() >= deadline {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                release_ip(process.octet);
            });
        }
        Ok(())
    }

    /// Restarts exited processes, probes readiness, reflects it in the Pod.
    async fn kubelet(&self) -> Result<()> {
        let probes: Vec<(PodKey, IpAddr, Option<Probe>)> = {
            let mut pods = self.pods.lock().expect("pods");
            for pod in pods.values_mut() {
                let exited = pod
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited {
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
            let (changed, restarts, waiting, ready) = {
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
                (changed, pod.restarts, pod.waiting.clone(), ready)
            };
            if changed {
                let state = match &waiting {
                    Some((reason, message)) => {
                        json!({"waiting": {"reason": reason, "message": message}})
                    }
                    None => json!({"running": {}}),
                };
                let status = json!({"status": {
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                    "containerStatuses": [{"name": "gateway", "ready": ready, "restartCount": restarts,
                                           "state": state}],
                }});
                let _ = self.store.merge(&pods_kind, &key.0, &key.1, &status, true);
            }
        }
        Ok(())
    }

    /// kube-proxy: one loopback port per Service, routing new connections to
    /// the Ready pods its selector matches (the first Service port only).
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
            let selector: BTreeMap<String, String> = service["spec"]["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let target = service["spec"]["ports"][0]["targetPort"].clone();
            let selector = Selector::from_labels(&selector);
            let mut backends: Vec<SocketAddr> = self
                .pods
                .lock()
                .expect("pods")
                .values()
                .filter(|p| p.namespace == namespace && p.ready && selector.matches(&p.labels))
                .filter_map(|p| {
                    let port = match &target {
                        Value::String(port_name) => p.ports.get(port_name).copied()?,
                        other => other.as_u64()? as u16,
                    };
                    Some(SocketAddr::from((p.ip(), port)))
                })
                .collect();
            backends.sort();
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
