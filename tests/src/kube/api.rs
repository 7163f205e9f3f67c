//! The emulator's HTTP surface: the Kubernetes REST paths for the kinds in
//! the store, discovery as far as kube and kubectl need it, watches as
//! streams of JSON lines with bookmarks and 410 Gone, and server-side tables
//! for `kubectl get`. What it does not support is answered with an error
//! status naming it, never silently accepted.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::selector::Selector;
use super::store::{labels, ApiError, ResourceType, Store};

type Body = BoxBody<Bytes, Infallible>;

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

const QUERY_KEYS: &[&str] = &[
    "labelSelector",
    "fieldSelector",
    "watch",
    "resourceVersion",
    "resourceVersionMatch",
    "allowWatchBookmarks",
    "timeoutSeconds",
    "fieldManager",
    "force",
    "limit",
    "continue",
    "pretty",
    "gracePeriodSeconds",
    "propagationPolicy",
];

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.status())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parsed query parameters.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let key = percent_decode(key);
            if !QUERY_KEYS.contains(&key.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "the emulator does not support the query parameter {key:?}"
                )));
            }
            pairs.push((key, percent_decode(value)));
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Where a request points.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Serves one request.
pub async fn handle(store: Arc<Store>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let headers = request.headers().clone();
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    while store.is_partitioned(&token) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return error_response(&ApiError::bad_request(err.to_string())),
    };
    match route(&store, &method, &path, query.as_deref(), &headers, &body).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    }
}

async fn route(
    store: &Arc<Store>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(json_response(200, &version_info())),
        // An OpenAPI v2 document with no definitions (the empty protobuf
        // message): clients that validate objects against it before
        // sending them (Helm, kubectl) find no schema and leave validation
        // to the server. There is no v3 document, so they fall back to v2.
        ["openapi", "v2"] => {
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(
                    "content-type",
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                )
                .body(Full::new(Bytes::new()).boxed())
                .expect("response"))
        }
        ["api"] => {
            return Ok(json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            ))
        }
        ["apis"] => return Ok(json_response(200, &group_list(store))),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::not_found(&format!("path {path}"))),
    };
    if rest.is_empty() {
        return Ok(json_response(200, &resource_list(store, group, version)));
    }
    let query = Query::parse(query)?;
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return Err(ApiError::not_found(&format!("path {path}"))),
    };
    let rt = store.resource_type(group, version, plural).ok_or_else(|| {
        ApiError::not_found(&format!(
            "the server could not find the resource {group}/{version}/{plural}"
        ))
    })?;
    if let (Some("eviction"), "/pods", &Method::POST, Some(name), Some(ns)) =
        (sub, rt.key().as_str(), method, &name, &namespace)
    {
        store.count_request("POST pods/eviction");
        return evict(store, ns, name, body);
    }
    let status = match sub {
        None => false,
        Some("status") if rt.status => true,
        Some(other) => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("the emulator does not serve the subresource {plural}/{other}"),
            ))
        }
    };
    if rt.namespaced && namespace.is_none() && (name.is_some() || *method != Method::GET) {
        return Err(ApiError::bad_request(format!("{plural} are namespaced")));
    }
    let watching = query.flag("watch");
    store.count_request(&format!(
        "{} {}{}",
        if watching { "WATCH" } else { method.as_str() },
        rt.plural,
        if status { "/status" } else { "" }
    ));
    let target = Target {
        rt,
        namespace,
        name,
        status,
    };
    serve_target(store, method, &target, &query, headers, body)
}

fn serve_target(
    store: &Arc<Store>,
    method: &Method,
    target: &Target,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let rt = &target.rt;
    let ns = target.namespace.clone().unwrap_or_default();
    if query.get("fieldSelector").is_some() {
        return Err(ApiError::bad_request(
            "the emulator does not support field selectors",
        ));
    }
    if query.get("continue").is_some() {
        return Err(ApiError::bad_request(
            "the emulator never returns a continue token",
        ));
    }
    // Who an update is recorded under (writes only): `fieldManager`, else
    // the client's name from its User-Agent (kube-apiserver's default).
    let manager = || -> &str {
        query.get("fieldManager").unwrap_or_else(|| {
            headers
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .and_then(|agent| agent.split('/').next())
                .filter(|name| !name.is_empty())
                .unwrap_or("unknown")
        })
    };
    let table = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=Table"));
    match (method.clone(), &target.name) {
        (Method::GET, None) => {
            let selector = Selector::parse(query.get("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            if query.flag("watch") {
                let since = query.get("resourceVersion").map(|rv| {
                    rv.parse::<u64>()
                        .map_err(|_| ApiError::bad_request(format!("bad resourceVersion {rv:?}")))
                });
                let since = since.transpose()?;
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(1800);
                return Ok(watch(
                    store.clone(),
                    rt.clone(),
                    target.namespace.clone(),
                    selector,
                    since,
                    query.flag("allowWatchBookmarks"),
                    Duration::from_secs(timeout),
                ));
            }
            let (items, rv) = store.list(rt, target.namespace.as_deref(), &selector);
            if table {
                return Ok(json_response(200, &super::table::table(rt, &items, rv)));
            }
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items,
                }),
            ))
        }
        (Method::GET, Some(name)) => {
            let object = store.get(rt, &ns, name)?;
            if table {
                let rv = store.resource_version();
                return Ok(json_response(200, &super::table::table(rt, &[object], rv)));
            }
            Ok(json_response(200, &object))
        }
        (Method::POST, None) => {
            let object = parse_body(body)?;
            let created = store.create(rt, &ns, object, Some(manager()))?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, Some(name)) => {
            let object = parse_body(body)?;
            Ok(json_response(
                200,
                &store.replace(rt, &ns, name, object, target.status, manager())?,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let patch = parse_body(body)?;
            let patched = match content_type.split(';').next().unwrap_or_default() {
                "application/merge-patch+json" => {
                    store.merge(rt, &ns, name, &patch, target.status, manager())?
                }
                "application/apply-patch+yaml" => {
                    let manager = query.get("fieldManager").ok_or_else(|| {
                        ApiError::bad_request("fieldManager is required for apply patch")
                    })?;
                    store.apply(
                        rt,
                        &ns,
                        name,
                        &patch,
                        manager,
                        query.flag("force"),
                        target.status,
                    )?
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the emulator does not support patches of type {other:?}"),
                    ))
                }
            };
            Ok(json_response(200, &patched))
        }
        (Method::DELETE, Some(name)) => {
            let grace = query
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse().ok())
                .or_else(|| grace_period(body));
            Ok(json_response(
                200,
                &store.delete_with_grace(rt, &ns, name, grace)?,
            ))
        }
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the emulator does not support {method} here"),
        )),
    }
}

/// `gracePeriodSeconds` of a DeleteOptions body (kube's client sends one
/// with every delete), if any.
fn grace_period(body: &Bytes) -> Option<u64> {
    let options: Value = serde_json::from_slice(body).ok()?;
    options["gracePeriodSeconds"]
        .as_u64()
        .or_else(|| options["deleteOptions"]["gracePeriodSeconds"].as_u64())
}

/// Evictions are decided one at a time, so two cannot both spend a
/// budget's last allowed disruption (kube-apiserver uses the budget's
/// resourceVersion for this).
static EVICTIONS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `POST pods/NAME/eviction`: the pod is deleted (gracefully) if its
/// PodDisruptionBudget allows it, whose `disruptionsAllowed` it spends;
/// otherwise 429 as the API server words it ([`super::disruption`]).
fn evict(store: &Store, ns: &str, name: &str, body: &Bytes) -> Result<Response<Body>, ApiError> {
    let _one = EVICTIONS.lock().unwrap_or_else(|e| e.into_inner());
    let pods = store
        .resource_type("", "v1", "pods")
        .ok_or_else(|| ApiError::not_found("pods"))?;
    let budgets_type = store
        .resource_type("policy", "v1", "poddisruptionbudgets")
        .ok_or_else(|| ApiError::not_found("poddisruptionbudgets"))?;
    let pod = store.get(&pods, ns, name)?;
    let (budgets, _) = store.list(&budgets_type, Some(ns), &Selector::default());
    if let Some(budget) = super::disruption::eviction(&pod, &budgets)? {
        // The pod is terminating from now on: it no longer counts as
        // healthy (what the disruption controller will find next).
        let status = budgets
            .iter()
            .find(|b| b["metadata"]["name"] == budget.as_str())
            .map(|b| b["status"].clone())
            .unwrap_or_default();
        let less = |field: &str| status[field].as_u64().unwrap_or(1).saturating_sub(1);
        let spent = json!({"status": {"disruptionsAllowed": less("disruptionsAllowed"),
                                      "currentHealthy": less("currentHealthy")}});
        store.merge(&budgets_type, ns, &budget, &spent, true, "kube-apiserver")?;
    }
    store.delete_with_grace(&pods, ns, name, grace_period(body))?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// JSON, or YAML (kubectl sends apply patches as YAML).
fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).or_else(|_| {
        serde_yaml::from_slice(body)
            .map_err(|err| ApiError::bad_request(format!("body is neither JSON nor YAML: {err}")))
    })
}

fn line(event: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": event, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

/// A watch: current objects first when no version was given, then every
/// change after the version, bookmarks when idle, until the timeout or the
/// client goes away.
fn watch(
    store: Arc<Store>,
    rt: ResourceType,
    namespace: Option<String>,
    selector: Selector,
    since: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let mut changed = store.subscribe();
        let mut since = match since {
            Some(rv) if rv > 0 => rv,
            _ => {
                let (items, rv) = store.list(&rt, namespace.as_deref(), &selector);
                for item in items {
                    if tx.send(line("ADDED", &item)).await.is_err() {
                        return;
                    }
                }
                rv
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = store.resource_version();
            match store.changes_since(since, &rt.key(), namespace.as_deref()) {
                Err(gone) => {
                    let _ = tx.send(line("ERROR", &gone.status())).await;
                    return;
                }
                Ok(changes) => {
                    for change in changes {
                        since = change.rv;
                        let now = selector.matches(&labels(&change.object));
                        let before = change
                            .previous_labels
                            .as_ref()
                            .map(|previous| selector.matches(previous));
                        // A MODIFIED that moves an object across the
                        // selector is an ADDED or a DELETED for this watch.
                        let event = match (change.event, before, now) {
                            ("MODIFIED", Some(false), true) => Some("ADDED"),
                            ("MODIFIED", Some(true), false) => Some("DELETED"),
                            (event, _, true) => Some(event),
                            _ => None,
                        };
                        if let Some(event) = event {
                            if tx.send(line(event, &change.object)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            since = since.max(current);
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(BOOKMARK_EVERY) => {
                    if bookmarks {
                        let mark = json!({"kind": rt.kind, "apiVersion": rt.api_version(),
                                          "metadata": {"resourceVersion": since.to_string()}});
                        if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let frames = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .expect("response")
}

fn version_info() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-switchyard-emulator",
           "platform": "linux/amd64", "goVersion": "none", "compiler": "none",
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z"})
}

fn group_list(store: &Store) -> Value {
    let mut groups: Vec<(String, String)> = store
        .types()
        .into_iter()
        .filter(|rt| !rt.group.is_empty())
        .map(|rt| (rt.group, rt.version))
        .collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, version)| {
            let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
            json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for rt in store.types() {
        if rt.group != group || rt.version != version {
            continue;
        }
        resources.push(json!({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "shortNames": rt.short_names,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }));
        if rt.status {
            resources.push(
                json!({"name": format!("{}/status", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings() {
        let query = Query::parse(Some(
            "labelSelector=a%3Db%2Cc%20in%20(x)&watch=true&resourceVersion=12",
        ))
        .expect("query");
        assert_eq!(query.get("labelSelector"), Some("a=b,c in (x)"));
        assert!(query.flag("watch"));
        assert_eq!(query.get("resourceVersion"), Some("12"));
        let err = Query::parse(Some("dryRun=All")).expect_err("unsupported");
        assert_eq!(err.code, 400);
        assert!(err.message.contains("dryRun"));
    }
}
