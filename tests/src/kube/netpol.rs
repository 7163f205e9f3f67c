//! NetworkPolicy ingress as a network plugin that enforces it decides, for
//! the rules the chart uses and what a user would write next to them:
//! `podSelector` (an empty one selects every pod of the namespace),
//! `policyTypes`, ingress rules with `ports` (number or container port
//! name, `endPort`) and `from` peers (`podSelector`, `namespaceSelector` —
//! namespaces carry `kubernetes.io/metadata.name` — both together, and
//! `ipBlock` with `except`). A pod no Ingress policy selects takes
//! everything; a selected pod takes what some rule of some selecting
//! policy allows. A pure function over objects: the cluster's proxies ask
//! it for every connection they forward.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use super::selector::label_selector;

/// Who opens a connection: a pod (its namespace and labels) or something
/// outside the pod network (the host, a test), known by its address only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A pod.
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its labels.
        labels: BTreeMap<String, String>,
        /// Its IP.
        ip: IpAddr,
    },
    /// Not a pod.
    External(IpAddr),
}

impl Source {
    fn ip(&self) -> IpAddr {
        match self {
            Source::Pod { ip, .. } | Source::External(ip) => *ip,
        }
    }
}

/// The pod a connection goes to, and the port.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The container port.
    pub port: u16,
    /// That port's name in the pod spec, if it has one.
    pub port_name: Option<&'a str>,
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    label_selector(selector).is_some_and(|s| s.matches(labels))
}

fn namespace_labels(namespace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )])
}

/// The same address, an IPv4-mapped IPv6 one written as IPv4 (the
/// emulator's IPv6 pods are `::ffff:127.0.0.N`).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `cidr` holds `ip` (an IPv4 address written as IPv4-mapped IPv6 counts
/// as IPv4).
fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    let Some((network, bits)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(network), Ok(bits)) = (network.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (canonical(network), canonical(ip)) {
        (IpAddr::V4(net), IpAddr::V4(ip)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

fn peer_admits(peer: &Value, policy_namespace: &str, source: &Source) -> bool {
    if let Some(block) = peer.get("ipBlock") {
        let cidr = block["cidr"].as_str().unwrap_or_default();
        let excepted = super::selector::strings(&block["except"])
            .into_iter()
            .any(|except| in_cidr(except, source.ip()));
        return in_cidr(cidr, source.ip()) && !excepted;
    }
    let Source::Pod {
        namespace, labels, ..
    } = source
    else {
        return false;
    };
    let namespace_ok = match peer.get("namespaceSelector") {
        Some(selector) => selects(selector, &namespace_labels(namespace)),
        None => namespace == policy_namespace,
    };
    let pod_ok = peer
        .get("podSelector")
        .is_none_or(|selector| selects(selector, labels));
    namespace_ok && pod_ok
}

fn port_admits(entry: &Value, target: &Target) -> bool {
    if entry["protocol"].as_str().is_some_and(|p| p != "TCP") {
        return false;
    }
    match &entry["port"] {
        Value::Null => true,
        Value::String(name) => target.port_name == Some(name.as_str()),
        number => {
            let first = number.as_u64().unwrap_or(0);
            let last = entry["endPort"].as_u64().unwrap_or(first);
            (first..=last).contains(&u64::from(target.port))
        }
    }
}

/// Whether the policies of the target's namespace let `source` reach it.
pub fn ingress_allowed(policies: &[Value], target: &Target, source: &Source) -> bool {
    let selecting: Vec<&Value> = policies
        .iter()
        .filter(|p| p["metadata"]["namespace"] == target.namespace)
        .filter(|p| selects(&p["spec"]["podSelector"], target.labels))
        .filter(|p| match p["spec"]["policyTypes"].as_array() {
            Some(types) => types.iter().any(|t| t == "Ingress"),
            None => true,
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|policy| {
        policy["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let ports = rule["ports"].as_array().filter(|p| !p.is_empty());
                let from = rule["from"].as_array().filter(|f| !f.is_empty());
                ports.is_none_or(|ports| ports.iter().any(|p| port_admits(p, target)))
                    && from.is_none_or(|peers| {
                        peers
                            .iter()
                            .any(|peer| peer_admits(peer, target.namespace, source))
                    })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(namespace: &str, pairs: &[(&str, &str)], ip: &str) -> Source {
        Source::Pod {
            namespace: namespace.into(),
            labels: labels(pairs),
            ip: ip.parse().expect("ip"),
        }
    }

    #[test]
    fn ingress_follows_ports_peers_and_blocks() {
        let policy = json!({"metadata": {"namespace": "prod"}, "spec": {
        "podSelector": {"matchLabels": {"app": "gw"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"ports": [{"port": 8080, "protocol": "TCP"}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
                       "podSelector": {"matchLabels": {"app": "operator"}}},
                      {"podSelector": {"matchLabels": {"admin": "true"}}},
                      {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.9.0/24"]}}],
             "ports": [{"port": "admin"}]},
        ]}});
        let gw = labels(&[("app", "gw")]);
        let port = |port: u16, name: &'static str| Target {
            namespace: "prod",
            labels: &gw,
            port,
            port_name: Some(name),
        };
        let allowed = |target: &Target, source: &Source| {
            ingress_allowed(std::slice::from_ref(&policy), target, source)
        };
        let outside = Source::External("127.0.0.1".parse().expect("ip"));
        let operator = pod("ops", &[("app", "operator")], "127.0.0.9");
        let operator_elsewhere = pod("prod", &[("app", "operator")], "127.0.0.9");
        let admin_here = pod("prod", &[("admin", "true")], "127.0.0.8");
        let admin_elsewhere = pod("other", &[("admin", "true")], "127.0.0.8");
        assert!(
            allowed(&port(8080, "http"), &outside),
            "the public port is open"
        );
        assert!(allowed(&port(9090, "admin"), &operator));
        assert!(
            !allowed(&port(9090, "admin"), &operator_elsewhere),
            "wrong namespace"
        );
        assert!(allowed(&port(9090, "admin"), &admin_here));
        assert!(
            !allowed(&port(9090, "admin"), &admin_elsewhere),
            "a bare podSelector is this namespace"
        );
        assert!(
            !allowed(&port(9090, "admin"), &outside),
            "not a pod, not in the block"
        );
        assert!(allowed(
            &port(9090, "admin"),
            &Source::External("10.1.2.3".parse().expect("ip"))
        ));
        assert!(!allowed(
            &port(9090, "admin"),
            &Source::External("10.1.9.3".parse().expect("ip"))
        ));
        assert!(allowed(
            &port(9090, "admin"),
            &Source::External("::ffff:10.1.2.3".parse().expect("ip"))
        ));
        assert!(
            !allowed(&port(9091, "other"), &operator),
            "no rule for that port"
        );
        let other = labels(&[("app", "web")]);
        let unselected = Target {
            namespace: "prod",
            labels: &other,
            port: 9090,
            port_name: None,
        };
        assert!(
            allowed(&unselected, &outside),
            "a pod no policy selects takes everything"
        );
        let deny_all = json!({"metadata": {"namespace": "prod"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        assert!(
            !ingress_allowed(&[deny_all], &unselected, &operator),
            "an empty podSelector selects all"
        );
    }
}
