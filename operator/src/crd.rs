//! The `ConnectionService` custom resource (`switchyard.dev/v1alpha1`).
//!
//! The spec says what should run (image, replicas, gateway config, pod
//! overrides, service, rollout policy); the status says where a rollout is.
//! Everything the operator needs to resume after its own restart lives in the
//! status and in the objects it owns, never in its memory.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation that promotes a rollout waiting for approval (`autoPromote: false`).
pub const PROMOTE_ANNOTATION: &str = "switchyard.dev/promote";
/// Annotation that aborts the running rollout: drains are cancelled and the
/// Service points back at the old color.
pub const ABORT_ANNOTATION: &str = "switchyard.dev/abort";

/// Desired state of a fleet of Switchyard gateways.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "ConnectionService",
    namespaced,
    shortname = "csvc",
    status = "ConnectionServiceStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activeColor"}"#,
    printcolumn = r#"{"name":"Blue","type":"integer","jsonPath":".status.connections.blue","description":"open connections on the blue pods"}"#,
    printcolumn = r#"{"name":"Green","type":"integer","jsonPath":".status.connections.green","description":"open connections on the green pods"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.activeRevision","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionServiceSpec {
    /// Gateway container image, e.g. `ghcr.io/switchyard/gateway:0.1.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Gateway pods per color.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Gateway configuration (the YAML the gateway reads with `--config`).
    /// Listen addresses, server id and the admin token are set by the operator.
    #[serde(default)]
    pub config: String,
    /// Overrides applied to the gateway pods.
    #[serde(default)]
    pub pod: PodOverrides,
    /// The Service clients connect through.
    #[serde(default)]
    pub service: ServiceSettings,
    /// How a new revision replaces the running one.
    #[serde(default)]
    pub rollout: RolloutPolicy,
}

fn default_replicas() -> i32 {
    2
}

/// Pod settings passed through to both colors' pod templates.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Container resource requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables for the gateway container, merged by
    /// name with the operator's own (a variable named like one of them
    /// replaces it). Names are unique, as in a container's `env`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<EnvVar>,
    /// Node selector for the gateway pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the gateway pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity rules for the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// Kubernetes Service type for the public Service.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The name Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The public Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSettings {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port the Service listens on (forwarded to the gateway's public port).
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_service_port() -> i32 {
    80
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            type_: ServiceType::default(),
            port: default_service_port(),
        }
    }
}

/// How connections are moved off the old pods.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DrainModeSetting {
    /// Close each connection with 4000 at its slot.
    Close,
    /// Send `migrate` first; clients move by themselves, stragglers get 4000.
    #[default]
    MakeBeforeBreak,
}

impl From<DrainModeSetting> for switchyard_protocol::drain::DrainMode {
    fn from(mode: DrainModeSetting) -> Self {
        match mode {
            DrainModeSetting::Close => switchyard_protocol::drain::DrainMode::Close,
            DrainModeSetting::MakeBeforeBreak => {
                switchyard_protocol::drain::DrainMode::MakeBeforeBreak
            }
        }
    }
}

/// The drain the old pods run after the Service switches.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainPolicy {
    /// Close or make-before-break.
    #[serde(default)]
    pub mode: DrainModeSetting,
    /// Closes are spread over this many seconds.
    #[serde(default = "default_window_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub window_seconds: u32,
    /// At most this many closes per second across all old pods (each pod gets
    /// an equal share, at least 1).
    #[serde(default = "default_max_rate")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_rate: u32,
    /// Whatever is still connected this many seconds after the drain started
    /// is closed at once.
    #[serde(default = "default_deadline_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub deadline_seconds: u32,
    /// Each closed client waits a random `retry_ms` up to this before reconnecting.
    #[serde(default = "default_retry_jitter_ms")]
    #[schemars(range(min = 0, max = 600000))]
    pub retry_jitter_ms: u32,
    /// make-before-break: how long a client has after `migrate` to leave by itself.
    #[serde(default = "default_migrate_grace_ms")]
    #[schemars(range(min = 0, max = 600000))]
    pub migrate_grace_ms: u32,
}

fn default_window_seconds() -> u32 {
    60
}
fn default_max_rate() -> u32 {
    100
}
fn default_deadline_seconds() -> u32 {
    300
}
fn default_retry_jitter_ms() -> u32 {
    2000
}
fn default_migrate_grace_ms() -> u32 {
    5000
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            mode: DrainModeSetting::default(),
            window_seconds: default_window_seconds(),
            max_rate: default_max_rate(),
            deadline_seconds: default_deadline_seconds(),
            retry_jitter_ms: default_retry_jitter_ms(),
            migrate_grace_ms: default_migrate_grace_ms(),
        }
    }
}

/// How a new revision replaces the running one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// Switch as soon as the new color is Ready; when false, wait for the
    /// `switchyard.dev/promote` annotation.
    #[serde(default = "default_true")]
    pub auto_promote: bool,
    /// The new color must be Ready within this many seconds, or the rollout fails.
    #[serde(default = "default_ready_timeout_seconds")]
    #[schemars(range(min = 5, max = 86400))]
    pub ready_timeout_seconds: u32,
    /// The drain of the old color.
    #[serde(default)]
    pub drain: DrainPolicy,
    /// Seconds between the old color emptying and its scale-down to zero.
    #[serde(default = "default_scale_down_delay_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: u32,
    /// Seconds to wait after the Service's EndpointSlices list only the
    /// color it selects before the other color is drained: the time every
    /// node's proxy may still take to follow them (kube-proxy syncs at
    /// least once a second by default).
    #[serde(default = "default_traffic_settle_seconds")]
    #[schemars(range(min = 0, max = 300))]
    pub traffic_settle_seconds: u32,
}

fn default_true() -> bool {
    true
}
fn default_ready_timeout_seconds() -> u32 {
    300
}
fn default_scale_down_delay_seconds() -> u32 {
    30
}
fn default_traffic_settle_seconds() -> u32 {
    2
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            auto_promote: true,
            ready_timeout_seconds: default_ready_timeout_seconds(),
            drain: DrainPolicy::default(),
            scale_down_delay_seconds: default_scale_down_delay_seconds(),
            traffic_settle_seconds: default_traffic_settle_seconds(),
        }
    }
}

/// One of the two Deployments.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// `NAME-blue`.
    Blue,
    /// `NAME-green`.
    Green,
}

impl Color {
    /// The other color.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// Lowercase name, as used in object names and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    /// Parses a label value.
    pub fn parse(value: &str) -> Option<Color> {
        match value {
            "blue" => Some(Color::Blue),
            "green" => Some(Color::Green),
            _ => None,
        }
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the resource is in its lifecycle.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// One color serves; nothing is moving.
    Stable,
    /// The new color is scaling up; the operator waits for it to be Ready (and promoted).
    Progressing,
    /// The Service now selects the new color; drains are about to start.
    Switching,
    /// The old pods are migrating their clients to the new color.
    Draining,
    /// The new color did not become Ready in time; it was scaled to zero, the
    /// old one is untouched. A spec change starts a new rollout.
    Failed,
}

impl Phase {
    /// The name shown in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stable => "Stable",
            Phase::Progressing => "Progressing",
            Phase::Switching => "Switching",
            Phase::Draining => "Draining",
            Phase::Failed => "Failed",
        }
    }

    /// Every phase, for metrics that show one series per phase.
    pub const ALL: [Phase; 5] = [
        Phase::Stable,
        Phase::Progressing,
        Phase::Switching,
        Phase::Draining,
        Phase::Failed,
    ];
}

/// Open connections per color, as the gateways report them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ColorConnections {
    /// On the blue pods.
    pub blue: u64,
    /// On the green pods.
    pub green: u64,
}

impl ColorConnections {
    /// The count for one color.
    pub fn get(&self, color: Color) -> u64 {
        match color {
            Color::Blue => self.blue,
            Color::Green => self.green,
        }
    }
}

/// The running (or last) rollout.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutProgress {
    /// The color being replaced.
    pub from_color: Color,
    /// Its revision.
    pub from_revision: String,
    /// The color being rolled out.
    pub to_color: Color,
    /// Its revision.
    pub to_revision: String,
    /// When the rollout started.
    pub started: Time,
    /// When the current phase began.
    pub phase_since: Time,
    /// When the old pods were told to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_started: Option<Time>,
    /// When the old color reached zero connections (or its deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_at: Option<Time>,
    /// Connections on the old color when the drain started.
    #[serde(default)]
    pub total: u64,
    /// Connections that have left the old color since.
    #[serde(default)]
    pub drained: u64,
    /// Connections still on the old color.
    #[serde(default)]
    pub remaining: u64,
    /// Since when the new color has been seen not Ready (unset while it is
    /// Ready): the clock of the ready timeout, which a Ready observation
    /// stops. Progressing starts it at the rollout's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unready_since: Option<Time>,
    /// Set once the rollout is being undone after the switch (abort
    /// annotation, a revert of the spec, or the new color unready past the
    /// ready timeout): why. The undo takes several reconciles — the old
    /// color back to its replicas, its drains cancelled, Ready, then the
    /// Service — and this keeps it going whatever the annotations do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborting: Option<AbortReason>,
    /// When the public Service's EndpointSlices were first seen listing
    /// only ready pods of the color it now selects (the new color, or the
    /// old one during an undo): the settle time runs from here, and the
    /// other color is drained only after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_moved: Option<Time>,
    /// When the operator first saw the Service on that color with its
    /// EndpointSlices still listing other pods: past the ready timeout from
    /// here, the wait ends with a Warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_waiting_since: Option<Time>,
}

/// Why a rollout is being undone.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AbortReason {
    /// The abort annotation.
    Aborted,
    /// The spec went back to the old revision.
    Reverted,
    /// The new color stayed unready past the ready timeout after the switch.
    Unready,
}

/// Observed state, written by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionServiceStatus {
    /// Stable, Progressing, Switching, Draining or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The color the Service selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_color: Option<Color>,
    /// The revision the active color runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_revision: Option<String>,
    /// The revision the spec asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<String>,
    /// A revision that failed or was aborted: not retried until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// Open connections per color.
    #[serde(default)]
    pub connections: ColorConnections,
    /// The running or last rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutProgress>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A human-readable summary of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Container restarts of each gateway pod (a crash, an OOM kill), as far
    /// as they have been reported with a `GatewayRestarted` Event: a pod
    /// restarting again is reported again, once per restart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_restarts: BTreeMap<String, i32>,
}

/// The longest ConnectionService name: it names Services (`NAME`,
/// `NAME-preview`), which must be DNS-1035 labels of at most 63 characters,
/// and is a label value (at most 63) on everything the operator creates.
pub const MAX_NAME_LENGTH: usize = 63 - "-preview".len();

/// What a ConnectionService name may look like: a DNS-1035 label (a Service
/// name), which is narrower than the DNS subdomain a custom resource may
/// otherwise be named by (no dots, no leading digit).
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// The CRD: the derived one, with `metadata.name` held to what the objects
/// the operator creates from it need ([`MAX_NAME_LENGTH`], [`NAME_PATTERN`]),
/// so a name Kubernetes would refuse half-way through an install is refused
/// when the resource is created. (Kubernetes allows a CRD schema to restrict
/// `metadata.name`, and nothing else of `metadata`.)
pub fn crd() -> CustomResourceDefinition {
    let mut crd = ConnectionService::crd();
    let name = JSONSchemaProps {
        type_: Some("string".into()),
        description: Some(format!(
            "A DNS-1035 label of at most {MAX_NAME_LENGTH} characters: the name of the Services `NAME` and `NAME-preview`."
        )),
        max_length: Some(MAX_NAME_LENGTH as i64),
        pattern: Some(NAME_PATTERN.into()),
        ..JSONSchemaProps::default()
    };
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let metadata = schema
            .properties
            .get_or_insert_with(BTreeMap::new)
            .entry("metadata".into())
            .or_default();
        metadata.type_ = Some("object".into());
        metadata.properties = Some(BTreeMap::from([("name".to_string(), name.clone())]));
    }
    crd
}

/// The CRD as YAML, as `switchyard-operator crd` prints it and as committed
/// under k8s/ and charts/.
pub fn crd_yaml() -> String {
    let crd = crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!("# Generated by `switchyard-operator crd`; do not edit.\n{body}")
}
