//! A local Kubernetes emulator for end-to-end rollouts (test support, not a
//! product). No cluster or container engine runs on these machines, and the
//! existing fakes give kube-runtime no working watch, so the project carries
//! its own: an API server for the kinds the operator uses ([`api`],
//! [`store`]), and a cluster that runs every pod as a real gateway process on
//! its own loopback address with a proxy per Service ([`kubelet`]). The
//! unmodified operator binary talks to it through an ordinary kubeconfig.
//! What it does not do is listed in docs/testing.md.

pub mod api;
pub mod disruption;
pub mod kubelet;
pub mod netpol;
pub mod patch;
pub mod podsecurity;
pub mod selector;
pub mod store;
pub mod table;
pub mod validate;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use kubelet::Cluster;
use store::{ApiError, ResourceType, Store};

/// A running emulator: the API server, the cluster behind it, and a scratch
/// directory (kubeconfig, pod files and logs).
pub struct Emulator {
    /// The API server's address.
    pub addr: SocketAddr,
    /// The object store (tests may read it directly).
    pub store: Arc<Store>,
    /// The simulated nodes.
    pub cluster: Arc<Cluster>,
    dir: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Emulator {
    /// Starts the API server on an ephemeral loopback port and the cluster loop.
    pub async fn start() -> Result<Emulator> {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-kube-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let store = Arc::new(Store::new());
        let cluster = Arc::new(Cluster::new(store.clone(), dir.join("pods")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server_store = store.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = server_store.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let store = store.clone();
                        async move { Ok::<_, Infallible>(api::handle(store, request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let cluster_loop = tokio::spawn(cluster.clone().run());
        Ok(Emulator {
            addr,
            store,
            cluster,
            dir,
            tasks: vec![server, cluster_loop],
        })
    }

    /// Writes a kubeconfig pointing at the emulator (namespace `namespace`).
    pub fn kubeconfig(&self, namespace: &str) -> Result<PathBuf> {
        self.kubeconfig_as(namespace, "emulator")
    }

    /// A kubeconfig whose bearer token is `token`: what
    /// [`store::Store::partition`] cuts off.
    pub fn kubeconfig_as(&self, namespace: &str, token: &str) -> Result<PathBuf> {
        let path = if token == "emulator" {
            self.dir.join("kubeconfig")
        } else {
            self.dir.join(format!("kubeconfig-{token}"))
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: http://{}\n\
             users:\n- name: tester\n  user:\n    token: {token}\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: tester\n    namespace: {namespace}\n\
             current-context: emulator\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// `POST pods/NAME/eviction` over HTTP, as `kubectl drain` sends it
    /// (kube's client retries a 429 by itself, which would hide the
    /// refusal): the status code and the answer.
    pub fn evict(&self, namespace: &str, name: &str) -> Result<(u16, Value)> {
        let body = serde_json::json!({"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace}});
        let (status, text) = crate::http_request_with(
            self.addr,
            "POST",
            &format!("/api/v1/namespaces/{namespace}/pods/{name}/eviction"),
            &[("Content-Type", "application/json")],
            Some(&body.to_string()),
        )?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A kind by group and plural (first version served).
    pub fn kind(&self, group: &str, plural: &str) -> Result<ResourceType> {
        self.store
            .types()
            .into_iter()
            .find(|rt| rt.group == group && rt.plural == plural)
            .with_context(|| format!("{group}/{plural} is not served"))
    }

    /// Creates an object from YAML or JSON text (like `kubectl create -f`).
    pub fn create(&self, group: &str, plural: &str, namespace: &str, text: &str) -> Result<Value> {
        let object: Value = serde_yaml::from_str(text).context("parsing the object")?;
        let rt = self.kind(group, plural)?;
        self.store
            .create(&rt, namespace, object, Some("test"))
            .map_err(api_error)
    }

    /// Creates the ConnectionService CRD (the generated one, as
    /// `kubectl apply -f k8s/base/crd.yaml` would) and then a ConnectionService
    /// from `resource` in `namespace`.
    pub fn install(&self, namespace: &str, resource: &str) -> Result<Value> {
        self.create(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
            &switchyard_operator::crd::crd_yaml(),
        )
        .context("the CRD")?;
        self.create("switchyard.dev", "connectionservices", namespace, resource)
            .context("the ConnectionService")
    }

    /// Serves the Prometheus Operator's API (its PodMonitor, ServiceMonitor
    /// and PrometheusRule CRDs, without their schemas): what Helm's
    /// `.Capabilities` and a test-side Prometheus Operator see.
    pub fn serve_prometheus_operator_api(&self) -> Result<()> {
        for (kind, plural) in [
            ("PodMonitor", "podmonitors"),
            ("ServiceMonitor", "servicemonitors"),
            ("PrometheusRule", "prometheusrules"),
        ] {
            let crd = format!(
                "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.monitoring.coreos.com}}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {}, listKind: {kind}List}}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
",
                kind.to_lowercase()
            );
            self.create(
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "",
                &crd,
            )
            .with_context(|| format!("the {kind} CRD"))?;
        }
        Ok(())
    }

    /// Makes `namespace` enforce Pod Security `restricted` (see
    /// [`podsecurity`]).
    pub fn enforce_restricted(&self, namespace: &str) {
        self.store.enforce_restricted(namespace);
    }

    /// Reads an object.
    pub fn get(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Result<Value> {
        let rt = self.kind(group, plural)?;
        self.store.get(&rt, namespace, name).map_err(api_error)
    }

    /// Merge-patches an object (like `kubectl patch --type merge`).
    pub fn patch(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value> {
        self.merge(group, plural, namespace, name, patch, false)
    }

    /// Merge-patches an object's status subresource.
    pub fn patch_status(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value> {
        self.merge(group, plural, namespace, name, patch, true)
    }

    fn merge(
        &self,
        group: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value> {
        let rt = self.kind(group, plural)?;
        self.store
            .merge(&rt, namespace, name, patch, status, "test")
            .map_err(api_error)
    }

    /// Every object of a kind in every namespace.
    pub fn list_all(&self, group: &str, plural: &str) -> Result<Vec<Value>> {
        let rt = self.kind(group, plural)?;
        Ok(self.store.list(&rt, None, &selector::Selector::default()).0)
    }

    /// Every object of a kind in a namespace.
    pub fn list(&self, group: &str, plural: &str, namespace: &str) -> Result<Vec<Value>> {
        let rt = self.kind(group, plural)?;
        Ok(self
            .store
            .list(&rt, Some(namespace), &selector::Selector::default())
            .0)
    }
}

fn api_error(err: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{} {}: {}", err.code, err.reason, err.message)
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.cluster.kill_all();
    }
}
