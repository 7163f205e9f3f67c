//! What kube-apiserver refuses, or rewrites, before it stores an object —
//! the parts the operator's writes can meet:
//!
//! - **Custom resources against their CRD's `openAPIV3Schema`**: unknown
//!   fields pruned (unless `x-kubernetes-preserve-unknown-fields`),
//!   `default`s filled in, then `type`, `required`, `enum`, `minimum` /
//!   `maximum`, `minLength` / `maxLength`, `pattern`, `minItems` /
//!   `maxItems`, `nullable`, `x-kubernetes-int-or-string` and the list
//!   types (`x-kubernetes-list-type: map` with its keys, `set`) checked; any
//!   violation is a 422 `Invalid` naming each field, as the API server
//!   answers. CEL validation rules are not evaluated (none are used).
//! - **Names and labels** of every object (DNS-1035 for Services, DNS-1123
//!   subdomains otherwise; label keys and 63-character values), and
//!   environment variable names in pod templates, 422.
//! - **Server-side apply of associative lists**: Kubernetes' own types mark
//!   lists such as a container's `env` (by `name`) or `ports` (by
//!   `containerPort` and `protocol`) as maps; an applied configuration
//!   carrying two entries with one key cannot be made into a typed patch,
//!   and the API server answers 500 "duplicate entries for key" whether or
//!   not the apply is forced.

use serde_json::{Map, Value};

use super::store::ApiError;

/// Validates (after pruning and defaulting, in place) a custom resource
/// against its CRD's `schema`.
pub fn custom_resource(
    schema: &Value,
    kind: &str,
    group: &str,
    name: &str,
    object: &mut Value,
) -> Result<(), ApiError> {
    prune_and_default(schema, object, true);
    let mut errors = Vec::new();
    check(schema, object, "", &mut errors);
    invalid(kind, group, name, errors)
}

/// `errors` (field-level causes) as the API server's 422 for object `name`
/// of `kind` in `group`: one cause as is, several in brackets.
fn invalid(kind: &str, group: &str, name: &str, mut errors: Vec<String>) -> Result<(), ApiError> {
    if errors.is_empty() {
        return Ok(());
    }
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    let causes = if errors.len() == 1 {
        errors.remove(0)
    } else {
        format!("[{}]", errors.join(", "))
    };
    Err(ApiError::new(
        422,
        "Invalid",
        format!("{qualified} \"{name}\" is invalid: {causes}"),
    ))
}

/// Drops fields the schema does not know and fills in `default`s, as the
/// API server does on every write. `root`: `apiVersion`, `kind` and
/// `metadata` are the server's, never pruned.
fn prune_and_default(schema: &Value, value: &mut Value, root: bool) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none()
    {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            if let Some(properties) = properties {
                for (key, property) in properties {
                    if let (None, Some(default)) = (map.get(key), property.get("default")) {
                        map.insert(key.clone(), default.clone());
                    }
                }
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let server_owned =
                    root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata");
                let child = properties.and_then(|p| p.get(&key)).or(additional);
                match child {
                    Some(child) if !(root && key == "metadata") => {
                        if let Some(v) = map.get_mut(&key) {
                            prune_and_default(child, v, false);
                        }
                    }
                    Some(_) => {}
                    None if server_owned || preserve => {}
                    None if properties.is_some() || additional.is_some() => {
                        map.remove(&key);
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for v in items {
                    prune_and_default(item, v, false);
                }
            }
        }
        _ => {}
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Go's `%#v` of a map key, as the API server prints duplicate entries.
fn go_map(key: &Map<String, Value>) -> String {
    let fields: Vec<String> = key.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("map[string]interface {{}}{{{}}}", fields.join(", "))
}

fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    let invalid = |errors: &mut Vec<String>, why: String| {
        errors.push(format!("{at}: Invalid value: {value}: {why}"));
    };
    if value.is_null() {
        if schema["nullable"] != true && schema.get("type").is_some() {
            invalid(
                errors,
                format!("{at} in body must be of type {}: \"null\"", schema["type"]),
            );
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_string() || type_name(value) == "integer") {
            invalid(
                errors,
                format!("{at} in body must be of type integer or string"),
            );
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            errors.push(format!(
                "{at}: Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ));
        }
    }
    let Some(expected) = schema["type"].as_str() else {
        return;
    };
    let actual = type_name(value);
    let fits = actual == expected || (expected == "number" && actual == "integer");
    if !fits {
        invalid(
            errors,
            format!("{at} in body must be of type {expected}: \"{actual}\""),
        );
        return;
    }
    match value {
        Value::Object(map) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                if let Some(key) = required.as_str() {
                    if !map.contains_key(key) {
                        let child = join(path, key);
                        errors.push(format!("{child}: Required value"));
                    }
                }
            }
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                // metadata is the server's; a CRD may restrict only its name.
                if path.is_empty() && key == "metadata" {
                    let name_schema = &schema["properties"]["metadata"]["properties"]["name"];
                    if let (true, Some(name)) = (name_schema.is_object(), child.get("name")) {
                        check(name_schema, name, "metadata.name", errors);
                    }
                    continue;
                }
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    check(child_schema, child, &join(path, key), errors);
                }
            }
        }
        Value::Array(items) => {
            let count = items.len() as u64;
            if let Some(max) = schema["maxItems"].as_u64().filter(|max| count > *max) {
                errors.push(format!(
                    "{at}: Too many: {count}: must have at most {max} items"
                ));
            }
            if let Some(min) = schema["minItems"].as_u64().filter(|min| count < *min) {
                invalid(
                    errors,
                    format!("{at} in body should have at least {min} items"),
                );
            }
            match schema["x-kubernetes-list-type"].as_str() {
                Some("map") => {
                    let keys = super::selector::strings(&schema["x-kubernetes-list-map-keys"]);
                    let mut seen = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let key: Map<String, Value> = keys
                            .iter()
                            .filter_map(|k| item.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                            .collect();
                        if seen.contains(&key) {
                            errors.push(format!("{at}[{i}]: Duplicate value: {}", go_map(&key)));
                        } else {
                            seen.push(key);
                        }
                    }
                }
                Some("set") => {
                    for (i, item) in items.iter().enumerate() {
                        if items[..i].contains(item) {
                            errors.push(format!("{at}[{i}]: Duplicate value: {item}"));
                        }
                    }
                }
                _ => {}
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::String(text) => {
            let length = text.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64().filter(|max| length > *max) {
                errors.push(format!("{at}: Too long: may not be longer than {max}"));
            }
            if let Some(min) = schema["minLength"].as_u64().filter(|min| length < *min) {
                invalid(
                    errors,
                    format!("{at} in body should be at least {min} chars long"),
                );
            }
            if let Some(pattern) = schema["pattern"].as_str() {
                match regex::Regex::new(pattern) {
                    Ok(re) if re.is_match(text) => {}
                    Ok(_) => invalid(errors, format!("{at} in body should match '{pattern}'")),
                    Err(err) => invalid(errors, format!("the CRD's pattern {pattern}: {err}")),
                }
            }
        }
        Value::Number(number) => {
            let n = number.as_f64().unwrap_or_default();
            if let Some(max) = schema["maximum"].as_f64().filter(|max| n > *max) {
                invalid(
                    errors,
                    format!("{at} in body should be less than or equal to {max}"),
                );
            }
            if let Some(min) = schema["minimum"].as_f64().filter(|min| n < *min) {
                invalid(
                    errors,
                    format!("{at} in body should be greater than or equal to {min}"),
                );
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1035_LABEL: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";

fn matches(pattern: &str, text: &str) -> bool {
    regex::Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(text))
}

/// Object names and labels as kube-apiserver checks them on every write:
/// a Service's name is a DNS-1035 label (it becomes a DNS name), every
/// other kind's a DNS-1123 subdomain; label keys are an optional DNS
/// subdomain prefix and a name of at most 63 characters, values at most 63
/// characters of `[A-Za-z0-9_.-]` starting and ending alphanumeric.
pub fn names_and_labels(kind: &str, group: &str, object: &Value) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut errors = Vec::new();
    if kind == "Service" {
        if name.len() > 63 {
            errors.push(format!(
                "metadata.name: Invalid value: \"{name}\": must be no more than 63 characters"
            ));
        } else if !matches(DNS1035_LABEL, name) {
            errors.push(format!(
                "metadata.name: Invalid value: \"{name}\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '{DNS1035_LABEL}')"
            ));
        }
    } else if name.len() > 253 || !matches(&format!("{DNS1123_LABEL}(\\.{DNS1123_LABEL})*"), name) {
        errors.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_LABEL}(\\.{DNS1123_LABEL})*')"
        ));
    }
    let label_name = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
    let mut label_sets = vec![("metadata.labels", &object["metadata"]["labels"])];
    if kind == "Deployment" {
        label_sets.push((
            "spec.template.metadata.labels",
            &object["spec"]["template"]["metadata"]["labels"],
        ));
    }
    for (at, labels) in label_sets {
        for (key, value) in labels.as_object().into_iter().flatten() {
            let (prefix, local) = match key.split_once('/') {
                Some((prefix, local)) => (Some(prefix), local),
                None => (None, key.as_str()),
            };
            let prefix_ok = prefix.is_none_or(|p| {
                p.len() <= 253 && matches(&format!("{DNS1123_LABEL}(\\.{DNS1123_LABEL})*"), p)
            });
            if !prefix_ok || local.len() > 63 || !matches(label_name, local) {
                errors.push(format!(
                    "{at}: Invalid value: \"{key}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character, at most 63 characters, with an optional DNS subdomain prefix"
                ));
            }
            let value = value.as_str().unwrap_or_default();
            if value.len() > 63 {
                errors.push(format!(
                    "{at}: Invalid value: \"{value}\": must be no more than 63 characters"
                ));
            } else if !value.is_empty() && !matches(label_name, value) {
                errors.push(format!(
                    "{at}: Invalid value: \"{value}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                ));
            }
        }
    }
    invalid(kind, group, name, errors)
}

/// Environment variable names in a Pod's or a Deployment's pod template,
/// as kube-apiserver checks them on every write: printable ASCII other
/// than `=`, not empty (the rule since Kubernetes 1.32; older servers were
/// stricter still).
pub fn env_names(kind: &str, group: &str, object: &Value) -> Result<(), ApiError> {
    let (spec, at) = match kind {
        "Pod" => (&object["spec"], "spec"),
        "Deployment" => (&object["spec"]["template"]["spec"], "spec.template.spec"),
        _ => return Ok(()),
    };
    let mut errors = Vec::new();
    for field in ["initContainers", "containers"] {
        for (c, container) in spec[field].as_array().into_iter().flatten().enumerate() {
            for (e, env) in container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = env["name"].as_str().unwrap_or_default();
                let printable = name
                    .bytes()
                    .all(|b| (b' '..=b'~').contains(&b) && b != b'=');
                if name.is_empty() || !printable {
                    errors.push(format!(
                        "{at}.{field}[{c}].env[{e}].name: Invalid value: \"{name}\": a valid environment variable name must consist only of printable ASCII characters other than '='"
                    ));
                }
            }
        }
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    invalid(kind, group, name, errors)
}

/// The associative lists of a pod spec, by their keys (from Kubernetes'
/// OpenAPI: `x-kubernetes-list-type: map`).
const POD_SPEC_LISTS: &[(&str, &[&str])] = &[
    ("containers", &["name"]),
    ("initContainers", &["name"]),
    ("volumes", &["name"]),
    ("imagePullSecrets", &["name"]),
];
const CONTAINER_LISTS: &[(&str, &[&str])] = &[
    ("env", &["name"]),
    ("ports", &["containerPort", "protocol"]),
    ("volumeMounts", &["mountPath"]),
];

/// The keys of the associative list at `path` (field names from the root,
/// list entries left out) in an object of `kind`: Kubernetes' OpenAPI list
/// types for the built-in kinds the operator writes, the CRD's
/// `x-kubernetes-list-type: map` for custom resources. `None`: atomic.
pub fn list_keys(kind: &str, schema: Option<&Value>, path: &[&str]) -> Option<Vec<String>> {
    let owned = |keys: &[&str]| Some(keys.iter().map(|k| k.to_string()).collect());
    if let Some(schema) = schema {
        let mut node = schema;
        for segment in path {
            if node["type"] == "array" {
                node = &node["items"];
            }
            node = &node["properties"][*segment];
        }
        if node["x-kubernetes-list-type"] != "map" {
            return None;
        }
        return Some(
            node["x-kubernetes-list-map-keys"]
                .as_array()?
                .iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect(),
        );
    }
    if path == ["metadata", "ownerReferences"] {
        return owned(&["uid"]);
    }
    let pod_spec: &[&str] = match kind {
        "Pod" => &["spec"],
        "Deployment" | "ReplicaSet" => &["spec", "template", "spec"],
        "Service" if path == ["spec", "ports"] => return owned(&["port", "protocol"]),
        _ => return None,
    };
    let rest = path.strip_prefix(pod_spec)?;
    match rest {
        [list] => POD_SPEC_LISTS
            .iter()
            .find(|(name, _)| name == list)
            .and_then(|(_, keys)| owned(keys)),
        ["containers" | "initContainers", list] => CONTAINER_LISTS
            .iter()
            .find(|(name, _)| name == list)
            .and_then(|(_, keys)| owned(keys)),
        _ => None,
    }
}

/// Refuses an applied configuration (server-side apply) of a built-in kind
/// that has two entries with one key in an associative list.
pub fn applied_lists(kind: &str, applied: &Value) -> Result<(), ApiError> {
    let pod_spec = match kind {
        "Pod" => Some((&applied["spec"], ".spec")),
        "Deployment" => Some((&applied["spec"]["template"]["spec"], ".spec.template.spec")),
        _ => None,
    };
    let mut lists: Vec<(String, &Value, &[&str])> = Vec::new();
    if let Some((spec, at)) = pod_spec {
        for (field, keys) in POD_SPEC_LISTS {
            lists.push((format!("{at}.{field}"), &spec[*field], keys));
        }
        for field in ["containers", "initContainers"] {
            for container in spec[field].as_array().into_iter().flatten() {
                let name = container["name"].as_str().unwrap_or_default();
                for (list, keys) in CONTAINER_LISTS {
                    lists.push((
                        format!("{at}.{field}[name=\"{name}\"].{list}"),
                        &container[*list],
                        keys,
                    ));
                }
            }
        }
    }
    if kind == "Service" {
        lists.push((
            ".spec.ports".into(),
            &applied["spec"]["ports"],
            &["port", "protocol"],
        ));
    }
    for (at, list, keys) in lists {
        let mut seen: Vec<String> = Vec::new();
        for item in list.as_array().into_iter().flatten() {
            // Keys the item leaves out take their defaults (protocol TCP).
            let key: Vec<String> = keys
                .iter()
                .map(|k| match (item.get(*k), *k) {
                    (Some(v), _) => format!("{k}={v}"),
                    (None, "protocol") => format!("{k}=\"TCP\""),
                    (None, _) => format!("{k}=null"),
                })
                .collect();
            let key = format!("[{}]", key.join(","));
            if seen.contains(&key) {
                return Err(ApiError::new(
                    500,
                    "InternalError",
                    format!(
                        "failed to create typed patch object ({kind}): {at}: duplicate entries for key {key}"
                    ),
                ));
            }
            seen.push(key);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "minLength": 1},
                "replicas": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 2},
                "kind": {"type": "string", "enum": ["A", "B"]},
                "port": {"x-kubernetes-int-or-string": true},
                "env": {"type": "array", "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"],
                        "items": {"type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "value": {"type": "string"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "note": {"type": "string", "nullable": true, "pattern": "^[a-z]+$"}
            }},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
        }})
    }

    fn run(spec: Value) -> Result<Value, String> {
        let mut object = json!({"apiVersion": "x/v1", "kind": "Thing",
                                "metadata": {"name": "t", "anything": 1}, "spec": spec});
        custom_resource(&schema(), "Thing", "x", "t", &mut object)
            .map(|()| object)
            .map_err(|e| e.message)
    }

    #[test]
    fn custom_resources_are_pruned_defaulted_and_validated() {
        let object = run(json!({"image": "gw", "unknown": 1, "labels": {"a": "b"},
                                "free": {"x": {"y": 1}}, "note": null}))
        .expect("valid");
        assert_eq!(object["spec"]["replicas"], 2, "defaulted");
        assert!(object["spec"].get("unknown").is_none(), "pruned");
        assert_eq!(object["spec"]["free"]["x"]["y"], 1, "preserved");
        assert_eq!(
            object["metadata"]["anything"], 1,
            "metadata is the server's"
        );
        let table = [
            (json!({}), "spec.image: Required value"),
            (json!({"image": ""}), "should be at least 1 chars long"),
            (
                json!({"image": 7}),
                "spec.image in body must be of type string: \"integer\"",
            ),
            (
                json!({"image": "gw", "replicas": 1001}),
                "less than or equal to 1000",
            ),
            (
                json!({"image": "gw", "replicas": -1}),
                "greater than or equal to 0",
            ),
            (
                json!({"image": "gw", "replicas": "2"}),
                "must be of type integer",
            ),
            (
                json!({"image": "gw", "replicas": null}),
                "must be of type \"integer\": \"null\"",
            ),
            (
                json!({"image": "gw", "kind": "C"}),
                "Unsupported value: \"C\"",
            ),
            (json!({"image": "gw", "port": 1.5}), "integer or string"),
            (
                json!({"image": "gw", "labels": {"a": 1}}),
                "spec.labels.a in body must be of type string",
            ),
            (
                json!({"image": "gw", "note": "Not"}),
                "should match '^[a-z]+$'",
            ),
            (
                json!({"image": "gw", "env": [{"name": "A", "value": "1"}, {"name": "A"}]}),
                "spec.env[1]: Duplicate value: map[string]interface {}{\"name\":\"A\"}",
            ),
            (
                json!({"image": "gw", "env": [{"value": "1"}]}),
                "spec.env[0].name: Required value",
            ),
        ];
        for (spec, expected) in table {
            let err = run(spec.clone()).expect_err(&spec.to_string());
            assert!(err.contains(expected), "{spec}: {err}");
            assert!(err.starts_with("Thing.x \"t\" is invalid: "), "{err}");
        }
    }

    #[test]
    fn names_and_labels_follow_kubernetes_rules() {
        let object =
            |name: &str, labels: Value| json!({"metadata": {"name": name, "labels": labels}});
        let ok = [
            ("Service", "chat-preview"),
            ("ConfigMap", "chat.v2-config"),
            ("Pod", "0chat"),
            ("Event", "chat.17f3a"),
        ];
        for (kind, name) in ok {
            assert!(
                names_and_labels(kind, "", &object(name, json!({"a.b/c": "d", "e": ""}))).is_ok(),
                "{kind} {name}"
            );
        }
        let long = "x".repeat(64);
        let refused = [
            (
                "Service",
                "chat.v2",
                object("chat.v2", json!({})),
                "a DNS-1035 label",
            ),
            (
                "Service",
                "1chat",
                object("1chat", json!({})),
                "a DNS-1035 label",
            ),
            (
                "Service",
                &long,
                object(&long, json!({})),
                "no more than 63 characters",
            ),
            (
                "ConfigMap",
                "Chat",
                object("Chat", json!({})),
                "RFC 1123 subdomain",
            ),
            (
                "ConfigMap",
                "c",
                object("c", json!({"a": long.clone()})),
                "no more than 63 characters",
            ),
            (
                "ConfigMap",
                "c",
                object("c", json!({"a": "-x"})),
                "a valid label",
            ),
            (
                "ConfigMap",
                "c",
                object("c", json!({"bad key!": "x"})),
                "name part",
            ),
            (
                "ConfigMap",
                "c",
                object("c", json!({"UP/x": "x"})),
                "name part",
            ),
        ];
        for (kind, name, object, expected) in refused {
            let err = names_and_labels(kind, "", &object).expect_err(name);
            assert_eq!(err.code, 422);
            assert!(
                err.message.contains(expected),
                "{kind} {name}: {}",
                err.message
            );
        }
    }

    #[test]
    fn environment_variable_names_are_printable_ascii_without_equals() {
        let deployment = |name: &str| {
            json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [
                {"name": "c", "env": [{"name": "OK"}, {"name": name}]}]}}}})
        };
        for name in ["A", "a.b-c_d", "1X", "with space"] {
            assert!(
                env_names("Deployment", "apps", &deployment(name)).is_ok(),
                "{name}"
            );
        }
        for name in ["A=B", "", "caf\u{e9}", "tab\t"] {
            let err = env_names("Deployment", "apps", &deployment(name)).expect_err(name);
            assert_eq!(err.code, 422);
            assert!(
                err.message.starts_with("Deployment.apps \"d\" is invalid: spec.template.spec.containers[0].env[1].name"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn applied_associative_lists_refuse_duplicate_keys() {
        let deployment = |env: Value, ports: Value| {
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "gateway", "env": env, "ports": ports}]}}}})
        };
        let ok = deployment(
            json!([{"name": "A"}, {"name": "B"}]),
            json!([{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}]),
        );
        assert!(applied_lists("Deployment", &ok).is_ok());
        let err = applied_lists(
            "Deployment",
            &deployment(
                json!([{"name": "A"}, {"name": "A", "value": "2"}]),
                json!([]),
            ),
        )
        .expect_err("duplicate env");
        assert_eq!(err.code, 500);
        assert!(
            err.message.contains(
                ".spec.template.spec.containers[name=\"gateway\"].env: duplicate entries for key [name=\"A\"]"
            ),
            "{}",
            err.message
        );
        let err = applied_lists(
            "Deployment",
            &deployment(
                json!([]),
                json!([{"containerPort": 80}, {"containerPort": 80, "protocol": "TCP"}]),
            ),
        )
        .expect_err("duplicate port (TCP is the default)");
        assert!(err
            .message
            .contains("duplicate entries for key [containerPort=80,protocol=\"TCP\"]"));
        // Kinds and lists without keys are not checked.
        assert!(applied_lists("ConfigMap", &json!({"data": {}})).is_ok());
    }
}
