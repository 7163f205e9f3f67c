//! The thin I/O layer around [`crate::rollout`]: observe the cluster and the
//! gateways, ask the state machine for a plan, apply its steps in order, and
//! write the status last (server-side apply, one field manager).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::crd::{Color, ConnectionService, Phase, ABORT_ANNOTATION, PROMOTE_ANNOTATION};
use crate::gateway::{AdminEndpoint, GatewayAdmin};
use crate::metrics::Metrics;
use crate::resources::{self, ADMIN_PORT, COLOR_LABEL, FIELD_MANAGER, REVISION_LABEL, TOKEN_KEY};
use crate::rollout::{
    self, ColorView, DeploymentView, GatewayReport, Observed, Plan, PodTarget, PodView, Step,
};

/// The label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The spec cannot be turned into objects.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The admin Secret exists but holds no usable token.
    #[error("secret {0} has no `token` key")]
    MissingToken(String),
}

impl Error {
    /// Whether the API server (or the spec itself) refused what this
    /// reconcile asked, as opposed to a race (409: the next reconcile reads
    /// afresh) or an API server that did not answer (nothing can be written
    /// then). A refusal is what a user must see: [`surface_failure`].
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => status.code >= 400 && status.code != 409,
            Error::Kube { .. } => false,
            Error::InvalidSpec(_) | Error::MissingToken(_) => true,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MissingToken(_) => "missing_token",
        }
    }
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}

/// A clock, so request-level tests can fix "now".
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What every reconcile needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The gateways' admin API.
    pub admin: Arc<dyn GatewayAdmin>,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The gateways' admin port.
    pub admin_port: u16,
    /// The time source.
    pub clock: Clock,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each object's status was last written ([`status_write_due`]).
    status_written: Mutex<HashMap<String, Timestamp>>,
}

impl Context {
    /// A context with the real clock and the standard admin port.
    pub fn new(client: Client, admin: Arc<dyn GatewayAdmin>, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            admin,
            metrics,
            admin_port: ADMIN_PORT,
            clock: Arc::new(Timestamp::now),
            failures: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().expect("failures lock");
        let count = failures.entry(key.to_string()).or_insert(0);
        *count += 1;
        *count
    }

    fn clear_failures(&self, key: &str) {
        self.failures.lock().expect("failures lock").remove(key);
    }
}

fn object_key(cs: &ConnectionService) -> String {
    format!("{}/{}", cs.namespace().unwrap_or_default(), cs.name_any())
}

/// The wait before retrying after `failures` consecutive failures: 1 s
/// doubling to a 5-minute cap.
pub fn error_backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_secs(1 << exponent).min(Duration::from_secs(300))
}

/// Called by the controller when [`reconcile`] fails.
pub fn error_policy(cs: Arc<ConnectionService>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(&object_key(&cs));
    ctx.metrics.reconcile_failed(error.kind());
    let wait = error_backoff(failures);
    warn!(
        name = %cs.name_any(),
        namespace = %cs.namespace().unwrap_or_default(),
        %error,
        failures,
        retry_in_ms = wait.as_millis() as u64,
        "reconcile failed"
    );
    Action::requeue(wait)
}

/// One reconcile of one `ConnectionService`.
#[tracing::instrument(
    skip_all,
    fields(
        name = %cs.name_any(),
        namespace = %cs.namespace().unwrap_or_default(),
        generation = cs.metadata.generation.unwrap_or_default(),
        phase = tracing::field::Empty,
        steps = tracing::field::Empty
    )
)]
pub async fn reconcile(cs: Arc<ConnectionService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&cs, &ctx).await;
    ctx.metrics
        .reconcile_finished(started.elapsed(), result.is_ok());
    match &result {
        Ok(_) => ctx.clear_failures(&object_key(&cs)),
        Err(error) if error.is_refusal() => surface_failure(&cs, &ctx, error).await,
        Err(_) => {}
    }
    result
}

/// Longest failure message kept in the status and an Event's note (an
/// Event's note may hold 1 kB).
const MAX_FAILURE_MESSAGE: usize = 1000;

/// A reconcile the API server refused (an apply it would not take, say)
/// leaves the objects as they were; without this, the resource's status
/// would keep showing the last phase as if all were well. The server's
/// message goes where users look: `Degraded=True` (`ReconcileFailed`) and
/// the status `message` (`kubectl get`, `kubectl switchyard status`), and a
/// Warning Event once per new message. The phase is left alone: the
/// rollout has not moved. The next successful reconcile writes the
/// planner's conditions back. Best effort: a status that cannot be written
/// is logged, the error policy retries.
async fn surface_failure(cs: &ConnectionService, ctx: &Context, error: &Error) {
    let mut message = format!("reconcile failed: {error}");
    if message.len() > MAX_FAILURE_MESSAGE {
        let mut cut = MAX_FAILURE_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let mut status = cs.status.clone().unwrap_or_default();
    rollout::set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        "ReconcileFailed",
        &message,
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time((ctx.clock)()),
        cs.metadata.generation,
    );
    status.message = Some(message.clone());
    if cs.status.as_ref() == Some(&status) {
        return; // told already
    }
    let Some(namespace) = cs.namespace() else {
        return;
    };
    let api: Api<ConnectionService> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(err) = apply_status(&api, &cs.name_any(), &status, None).await {
        warn!(error = %err, "the failure could not be written to the status");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "ReconcileFailed".to_string(),
        note: Some(message),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    publish_event(ctx, cs, &event).await;
}

/// Writes `status` to the status subresource by server-side apply under the
/// operator's field manager; with `version`, only over that resourceVersion.
async fn apply_status(
    api: &Api<ConnectionService>,
    name: &str,
    status: &crate::crd::ConnectionServiceStatus,
    version: Option<String>,
) -> Result<(), kube::Error> {
    let mut body = json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ConnectionService",
        "status": status,
    });
    if let Some(version) = version {
        body["metadata"] = json!({ "resourceVersion": version });
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&body))
        .await
        .map(drop)
}

/// Records an Event about `cs`. One that cannot be written is logged: it
/// must not stop a rollout or hide the failure it reports.
async fn publish_event(ctx: &Context, cs: &ConnectionService, event: &Event) {
    if let Err(err) = ctx.recorder.publish(event, &cs.object_ref(&())).await {
        warn!(error = %err, reason = %event.reason, "event not recorded");
    }
}

async fn reconcile_inner(cs: &ConnectionService, ctx: &Context) -> Result<Action, Error> {
    let namespace = cs
        .namespace()
        .ok_or_else(|| Error::InvalidSpec("a ConnectionService is namespaced".into()))?;
    if let Err(err) = serde_yaml::from_str::<serde_yaml::Value>(&cs.spec.config) {
        return Err(Error::InvalidSpec(format!(
            "spec.config is not YAML: {err}"
        )));
    }
    let io = ObjectIo::new(ctx, cs, &namespace);
    let token = io.admin_token().await?;
    let observed = io.observe(&token).await?;
    let plan = rollout::plan(&observed);
    let span = tracing::Span::current();
    span.record("phase", plan.status.phase.map_or("", Phase::as_str));
    span.record("steps", plan.steps.len());
    for step in &plan.steps {
        io.run(step, &token).await?;
    }
    io.write_status(&plan).await?;
    if let Some(phase) = plan.status.phase {
        ctx.metrics
            .set_phase(&namespace, &cs.name_any(), phase, &plan.status.connections);
    }
    if let Some((outcome, took)) = plan.finished {
        ctx.metrics.rollout_finished(outcome, took);
    }
    Ok(Action::requeue(plan.requeue))
}

/// A call made to every pod of a step.
#[derive(Clone, Copy)]
enum PodCall<'r> {
    Drain(&'r switchyard_protocol::drain::DrainRequest),
    CancelDrain,
}

impl PodCall<'_> {
    fn name(self) -> &'static str {
        match self {
            PodCall::Drain(_) => "drain",
            PodCall::CancelDrain => "cancel_drain",
        }
    }
}

/// The API handles and identity of one reconcile.
struct ObjectIo<'a> {
    ctx: &'a Context,
    cs: &'a ConnectionService,
    name: String,
    resources: Api<ConnectionService>,
    deployments: Api<Deployment>,
    replica_sets: Api<ReplicaSet>,
    pods: Api<Pod>,
    services: Api<Service>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    pdbs: Api<PodDisruptionBudget>,
    endpoint_slices: Api<EndpointSlice>,
    /// The resource's version this reconcile acts on: the precondition of
    /// its own writes to the resource (annotations, status), so a stale
    /// writer — a second operator during a leader handover, or a reconcile
    /// on an old cache — gets a 409 instead of moving the phase backwards.
    /// Advanced by its own annotation patches.
    resource_version: std::sync::Mutex<Option<String>>,
}

impl<'a> ObjectIo<'a> {
    fn new(ctx: &'a Context, cs: &'a ConnectionService, namespace: &str) -> Self {
        let client = ctx.client.clone();
        ObjectIo {
            ctx,
            cs,
            name: cs.name_any(),
            resources: Api::namespaced(client.clone(), namespace),
            deployments: Api::namespaced(client.clone(), namespace),
            replica_sets: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client.clone(), namespace),
            pdbs: Api::namespaced(client.clone(), namespace),
            endpoint_slices: Api::namespaced(client, namespace),
            resource_version: std::sync::Mutex::new(cs.metadata.resource_version.clone()),
        }
    }

    fn seen_version(&self) -> Option<String> {
        self.resource_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn apply<K>(&self, api: &Api<K>, object: &K) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(object))
            .await
            .map_err(kube_error(format!("applying {} {name}", K::kind(&()))))?;
        Ok(())
    }

    /// The admin token, from the Secret; created (once) when missing.
    async fn admin_token(&self) -> Result<String, Error> {
        let secret_name = resources::admin_secret_name(&self.name);
        let existing = self
            .secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_error(format!("reading secret {secret_name}")))?;
        let secret = match existing {
            Some(secret) => secret,
            None => {
                let fresh = resources::admin_secret(self.cs, &resources::new_admin_token());
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..PostParams::default()
                };
                match self.secrets.create(&params, &fresh).await {
                    Ok(created) => created,
                    // Created concurrently (a previous leader): use theirs.
                    Err(err) if is_status(&err, 409) => self
                        .secrets
                        .get(&secret_name)
                        .await
                        .map_err(kube_error(format!("reading secret {secret_name}")))?,
                    Err(err) => {
                        return Err(kube_error(format!("creating secret {secret_name}"))(err))
                    }
                }
            }
        };
        secret
            .data
            .as_ref()
            .and_then(|data| data.get(TOKEN_KEY))
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
            .filter(|token| !token.is_empty())
            .ok_or(Error::MissingToken(secret_name))
    }

    async fn observe(&self, token: &str) -> Result<Observed, Error> {
        let selector = ListParams::default().labels(&resources::instance_selector(&self.name));
        let deployments = self
            .deployments
            .list(&selector)
            .await
            .map_err(kube_error("listing deployments"))?;
        let pod_selector = ListParams::default().labels(&resources::pod_selector(&self.name));
        let replica_sets = self
            .replica_sets
            .list(&pod_selector)
            .await
            .map_err(kube_error("listing replicasets"))?;
        let pods = self
            .pods
            .list(&pod_selector)
            .await
            .map_err(kube_error("listing pods"))?;
        let pods = gateway_pods(&deployments.items, &replica_sets.items, pods.items);
        let service_color = self.selected_color(&self.name).await?;
        let preview_color = self
            .selected_color(&resources::preview_service_name(&self.name))
            .await?;
        let reports = self.gateway_reports(&pods, token).await;
        let moving = matches!(
            self.cs.status.as_ref().and_then(|s| s.phase),
            Some(Phase::Switching | Phase::Draining)
        );
        let both_scaled = deployments
            .items
            .iter()
            .filter(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) > 0)
            .count()
            > 1;
        let endpoints = if moving || both_scaled {
            self.ready_endpoints().await?
        } else {
            Vec::new()
        };
        let mut views: HashMap<Color, ColorView> = HashMap::new();
        for deployment in &deployments.items {
            if let Some(color) = label_color(deployment.labels()) {
                views.entry(color).or_default().deployment = Some(deployment_view(deployment));
            }
        }
        for (pod, report) in pods.iter().zip(reports) {
            if let Some(color) = label_color(pod.labels()) {
                views.entry(color).or_default().pods.push(PodView {
                    name: pod.name_any(),
                    ip: pod_ip(pod),
                    report,
                    waiting: pod_waiting(pod),
                    restarts: pod_restarts(pod),
                    last_exit: pod_last_exit(pod),
                });
            }
        }
        let annotations = self.cs.annotations();
        Ok(Observed {
            now: (self.ctx.clock)(),
            generation: self.cs.metadata.generation,
            revision: resources::revision(self.cs),
            replicas: self.cs.spec.replicas,
            policy: self.cs.spec.rollout.clone(),
            status: self.cs.status.clone().unwrap_or_default(),
            blue: views.remove(&Color::Blue).unwrap_or_default(),
            green: views.remove(&Color::Green).unwrap_or_default(),
            service_color,
            preview_color,
            endpoints,
            promote: annotations.contains_key(PROMOTE_ANNOTATION),
            abort: annotations.contains_key(ABORT_ANNOTATION),
        })
    }

    /// The ready addresses of the public Service's EndpointSlices (an
    /// endpoint without a `ready` condition is ready, as the API says).
    async fn ready_endpoints(&self) -> Result<Vec<String>, Error> {
        let params = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.name));
        let slices = self
            .endpoint_slices
            .list(&params)
            .await
            .map_err(kube_error("listing endpointslices"))?;
        let mut addresses: Vec<String> = slices
            .items
            .iter()
            .flat_map(|slice| &slice.endpoints)
            .filter(|endpoint| {
                endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true)
            })
            .flat_map(|endpoint| endpoint.addresses.iter().cloned())
            .collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }

    async fn selected_color(&self, service: &str) -> Result<Option<Color>, Error> {
        let found = self
            .services
            .get_opt(service)
            .await
            .map_err(kube_error(format!("reading service {service}")))?;
        Ok(found
            .and_then(|s| s.spec)
            .and_then(|spec| spec.selector)
            .and_then(|selector| label_color(&selector)))
    }

    /// Asks every pod with an address for its status, all at once.
    async fn gateway_reports(&self, pods: &[Pod], token: &str) -> Vec<Option<GatewayReport>> {
        let calls = pods.iter().map(|pod| async move {
            let ip = pod_ip(pod)?;
            let endpoint = self.endpoint(&ip, token);
            match self.ctx.admin.status(&endpoint).await {
                Ok(status) => {
                    self.ctx.metrics.gateway_call("status", true);
                    Some(GatewayReport {
                        connections: status.connections,
                        draining: status.draining,
                    })
                }
                Err(err) => {
                    self.ctx.metrics.gateway_call("status", false);
                    debug!(pod = %pod.name_any(), error = %err, "gateway status unavailable");
                    None
                }
            }
        });
        join_all(calls).await
    }

    fn endpoint(&self, ip: &str, token: &str) -> AdminEndpoint {
        AdminEndpoint {
            ip: ip.to_string(),
            port: self.ctx.admin_port,
            token: token.to_string(),
        }
    }

    async fn run(&self, step: &Step, token: &str) -> Result<(), Error> {
        match step {
            Step::ApplyDeployment {
                color,
                revision,
                replicas,
            } => {
                self.apply(&self.config_maps, &resources::config_map(self.cs, revision))
                    .await?;
                let deployment = resources::deployment(self.cs, *color, revision, *replicas);
                self.apply(&self.deployments, &deployment).await
            }
            Step::Scale { color, replicas } => self.scale(*color, *replicas).await,
            Step::RouteService { color } => {
                self.apply(&self.services, &resources::service(self.cs, *color))
                    .await
            }
            Step::ApplyPodDisruptionBudget => {
                self.apply(&self.pdbs, &resources::pod_disruption_budget(self.cs))
                    .await
            }
            Step::RoutePreview { color } => {
                self.apply(&self.services, &resources::preview_service(self.cs, *color))
                    .await
            }
            Step::StartDrain { pods, request } => {
                self.each_pod(pods, token, PodCall::Drain(request)).await;
                Ok(())
            }
            Step::CancelDrain { pods } => {
                self.each_pod(pods, token, PodCall::CancelDrain).await;
                Ok(())
            }
            Step::ClearAnnotation { key } => {
                let mut patch = json!({ "metadata": { "annotations": { *key: null } } });
                if let Some(version) = self.seen_version() {
                    patch["metadata"]["resourceVersion"] = json!(version);
                }
                let patched = self
                    .resources
                    .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(kube_error(format!("removing annotation {key}")))?;
                *self
                    .resource_version
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = patched.metadata.resource_version;
                Ok(())
            }
            Step::PruneConfigMaps { keep } => self.prune_config_maps(keep).await,
            Step::Record(notice) => {
                info!(reason = notice.reason, note = %notice.note, "rollout event");
                let event = Event {
                    type_: if notice.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: notice.reason.to_string(),
                    note: Some(notice.note.clone()),
                    action: "Rollout".to_string(),
                    secondary: None,
                };
                publish_event(self.ctx, self.cs, &event).await;
                Ok(())
            }
        }
    }

    async fn scale(&self, color: Color, replicas: i32) -> Result<(), Error> {
        let name = resources::deployment_name(&self.name, color);
        let patch = json!({ "spec": { "replicas": replicas } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        match self
            .deployments
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if is_status(&err, 404) => Ok(()), // nothing to scale
            Err(err) => Err(kube_error(format!("scaling {name} to {replicas}"))(err)),
        }
    }

    /// Calls every pod at once. A failure is logged and counted, not fatal:
    /// the next reconcile sees the pod still undrained (or draining) and
    /// calls it again.
    async fn each_pod(&self, pods: &[PodTarget], token: &str, call: PodCall<'_>) {
        let admin = self.ctx.admin.as_ref();
        let calls = pods.iter().map(|pod| {
            let endpoint = self.endpoint(&pod.ip, token);
            async move {
                match call {
                    PodCall::Drain(request) => admin.start_drain(&endpoint, request).await,
                    PodCall::CancelDrain => admin.cancel_drain(&endpoint).await,
                }
            }
        });
        let results = join_all(calls).await;
        for (pod, result) in pods.iter().zip(results) {
            let name = call.name();
            match result {
                Ok(()) => {
                    self.ctx.metrics.gateway_call(name, true);
                    info!(pod = %pod.name, call = name, "gateway told");
                }
                Err(err) => {
                    self.ctx.metrics.gateway_call(name, false);
                    warn!(pod = %pod.name, call = name, error = %err, "gateway call failed");
                }
            }
        }
    }

    async fn prune_config_maps(&self, keep: &[String]) -> Result<(), Error> {
        let selector = ListParams::default().labels(&resources::instance_selector(&self.name));
        let maps = self
            .config_maps
            .list(&selector)
            .await
            .map_err(kube_error("listing configmaps"))?;
        for map in maps.items {
            let revision = map
                .labels()
                .get(REVISION_LABEL)
                .cloned()
                .unwrap_or_default();
            if keep.contains(&revision) {
                continue;
            }
            let name = map.name_any();
            match self
                .config_maps
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(err) if is_status(&err, 404) => {}
                Err(err) => return Err(kube_error(format!("deleting configmap {name}"))(err)),
            }
        }
        Ok(())
    }

    async fn write_status(&self, plan: &Plan) -> Result<(), Error> {
        let key = object_key(self.cs);
        let now = (self.ctx.clock)();
        let last = self
            .ctx
            .status_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let since_last =
            last.map(|at| Duration::try_from(now.duration_since(at)).unwrap_or(Duration::ZERO));
        if !status_write_due(self.cs.status.as_ref(), &plan.status, since_last) {
            return Ok(());
        }
        apply_status(
            &self.resources,
            &self.name,
            &plan.status,
            self.seen_version(),
        )
        .await
        .map_err(kube_error("writing status"))?;
        self.ctx
            .status_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, now);
        Ok(())
    }
}

/// Whether `new` should be written over `old`, the status last written
/// `since_last` ago (`None`: not by this process). Any change but the
/// connection counts is written at once. Counts alone are written at once
/// while a rollout moves (they are its progress) and at most once per
/// [`rollout::STABLE_POLL`] otherwise: every status write is a watch event
/// that triggers the next reconcile, so writing every change of a Stable
/// resource's counts made it reconcile itself about once a second under
/// traffic (`a_stable_resource_under_traffic_does_not_write_status_in_a_loop`).
pub fn status_write_due(
    old: Option<&crate::crd::ConnectionServiceStatus>,
    new: &crate::crd::ConnectionServiceStatus,
    since_last: Option<Duration>,
) -> bool {
    let Some(old) = old else {
        return true;
    };
    if old == new {
        return false;
    }
    let mut without_counts = old.clone();
    without_counts.connections = new.connections;
    let counts_only = &without_counts == new;
    let moving = matches!(
        new.phase,
        Some(Phase::Progressing | Phase::Switching | Phase::Draining)
    );
    !counts_only || moving || since_last.is_none_or(|t| t >= rollout::STABLE_POLL)
}

/// The color a set of labels (an object's, or a Service's selector) names:
/// the one place the color label is read.
fn label_color(labels: &std::collections::BTreeMap<String, String>) -> Option<Color> {
    labels.get(COLOR_LABEL).and_then(|c| Color::parse(c))
}

/// Why a pod's container is not running (`REASON: message`), as the
/// kubelet reports it.
fn pod_waiting(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref())
        .and_then(|w| {
            let reason = w.reason.as_deref()?;
            Some(match w.message.as_deref() {
                Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                _ => reason.to_string(),
            })
        })
}

/// The gateway container's restart count.
fn pod_restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |statuses| statuses.iter().map(|c| c.restart_count).sum())
}

/// How the container last ended (`REASON, exit code N`), as the kubelet
/// reports it in `lastState.terminated`.
fn pod_last_exit(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.last_state.as_ref()?.terminated.as_ref())
        .map(|t| {
            let reason = t.reason.as_deref().unwrap_or("Terminated");
            format!("{reason}, exit code {}", t.exit_code)
        })
}

/// The uid of an object's controller (the ownerReference with
/// `controller: true`).
fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    object
        .meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

/// Exactly the operator's gateway pods that can answer, of the pods the
/// selector listed: those controlled by a ReplicaSet that one of its
/// Deployments controls (so a pod that merely carries the labels — another
/// workload of a Helm release — is never sent the admin token), and not
/// terminating or ended (a deleted pod is on its way out and drains by its
/// SIGTERM; a Failed or evicted one keeps its IP but nothing answers there,
/// so waiting for it would hold a drain until its deadline).
fn gateway_pods(
    deployments: &[Deployment],
    replica_sets: &[ReplicaSet],
    pods: Vec<Pod>,
) -> Vec<Pod> {
    let ours: Vec<&str> = deployments
        .iter()
        .filter_map(|d| d.metadata.uid.as_deref())
        .collect();
    let sets: Vec<&str> = replica_sets
        .iter()
        .filter(|rs| controller_uid(*rs).is_some_and(|uid| ours.contains(&uid)))
        .filter_map(|rs| rs.metadata.uid.as_deref())
        .collect();
    pods.into_iter()
        .filter(|pod| controller_uid(pod).is_some_and(|uid| sets.contains(&uid)))
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Failed" | "Succeeded"))
        })
        .collect()
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
}

/// The one place a Deployment is judged Ready: it asks for at least one
/// replica, its controller has seen the latest spec, and every replica is
/// updated and ready, with no old pods left. (The planner only compares the
/// revision it runs.)
fn deployment_view(deployment: &Deployment) -> DeploymentView {
    let replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let revision = deployment
        .labels()
        .get(REVISION_LABEL)
        .cloned()
        .unwrap_or_default();
    let ready = replicas > 0
        && deployment.status.as_ref().is_some_and(|status| {
            let seen = status.observed_generation.unwrap_or(0)
                >= deployment.metadata.generation.unwrap_or(0);
            seen && status.updated_replicas.unwrap_or(0) >= replicas
                && status.ready_replicas.unwrap_or(0) >= replicas
                && status.replicas.unwrap_or(0) == replicas
        });
    DeploymentView {
        revision,
        replicas,
        ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19, defect 5: of the pods the label selector lists, only the
    /// ones the operator's Deployments control (through their ReplicaSets)
    /// and that can answer are asked for their status, with the token.
    #[test]
    fn only_the_operators_running_pods_are_talked_to() {
        let deployment: Deployment = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "chat-blue", "uid": "d-blue"}}),
        )
        .expect("deployment");
        let rs = |name: &str, uid: &str, owner: &str| -> ReplicaSet {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "uid": uid,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "x",
                                     "uid": owner, "controller": true}]}}))
            .expect("replicaset")
        };
        let pod = |name: &str, owner: Option<&str>, extra: serde_json::Value| -> Pod {
            let mut value =
                serde_json::json!({"metadata": {"name": name}, "status": {"phase": "Running"}});
            if let Some(owner) = owner {
                value["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1",
                    "kind": "ReplicaSet", "name": "x", "uid": owner, "controller": true}]);
            }
            if let Some(map) = extra.as_object() {
                for (key, val) in map {
                    value[key.as_str()]
                        .as_object_mut()
                        .expect("object")
                        .extend(val.as_object().expect("object").clone());
                }
            }
            serde_json::from_value(value).expect("pod")
        };
        let sets = vec![
            rs("chat-blue-abc", "rs-ours", "d-blue"),
            rs("other-abc", "rs-other", "d-other"),
        ];
        let pods = vec![
            pod("ours", Some("rs-ours"), serde_json::json!({})),
            pod("labelled-only", None, serde_json::json!({})),
            pod("someone-elses", Some("rs-other"), serde_json::json!({})),
            pod(
                "terminating",
                Some("rs-ours"),
                serde_json::json!({"metadata": {"deletionTimestamp": "2026-12-07T10:00:00Z"}}),
            ),
            pod(
                "evicted",
                Some("rs-ours"),
                serde_json::json!({"status": {"phase": "Failed", "reason": "Evicted"}}),
            ),
            pod(
                "done",
                Some("rs-ours"),
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
        ];
        let kept: Vec<String> = gateway_pods(&[deployment], &sets, pods)
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(kept, ["ours"]);
    }

    #[test]
    fn connection_counts_alone_are_written_on_a_period_unless_a_rollout_moves() {
        use crate::crd::{ColorConnections, ConnectionServiceStatus};
        let status = |phase: Phase, blue: u64, message: &str| ConnectionServiceStatus {
            phase: Some(phase),
            connections: ColorConnections { blue, green: 0 },
            message: Some(message.into()),
            ..ConnectionServiceStatus::default()
        };
        let s = Duration::from_secs;
        let stable = status(Phase::Stable, 10, "blue serves r1");
        let table = [
            (
                None,
                status(Phase::Stable, 10, "blue serves r1"),
                Some(s(1)),
                true,
            ),
            (Some(stable.clone()), stable.clone(), None, false),
            (
                Some(stable.clone()),
                status(Phase::Stable, 11, "blue serves r1"),
                Some(s(1)),
                false,
            ),
            (
                Some(stable.clone()),
                status(Phase::Stable, 11, "blue serves r1"),
                Some(s(30)),
                true,
            ),
            (
                Some(stable.clone()),
                status(Phase::Stable, 11, "blue serves r1"),
                None,
                true,
            ),
            (
                Some(stable.clone()),
                status(Phase::Stable, 10, "blue serves r2"),
                Some(s(1)),
                true,
            ),
            (
                Some(stable.clone()),
                status(Phase::Progressing, 10, "blue serves r1"),
                Some(s(1)),
                true,
            ),
            (
                Some(status(Phase::Draining, 10, "draining")),
                status(Phase::Draining, 9, "draining"),
                Some(s(1)),
                true,
            ),
        ];
        for (n, (old, new, since, due)) in table.into_iter().enumerate() {
            assert_eq!(status_write_due(old.as_ref(), &new, since), due, "row {n}");
        }
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let table = [
            (1, 1),
            (2, 2),
            (3, 4),
            (5, 16),
            (9, 256),
            (10, 300),
            (50, 300),
        ];
        for (failures, seconds) in table {
            assert_eq!(
                error_backoff(failures),
                Duration::from_secs(seconds),
                "{failures}"
            );
        }
    }

    #[test]
    fn deployment_readiness_needs_every_replica_updated_and_the_latest_generation() {
        let ready = |generation: i64,
                     observed: i64,
                     replicas: i32,
                     updated: i32,
                     ready: i32,
                     total: i32| {
            let deployment: Deployment = serde_json::from_value(json!({
                "metadata": {"name": "d", "generation": generation, "labels": {REVISION_LABEL: "r9"}},
                "spec": {"replicas": replicas, "selector": {}, "template": {}},
                "status": {"observedGeneration": observed, "updatedReplicas": updated, "readyReplicas": ready, "replicas": total}
            }))
            .expect("deployment");
            let view = deployment_view(&deployment);
            assert_eq!(view.revision, "r9");
            view.ready
        };
        assert!(ready(2, 2, 3, 3, 3, 3));
        assert!(!ready(3, 2, 3, 3, 3, 3), "controller has not seen the spec");
        assert!(
            !ready(2, 2, 3, 2, 3, 3),
            "an old pod is still in the template's place"
        );
        assert!(!ready(2, 2, 3, 3, 2, 3), "one pod not ready");
        assert!(!ready(2, 2, 3, 3, 3, 4), "an old pod is still terminating");
    }
}
