//! The emulator's object store: one global, monotonic resourceVersion; a
//! bounded history of changes for watches (older versions answer 410 Gone);
//! generation bumped on spec changes only; status kept apart where a kind has
//! a status subresource; field managers per object for server-side apply;
//! ownerReference garbage collection on delete.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::patch::{self, FieldPath};
use super::selector::Selector;

/// Changes kept for watches; a watch from before the oldest gets 410 Gone.
const HISTORY: usize = 100_000;

/// A kind the emulator serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// API group ("" for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name (URL segment).
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a status subresource.
    pub status: bool,
    /// kubectl short names.
    pub short_names: Vec<String>,
    /// additionalPrinterColumns (custom resources).
    pub columns: Vec<Value>,
    /// The CRD's openAPIV3Schema (custom resources): every write is pruned,
    /// defaulted and validated against it ([`super::validate`]).
    pub schema: Option<Value>,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status,
            short_names: Vec::new(),
            columns: Vec::new(),
            schema: None,
        }
    }

    /// What the API server does to a write of this kind before storing it:
    /// a custom resource is pruned, defaulted and validated by its schema.
    fn admit(&self, name: &str, object: &mut Value) -> Result<(), ApiError> {
        super::validate::names_and_labels(&self.kind, &self.group, object)?;
        super::validate::env_names(&self.kind, &self.group, object)?;
        match &self.schema {
            Some(schema) => {
                super::validate::custom_resource(schema, &self.kind, &self.group, name, object)
            }
            None => Ok(()),
        }
    }

    /// `v1` or `group/version`.
    /// The keys of the associative list at a path of field names, for
    /// server-side apply (atomic lists: `None`).
    pub fn list_keys(&self, path: &[&str]) -> Option<Vec<String>> {
        super::validate::list_keys(&self.kind, self.schema.as_ref(), path)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The store's key for this kind.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
}

/// An error the API answers with a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// Kubernetes reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

impl ApiError {
    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} not found"))
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }
    /// An error with any code.
    pub fn new(code: u16, reason: &'static str, message: String) -> Self {
        ApiError {
            code,
            reason,
            message,
        }
    }
    /// The `Status` body.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion it created.
    pub rv: u64,
    /// The kind's key.
    pub type_key: String,
    /// Namespace ("" for cluster-scoped).
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub event: &'static str,
    /// The object after the change (before, for DELETED).
    pub object: Value,
    /// Its labels before a MODIFIED change: a watch with a label selector
    /// tells a watcher an object stopped (DELETED) or started (ADDED)
    /// matching, as kube-apiserver's watch cache does.
    pub previous_labels: Option<BTreeMap<String, String>>,
}

/// How a manager wrote its fields: kube-apiserver keeps a manager's
/// applied fields and the fields it changed by updates (create, PUT, merge
/// patch) apart, as two `managedFields` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// Server-side apply.
    Apply,
    /// Create, replace or patch.
    Update,
}

/// One `managedFields` entry's identity: manager, operation, and whether
/// it wrote through the status subresource.
type Manager = (String, Operation, bool);

/// What one manager owns, and when that last changed.
#[derive(Debug, Clone, Default, PartialEq)]
struct Owned {
    fields: BTreeSet<FieldPath>,
    time: String,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    object: Value,
    managed: BTreeMap<Manager, Owned>,
}

impl Entry {
    /// Sets `manager`'s fields (and their time, if they changed).
    fn own(&mut self, manager: Manager, fields: BTreeSet<FieldPath>) {
        let owned = self.managed.entry(manager).or_default();
        if owned.fields != fields || owned.time.is_empty() {
            owned.fields = fields;
            owned.time = now_rfc3339();
        }
    }

    /// An update by `manager` changed `changed`: those fields are its now,
    /// and no longer anyone else's (in the same scope: main resource or
    /// status). Fields the update removed belong to no one.
    fn updated(&mut self, manager: &str, status: bool, changed: BTreeSet<FieldPath>, live: &Value) {
        for ((_, _, scope), owned) in self.managed.iter_mut() {
            if *scope == status {
                owned.fields.retain(|p| !changed.contains(p));
            }
        }
        let present: BTreeSet<FieldPath> = changed
            .into_iter()
            .filter(|p| patch::get_path(live, p).is_some())
            .collect();
        let key = (manager.to_string(), Operation::Update, status);
        let mut mine = self
            .managed
            .get(&key)
            .map(|o| o.fields.clone())
            .unwrap_or_default();
        mine.extend(present);
        self.own(key, mine);
        self.managed.retain(|_, owned| !owned.fields.is_empty());
    }

    /// `metadata.managedFields` as kube-apiserver shows it.
    fn render_managed(&mut self) {
        let api_version = self.object["apiVersion"].clone();
        let entries: Vec<Value> = self
            .managed
            .iter()
            .map(|((manager, operation, status), owned)| {
                let mut entry = json!({
                    "manager": manager,
                    "operation": match operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                    "apiVersion": api_version,
                    "time": owned.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": patch::fields_v1(&owned.fields),
                });
                if *status {
                    entry["subresource"] = json!("status");
                }
                entry
            })
            .collect();
        if let Some(metadata) = self.object["metadata"].as_object_mut() {
            if entries.is_empty() {
                metadata.remove("managedFields");
            } else {
                metadata.insert("managedFields".into(), Value::Array(entries));
            }
        }
    }
}

/// Managed fields in a request body are the server's to keep: dropped.
fn strip_managed(object: &mut Value) {
    // (`get_mut`: indexing would add a `metadata: null` to a patch.)
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("managedFields");
    }
}

type ObjectKey = (String, String, String);

struct Inner {
    rv: u64,
    types: BTreeMap<String, ResourceType>,
    objects: BTreeMap<ObjectKey, Entry>,
    history: VecDeque<Change>,
    compacted_to: u64,
    next_uid: u64,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    notify: watch::Sender<u64>,
    /// Namespaces whose pods must meet Pod Security `restricted`
    /// ([`super::podsecurity`]), as with the label
    /// `pod-security.kubernetes.io/enforce: restricted`.
    restricted: Mutex<BTreeSet<String>>,
    /// Requests served, by `VERB plural[/status]` ([`Store::requests`]).
    requests: Mutex<BTreeMap<String, u64>>,
    /// Bearer tokens whose requests go unanswered ([`Store::partition`]).
    partitioned: Mutex<BTreeSet<String>>,
}

/// Labels of an object.
pub fn labels(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn now_rfc3339() -> String {
    k8s_time(std::time::SystemTime::now())
}

/// RFC 3339 in UTC, seconds precision.
pub fn k8s_time(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    /// A store serving the built-in kinds the operator uses.
    pub fn new() -> Store {
        let mut types = BTreeMap::new();
        for rt in [
            ResourceType::builtin("", "v1", "pods", "Pod", true, true),
            ResourceType::builtin("", "v1", "services", "Service", true, true),
            ResourceType::builtin("", "v1", "configmaps", "ConfigMap", true, false),
            ResourceType::builtin("", "v1", "secrets", "Secret", true, false),
            ResourceType::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
                false,
            ),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                false,
            ),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "roles",
                "Role",
                true,
                false,
            ),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
                false,
            ),
            ResourceType::builtin(
                "networking.k8s.io",
                "v1",
                "networkpolicies",
                "NetworkPolicy",
                true,
                false,
            ),
            ResourceType::builtin("apps", "v1", "deployments", "Deployment", true, true),
            ResourceType::builtin("apps", "v1", "replicasets", "ReplicaSet", true, true),
            ResourceType::builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                true,
            ),
            ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
            ResourceType::builtin(
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "EndpointSlice",
                true,
                false,
            ),
            ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true, false),
            ResourceType::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                true,
            ),
        ] {
            types.insert(rt.key(), rt);
        }
        let (notify, _) = watch::channel(0);
        Store {
            inner: Mutex::new(Inner {
                rv: 0,
                types,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted_to: 0,
                next_uid: 1,
            }),
            notify,
            restricted: Mutex::new(BTreeSet::new()),
            requests: Mutex::new(BTreeMap::new()),
            partitioned: Mutex::new(BTreeSet::new()),
        }
    }

    /// From now on, requests carrying `token` get no answer (they hang,
    /// connection open, as behind a silent partition) until
    /// [`Store::heal`].
    pub fn partition(&self, token: &str) {
        self.partitioned
            .lock()
            .expect("partitioned")
            .insert(token.to_owned());
    }

    /// Answers `token`'s requests again.
    pub fn heal(&self, token: &str) {
        self.partitioned.lock().expect("partitioned").remove(token);
    }

    /// Whether `token` is cut off.
    pub fn is_partitioned(&self, token: &str) -> bool {
        self.partitioned
            .lock()
            .expect("partitioned")
            .contains(token)
    }

    /// Counts one API request (`VERB plural[/status]`; a watch is `WATCH`).
    pub fn count_request(&self, what: &str) {
        *self
            .requests
            .lock()
            .expect("requests")
            .entry(what.to_owned())
            .or_default() += 1;
    }

    /// The API requests served so far, by `VERB plural[/status]`: what a
    /// client costs the API server.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.requests.lock().expect("requests").clone()
    }

    /// Pods created in `namespace` from now on must meet Pod Security
    /// `restricted`, or are refused (403) as Pod Security admission refuses
    /// them. Workload objects (Deployments) are not refused, only their
    /// pods, as on a real cluster.
    pub fn enforce_restricted(&self, namespace: &str) {
        self.restricted
            .lock()
            .expect("restricted namespaces")
            .insert(namespace.to_owned());
    }

    fn pod_security(
        &self,
        rt: &ResourceType,
        namespace: &str,
        object: &Value,
    ) -> Result<(), ApiError> {
        let enforced = self
            .restricted
            .lock()
            .expect("restricted namespaces")
            .contains(namespace);
        if !enforced || rt.key() != "/pods" {
            return Ok(());
        }
        let violations = super::podsecurity::restricted(&object["spec"]);
        if violations.is_empty() {
            return Ok(());
        }
        Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "pods \"{}\" is forbidden: violates PodSecurity \"restricted:latest\": {}",
                object["metadata"]["name"].as_str().unwrap_or_default(),
                violations.join(", ")
            ),
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock")
    }

    /// Every kind served.
    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.values().cloned().collect()
    }

    /// The kind at `group/version/plural`.
    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .get(&format!("{group}/{plural}"))
            .filter(|rt| rt.version == version)
            .cloned()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// A receiver that changes on every write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// Drops the watch history (tests of 410 Gone).
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted_to = inner.rv;
        inner.history.clear();
    }

    /// One object.
    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&(rt.key(), namespace.to_string(), name.to_string()))
            .map(|e| e.object.clone())
            .ok_or_else(|| ApiError::not_found(&format!("{} {namespace}/{name}", rt.plural)))
    }

    /// Objects of a kind (in a namespace, or all) matching a selector, and the
    /// resourceVersion of the list.
    pub fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let key = rt.key();
        let items = inner
            .objects
            .iter()
            .filter(|((k, ns, _), _)| *k == key && namespace.is_none_or(|n| n == ns))
            .filter(|(_, e)| selector.matches(&labels(&e.object)))
            .map(|(_, e)| e.object.clone())
            .collect();
        (items, inner.rv)
    }

    /// Changes after `rv` to a kind (in a namespace, or all).
    pub fn changes_since(
        &self,
        rv: u64,
        type_key: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<Change>, ApiError> {
        let inner = self.lock();
        if rv < inner.compacted_to {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", inner.compacted_to),
            ));
        }
        Ok(inner
            .history
            .iter()
            .filter(|c| {
                c.rv > rv && c.type_key == type_key && namespace.is_none_or(|n| n == c.namespace)
            })
            .cloned()
            .collect())
    }

    /// Creates an object (an Update of `manager`, if named).
    pub fn create(
        &self,
        rt: &ResourceType,
        namespace: &str,
        object: Value,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.create_as(
            rt,
            namespace,
            object,
            manager.map(|m| (m, Operation::Update)),
        )
    }

    fn create_as(
        &self,
        rt: &ResourceType,
        namespace: &str,
        mut object: Value,
        manager: Option<(&str, Operation)>,
    ) -> Result<Value, ApiError> {
        strip_managed(&mut object);
        let mut inner = self.lock();
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .or_else(|| {
                object["metadata"]["generateName"]
                    .as_str()
                    .map(|prefix| format!("{prefix}{:05x}", inner.next_uid))
            })
            .ok_or_else(|| ApiError::bad_request("metadata.name is required"))?;
        let key = (rt.key(), namespace.to_string(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {namespace}/{name} already exists", rt.plural),
            ));
        }
        if rt.key() == "apiextensions.k8s.io/customresourcedefinitions" {
            let custom = custom_type(&object)?;
            inner.types.insert(custom.key(), custom);
        }
        let uid = format!("uid-{:08}", inner.next_uid);
        inner.next_uid += 1;
        object["apiVersion"] = json!(rt.api_version());
        object["kind"] = json!(rt.kind);
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        if rt.namespaced {
            metadata["namespace"] = json!(namespace);
        }
        metadata["uid"] = json!(uid);
        metadata["creationTimestamp"] = json!(now_rfc3339());
        metadata["generation"] = json!(1);
        rt.admit(&name, &mut object)?;
        self.pod_security(rt, namespace, &object)?;
        let mut entry = Entry::default();
        if let Some((manager, operation)) = manager {
            let keys = |path: &[&str]| rt.list_keys(path);
            let mut fields = patch::leaf_paths(&object, &keys);
            fields.retain(|p| p[0] != "status");
            entry.own((manager.to_string(), operation, false), fields);
        }
        entry.object = object;
        Ok(inner.commit(key, "ADDED", entry, &self.notify))
    }

    fn existing(
        inner: &Inner,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<(ObjectKey, Entry), ApiError> {
        let key = (rt.key(), namespace.to_string(), name.to_string());
        let entry = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&format!("{} {namespace}/{name}", rt.plural)))?;
        Ok((key, entry))
    }

    /// PUT: replaces an object (or its status), refusing a stale
    /// resourceVersion; the fields it changed become `manager`'s.
    pub fn replace(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        status_only: bool,
        manager: &str,
    ) -> Result<Value, ApiError> {
        strip_managed(&mut object);
        let mut inner = self.lock();
        let (key, mut entry) = Self::existing(&inner, rt, namespace, name)?;
        let sent = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        let current = entry.object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        if !sent.is_empty() && sent != current {
            return Err(ApiError::new(409, "Conflict", format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified (resourceVersion {sent} is not {current})",
                rt.plural
            )));
        }
        let before = entry.object.clone();
        entry.object = settle(rt, &entry.object, object, status_only);
        rt.admit(name, &mut entry.object)?;
        Self::record_update(rt, &mut entry, &before, manager, status_only);
        Ok(inner.update(key, entry, &self.notify))
    }

    /// PATCH with application/merge-patch+json; the fields it changed
    /// become `manager`'s.
    pub fn merge(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        patch_body: &Value,
        status_only: bool,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let (key, mut entry) = Self::existing(&inner, rt, namespace, name)?;
        precondition(rt, name, &entry.object, patch_body)?;
        let mut patched = entry.object.clone();
        let mut body = patch_body.clone();
        strip_managed(&mut body);
        patch::merge_patch(&mut patched, &body);
        let before = entry.object.clone();
        entry.object = settle(rt, &entry.object, patched, status_only);
        rt.admit(name, &mut entry.object)?;
        Self::record_update(rt, &mut entry, &before, manager, status_only);
        Ok(inner.update(key, entry, &self.notify))
    }

    /// The ownership an update moves: what changed in its scope (status,
    /// or everything else) goes to `manager`'s Update entry.
    fn record_update(
        rt: &ResourceType,
        entry: &mut Entry,
        before: &Value,
        manager: &str,
        status: bool,
    ) {
        let keys = |path: &[&str]| rt.list_keys(path);
        let scope = |object: &Value| {
            let mut scoped = object.clone();
            if status {
                scoped = json!({"status": object.get("status").cloned().unwrap_or(Value::Null)});
            } else if let Some(map) = scoped.as_object_mut() {
                map.remove("status");
            }
            strip_managed(&mut scoped);
            scoped
        };
        let changed = patch::changed_paths(&scope(before), &scope(&entry.object), &keys);
        if !changed.is_empty() {
            let live = entry.object.clone();
            entry.updated(manager, status, changed, &live);
        }
    }

    /// PATCH with application/apply-patch+yaml (server-side apply).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        applied: &Value,
        manager: &str,
        force: bool,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        super::validate::applied_lists(&rt.kind, applied)?;
        let exists =
            self.lock()
                .objects
                .contains_key(&(rt.key(), namespace.to_string(), name.to_string()));
        if !exists {
            if status_only {
                return Err(ApiError::not_found(&format!(
                    "{} {namespace}/{name}",
                    rt.plural
                )));
            }
            let mut object = applied.clone();
            object["metadata"]["name"] = json!(name);
            if rt.status {
                strip_status(&mut object);
            }
            return self.create_as(rt, namespace, object, Some((manager, Operation::Apply)));
        }
        let mut inner = self.lock();
        let (key, mut entry) = Self::existing(&inner, rt, namespace, name)?;
        precondition(rt, name, &entry.object, applied)?;
        let scope = if status_only {
            json!({"status": applied.get("status").cloned().unwrap_or(Value::Null)})
        } else {
            let mut main = applied.clone();
            if rt.status {
                strip_status(&mut main);
            }
            // A precondition, not a field anyone owns.
            if let Some(metadata) = main["metadata"].as_object_mut() {
                metadata.remove("resourceVersion");
            }
            main
        };
        if !scope["metadata"]["managedFields"].is_null() {
            return Err(ApiError::bad_request(
                "metadata.managedFields must be nil in an applied configuration",
            ));
        }
        let keys = |path: &[&str]| rt.list_keys(path);
        let me: Manager = (manager.to_string(), Operation::Apply, status_only);
        // Every other entry in this scope, the same manager's updates too
        // (kube-apiserver tells them apart by operation).
        let others: Vec<(String, &BTreeSet<FieldPath>)> = entry
            .managed
            .iter()
            .filter(|(m, _)| **m != me && m.2 == status_only)
            .map(|((m, op, _), owned)| (format!("{m} ({op:?})"), &owned.fields))
            .collect();
        let conflicts = patch::conflicts(&entry.object, &scope, &keys, others);
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!("Apply failed with conflicts: {}", conflicts.join(", ")),
            ));
        }
        if force {
            // Forced: the conflicting fields are taken from their owners.
            let wanted = patch::leaf_paths(&scope, &keys);
            for (m, owned) in entry.managed.iter_mut() {
                if *m != me && m.2 == status_only {
                    owned.fields.retain(|p| {
                        !wanted.contains(p)
                            || p.last().is_some_and(|s| s.starts_with("k:"))
                            || patch::get_path(&entry.object, p) == patch::get_path(&scope, p)
                    });
                }
            }
            entry.managed.retain(|_, owned| !owned.fields.is_empty());
        }
        let previously = entry
            .managed
            .get(&me)
            .map(|o| o.fields.clone())
            .unwrap_or_default();
        let held: BTreeSet<FieldPath> = entry
            .managed
            .iter()
            .filter(|(m, _)| **m != me && m.2 == status_only)
            .flat_map(|(_, owned)| owned.fields.iter().cloned())
            .collect();
        let mut next = entry.object.clone();
        let owned = patch::apply(&mut next, &scope, &previously, &held, &keys);
        if owned.is_empty() {
            entry.managed.remove(&me);
        } else {
            entry.own(me, owned);
        }
        entry.object = settle(rt, &entry.object, next, status_only);
        rt.admit(name, &mut entry.object)?;
        Ok(inner.update(key, entry, &self.notify))
    }

    /// DELETE, then garbage-collects every object owned (transitively) by
    /// it. A pod on a node is deleted gracefully, as kube-apiserver does:
    /// it gets `deletionTimestamp` (now + its grace period) and
    /// `deletionGracePeriodSeconds` and stays, with its IP, until the
    /// kubelet has stopped it ([`Store::remove_terminated`]); a pod not on
    /// a node, one in a terminal phase, or a grace period of 0 goes at once.
    /// `grace` is the request's `gracePeriodSeconds`, if it gave one.
    pub fn delete(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.delete_with_grace(rt, namespace, name, None)
    }

    /// [`Store::delete`] with the request's grace period.
    pub fn delete_with_grace(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        grace: Option<u64>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let (key, _) = Self::existing(&inner, rt, namespace, name)?;
        Ok(self.delete_key(&mut inner, key, grace))
    }

    /// Removes a terminating pod whose containers have stopped (the
    /// kubelet's last word on it).
    pub fn remove_terminated(&self, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let key = ("/pods".to_string(), namespace.to_string(), name.to_string());
        if inner.objects.contains_key(&key) {
            self.collect(&mut inner, key);
        }
    }

    fn delete_key(&self, inner: &mut Inner, key: ObjectKey, grace: Option<u64>) -> Value {
        let Some(mut entry) = inner.objects.get(&key).cloned() else {
            return Value::Null;
        };
        if key.0 == "/pods" {
            let object = &entry.object;
            let on_node = object["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let terminal = matches!(
                object["status"]["phase"].as_str(),
                Some("Failed" | "Succeeded")
            );
            let grace = grace
                .or_else(|| object["spec"]["terminationGracePeriodSeconds"].as_u64())
                .unwrap_or(30);
            if !object["metadata"]["deletionTimestamp"].is_null() {
                return entry.object;
            }
            if on_node && !terminal && grace > 0 {
                let at = std::time::SystemTime::now() + std::time::Duration::from_secs(grace);
                entry.object["metadata"]["deletionTimestamp"] = json!(k8s_time(at));
                entry.object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                return inner.update(key, entry, &self.notify);
            }
        }
        let deleted = entry.object.clone();
        self.collect(inner, key);
        deleted
    }

    /// Removes an object, then (transitively) what its ownerReferences
    /// make it own — background propagation, each dependent deleted as a
    /// DELETE would (pods gracefully).
    fn collect(&self, inner: &mut Inner, key: ObjectKey) {
        let uid = inner
            .objects
            .get(&key)
            .and_then(|e| e.object["metadata"]["uid"].as_str().map(str::to_string));
        inner.remove(key, &self.notify);
        let Some(uid) = uid else {
            return;
        };
        let owned: Vec<ObjectKey> = inner
            .objects
            .iter()
            .filter(|(_, e)| {
                e.object["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            self.delete_key(inner, key, None);
        }
    }
}

/// A PATCH (merge or apply) whose body carries `metadata.resourceVersion`
/// is refused unless that is the object's current one, as kube-apiserver
/// does: the optimistic lock a writer uses so that it never acts on a state
/// it has not seen.
fn precondition(
    rt: &ResourceType,
    name: &str,
    current: &Value,
    body: &Value,
) -> Result<(), ApiError> {
    let Some(sent) = body["metadata"]["resourceVersion"].as_str() else {
        return Ok(());
    };
    let current = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if sent == current {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again (resourceVersion {sent} is not {current})",
            rt.plural
        ),
    ))
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Inner {
    fn commit(
        &mut self,
        key: ObjectKey,
        event: &'static str,
        mut entry: Entry,
        notify: &watch::Sender<u64>,
    ) -> Value {
        self.rv += 1;
        entry.render_managed();
        entry.object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let object = entry.object.clone();
        let previous = self.objects.get(&key).map(|e| labels(&e.object));
        self.record(&key, event, object.clone(), previous);
        self.objects.insert(key, entry);
        notify.send_replace(self.rv);
        object
    }

    /// Stores a modified object — unless nothing changed (the object with
    /// its resourceVersion aside, and who owns which fields): like
    /// kube-apiserver, a no-op write keeps the resourceVersion and sends no
    /// watch event, so a controller that re-applies what is there does not
    /// wake itself up.
    fn update(&mut self, key: ObjectKey, mut entry: Entry, notify: &watch::Sender<u64>) -> Value {
        entry.render_managed();
        if let Some(current) = self.objects.get(&key) {
            let mut proposed = entry.object.clone();
            proposed["metadata"]["resourceVersion"] =
                current.object["metadata"]["resourceVersion"].clone();
            if proposed == current.object && entry.managed == current.managed {
                return current.object.clone();
            }
        }
        self.commit(key, "MODIFIED", entry, notify)
    }

    fn remove(&mut self, key: ObjectKey, notify: &watch::Sender<u64>) {
        if let Some(entry) = self.objects.remove(&key) {
            self.rv += 1;
            let mut object = entry.object;
            object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.record(&key, "DELETED", object, None);
            notify.send_replace(self.rv);
        }
    }

    fn record(
        &mut self,
        key: &ObjectKey,
        event: &'static str,
        object: Value,
        previous_labels: Option<BTreeMap<String, String>>,
    ) {
        self.history.push_back(Change {
            rv: self.rv,
            type_key: key.0.clone(),
            namespace: key.1.clone(),
            event,
            object,
            previous_labels,
        });
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_to = old.rv;
            }
        }
    }
}

fn strip_status(object: &mut Value) {
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
}

/// The stored form of an update: identity and server-owned metadata kept;
/// status from the right place; generation bumped when the spec changed.
fn settle(rt: &ResourceType, old: &Value, mut new: Value, status_only: bool) -> Value {
    if status_only {
        let mut kept = old.clone();
        kept["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        return kept;
    }
    if rt.status {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => strip_status(&mut new),
        }
    }
    new["apiVersion"] = old["apiVersion"].clone();
    new["kind"] = old["kind"].clone();
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        if let Some(value) = old["metadata"].get(field) {
            new["metadata"][field] = value.clone();
        }
    }
    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = old.get("spec") != new.get("spec");
    new["metadata"]["generation"] = json!(generation + i64::from(changed));
    new
}

/// The kind a CustomResourceDefinition defines (its first served version).
fn custom_type(crd: &Value) -> Result<ResourceType, ApiError> {
    let spec = &crd["spec"];
    let version = spec["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["served"].as_bool() != Some(false)))
        .ok_or_else(|| ApiError::bad_request("a CRD needs a served version"))?;
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request(format!("CRD {what} is required")))
    };
    Ok(ResourceType {
        group: text(&spec["group"], "spec.group")?,
        version: text(&version["name"], "version name")?,
        plural: text(&spec["names"]["plural"], "spec.names.plural")?,
        singular: spec["names"]["singular"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        kind: text(&spec["names"]["kind"], "spec.names.kind")?,
        namespaced: spec["scope"] == "Namespaced",
        status: version["subresources"]["status"].is_object(),
        short_names: spec["names"]["shortNames"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        columns: version["additionalPrinterColumns"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        schema: Some(&version["schema"]["openAPIV3Schema"])
            .filter(|schema| schema.is_object())
            .cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments(store: &Store) -> ResourceType {
        store
            .resource_type("apps", "v1", "deployments")
            .expect("type")
    }

    #[test]
    fn versions_generation_status_and_conflicts() {
        let store = Store::new();
        let rt = deployments(&store);
        let created = store
            .create(
                &rt,
                "ns",
                json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}}),
                None,
            )
            .expect("create");
        assert_eq!(created["metadata"]["resourceVersion"], "1");
        assert_eq!(created["metadata"]["generation"], 1);
        // A status write does not bump the generation; a spec change does.
        let status = store
            .merge(
                &rt,
                "ns",
                "d",
                &json!({"status": {"readyReplicas": 1}}),
                true,
                "test",
            )
            .expect("status");
        assert_eq!(status["metadata"]["generation"], 1);
        assert_eq!(status["status"]["readyReplicas"], 1);
        let scaled = store
            .merge(
                &rt,
                "ns",
                "d",
                &json!({"spec": {"replicas": 2}, "status": {"readyReplicas": 9}}),
                false,
                "test",
            )
            .expect("scale");
        assert_eq!(scaled["metadata"]["generation"], 2);
        assert_eq!(
            scaled["status"]["readyReplicas"], 1,
            "status only through /status"
        );
        // A replace carrying an old resourceVersion is refused.
        let mut stale = created.clone();
        stale["spec"]["replicas"] = json!(5);
        let err = store
            .replace(&rt, "ns", "d", stale, false, "test")
            .expect_err("stale");
        assert_eq!(err.code, 409);
        assert_eq!(
            store
                .create(&rt, "ns", created, None)
                .expect_err("exists")
                .code,
            409
        );
    }

    #[test]
    fn watch_history_and_gone() {
        let store = Store::new();
        let rt = deployments(&store);
        store
            .create(&rt, "ns", json!({"metadata": {"name": "a"}}), None)
            .expect("a");
        store
            .create(&rt, "other", json!({"metadata": {"name": "b"}}), None)
            .expect("b");
        let changes = store
            .changes_since(0, &rt.key(), Some("ns"))
            .expect("changes");
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].event, "ADDED");
        store.compact();
        assert_eq!(
            store
                .changes_since(1, &rt.key(), None)
                .expect_err("gone")
                .code,
            410
        );
        assert!(store
            .changes_since(2, &rt.key(), None)
            .expect("current")
            .is_empty());
    }

    #[test]
    fn owner_references_are_collected() {
        let store = Store::new();
        let rt = deployments(&store);
        let pods = store.resource_type("", "v1", "pods").expect("pods");
        let owner = store
            .create(&rt, "ns", json!({"metadata": {"name": "d"}}), None)
            .expect("d");
        let uid = owner["metadata"]["uid"].clone();
        store
            .create(
                &pods,
                "ns",
                json!({"metadata": {"name": "p", "ownerReferences": [{"uid": uid}]}}),
                None,
            )
            .expect("p");
        store
            .create(&pods, "ns", json!({"metadata": {"name": "q"}}), None)
            .expect("q");
        store.delete(&rt, "ns", "d").expect("delete");
        assert_eq!(
            store.get(&pods, "ns", "p").expect_err("collected").code,
            404
        );
        assert!(store.get(&pods, "ns", "q").is_ok(), "not owned");
    }

    #[test]
    fn server_side_apply_creates_then_removes_dropped_fields() {
        let store = Store::new();
        let rt = deployments(&store);
        let applied = json!({"metadata": {"name": "d", "labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}});
        store
            .apply(&rt, "ns", "d", &applied, "op", true, false)
            .expect("create");
        let applied =
            json!({"metadata": {"name": "d", "labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let after = store
            .apply(&rt, "ns", "d", &applied, "op", true, false)
            .expect("apply");
        assert_eq!(after["metadata"]["labels"], json!({"a": "1"}));
        let theirs = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3}});
        let err = store
            .apply(&rt, "ns", "d", &theirs, "kubectl", false, false)
            .expect_err("conflict");
        assert_eq!(err.code, 409);
        assert!(store
            .apply(&rt, "ns", "d", &theirs, "kubectl", true, false)
            .is_ok());
    }

    #[test]
    fn times_are_rfc3339() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(k8s_time(at), "2023-11-14T22:13:20Z");
    }
}
