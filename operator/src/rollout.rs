//! The blue-green rollout as a pure function: what the cluster looks like now
//! (`Observed`) → what to do next (`Plan`: steps, the new status, when to look
//! again).
//!
//! Nothing here does I/O or keeps memory between calls: the previous status
//! and the observed objects are the whole state, which is why the operator
//! picks up a rollout where it was after its own restart. The reconciler
//! gathers an `Observed`, applies the `Plan`'s steps in order and writes the
//! status last, so a crash between the two repeats idempotent steps.
//!
//! ```text
//! Stable ──spec changed──▶ Progressing (new color scaled up, waiting Ready)
//! Progressing ──ready (and promoted)──▶ Switching (Service → new color)
//! Switching ──new color Ready, Service observed on it──▶ Draining (drain every old pod)
//! Draining ──old connections 0 or deadline, + scaleDownDelay──▶ Stable (old scaled to 0)
//! Progressing ──unready for the ready timeout──▶ Failed (new color scaled to 0, old untouched)
//! Progressing ──abort or revert──▶ Stable on the old color
//! Switching/Draining ──abort, revert, or new color unready too long──▶ undo
//!     (old color back and Ready, then the Service, then new color to 0) ──▶ Stable
//! ```
//!
//! An intent (abort, promote) is never cleared by the plan that acts on it,
//! and every phase looks at where the Service points: the explorer in
//! `rollout/explore.rs` checks this against crashes between any two steps.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use switchyard_protocol::drain::DrainRequest;

use crate::crd::{
    AbortReason, Color, ColorConnections, ConnectionServiceStatus, Phase, RolloutPolicy,
    RolloutProgress, ABORT_ANNOTATION, PROMOTE_ANNOTATION,
};

/// How often a running drain's connection counts are polled.
pub const DRAIN_POLL: Duration = Duration::from_secs(1);
/// How often readiness is re-checked while Progressing (Deployment changes
/// also trigger a reconcile; this bounds the wait if a watch event is missed).
pub const PROGRESS_POLL: Duration = Duration::from_secs(2);
/// How often the Service's EndpointSlices are looked at while waiting for
/// them to follow a switch.
pub const TRAFFIC_POLL: Duration = Duration::from_millis(500);
/// How often a Stable resource refreshes its connection counts.
pub const STABLE_POLL: Duration = Duration::from_secs(30);

/// What a gateway said about itself on `/admin/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayReport {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Whether it is draining (told to by the operator or by SIGTERM).
    pub draining: bool,
}

/// One pod of a color.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// Pod IP, once assigned.
    pub ip: Option<String>,
    /// Its gateway's report; `None` when it could not be asked.
    pub report: Option<GatewayReport>,
    /// Why its container is not running, as the kubelet says
    /// (`ErrImagePull: …`, `CrashLoopBackOff: …`): told when a rollout
    /// fails for want of readiness.
    pub waiting: Option<String>,
    /// Its container's restart count.
    pub restarts: i32,
    /// How the container last ended (`Error, exit code 137`), once it has.
    pub last_exit: Option<String>,
}

/// A pod the operator talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    /// Pod name (for logs and events).
    pub name: String,
    /// Pod IP (the admin API is on this address).
    pub ip: String,
}

/// One color's Deployment as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentView {
    /// The revision label of its pod template.
    pub revision: String,
    /// `spec.replicas`.
    pub replicas: i32,
    /// At least one replica asked for, and every replica updated to the
    /// template and Ready (the Deployment controller has seen the latest
    /// generation); judged in one place, where the Deployment is read.
    pub ready: bool,
}

/// One color as observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColorView {
    /// Its Deployment, if it exists.
    pub deployment: Option<DeploymentView>,
    /// Its pods.
    pub pods: Vec<PodView>,
}

impl ColorView {
    /// Ready (as the observation judged it: at least one replica, all of
    /// them ready) and running `revision`.
    fn ready_at(&self, revision: &str) -> bool {
        self.deployment
            .as_ref()
            .is_some_and(|d| d.ready && d.revision == revision)
    }

    /// Ready at `revision` with at least `replicas` pods asked for (and at
    /// least one).
    fn ready_with(&self, revision: &str, replicas: i32) -> bool {
        self.ready_at(revision)
            && self
                .deployment
                .as_ref()
                .is_some_and(|d| d.replicas >= replicas)
    }

    /// Could take clients: Ready, or some of its pods answer (a drained
    /// gateway answers but reports 503 on readiness; a crash-looping one
    /// does not answer).
    fn capable(&self) -> bool {
        self.deployment.as_ref().is_some_and(|d| {
            d.replicas > 0 && (d.ready || self.pods.iter().any(|pod| pod.report.is_some()))
        })
    }

    fn replicas(&self) -> i32 {
        self.deployment.as_ref().map_or(0, |d| d.replicas)
    }

    /// Connections the reporting pods hold.
    fn connections(&self) -> u64 {
        self.pods
            .iter()
            .filter_map(|pod| pod.report)
            .map(|report| report.connections)
            .sum()
    }

    /// Every pod that has an address has answered.
    fn all_reported(&self) -> bool {
        self.pods
            .iter()
            .all(|pod| pod.ip.is_none() || pod.report.is_some())
    }

    fn targets(&self, filter: impl Fn(&PodView) -> bool) -> Vec<PodTarget> {
        self.pods
            .iter()
            .filter(|pod| filter(pod))
            .filter_map(|pod| {
                pod.ip.as_ref().map(|ip| PodTarget {
                    name: pod.name.clone(),
                    ip: ip.clone(),
                })
            })
            .collect()
    }
}

/// Everything the state machine looks at.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The time of this observation.
    pub now: Timestamp,
    /// `metadata.generation` of the resource.
    pub generation: Option<i64>,
    /// The revision the spec asks for.
    pub revision: String,
    /// The replicas the spec asks for.
    pub replicas: i32,
    /// The rollout policy from the spec.
    pub policy: RolloutPolicy,
    /// The status as last written.
    pub status: ConnectionServiceStatus,
    /// The blue color.
    pub blue: ColorView,
    /// The green color.
    pub green: ColorView,
    /// The color the public Service selects, if it exists.
    pub service_color: Option<Color>,
    /// The color the preview Service selects, if it exists.
    pub preview_color: Option<Color>,
    /// The ready addresses the public Service's EndpointSlices list: where
    /// every node's proxy sends new connections once it has caught up.
    /// Read while Switching or Draining, and while both colors have
    /// replicas (what waits for them); empty otherwise.
    pub endpoints: Vec<String>,
    /// The promote annotation is set.
    pub promote: bool,
    /// The abort annotation is set.
    pub abort: bool,
}

impl Observed {
    fn color(&self, color: Color) -> &ColorView {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

/// A Kubernetes Event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Warning rather than Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// Human-readable note.
    pub note: String,
}

/// One thing to do to the cluster or to a gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Server-side apply the color's Deployment with the current spec at
    /// `revision` (and its ConfigMap).
    ApplyDeployment {
        /// Which Deployment.
        color: Color,
        /// The revision label and ConfigMap it runs.
        revision: String,
        /// Pods.
        replicas: i32,
    },
    /// Set only `spec.replicas` of a color's Deployment (its template stays
    /// whatever revision it runs).
    Scale {
        /// Which Deployment.
        color: Color,
        /// Pods.
        replicas: i32,
    },
    /// Point the public Service at a color.
    RouteService {
        /// The color to select.
        color: Color,
    },
    /// Server-side apply the PodDisruptionBudget (once per spec generation).
    ApplyPodDisruptionBudget,
    /// Point the preview Service at a color.
    RoutePreview {
        /// The color to select.
        color: Color,
    },
    /// `POST /admin/drain` to each pod.
    StartDrain {
        /// The pods.
        pods: Vec<PodTarget>,
        /// The body each gets (the rate is already this pod's share).
        request: DrainRequest,
    },
    /// `DELETE /admin/drain` to each pod.
    CancelDrain {
        /// The pods.
        pods: Vec<PodTarget>,
    },
    /// Remove an annotation that has been acted on.
    ClearAnnotation {
        /// The annotation key.
        key: &'static str,
    },
    /// Delete the ConfigMaps of revisions other than these.
    PruneConfigMaps {
        /// Revisions still referenced.
        keep: Vec<String>,
    },
    /// Record a Kubernetes Event on the resource.
    Record(Notice),
}

/// How a rollout ended, for the rollout-duration metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The new color serves and the old one is scaled to zero.
    Completed,
    /// The new color was not Ready in time.
    Failed,
    /// Aborted by annotation or cancelled by reverting the spec.
    Aborted,
}

impl Outcome {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

/// What to do, and what the status becomes once it is done.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// The status to write after the steps.
    pub status: ConnectionServiceStatus,
    /// When to reconcile again if nothing else triggers it.
    pub requeue: Duration,
    /// Set when a rollout ended in this step: how, and its duration.
    pub finished: Option<(Outcome, Duration)>,
}

/// The next plan for an observation.
pub fn plan(observed: &Observed) -> Plan {
    let mut planner = Planner {
        o: observed,
        steps: Vec::new(),
        status: observed.status.clone(),
        requeue: STABLE_POLL,
        finished: None,
    };
    // The message describes this plan's phase; it is rebuilt every time.
    planner.status.message = None;
    if observed.status.observed_generation != observed.generation {
        // Once per spec generation: what follows the spec but not the
        // rollout (the PDB; the Service's port and type, re-applied at the
        // color it already selects).
        planner.steps.push(Step::ApplyPodDisruptionBudget);
        if let Some(color) = observed.status.active_color {
            planner.steps.push(Step::RouteService { color });
        }
    }
    planner.restarts();
    match (observed.status.phase, observed.status.rollout.clone()) {
        (None, _) => planner.install(),
        (Some(Phase::Progressing), Some(rollout)) => planner.progressing(rollout),
        (Some(Phase::Switching), Some(rollout)) => planner.switching(rollout),
        (Some(Phase::Draining), Some(rollout)) => planner.draining(rollout),
        // Stable, Failed, or a rollout phase whose record was lost: settle on
        // the active color and compare revisions again.
        _ => planner.stable(),
    }
    planner.finish()
}

struct Planner<'a> {
    o: &'a Observed,
    steps: Vec<Step>,
    status: ConnectionServiceStatus,
    requeue: Duration,
    finished: Option<(Outcome, Duration)>,
}

fn millis_since(since: &Time, now: Timestamp) -> i64 {
    now.as_millisecond() - since.0.as_millisecond()
}

fn after(since: &Time, seconds: u32) -> Timestamp {
    since
        .0
        .saturating_add(SignedDuration::from_secs(i64::from(seconds)))
        .unwrap_or(since.0)
}

fn until(deadline: Timestamp, now: Timestamp) -> Duration {
    let ms = deadline.as_millisecond() - now.as_millisecond();
    Duration::from_millis(ms.max(0) as u64)
}

fn duration_since(since: &Time, now: Timestamp) -> Duration {
    Duration::from_millis(millis_since(since, now).max(0) as u64)
}

impl Planner<'_> {
    fn now(&self) -> Time {
        Time(self.o.now)
    }

    fn record(&mut self, warning: bool, reason: &'static str, note: String) {
        self.steps.push(Step::Record(Notice {
            warning,
            reason,
            note,
        }));
    }

    fn active(&self) -> Color {
        self.status.active_color.unwrap_or(Color::Blue)
    }

    fn set_phase(&mut self, phase: Phase) {
        self.status.phase = Some(phase);
        let now = self.now();
        if let Some(rollout) = self.status.rollout.as_mut() {
            rollout.phase_since = now;
        }
    }

    /// Reports every gateway restart once: a pod whose container restarted
    /// more often than the status says gets a `GatewayRestarted` Warning
    /// (its clients lost their connections without a word and reconnect to
    /// the other pods), and the status keeps the counts of the pods that
    /// exist.
    fn restarts(&mut self) {
        let mut counts = std::collections::BTreeMap::new();
        for color in [Color::Blue, Color::Green] {
            for pod in &self.o.color(color).pods {
                if pod.restarts <= 0 {
                    continue;
                }
                let reported = self
                    .o
                    .status
                    .pod_restarts
                    .get(&pod.name)
                    .copied()
                    .unwrap_or(0);
                if pod.restarts > reported {
                    let how = pod.last_exit.as_deref().unwrap_or("ended");
                    let note = format!(
                        "{color} pod {} restarted ({how}; {} restarts): its clients reconnect to the other pods and resume",
                        pod.name, pod.restarts
                    );
                    self.record(true, "GatewayRestarted", note);
                }
                counts.insert(pod.name.clone(), pod.restarts);
            }
        }
        self.status.pod_restarts = counts;
    }

    /// No status yet: a first install, or a resource whose status was lost
    /// (adopt the color the Service already selects).
    fn install(&mut self) {
        let adopted = self.o.service_color.and_then(|color| {
            let deployment = self.o.color(color).deployment.as_ref()?;
            Some((color, deployment.revision.clone()))
        });
        if let Some((color, revision)) = adopted {
            self.status.phase = Some(Phase::Stable);
            self.status.active_color = Some(color);
            self.status.active_revision = Some(revision.clone());
            self.record(
                false,
                "Adopted",
                format!("{color} already serves revision {revision}"),
            );
            return self.stable();
        }
        let revision = self.o.revision.clone();
        self.steps.push(Step::ApplyDeployment {
            color: Color::Blue,
            revision: revision.clone(),
            replicas: self.o.replicas,
        });
        self.steps.push(Step::RouteService { color: Color::Blue });
        self.steps.push(Step::RoutePreview { color: Color::Blue });
        self.status.phase = Some(Phase::Stable);
        self.status.active_color = Some(Color::Blue);
        self.status.active_revision = Some(revision.clone());
        self.record(false, "Installed", format!("blue runs revision {revision}"));
        self.requeue = PROGRESS_POLL;
    }

    /// Stable (or Failed): keep the active color as the spec says, the other
    /// one at zero, and start a rollout when the revision changes.
    fn stable(&mut self) {
        let active = self.active();
        let idle = active.other();
        let revision = self.o.revision.clone();
        let active_revision = self.status.active_revision.clone().unwrap_or_default();
        let settled = revision == active_revision
            || self.status.failed_revision.as_deref() == Some(revision.as_str());
        // No rollout waits for an approval here: it belonged to one rollout,
        // and goes first, so a crash after the clear leaves none behind. An
        // abort seen with a new spec aborts the rollout that spec would
        // start: it is cleared only once the status records that (never in
        // the plan that acts on it).
        if self.o.promote {
            self.steps.push(Step::ClearAnnotation {
                key: PROMOTE_ANNOTATION,
            });
        }
        if self.o.abort && settled {
            self.steps.push(Step::ClearAnnotation {
                key: ABORT_ANNOTATION,
            });
        }
        if self.o.service_color != Some(active) {
            self.steps.push(Step::RouteService { color: active });
        }
        let starting = !settled && !self.o.abort;
        // A rollout starting now points the preview at the new color.
        if self.o.preview_color != Some(active) && !starting {
            self.steps.push(Step::RoutePreview { color: active });
        }
        match &self.o.color(active).deployment {
            None => {
                self.steps.push(Step::ApplyDeployment {
                    color: active,
                    revision: revision.clone(),
                    replicas: self.o.replicas,
                });
                self.status.active_revision = Some(revision.clone());
                self.record(
                    true,
                    "Recreated",
                    format!("{active} Deployment was missing; recreated at revision {revision}"),
                );
            }
            Some(deployment) if deployment.replicas != self.o.replicas => {
                self.steps.push(Step::Scale {
                    color: active,
                    replicas: self.o.replicas,
                });
            }
            Some(_) => {}
        }
        // A cancel that failed while a rollout was undone leaves active pods
        // drained (not Ready, turning clients away): lift it.
        let drained = self
            .o
            .color(active)
            .targets(|pod| pod.report.is_some_and(|report| report.draining));
        if !drained.is_empty() {
            self.steps.push(Step::CancelDrain { pods: drained });
        }
        let idle_view = self.o.color(idle);
        // The idle color goes to zero, unless a rollout to the revision it
        // already runs starts now (a status lost mid-rollout: its pods
        // stay), or it is the only Ready color.
        let reused = starting
            && idle_view
                .deployment
                .as_ref()
                .is_some_and(|d| d.revision == revision);
        let last_ready = self.last_ready(idle, &active_revision);
        if idle_view.replicas() > 0 && !reused && !last_ready {
            // (A status lost mid-switch: the Service was just moved off
            // the idle color, and its clients would come back to it.)
            if self.traffic_reaches(idle) {
                self.status.message = Some(format!(
                    "{active} serves; {idle} is scaled down once the Service's EndpointSlices stop listing it"
                ));
                self.requeue = TRAFFIC_POLL;
            } else {
                self.scale_down_draining(idle);
            }
        }
        if revision == active_revision {
            if self.status.phase == Some(Phase::Failed) {
                self.record(
                    false,
                    "RolloutCancelled",
                    format!("the spec is back at the running revision {revision}"),
                );
            }
            self.status.phase = Some(Phase::Stable);
            self.status.failed_revision = None;
        } else if self.status.failed_revision.as_deref() == Some(revision.as_str()) {
            // Failed or aborted: wait for a different spec.
        } else if self.o.abort {
            self.status.failed_revision = Some(revision.clone());
            self.record(
                true,
                "RolloutAborted",
                format!("rollout of {revision} aborted before it started"),
            );
        } else {
            self.start_rollout(active, active_revision, revision);
        }
    }

    /// Whether `color` could take clients (see `ColorView::capable`) and the other color (which
    /// should serve `revision`) is not Ready: scaling it down would leave
    /// nothing that can take the clients.
    fn last_ready(&self, color: Color, revision: &str) -> bool {
        self.o.color(color).capable() && !self.o.color(color.other()).ready_at(revision)
    }

    /// Scales a color to zero outside a planned drain: its pods that still
    /// hold connections are told to drain at the policy's pace first (their
    /// SIGTERM drain keeps a running drain), instead of the gateway's own
    /// defaults.
    fn scale_down_draining(&mut self, color: Color) {
        let pods = self.undrained(color);
        if !pods.is_empty() {
            let request = self.drain_request(self.o.color(color).pods.len());
            self.steps.push(Step::StartDrain { pods, request });
        }
        self.steps.push(Step::Scale { color, replicas: 0 });
    }

    fn start_rollout(&mut self, from: Color, from_revision: String, revision: String) {
        let to = from.other();
        self.steps.push(Step::ApplyDeployment {
            color: to,
            revision: revision.clone(),
            replicas: self.o.replicas,
        });
        self.steps.push(Step::RoutePreview { color: to });
        self.status.failed_revision = None;
        self.status.rollout = Some(RolloutProgress {
            from_color: from,
            from_revision: from_revision.clone(),
            to_color: to,
            to_revision: revision.clone(),
            started: self.now(),
            phase_since: self.now(),
            drain_started: None,
            drained_at: None,
            total: 0,
            drained: 0,
            remaining: 0,
            unready_since: Some(self.now()),
            aborting: None,
            traffic_moved: None,
            traffic_waiting_since: None,
        });
        self.set_phase(Phase::Progressing);
        self.record(
            false,
            "RolloutStarted",
            format!("revision {revision} on {to} (replacing {from_revision} on {from})"),
        );
        self.requeue = PROGRESS_POLL;
    }

    /// Ends a rollout that has not switched the Service: the new color goes
    /// to zero, unless it is the only Ready color (Stable scales it down
    /// once the active one is Ready again).
    fn back_off_before_switch(&mut self, rollout: &RolloutProgress) {
        if !self.last_ready(rollout.to_color, &rollout.from_revision) {
            self.steps.push(Step::Scale {
                color: rollout.to_color,
                replicas: 0,
            });
        }
        self.steps.push(Step::RoutePreview {
            color: rollout.from_color,
        });
    }

    /// Keeps a color's Deployment at the spec's replicas (a user who scaled
    /// it by hand, or a spec change mid-rollout).
    fn keep_replicas(&mut self, color: Color) {
        let replicas = self.o.replicas;
        if self
            .o
            .color(color)
            .deployment
            .as_ref()
            .is_some_and(|d| d.replicas != replicas)
        {
            self.steps.push(Step::Scale { color, replicas });
        }
    }

    /// Whether the new color is Ready at the spec's replicas; tracks since
    /// when it is not (the ready timeout's clock, stopped while it is).
    fn new_color_ready(&self, rollout: &mut RolloutProgress) -> bool {
        let ready = self
            .o
            .color(rollout.to_color)
            .ready_with(&rollout.to_revision, self.o.replicas);
        if ready {
            rollout.unready_since = None;
        } else if rollout.unready_since.is_none() {
            rollout.unready_since = Some(self.now());
        }
        ready
    }

    /// When the new color's ready timeout runs out.
    fn unready_deadline(&self, rollout: &RolloutProgress) -> Timestamp {
        let since = rollout
            .unready_since
            .as_ref()
            .unwrap_or(&rollout.phase_since);
        after(since, self.o.policy.ready_timeout_seconds)
    }

    fn progressing(&mut self, mut rollout: RolloutProgress) {
        let o = self.o;
        if o.service_color == Some(rollout.to_color) {
            // The switch was made and its status lost: carry on from it
            // (an abort, a revert or a new spec is handled after the switch,
            // where the Service is brought back only to a Ready color).
            return self.switch(rollout);
        }
        if o.abort {
            self.back_off_before_switch(&rollout);
            return self.end_aborted(&rollout, format!("{} scaled to zero", rollout.to_color));
        }
        if o.revision == rollout.from_revision {
            self.back_off_before_switch(&rollout);
            self.status.phase = Some(Phase::Stable);
            self.finished = Some((Outcome::Aborted, duration_since(&rollout.started, o.now)));
            return self.record(
                false,
                "RolloutCancelled",
                format!("the spec is back at the running revision {}", o.revision),
            );
        }
        if o.revision != rollout.to_revision {
            // An approval was for the revision the rollout targeted.
            if o.promote {
                self.steps.push(Step::ClearAnnotation {
                    key: PROMOTE_ANNOTATION,
                });
            }
            self.steps.push(Step::ApplyDeployment {
                color: rollout.to_color,
                revision: o.revision.clone(),
                replicas: o.replicas,
            });
            self.record(
                false,
                "RolloutRetargeted",
                format!(
                    "the spec changed again: {} on {}",
                    o.revision, rollout.to_color
                ),
            );
            rollout.to_revision = o.revision.clone();
            rollout.unready_since = Some(self.now());
            self.status.rollout = Some(rollout);
            self.set_phase(Phase::Progressing);
            self.requeue = PROGRESS_POLL;
            return;
        }
        self.keep_replicas(rollout.from_color);
        self.keep_replicas(rollout.to_color);
        if self.new_color_ready(&mut rollout) {
            if o.policy.auto_promote || o.promote {
                return self.switch(rollout);
            }
            self.status.message = Some(format!(
                "{} is Ready; waiting for the {PROMOTE_ANNOTATION} annotation",
                rollout.to_color
            ));
            self.status.rollout = Some(rollout);
            self.requeue = PROGRESS_POLL;
            return;
        }
        let deadline = self.unready_deadline(&rollout);
        if o.now >= deadline {
            self.back_off_before_switch(&rollout);
            self.status.phase = Some(Phase::Failed);
            self.status.failed_revision = Some(rollout.to_revision.clone());
            self.finished = Some((Outcome::Failed, duration_since(&rollout.started, o.now)));
            let note = format!(
                "{} was not Ready within {}s; scaled to zero, {} untouched{}",
                rollout.to_color,
                o.policy.ready_timeout_seconds,
                rollout.from_color,
                waiting_reasons(o.color(rollout.to_color))
            );
            self.status.message = Some(note.clone());
            self.record(true, "ReadyTimeout", note);
            self.status.rollout = Some(rollout);
            return;
        }
        self.status.rollout = Some(rollout);
        self.requeue = PROGRESS_POLL.min(until(deadline, o.now).max(Duration::from_millis(100)));
    }

    /// The Service goes to the new color. The promote annotation, if any,
    /// stays until the rollout ends (Stable clears it): clearing it in this
    /// plan would lose the switch's only trace if the status write failed.
    fn switch(&mut self, rollout: RolloutProgress) {
        if self.o.service_color != Some(rollout.to_color) {
            self.steps.push(Step::RouteService {
                color: rollout.to_color,
            });
        }
        self.status.active_color = Some(rollout.to_color);
        self.status.active_revision = Some(rollout.to_revision.clone());
        self.record(
            false,
            "Switched",
            format!("the Service selects {} now", rollout.to_color),
        );
        self.status.rollout = Some(rollout);
        self.set_phase(Phase::Switching);
        self.requeue = Duration::from_millis(200);
    }

    fn drain_request(&self, pods: usize) -> DrainRequest {
        let policy = &self.o.policy.drain;
        // Each old pod gets an equal share of the global cap, rounded down so
        // the sum stays under it (but at least 1 per pod).
        let share = (u64::from(policy.max_rate) / pods.max(1) as u64).max(1);
        DrainRequest {
            window_ms: u64::from(policy.window_seconds) * 1000,
            max_rate: share,
            deadline_ms: u64::from(policy.deadline_seconds) * 1000,
            mode: policy.mode.into(),
            retry_jitter_ms: u64::from(policy.retry_jitter_ms),
            migrate_grace_ms: Some(u64::from(policy.migrate_grace_ms)),
        }
    }

    /// Pods of a color that answered, hold connections and are not
    /// draining: the ones to tell. A gateway whose drain has finished still
    /// reports draining (it stays drained until cancelled), and holds no
    /// connections, so it is not told twice.
    fn undrained(&self, color: Color) -> Vec<PodTarget> {
        self.o.color(color).targets(|pod| {
            pod.report
                .is_some_and(|report| !report.draining && report.connections > 0)
        })
    }

    /// Why the rollout must be undone now, if it must: already being undone,
    /// the abort annotation, or the spec back at the old revision.
    fn undo_reason(&self, rollout: &RolloutProgress) -> Option<AbortReason> {
        rollout.aborting.or(if self.o.abort {
            Some(AbortReason::Aborted)
        } else if self.o.revision == rollout.from_revision {
            Some(AbortReason::Reverted)
        } else {
            None
        })
    }

    /// After the switch, the new color is not Ready: no more drains and no
    /// scale-down of the old color while it is not, and past the ready
    /// timeout the rollout is undone.
    fn hold(&mut self, rollout: RolloutProgress) {
        let deadline = self.unready_deadline(&rollout);
        let to = rollout.to_color;
        if self.o.now >= deadline {
            self.record(
                true,
                "NewColorUnready",
                format!(
                    "{to} was not Ready for {}s after the switch; rolling back to {}",
                    self.o.policy.ready_timeout_seconds, rollout.from_color
                ),
            );
            return self.undo_after_switch(rollout, AbortReason::Unready);
        }
        self.status.message = Some(format!(
            "{to} is not Ready: the rollout holds (no drains, no scale-down) and rolls back after {}s",
            self.o.policy.ready_timeout_seconds
        ));
        self.status.rollout = Some(rollout);
        self.requeue =
            PROGRESS_POLL.min(until(deadline, self.o.now).max(Duration::from_millis(100)));
    }

    /// What Switching and Draining check first: an undo to carry on, the
    /// new color's readiness (hold while it is not), and that the Service
    /// selects it (applied again if not yet visible, or lost). The rollout
    /// comes back when the phase may go on.
    fn after_switch(&mut self, mut rollout: RolloutProgress) -> Option<RolloutProgress> {
        if let Some(reason) = self.undo_reason(&rollout) {
            self.undo_after_switch(rollout, reason);
            return None;
        }
        self.keep_replicas(rollout.to_color);
        if !self.new_color_ready(&mut rollout) {
            self.hold(rollout);
            return None;
        }
        if self.o.service_color != Some(rollout.to_color) {
            self.steps.push(Step::RouteService {
                color: rollout.to_color,
            });
            self.status.rollout = Some(rollout);
            self.requeue = Duration::from_millis(500);
            return None;
        }
        Some(rollout)
    }

    /// The Service's endpoints list only ready pods of `color`, and some:
    /// new connections go there once every proxy follows them.
    fn traffic_on(&self, color: Color) -> bool {
        let pods = &self.o.color(color).pods;
        !self.o.endpoints.is_empty()
            && self
                .o
                .endpoints
                .iter()
                .all(|address| pods.iter().any(|pod| pod.ip.as_ref() == Some(address)))
    }

    /// The Service's endpoints list a pod of `color`.
    fn traffic_reaches(&self, color: Color) -> bool {
        self.o.color(color).pods.iter().any(|pod| {
            pod.ip
                .as_ref()
                .is_some_and(|ip| self.o.endpoints.contains(ip))
        })
    }

    /// Whether new connections have gone only to `color` (the color the
    /// Service selects) for the settle time, so a client that leaves the
    /// other color now lands on this one: the EndpointSlices follow the
    /// selector late, and every node's proxy follows them later still.
    /// While not, the plan says why and looks again soon. Endpoints that
    /// have not moved by the ready timeout (a cluster whose EndpointSlices
    /// do not follow Services) end the wait with a Warning.
    fn traffic_settled(&mut self, rollout: &mut RolloutProgress, color: Color) -> bool {
        let o = self.o;
        if !self.traffic_on(color) {
            rollout.traffic_moved = None;
            let since = rollout.traffic_waiting_since.get_or_insert(Time(o.now));
            let deadline = after(since, o.policy.ready_timeout_seconds);
            if o.now >= deadline {
                self.record(
                    true,
                    "EndpointsNotMoved",
                    format!(
                        "the Service's EndpointSlices did not list only {color} pods within {}s; going on",
                        o.policy.ready_timeout_seconds
                    ),
                );
                return true;
            }
            let stale = o
                .endpoints
                .iter()
                .filter(|address| {
                    !o.color(color)
                        .pods
                        .iter()
                        .any(|pod| pod.ip.as_ref() == Some(*address))
                })
                .count();
            self.status.message = Some(format!(
                "the Service selects {color}; waiting for its EndpointSlices to follow ({} ready endpoints, {stale} not {color})",
                o.endpoints.len()
            ));
            self.requeue = TRAFFIC_POLL;
            return false;
        }
        let moved = rollout.traffic_moved.get_or_insert(Time(o.now)).clone();
        let settled_at = after(&moved, o.policy.traffic_settle_seconds);
        if o.now < settled_at {
            self.status.message = Some(format!(
                "the Service's endpoints are all {color}; letting every proxy follow for {}s",
                o.policy.traffic_settle_seconds
            ));
            self.requeue = until(settled_at, o.now).max(Duration::from_millis(100));
            return false;
        }
        true
    }

    fn switching(&mut self, rollout: RolloutProgress) {
        let o = self.o;
        let Some(mut rollout) = self.after_switch(rollout) else {
            return;
        };
        let to = rollout.to_color;
        if !self.traffic_settled(&mut rollout, to) {
            self.status.rollout = Some(rollout);
            return;
        }
        let old = o.color(rollout.from_color);
        let pods = self.undrained(rollout.from_color);
        let request = self.drain_request(old.pods.len());
        let total = old.connections();
        self.record(
            false,
            "DrainStarted",
            format!(
                "draining {total} connections from {} {} pods at ≤{} closes/s each",
                old.pods.len(),
                rollout.from_color,
                request.max_rate
            ),
        );
        if !pods.is_empty() {
            self.steps.push(Step::StartDrain { pods, request });
        }
        rollout.total = total;
        rollout.remaining = total;
        rollout.drained = 0;
        rollout.drain_started = Some(self.now());
        self.status.rollout = Some(rollout);
        self.set_phase(Phase::Draining);
        self.requeue = DRAIN_POLL;
    }

    fn draining(&mut self, rollout: RolloutProgress) {
        let o = self.o;
        let Some(mut rollout) = self.after_switch(rollout) else {
            return;
        };
        let old = o.color(rollout.from_color);
        // Pods that came back (restarted) or were missed are told to drain too.
        let pods = self.undrained(rollout.from_color);
        if !pods.is_empty() {
            let request = self.drain_request(old.pods.len());
            self.steps.push(Step::StartDrain { pods, request });
        }
        let remaining = old.connections();
        rollout.remaining = remaining;
        rollout.drained = rollout.total.saturating_sub(remaining);
        let started = rollout.drain_started.clone().unwrap_or_else(|| self.now());
        let deadline = after(&started, o.policy.drain.deadline_seconds);
        let empty = remaining == 0 && old.all_reported();
        if rollout.drained_at.is_none() && (empty || o.now >= deadline) {
            rollout.drained_at = Some(self.now());
            let how = if empty { "empty" } else { "at its deadline" };
            self.record(
                false,
                "Drained",
                format!(
                    "{} {how} after {}s ({} connections left it, {remaining} remain)",
                    rollout.from_color,
                    millis_since(&started, o.now) / 1000,
                    rollout.drained
                ),
            );
        }
        let Some(drained_at) = rollout.drained_at.clone() else {
            self.status.rollout = Some(rollout);
            self.requeue = DRAIN_POLL;
            return;
        };
        let scale_down_at = after(&drained_at, o.policy.scale_down_delay_seconds);
        if o.now < scale_down_at {
            self.status.rollout = Some(rollout);
            self.requeue = until(scale_down_at, o.now).min(DRAIN_POLL * 5);
            return;
        }
        self.steps.push(Step::Scale {
            color: rollout.from_color,
            replicas: 0,
        });
        self.steps.push(Step::RoutePreview {
            color: rollout.to_color,
        });
        self.steps.push(Step::PruneConfigMaps {
            keep: vec![rollout.to_revision.clone()],
        });
        let took = duration_since(&rollout.started, o.now);
        self.finished = Some((Outcome::Completed, took));
        self.record(
            false,
            "RolloutComplete",
            format!(
                "revision {} serves on {}; {} scaled to zero; took {}s",
                rollout.to_revision,
                rollout.to_color,
                rollout.from_color,
                took.as_secs()
            ),
        );
        self.status.rollout = Some(rollout);
        self.set_phase(Phase::Stable);
    }

    /// Undoes a rollout after the switch, over as many reconciles as it
    /// takes: the old color goes back to the spec's replicas and its drains
    /// are cancelled; only once it is Ready does the Service point back at
    /// it; then the new color's pods drain at the policy's pace and it is
    /// scaled to zero. `aborting` in the status keeps the undo going across
    /// reconciles and restarts; the abort annotation is cleared only once
    /// the status says Stable.
    fn undo_after_switch(&mut self, mut rollout: RolloutProgress, reason: AbortReason) {
        let o = self.o;
        let (from, to) = (rollout.from_color, rollout.to_color);
        if rollout.aborting.is_none() {
            rollout.aborting = Some(reason);
            rollout.phase_since = self.now();
            rollout.traffic_moved = None;
            rollout.traffic_waiting_since = None;
        }
        let old = o.color(from);
        if old
            .deployment
            .as_ref()
            .is_some_and(|d| d.replicas < o.replicas)
        {
            self.steps.push(Step::Scale {
                color: from,
                replicas: o.replicas,
            });
        }
        let drained = old.targets(|pod| pod.report.is_some_and(|report| report.draining));
        let lifted = drained.is_empty();
        if !lifted {
            self.steps.push(Step::CancelDrain { pods: drained });
        }
        // A Service already back on the old color means an earlier
        // reconcile routed it (and maybe crashed before its status): wait
        // for its endpoints, then finish.
        let routed = o.service_color == Some(from);
        let old_ready = lifted && old.ready_with(&rollout.from_revision, o.replicas);
        if !(routed || old_ready) {
            // However long it takes: the Service stays on the color that
            // serves, and the intent is never dropped.
            self.status.message = Some(format!(
                "rolling back {}: waiting for {from} ({}) to be Ready before the Service goes back",
                rollout.to_revision, rollout.from_revision
            ));
            self.status.rollout = Some(rollout);
            self.requeue = PROGRESS_POLL;
            return;
        }
        if !routed {
            // The new color is scaled down only once traffic has moved
            // back, or its clients would reconnect to it again.
            self.steps.push(Step::RouteService { color: from });
            self.status.message = Some(format!(
                "rolling back {}: the Service selects {from} again; waiting for its EndpointSlices",
                rollout.to_revision
            ));
            self.status.rollout = Some(rollout);
            self.requeue = TRAFFIC_POLL;
            return;
        }
        if !self.traffic_settled(&mut rollout, from) {
            self.status.rollout = Some(rollout);
            return;
        }
        if !self.last_ready(to, &rollout.from_revision) {
            self.scale_down_draining(to);
        }
        self.steps.push(Step::RoutePreview { color: from });
        self.status.active_color = Some(from);
        self.status.active_revision = Some(rollout.from_revision.clone());
        let reason = rollout.aborting.unwrap_or(reason);
        self.status.rollout = Some(rollout.clone());
        match reason {
            AbortReason::Reverted => {
                self.status.phase = Some(Phase::Stable);
                self.status.failed_revision = None;
                self.finished = Some((Outcome::Aborted, duration_since(&rollout.started, o.now)));
                self.record(
                    false,
                    "RolloutCancelled",
                    format!(
                        "the spec is back at {}; the Service selects {from} again",
                        rollout.from_revision
                    ),
                );
            }
            AbortReason::Aborted | AbortReason::Unready => self.end_aborted(
                &rollout,
                format!("the Service selects {from} again; {to} scaled to zero"),
            ),
        }
    }

    fn end_aborted(&mut self, rollout: &RolloutProgress, what: String) {
        self.status.phase = Some(Phase::Stable);
        self.status.failed_revision = Some(rollout.to_revision.clone());
        self.finished = Some((
            Outcome::Aborted,
            duration_since(&rollout.started, self.o.now),
        ));
        self.record(
            true,
            "RolloutAborted",
            format!("rollout of {} aborted: {what}", rollout.to_revision),
        );
    }

    fn finish(mut self) -> Plan {
        let o = self.o;
        self.status.connections = ColorConnections {
            blue: o.blue.connections(),
            green: o.green.connections(),
        };
        self.status.target_revision = Some(o.revision.clone());
        self.status.observed_generation = o.generation;
        let phase = self.status.phase.unwrap_or(Phase::Stable);
        if self.status.message.is_none() {
            self.status.message = Some(self.message(phase));
        }
        self.conditions(phase);
        Plan {
            steps: self.steps,
            status: self.status,
            requeue: self.requeue,
            finished: self.finished,
        }
    }

    fn message(&self, phase: Phase) -> String {
        let rollout = self.status.rollout.as_ref();
        match (phase, rollout) {
            (Phase::Progressing, Some(r)) => {
                format!("waiting for {} ({}) to be Ready", r.to_color, r.to_revision)
            }
            (Phase::Switching, Some(r)) => format!("switching the Service to {}", r.to_color),
            (Phase::Draining, Some(r)) => format!(
                "draining {}: {} of {} connections moved, {} remain",
                r.from_color, r.drained, r.total, r.remaining
            ),
            (Phase::Failed, Some(r)) => format!(
                "revision {} failed; {} still serves {}",
                r.to_revision, r.from_color, r.from_revision
            ),
            _ => match &self.status.failed_revision {
                Some(failed) => format!(
                    "{} serves {}; revision {failed} was not rolled out (change the spec to retry)",
                    self.active(),
                    self.status.active_revision.as_deref().unwrap_or("?")
                ),
                None => format!(
                    "{} serves {}",
                    self.active(),
                    self.status.active_revision.as_deref().unwrap_or("?")
                ),
            },
        }
    }

    fn conditions(&mut self, phase: Phase) {
        let active = self.active();
        let serving = self
            .o
            .color(active)
            .ready_at(self.status.active_revision.as_deref().unwrap_or_default());
        let moving = matches!(
            phase,
            Phase::Progressing | Phase::Switching | Phase::Draining
        );
        let (ready_reason, degraded_reason) = if serving {
            ("AllReplicasReady", "Healthy")
        } else {
            ("ReplicasNotReady", "ReplicasNotReady")
        };
        let degraded = phase == Phase::Failed || !serving;
        let degraded_reason = if phase == Phase::Failed {
            "RolloutFailed"
        } else {
            degraded_reason
        };
        let message = self.status.message.clone().unwrap_or_default();
        let progressing_reason = if moving { phase.as_str() } else { "Idle" };
        let now = self.now();
        let generation = self.o.generation;
        let conditions = &mut self.status.conditions;
        set_condition(
            conditions,
            "Ready",
            serving,
            ready_reason,
            &message,
            &now,
            generation,
        );
        set_condition(
            conditions,
            "Progressing",
            moving,
            progressing_reason,
            &message,
            &now,
            generation,
        );
        set_condition(
            conditions,
            "Degraded",
            degraded,
            degraded_reason,
            &message,
            &now,
            generation,
        );
    }
}

/// `: POD REASON, …` for the pods of `view` whose containers wait (at most
/// three), or nothing: what a user needs to see why a color never became
/// Ready (an image that cannot be pulled, a crash loop).
fn waiting_reasons(view: &ColorView) -> String {
    let waiting: Vec<String> = view
        .pods
        .iter()
        .filter_map(|p| p.waiting.as_ref().map(|w| format!("{} {w}", p.name)))
        .take(3)
        .collect();
    if waiting.is_empty() {
        String::new()
    } else {
        format!(": {}", waiting.join("; "))
    }
}

/// Sets a condition, keeping its `lastTransitionTime` unless its status flips.
pub(crate) fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: &Time,
    generation: Option<i64>,
) {
    let status = if value { "True" } else { "False" }.to_string();
    let fresh = Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: now.clone(),
        observed_generation: generation,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == fresh.status => {
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = generation;
        }
        Some(existing) => *existing = fresh,
        None => conditions.push(fresh),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod explore;
