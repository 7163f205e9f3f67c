"""Packaging checks, run by ./scripts/test: the Helm chart renders and lints
(strict) with default values and with every option on; every rendered
manifest and the kustomize base validate against the Kubernetes schemas
(kubernetes-validate --strict); the example ConnectionServices validate
against the generated CRD's schema (and broken ones do not); the chart's RBAC
equals k8s/base's (which operator/tests/requests.rs checks against the
operator's requests); the dashboards ship as labelled ConfigMaps.

`verify.py --cluster KUBECONFIG --monitors present|absent` renders the
chart with every option as `helm install --dry-run=server` does against that
cluster (`.Capabilities` from its discovery: tests/tests/kube_kubectl.rs
runs it against the emulator, with and without the Prometheus Operator's
CRDs), checks the PodMonitor and ServiceMonitor are rendered exactly when
the cluster serves their API, and evaluates every pod selector in it.
`verify.py --render VALUES` prints the chart's objects for those values
(JSON) as JSON; `verify.py --render-on KUBECONFIG VALUES` prints them as
rendered against that cluster."""

import copy
import json
import os
import re
import pathlib
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "switchyard"
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="sy", namespace="switchyard")
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            check("kubectl get csvc" in text, f"{path}: NOTES.txt lost its instructions")
            continue
        docs.extend((path, d) for d in yaml.safe_load_all(text) if d)
    return docs


def render_on_cluster(kubeconfig, values):
    """What `helm install --dry-run=server` renders against the cluster in
    `kubeconfig` (nothing is created)."""
    with helm.Chart.load(str(CHART)) as chart, \
            helm.Config(kubeconfig_path=kubeconfig, namespace="switchyard") as config:
        release = config.install(chart, "sy", values, namespace="switchyard", dry_run="server")
    manifest = release["manifest"] if isinstance(release, dict) else release.manifest
    return [("", d) for d in yaml.safe_load_all(manifest) if d]


def all_values():
    return yaml.safe_load((ROOT / "tests" / "packaging" / "values-all.yaml").read_text())


def examples():
    return [d for p in sorted((ROOT / "k8s" / "examples").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def kubernetes_validate(name, docs):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
    result = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "kubernetes-validate"), "--strict", f.name],
        capture_output=True, text=True)
    output = result.stdout + result.stderr
    errors = [l for l in output.splitlines() if l.startswith("ERROR")]
    check(result.returncode == 0 and not errors, f"kubernetes-validate {name}:\n{output}")
    return output


def nullable_to_types(schema):
    """OpenAPI `nullable: true` → JSON Schema type lists (recursively)."""
    if isinstance(schema, dict):
        schema = {k: nullable_to_types(v) for k, v in schema.items()}
        if schema.pop("nullable", False) and "type" in schema:
            schema["type"] = [schema["type"], "null"]
        return schema
    if isinstance(schema, list):
        return [nullable_to_types(v) for v in schema]
    return schema


def crd_validator():
    crd = yaml.safe_load((ROOT / "k8s" / "base" / "crd.yaml").read_text())
    schema = nullable_to_types(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_security_restricted(spec):
    """What of Pod Security `restricted` (kubernetes.io/docs/concepts/security/
    pod-security-standards) a pod spec breaks. The emulator applies the same
    rules to the pods it starts (tests/src/kube/podsecurity.rs); this checks
    the chart's own pod templates, which the emulator never runs."""
    out = []
    pod = spec.get("securityContext") or {}
    containers = [c for f in ("initContainers", "containers", "ephemeralContainers")
                  for c in spec.get(f) or []]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field}=true")
    for volume in spec.get("volumes") or []:
        kinds = [k for k in volume if k != "name"]
        if not kinds or kinds[0] not in RESTRICTED_VOLUMES:
            out.append(f"volume {volume.get('name')} of type {kinds}")
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined" or pod.get("runAsUser") == 0:
        out.append("pod seccompProfile Unconfined or runAsUser 0")
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("privileged") or any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: privileged or hostPort")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation != false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True or sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsNonRoot != true")
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
    return out


def pod_specs(doc):
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Pod":
        return [spec]
    if doc.get("kind") == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    template = spec.get("template")
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def selects(selector, labels):
    """Whether a LabelSelector (matchLabels, matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) \
                or (op == "NotIn" and key in labels and labels[key] in values) \
                or (op == "Exists" and key not in labels) \
                or (op == "DoesNotExist" and key in labels):
            return False
    return True


def operator_render(resource):
    """What the operator applies for `resource` (`switchyard-operator render`;
    the binary in OPERATOR_BIN when a test that built it says so)."""
    binary = os.environ.get("OPERATOR_BIN")
    command = [binary] if binary else [
        "cargo", "run", "-q", "-p", "switchyard-operator", "--bin", "switchyard-operator", "--"]
    out = subprocess.run(
        command + ["render", "-f", "-"],
        input=yaml.safe_dump(resource), capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def template_labels(doc):
    return dict((doc["spec"]["template"].get("metadata") or {}).get("labels") or {})


def check_selectors(chart_docs, resources, job, monitors_expected):
    """Every pod selector the chart ships, evaluated against the labels of
    the pods the operator's Deployments create (plus the ReplicaSet's
    pod-template-hash), the chart's operator pod and the example publisher
    Job's pod. The monitors are there only where the cluster serves their
    API (`monitors_expected`)."""
    gateway_pods = []
    for resource in resources:
        rendered = operator_render(resource)
        deployments = [d for d in rendered if d["kind"] == "Deployment"]
        check(len(deployments) == 2, f"render gave {len(deployments)} Deployments")
        pods = [dict(template_labels(d), **{"pod-template-hash": "5d8f7c9b6"}) for d in deployments]
        for pdb in (d for d in rendered if d["kind"] == "PodDisruptionBudget"):
            for labels in pods:
                check(selects(pdb["spec"]["selector"], labels), f"the PDB misses pod {labels}")
        for service in (d for d in rendered if d["kind"] == "Service"):
            check(selects({"matchLabels": service["spec"]["selector"]}, pods[0]),
                  f"Service {service['metadata']['name']} misses the blue pod")
        gateway_pods += pods
    operator = [d for d in chart_docs if d["kind"] == "Deployment"]
    check(len(operator) == 1, "one operator Deployment in the chart")
    operator_pod = template_labels(operator[0])
    for policy in (d for d in chart_docs if d["kind"] == "NetworkPolicy"):
        for labels in gateway_pods:
            check(selects(policy["spec"]["podSelector"], labels),
                  f"NetworkPolicy {policy['metadata']['namespace']} misses gateway pod {labels}")
        check(not selects(policy["spec"]["podSelector"], operator_pod),
              "the gateways' NetworkPolicy selects the operator's pod")
        admin_peers = [peer for rule in policy["spec"]["ingress"]
                       if any(p.get("port") == 9090 for p in rule.get("ports") or [])
                       for peer in rule.get("from") or []]
        check(any(selects(p.get("podSelector"), operator_pod) for p in admin_peers),
              "the admin port is closed to the operator")
        check(any(selects(p.get("podSelector"), job) and "namespaceSelector" not in p
                  for p in admin_peers),
              "the admin port is closed to the example publisher Job")
        check(not any(selects(p.get("podSelector"), {"app": "anything"}) for p in admin_peers),
              "the admin port is open to any pod")
    monitors = [d for d in chart_docs if d["kind"] == "PodMonitor"]
    check(len(monitors) == int(monitors_expected),
          f"{len(monitors)} PodMonitors where the Prometheus Operator's API is "
          f"{'served' if monitors_expected else 'not served'}")
    service_monitors = [d for d in chart_docs if d["kind"] == "ServiceMonitor"]
    check(len(service_monitors) == int(monitors_expected),
          f"{len(service_monitors)} ServiceMonitors where the Prometheus Operator's API is "
          f"{'served' if monitors_expected else 'not served'}")
    for monitor in monitors:
        for labels in gateway_pods:
            check(selects(monitor["spec"]["selector"], labels), f"the PodMonitor misses pod {labels}")
        check(not selects(monitor["spec"]["selector"], operator_pod), "the PodMonitor scrapes the operator")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for relabel in endpoint.get("relabelings") or []:
                for source in relabel.get("sourceLabels") or []:
                    if source.startswith("__meta_kubernetes_pod_label_"):
                        wanted = source[len("__meta_kubernetes_pod_label_"):]
                        present = {re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in gateway_pods[0]}
                        check(wanted in present, f"the PodMonitor relabels from {source}, a label no gateway pod has")
    services = [d for d in chart_docs if d["kind"] == "Service"]
    for monitor in service_monitors:
        check(all(e.get("honorLabels") is True for e in monitor["spec"]["endpoints"]),
              "the ServiceMonitor lets the target's namespace replace the ConnectionService's")
        matched = [s for s in services if selects(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
        check(len(matched) == 1, f"the ServiceMonitor selects {len(matched)} Services")
        for service in matched:
            check(selects({"matchLabels": service["spec"]["selector"]}, operator_pod),
                  "the operator's metrics Service misses the operator pod")


ALERTS = CHART / "files" / "alerts.yaml"


def check_alerts():
    """The alert rules pass `promtool check rules` and their unit tests
    (tests/packaging/alerts.test.yaml), with Debian's promtool."""
    for args in (["check", "rules", str(ALERTS)],
                 ["test", "rules", str(ROOT / "tests" / "packaging" / "alerts.test.yaml")]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True)
        check(done.returncode == 0, f"promtool {' '.join(args[:2])}: {done.stdout}{done.stderr}")


def check_prometheus_rule(chart_docs, expected):
    """The PrometheusRule is there exactly where the cluster serves its API,
    and carries the groups of files/alerts.yaml as they are."""
    found = [d for d in chart_docs if d["kind"] == "PrometheusRule"]
    check(len(found) == int(expected),
          f"{len(found)} PrometheusRules where the Prometheus Operator's API is "
          f"{'served' if expected else 'not served'}")
    for rule in found:
        check(rule["spec"] == yaml.safe_load(ALERTS.read_text()),
              "the PrometheusRule's groups differ from files/alerts.yaml")
        check(rule["metadata"]["labels"].get("release") == "prometheus",
              "prometheusRule.labels are not on the PrometheusRule")


def rules(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    check(len(found) == 1, f"expected one {kind}, found {len(found)}")
    return sorted(json.dumps(r, sort_keys=True) for r in found[0]["rules"]) if found else []


def cluster_main(kubeconfig, monitors):
    """The every-option chart as rendered against a cluster: the monitors
    exactly when it serves their API, and every selector right."""
    docs = [d for _, d in render_on_cluster(kubeconfig, all_values())]
    resources = [d for d in examples() + docs if d["kind"] == "ConnectionService"]
    jobs = [d for d in examples() if d["kind"] == "Job"]
    check_selectors(docs, resources, template_labels(jobs[0]), monitors == "present")
    check_prometheus_rule(docs, monitors == "present")
    if failures:
        print(f"{len(failures)} packaging check(s) failed")
        sys.exit(1)
    print(f"packaging on a cluster: monitors {monitors}, selectors against the operator's pods: ok")


def main():
    default_docs = render({})
    all_docs = render(all_values())
    kinds_all = {d["kind"] for _, d in all_docs}
    for kind in ["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                 "RoleBinding", "Service", "NetworkPolicy", "ConfigMap", "ConnectionService"]:
        check(kind in kinds_all, f"all-on values did not render a {kind}")
    # Offline, `.Capabilities` has no monitoring.coreos.com: the monitors
    # are left out even when enabled (`--cluster` checks them rendered).
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"]:
        check(kind not in kinds_all, f"{kind} rendered without the Prometheus Operator's API")
    check_alerts()
    check(sum(1 for _, d in all_docs if d["kind"] == "NetworkPolicy") == 2,
          "one NetworkPolicy per listed namespace")
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "ConnectionService"]:
        check(kind not in {d["kind"] for _, d in default_docs}, f"{kind} rendered by default")

    lint = helm.lint(str(CHART), strict=True)
    check(not lint["errors"], f"helm lint errors: {lint['errors']}")
    serious = [m for m in lint["messages"] if m["severity"] >= 2]
    check(not serious, f"helm lint warnings: {serious}")
    # As a subchart, the chart gets its parent's `global` values: the
    # schema must take them (it refused them before: additionalProperties).
    render({"global": {"imageRegistry": "registry.example.com"}})
    # A values file that breaks the schema must be refused.
    try:
        render({"operator": {"replicas": "many"}})
        check(False, "values.schema.json accepted operator.replicas: many")
    except helm.HelmError:
        pass

    kubernetes_validate("chart (default values)", [d for _, d in default_docs])
    kubernetes_validate("chart (every option)", [d for _, d in all_docs])
    kustomized = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "base")],
                                capture_output=True, text=True, check=True).stdout
    base_docs = [d for d in yaml.safe_load_all(kustomized) if d]
    kubernetes_validate("kubectl kustomize k8s/base", base_docs)
    examples_docs = examples()
    kubernetes_validate("k8s/examples", examples_docs)

    validator = crd_validator()
    resources = [d for d in examples_docs if d["kind"] == "ConnectionService"]
    resources += [d for _, d in all_docs if d["kind"] == "ConnectionService"]
    check(len(resources) == 2, "the example and the chart's ConnectionService")
    for resource in resources:
        errors = [e.message for e in validator.iter_errors(resource)]
        check(not errors, f"ConnectionService {resource['metadata']['name']}: {errors}")
    broken = copy.deepcopy(resources[0])
    broken["spec"]["replicas"] = -1
    broken["spec"]["rollout"]["drain"]["mode"] = "teleport"
    del broken["spec"]["image"]
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    for expected in ["-1", "teleport", "'image' is a required property"]:
        check(expected in messages, f"the CRD schema did not refuse {expected}: {messages}")

    # Every pod the chart and the kustomize base run meets Pod Security
    # `restricted`, and the check refuses what it should.
    shipped = [d for _, d in default_docs] + [d for _, d in all_docs] + base_docs + examples_docs
    templates = [(d["kind"], d["metadata"]["name"], spec) for d in shipped for spec in pod_specs(d)]
    check(len(templates) >= 3, f"pod templates found: {[(k, n) for k, n, _ in templates]}")
    for kind, name, spec in templates:
        broken = pod_security_restricted(spec)
        check(not broken, f"{kind} {name} breaks Pod Security restricted: {broken}")
    loose = copy.deepcopy(templates[0][2])
    loose.pop("securityContext", None)
    loose["containers"][0].pop("securityContext", None)
    check(len(pod_security_restricted(loose)) >= 3, "the restricted check refuses a loose pod")

    jobs = [d for d in examples_docs if d["kind"] == "Job"]
    check(len(jobs) == 1, "the example publisher Job")
    check_selectors([d for _, d in all_docs], resources, template_labels(jobs[0]), False)

    check(rules([d for _, d in default_docs], "ClusterRole") == rules(base_docs, "ClusterRole"),
          "the chart's ClusterRole differs from k8s/base/rbac.yaml")
    check(rules([d for _, d in default_docs], "Role") == rules(base_docs, "Role"),
          "the chart's leader-election Role differs from k8s/base/rbac.yaml")

    sys.path.insert(0, str(ROOT / "scripts"))
    import dashboards as generator
    for name, text in generator.rendered().items():
        check((CHART / "files" / "dashboards" / name).read_text() == text,
              f"dashboards/{name} is stale: run python3 scripts/dashboards.py")
    dashboards = [d for _, d in default_docs
                  if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    check(len(dashboards) == 2, f"two dashboard ConfigMaps, found {len(dashboards)}")
    for config_map in dashboards:
        for key, text in config_map["data"].items():
            board = json.loads(text)
            check(board["panels"], f"{key}: no panels")

    if failures:
        print(f"{len(failures)} packaging check(s) failed")
        sys.exit(1)
    print("packaging: chart (default + every option), kustomize base, examples, CRD schema, RBAC, "
          "Pod Security restricted, selectors against the operator's pods, dashboards: ok")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--cluster" and sys.argv[3] == "--monitors":
        cluster_main(sys.argv[2], sys.argv[4])
    elif len(sys.argv) == 3 and sys.argv[1] == "--render":
        # The chart's objects for these values (JSON), as JSON: what a test
        # creates in the emulator.
        print(json.dumps([d for _, d in render(json.loads(sys.argv[2]))]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--render-on":
        # The same as `helm install --dry-run=server` renders them against
        # the cluster in KUBECONFIG (its `.Capabilities`: the monitors).
        print(json.dumps([d for _, d in render_on_cluster(sys.argv[2], json.loads(sys.argv[3]))]))
    elif len(sys.argv) == 1:
        main()
    else:
        sys.exit("usage: verify.py [--cluster KUBECONFIG --monitors present|absent | --render VALUES"
                 " | --render-on KUBECONFIG VALUES]")
