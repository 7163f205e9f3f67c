//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas never drive the same rollout. The decision is a pure function of
//! the Lease; the elector reads, decides, and writes with the Lease's
//! resourceVersion (a concurrent writer gets 409 and loses the round).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;
use tracing::{info, warn};

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it.
    TakeOver,
    /// Someone else holds it until this time.
    Wait {
        /// The current holder.
        holder: String,
        /// When their lease expires unless renewed.
        until: Timestamp,
    },
}

/// The decision for `me` at `now`.
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
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
    let seconds = spec
        .lease_duration_seconds
        .map_or(default_duration.as_secs() as i64, i64::from);
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return LeaseDecision::TakeOver;
    };
    let until = renewed
        .0
        .saturating_add(SignedDuration::from_secs(seconds))
        .unwrap_or(renewed.0);
    if now >= until {
        LeaseDecision::TakeOver
    } else {
        LeaseDecision::Wait { holder, until }
    }
}

/// Holds (or waits for) one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// An elector for Lease `name` in the Api's namespace, as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
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

    /// One round: read the Lease, and take or renew it if we may. `Ok(true)`
    /// when we hold it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
            self.duration,
        );
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

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let retry = self.duration / 5;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {}
                Err(err) => warn!(error = %err, "lease not readable"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every third of the lease duration; returns when the Lease is
    /// lost (someone else holds it, or it could not be renewed before it
    /// expired), at which point this replica must stop acting.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "lease taken by another replica");
                    return;
                }
                Err(err) => warn!(error = %err, "lease renewal failed"),
            }
            // Stop before the lease can expire, so two leaders never overlap.
            if last_renewed.elapsed() >= self.duration.mul_f32(0.8) {
                warn!(lease = %self.name, "lease not renewed in time");
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown) so another replica need not wait for it to expire.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let d = Duration::from_secs(15);
        let table: Vec<(&str, Option<LeaseSpec>, i64, LeaseDecision)> = vec![
            ("no lease", None, 0, LeaseDecision::TakeOver),
            (
                "released",
                Some(LeaseSpec::default()),
                0,
                LeaseDecision::TakeOver,
            ),
            ("ours", Some(held_by("me", -100)), 0, LeaseDecision::Renew),
            (
                "theirs, fresh",
                Some(held_by("them", 0)),
                14,
                LeaseDecision::Wait {
                    holder: "them".into(),
                    until: t(15),
                },
            ),
            (
                "theirs, expired",
                Some(held_by("them", 0)),
                15,
                LeaseDecision::TakeOver,
            ),
            (
                "theirs, never renewed",
                Some(LeaseSpec {
                    holder_identity: Some("them".into()),
                    ..LeaseSpec::default()
                }),
                0,
                LeaseDecision::TakeOver,
            ),
        ];
        for (name, lease, now, expected) in table {
            assert_eq!(decide(lease.as_ref(), "me", t(now), d), expected, "{name}");
        }
    }
}
