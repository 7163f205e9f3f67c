//! JSON merge patch (RFC 7386) and the part of server-side apply the
//! operator relies on: each field manager owns the leaf fields it applied;
//! applying again removes the fields it no longer sends, merges the ones it
//! does (maps by key, lists and scalars replaced whole), and a field another
//! manager owns with a different value is a conflict unless forced.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// A field path: object keys from the root.
pub type FieldPath = Vec<String>;

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
                    | "managedFields"
            ]
    )
}

/// Every leaf field in `value` (objects are walked; lists and scalars are leaves).
pub fn leaf_paths(value: &Value) -> BTreeSet<FieldPath> {
    fn walk(value: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    prefix.push(key.clone());
                    walk(child, prefix, out);
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
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// The value at `path`, if any.
pub fn get_path<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for key in parents {
        match current.get_mut(key) {
            Some(next) => current = next,
            None => return,
        }
    }
    if let Some(map) = current.as_object_mut() {
        map.remove(last);
    }
}

fn deep_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (key, value) in applied {
                match target.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        deep_merge(existing, value)
                    }
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
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
    others: impl IntoIterator<Item = (&'a str, &'a BTreeSet<FieldPath>)>,
) -> Vec<String> {
    let wanted = leaf_paths(applied);
    let mut found = Vec::new();
    for (manager, owned) in others {
        for path in wanted.intersection(owned) {
            if get_path(live, path) != get_path(applied, path) {
                found.push(format!("{manager}: .{}", path.join(".")));
            }
        }
    }
    found
}

/// Applies `applied` for a manager that owned `previously` and returns what
/// it owns now.
pub fn apply(
    live: &mut Value,
    applied: &Value,
    previously: &BTreeSet<FieldPath>,
) -> BTreeSet<FieldPath> {
    let now = leaf_paths(applied);
    for path in previously.difference(&now) {
        remove_path(live, path);
    }
    deep_merge(live, applied);
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let owned = apply(&mut live, &first, &BTreeSet::new());
        let second = json!({"status": {"phase": "Stable", "rollout": {"total": 10}}});
        let owned = apply(&mut live, &second, &owned);
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
        assert!(conflicts(&live, &same, [("kubectl", &theirs)]).is_empty());
        let different = json!({"spec": {"replicas": 5}});
        assert_eq!(
            conflicts(&live, &different, [("kubectl", &theirs)]),
            vec!["kubectl: .spec.replicas"]
        );
    }
}
