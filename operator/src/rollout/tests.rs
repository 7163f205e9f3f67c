//! Tables for the rollout state machine, and a simulated cluster that replays
//! whole rollouts, with the operator "restarting" between any two steps.

use super::*;
use crate::crd::DrainModeSetting;
use std::collections::BTreeMap;

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
        waiting: None,
        restarts: 0,
        last_exit: None,
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
        // No settle time, so a table row shows the drain start as soon as
        // the endpoints moved; the settle has rows of its own.
        policy: RolloutPolicy {
            traffic_settle_seconds: 0,
            ..RolloutPolicy::default()
        },
        status: ConnectionServiceStatus {
            phase: Some(Phase::Stable),
            active_color: Some(Color::Blue),
            active_revision: Some("r1".to_string()),
            observed_generation: Some(1),
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
        endpoints: vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()],
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
        unready_since: Some(Time(t(0))),
        aborting: None,
        traffic_moved: None,
        traffic_waiting_since: None,
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
    let mut r = rollout(20);
    r.unready_since = None;
    o.status.rollout = Some(r);
    o.service_color = Some(Color::Green);
    o.endpoints = vec!["10.0.1.1".to_string()];
    o.now = t(21);
    o
}

/// Draining since t=21 with 10 connections at the start; both blue pods draining.
fn draining(b1: u64, b2: u64) -> Observed {
    let mut o = switching();
    o.status.phase = Some(Phase::Draining);
    let mut r = rollout(21);
    r.unready_since = None;
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

    let mut abort_lifted = draining(0, 0);
    abort_lifted.abort = true;
    abort_lifted.blue.pods = vec![
        pod("b-1", "10.0.0.1", 0, false),
        pod("b-2", "10.0.0.2", 0, false),
    ];
    abort_lifted.green.pods = vec![pod("g-1", "10.0.1.1", 10, false)];
    let back_on_blue = |mut o: Observed| {
        o.service_color = Some(Blue);
        o.endpoints = vec!["10.0.0.1".into(), "10.0.0.2".into()];
        o
    };
    let abort_switching_routed = back_on_blue(abort_switching.clone());
    let abort_lifted_routed = back_on_blue(abort_lifted.clone());
    let mut endpoints_lag = switching();
    endpoints_lag.endpoints = vec!["10.0.0.1".into(), "10.0.0.2".into()];
    let mut endpoints_mixed = switching();
    endpoints_mixed.endpoints = vec!["10.0.0.2".into(), "10.0.1.1".into()];
    let mut settling = switching();
    settling.policy.traffic_settle_seconds = 2;
    let mut settled = settling.clone();
    if let Some(r) = settled.status.rollout.as_mut() {
        r.traffic_moved = Some(Time(t(19)));
    }
    let mut endpoints_stuck = endpoints_lag.clone();
    if let Some(r) = endpoints_stuck.status.rollout.as_mut() {
        r.traffic_waiting_since = Some(Time(t(21)));
    }
    endpoints_stuck.now = t(21 + 300);
    let mut abort_blue_gone = draining(0, 0);
    abort_blue_gone.abort = true;
    abort_blue_gone.blue = ColorView {
        deployment: deployment("r1", 0, false),
        pods: vec![],
    };
    let mut undo_without_annotation = draining(2, 1);
    if let Some(r) = undo_without_annotation.status.rollout.as_mut() {
        r.aborting = Some(AbortReason::Aborted);
    }
    let mut draining_unrouted = draining(2, 1);
    draining_unrouted.service_color = Some(Blue);
    let mut green_unready = draining(3, 0);
    green_unready.blue.pods[1] = pod("b-2", "10.0.0.2", 2, false);
    green_unready.green.deployment = deployment("r2", 2, false);
    green_unready.now = t(30);
    let mut green_unready_too_long = green_unready.clone();
    green_unready_too_long.blue.pods[1] = pod("b-2", "10.0.0.2", 2, true);
    if let Some(r) = green_unready_too_long.status.rollout.as_mut() {
        r.unready_since = Some(Time(t(30)));
    }
    green_unready_too_long.now = t(30 + 300);
    let mut switching_unready = switching();
    switching_unready.green.deployment = deployment("r2", 2, false);
    let mut reverted_draining = draining(2, 1);
    reverted_draining.revision = "r1".to_string();
    let mut reverted_lifted = abort_lifted_routed.clone();
    reverted_lifted.abort = false;
    reverted_lifted.revision = "r1".to_string();
    let mut promote_stable = stable();
    promote_stable.promote = true;
    let mut promote_with_change = changed.clone();
    promote_with_change.promote = true;
    let mut abort_with_change = changed.clone();
    abort_with_change.abort = true;
    let mut switched_unrecorded = ready.clone();
    switched_unrecorded.service_color = Some(Green);
    let mut blip_while_waiting = manual.clone();
    blip_while_waiting.green.deployment = deployment("r2", 2, false);
    if let Some(r) = blip_while_waiting.status.rollout.as_mut() {
        r.unready_since = None;
    }
    blip_while_waiting.now = t(300);
    let mut raised_mid_rollout = ready.clone();
    raised_mid_rollout.replicas = 3;
    let mut serving_scaled_away = progressing();
    serving_scaled_away.blue.deployment = deployment("r1", 0, false);
    let mut stable_drained = stable();
    for pod in &mut stable_drained.blue.pods {
        if let Some(report) = pod.report.as_mut() {
            report.draining = true;
        }
    }
    let mut lost_mid_progress = progressing();
    lost_mid_progress.status = ConnectionServiceStatus::default();
    lost_mid_progress.service_color = Some(Blue);

    // Found by the explorer (rollout/explore.rs), kept as rows.
    let mut promoted_then_retargeted = promoted.clone();
    promoted_then_retargeted.revision = "r3".to_string();
    let mut reverted_old_broken = ready.clone();
    reverted_old_broken.revision = "r1".to_string();
    reverted_old_broken.blue.deployment = deployment("r1", 2, false);
    for pod in &mut reverted_old_broken.blue.pods {
        pod.report = None;
    }
    let mut switched_then_new_spec = switched_unrecorded.clone();
    switched_then_new_spec.revision = "r3".to_string();
    let mut undo_routed_old_restarting = draining(0, 0);
    if let Some(r) = undo_routed_old_restarting.status.rollout.as_mut() {
        r.aborting = Some(AbortReason::Aborted);
    }
    undo_routed_old_restarting.service_color = Some(Blue);
    undo_routed_old_restarting.endpoints = vec!["10.0.0.1".into(), "10.0.0.2".into()];
    undo_routed_old_restarting.blue.deployment = deployment("r1", 2, false);
    for pod in &mut undo_routed_old_restarting.blue.pods {
        pod.report = None;
    }
    let mut idle_drained_active_broken = stable();
    idle_drained_active_broken.blue.deployment = deployment("r1", 2, false);
    for pod in &mut idle_drained_active_broken.blue.pods {
        pod.report = None;
    }
    idle_drained_active_broken.green = ColorView {
        deployment: deployment("r0", 1, false),
        pods: vec![pod("g-1", "10.0.1.1", 0, true)],
    };

    let mut new_generation = stable();
    new_generation.generation = Some(2);

    let blue_pods = vec![target("b-1", "10.0.0.1"), target("b-2", "10.0.0.2")];
    let cases = vec![
        Case {
            name: "a new spec generation re-applies the PDB and the Service (at the color it selects)",
            observed: new_generation,
            steps: vec![
                Step::ApplyPodDisruptionBudget,
                Step::RouteService { color: Blue },
            ],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "explorer: a promote given before a retarget does not approve the newer revision",
            observed: promoted_then_retargeted,
            steps: vec![
                Step::ClearAnnotation {
                    key: PROMOTE_ANNOTATION,
                },
                Step::ApplyDeployment {
                    color: Green,
                    revision: "r3".into(),
                    replicas: 2,
                },
            ],
            events: vec!["RolloutRetargeted"],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "explorer: reverted before the switch while blue cannot serve: green is kept",
            observed: reverted_old_broken,
            steps: vec![Step::RoutePreview { color: Blue }],
            events: vec!["RolloutCancelled"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "explorer: a recorded-lost switch and a newer spec: on to Switching, no retarget under traffic",
            observed: switched_then_new_spec,
            steps: vec![],
            events: vec!["Switched"],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "explorer: an undo whose route back was made before a crash finishes without routing again",
            observed: undo_routed_old_restarting,
            steps: vec![Step::RoutePreview { color: Blue }],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "explorer: the idle color is not scaled down while the active one cannot serve",
            observed: idle_drained_active_broken,
            steps: vec![],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "first install",
            observed: install,
            steps: vec![
                Step::ApplyPodDisruptionBudget,
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
                Step::ApplyPodDisruptionBudget,
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
            // The annotation stays until the rollout ends (Stable clears it).
            steps: vec![Step::RouteService { color: Green }],
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
            name: "switching: the Service selects green, its EndpointSlices still list blue: no drain",
            observed: endpoints_lag,
            steps: vec![],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "switching: one blue endpoint left beside green's: no drain",
            observed: endpoints_mixed,
            steps: vec![],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "switching: endpoints all green, the settle time starts: no drain",
            observed: settling,
            steps: vec![],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "switching: settled, the old pods drain",
            observed: settled,
            steps: vec![Step::StartDrain {
                pods: blue_pods.clone(),
                request: drain_request(50),
            }],
            events: vec!["DrainStarted"],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "switching: endpoints that never follow end the wait at the ready timeout, with a Warning",
            observed: endpoints_stuck,
            steps: vec![Step::StartDrain {
                pods: blue_pods.clone(),
                request: drain_request(50),
            }],
            events: vec!["EndpointsNotMoved", "DrainStarted"],
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
            ],
            // The annotation is cleared once the status says Stable.
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while switching: blue is Ready and not draining, so the Service goes back at once",
            observed: abort_switching,
            steps: vec![Step::RouteService { color: Blue }],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "undo: once the endpoints are back on blue, green is scaled to zero",
            observed: abort_switching_routed,
            steps: vec![
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort while draining: cancel blue's drains, the Service stays until blue is Ready",
            observed: abort_draining,
            steps: vec![Step::CancelDrain {
                pods: blue_pods.clone(),
            }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "abort while draining, blue Ready again: the Service goes back",
            observed: abort_lifted,
            steps: vec![Step::RouteService { color: Blue }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "undo: endpoints back on blue, green drains at the policy's pace",
            observed: abort_lifted_routed,
            steps: vec![
                Step::StartDrain {
                    pods: vec![target("g-1", "10.0.1.1")],
                    request: drain_request(100),
                },
                Step::Scale {
                    color: Green,
                    replicas: 0,
                },
                Step::RoutePreview { color: Blue },
            ],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "abort after blue was scaled to zero: blue's replicas first",
            observed: abort_blue_gone,
            steps: vec![Step::Scale {
                color: Blue,
                replicas: 2,
            }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "an undo in progress goes on without the annotation (cleared, or the operator restarted)",
            observed: undo_without_annotation,
            steps: vec![Step::CancelDrain {
                pods: blue_pods.clone(),
            }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "draining while the Service selects blue: route to green, hold",
            observed: draining_unrouted,
            steps: vec![Step::RouteService { color: Green }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "green unready while draining: hold (no drain for a restarted pod, no scale-down)",
            observed: green_unready,
            steps: vec![],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "green unready past the ready timeout: roll back (blue's drains cancelled first)",
            observed: green_unready_too_long,
            steps: vec![Step::CancelDrain {
                pods: blue_pods.clone(),
            }],
            events: vec!["NewColorUnready"],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "green unready before the drains start: hold in Switching",
            observed: switching_unready,
            steps: vec![],
            events: vec![],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "spec reverted while draining: an undo, not a new rollout",
            observed: reverted_draining,
            steps: vec![Step::CancelDrain {
                pods: blue_pods.clone(),
            }],
            events: vec![],
            phase: Phase::Draining,
            active: Green,
        },
        Case {
            name: "spec reverted, back on blue and its endpoints: cancelled, no failed revision",
            observed: reverted_lifted,
            steps: vec![
                Step::StartDrain {
                    pods: vec![target("g-1", "10.0.1.1")],
                    request: drain_request(100),
                },
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
            name: "a promote left while stable is cleared, not kept for the next rollout",
            observed: promote_stable,
            steps: vec![Step::ClearAnnotation {
                key: PROMOTE_ANNOTATION,
            }],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "a promote left with a new spec: cleared before the rollout starts",
            observed: promote_with_change,
            steps: vec![
                Step::ClearAnnotation {
                    key: PROMOTE_ANNOTATION,
                },
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
            name: "an abort seen with a new spec while stable aborts that rollout (cleared next time)",
            observed: abort_with_change,
            steps: vec![],
            events: vec!["RolloutAborted"],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "progressing while the Service already selects green: the switch was made",
            observed: switched_unrecorded,
            steps: vec![],
            events: vec!["Switched"],
            phase: Phase::Switching,
            active: Green,
        },
        Case {
            name: "waiting for approval, a readiness blip past the start's timeout: the clock starts now",
            observed: blip_while_waiting,
            steps: vec![],
            events: vec![],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "replicas raised while progressing: both colors follow, no switch at the old count",
            observed: raised_mid_rollout,
            steps: vec![
                Step::Scale {
                    color: Blue,
                    replicas: 3,
                },
                Step::Scale {
                    color: Green,
                    replicas: 3,
                },
            ],
            events: vec![],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "the serving color scaled to zero by hand while progressing: restored",
            observed: serving_scaled_away,
            steps: vec![Step::Scale {
                color: Blue,
                replicas: 2,
            }],
            events: vec![],
            phase: Phase::Progressing,
            active: Blue,
        },
        Case {
            name: "stable with active pods left drained (a failed cancel): lifted",
            observed: stable_drained,
            steps: vec![Step::CancelDrain {
                pods: blue_pods.clone(),
            }],
            events: vec![],
            phase: Phase::Stable,
            active: Blue,
        },
        Case {
            name: "status lost mid-rollout: green keeps its pods at the revision it runs",
            observed: lost_mid_progress,
            steps: vec![
                Step::ApplyPodDisruptionBudget,
                Step::ApplyDeployment {
                    color: Green,
                    revision: "r2".into(),
                    replicas: 2,
                },
                Step::RoutePreview { color: Green },
            ],
            events: vec!["Adopted", "RolloutStarted"],
            phase: Phase::Progressing,
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
        // The Service was routed back, and its endpoints followed.
        let mut o = draining(0, 0);
        o.abort = true;
        o.service_color = Some(Color::Blue);
        o.endpoints = vec!["10.0.0.1".into(), "10.0.0.2".into()];
        for pod in &mut o.blue.pods {
            if let Some(report) = pod.report.as_mut() {
                report.draining = false;
            }
        }
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
    // Why green never became Ready, as the kubelet says it, is in the
    // status and the Event (issue 19: an image that cannot be pulled).
    let unpullable = plan(&{
        let mut o = progressing();
        o.now = t(300);
        let mut waiting = pod("chat-green-a", "10.0.0.9", 0, false);
        waiting.report = None;
        waiting.waiting = Some("ImagePullBackOff: back-off pulling image \"gw:9\"".into());
        o.green.pods = vec![waiting, pod("chat-green-b", "10.0.0.8", 0, false)];
        o
    });
    let told = "chat-green-a ImagePullBackOff: back-off pulling image \"gw:9\"";
    let message = unpullable.status.message.clone().unwrap_or_default();
    assert!(message.contains(told), "{message}");
    assert!(!message.contains("chat-green-b"), "{message}");
    let notes: Vec<String> = unpullable
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Record(notice) if notice.reason == "ReadyTimeout" => Some(notice.note.clone()),
            _ => None,
        })
        .collect();
    assert!(notes.iter().any(|n| n.contains(told)), "{notes:?}");

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
                        .map(|i| {
                            pod(
                                &format!("{prefix}-{i}"),
                                &format!("{prefix}-ip-{i}"),
                                0,
                                false,
                            )
                        })
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
                | Step::ApplyPodDisruptionBudget
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

    /// One second passes: the new color becomes Ready, draining pods lose
    /// a connection, the endpoints catch up with the Service's selector.
    fn tick(&mut self) {
        self.o.now += SignedDuration::from_secs(1);
        let selected = self.o.service_color.map(|color| match color {
            Color::Blue => &self.o.blue,
            Color::Green => &self.o.green,
        });
        self.o.endpoints = selected
            .into_iter()
            .flat_map(|view| &view.pods)
            .filter(|pod| pod.report.is_some_and(|r| !r.draining))
            .filter_map(|pod| pod.ip.clone())
            .collect();
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

/// A gateway restart is reported once per restart, with how the container
/// ended, whatever the phase; a pod that is gone is forgotten.
#[test]
fn each_gateway_restart_is_reported_once() {
    let records = |plan: &Plan| -> Vec<String> {
        plan.steps
            .iter()
            .filter_map(|step| match step {
                Step::Record(notice) if notice.reason == "GatewayRestarted" => {
                    assert!(notice.warning);
                    Some(notice.note.clone())
                }
                _ => None,
            })
            .collect()
    };
    let mut o = stable();
    o.blue.pods[1].restarts = 1;
    o.blue.pods[1].last_exit = Some("Error, exit code 137".to_string());
    let first = plan(&o);
    assert_eq!(
        records(&first),
        ["blue pod b-2 restarted (Error, exit code 137; 1 restarts): its clients reconnect to the other pods and resume"]
    );
    assert_eq!(
        first.status.pod_restarts,
        BTreeMap::from([("b-2".to_string(), 1)])
    );
    // Observed again with that status: nothing new to say.
    o.status = first.status.clone();
    assert!(records(&plan(&o)).is_empty());
    // Again, during a rollout; and a pod that went away is forgotten.
    let mut draining = draining(3, 0);
    draining.status.pod_restarts =
        BTreeMap::from([("b-2".to_string(), 1), ("gone".to_string(), 4)]);
    draining.blue.pods[1].restarts = 2;
    let again = plan(&draining);
    assert_eq!(records(&again).len(), 1, "{:?}", again.steps);
    assert_eq!(
        again.status.pod_restarts,
        BTreeMap::from([("b-2".to_string(), 2)])
    );
}
