//! Request-level tests: one reconcile against kube's `Client` over a
//! tower-test mock (the pattern kube-rs documents), asserting the exact
//! requests the operator sends for a first install, a rollout step (the
//! switch to Draining) and an abort. Gateways are a recording double here;
//! the real gateway API is exercised by the end-to-end emulator tests.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use switchyard_operator::crd::ConnectionService;
use switchyard_operator::gateway::{AdminEndpoint, AdminError, GatewayAdmin};
use switchyard_operator::metrics::Metrics;
use switchyard_operator::reconcile::{reconcile, Context};
use switchyard_operator::resources::revision;
use switchyard_protocol::admin::StatusResponse;
use switchyard_protocol::drain::DrainRequest;

const NS: &str = "/namespaces/prod";

/// One request as the API server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

impl Seen {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.uri)
    }
}

/// Gateways that answer from a table and record what they were told.
#[derive(Default)]
struct RecordingGateways {
    connections: BTreeMap<String, (u64, bool)>,
    calls: Mutex<Vec<String>>,
}

impl GatewayAdmin for RecordingGateways {
    fn status<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<StatusResponse, AdminError>> {
        Box::pin(async move {
            let (connections, draining) = self.connections[&endpoint.ip];
            Ok(StatusResponse {
                server_id: endpoint.ip.clone(),
                connections,
                subscriptions: 0,
                topics: 0,
                draining,
                uptime_seconds: 1,
                admission: None,
                drain: None,
            })
        })
    }

    fn start_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
        request: &'a DrainRequest,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.calls.lock().expect("calls").push(format!(
                "drain {}:{} token={} rate={} window={} deadline={}",
                endpoint.ip,
                endpoint.port,
                endpoint.token,
                request.max_rate,
                request.window_ms,
                request.deadline_ms
            ));
            Ok(())
        })
    }

    fn cancel_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .expect("calls")
                .push(format!("cancel {}", endpoint.ip));
            Ok(())
        })
    }
}

/// The operator's gateway pods, either color (`resources::pod_selector`).
const PODS: &str = "labelSelector=app.kubernetes.io%2Fname%3Dswitchyard%2Capp.kubernetes.io%2Finstance%3Dchat%2Cswitchyard.dev%2Fcolor+in+%28blue%2Cgreen%29";

fn resource(status: Value, annotations: Value) -> ConnectionService {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ConnectionService",
        "metadata": {
            "name": "chat", "namespace": "prod", "uid": "uid-1",
            "generation": 1, "resourceVersion": "10",
            "annotations": annotations,
        },
        "spec": {"image": "gw:2", "config": "auth:\n  anonymous: true\n"},
        "status": status,
    }))
    .expect("resource")
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

fn list(kind: &str, items: Value) -> (u16, Value) {
    (
        200,
        json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "5"}, "items": items}),
    )
}

fn service(color: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"selector": {"switchyard.dev/color": color}}})
}

fn secret() -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-admin"},
               "data": {"token": "c2VjcmV0LXRva2Vu"}}),
    )
}

fn deployment(color: &str, revision: &str, replicas: i32) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": format!("chat-{color}"), "generation": 1, "uid": format!("d-{color}"),
                        "labels": {"switchyard.dev/color": color, "switchyard.dev/revision": revision}},
           "spec": {"replicas": replicas, "selector": {}, "template": {}},
           "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                      "readyReplicas": replicas, "availableReplicas": replicas}})
}

/// A color's ReplicaSet, controlled by its Deployment.
fn replica_set(color: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
           "metadata": {"name": format!("chat-{color}-5d9f"), "uid": format!("rs-{color}"),
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                            "name": format!("chat-{color}"), "uid": format!("d-{color}"), "controller": true}]}})
}

/// A gateway pod, controlled by its color's ReplicaSet.
fn pod(name: &str, color: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"switchyard.dev/color": color},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                            "name": format!("chat-{color}-5d9f"), "uid": format!("rs-{color}"), "controller": true}]},
           "status": {"podIP": ip, "phase": "Running"}})
}

/// The public Service's EndpointSlice, listing `addresses` ready.
fn endpoint_slice(addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "chat-x1", "labels": {"kubernetes.io/service-name": "chat"}},
           "addressType": "IPv4", "endpoints": endpoints})
}

/// The reads every reconcile of a resource with a Deployment makes, before
/// any write: the Secret, Deployments, ReplicaSets, pods, both Services,
/// and (a rollout moving, or both colors scaled up) the EndpointSlices.
const READS: usize = 7;

/// Runs one reconcile against an API server that answers with `route`
/// (PATCH, POST and PUT are echoed unless `route` says otherwise) and returns
/// every request it received, in order.
async fn reconcile_once(
    cs: ConnectionService,
    gateways: Arc<RecordingGateways>,
    route: impl Fn(&str, &str) -> Option<(u16, Value)> + Send + 'static,
) -> Vec<Seen> {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let cs_json = serde_json::to_value(&cs).expect("json");
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let content_type = request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = request.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = route(&method, &uri).unwrap_or_else(|| {
                if uri.contains("/connectionservices/") {
                    (200, cs_json.clone())
                } else {
                    (200, body.clone())
                }
            });
            seen.push(Seen {
                method,
                uri,
                content_type,
                body,
            });
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).expect("answer")))
                .expect("response");
            send.send_response(response);
        }
        seen
    });
    let client = Client::new(service, "default");
    let now = Timestamp::from_second(1_800_000_100).expect("now");
    let ctx = Context::new(client, gateways, Metrics::new().expect("metrics"))
        .with_clock(Arc::new(move || now));
    let result = reconcile(Arc::new(cs), Arc::new(ctx)).await;
    assert!(result.is_ok(), "reconcile failed: {:?}", result.err());
    server.await.expect("api server")
}

fn lines(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(Seen::line).collect()
}

const APPLY: &str = "?&force=true&fieldManager=switchyard-operator";

fn apply_uri(path: &str) -> String {
    format!("{path}{APPLY}")
}

fn find<'a>(seen: &'a [Seen], method: &str, uri_prefix: &str) -> &'a Seen {
    seen.iter()
        .find(|s| s.method == method && s.uri.starts_with(uri_prefix))
        .unwrap_or_else(|| panic!("no {method} {uri_prefix} in {:#?}", lines(seen)))
}

#[tokio::test]
async fn first_install() {
    let cs = resource(Value::Null, json!({}));
    let rev = revision(&cs);
    let gateways = Arc::new(RecordingGateways::default());
    let seen = reconcile_once(cs, gateways.clone(), |method, uri| match (method, uri) {
        ("GET", u) if u.contains("/secrets/") || u.contains("/services/") => Some(not_found()),
        ("GET", u) if u.contains("/deployments?") => Some(list("DeploymentList", json!([]))),
        ("GET", u) if u.contains("/replicasets?") => Some(list("ReplicaSetList", json!([]))),
        ("GET", u) if u.contains("/pods?") => Some(list("PodList", json!([]))),
        _ => None,
    })
    .await;
    let selector = "labelSelector=app.kubernetes.io%2Finstance%3Dchat%2Capp.kubernetes.io%2Fmanaged-by%3Dswitchyard-operator";
    assert_eq!(
        lines(&seen),
        vec![
            format!("GET /api/v1{NS}/secrets/chat-admin"),
            format!("POST /api/v1{NS}/secrets?&fieldManager=switchyard-operator"),
            format!("GET /apis/apps/v1{NS}/deployments?&{selector}"),
            format!("GET /apis/apps/v1{NS}/replicasets?&{PODS}"),
            format!("GET /api/v1{NS}/pods?&{PODS}"),
            format!("GET /api/v1{NS}/services/chat"),
            format!("GET /api/v1{NS}/services/chat-preview"),
            // Once per spec generation, a planned step like every change.
            format!(
                "PATCH {}",
                apply_uri(&format!("/apis/policy/v1{NS}/poddisruptionbudgets/chat"))
            ),
            format!(
                "PATCH {}",
                apply_uri(&format!("/api/v1{NS}/configmaps/chat-config-{rev}"))
            ),
            format!(
                "PATCH {}",
                apply_uri(&format!("/apis/apps/v1{NS}/deployments/chat-blue"))
            ),
            format!("PATCH {}", apply_uri(&format!("/api/v1{NS}/services/chat"))),
            format!(
                "PATCH {}",
                apply_uri(&format!("/api/v1{NS}/services/chat-preview"))
            ),
            format!("POST /apis/events.k8s.io/v1{NS}/events?"),
            format!(
                "PATCH {}",
                apply_uri(&format!(
                    "/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat/status"
                ))
            ),
        ]
    );
    let secret = find(&seen, "POST", &format!("/api/v1{NS}/secrets"));
    let token = secret.body["data"]["token"].as_str().expect("token");
    assert_eq!(token.len(), 88, "base64 of 64 hex characters");
    assert_eq!(
        secret.body["metadata"]["ownerReferences"][0]["uid"],
        "uid-1"
    );

    let deployment = find(
        &seen,
        "PATCH",
        &format!("/apis/apps/v1{NS}/deployments/chat-blue"),
    );
    assert_eq!(deployment.content_type, "application/apply-patch+yaml");
    assert_eq!(deployment.body["spec"]["replicas"], 2);
    assert_eq!(
        deployment.body["spec"]["template"]["metadata"]["labels"]["switchyard.dev/revision"],
        rev.as_str()
    );
    assert_eq!(
        deployment.body["spec"]["template"]["spec"]["containers"][0]["image"],
        "gw:2"
    );
    let config = find(&seen, "PATCH", &format!("/api/v1{NS}/configmaps/"));
    assert_eq!(
        config.body["data"]["config.yaml"],
        "auth:\n  anonymous: true\n"
    );
    let service = find(&seen, "PATCH", &format!("/api/v1{NS}/services/chat?"));
    assert_eq!(
        service.body["spec"]["selector"]["switchyard.dev/color"],
        "blue"
    );
    let event = find(&seen, "POST", "/apis/events.k8s.io/v1");
    assert_eq!(event.body["reason"], "Installed");
    assert_eq!(event.body["regarding"]["name"], "chat");
    let status = seen.last().expect("status").body["status"].clone();
    assert_eq!(status["phase"], "Stable");
    assert_eq!(status["activeColor"], "blue");
    assert_eq!(status["activeRevision"], rev.as_str());
    assert_eq!(status["observedGeneration"], 1);
    assert!(gateways.calls.lock().expect("calls").is_empty());
}

fn rollout_status(phase: &str, rev: &str) -> Value {
    json!({
        "phase": phase, "activeColor": "green", "activeRevision": rev,
        "targetRevision": rev, "observedGeneration": 1,
        "rollout": {
            "fromColor": "blue", "fromRevision": "r1", "toColor": "green", "toRevision": rev,
            "started": "2027-01-15T08:00:00Z", "phaseSince": "2027-01-15T08:01:00Z",
            "drainStarted": if phase == "Draining" { json!("2027-01-15T08:01:00Z") } else { Value::Null },
            "trafficMoved": "2027-01-15T08:01:00Z",
            "total": 10, "drained": 0, "remaining": 10
        }
    })
}

fn fleet_routes(rev: String) -> impl Fn(&str, &str) -> Option<(u16, Value)> + Send + 'static {
    fleet_routes_on(rev, "green")
}

/// The fleet with the public Service, and its EndpointSlices, on `color`.
fn fleet_routes_on(
    rev: String,
    color: &'static str,
) -> impl Fn(&str, &str) -> Option<(u16, Value)> + Send + 'static {
    move |method, uri| match (method, uri) {
        ("GET", u) if u.contains("/replicasets?") => Some(list(
            "ReplicaSetList",
            json!([replica_set("blue"), replica_set("green")]),
        )),
        ("GET", u) if u.contains("/endpointslices?") => Some(list(
            "EndpointSliceList",
            json!([if color == "green" {
                endpoint_slice(&["10.0.1.1"])
            } else {
                endpoint_slice(&["10.0.0.1", "10.0.0.2"])
            }]),
        )),
        ("GET", u) if u.contains("/services/chat-preview") => Some((200, service("green"))),
        ("GET", u) if u.contains("/secrets/chat-admin") => Some(secret()),
        ("GET", u) if u.contains("/deployments?") => Some(list(
            "DeploymentList",
            json!([deployment("blue", "r1", 2), deployment("green", &rev, 2)]),
        )),
        ("GET", u) if u.contains("/pods?") => Some(list(
            "PodList",
            json!([
                pod("chat-blue-1", "blue", "10.0.0.1"),
                pod("chat-blue-2", "blue", "10.0.0.2"),
                pod("chat-green-1", "green", "10.0.1.1")
            ]),
        )),
        ("GET", u) if u.contains("/services/") => Some((200, service(color))),
        _ => None,
    }
}

fn fleet() -> Arc<RecordingGateways> {
    Arc::new(RecordingGateways {
        connections: BTreeMap::from([
            ("10.0.0.1".to_string(), (6, false)),
            ("10.0.0.2".to_string(), (4, false)),
            ("10.0.1.1".to_string(), (0, false)),
        ]),
        calls: Mutex::default(),
    })
}

#[tokio::test]
async fn rollout_step_switching_to_draining() {
    let probe = resource(Value::Null, json!({}));
    let rev = revision(&probe);
    let cs = resource(rollout_status("Switching", &rev), json!({}));
    let gateways = fleet();
    let seen = reconcile_once(cs, gateways.clone(), fleet_routes(rev.clone())).await;
    assert_eq!(
        lines(&seen),
        vec![
            format!("GET /api/v1{NS}/secrets/chat-admin"),
            format!("GET /apis/apps/v1{NS}/deployments?&labelSelector=app.kubernetes.io%2Finstance%3Dchat%2Capp.kubernetes.io%2Fmanaged-by%3Dswitchyard-operator"),
            format!("GET /apis/apps/v1{NS}/replicasets?&{PODS}"),
            format!("GET /api/v1{NS}/pods?&{PODS}"),
            format!("GET /api/v1{NS}/services/chat"),
            format!("GET /api/v1{NS}/services/chat-preview"),
            format!("GET /apis/discovery.k8s.io/v1{NS}/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Dchat"),
            format!("POST /apis/events.k8s.io/v1{NS}/events?"),
            format!(
                "PATCH {}",
                apply_uri(&format!(
                    "/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat/status"
                ))
            ),
        ]
    );
    // Each of the two old pods gets half of the default 100 closes/s.
    assert_eq!(
        *gateways.calls.lock().expect("calls"),
        vec![
            "drain 10.0.0.1:9090 token=secret-token rate=50 window=60000 deadline=300000",
            "drain 10.0.0.2:9090 token=secret-token rate=50 window=60000 deadline=300000",
        ]
    );
    let event = find(&seen, "POST", "/apis/events.k8s.io/v1");
    assert_eq!(event.body["reason"], "DrainStarted");
    let written = &seen.last().expect("status").body;
    assert_eq!(
        written["metadata"]["resourceVersion"], "10",
        "the status is written only over the version it was planned from"
    );
    let status = &written["status"];
    assert_eq!(status["phase"], "Draining");
    assert_eq!(status["connections"], json!({"blue": 10, "green": 0}));
    assert_eq!(status["rollout"]["total"], 10);
    assert_eq!(status["rollout"]["drainStarted"], "2027-01-15T08:01:40Z");
}

fn draining_fleet() -> Arc<RecordingGateways> {
    Arc::new(RecordingGateways {
        connections: BTreeMap::from([
            ("10.0.0.1".to_string(), (6, true)),
            ("10.0.0.2".to_string(), (4, true)),
            ("10.0.1.1".to_string(), (0, false)),
        ]),
        calls: Mutex::default(),
    })
}

/// A Stable status on green at `rev` with the abort annotation left over.
fn stable_with_abort(rev: &str) -> ConnectionService {
    resource(
        json!({
            "phase": "Stable", "activeColor": "green", "activeRevision": rev,
            "targetRevision": rev, "observedGeneration": 1
        }),
        json!({"switchyard.dev/abort": "now"}),
    )
}

#[tokio::test]
async fn abort_while_draining() {
    let probe = resource(Value::Null, json!({}));
    let rev = revision(&probe);
    let abort = json!({"switchyard.dev/abort": "now"});
    // Blue's pods are draining: their drains are cancelled, and nothing
    // else moves until blue is Ready. The annotation stays.
    let cs = resource(rollout_status("Draining", &rev), abort.clone());
    assert_eq!(cs.annotations().len(), 1);
    let gateways = draining_fleet();
    let seen = reconcile_once(cs, gateways.clone(), fleet_routes(rev.clone())).await;
    assert_eq!(
        lines(&seen)[READS..],
        vec![format!(
            "PATCH {}",
            apply_uri(&format!(
                "/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat/status"
            ))
        )]
    );
    assert_eq!(
        *gateways.calls.lock().expect("calls"),
        vec!["cancel 10.0.0.1", "cancel 10.0.0.2"]
    );
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(status["phase"], "Draining");
    assert_eq!(status["rollout"]["aborting"], "Aborted");

    // Blue Ready again: the Service goes back; green stays until the
    // Service's EndpointSlices have followed.
    let mut undoing = rollout_status("Draining", &rev);
    undoing["rollout"]["aborting"] = json!("Aborted");
    let gateways = fleet();
    let seen = reconcile_once(
        resource(undoing.clone(), abort.clone()),
        gateways.clone(),
        fleet_routes(rev.clone()),
    )
    .await;
    assert_eq!(
        lines(&seen)[READS..],
        vec![
            format!("PATCH {}", apply_uri(&format!("/api/v1{NS}/services/chat"))),
            format!(
                "PATCH {}",
                apply_uri(&format!(
                    "/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat/status"
                ))
            ),
        ]
    );
    let back = &seen[READS];
    assert_eq!(
        back.body["spec"]["selector"]["switchyard.dev/color"],
        "blue"
    );
    assert!(gateways.calls.lock().expect("calls").is_empty());

    // The Service and its endpoints on blue (settled): green to zero.
    undoing["rollout"]["trafficMoved"] = json!("2027-01-15T08:01:00Z");
    let gateways = fleet();
    let seen = reconcile_once(
        resource(undoing, abort),
        gateways.clone(),
        fleet_routes_on(rev.clone(), "blue"),
    )
    .await;
    assert_eq!(
        lines(&seen)[READS..],
        vec![
            format!(
                "PATCH /apis/apps/v1{NS}/deployments/chat-green?&fieldManager=switchyard-operator"
            ),
            format!(
                "PATCH {}",
                apply_uri(&format!("/api/v1{NS}/services/chat-preview"))
            ),
            format!("POST /apis/events.k8s.io/v1{NS}/events?"),
            format!(
                "PATCH {}",
                apply_uri(&format!(
                    "/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat/status"
                ))
            ),
        ]
    );
    let scale = &seen[READS];
    assert_eq!(scale.content_type, "application/merge-patch+json");
    assert_eq!(scale.body, json!({"spec": {"replicas": 0}}));
    assert_eq!(seen[READS + 2].body["reason"], "RolloutAborted");
    assert_eq!(seen[READS + 2].body["type"], "Warning");
    assert!(gateways.calls.lock().expect("calls").is_empty());
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(status["phase"], "Stable");
    assert_eq!(status["activeColor"], "blue");
    assert_eq!(status["activeRevision"], "r1");
    assert_eq!(status["failedRevision"], status["targetRevision"]);

    // Once Stable, the annotation goes, before anything else.
    let seen = reconcile_once(stable_with_abort(&rev), fleet(), fleet_routes(rev)).await;
    let annotation = &seen[READS];
    assert_eq!(
        annotation.uri,
        format!("/apis/switchyard.dev/v1alpha1{NS}/connectionservices/chat?")
    );
    // The version it acted on is the patch's precondition: a stale
    // writer's patch is refused (409) rather than applied.
    assert_eq!(
        annotation.body,
        json!({"metadata": {"annotations": {"switchyard.dev/abort": null}, "resourceVersion": "10"}})
    );
}

/// (API group, resource[/subresource], verb) of one request.
fn permission(seen: &Seen) -> Vec<(String, String, String)> {
    let (path, query) = seen.uri.split_once('?').unwrap_or((&seen.uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("unexpected path {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let verb = match (seen.method.as_str(), named) {
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        (other, _) => panic!("unexpected method {other}"),
    };
    let mut needed = vec![(group.to_string(), resource.clone(), verb.to_string())];
    // An apply that creates the object is authorized as a create.
    if seen.content_type == "application/apply-patch+yaml" && !resource.ends_with("/status") {
        needed.push((group.to_string(), resource, "create".to_string()));
    }
    needed
}

#[tokio::test]
async fn rbac_grants_exactly_what_the_operator_calls() {
    use std::collections::BTreeSet;
    use switchyard_operator::leader::LeaderElector;

    let mut required: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut add = |seen: &[Seen]| {
        for s in seen {
            required.extend(permission(s));
        }
    };
    // The reconciles: install, the switch to Draining, an abort.
    let cs = resource(Value::Null, json!({}));
    let rev = revision(&cs);
    add(&reconcile_once(
        cs,
        Arc::new(RecordingGateways::default()),
        |method, uri| match (method, uri) {
            ("GET", u) if u.contains("/secrets/") || u.contains("/services/") => Some(not_found()),
            ("GET", u) if u.contains("/deployments?") => Some(list("DeploymentList", json!([]))),
            ("GET", u) if u.contains("/replicasets?") => Some(list("ReplicaSetList", json!([]))),
            ("GET", u) if u.contains("/pods?") => Some(list("PodList", json!([]))),
            _ => None,
        },
    )
    .await);
    add(&reconcile_once(
        resource(rollout_status("Switching", &rev), json!({})),
        fleet(),
        fleet_routes(rev.clone()),
    )
    .await);
    add(&reconcile_once(
        resource(
            rollout_status("Draining", &rev),
            json!({"switchyard.dev/abort": "now"}),
        ),
        fleet(),
        fleet_routes(rev.clone()),
    )
    .await);
    add(&reconcile_once(stable_with_abort(&rev), fleet(), fleet_routes(rev.clone())).await);
    // A rollout's end: blue empty since long ago, scaled down, ConfigMaps pruned.
    let mut done = rollout_status("Draining", &rev);
    done["rollout"]["drainedAt"] = json!("2027-01-15T08:01:00Z");
    let empty = Arc::new(RecordingGateways {
        connections: BTreeMap::from([
            ("10.0.0.1".to_string(), (0, true)),
            ("10.0.0.2".to_string(), (0, true)),
            ("10.0.1.1".to_string(), (10, false)),
        ]),
        calls: Mutex::default(),
    });
    let routes = fleet_routes(rev.clone());
    let seen = reconcile_once(resource(done, json!({})), empty, move |method, uri| {
        if method == "GET" && uri.contains("/configmaps?") {
            return Some(list(
                "ConfigMapList",
                json!([{"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "chat-config-r1", "labels": {"switchyard.dev/revision": "r1"}}}]),
            ));
        }
        if method == "DELETE" {
            return Some((200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})));
        }
        routes(method, uri)
    })
    .await;
    assert!(
        lines(&seen)
            .iter()
            .any(|l| l.starts_with(&format!("DELETE /api/v1{NS}/configmaps/chat-config-r1"))),
        "{:#?}",
        lines(&seen)
    );
    add(&seen);

    // Leader election: take the Lease, then renew it.
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut seen = Vec::new();
        let mut lease: Option<Value> = None;
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = match (method.as_str(), &lease) {
                ("GET", None) => not_found(),
                ("GET", Some(l)) => (200, l.clone()),
                _ => {
                    let mut stored = body.clone();
                    stored["metadata"]["resourceVersion"] = json!("7");
                    lease = Some(stored.clone());
                    (200, stored)
                }
            };
            seen.push(Seen {
                method,
                uri,
                content_type: String::new(),
                body,
            });
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
        }
        seen
    });
    {
        let client = Client::new(service, "switchyard-system");
        let elector = LeaderElector::new(
            kube::Api::namespaced(client, "switchyard-system"),
            "switchyard-operator",
            "pod-a",
            std::time::Duration::from_secs(15),
        );
        assert!(elector.try_acquire_or_renew().await.expect("acquire"));
        assert!(elector.try_acquire_or_renew().await.expect("renew"));
    }
    add(&server.await.expect("lease server"));

    // Not reached by one reconcile, from the code that makes them: the
    // controller's list+watch of ConnectionServices and of the Deployments it
    // owns (cli.rs), and the Recorder's patch of a repeated Event (a series).
    for (group, resource, verb) in [
        ("switchyard.dev", "connectionservices", "list"),
        ("switchyard.dev", "connectionservices", "watch"),
        ("apps", "deployments", "watch"),
        ("events.k8s.io", "events", "patch"),
    ] {
        required.insert((group.into(), resource.into(), verb.into()));
    }

    let rbac_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/rbac.yaml");
    let text = std::fs::read_to_string(rbac_path).expect("k8s/base/rbac.yaml");
    let mut granted = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if doc["kind"] != "ClusterRole" && doc["kind"] != "Role" {
            continue;
        }
        for rule in doc["rules"].as_array().expect("rules") {
            for group in rule["apiGroups"].as_array().expect("groups") {
                for resource in rule["resources"].as_array().expect("resources") {
                    for verb in rule["verbs"].as_array().expect("verbs") {
                        granted.insert((
                            group.as_str().expect("group").to_string(),
                            resource.as_str().expect("resource").to_string(),
                            verb.as_str().expect("verb").to_string(),
                        ));
                    }
                }
            }
        }
    }
    let missing: Vec<_> = required.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&required).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "k8s/base/rbac.yaml: missing {missing:?}; granted but never used {extra:?}"
    );
}
