//! JSON merge patch (RFC 7386) and server-side apply as the structured
//! merge of kube-apiserver does it for the operator's kinds: each field
//! manager owns the fields it applied, down to the entries of associative
//! lists (a container by `name`, an env var by `name`, a port by port and
//! protocol: `k:{"name":"gateway"}` path segments, as in `fieldsV1`);
//! applying again removes what it no longer sends unless another manager
//! owns it too, merges maps by key and associative lists per entry (other
//! lists and scalars are replaced whole), and a field another manager owns
//! with a different value is a conflict unless forced.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// A field path from the root: object keys, and `k:{…}` for an entry of an
/// associative list (its key fields as a JSON object). A path ending in an
/// entry segment stands for the entry itself.
pub type FieldPath = Vec<String>;

/// The keys of the associative list at a path of field names (entries
/// left out), or `None` for a list that is atomic (replaced whole).
pub type ListKeys<'a> = &'a dyn Fn(&[&str]) -> Option<Vec<String>>;

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Identity fields that no manager owns.
fn is_identity(path: &[String]) -> bool {
    matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["apiVersion"]
            | ["kind"]
            | [
                "metadata",
                "name"
                    | "namespace"
                    | "resourceVersion"
                    | "uid"
                    | "generation"
                    | "creationTimestamp"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
                    | "managedFields"
            ]
    )
}

/// A key field's value in an entry; a port's protocol defaults to TCP, as
/// the API server defaults it before merging.
fn key_value(item: &Value, key: &str) -> Value {
    match (item.get(key), key) {
        (Some(value), _) => value.clone(),
        (None, "protocol") => Value::String("TCP".into()),
        (None, _) => Value::Null,
    }
}

/// The path segment of an associative list's entry: `k:{"name":"x"}`.
fn entry_segment(item: &Value, keys: &[String]) -> String {
    let map: Map<String, Value> = keys
        .iter()
        .map(|k| (k.clone(), key_value(item, k)))
        .collect();
    format!("k:{}", Value::Object(map))
}

/// Whether `item` is the entry a `k:{…}` segment names.
fn is_entry(item: &Value, segment: &str) -> bool {
    let Some(keys) = segment
        .strip_prefix("k:")
        .and_then(|json| serde_json::from_str::<Map<String, Value>>(json).ok())
    else {
        return false;
    };
    keys.iter().all(|(k, v)| key_value(item, k) == *v)
}

/// Every owned field in `value`: leaves (scalars, atomic lists, empty
/// objects), and each entry of an associative list together with its
/// fields.
pub fn leaf_paths(value: &Value, keys: ListKeys) -> BTreeSet<FieldPath> {
    fn walk(
        value: &Value,
        prefix: &mut FieldPath,
        shape: &mut Vec<String>,
        keys: ListKeys,
        out: &mut BTreeSet<FieldPath>,
    ) {
        let list_keys = || {
            let names: Vec<&str> = shape.iter().map(String::as_str).collect();
            keys(&names)
        };
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    prefix.push(key.clone());
                    shape.push(key.clone());
                    walk(child, prefix, shape, keys, out);
                    prefix.pop();
                    shape.pop();
                }
            }
            Value::Array(items) if !items.is_empty() && list_keys().is_some() => {
                let entry_keys = list_keys().unwrap_or_default();
                for item in items {
                    prefix.push(entry_segment(item, &entry_keys));
                    out.insert(prefix.clone());
                    if let Value::Object(fields) = item {
                        for (key, child) in fields {
                            prefix.push(key.clone());
                            shape.push(key.clone());
                            walk(child, prefix, shape, keys, out);
                            prefix.pop();
                            shape.pop();
                        }
                    }
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() && !is_identity(prefix) {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(value, &mut Vec::new(), &mut Vec::new(), keys, &mut out);
    out
}

/// The value at `path`, if any.
pub fn get_path<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, segment| match v {
        Value::Array(items) => items.iter().find(|item| is_entry(item, segment)),
        _ => v.get(segment),
    })
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for segment in parents {
        let next = match current {
            Value::Array(items) => items.iter_mut().find(|item| is_entry(item, segment)),
            other => other.get_mut(segment),
        };
        match next {
            Some(next) => current = next,
            None => return,
        }
    }
    match current {
        Value::Array(items) => items.retain(|item| !is_entry(item, last)),
        Value::Object(map) => {
            map.remove(last);
        }
        _ => {}
    }
}

fn deep_merge(target: &mut Value, applied: &Value, shape: &mut Vec<String>, keys: ListKeys) {
    let names: Vec<&str> = shape.iter().map(String::as_str).collect();
    let list_keys = keys(&names);
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (key, value) in applied {
                shape.push(key.clone());
                match target.get_mut(key) {
                    Some(existing) if existing.is_object() || existing.is_array() => {
                        deep_merge(existing, value, shape, keys)
                    }
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
                }
                shape.pop();
            }
        }
        (Value::Array(target), Value::Array(applied)) if list_keys.is_some() => {
            let entry_keys = list_keys.unwrap_or_default();
            for item in applied {
                let segment = entry_segment(item, &entry_keys);
                match target.iter_mut().find(|live| is_entry(live, &segment)) {
                    Some(live) => deep_merge(live, item, shape, keys),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

/// Fields of `applied` that another manager owns with a different live value.
pub fn conflicts<'a>(
    live: &Value,
    applied: &Value,
    keys: ListKeys,
    others: impl IntoIterator<Item = (String, &'a BTreeSet<FieldPath>)>,
) -> Vec<String> {
    let wanted = leaf_paths(applied, keys);
    let mut found = Vec::new();
    for (manager, owned) in others {
        for path in wanted.intersection(owned) {
            // Owning an entry is owning its keys, which are equal by
            // definition: only its fields can differ.
            if path.last().is_some_and(|s| s.starts_with("k:")) {
                continue;
            }
            if get_path(live, path) != get_path(applied, path) {
                found.push(format!("{manager}: .{}", path.join(".")));
            }
        }
    }
    found
}

/// Applies `applied` for a manager that owned `previously` and returns what
/// it owns now. What it stopped sending is removed unless `others` (the
/// other managers' fields) hold it.
pub fn apply(
    live: &mut Value,
    applied: &Value,
    previously: &BTreeSet<FieldPath>,
    others: &BTreeSet<FieldPath>,
    keys: ListKeys,
) -> BTreeSet<FieldPath> {
    let now = leaf_paths(applied, keys);
    for path in previously.difference(&now) {
        let held = others.iter().any(|o| o.starts_with(path));
        if !held {
            remove_path(live, path);
        }
    }
    deep_merge(live, applied, &mut Vec::new(), keys);
    now
}

/// The fields an update (a merge patch or a PUT) changed: set or changed
/// in `after`, or gone from `before`. They move to the updating manager.
pub fn changed_paths(before: &Value, after: &Value, keys: ListKeys) -> BTreeSet<FieldPath> {
    let old = leaf_paths(before, keys);
    let new = leaf_paths(after, keys);
    let mut changed: BTreeSet<FieldPath> = new
        .iter()
        .filter(|p| get_path(before, p) != get_path(after, p) || !old.contains(*p))
        .cloned()
        .collect();
    changed.extend(old.difference(&new).cloned());
    changed
}

/// `metadata.managedFields`' `fieldsV1` for a set of owned paths: `f:NAME`
/// for a field, `k:{…}` for an entry (with `.` for the entry itself).
pub fn fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for segment in path {
            let key = if segment.starts_with("k:") {
                segment.clone()
            } else {
                format!("f:{segment}")
            };
            node = node
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("object");
        }
        if path.last().is_some_and(|s| s.starts_with("k:")) {
            node.insert(".".into(), Value::Object(Map::new()));
        }
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn atomic(_: &[&str]) -> Option<Vec<String>> {
        None
    }

    /// Containers by name and their env by name, as a pod spec.
    fn pod_lists(path: &[&str]) -> Option<Vec<String>> {
        match path {
            ["spec", "containers"] => Some(vec!["name".into()]),
            ["spec", "containers", "env"] => Some(vec!["name".into()]),
            ["spec", "containers", "ports"] => {
                Some(vec!["containerPort".into(), "protocol".into()])
            }
            _ => None,
        }
    }

    #[test]
    fn associative_lists_merge_per_entry_and_entries_are_owned() {
        let mut live = json!({});
        let none = BTreeSet::new();
        let a = json!({"spec": {"containers": [{"name": "gw", "image": "a:1",
            "env": [{"name": "A1", "value": "1"}], "ports": [{"containerPort": 80}]}]}});
        let owned_a = apply(&mut live, &a, &BTreeSet::new(), &none, &pod_lists);
        assert!(
            owned_a.contains(&vec![
                "spec".to_string(),
                "containers".into(),
                r#"k:{"name":"gw"}"#.into(),
                "env".into(),
                r#"k:{"name":"A1"}"#.into(),
                "value".into()
            ]),
            "{owned_a:?}"
        );
        assert!(
            owned_a.contains(&vec![
                "spec".to_string(),
                "containers".into(),
                r#"k:{"name":"gw"}"#.into(),
                "ports".into(),
                r#"k:{"containerPort":80,"protocol":"TCP"}"#.into()
            ]),
            "the protocol key defaults to TCP: {owned_a:?}"
        );
        // Another manager adds an env entry to the same container.
        let b = json!({"spec": {"containers": [{"name": "gw", "env": [{"name": "B1", "value": "2"}]}]}});
        let owned_b = apply(&mut live, &b, &BTreeSet::new(), &owned_a, &pod_lists);
        let env = |live: &Value| -> Vec<String> {
            live["spec"]["containers"][0]["env"]
                .as_array()
                .expect("env")
                .iter()
                .map(|e| e["name"].as_str().expect("name").to_string())
                .collect()
        };
        assert_eq!(env(&live), ["A1", "B1"]);
        // The first stops sending A1 and sends A2: B1 stays.
        let a2 = json!({"spec": {"containers": [{"name": "gw", "image": "a:1",
            "env": [{"name": "A2", "value": "3"}], "ports": [{"containerPort": 80}]}]}});
        apply(&mut live, &a2, &owned_a, &owned_b, &pod_lists);
        assert_eq!(env(&live), ["B1", "A2"]);
        assert_eq!(live["spec"]["containers"][0]["image"], "a:1");
        let fields = fields_v1(&owned_b);
        assert_eq!(
            fields,
            json!({"f:spec": {"f:containers": {r#"k:{"name":"gw"}"#: {".": {}, "f:name": {},
                "f:env": {r#"k:{"name":"B1"}"#: {".": {}, "f:name": {}, "f:value": {}}}}}}})
        );
    }

    #[test]
    fn updates_move_the_fields_they_change() {
        let before =
            json!({"spec": {"replicas": 2, "image": "a"}, "metadata": {"labels": {"x": "1"}}});
        let after =
            json!({"spec": {"replicas": 3, "image": "a"}, "metadata": {"labels": {"y": "2"}}});
        let changed = changed_paths(&before, &after, &atomic);
        let names: Vec<String> = changed.iter().map(|p| p.join(".")).collect();
        assert_eq!(
            names,
            ["metadata.labels.x", "metadata.labels.y", "spec.replicas"]
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            doc,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
    }

    #[test]
    fn apply_removes_what_the_manager_stopped_sending() {
        let mut live = json!({"metadata": {"name": "x", "labels": {"a": "1", "other": "kept"}},
                              "status": {"phase": "Draining", "failedRevision": "r2", "rollout": {"total": 10}}});
        let first = json!({"status": {"phase": "Draining", "failedRevision": "r2", "rollout": {"total": 10}}});
        let none = BTreeSet::new();
        let owned = apply(&mut live, &first, &BTreeSet::new(), &none, &atomic);
        let second = json!({"status": {"phase": "Stable", "rollout": {"total": 10}}});
        let owned = apply(&mut live, &second, &owned, &none, &atomic);
        assert_eq!(
            live["status"],
            json!({"phase": "Stable", "rollout": {"total": 10}})
        );
        assert_eq!(live["metadata"]["labels"]["other"], "kept", "not ours");
        assert!(owned.contains(&vec!["status".to_string(), "phase".to_string()]));
        assert!(
            !owned.iter().any(|p| p[0] == "metadata"),
            "identity is not owned"
        );
    }

    #[test]
    fn conflicts_only_on_differing_values_owned_by_others() {
        let live = json!({"spec": {"replicas": 3, "image": "a"}});
        let theirs = BTreeSet::from([vec!["spec".to_string(), "replicas".to_string()]]);
        let same = json!({"spec": {"replicas": 3}});
        assert!(conflicts(&live, &same, &atomic, [("kubectl".into(), &theirs)]).is_empty());
        let different = json!({"spec": {"replicas": 5}});
        assert_eq!(
            conflicts(&live, &different, &atomic, [("kubectl".into(), &theirs)]),
            vec!["kubectl: .spec.replicas"]
        );
    }
}
