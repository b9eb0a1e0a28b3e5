//! Property tests of the operator's planner: invariants of single plans over
//! random observed states, and a simulation that applies plans to a tiny
//! deterministic model of the cluster until it converges.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lockd_operator::plan::{
    plan, quorum, Action, ConditionKind, Desired, MemberStatus, NodeId, Observed, ObservedMember,
    Plan, PodState, RaftView, Role, VolumeState,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const CID: &str = "cluster-a";
const FOREIGN: &str = "cluster-b";

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Independent restatement of the health definitions (the spec, not the code).

struct View<'a> {
    d: &'a Desired,
    o: &'a Observed,
    members: BTreeMap<NodeId, &'a ObservedMember>,
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
}

impl<'a> View<'a> {
    fn new(d: &'a Desired, o: &'a Observed) -> Self {
        let mut members = BTreeMap::new();
        for m in &o.members {
            members.entry(m.id).or_insert(m);
        }
        let voters: BTreeSet<NodeId> = o
            .raft
            .as_ref()
            .map(|r| r.voters.clone())
            .unwrap_or_default();
        let learners = o
            .raft
            .as_ref()
            .map(|r| r.learners.difference(&voters).copied().collect())
            .unwrap_or_default();
        View {
            d,
            o,
            members,
            voters,
            learners,
        }
    }

    fn foreign(&self, id: NodeId) -> bool {
        self.members.get(&id).is_some_and(|m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.cluster_id != self.o.cluster_id)
        })
    }

    fn healthy(&self, id: NodeId) -> bool {
        let Some(r) = self.o.raft.as_ref() else {
            return false;
        };
        let Some(m) = self.members.get(&id) else {
            return false;
        };
        let caught_up =
            r.leader == id || r.lag.get(&id).is_some_and(|l| *l <= self.d.caught_up_lag);
        (self.voters.contains(&id) || self.learners.contains(&id))
            && m.pod == PodState::Running { ready: true }
            && m.volume == VolumeState::Present
            && m.status
                .as_ref()
                .is_some_and(|s| s.cluster_id == self.o.cluster_id && s.initialized)
            && caught_up
    }

    fn healthy_voters(&self) -> BTreeSet<NodeId> {
        self.voters
            .iter()
            .copied()
            .filter(|id| self.healthy(*id))
            .collect()
    }

    fn outdated(&self, id: NodeId) -> bool {
        self.members.get(&id).is_some_and(|m| {
            m.version.as_ref().is_some_and(|v| *v != self.d.version)
                && matches!(m.pod, PodState::Pending | PodState::Running { .. })
        })
    }

    fn spec_valid(&self) -> bool {
        self.d.replicas % 2 == 1 && self.d.replicas <= 9 && !self.d.version.is_empty()
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

/// Every invariant a single plan must satisfy.
fn check_plan(d: &Desired, o: &Observed, p: &Plan) -> Result<(), TestCaseError> {
    let v = View::new(d, o);
    let raft = o.raft.as_ref();
    let leader = raft.map(|r| r.leader);
    let membership: BTreeSet<NodeId> = v.voters.union(&v.learners).copied().collect();
    let ctx = || format!("\ndesired {d:?}\nobserved {o:#?}\nplan {:#?}", p.actions);

    // Conditions: one of each kind, in order, CamelCase reasons.
    let kinds: Vec<ConditionKind> = p.conditions.iter().map(|c| c.kind).collect();
    ensure(kinds == ConditionKind::ALL.to_vec(), || {
        format!("conditions {kinds:?}")
    })?;
    for c in &p.conditions {
        ensure(
            c.reason.starts_with(|ch: char| ch.is_ascii_uppercase())
                && c.reason.chars().all(|ch| ch.is_ascii_alphanumeric()),
            || format!("reason {:?}", c.reason),
        )?;
    }

    // Quorum: simulate the effect of the actions on the healthy voters.
    let mut voters = v.voters.clone();
    let mut hv = v.healthy_voters();
    let caught_up_learners: BTreeSet<NodeId> = v
        .learners
        .iter()
        .copied()
        .filter(|id| v.healthy(*id))
        .collect();
    let had_quorum = raft.is_some() && !voters.is_empty() && hv.len() >= quorum(voters.len());
    let mut change_voters = 0;
    let mut delete_pods = Vec::new();
    let mut created = Vec::new();
    for a in &p.actions {
        if let Some(id) = a.member() {
            ensure(!v.foreign(id), || {
                format!("action on foreign member: {a:?}{}", ctx())
            })?;
        }
        match a {
            Action::CreateMember { id } => created.push(*id),
            Action::CreatePod { id } => {
                let m = v.members.get(id);
                ensure(
                    m.is_some_and(|m| {
                        m.volume == VolumeState::Present && m.pod == PodState::Absent
                    }),
                    || {
                        format!(
                            "CreatePod without an intact volume/absent pod: {id}{}",
                            ctx()
                        )
                    },
                )?;
                ensure(!d.version.is_empty(), || {
                    "CreatePod with empty version".into()
                })?;
            }
            Action::DeletePod { id } => {
                delete_pods.push(*id);
                ensure(v.outdated(*id), || {
                    format!("restart of a current member {id}{}", ctx())
                })?;
                if hv.remove(id) {
                    let single = d.replicas == 1 && voters.len() == 1;
                    ensure(single || hv.len() >= quorum(voters.len()), || {
                        format!("restart of {id} below quorum{}", ctx())
                    })?;
                }
            }
            Action::DeleteMember { id, .. } => {
                ensure(!membership.contains(id), || {
                    format!(
                        "DeleteMember of member {id} still in the membership{}",
                        ctx()
                    )
                })?;
                ensure(v.members.contains_key(id), || {
                    format!("DeleteMember of unknown {id}")
                })?;
                if raft.is_none() {
                    // Only in bootstrap, only vanished volumes or surplus
                    // never-initialized members.
                    ensure(!o.bootstrapped, || {
                        format!("DeleteMember without a leader{}", ctx())
                    })?;
                }
            }
            Action::Initialize { id } => {
                ensure(raft.is_none() && !o.bootstrapped, || {
                    format!("Initialize of a bootstrapped cluster{}", ctx())
                })?;
                ensure(
                    o.members.iter().all(|m| {
                        v.foreign(m.id)
                            || (m.volume != VolumeState::Lost
                                && !m.status.as_ref().is_some_and(|s| s.initialized))
                    }),
                    || format!("Initialize beside an initialized member{}", ctx()),
                )?;
                let m = v.members.get(id);
                ensure(
                    m.is_some_and(|m| {
                        matches!(m.pod, PodState::Running { .. })
                            && m.volume == VolumeState::Present
                            && m.status
                                .as_ref()
                                .is_some_and(|s| s.cluster_id == CID && !s.initialized)
                    }),
                    || format!("Initialize of a member that is not fresh{}", ctx()),
                )?;
                ensure(
                    p.actions
                        .iter()
                        .filter(|a| matches!(a, Action::Initialize { .. }))
                        .count()
                        == 1,
                    || "two Initialize".into(),
                )?;
            }
            Action::AddLearner { id } => {
                ensure(raft.is_some() && !membership.contains(id), || {
                    format!("AddLearner of a member {id}{}", ctx())
                })?;
                let m = v.members.get(id);
                ensure(
                    m.is_some_and(|m| {
                        matches!(m.pod, PodState::Running { .. })
                            && m.volume == VolumeState::Present
                            && m.status
                                .as_ref()
                                .is_some_and(|s| s.cluster_id == CID && !s.initialized)
                    }),
                    || format!("AddLearner of a member that is not fresh{}", ctx()),
                )?;
            }
            Action::ChangeVoters { voters: target } if raft.is_some_and(|r| r.joint) => {
                // Finishing a joint change: only to the set it was moving
                // to, odd, with a healthy quorum of it.
                change_voters += 1;
                ensure(
                    raft.and_then(|r| r.joint_target.as_ref()) == Some(target),
                    || {
                        format!(
                            "ChangeVoters while joint to another set {target:?}{}",
                            ctx()
                        )
                    },
                )?;
                ensure(target.len() % 2 == 1, || {
                    format!("even voter set {target:?}{}", ctx())
                })?;
                ensure(
                    target.iter().filter(|id| hv.contains(id)).count() >= quorum(target.len()),
                    || {
                        format!(
                            "finishing a joint change without a healthy quorum of {target:?}{}",
                            ctx()
                        )
                    },
                )?;
            }
            Action::ChangeVoters { voters: target } => {
                change_voters += 1;
                ensure(had_quorum, || {
                    format!("ChangeVoters without quorum{}", ctx())
                })?;
                ensure(target.len() % 2 == 1, || {
                    format!("even voter set {target:?}{}", ctx())
                })?;
                for id in target {
                    ensure(hv.contains(id) || caught_up_learners.contains(id), || {
                        format!("voter set member {id} is neither a healthy voter nor a caught-up learner{}", ctx())
                    })?;
                }
                ensure(leader.is_none_or(|l| target.contains(&l)), || {
                    format!("ChangeVoters drops the leader{}", ctx())
                })?;
                // Voters that will come back (intact volume) are only dropped
                // by a scale-down, straight to the desired size.
                let lost = |id: &NodeId| {
                    v.members
                        .get(id)
                        .is_none_or(|m| m.volume != VolumeState::Present)
                };
                let intact = v.voters.iter().filter(|id| !lost(id)).count();
                let drops_intact = v.voters.iter().any(|id| !target.contains(id) && !lost(id));
                ensure(
                    !drops_intact
                        || (intact > d.replicas as usize && target.len() == d.replicas as usize),
                    || {
                        format!(
                            "ChangeVoters drops an intact voter without scaling down{}",
                            ctx()
                        )
                    },
                )?;
                voters = target.clone();
                hv = target.clone();
            }
            Action::RemoveMember { id } => {
                ensure(v.learners.contains(id), || {
                    format!("RemoveMember of a non-learner {id}{}", ctx())
                })?;
            }
            Action::TransferLeader { to } => {
                ensure(hv.contains(to) && Some(*to) != leader, || {
                    format!("TransferLeader to {to}{}", ctx())
                })?;
            }
        }
        if had_quorum && !(d.replicas == 1 && v.voters.len() == 1) {
            ensure(hv.len() >= quorum(voters.len()), || {
                format!("quorum violated after {a:?}{}", ctx())
            })?;
        }
        if !had_quorum {
            ensure(
                !matches!(
                    a,
                    Action::ChangeVoters { .. }
                        | Action::AddLearner { .. }
                        | Action::RemoveMember { .. }
                        | Action::TransferLeader { .. }
                        | Action::DeletePod { .. }
                ),
                || format!("{a:?} without a healthy quorum{}", ctx()),
            )?;
        }
    }
    ensure(change_voters <= 1, || {
        format!("several ChangeVoters{}", ctx())
    })?;
    if change_voters == 1 {
        ensure(
            p.actions.iter().filter(|a| a.is_membership()).count() == 1,
            || format!("ChangeVoters with other membership actions{}", ctx()),
        )?;
    }

    // At most one restart; a healthy member only when everything else is
    // healthy and nothing else is planned; the leader never while another
    // member needs a restart.
    ensure(delete_pods.len() <= 1, || {
        format!("several restarts{}", ctx())
    })?;
    if let Some(&id) = delete_pods.first() {
        ensure(p.actions.len() == 1, || {
            format!("restart with other actions{}", ctx())
        })?;
        // Nobody else is on the way back: every other intact member is
        // healthy, or down on the old version (those may go one by one).
        for other in &membership {
            let intact = v
                .members
                .get(other)
                .is_some_and(|m| m.volume == VolumeState::Present);
            let broken_outdated = v.outdated(*other)
                && v.members
                    .get(other)
                    .is_some_and(|m| matches!(m.pod, PodState::Running { .. }));
            ensure(
                *other == id || !intact || v.healthy(*other) || broken_outdated,
                || format!("restart of {id} while {other} is on its way back{}", ctx()),
            )?;
        }
        if v.healthy(id) {
            for other in &membership {
                ensure(*other == id || v.healthy(*other), || {
                    format!(
                        "restart of healthy {id} while {other} is unhealthy{}",
                        ctx()
                    )
                })?;
            }
        }
        if Some(id) == leader {
            ensure(v.voters.len() == 1, || format!("leader restarted{}", ctx()))?;
            for m in &o.members {
                ensure(m.id == id || v.foreign(m.id) || !v.outdated(m.id), || {
                    format!("leader restarted while {} is outdated{}", m.id, ctx())
                })?;
            }
        }
    }

    // Ids: new, distinct, above next_id and above every id seen.
    let mut seen: BTreeSet<NodeId> = v.members.keys().copied().collect();
    seen.extend(&membership);
    if let Some(r) = raft {
        seen.insert(r.leader);
        seen.extend(r.lag.keys());
    }
    let mut distinct = BTreeSet::new();
    for id in &created {
        ensure(*id >= o.next_id && *id >= 1, || {
            format!("id {id} below next_id")
        })?;
        ensure(!seen.contains(id), || format!("id {id} reused{}", ctx()))?;
        ensure(distinct.insert(*id), || format!("id {id} created twice"))?;
        ensure(p.next_id > *id, || {
            format!("next_id {} not above {id}", p.next_id)
        })?;
    }
    ensure(p.next_id >= o.next_id, || "next_id went down".into())?;
    ensure(seen.iter().all(|id| p.next_id > *id), || {
        format!("next_id {} not above every id seen{}", p.next_id, ctx())
    })?;

    // Rule 9: an invalid spec changes nothing but pods of intact members.
    if !v.spec_valid() {
        ensure(
            p.actions
                .iter()
                .all(|a| matches!(a, Action::CreatePod { .. })),
            || format!("actions with an invalid spec{}", ctx()),
        )?;
    }
    // Joint configuration: finish it (checked above), nothing else.
    if raft.is_some_and(|r| r.joint) {
        ensure(
            p.actions
                .iter()
                .all(|a| matches!(a, Action::CreatePod { .. } | Action::ChangeVoters { .. })),
            || format!("actions while joint{}", ctx()),
        )?;
    }

    // PodDisruptionBudget: never more evictions than tolerated failures.
    let pods = v
        .members
        .values()
        .filter(|m| m.pod != PodState::Absent)
        .count() as u32;
    ensure(p.pdb_min_available <= pods, || "pdb above pods".into())?;
    let evictions = pods - p.pdb_min_available;
    let hv0 = v.healthy_voters().len();
    let spare = if raft.is_some() {
        hv0.saturating_sub(quorum(v.voters.len()))
    } else {
        0
    };
    ensure(evictions as usize <= spare, || {
        format!("pdb allows {evictions} evictions, spare {spare}{}", ctx())
    })?;
    if !p.actions.is_empty() {
        ensure(evictions == 0, || "evictions allowed while acting".into())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Random observed states.

#[derive(Debug, Clone)]
struct MemberSeed {
    pod: u8,
    volume: u8,
    v1: bool,
    status: u8,
    foreign: bool,
    membership: u8,
    lag: u8,
}

fn member_seed() -> impl Strategy<Value = MemberSeed> {
    (
        0u8..6,
        0u8..10,
        any::<bool>(),
        0u8..4,
        prop::bool::weighted(0.1),
        0u8..4,
        0u8..4,
    )
        .prop_map(
            |(pod, volume, v1, status, foreign, membership, lag)| MemberSeed {
                pod,
                volume,
                v1,
                status,
                foreign,
                membership,
                lag,
            },
        )
}

fn desired_strategy() -> impl Strategy<Value = Desired> {
    (
        prop_oneof![
            8 => prop::sample::select(vec![1u32, 3, 5, 7]),
            1 => 0u32..12,
        ],
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.02),
    )
        .prop_map(|(replicas, v1, delete_volume, empty)| Desired {
            replicas,
            version: if empty {
                String::new()
            } else if v1 {
                "v1".into()
            } else {
                "v0".into()
            },
            caught_up_lag: 10,
            delete_volume_on_scale_down: delete_volume,
            progress_deadline: Duration::from_secs(600),
        })
}

fn random_observed() -> impl Strategy<Value = Observed> {
    (
        prop::sample::subsequence((1u64..=12).collect::<Vec<_>>(), 0..=9),
        any::<bool>(),
        0u64..15,
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.1),
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.1),
    )
        .prop_flat_map(
            |(ids, bootstrapped, next_id, has_raft, joint, leader, ghost)| {
                let n = ids.len();
                (
                    Just((ids, bootstrapped, next_id, has_raft, joint, leader, ghost)),
                    prop::collection::vec(member_seed(), n),
                )
            },
        )
        .prop_map(
            |((ids, bootstrapped, next_id, has_raft, joint, leader, ghost), seeds)| {
                build_observed(
                    &ids,
                    &seeds,
                    bootstrapped,
                    next_id,
                    has_raft,
                    joint,
                    leader,
                    ghost,
                )
            },
        )
}

#[allow(clippy::too_many_arguments)]
fn build_observed(
    ids: &[NodeId],
    seeds: &[MemberSeed],
    bootstrapped: bool,
    next_id: u64,
    has_raft: bool,
    joint: bool,
    leader: prop::sample::Index,
    ghost: bool,
) -> Observed {
    let mut members = Vec::new();
    let mut voters = BTreeSet::new();
    let mut learners = BTreeSet::new();
    let mut lag = BTreeMap::new();
    for (&id, s) in ids.iter().zip(seeds) {
        let pod = match s.pod {
            0 => PodState::Absent,
            1 => PodState::Pending,
            2 => PodState::Running { ready: false },
            3 => PodState::Terminating,
            _ => PodState::Running { ready: true },
        };
        let volume = match s.volume {
            0 => VolumeState::Absent,
            1 => VolumeState::Lost,
            _ => VolumeState::Present,
        };
        let in_membership = has_raft && s.membership > 0;
        if in_membership {
            if s.membership == 3 {
                learners.insert(id);
            } else {
                voters.insert(id);
            }
            match s.lag {
                0 => {}
                1 => {
                    lag.insert(id, 500);
                }
                _ => {
                    lag.insert(id, u64::from(s.lag));
                }
            }
        }
        let status = if matches!(pod, PodState::Running { .. }) && s.status > 0 {
            Some(MemberStatus {
                cluster_id: if s.foreign { FOREIGN } else { CID }.to_string(),
                initialized: if in_membership {
                    s.status > 1
                } else {
                    s.status == 3
                },
                role: if in_membership {
                    Role::Follower
                } else {
                    Role::Uninitialized
                },
                term: 1,
                leader_id: None,
                applied_index: 0,
            })
        } else {
            None
        };
        members.push(ObservedMember {
            id,
            pod,
            volume,
            version: (pod != PodState::Absent).then(|| if s.v1 { "v1" } else { "v0" }.to_string()),
            status,
        });
    }
    if ghost && has_raft {
        // A member of the membership that is not observed at all.
        voters.insert(13);
    }
    let raft = if has_raft {
        let all: Vec<NodeId> = voters.iter().copied().collect();
        let leader = if all.is_empty() {
            ids.first().copied().unwrap_or(1)
        } else {
            all[leader.index(all.len())]
        };
        lag.insert(leader, 0);
        let joint_target = joint.then(|| voters.clone());
        Some(RaftView {
            joint_target,
            leader,
            term: 1,
            voters,
            learners,
            joint,
            lag,
            commit_index: 10,
        })
    } else {
        None
    };
    Observed {
        cluster_id: CID.to_string(),
        next_id,
        bootstrapped,
        members,
        raft,
        unhealthy_for: BTreeMap::new(),
    }
}

// ---------------------------------------------------------------------------
// A tiny deterministic model of a cluster that plans are applied to.

#[derive(Debug, Clone)]
struct SimMember {
    pod: PodState,
    volume: VolumeState,
    version: Option<String>,
    initialized: bool,
    cluster_id: String,
}

#[derive(Debug, Clone)]
struct Sim {
    members: BTreeMap<NodeId, SimMember>,
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
    leader: Option<NodeId>,
    lag: BTreeMap<NodeId, u64>,
    joint: bool,
    bootstrapped: bool,
    next_id: NodeId,
}

impl Sim {
    fn observe(&self) -> Observed {
        let members = self
            .members
            .iter()
            .map(|(&id, m)| ObservedMember {
                id,
                pod: m.pod,
                volume: m.volume,
                version: m.version.clone(),
                status: matches!(m.pod, PodState::Running { .. }).then(|| MemberStatus {
                    cluster_id: m.cluster_id.clone(),
                    initialized: m.initialized && m.volume == VolumeState::Present,
                    role: if Some(id) == self.leader {
                        Role::Leader
                    } else if self.voters.contains(&id) {
                        Role::Follower
                    } else if self.learners.contains(&id) {
                        Role::Learner
                    } else {
                        Role::Uninitialized
                    },
                    term: 1,
                    leader_id: self.leader,
                    applied_index: 0,
                }),
            })
            .collect();
        Observed {
            cluster_id: CID.to_string(),
            next_id: self.next_id,
            bootstrapped: self.bootstrapped,
            members,
            raft: self.leader.map(|leader| RaftView {
                leader,
                term: 1,
                voters: self.voters.clone(),
                learners: self.learners.clone(),
                joint: self.joint,
                joint_target: self.joint.then(|| self.voters.clone()),
                lag: self.lag.clone(),
                commit_index: 10,
            }),
            unhealthy_for: BTreeMap::new(),
        }
    }

    /// The process runs with its data (ready or not).
    fn alive(&self, id: NodeId) -> bool {
        self.members.get(&id).is_some_and(|m| {
            matches!(m.pod, PodState::Running { .. })
                && m.volume == VolumeState::Present
                && m.initialized
                && m.cluster_id == CID
        })
    }

    fn apply(&mut self, d: &Desired, p: &Plan) -> Result<(), TestCaseError> {
        for a in &p.actions {
            match a {
                Action::CreateMember { id } => {
                    ensure(!self.members.contains_key(id), || format!("{id} exists"))?;
                    self.members.insert(
                        *id,
                        SimMember {
                            pod: PodState::Pending,
                            volume: VolumeState::Present,
                            version: Some(d.version.clone()),
                            initialized: false,
                            cluster_id: CID.to_string(),
                        },
                    );
                }
                Action::CreatePod { id } => {
                    let m = self
                        .members
                        .get_mut(id)
                        .ok_or_else(|| TestCaseError::fail(format!("CreatePod of unknown {id}")))?;
                    m.pod = PodState::Pending;
                    m.version = Some(d.version.clone());
                }
                Action::DeletePod { id } => {
                    if let Some(m) = self.members.get_mut(id) {
                        m.pod = PodState::Absent;
                        m.version = None;
                    }
                }
                Action::DeleteMember { id, .. } => {
                    self.members.remove(id);
                }
                Action::Initialize { id } => {
                    ensure(self.leader.is_none(), || "Initialize with a leader".into())?;
                    if let Some(m) = self.members.get_mut(id) {
                        m.initialized = true;
                    }
                    self.voters = BTreeSet::from([*id]);
                    self.learners.clear();
                    self.leader = Some(*id);
                    self.lag = BTreeMap::from([(*id, 0)]);
                    self.bootstrapped = true;
                }
                Action::AddLearner { id } => {
                    if let Some(m) = self.members.get_mut(id) {
                        m.initialized = true;
                    }
                    self.learners.insert(*id);
                    self.lag.insert(*id, 1_000);
                }
                Action::ChangeVoters { voters } => {
                    for id in voters {
                        ensure(
                            self.voters.contains(id) || self.learners.contains(id),
                            || format!("ChangeVoters with non-member {id}"),
                        )?;
                    }
                    for id in self.voters.difference(voters) {
                        self.lag.remove(id);
                    }
                    self.learners.retain(|id| !voters.contains(id));
                    self.voters = voters.clone();
                    if self.leader.is_some_and(|l| !voters.contains(&l)) {
                        self.leader = None;
                    }
                }
                Action::RemoveMember { id } => {
                    self.learners.remove(id);
                    self.voters.remove(id);
                    self.lag.remove(id);
                }
                Action::TransferLeader { to } => {
                    ensure(self.voters.contains(to), || format!("transfer to {to}"))?;
                    self.leader = Some(*to);
                }
            }
        }
        self.next_id = self.next_id.max(p.next_id);
        Ok(())
    }

    /// One unit of time: pods start, members catch up, a leader is elected.
    fn tick(&mut self) {
        for m in self.members.values_mut() {
            m.pod = match m.pod {
                PodState::Pending | PodState::Running { .. } => PodState::Running { ready: false },
                PodState::Terminating | PodState::Absent => PodState::Absent,
            };
            if m.pod == PodState::Absent {
                m.version = None;
            }
        }
        let membership: Vec<NodeId> = self.voters.union(&self.learners).copied().collect();
        for id in membership {
            let lag = if self.alive(id) { 0 } else { 5_000 };
            self.lag.insert(id, lag);
        }
        self.joint = false;
        let leader_ok = self
            .leader
            .is_some_and(|l| self.voters.contains(&l) && self.alive(l));
        if !leader_ok && (self.bootstrapped || self.leader.is_some()) {
            let alive: Vec<NodeId> = self
                .voters
                .iter()
                .copied()
                .filter(|id| self.alive(*id))
                .collect();
            self.leader = (!self.voters.is_empty() && alive.len() >= quorum(self.voters.len()))
                .then(|| alive[0]);
        }
        if let Some(l) = self.leader {
            self.lag.insert(l, 0);
        }
        // lockd is ready once it is a member of a cluster with a leader.
        let ready: BTreeSet<NodeId> = self
            .voters
            .union(&self.learners)
            .copied()
            .filter(|id| self.leader.is_some() && self.alive(*id))
            .collect();
        for (id, m) in self.members.iter_mut() {
            if let PodState::Running { .. } = m.pod {
                m.pod = PodState::Running {
                    ready: ready.contains(id) || m.cluster_id != CID,
                };
            }
        }
    }
}

#[derive(Debug, Clone)]
struct SimSeed {
    bootstrap: bool,
    voters: usize,
    leader: prop::sample::Index,
    perturb: Vec<(u8, bool)>,
    learners: Vec<(bool, bool)>,
    fresh: usize,
    orphans: usize,
    foreign: usize,
    joint: bool,
    spec: (u32, bool, bool),
    change: Option<(u32, bool, usize)>,
}

fn sim_seed() -> impl Strategy<Value = SimSeed> {
    (
        prop::bool::weighted(0.2),
        1usize..=7,
        any::<prop::sample::Index>(),
        prop::collection::vec((0u8..14, any::<bool>()), 7),
        prop::collection::vec((any::<bool>(), any::<bool>()), 0..=2),
        0usize..=2,
        0usize..=1,
        0usize..=1,
        prop::bool::weighted(0.1),
        (
            prop::sample::select(vec![1u32, 3, 5, 7]),
            any::<bool>(),
            any::<bool>(),
        ),
        prop::option::weighted(
            0.3,
            (
                prop::sample::select(vec![1u32, 3, 5, 7]),
                any::<bool>(),
                0usize..12,
            ),
        ),
    )
        .prop_map(
            |(
                bootstrap,
                voters,
                leader,
                perturb,
                learners,
                fresh,
                orphans,
                foreign,
                joint,
                spec,
                change,
            )| SimSeed {
                bootstrap,
                voters,
                leader,
                perturb,
                learners,
                fresh,
                orphans,
                foreign,
                joint,
                spec,
                change,
            },
        )
}

fn version(v1: bool) -> String {
    if v1 { "v1" } else { "v0" }.to_string()
}

fn healthy_member(v1: bool) -> SimMember {
    SimMember {
        pod: PodState::Running { ready: true },
        volume: VolumeState::Present,
        version: Some(version(v1)),
        initialized: true,
        cluster_id: CID.to_string(),
    }
}

/// A recoverable starting state: empty, or a cluster with a healthy quorum
/// and a few perturbations.
fn build_sim(seed: &SimSeed) -> Sim {
    let mut sim = Sim {
        members: BTreeMap::new(),
        voters: BTreeSet::new(),
        learners: BTreeSet::new(),
        leader: None,
        lag: BTreeMap::new(),
        joint: false,
        bootstrapped: false,
        next_id: 1,
    };
    if seed.bootstrap {
        return sim;
    }
    let k = seed.voters;
    let mut budget = k - quorum(k);
    for id in 1..=k as NodeId {
        let (kind, v1) = seed.perturb[(id - 1) as usize];
        let mut m = healthy_member(v1);
        let mut lag = 0;
        if kind < 7 && budget > 0 {
            budget -= 1;
            match kind {
                0 => {
                    m.pod = PodState::Absent;
                    m.version = None;
                }
                1 => m.pod = PodState::Pending,
                2 => m.pod = PodState::Running { ready: false },
                3 => lag = 5_000,
                4 => {
                    m.volume = VolumeState::Lost;
                    m.pod = PodState::Running { ready: false };
                }
                5 => m.volume = VolumeState::Absent,
                _ => m.pod = PodState::Terminating,
            }
        }
        sim.members.insert(id, m);
        sim.voters.insert(id);
        sim.lag.insert(id, lag);
    }
    let voters: Vec<NodeId> = sim.voters.iter().copied().collect();
    let leader = voters[seed.leader.index(voters.len())];
    sim.leader = Some(leader);
    sim.lag.insert(leader, 0);
    let mut next = k as NodeId + 1;
    for &(caught_up, v1) in &seed.learners {
        sim.members.insert(next, healthy_member(v1));
        sim.learners.insert(next);
        sim.lag.insert(next, if caught_up { 0 } else { 800 });
        next += 1;
    }
    for _ in 0..seed.fresh {
        let mut m = healthy_member(true);
        m.initialized = false;
        m.pod = PodState::Running { ready: false };
        sim.members.insert(next, m);
        next += 1;
    }
    for _ in 0..seed.orphans {
        let mut m = healthy_member(false);
        m.pod = PodState::Running { ready: false };
        sim.members.insert(next, m);
        next += 1;
    }
    for _ in 0..seed.foreign {
        let mut m = healthy_member(true);
        m.cluster_id = FOREIGN.to_string();
        sim.members.insert(next, m);
        next += 1;
    }
    sim.joint = seed.joint;
    sim.bootstrapped = true;
    sim.next_id = next;
    sim
}

fn desired_of(replicas: u32, v1: bool, delete_volume: bool) -> Desired {
    Desired {
        replicas,
        version: version(v1),
        caught_up_lag: 10,
        delete_volume_on_scale_down: delete_volume,
        progress_deadline: Duration::from_secs(600),
    }
}

fn converged(sim: &Sim, d: &Desired, p: &Plan) -> bool {
    let o = sim.observe();
    let v = View::new(d, &o);
    let hv = v.healthy_voters();
    p.actions.is_empty()
        && sim.voters.len() == d.replicas as usize
        && hv == sim.voters
        && sim.learners.is_empty()
        && sim
            .voters
            .iter()
            .all(|id| sim.members[id].version.as_deref() == Some(d.version.as_str()))
        && sim
            .members
            .iter()
            .all(|(id, m)| m.cluster_id != CID || sim.voters.contains(id))
}

const MAX_STEPS: usize = 120;

fn simulate(seed: &SimSeed) -> Result<(), TestCaseError> {
    let mut sim = build_sim(seed);
    let (r, v1, del) = seed.spec;
    let mut d = desired_of(r, v1, del);
    let mut outage = false;
    let mut trace: Vec<String> = Vec::new();
    let mut last_change = 0;
    for step in 0..MAX_STEPS {
        if let Some((r2, v2, at)) = seed.change {
            if step == at {
                d = desired_of(r2, v2, del);
                last_change = step;
            }
        }
        let o = sim.observe();
        let p = plan(&d, &o);
        check_plan(&d, &o, &p)?;
        let changing = seed.change.is_some_and(|(_, _, at)| step < at);
        if !changing && converged(&sim, &d, &p) {
            return Ok(());
        }
        trace.push(format!("{step}: {:?} -> {:?}", sim.voters, p.actions));

        let before = View::new(&d, &o).healthy_voters().len() >= quorum(sim.voters.len())
            && o.raft.is_some();
        let single_restart = p.actions.iter().any(|a| {
            matches!(a, Action::DeletePod { id } if Some(*id) == sim.leader && sim.voters.len() == 1)
        });
        outage |= single_restart;
        sim.apply(&d, &p)?;
        // Quorum right after the actions (before anything recovers).
        let o2 = sim.observe();
        let v2 = View::new(&d, &o2);
        let healthy = sim.voters.iter().filter(|id| v2.healthy(**id)).count();
        if before && !outage && sim.leader.is_some() {
            ensure(healthy >= quorum(sim.voters.len()), || {
                format!(
                    "quorum lost at step {step}: {healthy} healthy of {:?}\n{}",
                    sim.voters,
                    trace.join("\n")
                )
            })?;
        }
        sim.tick();
        if outage && sim.leader.is_some() {
            outage = false;
        }
    }
    Err(TestCaseError::fail(format!(
        "no convergence within {MAX_STEPS} steps (spec changed at {last_change}) to {d:?}\nfinal {sim:#?}\n{}",
        trace.join("\n")
    )))
}

proptest! {
    #![proptest_config(config())]

    /// Every invariant holds for any (even inconsistent) observed state.
    #[test]
    fn plans_of_random_states_are_safe(d in desired_strategy(), o in random_observed()) {
        let p = plan(&d, &o);
        check_plan(&d, &o, &p)?;
        // Pure and independent of the order members are listed in.
        let mut shuffled = o.clone();
        shuffled.members.reverse();
        if shuffled.members.len() > 2 {
            shuffled.members.rotate_left(1);
        }
        prop_assert_eq!(&plan(&d, &shuffled), &p);
        prop_assert_eq!(&plan(&d, &o), &p);
        // Members stuck past the deadline are reported, never acted on.
        let mut stuck = o.clone();
        let raft_ids = o.raft.iter().flat_map(|r| r.voters.iter().chain(&r.learners));
        stuck.unhealthy_for = o
            .members
            .iter()
            .map(|m| &m.id)
            .chain(raft_ids)
            .map(|id| (*id, d.progress_deadline))
            .collect();
        let s = plan(&d, &stuck);
        prop_assert_eq!(&s.actions, &p.actions);
        prop_assert_eq!(s.pdb_min_available, p.pdb_min_available);
        prop_assert_eq!(&s.health.stuck, &p.health.unhealthy);
    }

    /// Every invariant holds for realistic states too.
    #[test]
    fn plans_of_realistic_states_are_safe(seed in sim_seed(), d in desired_strategy()) {
        let sim = build_sim(&seed);
        let o = sim.observe();
        check_plan(&d, &o, &plan(&d, &o))?;
    }

    /// Repeated planning converges to exactly `replicas` healthy voters on the
    /// desired version, never losing quorum on the way.
    #[test]
    fn simulation_converges_without_losing_quorum(seed in sim_seed()) {
        simulate(&seed)?;
    }
}
