//! Tables for the rollout state machine, and a simulated cluster that replays
//! whole rollouts, with the operator "restarting" between any two steps.

use super::*;
use crate::crd::DrainModeSetting;

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp")
}

fn pod(name: &str, ip: &str, connections: u64, draining: bool) -> PodView {
    PodView {
        name: name.to_string(),
        ip: Some(ip.to_string()),
        report: Some(GatewayReport {
            connections,
            draining,
        }),
    }
}

fn deployment(revision: &str, replicas: i32, ready: bool) -> Option<DeploymentView> {
    Some(DeploymentView {
        revision: revision.to_string(),
        replicas,
        ready,
    })
}

fn target(name: &str, ip: &str) -> PodTarget {
    PodTarget {
        name: name.to_string(),
        ip: ip.to_string(),
    }
}

/// Stable on blue at r1 with two pods holding 5 connections each.
fn stable() -> Observed {
    Observed {
        now: t(0),
        generation: Some(1),
        revision: "r1".to_string(),
        replicas: 2,
        policy: RolloutPolicy::default(),
        status: ConnectionServiceStatus {
            phase: Some(Phase::Stable),
            active_color: Some(Color::Blue),
            active_revision: Some("r1".to_string()),
            ..ConnectionServiceStatus::default()
        },
        blue: ColorView {
            deployment: deployment("r1", 2, true),
            pods: vec![
                pod("b-1", "10.0.0.1", 5, false),
                pod("b-2", "10.0.0.2", 5, false),
            ],
        },
        green: ColorView::default(),
        service_color: Some(Color::Blue),
        preview_color: Some(Color::Blue),
        promote: false,
        abort: false,
    }
}

fn rollout(phase_since: i64) -> RolloutProgress {
    RolloutProgress {
        from_color: Color::Blue,
        from_revision: "r1".to_string(),
        to_color: Color::Green,
        to_revision: "r2".to_string(),
        started: Time(t(0)),
        phase_since: Time(t(phase_since)),
        drain_started: None,
        drained_at: None,
        total: 0,
        drained: 0,
        remaining: 0,
    }
}

/// Progressing from blue r1 to green r2, started at t=0; green not Ready.
fn progressing() -> Observed {
    let mut o = stable();
    o.revision = "r2".to_string();
    o.status.phase = Some(Phase::Progressing);
    o.status.rollout = Some(rollout(0));
    o.green.deployment = deployment("r2", 2, false);
    o.preview_color = Some(Color::Green);
    o.now = t(10);
    o
}

/// Switching: the Service was told to select green at t=20.
fn switching() -> Observed {
    let mut o = progressing();
    o.green.deployment = deployment("r2", 2, true);
    o.green.pods = vec![pod("g-1", "10.0.1.1", 0, false)];
    o.status.phase = Some(Phase::Switching);
    o.status.active_color = Some(Color::Green);
    o.status.active_revision = Some("r2".to_string());
    o.status.rollout = Some(rollout(20));
    o.service_color = Some(Color::Green);
    o.now = t(21);
    o
}

/// Draining since t=21 with 10 connections at the start; both blue pods draining.
fn draining(b1: u64, b2: u64) -> Observed {
    let mut o = switching();
    o.status.phase = Some(Phase::Draining);
    let mut r = rollout(21);
    r.drain_started = Some(Time(t(21)));
    r.total = 10;
    r.remaining = 10;
    o.status.rollout = Some(r);
    o.blue.pods = vec![
        pod("b-1", "10.0.0.1", b1, true),
        pod("b-2", "10.0.0.2", b2, true),
    ];
    o.now = t(30);
    o
}

fn events(plan: &Plan) -> Vec<&'static str> {
    plan.steps
        .iter()
        .filter_map(|step| match step {
            Step::Record(notice) => Some(notice.reason),
            _ => None,
        })
        .collect()
}

fn actions(plan: &Plan) -> Vec<Step> {
    plan.steps
        .iter()
        .filter(|step| !matches!(step, Step::Record(_)))
        .cloned()
        .collect()
}

fn drain_request(rate: u64) -> DrainRequest {
    DrainRequest {
        window_ms: 60_000,
        max_rate: rate,
        deadline_ms: 300_000,
        mode: DrainModeSetting::MakeBeforeBreak.into(),
        retry_jitter_ms: 2000,
        migrate_grace_ms: Some(5000),
    }
}

fn condition<'a>(plan: &'a Plan, type_: &str) -> &'a Condition {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .expect("condition")
}

struct Case {
    name: &'static str,
    observed: Observed,
    steps: Vec<Step>,
    events: Vec<&'static str>,
    phase: Phase,
    active: Color,
}

fn check(case: Case) -> Plan {
    let plan = plan(&case.observed);
    assert_eq!(actions(&plan), case.steps, "{}: steps", case.name);
    assert_eq!(events(&plan), case.events, "{}: events", case.name);
    assert_eq!(plan.status.phase, Some(case.phase), "{}: phase", case.name);
    assert_eq!(
        plan.status.active_color,
        Some(case.active),
        "{}: active color",
        case.name
    );
    plan
}

#[test]
fn transitions() {
    use Color::{Blue, Green};
    let mut install = stable();
    install.status = ConnectionServiceStatus::default();
    install.blue = ColorView::default();
    install.service_color = None;
    install.preview_color = None;

    let mut adopt = stable();
    adopt.status = ConnectionServiceStatus::default();
    adopt.blue = ColorView::default();
    adopt.green = ColorView {
        deployment: deployment("r0", 2, true),
        pods: vec![],
    };
    adopt.service_color = Some(Green);
    adopt.preview_color = Some(Green);

    let mut scaled = stable();
    scaled.replicas = 3;

    let mut leftover = stable();
    leftover.green.deployment = deployment("r0", 2, true);

    let mut changed = stable();
    changed.revision = "r2".to_string();

    let mut ready = progressing();
    ready.green.deployment = deployment("r2", 2, true);

    let mut manual = ready.clone();
    manual.policy.auto_promote = false;
    let mut promoted = manual.clone();
    promoted.promote = true;

    let mut timeout = progressing();
    timeout.now = t(300);

    let mut reverted = progressing();
    reverted.revision = "r1".to_string();

    let mut retarget = progressing();
    retarget.revision = "r3".to_string();

    let mut unswitched = switching();
    unswitched.service_color = Some(Blue);

    let mut restarted_pod = draining(3, 0);
    restarted_pod.blue.pods[1] = pod("b-2", "10.0.0.2", 2, false);
    let mut finished_pod = draining(3, 0);
    finished_pod.blue.pods[1] = pod("b-2", "10.0.0.2", 0, false);

    let mut unreachable = draining(0, 0);
    unreachable.blue.pods[1].report = None;

    let mut past_deadline = draining(4, 0);
    past_deadline.now = t(21 + 300);

    let mut delayed = draining(0, 0);
    if let Some(r) = delayed.status.rollout.as_mut() {
        r.drained_at = Some(Time(t(25)));
    }
    delayed.now = t(54);
    let mut scale_down = delayed.clone();
    scale_down.now = t(55);

    let mut failed = progressing();
    failed.status.phase = Some(Phase::Failed);
    failed.status.failed_revision = Some("r2".to_string());
    failed.green.deployment = deployment("r2", 0, false);
    failed.preview_color = Some(Blue);
    let mut failed_then_new = failed.clone();
    failed_then_new.revision = "r3".to_string();
    let mut failed_then_reverted = failed.clone();
    failed_then_reverted.revision = "r1".to_string();

    let mut abort_stable = stable();
    abort_stable.abort = true;
    let mut abort_progressing = progressing();
    abort_progressing.abort = true;
    let mut abort_switching = switching();
    abort_switching.abort = true;
    let mut abort_draining = draining(2, 1);
    abort_draining.abort = true;

    let blue_pods = vec![target("b-1", "10.0.0.1"), target("b-2", "10.0.0.2")];
    let cases = vec![
        Case {
            name: "first install",
            observed: install,
            steps: vec![
                Step::ApplyDeployment {
                    color: Blue,
                    revision: "r1".into(),
                    replicas: 2,
                },
                Step::RouteService { color: Blue },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["Installed"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "status lost: adopt the Service's color, then roll out",
            observed: adopt,
            steps: vec![
                Step::ApplyDeployment {
                    color: Blue,
                    revision: "r1".into(),
                    replicas: 2,
                },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["Adopted", "RolloutStarted"],
            phase: Phase::Progressing,
            active: Green,
        },
        Case {
            name: "stable, nothing to do",
            observed: stable(),
            steps: vec![],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "replicas changed: scale in place, no rollout",
            observed: scaled,
            steps: vec![Step::Scale {
                color: Blue,
                replicas: 3,
            }],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "idle color left running",
            observed: leftover,
            steps: vec![Step::Scale {
                color: Green,
                replicas: 0,
            }],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "spec changed: the other color scales up",
            observed: changed,
            steps: vec![
                Step::ApplyDeployment {
                    color: Green,
                    revision: "r2".into(),
                    replicas: 2,
                },
                Step::RoutePreview { color: Green },
            ],
            events: vec!["RolloutStarted"],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "progressing, not ready yet",
            observed: progressing(),
            steps: vec![],
            events: vec![],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "ready and auto-promoted: switch",
            observed: ready,
            steps: vec![Step::RouteService { color: Green }],
            events: vec!["Switched"],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "ready, waiting for promotion",
            observed: manual,
            steps: vec![],
            events: vec![],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "ready and promoted by annotation",
            observed: promoted,
            steps: vec![
                Step::ClearAnnotation {
                    key: PROMOTE_ANNOTATION,
                },
                Step::RouteService { color: Green },
            ],
            events: vec!["Switched"],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "ready timeout",
            observed: timeout,
            steps: vec![
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["ReadyTimeout"],
            phase: Phase::Failed,
            active: Blue,
        },
        Case {
            name: "spec reverted while progressing",
            observed: reverted,
            steps: vec![
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["RolloutCancelled"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "spec changed again while progressing",
            observed: retarget,
            steps: vec![Step::ApplyDeployment {
                color: Green,
                revision: "r3".into(),
                replicas: 2,
            }],
            events: vec!["RolloutRetargeted"],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "switching, Service not seen on green yet",
            observed: unswitched,
            steps: vec![Step::RouteService { color: Green }],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "switching done: every old pod drains with its share of the rate",
            observed: switching(),
            steps: vec![Step::StartDrain {
                pods: blue_pods.clone(),
                request: drain_request(50),
            }],
            events: vec!["DrainStarted"],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "draining, connections left",
            observed: draining(3, 0),
            steps: vec![],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "draining, a restarted old pod is told to drain",
            observed: restarted_pod,
            steps: vec![Step::StartDrain {
                pods: vec![target("b-2", "10.0.0.2")],
                request: drain_request(50),
            }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "draining, a pod whose drain finished is not told again",
            observed: finished_pod,
            steps: vec![],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "draining, an unreachable pod is not counted as empty",
            observed: unreachable,
            steps: vec![],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "drained: wait out scaleDownDelay",
            observed: draining(0, 0),
            steps: vec![],
            events: vec!["Drained"],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "deadline passed with connections left",
            observed: past_deadline,
            steps: vec![],
            events: vec!["Drained"],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "one second before the scale-down",
            observed: delayed,
            steps: vec![],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "scale-down: old color to zero, rollout complete",
            observed: scale_down,
            steps: vec![
                Step::Scale {
                    color: Blue,
                    replicas: 0,
                },
                Step::RoutePreview { color: Green },
                Step::PruneConfigMaps {
                    keep: vec!["r2".into()],
                },
            ],
            events: vec!["RolloutComplete"],
            phase: Phase::Stable,
            active: Green,
        },
        Case {
            name: "failed stays failed for the same spec",
            observed: failed,
            steps: vec![],
            events: vec![],
            phase: Phase::Failed,
            active: Blue,
        },
        Case {
            name: "failed, then a new spec: new rollout",
            observed: failed_then_new,
            steps: vec![
                Step::ApplyDeployment {
                    color: Green,
                    revision: "r3".into(),
                    replicas: 2,
                },
                Step::RoutePreview { color: Green },
            ],
            events: vec!["RolloutStarted"],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "failed, then the spec reverted",
            observed: failed_then_reverted,
            steps: vec![],
            events: vec!["RolloutCancelled"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while stable: only the annotation goes",
            observed: abort_stable,
            steps: vec![Step::ClearAnnotation {
                key: ABORT_ANNOTATION,
            }],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while progressing",
            observed: abort_progressing,
            steps: vec![
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
                Step::ClearAnnotation {
                    key: ABORT_ANNOTATION,
                },
            ],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while switching",
            observed: abort_switching,
            steps: vec![
                Step::RouteService { color: Blue },
                Step::CancelDrain {
                    pods: blue_pods.clone(),
                },
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
                Step::ClearAnnotation {
                    key: ABORT_ANNOTATION,
                },
            ],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while draining",
            observed: abort_draining,
            steps: vec![
                Step::RouteService { color: Blue },
                Step::CancelDrain {
                    pods: blue_pods.clone(),
                },
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
                Step::ClearAnnotation {
                    key: ABORT_ANNOTATION,
                },
            ],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
    ];
    for case in cases {
        check(case);
    }
}

#[test]
fn status_details() {
    let aborted = plan(&{
        let mut o = draining(2, 1);
        o.abort = true;
        o
    });
    assert_eq!(aborted.status.active_revision.as_deref(), Some("r1"));
    assert_eq!(aborted.status.failed_revision.as_deref(), Some("r2"));
    assert_eq!(aborted.finished.map(|(o, _)| o), Some(Outcome::Aborted));

    let progress = plan(&draining(3, 0));
    let r = progress.status.rollout.as_ref().expect("rollout");
    assert_eq!((r.total, r.drained, r.remaining), (10, 7, 3));
    assert_eq!(progress.status.connections.blue, 3);
    assert_eq!(progress.requeue, DRAIN_POLL);
    assert_eq!(
        progress.status.message.as_deref(),
        Some("draining blue: 7 of 10 connections moved, 3 remain")
    );
    assert_eq!(condition(&progress, "Progressing").status, "True");
    assert_eq!(condition(&progress, "Progressing").reason, "Draining");

    let started = plan(&switching());
    let r = started.status.rollout.as_ref().expect("rollout");
    assert_eq!((r.total, r.remaining), (10, 10));
    assert_eq!(r.drain_started, Some(Time(t(21))));

    let done = plan(&{
        let mut o = draining(0, 0);
        if let Some(r) = o.status.rollout.as_mut() {
            r.drained_at = Some(Time(t(25)));
        }
        o.now = t(100);
        o
    });
    assert_eq!(
        done.finished,
        Some((Outcome::Completed, Duration::from_secs(100)))
    );
    assert_eq!(condition(&done, "Progressing").status, "False");

    let failed = plan(&{
        let mut o = progressing();
        o.now = t(300);
        o
    });
    assert_eq!(failed.status.failed_revision.as_deref(), Some("r2"));
    assert_eq!(condition(&failed, "Degraded").status, "True");
    assert_eq!(condition(&failed, "Degraded").reason, "RolloutFailed");
    assert_eq!(
        condition(&failed, "Ready").status,
        "True",
        "blue still serves"
    );

    // The ready timeout runs from the phase start and bounds the requeue.
    let mut near = progressing();
    near.now = t(299) + SignedDuration::from_millis(500);
    assert_eq!(plan(&near).requeue, Duration::from_millis(500));

    // A per-pod share never rounds to zero.
    let mut crowded = switching();
    crowded.policy.drain.max_rate = 1;
    match &actions(&plan(&crowded))[0] {
        Step::StartDrain { request, .. } => assert_eq!(request.max_rate, 1),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn condition_transition_times_move_only_when_the_status_flips() {
    let first = plan(&stable());
    let ready_since = condition(&first, "Ready").last_transition_time.clone();
    let mut later = stable();
    later.status = first.status.clone();
    later.now = t(50);
    let second = plan(&later);
    assert_eq!(
        condition(&second, "Ready").last_transition_time,
        ready_since
    );
    later.status = second.status.clone();
    later.blue.deployment = deployment("r1", 2, false);
    later.now = t(60);
    let third = plan(&later);
    assert_eq!(condition(&third, "Ready").status, "False");
    assert_eq!(condition(&third, "Ready").last_transition_time, Time(t(60)));
}

/// A cluster the plans act on: Deployments become Ready when asked to,
/// Services switch, gateways drain and lose their connections.
struct Sim {
    o: Observed,
    drains_sent: Vec<String>,
    phases: Vec<Phase>,
}

impl Sim {
    fn color_mut(&mut self, color: Color) -> &mut ColorView {
        match color {
            Color::Blue => &mut self.o.blue,
            Color::Green => &mut self.o.green,
        }
    }

    /// Applies a plan's steps; writes its status unless the operator "crashed" first.
    fn apply(&mut self, plan: &Plan, write_status: bool) {
        for step in &plan.steps {
            match step {
                Step::ApplyDeployment {
                    color,
                    revision,
                    replicas,
                } => {
                    let prefix = if *color == Color::Blue { "b" } else { "g" };
                    let view = self.color_mut(*color);
                    view.deployment = deployment(revision, *replicas, false);
                    view.pods = (1..=*replicas)
                        .map(|i| pod(&format!("{prefix}-{i}"), &format!("10.{i}"), 0, false))
                        .collect();
                }
                Step::Scale { color, replicas } => {
                    let view = self.color_mut(*color);
                    if let Some(d) = view.deployment.as_mut() {
                        d.replicas = *replicas;
                    }
                    if *replicas == 0 {
                        view.pods.clear();
                    }
                }
                Step::RouteService { color } => self.o.service_color = Some(*color),
                Step::RoutePreview { color } => self.o.preview_color = Some(*color),
                Step::StartDrain { pods, .. } => {
                    for target in pods {
                        self.drains_sent.push(target.name.clone());
                        for view in [&mut self.o.blue, &mut self.o.green] {
                            for pod in view.pods.iter_mut().filter(|p| p.name == target.name) {
                                if let Some(report) = pod.report.as_mut() {
                                    report.draining = true;
                                }
                            }
                        }
                    }
                }
                Step::CancelDrain { .. }
                | Step::ClearAnnotation { .. }
                | Step::PruneConfigMaps { .. }
                | Step::Record(_) => {}
            }
        }
        if write_status {
            self.o.status = plan.status.clone();
            if let Some(phase) = plan.status.phase {
                if self.phases.last() != Some(&phase) {
                    self.phases.push(phase);
                }
            }
        }
    }

    /// One second passes: the new color becomes Ready, draining pods lose a connection.
    fn tick(&mut self) {
        self.o.now += SignedDuration::from_secs(1);
        for view in [&mut self.o.blue, &mut self.o.green] {
            if let Some(d) = view.deployment.as_mut() {
                d.ready = d.replicas > 0;
            }
            for pod in &mut view.pods {
                if let Some(report) = pod.report.as_mut() {
                    if report.draining {
                        report.connections = report.connections.saturating_sub(2);
                    }
                }
            }
        }
    }
}

/// Runs a rollout from r1 to r2, "crashing" the operator (no status write)
/// on the reconcile numbers in `crashes`.
fn run_rollout(crashes: &[usize]) -> Sim {
    let mut o = stable();
    o.status = plan(&o).status;
    o.revision = "r2".to_string();
    o.policy.scale_down_delay_seconds = 3;
    let mut sim = Sim {
        o,
        drains_sent: Vec::new(),
        phases: vec![Phase::Stable],
    };
    for round in 0..200 {
        let plan = plan(&sim.o);
        sim.apply(&plan, !crashes.contains(&round));
        if sim.o.status.phase == Some(Phase::Stable)
            && sim.o.status.active_color == Some(Color::Green)
        {
            return sim;
        }
        sim.tick();
    }
    panic!("rollout did not finish: {:?}", sim.phases);
}

#[test]
fn whole_rollout_in_a_simulated_cluster() {
    let sim = run_rollout(&[]);
    assert_eq!(
        sim.phases,
        vec![
            Phase::Stable,
            Phase::Progressing,
            Phase::Switching,
            Phase::Draining,
            Phase::Stable
        ]
    );
    assert_eq!(sim.drains_sent, vec!["b-1", "b-2"]);
    assert_eq!(sim.o.blue.deployment.as_ref().map(|d| d.replicas), Some(0));
    assert_eq!(sim.o.service_color, Some(Color::Green));
    assert_eq!(sim.o.status.active_revision.as_deref(), Some("r2"));
}

#[test]
fn a_restart_in_any_phase_finishes_the_same_rollout() {
    // Crash (steps applied, status not written) on every reconcile number in
    // turn: the next reconcile works from the cluster and the older status,
    // repeats only idempotent steps, and never drains a pod twice.
    let clean = run_rollout(&[]);
    for crash in 0..12 {
        let sim = run_rollout(&[crash]);
        assert_eq!(sim.phases, clean.phases, "crash at reconcile {crash}");
        assert_eq!(
            sim.drains_sent, clean.drains_sent,
            "crash at reconcile {crash}"
        );
        assert_eq!(sim.o.service_color, Some(Color::Green));
        assert_eq!(sim.o.blue.deployment.as_ref().map(|d| d.replicas), Some(0));
    }
}
