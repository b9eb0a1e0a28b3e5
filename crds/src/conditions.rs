//! Condition types of a `LockCluster`'s status and a helper that updates
//! them the way Kubernetes' own controllers do (`meta.SetStatusCondition`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// True when a quorum of members is ready and the cluster serves requests.
pub const AVAILABLE: &str = "Available";
/// True while the operator is moving the cluster towards its spec (bootstrap,
/// scaling, upgrade, member replacement).
pub const PROGRESSING: &str = "Progressing";
/// True when some member is missing, not ready or lagging, or the operator
/// cannot make progress.
pub const DEGRADED: &str = "Degraded";
/// True when losing one more member would lose quorum (fewer than
/// quorum + 1 members ready), so a disruption now stops writes.
pub const QUORUM_AT_RISK: &str = "QuorumAtRisk";
/// True when a member's data belongs to another lockd cluster id than
/// `status.clusterId`; the operator does not adopt it.
pub const CLUSTER_ID_MISMATCH: &str = "ClusterIDMismatch";
/// True when the spec cannot be acted on (e.g. an even replica count that
/// got past admission); the operator changes nothing until it is fixed.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Every condition type the operator sets, in display order.
pub const ALL_TYPES: [&str; 6] = [
    AVAILABLE,
    PROGRESSING,
    DEGRADED,
    QUORUM_AT_RISK,
    CLUSTER_ID_MISMATCH,
    INVALID_SPEC,
];

/// Status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell.
    Unknown,
}

impl ConditionStatus {
    /// The API string: "True", "False" or "Unknown".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b {
            Self::True
        } else {
            Self::False
        }
    }
}

/// A condition to pass to [`upsert`]. `reason` should be a CamelCase word;
/// `now` becomes `lastTransitionTime` if the status changes (or the
/// condition is new), and is ignored otherwise.
pub fn new(
    type_: &str,
    status: impl Into<ConditionStatus>,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.into().as_str().to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Insert or update `condition` in `conditions` by its type, following
/// Kubernetes conventions: a new type is appended as given; for an existing
/// one, `lastTransitionTime` is taken from `condition` only when the status
/// changes, while reason, message and observedGeneration always take the new
/// values. Later duplicates of the same type are dropped. Returns whether
/// anything changed (so the caller knows whether to write the status).
pub fn upsert(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    let Some(i) = conditions.iter().position(|c| c.type_ == condition.type_) else {
        conditions.push(condition);
        return true;
    };
    let mut changed = false;
    let mut n = 0;
    conditions.retain(|c| {
        if c.type_ != condition.type_ {
            return true;
        }
        n += 1;
        n == 1
    });
    if n > 1 {
        changed = true;
    }
    let existing = &mut conditions[i];
    if existing.status != condition.status {
        existing.status = condition.status;
        existing.last_transition_time = condition.last_transition_time;
        changed = true;
    }
    if existing.reason != condition.reason {
        existing.reason = condition.reason;
        changed = true;
    }
    if existing.message != condition.message {
        existing.message = condition.message;
        changed = true;
    }
    if existing.observed_generation != condition.observed_generation {
        existing.observed_generation = condition.observed_generation;
        changed = true;
    }
    changed
}

/// The condition of the given type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True.as_str())
}

/// Remove every condition of the given type. Returns whether one was removed.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn new_type_is_appended() {
        let mut cs = Vec::new();
        assert!(upsert(
            &mut cs,
            new(AVAILABLE, true, "QuorumReady", "3/3 ready", Some(1), at(10))
        ));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].status, "True");
        assert_eq!(cs[0].last_transition_time, at(10));
        assert_eq!(cs[0].observed_generation, Some(1));
        assert!(is_true(&cs, AVAILABLE));
        assert!(!is_true(&cs, DEGRADED));
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_the_rest() {
        let mut cs = vec![new(
            AVAILABLE,
            true,
            "QuorumReady",
            "3/3 ready",
            Some(1),
            at(10),
        )];
        // Nothing new: no change, no write needed.
        assert!(!upsert(
            &mut cs,
            new(AVAILABLE, true, "QuorumReady", "3/3 ready", Some(1), at(20))
        ));
        assert_eq!(cs[0].last_transition_time, at(10));
        // Same status, new message and generation: updated, time kept.
        assert!(upsert(
            &mut cs,
            new(AVAILABLE, true, "QuorumReady", "2/3 ready", Some(2), at(30))
        ));
        assert_eq!(cs[0].last_transition_time, at(10));
        assert_eq!(cs[0].message, "2/3 ready");
        assert_eq!(cs[0].observed_generation, Some(2));
    }

    #[test]
    fn status_change_moves_transition_time() {
        let mut cs = vec![
            new(PROGRESSING, false, "Idle", "", Some(1), at(5)),
            new(AVAILABLE, true, "QuorumReady", "3/3 ready", Some(1), at(10)),
        ];
        assert!(upsert(
            &mut cs,
            new(AVAILABLE, false, "QuorumLost", "1/3 ready", Some(1), at(40))
        ));
        let c = find(&cs, AVAILABLE).expect("present");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, "QuorumLost");
        assert_eq!(c.last_transition_time, at(40));
        // Order is kept and the other condition is untouched.
        assert_eq!(cs[0].type_, PROGRESSING);
        assert_eq!(cs[0].last_transition_time, at(5));
        assert!(upsert(
            &mut cs,
            new(
                AVAILABLE,
                ConditionStatus::Unknown,
                "NoContact",
                "",
                None,
                at(50)
            )
        ));
        assert_eq!(cs[1].status, "Unknown");
        assert_eq!(cs[1].observed_generation, None);
        assert_eq!(cs[1].last_transition_time, at(50));
    }

    #[test]
    fn duplicates_are_collapsed_and_remove_works() {
        let mut cs = vec![
            new(DEGRADED, true, "A", "", Some(1), at(1)),
            new(AVAILABLE, true, "B", "", Some(1), at(1)),
            new(DEGRADED, false, "C", "", Some(1), at(1)),
        ];
        assert!(upsert(
            &mut cs,
            new(DEGRADED, true, "A", "", Some(1), at(2))
        ));
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].type_, DEGRADED);
        assert_eq!(cs[0].last_transition_time, at(1));
        assert!(remove(&mut cs, DEGRADED));
        assert!(!remove(&mut cs, DEGRADED));
        assert_eq!(cs.len(), 1);
    }

    #[test]
    fn type_names_are_distinct_camel_case() {
        for (i, t) in ALL_TYPES.iter().enumerate() {
            assert!(t.chars().next().is_some_and(|c| c.is_ascii_uppercase()));
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()));
            assert!(!ALL_TYPES[..i].contains(t));
        }
    }
}
