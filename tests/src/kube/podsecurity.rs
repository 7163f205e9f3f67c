//! The Pod Security Standards' `restricted` profile (which includes
//! `baseline`), as documented at
//! <https://kubernetes.io/docs/concepts/security/pod-security-standards/>,
//! checked against a pod spec. The emulator's API server applies it to pods
//! created in a namespace that enforces it ([`super::Emulator::enforce_restricted`]),
//! refusing them as Pod Security admission does (403), so a pod template
//! that a `restricted` namespace would reject never starts in the tests.

use serde_json::Value;

/// Capabilities `baseline` lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// Volume types `restricted` allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
/// Sysctls `baseline` allows.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// Every way `spec` (a PodSpec) breaks the `restricted` profile, worded
/// like Pod Security admission's message parts; empty when it complies.
pub fn restricted(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let pod_sc = &spec["securityContext"];
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|field| spec[*field].as_array().into_iter().flatten())
        .collect();
    let name = |c: &Value| c["name"].as_str().unwrap_or_default().to_owned();

    // baseline
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[field] == true {
            out.push(format!("host namespaces ({field}=true)"));
        }
    }
    let host_process = pod_sc["windowsOptions"]["hostProcess"] == true
        || containers
            .iter()
            .any(|c| c["securityContext"]["windowsOptions"]["hostProcess"] == true);
    if host_process {
        out.push("hostProcess".into());
    }
    for c in &containers {
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            out.push(format!(
                "privileged (container \"{}\" must not set securityContext.privileged=true)",
                name(c)
            ));
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().is_some_and(|p| p != 0) {
                out.push(format!(
                    "hostPort (container \"{}\" uses hostPort)",
                    name(c)
                ));
            }
        }
        if sc["procMount"].as_str().is_some_and(|m| m != "Default") {
            out.push(format!("procMount (container \"{}\")", name(c)));
        }
    }
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        if volume.get("hostPath").is_some() {
            out.push("hostPath volumes".into());
        }
        let kind = volume
            .as_object()
            .and_then(|v| v.keys().find(|k| *k != "name"))
            .cloned()
            .unwrap_or_default();
        if !RESTRICTED_VOLUMES.contains(&kind.as_str()) {
            out.push(format!("restricted volume types (volume uses {kind})"));
        }
    }
    for sysctl in pod_sc["sysctls"].as_array().into_iter().flatten() {
        let sysctl = sysctl["name"].as_str().unwrap_or_default();
        if !SAFE_SYSCTLS.contains(&sysctl) {
            out.push(format!("forbidden sysctls ({sysctl})"));
        }
    }
    let unconfined = |sc: &Value| sc["seccompProfile"]["type"] == "Unconfined";
    if unconfined(pod_sc) || containers.iter().any(|c| unconfined(&c["securityContext"])) {
        out.push("seccompProfile (type Unconfined)".into());
    }

    // restricted
    for c in &containers {
        let sc = &c["securityContext"];
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!(
                "allowPrivilegeEscalation != false (container \"{}\" must set securityContext.allowPrivilegeEscalation=false)",
                name(c)
            ));
        }
        let drop = sc["capabilities"]["drop"].as_array();
        if !drop.is_some_and(|d| d.iter().any(|c| c == "ALL")) {
            out.push(format!(
                "unrestricted capabilities (container \"{}\" must set securityContext.capabilities.drop=[\"ALL\"])",
                name(c)
            ));
        }
        for added in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            let added = added.as_str().unwrap_or_default();
            if added != "NET_BIND_SERVICE" {
                let baseline = if BASELINE_CAPABILITIES.contains(&added) {
                    ""
                } else {
                    " (not in baseline either)"
                };
                out.push(format!(
                    "unrestricted capabilities (container \"{}\" must not add {added}){baseline}",
                    name(c)
                ));
            }
        }
        let non_root = sc["runAsNonRoot"]
            .as_bool()
            .or_else(|| pod_sc["runAsNonRoot"].as_bool());
        if non_root != Some(true) {
            out.push(format!(
                "runAsNonRoot != true (pod or container \"{}\" must set securityContext.runAsNonRoot=true)",
                name(c)
            ));
        }
        if sc["runAsUser"] == 0 {
            out.push(format!("runAsUser=0 (container \"{}\")", name(c)));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or_else(|| pod_sc["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            out.push(format!(
                "seccompProfile (pod or container \"{}\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
                name(c)
            ));
        }
    }
    if pod_sc["runAsUser"] == 0 {
        out.push("runAsUser=0 (pod)".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compliant() -> Value {
        json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "v", "configMap": {"name": "x"}}]
        })
    }

    #[test]
    fn the_restricted_profile_as_documented() {
        assert_eq!(restricted(&compliant()), Vec::<String>::new());
        // Set on the container instead of the pod is as good.
        let per_container = json!({"containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
            "runAsNonRoot": true, "seccompProfile": {"type": "Localhost"}}}]});
        assert_eq!(restricted(&per_container), Vec::<String>::new());
        let table: [(&str, Value, &str); 14] = [
            ("/securityContext", json!(null), "runAsNonRoot != true"),
            (
                "/securityContext/seccompProfile",
                json!(null),
                "seccompProfile (pod or container",
            ),
            (
                "/securityContext/seccompProfile/type",
                json!("Unconfined"),
                "type Unconfined",
            ),
            ("/securityContext/runAsUser", json!(0), "runAsUser=0 (pod)"),
            (
                "/containers/0/securityContext/allowPrivilegeEscalation",
                json!(null),
                "allowPrivilegeEscalation != false",
            ),
            (
                "/containers/0/securityContext/allowPrivilegeEscalation",
                json!(true),
                "allowPrivilegeEscalation != false",
            ),
            (
                "/containers/0/securityContext/capabilities/drop",
                json!(["NET_RAW"]),
                "must set securityContext.capabilities.drop",
            ),
            (
                "/containers/0/securityContext/capabilities/add",
                json!(["SYS_ADMIN"]),
                "must not add SYS_ADMIN) (not in baseline",
            ),
            (
                "/containers/0/securityContext/privileged",
                json!(true),
                "privileged",
            ),
            (
                "/containers/0/ports",
                json!([{"containerPort": 80, "hostPort": 80}]),
                "hostPort",
            ),
            (
                "/hostNetwork",
                json!(true),
                "host namespaces (hostNetwork=true)",
            ),
            (
                "/volumes/0",
                json!({"name": "h", "hostPath": {"path": "/"}}),
                "hostPath volumes",
            ),
            (
                "/volumes/0",
                json!({"name": "n", "nfs": {"server": "s"}}),
                "restricted volume types (volume uses nfs)",
            ),
            (
                "/securityContext/sysctls",
                json!([{"name": "kernel.msgmax", "value": "1"}]),
                "forbidden sysctls (kernel.msgmax)",
            ),
        ];
        for (pointer, value, expected) in table {
            let mut spec = compliant();
            set(&mut spec, pointer, value);
            let found = restricted(&spec);
            assert!(
                found.iter().any(|v| v.contains(expected)),
                "{pointer}: expected {expected:?} in {found:?}"
            );
        }
    }

    /// Sets (or, with null, removes) the value at a JSON pointer, making
    /// the objects on the way.
    fn set(target: &mut Value, pointer: &str, value: Value) {
        let mut parts: Vec<&str> = pointer.split('/').skip(1).collect();
        let last = parts.pop().expect("a pointer");
        let mut here = target;
        for part in parts {
            here = match part.parse::<usize>() {
                Ok(i) => &mut here[i],
                Err(_) => &mut here[part],
            };
        }
        match (here, last.parse::<usize>()) {
            (Value::Array(items), Ok(i)) => items[i] = value,
            (Value::Object(map), _) if value.is_null() => {
                map.remove(last);
            }
            (here, _) => here[last] = value,
        }
    }
}
