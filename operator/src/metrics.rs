//! The operator's own Prometheus metrics, named `switchyard_operator_*`.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::crd::{ColorConnections, Phase};
use crate::rollout::Outcome;

/// Every metric the operator exports. Cheap to clone (shared registry).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_errors: IntCounterVec,
    reconcile_duration: Histogram,
    rollout_phase: IntGaugeVec,
    rollout_duration: HistogramVec,
    connections: IntGaugeVec,
    gateway_calls: IntCounterVec,
    leader: IntGauge,
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "switchyard_operator_reconciles_total",
                "Reconciles run, by result (ok, error).",
            ),
            &["result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_operator_reconcile_errors_total",
                "Failed reconciles, by error kind.",
            ),
            &["error"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_operator_reconcile_duration_seconds",
                "Time one reconcile takes (API calls and gateway calls included).",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let rollout_phase = IntGaugeVec::new(
            Opts::new(
                "switchyard_operator_rollout_phase",
                "1 for the phase each ConnectionService is in, 0 for the others.",
            ),
            &["namespace", "name", "phase"],
        )?;
        let rollout_duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_operator_rollout_duration_seconds",
                "From rollout start to its end, by outcome (completed, failed, aborted).",
            )
            .buckets(vec![
                5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
            ]),
            &["outcome"],
        )?;
        let connections = IntGaugeVec::new(
            Opts::new(
                "switchyard_operator_connections",
                "Open connections per color, as the gateways last reported them.",
            ),
            &["namespace", "name", "color"],
        )?;
        let gateway_calls = IntCounterVec::new(
            Opts::new(
                "switchyard_operator_gateway_calls_total",
                "Calls to gateways' admin API, by call (status, drain, cancel_drain) and result.",
            ),
            &["call", "result"],
        )?;
        let leader = IntGauge::new(
            "switchyard_operator_leader",
            "1 while this replica holds the leader Lease.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(rollout_phase.clone()))?;
        registry.register(Box::new(rollout_duration.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(gateway_calls.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        switchyard_telemetry::process::register(&registry, "operator")?;
        // Known label values start at zero, so dashboards see a rate of 0
        // before the first error rather than no data.
        for result in ["ok", "error"] {
            reconciles.with_label_values(&[result]);
        }
        for kind in ["kube", "invalid_spec", "missing_token"] {
            reconcile_errors.with_label_values(&[kind]);
        }
        for outcome in ["completed", "failed", "aborted"] {
            rollout_duration.with_label_values(&[outcome]);
        }
        Ok(Metrics {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_errors,
                reconcile_duration,
                rollout_phase,
                rollout_duration,
                connections,
                gateway_calls,
                leader,
            }),
        })
    }

    /// A reconcile ended.
    pub fn reconcile_finished(&self, took: Duration, ok: bool) {
        let inner = &self.inner;
        inner
            .reconciles
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        inner.reconcile_duration.observe(took.as_secs_f64());
    }

    /// A reconcile failed with an error of this kind.
    pub fn reconcile_failed(&self, kind: &str) {
        self.inner.reconcile_errors.with_label_values(&[kind]).inc();
    }

    /// The phase and connection counts of one resource.
    pub fn set_phase(
        &self,
        namespace: &str,
        name: &str,
        current: Phase,
        connections: &ColorConnections,
    ) {
        for phase in Phase::ALL {
            self.inner
                .rollout_phase
                .with_label_values(&[namespace, name, phase.as_str()])
                .set(i64::from(phase == current));
        }
        for (color, count) in [("blue", connections.blue), ("green", connections.green)] {
            self.inner
                .connections
                .with_label_values(&[namespace, name, color])
                .set(count as i64);
        }
    }

    /// Removes the per-resource series (phase, connections) of a
    /// ConnectionService that was deleted.
    pub fn forget(&self, namespace: &str, name: &str) {
        let inner = &self.inner;
        for phase in Phase::ALL {
            let _ = inner
                .rollout_phase
                .remove_label_values(&[namespace, name, phase.as_str()]);
        }
        for color in ["blue", "green"] {
            let _ = inner
                .connections
                .remove_label_values(&[namespace, name, color]);
        }
    }

    /// A rollout ended.
    pub fn rollout_finished(&self, outcome: Outcome, took: Duration) {
        self.inner
            .rollout_duration
            .with_label_values(&[outcome.as_str()])
            .observe(took.as_secs_f64());
    }

    /// A call to a gateway's admin API returned.
    pub fn gateway_call(&self, call: &str, ok: bool) {
        self.inner
            .gateway_calls
            .with_label_values(&[call, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.inner.leader.set(i64::from(leading));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 27: a deleted ConnectionService's series go; another
    /// namespace's resource of the same name keeps its own.
    #[test]
    fn series_of_deleted_resources_are_removed() {
        let metrics = Metrics::new().expect("metrics");
        let counts = ColorConnections { blue: 3, green: 0 };
        metrics.set_phase("prod", "chat", Phase::Stable, &counts);
        metrics.set_phase("staging", "chat", Phase::Draining, &counts);
        let series = |text: &str, namespace: &str| {
            text.lines()
                .filter(|l| l.starts_with("switchyard_operator_"))
                .filter(|l| l.contains(&format!(r#"namespace="{namespace}""#)))
                .count()
        };
        let before = metrics.render();
        assert_eq!(series(&before, "prod"), Phase::ALL.len() + 2);
        metrics.forget("prod", "chat");
        let after = metrics.render();
        assert_eq!(series(&after, "prod"), 0, "{after}");
        assert_eq!(series(&after, "staging"), Phase::ALL.len() + 2);
        assert!(after.contains(
            r#"switchyard_operator_rollout_phase{name="chat",namespace="staging",phase="Draining"} 1"#
        ));
    }

    #[test]
    fn renders_every_family_with_the_values_set() {
        let metrics = Metrics::new().expect("metrics");
        metrics.reconcile_finished(Duration::from_millis(20), true);
        metrics.reconcile_failed("kube");
        metrics.set_phase(
            "prod",
            "chat",
            Phase::Draining,
            &ColorConnections { blue: 7, green: 3 },
        );
        metrics.rollout_finished(Outcome::Completed, Duration::from_secs(42));
        metrics.gateway_call("drain", false);
        metrics.set_leader(true);
        let text = metrics.render();
        for line in [
            "switchyard_operator_reconciles_total{result=\"ok\"} 1",
            "switchyard_operator_reconcile_errors_total{error=\"kube\"} 1",
            "switchyard_operator_reconcile_duration_seconds_count 1",
            "switchyard_operator_rollout_phase{name=\"chat\",namespace=\"prod\",phase=\"Draining\"} 1",
            "switchyard_operator_rollout_phase{name=\"chat\",namespace=\"prod\",phase=\"Stable\"} 0",
            "switchyard_operator_rollout_duration_seconds_sum{outcome=\"completed\"} 42",
            "switchyard_operator_connections{color=\"blue\",name=\"chat\",namespace=\"prod\"} 7",
            "switchyard_operator_gateway_calls_total{call=\"drain\",result=\"error\"} 1",
            "switchyard_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
