#!/usr/bin/env python3
"""Writes the Grafana dashboards charts/switchyard/files/dashboards/{gateway,
operator}.json from the panel lists below (python3 scripts/dashboards.py);
tests/packaging/verify.py checks the committed files are what this writes,
and kube_rollout.rs that every query returns data through a rollout.
docs/observability.md explains each panel in one line.

Every gateway query is scoped by the `namespace`, `service` and `color`
variables (the PodMonitor's labels), every operator query by `namespace` and
`service` (the ConnectionService's `namespace` and `name`), so several
ConnectionServices in one Prometheus do not mix. The data source is an
input (`__inputs`), so the JSON imports without the sidecar too."""

import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parents[1] / "charts" / "switchyard" / "files" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
GATEWAY = 'namespace=~"$namespace", service=~"$service", color=~"$color"'
OPERATOR = 'namespace=~"$namespace", name=~"$service"'


def variable(name, label, query):
    return {
        "name": name, "type": "query", "label": label, "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "current": {},
        "refresh": 2, "hide": 0, "sort": 1,
    }


def panel(kind, title, description, targets, unit="short", **extra):
    panel = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }
    for key, value in extra.items():
        if key == "defaults":
            panel["fieldConfig"]["defaults"].update(value)
        else:
            panel[key] = value
    return panel


def up_down(down_text):
    """Value mappings and thresholds for a 0/1 series: red `down_text` at 0."""
    return {
        "mappings": [{"type": "value", "options": {
            "0": {"text": down_text, "color": "red"}, "1": {"text": "up", "color": "green"}}}],
        "thresholds": {"mode": "absolute", "steps": [
            {"color": "red", "value": None}, {"color": "green", "value": 1}]},
        "color": {"mode": "thresholds"},
    }


def gateway_panels():
    g = GATEWAY
    return [
        panel("stat", "Connections now by color",
              "Open connections per color and spec revision (the ConnectionService's, from the pod label), now.",
              [(f"sum by (color, spec_revision) (switchyard_connections{{{g}}})", "{{color}} {{spec_revision}}")],
              options={"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name",
                       "colorMode": "value", "graphMode": "none"}),
        panel("timeseries", "Connections by pod and color",
              "Open connections per gateway pod over time.",
              [(f"sum by (pod, color) (switchyard_connections{{{g}}})", "{{pod}} ({{color}})")]),
        panel("timeseries", "Connects per second",
              "Connections accepted per second per color.",
              [(f"sum by (color) (rate(switchyard_connections_opened_total{{{g}}}[$__rate_interval]))", "{{color}}")],
              unit="cps"),
        panel("timeseries", "Closes per second by code and initiator",
              "Connections ended per second, by close code and by who ended them (client, server, abrupt).",
              [(f"sum by (code, initiator) (rate(switchyard_connections_closed_total{{{g}}}[$__rate_interval]))",
                "{{code}} by {{initiator}}")],
              unit="cps"),
        panel("timeseries", "Handshakes refused by reason",
              "Upgrades refused before a connection existed, per second, by reason (overloaded: admission control shedding a storm).",
              [(f"sum by (reason) (rate(switchyard_handshakes_rejected_total{{{g}}}[$__rate_interval]))", "{{reason}}")],
              unit="cps"),
        panel("timeseries", "Drain done",
              "Share of the connections each draining pod planned to move that are gone (only pods with a drain running).",
              [(f"100 * (1 - sum by (pod) (switchyard_drain_remaining{{{g}}}) / sum by (pod) (switchyard_drain_total{{{g}}} > 0))",
                "{{pod}}")],
              unit="percent", defaults={"min": 0, "max": 100}),
        panel("timeseries", "Drain time left",
              "Seconds until each running drain's deadline closes what is left.",
              [(f"max by (pod) (switchyard_drain_deadline_timestamp_seconds{{{g}}} > 0) - time()", "{{pod}}")],
              unit="s"),
        panel("timeseries", "Drain signals against the cap",
              "migrate frames and closes sent per second by draining pods, and the sum of their caps (max_rate).",
              [(f"sum by (signal) (rate(switchyard_drain_signals_total{{{g}}}[$__rate_interval]))", "sent: {{signal}}"),
               (f"sum(switchyard_drain_max_rate{{{g}}} > 0)", "cap")],
              unit="ops"),
        panel("timeseries", "How drained connections ended",
              "Per second: client = closed by the client after its migrate; slot = closed by the drain at its slot or after the grace; deadline = forced at the deadline; other = ended another way during the drain.",
              [(f"sum by (how) (rate(switchyard_migrations_total{{{g}}}[$__rate_interval]))", "{{how}}")],
              unit="cps"),
        panel("timeseries", "Messages in / out per second",
              "Data frames received from clients and written to them, per second.",
              [(f"sum(rate(switchyard_messages_received_total{{{g}}}[$__rate_interval]))", "in"),
               (f"sum(rate(switchyard_messages_sent_total{{{g}}}[$__rate_interval]))", "out")],
              unit="cps"),
        panel("timeseries", "Fan-out latency by color",
              "Publish accepted to frame written, p50 and p99, per color.",
              [(f"histogram_quantile(0.5, sum by (le, color) (rate(switchyard_fanout_latency_seconds_bucket{{{g}}}[$__rate_interval])))",
                "p50 {{color}}"),
               (f"histogram_quantile(0.99, sum by (le, color) (rate(switchyard_fanout_latency_seconds_bucket{{{g}}}[$__rate_interval])))",
                "p99 {{color}}")],
              unit="s"),
        panel("timeseries", "Closed with 4002 by reason",
              "Connections the server closed with 4002 per second: a slow consumer (queue_full), a subscribe's or the backplane's recovery that overflowed, or a client publishing over its rate (publish_rate).",
              [(f"sum by (reason) (rate(switchyard_slow_consumers_total{{{g}}}[$__rate_interval]))", "{{reason}}")],
              unit="cps"),
        panel("timeseries", "Resume outcomes",
              "Subscribes with `since` per second: recovered (nothing missed) or not (the client resynchronises).",
              [(f"sum by (recovered) (rate(switchyard_resume_total{{{g}}}[$__rate_interval]))", "recovered={{recovered}}")],
              unit="cps"),
        panel("state-timeline", "Backplane",
              "Each pod's Redis backplane: up, or DOWN (publishes refused, no resume across pods).",
              [(f"min by (pod) (switchyard_backplane_up{{{g}}})", "{{pod}}")],
              defaults=up_down("DOWN")),
        panel("timeseries", "Backplane publish latency",
              "One publish round trip to Redis, p99.",
              [(f"histogram_quantile(0.99, sum by (le) (rate(switchyard_backplane_publish_seconds_bucket{{{g}}}[$__rate_interval])))",
                "publish p99")],
              unit="s"),
        panel("timeseries", "Failed publishes and backplane reconnects",
              "Per second: publishes the broker did not take, by reason (unavailable: Redis unreachable, not published; outcome_unknown: sent, no answer), and reconnects to Redis.",
              [(f"sum by (reason) (rate(switchyard_publishes_failed_total{{{g}}}[$__rate_interval]))", "failed: {{reason}}"),
               (f"sum(rate(switchyard_backplane_reconnects_total{{{g}}}[$__rate_interval]))", "reconnects")],
              unit="cps"),
        panel("timeseries", "Refused: auth, protocol, admin",
              "Per second: topic authorization denials, protocol violations, admin requests without the token.",
              [(f"sum by (action) (rate(switchyard_authorization_denied_total{{{g}}}[$__rate_interval]))", "denied {{action}}"),
               (f"sum by (kind) (rate(switchyard_protocol_violations_total{{{g}}}[$__rate_interval]))", "violation {{kind}}"),
               (f"sum(rate(switchyard_admin_unauthorized_total{{{g}}}[$__rate_interval]))", "admin 401")],
              unit="cps"),
        panel("timeseries", "Memory by pod",
              "Each gateway process's resident memory.",
              [(f"sum by (pod) (process_resident_memory_bytes{{{g}}})", "{{pod}}")],
              unit="bytes"),
        panel("timeseries", "Open files by pod",
              "Each gateway process's open file descriptors (a connection is one) against its limit.",
              [(f"sum by (pod) (process_open_fds{{{g}}})", "{{pod}}"),
               (f"max(process_max_fds{{{g}}})", "limit")]),
        panel("table", "Versions",
              "What each gateway pod runs: spec revision, and version and build revision (switchyard_build_info).",
              [(f"max by (pod, color, spec_revision, version, revision) (switchyard_build_info{{{g}}})", "{{pod}}")],
              options={"showHeader": True}),
    ]


def operator_panels():
    o = OPERATOR
    return [
        panel("state-timeline", "Rollout phase",
              "The phase of each ConnectionService over time.",
              [(f"max by (namespace, name, phase) (switchyard_operator_rollout_phase{{{o}}}) > 0",
                "{{namespace}}/{{name}} {{phase}}")]),
        panel("timeseries", "Connections per color (as the operator sees them)",
              "Open connections per ConnectionService and color, from the gateways' admin status.",
              [(f"sum by (namespace, name, color) (switchyard_operator_connections{{{o}}})",
                "{{namespace}}/{{name}} {{color}}")]),
        panel("timeseries", "Rollout duration (p50 over the last 6 h)",
              "Median rollout duration by outcome, over the rollouts that ended in the last 6 hours.",
              [("histogram_quantile(0.5, sum by (le, outcome) (increase(switchyard_operator_rollout_duration_seconds_bucket[6h])))"
                " and sum by (outcome) (increase(switchyard_operator_rollout_duration_seconds_count[6h])) > 0",
                "{{outcome}}")],
              unit="s"),
        panel("timeseries", "Reconcile errors per second",
              "Failed reconciles per second, by error kind.",
              [("sum by (error) (rate(switchyard_operator_reconcile_errors_total[$__rate_interval]))", "{{error}}")],
              unit="ops"),
        panel("timeseries", "Reconcile latency",
              "Time one reconcile takes (API and gateway calls included), p50 and p99.",
              [("histogram_quantile(0.5, sum by (le) (rate(switchyard_operator_reconcile_duration_seconds_bucket[$__rate_interval])))", "p50"),
               ("histogram_quantile(0.99, sum by (le) (rate(switchyard_operator_reconcile_duration_seconds_bucket[$__rate_interval])))", "p99")],
              unit="s"),
        panel("timeseries", "Gateway admin calls per second",
              "Calls to the gateways' admin API by call and result.",
              [("sum by (call, result) (rate(switchyard_operator_gateway_calls_total[$__rate_interval]))", "{{call}} {{result}}")],
              unit="ops"),
        panel("stat", "Leaders",
              "Operator replicas holding the leader Lease: 1 is right (green); 0 reconciles nothing, 2 fight (red).",
              [("sum(switchyard_operator_leader) or vector(0)", "leaders")],
              defaults={"thresholds": {"mode": "absolute", "steps": [
                  {"color": "red", "value": None}, {"color": "green", "value": 1}, {"color": "red", "value": 2}]},
                  "color": {"mode": "thresholds"}},
              options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background", "graphMode": "none"}),
        panel("timeseries", "Operator memory",
              "Each operator replica's resident memory (the processes whose build_info says operator).",
              [('process_resident_memory_bytes and on (job, instance) switchyard_build_info{component="operator"}',
                "{{instance}}")],
              unit="bytes"),
        panel("table", "Operator versions",
              "What each operator replica runs (switchyard_build_info).",
              [('max by (instance, version, revision) (switchyard_build_info{component="operator"})', "{{instance}}")],
              options={"showHeader": True}),
    ]


def dashboard(uid, title, tags, variables, panels, other):
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8}
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "uid": uid, "title": title, "tags": tags, "timezone": "browser",
        "schemaVersion": 39, "version": 2, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        # Shared crosshair: a moment in one panel is marked in all of them.
        "graphTooltip": 1,
        "links": [{"type": "dashboards", "title": other, "tags": ["switchyard"], "asDropdown": False,
                   "includeVars": True, "keepTime": True}],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {}, "hide": 0, "refresh": 1},
            *variables,
        ]},
        "panels": panels,
        "annotations": {"list": []},
    }


def boards():
    namespace = variable("namespace", "Namespace", "label_values(switchyard_connections, namespace)")
    service = variable("service", "Service", 'label_values(switchyard_connections{namespace=~"$namespace"}, service)')
    color = variable("color", "Color", 'label_values(switchyard_connections{namespace=~"$namespace", service=~"$service"}, color)')
    op_namespace = variable("namespace", "Namespace", "label_values(switchyard_operator_rollout_phase, namespace)")
    op_service = variable("service", "ConnectionService",
                          'label_values(switchyard_operator_rollout_phase{namespace=~"$namespace"}, name)')
    return {
        "gateway.json": dashboard("switchyard-gateway", "Switchyard gateways", ["switchyard"],
                                  [namespace, service, color], gateway_panels(), "Switchyard operator"),
        "operator.json": dashboard("switchyard-operator", "Switchyard operator", ["switchyard"],
                                   [op_namespace, op_service], operator_panels(), "Switchyard gateways"),
    }


def rendered():
    return {name: json.dumps(board, indent=2, ensure_ascii=False) + "\n" for name, board in boards().items()}


if __name__ == "__main__":
    for name, text in rendered().items():
        (OUT / name).write_text(text)
    sys.exit(0)
