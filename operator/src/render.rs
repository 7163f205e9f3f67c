//! `switchyard-operator render -f FILE`: every object the operator would
//! apply for a ConnectionService, as YAML, without a cluster — for review,
//! GitOps diffs, and the packaging check that evaluates the chart's pod
//! selectors against the pods these Deployments create
//! (tests/packaging/verify.py). Built from the same constructors the
//! reconciler applies ([`crate::resources`]).

use kube::api::ObjectMeta;
use kube::ResourceExt;
use serde::Serialize;

use crate::crd::{Color, ConnectionService};
use crate::resources;

/// Why a resource could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The file is not a ConnectionService.
    #[error("not a ConnectionService: {0}")]
    Parse(#[from] serde_yaml::Error),
}

/// Parses a ConnectionService from YAML (namespace `default` when it names none).
pub fn parse(text: &str) -> Result<ConnectionService, RenderError> {
    let mut cs: ConnectionService = serde_yaml::from_str(text)?;
    if cs.namespace().is_none() {
        cs.metadata.namespace = Some("default".into());
    }
    Ok(cs)
}

/// The objects, as one YAML stream: the revision's ConfigMap, both colors'
/// Deployments (blue at `spec.replicas`, the first install; green at zero,
/// as between rollouts), the Service, the preview Service, the
/// PodDisruptionBudget. The admin Secret is created once with a random
/// token, so only its name is shown. Owner references need the resource's
/// uid, which only a cluster gives, and are left out.
pub fn render(cs: &ConnectionService) -> String {
    let revision = resources::revision(cs);
    let mut out = format!(
        "# Rendered by `switchyard-operator render` for ConnectionService {}/{} at revision {revision}.\n# Secret {}: created once with a random admin token (not rendered).\n",
        cs.namespace().unwrap_or_default(),
        cs.name_any(),
        resources::admin_secret_name(&cs.name_any()),
    );
    let mut push = |object: &dyn ErasedYaml| {
        out.push_str("---\n");
        out.push_str(&object.yaml());
    };
    push(&resources::config_map(cs, &revision));
    push(&resources::deployment(
        cs,
        Color::Blue,
        &revision,
        cs.spec.replicas,
    ));
    push(&resources::deployment(cs, Color::Green, &revision, 0));
    push(&resources::service(cs, Color::Blue));
    push(&resources::preview_service(cs, Color::Blue));
    push(&resources::pod_disruption_budget(cs));
    out
}

/// An object printed as YAML without its owner references.
trait ErasedYaml {
    fn yaml(&self) -> String;
}

impl<K: kube::Resource<DynamicType = ()> + Serialize + Clone> ErasedYaml for K {
    fn yaml(&self) -> String {
        let mut object = self.clone();
        let meta: &mut ObjectMeta = object.meta_mut();
        meta.owner_references = None;
        let mut value = serde_json::to_value(&object).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".into(), K::api_version(&()).into());
            map.insert("kind".into(), K::kind(&()).into());
        }
        serde_yaml::to_string(&value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn renders_every_applied_object_with_matching_selectors() {
        let cs = parse(
            "apiVersion: switchyard.dev/v1alpha1\nkind: ConnectionService\nmetadata: {name: chat}\nspec: {image: gw:1, replicas: 3}\n",
        )
        .expect("parse");
        let text = render(&cs);
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
            .filter(|d| !d.is_null())
            .collect();
        let kinds: Vec<String> = docs
            .iter()
            .map(|d| {
                format!(
                    "{} {}",
                    d["kind"].as_str().unwrap_or(""),
                    d["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect();
        let revision = resources::revision(&cs);
        assert_eq!(
            kinds,
            [
                format!("ConfigMap chat-config-{revision}"),
                "Deployment chat-blue".into(),
                "Deployment chat-green".into(),
                "Service chat".into(),
                "Service chat-preview".into(),
                "PodDisruptionBudget chat".into(),
            ]
        );
        assert!(text.contains("Secret chat-admin: created once"));
        assert!(!text.contains("ownerReferences"));
        assert_eq!(docs[0]["metadata"]["namespace"], "default");
        assert_eq!(docs[1]["spec"]["replicas"], 3);
        assert_eq!(docs[2]["spec"]["replicas"], 0);
        // The Service and the PDB select the blue pods.
        let pod_labels = &docs[1]["spec"]["template"]["metadata"]["labels"];
        for selector in [
            &docs[3]["spec"]["selector"],
            &docs[5]["spec"]["selector"]["matchLabels"],
        ] {
            for (key, value) in selector.as_object().expect("selector") {
                assert_eq!(&pod_labels[key], value, "{key}");
            }
        }
    }
}
