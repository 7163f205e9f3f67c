//! The emulator's API semantics, through kube's own client: the watch
//! protocol (from a version, bookmarks, 410 Gone), 409 on a stale write,
//! generation, set-based selectors, server-side apply (per-entry merge of
//! associative lists, ownership per manager and operation, removal of what
//! a manager stopped sending), no-op writes that change no version, garbage
//! collection, selector watches that see objects leave and enter the
//! selection, graceful pod deletion and evictions under
//! PodDisruptionBudgets, EndpointSlices that follow Services late, what
//! kube-apiserver refuses (duplicate keys in an applied associative list,
//! custom resources that break their CRD's schema) and loud refusals of
//! what it does not support.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Api, Client, Config};
use serde_json::json;
use switchyard_tests::kube::Emulator;

async fn client(emu: &Emulator) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::new(format!("http://{}", emu.addr).parse().expect("url"));
    Client::try_from(config).expect("client")
}

fn config_map(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .expect("configmap")
}

fn status_code(err: kube::Error) -> u16 {
    api_error(err).0
}

fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.message),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Server-side apply of a Deployment whose container lists one env name
/// twice is refused like kube-apiserver refuses it (500, "duplicate entries
/// for key"), forced or not; the same name in two containers is fine.
#[tokio::test]
async fn applied_associative_lists_with_duplicate_keys_are_refused() {
    let emu = Emulator::start().await.expect("emulator");
    let deployments: Api<Deployment> = Api::namespaced(client(&emu).await, "ns");
    let deployment = |env: serde_json::Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "template": {"metadata": {"labels": {"a": "b"}},
                                     "spec": {"containers": [
                                         {"name": "one", "image": "i", "env": env},
                                         {"name": "two", "image": "i", "env": [{"name": "A"}]}]}}}})
    };
    for force in [false, true] {
        let mut params = PatchParams::apply("switchyard-operator");
        params.force = force;
        let twice = deployment(json!([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]));
        let (code, message) = api_error(
            deployments
                .patch("d", &params, &Patch::Apply(&twice))
                .await
                .expect_err("duplicate env"),
        );
        assert_eq!(code, 500, "{message}");
        assert!(
            message.contains(
                r#".spec.template.spec.containers[name="one"].env: duplicate entries for key [name="A"]"#
            ),
            "{message}"
        );
    }
    deployments
        .patch(
            "d",
            &PatchParams::apply("switchyard-operator"),
            &Patch::Apply(&deployment(json!([{"name": "A"}, {"name": "B"}]))),
        )
        .await
        .expect("unique names apply");
}

/// A custom resource is held to its CRD's schema on every write: the
/// ConnectionService CRD's `env` is a list keyed by name, `replicas` is
/// bounded, `image` required, the name fits the Services made from it;
/// unknown fields are pruned and defaults filled in, as kube-apiserver does.
#[tokio::test]
async fn custom_resources_are_held_to_their_schema() {
    let emu = Emulator::start().await.expect("emulator");
    let resource = |spec: &str| {
        format!("apiVersion: switchyard.dev/v1alpha1\nkind: ConnectionService\nmetadata:\n  name: chat\nspec:\n{spec}")
    };
    let created = emu
        .install("ns", &resource("  image: gw:1\n  surprise: 1\n"))
        .expect("a valid resource");
    assert_eq!(created["spec"]["replicas"], 2, "defaulted: {created}");
    assert!(
        created["spec"].get("surprise").is_none(),
        "pruned: {created}"
    );
    let table = [
        (
            "  image: gw:1\n  pod:\n    env:\n    - name: A\n      value: '1'\n    - name: A\n      value: '2'\n",
            r#"spec.pod.env[1]: Duplicate value: map[string]interface {}{"name":"A"}"#,
        ),
        ("  image: gw:1\n  replicas: 5000\n", "spec.replicas in body should be less than or equal to 1000"),
        ("  replicas: 1\n", "spec.image: Required value"),
        ("  image: gw:1\n  replicas: many\n", "spec.replicas in body must be of type integer"),
        ("  image: gw:1\n  replicas: null\n", "spec.replicas in body must be of type"),
    ];
    let kind = emu
        .kind("switchyard.dev", "connectionservices")
        .expect("served");
    for (n, (spec, expected)) in table.into_iter().enumerate() {
        let mut object: serde_json::Value = serde_yaml::from_str(&resource(spec)).expect("yaml");
        object["metadata"]["name"] = json!(format!("bad-{n}"));
        let err = emu
            .store
            .create(&kind, "ns", object, Some("test"))
            .expect_err(spec);
        assert_eq!(err.code, 422, "{spec}: {}", err.message);
        assert!(err.message.contains(expected), "{spec}: {}", err.message);
        assert!(
            err.message.starts_with(&format!(
                "ConnectionService.switchyard.dev \"bad-{n}\" is invalid: "
            )),
            "{}",
            err.message
        );
    }
    // A name the operator's Services and labels could not carry is refused
    // when the resource is created, not half-way through the install: dots
    // and a leading digit are fine for a custom resource but not for a
    // Service, and NAME-preview must fit 63 characters.
    for (name, expected) in [
        ("chat.v2", "metadata.name in body should match"),
        ("1chat", "metadata.name in body should match"),
        (
            &"c".repeat(56),
            "metadata.name: Too long: may not be longer than 55",
        ),
    ] {
        let mut object: serde_json::Value =
            serde_yaml::from_str(&resource("  image: gw:1\n")).expect("yaml");
        object["metadata"]["name"] = json!(name);
        let err = emu
            .store
            .create(&kind, "ns", object, Some("test"))
            .expect_err(name);
        assert_eq!(err.code, 422, "{name}: {}", err.message);
        assert!(err.message.contains(expected), "{name}: {}", err.message);
    }
    let mut longest: serde_json::Value =
        serde_yaml::from_str(&resource("  image: gw:1\n")).expect("yaml");
    longest["metadata"]["name"] = json!("c".repeat(55));
    emu.store
        .create(&kind, "ns", longest, Some("test"))
        .expect("55 characters fit");
    // What those names would have met: the Service the operator creates.
    let services = emu.kind("", "services").expect("services");
    let err = emu
        .store
        .create(
            &services,
            "ns",
            json!({"metadata": {"name": "chat.v2"}, "spec": {}}),
            Some("test"),
        )
        .expect_err("a Service named like a subdomain");
    assert!(err.message.contains("a DNS-1035 label"), "{}", err.message);
    // Updates are held to it too.
    let err = emu
        .patch(
            "switchyard.dev",
            "connectionservices",
            "ns",
            "chat",
            &json!({"spec": {"replicas": -1}}),
        )
        .expect_err("negative replicas");
    assert!(err.to_string().contains("422 Invalid"), "{err}");
}

/// A watch with a label selector sees an object that stops matching as
/// DELETED and one that starts matching as ADDED, as kube-apiserver sends
/// them (before: the first was silently dropped, the second a MODIFIED of
/// an object the watcher never had).
#[tokio::test]
async fn selector_watches_see_objects_leave_and_enter_the_selection() {
    let emu = Emulator::start().await.expect("emulator");
    let api: Api<ConfigMap> = Api::namespaced(client(&emu).await, "ns");
    api.create(
        &PostParams::default(),
        &config_map("a", json!({"team": "x"})),
    )
    .await
    .expect("create");
    let rv = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("version");
    let params = WatchParams::default().labels("team=x").timeout(10);
    let mut events = api.watch(&params, &rv).await.expect("watch").boxed();
    let relabel = |team: &str| json!({"metadata": {"labels": {"team": team}}});
    for (team, expected) in [("y", "DELETED"), ("z", ""), ("x", "ADDED")] {
        api.patch("a", &PatchParams::default(), &Patch::Merge(&relabel(team)))
            .await
            .expect("relabel");
        if expected.is_empty() {
            continue; // y -> z: never in the selection, nothing to see
        }
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event");
        let (kind, labels) = match event {
            Some(Ok(WatchEvent::Deleted(cm))) => ("DELETED", cm.metadata.labels),
            Some(Ok(WatchEvent::Added(cm))) => ("ADDED", cm.metadata.labels),
            other => panic!("after team={team}: {other:?}"),
        };
        assert_eq!(kind, expected, "after team={team}");
        assert_eq!(labels.expect("labels")["team"], team);
    }
    // Still matching: an ordinary MODIFIED.
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": {"k": "2"}})),
    )
    .await
    .expect("patch");
    match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        Ok(Some(Ok(WatchEvent::Modified(_)))) => {}
        other => panic!("expected a MODIFIED, got {other:?}"),
    }
}

#[tokio::test]
async fn watches_resume_from_a_version_send_bookmarks_and_expire() {
    let emu = Emulator::start().await.expect("emulator");
    let api: Api<ConfigMap> = Api::namespaced(client(&emu).await, "ns");
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .expect("create");
    let listed = api.list(&ListParams::default()).await.expect("list");
    let rv = listed.metadata.resource_version.expect("list version");
    api.create(&PostParams::default(), &config_map("b", json!({})))
        .await
        .expect("create b");

    // From the list's version: exactly what changed after it.
    let params = WatchParams::default().timeout(10);
    let mut events = api.watch(&params, &rv).await.expect("watch").boxed();
    match events.next().await {
        Some(Ok(WatchEvent::Added(cm))) => assert_eq!(cm.metadata.name.as_deref(), Some("b")),
        other => panic!("expected b ADDED, got {other:?}"),
    }
    let patch = json!({"data": {"k": "changed"}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    match events.next().await {
        Some(Ok(WatchEvent::Modified(cm))) => {
            assert_eq!(cm.data.expect("data")["k"], "changed")
        }
        other => panic!("expected a MODIFIED, got {other:?}"),
    }
    // Idle: a bookmark carrying the current version.
    let bookmark = tokio::time::timeout(Duration::from_secs(8), events.next())
        .await
        .expect("a bookmark within 8 s");
    match bookmark {
        Some(Ok(WatchEvent::Bookmark(mark))) => {
            assert_eq!(mark.metadata.resource_version, "3")
        }
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    // A version older than the history: 410 Gone, as an ERROR event.
    emu.store.compact();
    let mut stale = api.watch(&params, &rv).await.expect("watch").boxed();
    match stale.next().await {
        Some(Ok(WatchEvent::Error(err))) => assert_eq!(err.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn writes_conflicts_generation_and_selectors() {
    let emu = Emulator::start().await.expect("emulator");
    let client = client(&emu).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let first = maps
        .create(
            &PostParams::default(),
            &config_map("a", json!({"tier": "web", "app": "chat"})),
        )
        .await
        .expect("create");
    maps.create(
        &PostParams::default(),
        &config_map("b", json!({"tier": "db"})),
    )
    .await
    .expect("create b");
    assert_eq!(
        status_code(
            maps.create(&PostParams::default(), &config_map("a", json!({})))
                .await
                .expect_err("exists")
        ),
        409
    );
    // A replace carrying an outdated resourceVersion is refused. (The first
    // one changes something: a replace that changes nothing keeps the
    // version, as on kube-apiserver.)
    let mut changed = first.clone();
    changed.data = Some([("k".to_string(), "w".to_string())].into());
    maps.replace("a", &PostParams::default(), &changed)
        .await
        .expect("current version");
    assert_eq!(
        status_code(
            maps.replace("a", &PostParams::default(), &first)
                .await
                .expect_err("stale")
        ),
        409
    );
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect()
    };
    for (selector, expected) in [
        ("tier in (web,cache)", vec!["a"]),
        ("tier notin (web)", vec!["b"]),
        ("app", vec!["a"]),
        ("!app", vec!["b"]),
        ("tier!=db,app=chat", vec!["a"]),
    ] {
        let found = maps
            .list(&ListParams::default().labels(selector))
            .await
            .expect("list");
        assert_eq!(names(found), expected, "{selector}");
    }

    // Generation moves with the spec only.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "ns");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "d"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "d"}},
                 "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": []}}}
    }))
    .expect("deployment");
    let created = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    let status = json!({"status": {"replicas": 0}});
    let after_status = deployments
        .patch_status("d", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status");
    assert_eq!(after_status.metadata.generation, Some(1));
    let scale = json!({"spec": {"replicas": 0, "minReadySeconds": 5}});
    let after_spec = deployments
        .patch("d", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("spec");
    assert_eq!(after_spec.metadata.generation, Some(2));

    // Deleting the owner collects what it owns.
    let pods: Api<Pod> = Api::namespaced(client, "ns");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "ownerReferences": [{
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "d",
        "uid": after_spec.metadata.uid, "controller": true}]}}))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    deployments
        .delete("d", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(
        status_code(pods.get("p").await.expect_err("collected")),
        404
    );
}

#[tokio::test]
async fn server_side_apply_and_refusals() {
    let emu = Emulator::start().await.expect("emulator");
    let maps: Api<ConfigMap> = Api::namespaced(client(&emu).await, "ns");
    let apply = PatchParams::apply("switchyard-operator").force();
    let full = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                      "data": {"a": "1", "b": "2"}});
    maps.patch("c", &apply, &Patch::Apply(&full))
        .await
        .expect("apply creates");
    let fewer = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                       "data": {"a": "1"}});
    let applied = maps
        .patch("c", &apply, &Patch::Apply(&fewer))
        .await
        .expect("apply");
    let data = applied.data.expect("data");
    assert_eq!(
        data.len(),
        1,
        "the field the manager stopped sending is gone: {data:?}"
    );
    // Applying the same again changes nothing: the resourceVersion stays
    // and no watch event is sent, as kube-apiserver skips a no-op write.
    let version = applied.metadata.resource_version.clone();
    let mut events = maps
        .watch(
            &WatchParams::default().timeout(5),
            version.as_deref().unwrap_or("0"),
        )
        .await
        .expect("watch")
        .boxed();
    let again = maps
        .patch("c", &apply, &Patch::Apply(&fewer))
        .await
        .expect("apply again");
    assert_eq!(
        again.metadata.resource_version, version,
        "a no-op apply bumped the version"
    );
    let unchanged = maps
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"a": "1"}})),
        )
        .await
        .expect("no-op merge");
    assert_eq!(unchanged.metadata.resource_version, version);
    match tokio::time::timeout(Duration::from_millis(1500), events.next()).await {
        Err(_) => {}
        Ok(event) => panic!("a no-op write sent a watch event: {event:?}"),
    }
    // Another manager changing an owned field conflicts unless forced.
    let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                        "data": {"a": "other"}});
    let err = maps
        .patch("c", &PatchParams::apply("kubectl"), &Patch::Apply(&theirs))
        .await
        .expect_err("conflict");
    assert_eq!(status_code(err), 409);

    // What the emulator does not do is refused, not ignored.
    for content_type in [
        "application/json-patch+json",
        "application/strategic-merge-patch+json",
    ] {
        let addr = emu.addr;
        let (status, body) = tokio::task::spawn_blocking(move || {
            switchyard_tests::http_request_with(
                addr,
                "PATCH",
                "/api/v1/namespaces/ns/configmaps/c",
                &[("content-type", content_type)],
                Some(r#"[{"op": "replace", "path": "/data/a", "value": "x"}]"#),
            )
        })
        .await
        .expect("join")
        .expect("patch");
        assert_eq!(status, 415, "{content_type}: {body}");
        assert!(body.contains(content_type), "{body}");
    }
    let err = maps
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .expect_err("field selector");
    assert_eq!(status_code(err), 400);
    let err = maps
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &config_map("d", json!({})),
        )
        .await
        .expect_err("dry run");
    assert_eq!(status_code(err), 400);
}

#[tokio::test]
async fn patches_carrying_a_resource_version_are_preconditions() {
    let emu = Emulator::start().await.expect("emulator");
    let api: Api<ConfigMap> = Api::namespaced(client(&emu).await, "ns");
    let created = api
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .expect("create");
    let seen = created.metadata.resource_version.expect("version");
    let changed = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"k": "moved on"}})),
        )
        .await
        .expect("merge");
    let current = changed.metadata.resource_version.expect("version");
    assert_ne!(seen, current);
    // A writer that acts on what it saw, not on what is there: refused,
    // by merge patch and by server-side apply (forced or not).
    let stale_merge = json!({"metadata": {"resourceVersion": seen}, "data": {"k": "stale"}});
    let err = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&stale_merge))
        .await
        .expect_err("stale merge");
    assert_eq!(status_code(err), 409);
    let stale_apply = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "a", "resourceVersion": seen}, "data": {"k": "stale"}});
    for params in [
        PatchParams::apply("writer"),
        PatchParams::apply("writer").force(),
    ] {
        let err = api
            .patch("a", &params, &Patch::Apply(&stale_apply))
            .await
            .expect_err("stale apply");
        assert_eq!(status_code(err), 409);
    }
    assert_eq!(
        api.get("a").await.expect("get").data.expect("data")["k"],
        "moved on",
        "nothing stale was written"
    );
    // The current version passes, and is nobody's field afterwards.
    let fresh = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "a", "resourceVersion": current}, "data": {"k": "fresh"}});
    let applied = api
        .patch(
            "a",
            &PatchParams::apply("writer").force(),
            &Patch::Apply(&fresh),
        )
        .await
        .expect("fresh apply");
    assert_eq!(applied.data.expect("data")["k"], "fresh");
    let owned = serde_json::to_string(&applied.metadata.managed_fields).expect("json");
    assert!(!owned.contains("resourceVersion"), "{owned}");
}

/// A gateway Deployment (`app=web`) of one pod: listening on its pod IP,
/// Ready by its `/readyz` probe on the named port `http`.
fn web_deployment(replicas: u32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                     "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "gateway", "image": "switchyard/gateway:1",
                         "env": [
                             {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                             {"name": "SWITCHYARD_LISTEN", "value": "$(POD_IP):8080"},
                             {"name": "SWITCHYARD_ADMIN_LISTEN", "value": "$(POD_IP):9090"}],
                         "ports": [{"name": "http", "containerPort": 8080}],
                         "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}}]}}}
    }))
    .expect("deployment")
}

/// GET /readyz through a Service's proxy: the status, or none when the
/// connection was refused or closed (no endpoint, or a dead one).
async fn through(addr: std::net::SocketAddr) -> Option<u16> {
    tokio::task::spawn_blocking(move || {
        switchyard_tests::http_request(addr, "GET", "/readyz", None)
            .ok()
            .map(|(status, _)| status)
    })
    .await
    .expect("request")
}

/// Issue 19: EndpointSlices as the EndpointSlice controller keeps them —
/// one per Service, labelled with its name, owned by it, listing every
/// matched pod with its `ready` condition and the named target port
/// resolved — written only after the propagation delay, and the Service's
/// proxy follows the slice, not the selector: a pod that turned Ready is
/// not routed to until its slice says so, and a selector moved away keeps
/// routing to the old pod until the slice follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_follow_services_late_and_the_proxy_follows_them() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let emu = Emulator::start().await.expect("emulator");
    emu.cluster.set_endpoint_delay(Duration::from_secs(3));
    let client = client(&emu).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "ns");
    let services: Api<Service> = Api::namespaced(client.clone(), "ns");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "ns");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .expect("service");
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .expect("service");
    deployments
        .create(&PostParams::default(), &web_deployment(1))
        .await
        .expect("deployment");
    let by_service = ListParams::default().labels("kubernetes.io/service-name=web");
    let ready_endpoints = |slices: &[EndpointSlice]| -> Vec<String> {
        slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.clone())
            .collect()
    };

    // The pod turns Ready; its slice says so only after the delay.
    let pod = loop {
        let listed = pods.list(&ListParams::default()).await.expect("pods");
        let ready = listed.items.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if let Some(pod) = ready {
            break pod;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pod_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod ip");
    let early = slices.list(&by_service).await.expect("slices");
    assert!(
        ready_endpoints(&early.items).is_empty(),
        "a pod Ready just now is not in its Service's slice yet: {:?}",
        early.items
    );
    let proxy = emu.cluster.service_addr("ns", "web").expect("proxy");
    assert_eq!(
        through(proxy).await,
        None,
        "nothing routed before the slice"
    );
    let slice = loop {
        let listed = slices.list(&by_service).await.expect("slices");
        if ready_endpoints(&listed.items) == vec![pod_ip.clone()] {
            break listed.items.into_iter().next().expect("slice");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(slice.address_type, "IPv4");
    assert!(slice
        .metadata
        .name
        .as_deref()
        .expect("name")
        .starts_with("web-"));
    let owner = &slice.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Service", created.metadata.uid.as_deref().expect("uid"))
    );
    let ports = slice.ports.expect("ports");
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].port),
        (Some("http"), Some(8080))
    );
    let endpoint = &slice.endpoints[0];
    assert_eq!(
        endpoint.target_ref.as_ref().and_then(|r| r.name.clone()),
        pod.metadata.name
    );
    let mut routed = None;
    for _ in 0..20 {
        routed = through(proxy).await;
        if routed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(routed, Some(200), "routed once the slice lists the pod");

    // The selector moves away: the proxy keeps routing to the pod until the
    // slice follows, then routes nowhere.
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"selector": {"app": "other"}}})),
        )
        .await
        .expect("selector");
    assert_eq!(
        through(proxy).await,
        Some(200),
        "the slice has not followed yet"
    );
    loop {
        let listed = slices.list(&by_service).await.expect("slices");
        if listed.items.iter().all(|s| s.endpoints.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(through(proxy).await, None, "the slice is empty");

    // Deleting the Service collects its slice.
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(slices
        .list(&by_service)
        .await
        .expect("slices")
        .items
        .is_empty());
}

/// Issue 19: pods are deleted gracefully — a deleted pod stays listed, with
/// `deletionTimestamp` and its IP, until its process has exited — and the
/// eviction subresource honours PodDisruptionBudgets as `kubectl drain`
/// meets them: with `maxUnavailable: 1` over two Ready pods, the first
/// eviction is granted and the second refused with 429 until the first
/// pod's replacement is Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_are_graceful_and_evictions_honour_disruption_budgets() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use kube::api::EvictParams;

    let emu = Emulator::start().await.expect("emulator");
    let client = client(&emu).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "ns");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client, "ns");
    budgets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"},
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}))
            .expect("pdb"),
        )
        .await
        .expect("pdb");
    deployments
        .create(&PostParams::default(), &web_deployment(2))
        .await
        .expect("deployment");
    let ready = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            && pod.metadata.deletion_timestamp.is_none()
    };
    let ready_pods = || async {
        let listed = pods.list(&ListParams::default()).await.expect("pods");
        listed
            .items
            .into_iter()
            .filter(|p| ready(p))
            .filter_map(|p| p.metadata.name)
            .collect::<Vec<String>>()
    };
    let mut names = ready_pods().await;
    while names.len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        names = ready_pods().await;
    }
    loop {
        let budget = budgets.get("web").await.expect("pdb");
        let status = budget.status.expect("status");
        if status.disruptions_allowed == 1 {
            assert_eq!(
                (
                    status.expected_pods,
                    status.current_healthy,
                    status.desired_healthy
                ),
                (2, 2, 1)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, answer) = emu.evict("ns", &names[0]).expect("evict");
    assert_eq!((code, &answer["status"]), (201, &json!("Success")));
    let (code, answer) = emu.evict("ns", &names[1]).expect("evict");
    assert_eq!((code, &answer["reason"]), (429, &json!("TooManyRequests")));
    assert_eq!(
        answer["message"],
        "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget web needs 1 healthy pods and has 1 currently"
    );
    // The evicted pod is on its way out, still listed with its IP.
    let leaving = pods.get(&names[0]).await.expect("still listed");
    assert!(leaving.metadata.deletion_timestamp.is_some());
    assert!(leaving.status.and_then(|s| s.pod_ip).is_some());
    // Once it has stopped it is gone; its replacement is Ready, and the
    // budget allows one disruption again.
    loop {
        match pods.get(&names[0]).await {
            Err(err) => {
                assert_eq!(status_code(err), 404);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    while ready_pods().await.len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let status = budgets
            .get("web")
            .await
            .expect("pdb")
            .status
            .expect("status");
        if status.disruptions_allowed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // kube's client (like kubectl drain) retries a 429 until it is granted.
    pods.evict(&names[1], &EvictParams::default())
        .await
        .expect("granted again");
    // A pod in no budget's selection, or a delete with no grace, goes now.
    pods.delete(
        &ready_pods().await[0],
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete");
}

/// Issue 19: server-side apply merges associative lists per entry (a
/// container's env by name), each manager owning the entries it applied;
/// an update (merge patch) moves the fields it changes to its manager; a
/// manager's Apply and Update fields are kept apart, as
/// `metadata.managedFields` shows them; and re-applying a field an update
/// took is a conflict unless forced.
#[tokio::test]
async fn server_side_apply_merges_per_entry_and_owns_per_operation() {
    let emu = Emulator::start().await.expect("emulator");
    let deployments: Api<Deployment> = Api::namespaced(client(&emu).await, "ns");
    let applied = |env: serde_json::Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
               "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "d"}},
                        "template": {"metadata": {"labels": {"app": "d"}},
                                     "spec": {"containers": [{"name": "gateway", "image": "gw:1", "env": env}]}}}})
    };
    let apply = |manager: &'static str, body: serde_json::Value, force: bool| {
        let deployments = deployments.clone();
        async move {
            let mut params = PatchParams::apply(manager);
            params.force = force;
            deployments.patch("d", &params, &Patch::Apply(&body)).await
        }
    };
    let env = |d: &Deployment| -> Vec<(String, String)> {
        d.spec
            .as_ref()
            .expect("spec")
            .template
            .spec
            .as_ref()
            .expect("pod")
            .containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    };
    let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
    let managers = |d: &Deployment| -> Vec<(String, String)> {
        d.metadata
            .managed_fields
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                (
                    m.manager.unwrap_or_default(),
                    m.operation.unwrap_or_default(),
                )
            })
            .collect()
    };

    apply("a", applied(json!([{"name": "A1", "value": "1"}])), false)
        .await
        .expect("a applies");
    let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"containers": [{"name": "gateway", "env": [{"name": "B1", "value": "2"}]}]}}}});
    let merged = apply("b", other, false).await.expect("b applies its entry");
    assert_eq!(env(&merged), [pair("A1", "1"), pair("B1", "2")]);
    // a stops sending A1 and sends A2: A1 goes, b's entry stays.
    let merged = apply("a", applied(json!([{"name": "A2", "value": "3"}])), false)
        .await
        .expect("a re-applies");
    assert_eq!(env(&merged), [pair("B1", "2"), pair("A2", "3")]);
    let entries = merged
        .metadata
        .managed_fields
        .clone()
        .expect("managedFields");
    let of_b = entries
        .iter()
        .find(|m| m.manager.as_deref() == Some("b"))
        .expect("b's entry");
    assert_eq!(of_b.operation.as_deref(), Some("Apply"));
    assert_eq!(
        of_b.fields_v1.as_ref().expect("fieldsV1").0,
        json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {r#"k:{"name":"gateway"}"#: {
            ".": {}, "f:name": {},
            "f:env": {r#"k:{"name":"B1"}"#: {".": {}, "f:name": {}, "f:value": {}}}}}}}}})
    );

    // kubectl edit changes A2's value: that field is kubectl-edit's now.
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..PatchParams::default()
    };
    let body = json!({"spec": {"template": {"spec": {"containers": [{"name": "gateway", "image": "gw:1",
        "env": [{"name": "B1", "value": "2"}, {"name": "A2", "value": "9"}]}]}}}});
    let edited = deployments
        .patch("d", &edit, &Patch::Merge(&body))
        .await
        .expect("edit");
    assert!(
        managers(&edited).contains(&pair("kubectl-edit", "Update")),
        "{:?}",
        managers(&edited)
    );
    let (code, message) = api_error(
        apply("a", applied(json!([{"name": "A2", "value": "3"}])), false)
            .await
            .expect_err("a conflicts with the edit"),
    );
    assert_eq!(code, 409);
    assert!(
        message.contains(r#"kubectl-edit (Update): .spec.template.spec.containers.k:{"name":"gateway"}.env.k:{"name":"A2"}.value"#),
        "{message}"
    );
    let forced = apply("a", applied(json!([{"name": "A2", "value": "3"}])), true)
        .await
        .expect("forced");
    assert_eq!(env(&forced), [pair("B1", "2"), pair("A2", "3")]);

    // a's own update is an entry apart from its apply.
    let scale = PatchParams {
        field_manager: Some("a".into()),
        ..PatchParams::default()
    };
    let scaled = deployments
        .patch("d", &scale, &Patch::Merge(json!({"spec": {"replicas": 2}})))
        .await
        .expect("scale");
    let listed = managers(&scaled);
    assert!(
        listed.contains(&pair("a", "Apply")) && listed.contains(&pair("a", "Update")),
        "{listed:?}"
    );

    // An applied configuration carrying managedFields is refused.
    let mut carrying = applied(json!([{"name": "A2", "value": "3"}]));
    carrying["metadata"]["managedFields"] = json!([{"manager": "x", "operation": "Apply"}]);
    let (code, _) = api_error(
        apply("a", carrying, true)
            .await
            .expect_err("managedFields sent"),
    );
    assert_eq!(code, 400);
}
