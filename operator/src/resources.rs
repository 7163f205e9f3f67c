//! The objects a `ConnectionService` owns, built as plain data.
//!
//! Every builder here is a pure function of the resource (and a color or a
//! revision): the reconciler applies what they return with server-side apply,
//! and the tests compare them field by field.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, Secret, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

use crate::crd::{Color, ConnectionService};

/// The gateway's public port inside the pod (WebSocket, /readyz, /metrics).
pub const PUBLIC_PORT: u16 = 8080;
/// The gateway's admin port inside the pod (drain, status, publish API).
pub const ADMIN_PORT: u16 = 9090;
/// Label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label naming the `ConnectionService` an object belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming who manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label carrying the color of a Deployment and its pods.
pub const COLOR_LABEL: &str = "switchyard.dev/color";
/// Label carrying the revision of a pod template or ConfigMap.
pub const REVISION_LABEL: &str = "switchyard.dev/revision";
/// The field manager of every server-side apply, and the managed-by label value.
pub const FIELD_MANAGER: &str = "switchyard-operator";
/// The key of the admin token in its Secret.
pub const TOKEN_KEY: &str = "token";
/// The key of the gateway config in its ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the ConfigMap is mounted in the gateway container.
pub const CONFIG_DIR: &str = "/etc/switchyard/config";
/// Seconds added to the drain deadline for `terminationGracePeriodSeconds`:
/// a pod deleted mid-drain gets the whole drain plus time to exit.
pub const TERMINATION_MARGIN_SECONDS: i64 = 15;

/// `NAME-blue` or `NAME-green`.
pub fn deployment_name(name: &str, color: Color) -> String {
    format!("{name}-{color}")
}

/// The preview Service, which selects the color being rolled out.
pub fn preview_service_name(name: &str) -> String {
    format!("{name}-preview")
}

/// The Secret holding the admin token.
pub fn admin_secret_name(name: &str) -> String {
    format!("{name}-admin")
}

/// The ConfigMap holding one revision's gateway config.
pub fn config_map_name(name: &str, revision: &str) -> String {
    if revision.is_empty() {
        format!("{name}-config")
    } else {
        format!("{name}-config-{revision}")
    }
}

/// Labels every owned object carries.
pub fn instance_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), "switchyard".to_string()),
        (INSTANCE_LABEL.to_string(), name.to_string()),
        (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
    ])
}

/// The label selector (as a string) for everything owned by `name`.
pub fn instance_selector(name: &str) -> String {
    format!("{INSTANCE_LABEL}={name},{MANAGED_BY_LABEL}={FIELD_MANAGER}")
}

/// The label selector (as a string) for the gateway pods of `name`, either
/// color: the labels every pod template carries.
pub fn pod_selector(name: &str) -> String {
    format!(
        "{NAME_LABEL}=switchyard,{INSTANCE_LABEL}={name},{COLOR_LABEL} in ({},{})",
        Color::Blue.as_str(),
        Color::Green.as_str()
    )
}

/// Labels selecting one color's pods (the Deployment's immutable selector).
pub fn color_selector(name: &str, color: Color) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), "switchyard".to_string()),
        (INSTANCE_LABEL.to_string(), name.to_string()),
        (COLOR_LABEL.to_string(), color.as_str().to_string()),
    ])
}

fn owner(cs: &ConnectionService) -> Vec<OwnerReference> {
    cs.controller_owner_ref(&()).into_iter().collect()
}

fn meta(cs: &ConnectionService, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cs.namespace(),
        labels: Some(labels),
        owner_references: Some(owner(cs)),
        ..ObjectMeta::default()
    }
}

/// The revision of the spec: a hash of the pod template (built without its
/// revision-specific names) and of the gateway config. Replicas, the Service
/// and the rollout policy do not change it, so scaling is not a rollout.
pub fn revision(cs: &ConnectionService) -> String {
    let template = pod_template(cs, Color::Blue, "");
    let mut input = serde_json::to_vec(&template).expect("a pod template always serializes");
    input.push(0);
    input.extend_from_slice(cs.spec.config.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..5]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The gateway container's environment: identity and listen addresses from
/// the downward API (each pod binds its own IP, so the admin port is never on
/// a shared address), the admin token from the Secret, the SIGTERM drain
/// bounded by the rollout's deadline, JSON logs; then the user's variables.
/// `env` is a list keyed by name: server-side apply refuses a body with one
/// name twice (500 "duplicate entries for key"), so a user's variable
/// replaces the operator's of that name in place (keeping the order that
/// `$(VAR)` references rely on) and the rest follow.
fn gateway_env(cs: &ConnectionService) -> Vec<EnvVar> {
    let name = cs.name_any();
    let deadline_ms = u64::from(cs.spec.rollout.drain.deadline_seconds) * 1000;
    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_IP", "status.podIP"),
        env_value("SWITCHYARD_SERVER_ID", "$(POD_NAME)"),
        env_value("SWITCHYARD_LISTEN", format!("$(POD_IP):{PUBLIC_PORT}")),
        env_value("SWITCHYARD_ADMIN_LISTEN", format!("$(POD_IP):{ADMIN_PORT}")),
        EnvVar {
            name: "SWITCHYARD_ADMIN__TOKEN".to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: admin_secret_name(&name),
                    key: TOKEN_KEY.to_string(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        },
        env_value("SWITCHYARD_DRAIN__GRACE_PERIOD_MS", deadline_ms.to_string()),
        env_value("SWITCHYARD_LOG__FORMAT", "json"),
    ];
    for user in &cs.spec.pod.env {
        match env.iter_mut().find(|e| e.name == user.name) {
            Some(slot) => *slot = user.clone(),
            None => env.push(user.clone()),
        }
    }
    env
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("ws".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The gateway pod template for a color at a revision.
pub fn pod_template(cs: &ConnectionService, color: Color, revision: &str) -> PodTemplateSpec {
    let name = cs.name_any();
    let spec = &cs.spec;
    let mut labels = color_selector(&name, color);
    labels.insert(REVISION_LABEL.to_string(), revision.to_string());
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), PUBLIC_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    let container = Container {
        name: "gateway".to_string(),
        image: Some(spec.image.clone()),
        args: Some(vec![
            "--config".to_string(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(gateway_env(cs)),
        ports: Some(vec![
            ContainerPort {
                name: Some("ws".to_string()),
                container_port: i32::from(PUBLIC_PORT),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".to_string()),
                container_port: i32::from(ADMIN_PORT),
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 2, 1)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: spec.pod.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "config".to_string(),
            mount_path: CONFIG_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let grace = i64::from(spec.rollout.drain.deadline_seconds) + TERMINATION_MARGIN_SECONDS;
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            // Pod Security `restricted`: non-root and the runtime's seccomp
            // profile for the whole pod; the container drops every
            // capability and cannot escalate (tests/src/kube/podsecurity.rs
            // checks every pod the emulator starts in the rollout tests).
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            termination_grace_period_seconds: Some(grace),
            volumes: Some(vec![Volume {
                name: "config".to_string(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map_name(&name, revision),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            node_selector: non_empty_map(&spec.pod.node_selector),
            tolerations: non_empty_vec(&spec.pod.tolerations),
            affinity: spec.pod.affinity.clone(),
            ..PodSpec::default()
        }),
    }
}

fn non_empty_map(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then(|| map.clone())
}

fn non_empty_vec<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

/// One color's Deployment running `revision` with `replicas` pods.
pub fn deployment(
    cs: &ConnectionService,
    color: Color,
    revision: &str,
    replicas: i32,
) -> Deployment {
    let name = cs.name_any();
    let mut labels = instance_labels(&name);
    labels.insert(COLOR_LABEL.to_string(), color.as_str().to_string());
    labels.insert(REVISION_LABEL.to_string(), revision.to_string());
    Deployment {
        metadata: meta(cs, deployment_name(&name, color), labels),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(color_selector(&name, color)),
                match_expressions: None,
            },
            template: pod_template(cs, color, revision),
            revision_history_limit: Some(2),
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn service_object(cs: &ConnectionService, name: String, color: Color, public: bool) -> Service {
    let mut ports = vec![ServicePort {
        name: Some("ws".to_string()),
        port: if public {
            cs.spec.service.port
        } else {
            i32::from(PUBLIC_PORT)
        },
        target_port: Some(IntOrString::String("ws".to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }];
    if !public {
        ports.push(ServicePort {
            name: Some("admin".to_string()),
            port: i32::from(ADMIN_PORT),
            target_port: Some(IntOrString::String("admin".to_string())),
            protocol: Some("TCP".to_string()),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: meta(cs, name, instance_labels(&cs.name_any())),
        spec: Some(ServiceSpec {
            type_: Some(if public {
                cs.spec.service.type_.as_str().to_string()
            } else {
                "ClusterIP".to_string()
            }),
            selector: Some(color_selector(&cs.name_any(), color)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The public Service, selecting `color`. It carries only the public port:
/// the admin port is never exposed through it.
pub fn service(cs: &ConnectionService, color: Color) -> Service {
    service_object(cs, cs.name_any(), color, true)
}

/// The preview Service on `color` (in-cluster only; public and admin ports),
/// for smoke tests against a new color before it is promoted.
pub fn preview_service(cs: &ConnectionService, color: Color) -> Service {
    service_object(cs, preview_service_name(&cs.name_any()), color, false)
}

/// The ConfigMap holding `revision`'s gateway config.
pub fn config_map(cs: &ConnectionService, revision: &str) -> ConfigMap {
    let name = cs.name_any();
    let mut labels = instance_labels(&name);
    labels.insert(REVISION_LABEL.to_string(), revision.to_string());
    ConfigMap {
        metadata: meta(cs, config_map_name(&name, revision), labels),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            cs.spec.config.clone(),
        )])),
        ..ConfigMap::default()
    }
}

/// The admin-token Secret, created once with `token` (never re-applied, so
/// the token does not change under running pods).
pub fn admin_secret(cs: &ConnectionService, token: &str) -> Secret {
    Secret {
        metadata: meta(
            cs,
            admin_secret_name(&cs.name_any()),
            instance_labels(&cs.name_any()),
        ),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_string()),
        ..Secret::default()
    }
}

/// A fresh admin token: 256 random bits, hex.
pub fn new_admin_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The PodDisruptionBudget: voluntary evictions take at most one gateway at a
/// time, so a node drain cannot close a whole color's connections at once.
pub fn pod_disruption_budget(cs: &ConnectionService) -> PodDisruptionBudget {
    let name = cs.name_any();
    // The gateway pods of both colors and nothing else (the selector of
    // `pod_selector`): a budget that also selected another pod carrying
    // the instance label would count it against the gateways.
    let mut selector = color_selector(&name, Color::Blue);
    selector.remove(COLOR_LABEL);
    PodDisruptionBudget {
        metadata: meta(cs, name.clone(), instance_labels(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: COLOR_LABEL.to_string(),
                    operator: "In".to_string(),
                    values: Some(vec![
                        Color::Blue.as_str().to_string(),
                        Color::Green.as_str().to_string(),
                    ]),
                }]),
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ConnectionServiceSpec;

    pub(crate) fn sample(image: &str, config: &str) -> ConnectionService {
        let spec: ConnectionServiceSpec = serde_json::from_value(serde_json::json!({
            "image": image,
            "config": config,
        }))
        .expect("spec");
        let mut cs = ConnectionService::new("chat", spec);
        cs.metadata.namespace = Some("prod".to_string());
        cs.metadata.uid = Some("uid-1".to_string());
        cs
    }

    #[test]
    fn revision_changes_with_image_and_config_but_not_with_replicas() {
        let base = sample("gw:1", "a: 1\n");
        let rev = revision(&base);
        assert_eq!(rev.len(), 10);
        assert_eq!(rev, revision(&sample("gw:1", "a: 1\n")), "deterministic");
        assert_ne!(rev, revision(&sample("gw:2", "a: 1\n")), "image");
        assert_ne!(rev, revision(&sample("gw:1", "a: 2\n")), "config");
        let mut scaled = sample("gw:1", "a: 1\n");
        scaled.spec.replicas = 7;
        scaled.spec.service.port = 8000;
        assert_eq!(
            rev,
            revision(&scaled),
            "replicas and service are not a rollout"
        );
        let mut longer = sample("gw:1", "a: 1\n");
        longer.spec.rollout.drain.deadline_seconds = 900;
        assert_ne!(
            rev,
            revision(&longer),
            "the grace period is in the template"
        );
    }

    #[test]
    fn deployment_carries_everything_a_gateway_pod_needs() {
        let cs = sample("gw:1", "auth:\n  anonymous: true\n");
        let deployment = deployment(&cs, Color::Green, "abc", 3);
        assert_eq!(deployment.metadata.name.as_deref(), Some("chat-green"));
        assert_eq!(deployment.metadata.namespace.as_deref(), Some("prod"));
        let owner = &deployment
            .metadata
            .owner_references
            .as_ref()
            .expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ConnectionService", "uid-1", Some(true))
        );
        let spec = deployment.spec.expect("spec");
        assert_eq!(spec.replicas, Some(3));
        let selector = spec.selector.match_labels.expect("selector");
        assert_eq!(selector[COLOR_LABEL], "green");
        assert!(
            !selector.contains_key(REVISION_LABEL),
            "selectors are immutable"
        );
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone());
        assert_eq!(template_labels.expect("labels")[REVISION_LABEL], "abc");
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.termination_grace_period_seconds, Some(300 + 15));
        assert_eq!(
            pod.volumes.expect("volumes")[0]
                .config_map
                .as_ref()
                .map(|c| c.name.clone()),
            Some("chat-config-abc".to_string())
        );
        let container = &pod.containers[0];
        let env: BTreeMap<_, _> = container
            .env
            .as_ref()
            .expect("env")
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(
            env["SWITCHYARD_LISTEN"].value.as_deref(),
            Some("$(POD_IP):8080")
        );
        assert_eq!(
            env["SWITCHYARD_ADMIN_LISTEN"].value.as_deref(),
            Some("$(POD_IP):9090")
        );
        let token = env["SWITCHYARD_ADMIN__TOKEN"]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("token from the secret");
        assert_eq!(
            (token.name.as_str(), token.key.as_str()),
            ("chat-admin", "token")
        );
        assert_eq!(
            env["POD_IP"]
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("status.podIP")
        );
        let readiness = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(readiness.and_then(|h| h.path.as_deref()), Some("/readyz"));
        let liveness = container
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(liveness.and_then(|h| h.path.as_deref()), Some("/healthz"));
    }

    #[test]
    fn user_env_is_merged_by_name_and_wins() {
        let mut cs = sample("gw:1", "");
        cs.spec.pod.env = vec![
            env_value("SWITCHYARD_LOG__FORMAT", "text"),
            env_value("EXTRA", "1"),
            // Twice in the user's own list (a CRD from before list-type
            // map let it in): the last one, once.
            env_value("EXTRA", "2"),
        ];
        let env = gateway_env(&cs);
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "no name twice: {names:?}");
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.as_deref())
        };
        assert_eq!(value("SWITCHYARD_LOG__FORMAT"), Some("text"));
        assert_eq!(value("EXTRA"), Some("2"));
        // Replaced in place: POD_IP still comes before what references it.
        let at = |name: &str| names.iter().position(|n| *n == name);
        assert!(at("POD_IP") < at("SWITCHYARD_LISTEN"));
        assert_eq!(at("EXTRA"), Some(names.len() - 1));
    }

    #[test]
    fn services_select_a_color_and_only_the_preview_exposes_admin() {
        let cs = sample("gw:1", "");
        let public = service(&cs, Color::Blue);
        let spec = public.spec.expect("spec");
        assert_eq!(spec.selector.expect("selector")[COLOR_LABEL], "blue");
        let ports = spec.ports.expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 80);
        let preview = preview_service(&cs, Color::Green);
        assert_eq!(preview.metadata.name.as_deref(), Some("chat-preview"));
        let ports = preview.spec.expect("spec").ports.expect("ports");
        assert_eq!(
            ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            vec![8080, 9090]
        );
    }

    #[test]
    fn admin_tokens_are_long_and_fresh() {
        let a = new_admin_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_admin_token());
    }
}
