//! PodDisruptionBudgets as the disruption controller and the eviction
//! subresource apply them: a budget's status (expected, healthy and
//! desired-healthy pods, disruptions allowed) from the pods it selects and
//! their controllers' replicas, and the answer to `POST
//! pods/NAME/eviction`. Pure functions over objects; the cluster writes the
//! status, the API server asks for the answer.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::selector::label_selector;
use super::store::{labels, ApiError};

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn terminating(pod: &Value) -> bool {
    !pod["metadata"]["deletionTimestamp"].is_null()
}

/// The uid of an object's controller (its ownerReference with
/// `controller: true`).
pub fn controller_uid(object: &Value) -> Option<&str> {
    object["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true)?["uid"]
        .as_str()
}

/// An int or a percentage of `total` (rounded up, as the disruption
/// controller rounds).
fn count(value: &Value, total: u64) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(text) => {
            let percent: u64 = text.strip_suffix('%')?.parse().ok()?;
            Some((percent * total).div_ceil(100))
        }
        _ => None,
    }
}

/// A budget's status from the pods of its namespace and the ReplicaSets
/// that control them: `expectedPods` is the sum of the selected pods'
/// controllers' replicas, `currentHealthy` the selected pods that are
/// Ready and not terminating, `desiredHealthy` from `minAvailable` or
/// `expectedPods - maxUnavailable`.
pub fn budget_status(pdb: &Value, pods: &[Value], replica_sets: &[Value]) -> Value {
    let Some(selector) = label_selector(&pdb["spec"]["selector"]) else {
        return json!({"observedGeneration": pdb["metadata"]["generation"],
                      "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0,
                      "disruptionsAllowed": 0});
    };
    let selected: Vec<&Value> = pods
        .iter()
        .filter(|p| selector.matches(&labels(p)))
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Failed" | "Succeeded")))
        .collect();
    let controllers: BTreeSet<&str> = selected.iter().filter_map(|p| controller_uid(p)).collect();
    let scales: BTreeMap<&str, u64> = replica_sets
        .iter()
        .filter_map(|rs| {
            Some((
                rs["metadata"]["uid"].as_str()?,
                rs["spec"]["replicas"].as_u64().unwrap_or(1),
            ))
        })
        .collect();
    let expected: u64 = controllers
        .iter()
        .map(|uid| scales.get(uid).copied().unwrap_or(0))
        .sum();
    let healthy = selected
        .iter()
        .filter(|p| ready(p) && !terminating(p))
        .count() as u64;
    let spec = &pdb["spec"];
    let desired = if !spec["minAvailable"].is_null() {
        count(&spec["minAvailable"], expected).unwrap_or(expected)
    } else {
        let unavailable = count(&spec["maxUnavailable"], expected).unwrap_or(0);
        expected.saturating_sub(unavailable)
    };
    json!({
        "observedGeneration": pdb["metadata"]["generation"],
        "expectedPods": expected,
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "disruptionsAllowed": healthy.saturating_sub(desired),
    })
}

/// Whether `pod` may be evicted under the budgets of its namespace, as the
/// eviction subresource decides (`unhealthyPodEvictionPolicy:
/// IfHealthyBudget`): a terminating pod, or one no budget selects, may go;
/// more than one budget is an error; a budget whose status is older than
/// its spec, or that allows no disruption, refuses with 429 — except for a
/// pod that is not Ready while the budget is met. `Ok(Some(name))` names
/// the budget whose `disruptionsAllowed` the eviction uses up.
pub fn eviction(pod: &Value, budgets: &[Value]) -> Result<Option<String>, ApiError> {
    if terminating(pod) {
        return Ok(None);
    }
    let pod_labels = labels(pod);
    let matching: Vec<&Value> = budgets
        .iter()
        .filter(|b| label_selector(&b["spec"]["selector"]).is_some_and(|s| s.matches(&pod_labels)))
        .collect();
    let budget = match matching.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.".into(),
            ))
        }
    };
    let name = budget["metadata"]["name"].as_str().unwrap_or_default();
    let status = &budget["status"];
    let refuse = |why: String| {
        Err(ApiError::new(
            429,
            "TooManyRequests",
            format!("Cannot evict pod as it would violate the pod's disruption budget. {why}"),
        ))
    };
    if status["observedGeneration"].as_i64() < budget["metadata"]["generation"].as_i64() {
        return refuse(format!(
            "The disruption budget {name} is still being processed by the server."
        ));
    }
    let healthy = status["currentHealthy"].as_u64().unwrap_or(0);
    let desired = status["desiredHealthy"].as_u64().unwrap_or(0);
    if !ready(pod) && healthy >= desired {
        return Ok(None);
    }
    if status["disruptionsAllowed"].as_u64().unwrap_or(0) == 0 {
        return refuse(format!(
            "The disruption budget {name} needs {desired} healthy pods and has {healthy} currently"
        ));
    }
    Ok(Some(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, owner: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "web"},
                            "ownerReferences": [{"uid": owner, "controller": true}]},
               "status": {"phase": "Running",
                          "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    fn budget(spec: Value) -> Value {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "web"}});
        json!({"metadata": {"name": "web", "generation": 1}, "spec": spec})
    }

    #[test]
    fn status_counts_healthy_pods_against_the_controllers_replicas() {
        let rs = vec![json!({"metadata": {"uid": "rs"}, "spec": {"replicas": 3}})];
        let mut pods = vec![
            pod("a", true, "rs"),
            pod("b", true, "rs"),
            pod("c", false, "rs"),
        ];
        let status = budget_status(&budget(json!({"maxUnavailable": 1})), &pods, &rs);
        assert_eq!(
            (
                status["expectedPods"].as_u64(),
                status["currentHealthy"].as_u64(),
                status["desiredHealthy"].as_u64(),
                status["disruptionsAllowed"].as_u64()
            ),
            (Some(3), Some(2), Some(2), Some(0))
        );
        pods[2] = pod("c", true, "rs");
        let status = budget_status(&budget(json!({"minAvailable": "50%"})), &pods, &rs);
        assert_eq!(status["desiredHealthy"], 2, "50% of 3, rounded up");
        assert_eq!(status["disruptionsAllowed"], 1);
    }

    #[test]
    fn evictions_follow_the_budget() {
        let mut full = budget(json!({"maxUnavailable": 1}));
        full["status"] = json!({"observedGeneration": 1, "currentHealthy": 3, "desiredHealthy": 2, "disruptionsAllowed": 1});
        assert_eq!(
            eviction(&pod("a", true, "rs"), &[full.clone()]),
            Ok(Some("web".into()))
        );
        let mut spent = full.clone();
        spent["status"]["disruptionsAllowed"] = json!(0);
        spent["status"]["currentHealthy"] = json!(2);
        let refused = eviction(&pod("a", true, "rs"), &[spent.clone()]).expect_err("429");
        assert_eq!(refused.code, 429);
        assert!(
            refused
                .message
                .contains("needs 2 healthy pods and has 2 currently"),
            "{}",
            refused.message
        );
        // An unready pod may go while the budget is met.
        assert_eq!(eviction(&pod("c", false, "rs"), &[spent.clone()]), Ok(None));
        let mut stale = full.clone();
        stale["metadata"]["generation"] = json!(2);
        assert_eq!(
            eviction(&pod("a", true, "rs"), &[stale]).map_err(|e| e.code),
            Err(429)
        );
        assert_eq!(
            eviction(&pod("a", true, "rs"), &[full.clone(), full]).map_err(|e| e.code),
            Err(500)
        );
        assert_eq!(eviction(&pod("a", true, "rs"), &[]), Ok(None));
    }
}
