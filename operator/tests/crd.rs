//! The CRD committed for kubectl users (k8s/) and Helm (charts/) is the one
//! the code generates, and its schema validates what the operator relies on.

use std::path::PathBuf;

use switchyard_operator::crd::{crd, crd_yaml, MAX_NAME_LENGTH, NAME_PATTERN};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn committed_copies_match_the_generated_crd() {
    let generated = crd_yaml();
    for path in [
        "k8s/base/crd.yaml",
        "charts/switchyard/crds/connectionservices.yaml",
    ] {
        let committed = std::fs::read_to_string(repo_file(path))
            .unwrap_or_else(|err| panic!("reading {path}: {err}"));
        assert!(
            committed == generated,
            "{path} is stale: run `cargo run -p switchyard-operator -- crd > {path}`"
        );
    }
}

#[test]
fn schema_validates_and_shows_what_kubectl_needs() {
    let crd = serde_json::to_value(crd()).expect("crd");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "switchyard.dev");
    assert_eq!(spec["names"]["shortNames"][0], "csvc");
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(
        version["subresources"]["status"].is_object(),
        "status subresource"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Phase", "Active", "Blue", "Green", "Revision", "Age"]
    );
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let fields = &schema["spec"]["properties"];
    assert_eq!(schema["spec"]["required"][0], "image");
    assert_eq!(fields["image"]["minLength"], 1);
    assert_eq!(fields["replicas"]["minimum"], 0.0);
    assert_eq!(fields["service"]["properties"]["port"]["maximum"], 65535.0);
    let drain = &fields["rollout"]["properties"]["drain"]["properties"];
    assert_eq!(
        drain["mode"]["enum"],
        serde_json::json!(["close", "make-before-break"])
    );
    assert_eq!(drain["maxRate"]["minimum"], 1.0);
    assert_eq!(
        schema["status"]["properties"]["phase"]["enum"],
        serde_json::json!(["Stable", "Progressing", "Switching", "Draining", "Failed"])
    );
    // A name the operator's Services and labels can carry, checked on create.
    let name = &schema["metadata"]["properties"]["name"];
    assert_eq!(name["maxLength"], MAX_NAME_LENGTH as u64);
    assert_eq!(name["pattern"], NAME_PATTERN);
    assert_eq!(
        format!("chat-{}", "x".repeat(MAX_NAME_LENGTH - 5)).len() + "-preview".len(),
        63
    );
}
