//! The rollout planner, model-checked: a simulated cluster that every step
//! of a plan acts on (or a crash cuts short), and an explorer that walks
//! every sequence, up to a bound, of user actions (new revision, revert,
//! replicas, abort, promote), readiness changes of either color, pod
//! restarts, status loss and operator crashes between any two steps —
//! checking invariants in every state and, once the inputs stop, that the
//! resource settles.
//!
//! Invariants:
//! 1. The Service is never pointed at a color with no Ready pods while the
//!    other color has some.
//! 2. The last Ready color is never scaled to zero.
//! 3. An abort during a rollout ends with the old revision serving (unless
//!    the status recording the rollout was lost: then the color the Service
//!    selects is adopted).
//! 4. A switch without `autoPromote` is approved by a promote set during
//!    that rollout's Progressing phase.
//! 5. Once the inputs stop, the resource settles within a bounded number of
//!    reconciles: to Stable or Failed with the Service on the active color,
//!    or to one of the two documented waits — Ready and waiting for a
//!    promote, or undoing a rollout while the old color cannot become
//!    Ready (the Service stays on the color that serves).
//! 6. No pod (incarnation) is told to drain twice in one rollout.
//! 7. No color is told to drain, or scaled to zero, while the Service's
//!    endpoints still list its pods: its clients would reconnect to it.
//!    (The endpoints follow the Service's selector two ticks late: later
//!    than the next reconcile.)
//!
//! The walk is exhaustive, not sampled: rounds of (at most one disturbance,
//! a reconcile that may crash after any step, five seconds), with at most
//! so many disturbances and crashes in all. `SWITCHYARD_EXPLORE_ROUNDS`
//! (default 6), `..._DISTURBANCES` (2) and `..._CRASHES` (2) set the bound
//! (`bench/explore-rollouts.sh` runs a deeper one); the test prints the
//! bound and the number of states explored. A violation panics with the
//! sequence that produced it, which replays as a table row.

use std::collections::{BTreeMap, HashSet};

use super::*;

/// Seconds one tick of the simulated clock lasts.
const TICK: i64 = 5;
/// Reconciles (each followed by a tick) a settling resource is given.
const SETTLE_ROUNDS: usize = 60;

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct SimPod {
    name: String,
    incarnation: u32,
    up: bool,
    draining: bool,
    connections: u64,
}

#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
struct SimColor {
    /// (revision, replicas) of its Deployment.
    deployment: Option<(String, i32)>,
    /// Its pods never become (or stop being) Ready: a bad image, a crash loop.
    broken: bool,
    pods: Vec<SimPod>,
    next_pod: u32,
}

impl SimColor {
    /// Has pods up and answering, whatever their drain: the "Ready pods"
    /// the invariants speak of.
    fn capable(&self) -> bool {
        self.deployment
            .as_ref()
            .is_some_and(|(_, replicas)| *replicas > 0)
            && !self.broken
            && self.pods.iter().any(|p| p.up)
    }

    /// What the Deployment controller reports: every replica there and
    /// Ready (a draining gateway answers 503 on its readiness probe).
    fn ready(&self) -> bool {
        self.deployment
            .as_ref()
            .is_some_and(|(_, replicas)| *replicas > 0 && self.pods.len() == *replicas as usize)
            && !self.broken
            && self.pods.iter().all(|p| p.up && !p.draining)
    }

    fn resize(&mut self, color: Color, replicas: i32, disconnected: &mut u64) {
        let replicas = replicas.max(0) as usize;
        while self.pods.len() > replicas {
            if let Some(pod) = self.pods.pop() {
                *disconnected += pod.connections;
            }
        }
        while self.pods.len() < replicas {
            self.next_pod += 1;
            self.pods.push(SimPod {
                name: format!("{}-{}", color.as_str(), self.next_pod),
                incarnation: 0,
                up: false,
                draining: false,
                connections: 0,
            });
        }
    }

    fn view(&self) -> ColorView {
        ColorView {
            deployment: self
                .deployment
                .as_ref()
                .map(|(revision, replicas)| DeploymentView {
                    revision: revision.clone(),
                    replicas: *replicas,
                    ready: self.ready(),
                }),
            pods: self
                .pods
                .iter()
                .map(|p| PodView {
                    name: p.name.clone(),
                    ip: Some(p.name.clone()),
                    report: p.up.then_some(GatewayReport {
                        connections: p.connections,
                        draining: p.draining,
                    }),
                    waiting: None,
                    restarts: 0,
                    last_exit: None,
                })
                .collect(),
        }
    }
}

/// One thing that happens to the cluster between reconciles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disturbance {
    NewRevision,
    Revert,
    ToggleReplicas,
    Abort,
    Promote,
    Break(Color),
    Heal(Color),
    RestartPod(Color),
    ScaleToZeroByHand(Color),
    LoseStatus,
}

const DISTURBANCES: [Disturbance; 14] = [
    Disturbance::NewRevision,
    Disturbance::Revert,
    Disturbance::ToggleReplicas,
    Disturbance::Abort,
    Disturbance::Promote,
    Disturbance::Break(Color::Blue),
    Disturbance::Break(Color::Green),
    Disturbance::Heal(Color::Blue),
    Disturbance::Heal(Color::Green),
    Disturbance::RestartPod(Color::Blue),
    Disturbance::RestartPod(Color::Green),
    Disturbance::ScaleToZeroByHand(Color::Blue),
    Disturbance::ScaleToZeroByHand(Color::Green),
    Disturbance::LoseStatus,
];

#[derive(Debug, Clone)]
struct World {
    now: Timestamp,
    revision: String,
    replicas: i32,
    policy: RolloutPolicy,
    status: ConnectionServiceStatus,
    blue: SimColor,
    green: SimColor,
    service: Option<Color>,
    /// The ready pods the Service's EndpointSlices list: what its selector
    /// chose two ticks ago.
    endpoints: Vec<String>,
    /// What they will list after the next tick.
    endpoints_next: Vec<String>,
    preview: Option<Color>,
    promote: bool,
    abort: bool,
    disconnected: u64,
    next_revision: u32,
    /// StartDrain count per (rollout, pod, incarnation).
    drains: BTreeMap<(String, String, u32), u32>,
    /// The revision an abort set during a rollout must end on.
    abort_from: Option<String>,
    /// The rollout the promote annotation was set for (`None`: set while no
    /// rollout waited for it).
    approval: Option<String>,
    trace: Vec<String>,
}

/// The part of a world that decides its future (not its history).
fn key(w: &World) -> String {
    format!(
        "{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{:?}",
        w.now,
        w.revision,
        w.replicas,
        w.status,
        w.blue,
        w.green,
        w.service,
        w.endpoints,
        w.endpoints_next,
        w.preview,
        w.promote,
        w.abort,
        w.disconnected,
        w.drains,
        w.abort_from,
        w.approval
    )
}

fn rollout_key(status: &ConnectionServiceStatus) -> Option<String> {
    status
        .rollout
        .as_ref()
        .map(|r| format!("{}@{}", r.to_revision, r.started.0))
}

impl World {
    fn start() -> World {
        let mut policy = RolloutPolicy {
            auto_promote: false,
            ready_timeout_seconds: 20,
            scale_down_delay_seconds: 5,
            ..RolloutPolicy::default()
        };
        policy.drain.deadline_seconds = 60;
        let mut w = World {
            now: Timestamp::from_second(1_800_000_000).expect("timestamp"),
            revision: "r1".into(),
            replicas: 2,
            policy,
            status: ConnectionServiceStatus::default(),
            blue: SimColor::default(),
            green: SimColor::default(),
            service: None,
            endpoints: Vec::new(),
            endpoints_next: Vec::new(),
            preview: None,
            promote: false,
            abort: false,
            disconnected: 4,
            next_revision: 2,
            drains: BTreeMap::new(),
            abort_from: None,
            approval: None,
            trace: Vec::new(),
        };
        // Installed and serving: blue at r1, the clients on it; then the
        // spec moves to r2.
        for _ in 0..4 {
            w.reconcile(None).expect("install");
            w.tick();
        }
        assert_eq!(w.status.phase, Some(Phase::Stable), "{:?}", w.trace);
        w.revision = "r2".into();
        w.trace.clear();
        w
    }

    fn color(&self, color: Color) -> &SimColor {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }

    fn color_mut(&mut self, color: Color) -> &mut SimColor {
        match color {
            Color::Blue => &mut self.blue,
            Color::Green => &mut self.green,
        }
    }

    fn observe(&self) -> Observed {
        Observed {
            now: self.now,
            generation: Some(1),
            revision: self.revision.clone(),
            replicas: self.replicas,
            policy: self.policy.clone(),
            status: self.status.clone(),
            blue: self.blue.view(),
            green: self.green.view(),
            service_color: self.service,
            preview_color: self.preview,
            endpoints: self.endpoints.clone(),
            promote: self.promote,
            abort: self.abort,
        }
    }

    fn violation(&self, what: String) -> String {
        // Runs of plain reconciles are written once, with their count.
        let mut lines: Vec<(String, usize)> = Vec::new();
        for event in &self.trace {
            match lines.last_mut() {
                Some((last, n)) if last == event => *n += 1,
                _ => lines.push((event.clone(), 1)),
            }
        }
        let lines: Vec<String> = lines
            .into_iter()
            .map(|(event, n)| {
                if n > 1 {
                    format!("{event} x{n}")
                } else {
                    event
                }
            })
            .collect();
        format!("{what}\n  after: {}", lines.join("\n         "))
    }

    /// Runs one reconcile; `crash_after` steps cut it short (no status
    /// written). A step the API server would refuse ends it like an error.
    fn reconcile(&mut self, crash_after: Option<usize>) -> Result<usize, String> {
        let plan = plan(&self.observe());
        let phase = self.status.phase;
        let rollout = self.status.rollout.clone();
        let steps = plan.steps.len();
        for (i, step) in plan.steps.iter().enumerate() {
            if crash_after == Some(i) {
                self.trace
                    .push(format!("  crash after {i} of {steps} steps"));
                return Ok(steps);
            }
            if !self.apply(step, phase, rollout.as_ref())? {
                self.trace.push(format!("  {step:?} refused"));
                return Ok(steps);
            }
        }
        self.status = plan.status;
        Ok(steps)
    }

    fn color_of(&self, pod: &str) -> Option<Color> {
        [Color::Blue, Color::Green]
            .into_iter()
            .find(|color| self.color(*color).pods.iter().any(|p| p.name == pod))
    }

    /// Invariant 7: the Service's endpoints list none of `color`'s pods.
    fn check_no_traffic(&self, color: Color, what: &str) -> Result<(), String> {
        let listed = self
            .color(color)
            .pods
            .iter()
            .find(|p| self.endpoints.contains(&p.name));
        match listed {
            Some(pod) => Err(self.violation(format!(
                "invariant 7: {color} {what} while the Service's endpoints list {}",
                pod.name
            ))),
            None => Ok(()),
        }
    }

    /// Applies one step; `Ok(false)` when the API would refuse it.
    fn apply(
        &mut self,
        step: &Step,
        phase: Option<Phase>,
        rollout: Option<&RolloutProgress>,
    ) -> Result<bool, String> {
        match step {
            Step::ApplyDeployment {
                color,
                revision,
                replicas,
            } => {
                let mut disconnected = self.disconnected;
                let view = self.color_mut(*color);
                if view.deployment.as_ref().map(|(r, _)| r) != Some(revision) {
                    for pod in view.pods.drain(..) {
                        disconnected += pod.connections;
                    }
                }
                view.deployment = Some((revision.clone(), *replicas));
                view.resize(*color, *replicas, &mut disconnected);
                self.disconnected = disconnected;
            }
            Step::Scale { color, replicas } => {
                let other = self.color(color.other());
                if *replicas == 0 && self.color(*color).capable() && !other.capable() {
                    return Err(self.violation(format!(
                        "invariant 2: {color} scaled to zero while {} has no Ready pods",
                        color.other()
                    )));
                }
                if *replicas == 0 {
                    self.check_no_traffic(*color, "scaled to zero")?;
                }
                let mut disconnected = self.disconnected;
                let view = self.color_mut(*color);
                let Some(deployment) = view.deployment.as_mut() else {
                    return Ok(false);
                };
                deployment.1 = *replicas;
                view.resize(*color, *replicas, &mut disconnected);
                self.disconnected = disconnected;
            }
            Step::RouteService { color } => {
                // Re-applying the selector it has (once per spec generation)
                // points nothing anywhere.
                let moves = self.service != Some(*color);
                if moves && !self.color(*color).capable() && self.color(color.other()).capable() {
                    return Err(self.violation(format!(
                        "invariant 1: the Service sent to {color}, which has no Ready pods, while {} has",
                        color.other()
                    )));
                }
                if let (Some(Phase::Progressing), Some(r)) = (phase, rollout) {
                    let approved =
                        self.approval.is_some() && self.approval == rollout_key(&self.status);
                    if moves && *color == r.to_color && !self.policy.auto_promote && !approved {
                        return Err(self.violation(format!(
                            "invariant 4: switched to {color} without an approval of this rollout"
                        )));
                    }
                }
                self.service = Some(*color);
            }
            Step::RoutePreview { color } => self.preview = Some(*color),
            Step::StartDrain { pods, .. } => {
                let rollout = rollout_key(&self.status).unwrap_or_default();
                for target in pods {
                    if let Some(color) = self.color_of(&target.name) {
                        self.check_no_traffic(color, "told to drain")?;
                    }
                    let pod = self
                        .blue
                        .pods
                        .iter_mut()
                        .chain(self.green.pods.iter_mut())
                        .find(|p| p.name == target.name);
                    if let Some(pod) = pod.filter(|p| p.up) {
                        pod.draining = true;
                        let told = self
                            .drains
                            .entry((rollout.clone(), pod.name.clone(), pod.incarnation))
                            .or_default();
                        *told += 1;
                        if *told > 1 {
                            let name = pod.name.clone();
                            return Err(self.violation(format!(
                                "invariant 6: {name} told to drain twice in rollout {rollout}"
                            )));
                        }
                    }
                }
            }
            Step::CancelDrain { pods } => {
                for target in pods {
                    for pod in self.blue.pods.iter_mut().chain(self.green.pods.iter_mut()) {
                        if pod.name == target.name && pod.up {
                            pod.draining = false;
                        }
                    }
                }
            }
            Step::ClearAnnotation { key } => {
                if *key == ABORT_ANNOTATION {
                    self.abort = false;
                } else {
                    self.promote = false;
                    self.approval = None;
                }
            }
            Step::ApplyPodDisruptionBudget | Step::PruneConfigMaps { .. } | Step::Record(_) => {}
        }
        Ok(true)
    }

    /// Time passes: pods of sound colors come up, broken ones go down,
    /// draining pods lose connections, disconnected clients reconnect
    /// through the Service.
    fn tick(&mut self) {
        self.now += SignedDuration::from_secs(TICK);
        let mut moved = 0;
        for view in [&mut self.blue, &mut self.green] {
            let broken = view.broken;
            for pod in &mut view.pods {
                if broken && pod.up {
                    pod.up = false;
                    pod.draining = false;
                    moved += pod.connections;
                    pod.connections = 0;
                } else if !broken {
                    pod.up = true;
                }
                if pod.draining {
                    let leaving = pod.connections.min(2);
                    pod.connections -= leaving;
                    moved += leaving;
                }
            }
        }
        self.disconnected += moved;
        // Clients reconnect where the endpoints send them; then the
        // endpoints move a step closer to the Service's selector.
        let waiting = self.disconnected;
        let endpoints = self.endpoints.clone();
        let landed = self
            .blue
            .pods
            .iter_mut()
            .chain(self.green.pods.iter_mut())
            .find(|p| p.up && !p.draining && endpoints.contains(&p.name));
        if let Some(pod) = landed {
            pod.connections += waiting;
            self.disconnected = 0;
        }
        self.endpoints = std::mem::take(&mut self.endpoints_next);
        self.endpoints_next = match self.service {
            Some(color) => self
                .color(color)
                .pods
                .iter()
                .filter(|p| p.up && !p.draining && !self.color(color).broken)
                .map(|p| p.name.clone())
                .collect(),
            None => Vec::new(),
        };
    }

    fn disturb(&mut self, d: Disturbance) -> bool {
        let phase = self.status.phase;
        let rolling = matches!(
            phase,
            Some(Phase::Progressing | Phase::Switching | Phase::Draining)
        );
        match d {
            Disturbance::NewRevision => {
                if self.next_revision > 3 {
                    return false;
                }
                self.next_revision += 1;
                self.revision = format!("r{}", self.next_revision);
                self.abort_from = None;
            }
            Disturbance::Revert => {
                let Some(from) = self
                    .status
                    .rollout
                    .as_ref()
                    .map(|r| r.from_revision.clone())
                else {
                    return false;
                };
                if !rolling || self.revision == from {
                    return false;
                }
                self.revision = from;
                self.abort_from = None;
            }
            Disturbance::ToggleReplicas => self.replicas = 3 - self.replicas,
            Disturbance::Abort => {
                if self.abort {
                    return false;
                }
                self.abort = true;
                if rolling {
                    self.abort_from = self
                        .status
                        .rollout
                        .as_ref()
                        .map(|r| r.from_revision.clone());
                }
            }
            Disturbance::Promote => {
                if self.promote {
                    return false;
                }
                self.promote = true;
                self.approval = if phase == Some(Phase::Progressing) {
                    rollout_key(&self.status)
                } else {
                    None
                };
            }
            Disturbance::Break(color) => {
                if self.color(color).broken {
                    return false;
                }
                self.color_mut(color).broken = true;
            }
            Disturbance::Heal(color) => {
                if !self.color(color).broken {
                    return false;
                }
                self.color_mut(color).broken = false;
            }
            Disturbance::RestartPod(color) => {
                let view = self.color_mut(color);
                let Some(pod) = view.pods.first_mut() else {
                    return false;
                };
                pod.incarnation += 1;
                pod.up = false;
                pod.draining = false;
                let lost = std::mem::take(&mut pod.connections);
                self.disconnected += lost;
            }
            Disturbance::ScaleToZeroByHand(color) => {
                let mut disconnected = self.disconnected;
                let view = self.color_mut(color);
                match view.deployment.as_mut() {
                    Some(d) if d.1 > 0 => d.1 = 0,
                    _ => return false,
                }
                view.resize(color, 0, &mut disconnected);
                self.disconnected = disconnected;
            }
            Disturbance::LoseStatus => {
                if self.status == ConnectionServiceStatus::default() {
                    return false;
                }
                self.status = ConnectionServiceStatus::default();
                // The status was the only record of which rollout an abort
                // was for: the operator adopts the color the Service
                // selects, and invariant 3 has nothing left to hold it to.
                self.abort_from = None;
            }
        }
        self.trace.push(format!("{d:?} (phase {phase:?})"));
        true
    }

    /// With no more inputs: the resource settles, and invariant 3 holds.
    fn settle(&mut self, settled: &mut HashSet<String>) -> Result<(), String> {
        let mut seen = Vec::new();
        for _ in 0..SETTLE_ROUNDS {
            let k = key(self);
            if settled.contains(&k) {
                settled.extend(seen);
                return Ok(());
            }
            seen.push(k);
            self.trace.push("reconcile".into());
            self.reconcile(None)?;
            self.tick();
            let phase = self.status.phase;
            // Waiting for an approval nobody gives is a place to rest too.
            let waiting =
                phase == Some(Phase::Progressing)
                    && !self.policy.auto_promote
                    && !self.promote
                    && self.status.rollout.as_ref().is_some_and(|r| {
                        self.color(r.to_color).ready() && r.unready_since.is_none()
                    });
            // So is an undo waiting for an old color that cannot become
            // Ready: the Service stays on the color that serves.
            let stuck_undo = self.status.rollout.as_ref().is_some_and(|r| {
                r.aborting.is_some()
                    && self.color(r.from_color).broken
                    && self.service == Some(r.to_color)
            });
            let waiting = waiting || stuck_undo;
            let still = (waiting || matches!(phase, Some(Phase::Stable | Phase::Failed)))
                && plan(&self.observe())
                    .steps
                    .iter()
                    .all(|s| matches!(s, Step::Record(_)));
            if still {
                if waiting {
                    settled.extend(seen);
                    return Ok(());
                }
                if self.service != self.status.active_color {
                    return Err(self.violation(format!(
                        "invariant 5: settled with the Service on {:?}, active {:?}",
                        self.service, self.status.active_color
                    )));
                }
                if let Some(from) = &self.abort_from {
                    let active = self.status.active_color.unwrap_or(Color::Blue);
                    let serving = self.status.active_revision.as_ref() == Some(from)
                        && self.color(active).deployment.as_ref().map(|(r, _)| r) == Some(from);
                    if !serving {
                        return Err(self.violation(format!(
                            "invariant 3: aborted, but {active} serves {:?}, not {from}",
                            self.status.active_revision
                        )));
                    }
                }
                settled.extend(seen);
                return Ok(());
            }
        }
        Err(self.violation(format!(
            "invariant 5: not settled after {SETTLE_ROUNDS} reconciles: phase {:?}",
            self.status.phase
        )))
    }
}

struct Explorer {
    visited: HashSet<String>,
    settled: HashSet<String>,
    states: usize,
}

impl Explorer {
    fn explore(&mut self, w: World, rounds: u32, disturbances: u32, crashes: u32) {
        if !self
            .visited
            .insert(format!("{rounds}/{disturbances}/{crashes}/{}", key(&w)))
        {
            return;
        }
        self.states += 1;
        if rounds == 0 {
            let mut end = w;
            if let Err(violation) = end.settle(&mut self.settled) {
                panic!("{violation}");
            }
            return;
        }
        let mut starts = vec![(w.clone(), disturbances)];
        if disturbances > 0 {
            for d in DISTURBANCES {
                let mut next = w.clone();
                if next.disturb(d) {
                    starts.push((next, disturbances - 1));
                }
            }
        }
        for (start, left) in starts {
            let steps = plan(&start.observe()).steps.len();
            let crash_points: Vec<Option<usize>> = if crashes > 0 {
                std::iter::once(None).chain((0..steps).map(Some)).collect()
            } else {
                vec![None]
            };
            for crash in crash_points {
                let mut next = start.clone();
                next.trace.push(match crash {
                    None => "reconcile".into(),
                    Some(_) => "reconcile (crashing)".into(),
                });
                if let Err(violation) = next.reconcile(crash) {
                    panic!("{violation}");
                }
                next.tick();
                let crashes = crashes - u32::from(crash.is_some());
                self.explore(next, rounds - 1, left, crashes);
            }
        }
    }
}

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(format!("SWITCHYARD_EXPLORE_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_bounded_sequence_keeps_the_invariants() {
    let rounds = setting("ROUNDS", 6);
    let disturbances = setting("DISTURBANCES", 2);
    let crashes = setting("CRASHES", 2);
    for auto_promote in [false, true] {
        let mut start = World::start();
        start.policy.auto_promote = auto_promote;
        let mut explorer = Explorer {
            visited: HashSet::new(),
            settled: HashSet::new(),
            states: 0,
        };
        explorer.explore(start, rounds, disturbances, crashes);
        println!(
            "rollout explorer (autoPromote {auto_promote}): {rounds} rounds, {disturbances} disturbances, \
             {crashes} crashes: {} states explored, {} settled states",
            explorer.states,
            explorer.settled.len()
        );
    }
}
