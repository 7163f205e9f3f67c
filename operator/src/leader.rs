//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas never drive the same rollout, with client-go's semantics:
//!
//! - A replica waiting for the Lease never compares the holder's
//!   `renewTime` with its own clock (the two clocks may differ): it notes,
//!   on its own clock, when it last saw the Lease record change, and takes
//!   over only after a whole lease duration without a change.
//! - The leader renews every [`retry_period`] and counts its lease from the
//!   moment it *sent* the last successful renewal; every call is bounded by
//!   the time left before [`renew_deadline`] (2/3 of the lease), past which
//!   it stops leading. A replica that took over saw the record change no
//!   earlier than that send, so it waits at least a lease duration from it:
//!   the old leader has stopped a third of a lease before (tested with an
//!   API server that stops answering the leader:
//!   `a_leader_cut_off_from_the_api_server_stops_before_another_takes_over`).
//!
//! The decision is a pure function ([`decide`]); writes carry the Lease's
//! resourceVersion (a concurrent writer gets 409 and loses the round).

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use tokio::time::Instant;
use tracing::{info, warn};

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it.
    TakeOver,
    /// Someone else holds it for at least this much longer.
    Wait {
        /// The current holder.
        holder: String,
        /// Until the record may be taken over, unless it changes meanwhile.
        remaining: Duration,
    },
}

/// The decision for `me` about `lease`, whose record this replica has seen
/// unchanged for `unchanged_for` (on its own clock).
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> LeaseDecision {
    let Some(spec) = lease else {
        return LeaseDecision::TakeOver;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return LeaseDecision::TakeOver;
    }
    if holder == me {
        return LeaseDecision::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_duration, Duration::from_secs);
    match duration.checked_sub(unchanged_for) {
        Some(remaining) if !remaining.is_zero() => LeaseDecision::Wait { holder, remaining },
        _ => LeaseDecision::TakeOver,
    }
}

/// How long a leader may go without a successful renewal before it stops
/// leading: 2/3 of the lease (client-go: 10 s of 15 s).
pub fn renew_deadline(lease: Duration) -> Duration {
    lease * 2 / 3
}

/// How often renewals (and acquisition attempts) are made: 2/15 of the
/// lease (client-go: 2 s of 15 s).
pub fn retry_period(lease: Duration) -> Duration {
    lease * 2 / 15
}

/// A Lease record as seen: what must change for it to count as renewed.
type Record = (Option<String>, Option<String>, Option<String>);

fn record(lease: Option<&Lease>) -> Record {
    let spec = lease.and_then(|l| l.spec.as_ref());
    (
        spec.and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.renew_time.as_ref().map(|t| t.0.to_string())),
        lease.and_then(|l| l.metadata.resource_version.clone()),
    )
}

/// Holds (or waits for) one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The record last seen, and when it was first seen (local clock).
    observed: Mutex<Option<(Record, Instant)>>,
}

impl LeaderElector {
    /// An elector for Lease `name` in the Api's namespace, as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: Mutex::new(None),
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// How long the record `lease` has been seen unchanged, on this clock.
    fn unchanged_for(&self, lease: Option<&Lease>) -> Duration {
        let seen = record(lease);
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match observed.as_ref() {
            Some((last, since)) if *last == seen => since.elapsed(),
            _ => {
                *observed = Some((seen, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// One round: read the Lease, and take or renew it if we may. `Ok(true)`
    /// when we hold it afterwards. Callers bound it in time.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let existing = self.api.get_opt(&self.name).await?;
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.unchanged_for(existing.as_ref()),
            self.duration,
        );
        let now = Timestamp::now();
        let written = match (existing, decision) {
            (_, LeaseDecision::Wait { .. }) => return Ok(false),
            (None, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Some(mut lease), decision) => {
                let old = lease.spec.take().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0);
                lease.spec = Some(if decision == LeaseDecision::Renew {
                    self.spec(now, old.acquire_time, transitions)
                } else {
                    self.spec(now, None, transitions + 1)
                });
                // resourceVersion is kept: a concurrent writer makes this a 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Waits until this replica holds the Lease; returns when the winning
    /// attempt was sent, from which its lease counts.
    pub async fn acquire(&self) -> Instant {
        let retry = retry_period(self.duration);
        loop {
            let started = Instant::now();
            match tokio::time::timeout(retry, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    info!(lease = %self.name, identity = %self.identity, "leading");
                    return started;
                }
                Ok(Ok(false)) => {}
                Ok(Err(err)) => warn!(error = %err, "lease not readable"),
                Err(_) => warn!("lease request unanswered"),
            }
            tokio::time::sleep(retry.saturating_sub(started.elapsed())).await;
        }
    }

    /// Renews every [`retry_period`] from `acquired` (when the acquiring
    /// attempt was sent); returns when the Lease is lost — someone else
    /// holds it, or no renewal succeeded within [`renew_deadline`] of the
    /// last successful one's send — at which point this replica must stop
    /// acting.
    pub async fn hold(&self, acquired: Instant) {
        let deadline_after = renew_deadline(self.duration);
        let retry = retry_period(self.duration);
        let mut renewed = acquired;
        loop {
            let deadline = renewed + deadline_after;
            tokio::time::sleep_until((Instant::now() + retry).min(deadline)).await;
            let started = Instant::now();
            if started >= deadline {
                warn!(lease = %self.name, "lease not renewed in time");
                return;
            }
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "lease taken by another replica");
                    return;
                }
                Ok(Err(err)) => warn!(error = %err, "lease renewal failed"),
                Err(_) => warn!(lease = %self.name, "lease renewal unanswered"),
            }
        }
    }

    /// Gives the Lease up (on shutdown) so another replica need not wait for
    /// it to expire. Bounded: a server that does not answer is left to the
    /// lease's expiry.
    pub async fn release(&self) {
        let bound = retry_period(self.duration);
        let released = tokio::time::timeout(bound, async {
            let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
                return;
            };
            let ours = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str());
            if ours {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                }
                if let Err(err) = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    warn!(error = %err, "lease not released");
                }
            }
        })
        .await;
        if released.is_err() {
            warn!("lease release unanswered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                Timestamp::from_second(1_800_000_000).expect("timestamp"),
            )),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions_use_the_local_time_the_record_went_unchanged() {
        let s = Duration::from_secs;
        let table: Vec<(&str, Option<LeaseSpec>, u64, LeaseDecision)> = vec![
            ("no lease", None, 0, LeaseDecision::TakeOver),
            (
                "released",
                Some(LeaseSpec::default()),
                0,
                LeaseDecision::TakeOver,
            ),
            ("ours", Some(held_by("me")), 100, LeaseDecision::Renew),
            (
                "theirs, just seen",
                Some(held_by("them")),
                0,
                LeaseDecision::Wait {
                    holder: "them".into(),
                    remaining: s(15),
                },
            ),
            (
                "theirs, unchanged 14 s",
                Some(held_by("them")),
                14,
                LeaseDecision::Wait {
                    holder: "them".into(),
                    remaining: s(1),
                },
            ),
            (
                "theirs, unchanged 15 s",
                Some(held_by("them")),
                15,
                LeaseDecision::TakeOver,
            ),
            (
                "theirs, no duration: ours applies",
                Some(LeaseSpec {
                    lease_duration_seconds: None,
                    ..held_by("them")
                }),
                9,
                LeaseDecision::Wait {
                    holder: "them".into(),
                    remaining: s(1),
                },
            ),
        ];
        for (name, lease, unchanged, expected) in table {
            assert_eq!(
                decide(lease.as_ref(), "me", s(unchanged), s(10)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn the_leader_stops_a_third_of_a_lease_before_anyone_may_take_over() {
        let lease = Duration::from_secs(15);
        assert_eq!(renew_deadline(lease), Duration::from_secs(10));
        assert_eq!(retry_period(lease), Duration::from_secs(2));
        assert!(renew_deadline(lease) + retry_period(lease) < lease);
    }
}
