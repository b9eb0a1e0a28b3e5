//! Leader election among operator replicas on a `coordination.k8s.io/v1`
//! Lease, as client-go's leaderelection does it: one holder renews the
//! lease every `retry_period`; another replica takes it over only after the
//! lease record has not changed for `lease_duration` *as measured by its own
//! clock* (so clock skew between nodes cannot shorten a lease), and every
//! write is conditional on the resourceVersion it read (two replicas cannot
//! both win a takeover).
//!
//! A leader that cannot renew for `renew_deadline` gives leadership up;
//! the process then exits so that nothing it started keeps acting.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Timing of the election (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease record must stay unchanged before others take it.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often to renew or retry.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's default timing for `name` held by `identity`.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> LeaseConfig {
        LeaseConfig {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    Leading,
    Following(Option<String>),
}

/// Runs the election forever on `api`, publishing whether this replica
/// leads. Returns only when leadership, once held, was lost (the caller
/// should stop acting and exit).
pub async fn run(api: Api<Lease>, config: LeaseConfig, leading: watch::Sender<bool>) {
    // resourceVersion of the record last seen, and when it was first seen.
    let mut seen: Option<(String, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        let attempt = try_acquire_or_renew(&api, &config, &mut seen).await;
        let now = Instant::now();
        match attempt {
            Ok(Attempt::Leading) => {
                if last_renew.is_none() {
                    tracing::info!(identity = %config.identity, lease = %config.name, "became leader");
                    let _ = leading.send(true);
                }
                last_renew = Some(now);
            }
            Ok(Attempt::Following(holder)) => {
                if last_renew.is_some() {
                    tracing::warn!(?holder, "lease taken by another replica");
                    let _ = leading.send(false);
                    return;
                }
                tracing::debug!(?holder, "following");
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease call failed");
                if let Some(at) = last_renew {
                    if now.duration_since(at) >= config.renew_deadline {
                        tracing::warn!("could not renew the lease in time: stepping down");
                        let _ = leading.send(false);
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

fn lease_spec(config: &LeaseConfig, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX),
        ),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Option<(String, Instant)>,
) -> Result<Attempt, kube::Error> {
    let Some(current) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(lease_spec(config, 0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following(None)),
            Err(e) => Err(e),
        };
    };
    let rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let now = Instant::now();
    let first_seen = match seen {
        Some((v, at)) if *v == rv => *at,
        _ => {
            *seen = Some((rv.clone(), now));
            now
        }
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(config.identity.as_str());
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(config.lease_duration, Duration::from_secs);
    let expired = holder.is_none() || now.duration_since(first_seen) >= duration;
    if !mine && !expired {
        return Ok(Attempt::Following(holder));
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    let acquired = if mine {
        spec.acquire_time.clone()
    } else {
        None
    };
    let mut next = current.clone();
    next.spec = Some(lease_spec(config, transitions, acquired));
    // `replace` sends the resourceVersion read above: a concurrent writer
    // makes this fail with 409 instead of both replicas winning.
    match api
        .replace(&config.name, &PostParams::default(), &next)
        .await
    {
        Ok(written) => {
            *seen = written
                .metadata
                .resource_version
                .map(|v| (v, Instant::now()));
            Ok(Attempt::Leading)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following(holder)),
        Err(e) => Err(e),
    }
}
