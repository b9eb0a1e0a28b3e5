//! Classification of the observed members (see the vocabulary in the parent
//! module's docs). Everything here is derived, nothing is decided.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    quorum, Desired, NodeId, Observed, ObservedMember, PodState, RaftView, VolumeState,
    MAX_REPLICAS, MIN_REPLICAS,
};

/// Why a spec cannot be acted on: (reason, message).
pub(super) type SpecError = (&'static str, String);

pub(super) struct Analysis<'a> {
    pub(super) desired: &'a Desired,
    pub(super) observed: &'a Observed,
    pub(super) spec_error: Option<SpecError>,
    /// Observed members by id (id 0 ignored, first entry of an id wins).
    pub(super) members: BTreeMap<NodeId, &'a ObservedMember>,
    pub(super) raft: Option<&'a RaftView>,
    pub(super) voters: BTreeSet<NodeId>,
    /// Learners that are not also listed as voters.
    pub(super) learners: BTreeSet<NodeId>,
    pub(super) foreign: BTreeSet<NodeId>,
    pub(super) lost: BTreeSet<NodeId>,
    /// Healthy members of the membership (voters and learners).
    pub(super) healthy: BTreeSet<NodeId>,
    pub(super) healthy_voters: BTreeSet<NodeId>,
    pub(super) pending: BTreeSet<NodeId>,
    pub(super) fresh: BTreeSet<NodeId>,
    pub(super) orphans: BTreeSet<NodeId>,
    pub(super) outdated: BTreeSet<NodeId>,
    /// Some sign that the cluster was initialized before.
    pub(super) evidence: bool,
    /// Lowest id that may be allocated.
    pub(super) first_free_id: NodeId,
}

impl<'a> Analysis<'a> {
    pub(super) fn new(desired: &'a Desired, observed: &'a Observed) -> Self {
        let mut members: BTreeMap<NodeId, &'a ObservedMember> = BTreeMap::new();
        for m in &observed.members {
            if m.id != 0 {
                members.entry(m.id).or_insert(m);
            }
        }
        let raft = observed.raft.as_ref();
        let voters: BTreeSet<NodeId> = raft
            .map(|r| r.voters.iter().copied().filter(|id| *id != 0).collect())
            .unwrap_or_default();
        let learners: BTreeSet<NodeId> = raft
            .map(|r| {
                r.learners
                    .iter()
                    .copied()
                    .filter(|id| *id != 0 && !voters.contains(id))
                    .collect()
            })
            .unwrap_or_default();
        let membership: BTreeSet<NodeId> = voters.union(&learners).copied().collect();

        let foreign: BTreeSet<NodeId> = members
            .values()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.cluster_id != observed.cluster_id)
            })
            .map(|m| m.id)
            .collect();

        let mut lost: BTreeSet<NodeId> = members
            .values()
            .filter(|m| !foreign.contains(&m.id) && m.volume != VolumeState::Present)
            .map(|m| m.id)
            .collect();
        lost.extend(membership.iter().filter(|id| !members.contains_key(id)));

        let mut a = Analysis {
            desired,
            observed,
            spec_error: validate(desired),
            members,
            raft,
            voters,
            learners,
            foreign,
            lost,
            healthy: BTreeSet::new(),
            healthy_voters: BTreeSet::new(),
            pending: BTreeSet::new(),
            fresh: BTreeSet::new(),
            orphans: BTreeSet::new(),
            outdated: BTreeSet::new(),
            evidence: false,
            first_free_id: 1,
        };

        a.healthy = membership
            .iter()
            .copied()
            .filter(|id| !a.lost.contains(id) && !a.foreign.contains(id))
            .filter(|id| a.members.get(id).is_some_and(|m| a.member_ok(m)))
            .filter(|id| a.caught_up(*id))
            .collect();
        a.healthy_voters = a.healthy.intersection(&a.voters).copied().collect();

        for (&id, m) in &a.members {
            if a.foreign.contains(&id) || a.lost.contains(&id) || membership.contains(&id) {
                continue;
            }
            let initialized = m.status.as_ref().is_some_and(|s| s.initialized);
            if !initialized {
                a.pending.insert(id);
                // Not `ready`: lockd reports ready only once it is a member
                // of an initialized cluster, which a fresh member is not.
                if m.status.is_some() && matches!(m.pod, PodState::Running { .. }) {
                    a.fresh.insert(id);
                }
            } else if raft.is_some() {
                a.orphans.insert(id);
            }
        }

        a.outdated = a
            .members
            .values()
            .filter(|m| !a.foreign.contains(&m.id) && !a.lost.contains(&m.id))
            .filter(|m| !a.orphans.contains(&m.id))
            .filter(|m| matches!(m.pod, PodState::Pending | PodState::Running { .. }))
            .filter(|m| m.version.as_ref().is_some_and(|v| *v != a.desired.version))
            .map(|m| m.id)
            .collect();

        a.evidence = observed.bootstrapped
            || raft.is_some()
            || a.members.values().any(|m| {
                !a.foreign.contains(&m.id)
                    && (m.volume == VolumeState::Lost
                        || m.status.as_ref().is_some_and(|s| s.initialized))
            });

        let highest_seen = a
            .members
            .keys()
            .chain(membership.iter())
            .chain(raft.map(|r| &r.leader))
            .chain(raft.into_iter().flat_map(|r| r.lag.keys()))
            .copied()
            .max()
            .unwrap_or(0);
        a.first_free_id = observed.next_id.max(1).max(highest_seen.saturating_add(1));
        a
    }

    /// Leader of the raft view.
    pub(super) fn leader(&self) -> Option<NodeId> {
        self.raft.map(|r| r.leader)
    }

    pub(super) fn is_member(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Pod ready, volume present, admin API answering with our cluster id and
    /// initialized.
    pub(super) fn member_ok(&self, m: &ObservedMember) -> bool {
        m.pod.is_ready()
            && m.volume == VolumeState::Present
            && m.status
                .as_ref()
                .is_some_and(|s| s.cluster_id == self.observed.cluster_id && s.initialized)
    }

    /// The leader, or a member at most `caught_up_lag` entries behind it.
    pub(super) fn caught_up(&self, id: NodeId) -> bool {
        match self.raft {
            None => false,
            Some(r) => {
                r.leader == id
                    || r.lag
                        .get(&id)
                        .is_some_and(|lag| *lag <= self.desired.caught_up_lag)
            }
        }
    }

    /// Members (voters, learners) that are not healthy, plus pending ones.
    pub(super) fn unhealthy_or_pending(&self) -> BTreeSet<NodeId> {
        let mut out: BTreeSet<NodeId> = self
            .voters
            .union(&self.learners)
            .copied()
            .filter(|id| !self.healthy.contains(id))
            .collect();
        out.extend(&self.pending);
        out
    }

    /// Voters that are up and answering for our cluster, caught up or not:
    /// with a quorum of them, a leader can commit (the others just trail).
    pub(super) fn serving_voters(&self) -> usize {
        self.voters
            .iter()
            .filter(|id| self.members.get(id).is_some_and(|m| self.member_ok(m)))
            .count()
    }

    pub(super) fn quorum(&self) -> usize {
        quorum(self.voters.len())
    }

    /// Whether the member runs the desired version.
    pub(super) fn runs_desired(&self, id: NodeId) -> bool {
        self.members
            .get(&id)
            .is_some_and(|m| m.version.as_deref() == Some(self.desired.version.as_str()))
    }
}

/// Rule 9: the replicas must be odd and in range, the version non-empty.
fn validate(d: &Desired) -> Option<SpecError> {
    if d.replicas < MIN_REPLICAS || d.replicas > MAX_REPLICAS {
        return Some((
            "ReplicasOutOfRange",
            format!(
                "replicas {} is outside {MIN_REPLICAS}..={MAX_REPLICAS}",
                d.replicas
            ),
        ));
    }
    if d.replicas.is_multiple_of(2) {
        return Some((
            "EvenReplicas",
            format!(
                "replicas {} is even: an even voter count tolerates no more failures than the odd count below it",
                d.replicas
            ),
        ));
    }
    if d.version.is_empty() {
        return Some(("EmptyVersion", "the desired version is empty".to_string()));
    }
    None
}
