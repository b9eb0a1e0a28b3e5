//! The decisions: which actions this pass plans, per mode and rule.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::analysis::Analysis;
use super::{ids, named, Action, NodeId, PodState, VolumeState};

/// What the planner may do this pass (see the parent module's docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Never initialized: rule 1.
    Bootstrap,
    /// No healthy quorum of an existing cluster: rule 10.
    QuorumLost,
    /// Pods of intact members are recreated, nothing else.
    Frozen(Freeze),
    /// Everything else.
    Normal,
}

/// Why membership changes are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freeze {
    InvalidSpec,
    Joint,
    ForeignMember,
}

/// A step the planner would take but refuses to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Block {
    pub(super) reason: &'static str,
    pub(super) message: String,
}

pub(super) struct Planner<'a, 'b> {
    a: &'b Analysis<'a>,
    pub(super) mode: Mode,
    pub(super) actions: Vec<Action>,
    pub(super) next_id: NodeId,
    pub(super) blocks: Vec<Block>,
}

impl<'a, 'b> Planner<'a, 'b> {
    pub(super) fn run(a: &'b Analysis<'a>) -> Self {
        let mode = mode(a);
        let mut p = Planner {
            a,
            mode,
            actions: Vec::new(),
            next_id: a.first_free_id,
            blocks: Vec::new(),
        };
        match mode {
            Mode::Bootstrap => p.bootstrap(),
            Mode::QuorumLost | Mode::Frozen(_) => p.recreate_intact_pods(),
            Mode::Normal => p.normal(),
        }
        match mode {
            Mode::Frozen(Freeze::InvalidSpec) => {
                let message = a
                    .spec_error
                    .as_ref()
                    .map(|e| format!("{}; nothing changes until the spec is fixed", e.1))
                    .unwrap_or_default();
                p.block("InvalidSpec", message);
            }
            Mode::Frozen(Freeze::ForeignMember) => {
                let inside: BTreeSet<NodeId> = a
                    .foreign
                    .iter()
                    .copied()
                    .filter(|id| a.is_member(*id))
                    .collect();
                p.block(
                    "ForeignMember",
                    format!(
                        "membership changes are frozen: another cluster id is reported by {} in the membership",
                        named("member", &inside)
                    ),
                );
            }
            Mode::QuorumLost => p.block(
                "QuorumLost",
                "no healthy quorum; only pods of members with intact volumes are recreated"
                    .to_string(),
            ),
            Mode::Frozen(Freeze::Joint) => p.finish_joint(),
            Mode::Bootstrap | Mode::Normal => {}
        }
        p
    }

    fn push(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn block(&mut self, reason: &'static str, message: String) {
        self.blocks.push(Block { reason, message });
    }

    fn create_member(&mut self) {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        self.push(Action::CreateMember { id });
    }

    /// `CreatePod` for a member whose pod is absent but whose data is intact.
    fn recreate_pod(&mut self, id: NodeId) {
        let absent_with_volume = self
            .a
            .members
            .get(&id)
            .is_some_and(|m| m.pod == PodState::Absent && m.volume == VolumeState::Present);
        if absent_with_volume && !self.a.foreign.contains(&id) && !self.a.lost.contains(&id) {
            self.push(Action::CreatePod { id });
        }
    }

    /// Rules 9, 10 and frozen modes: recreate pods of intact members only
    /// (not with an empty version, which no pod can be created from).
    fn recreate_intact_pods(&mut self) {
        if self.a.desired.version.is_empty() {
            return;
        }
        let ids: Vec<NodeId> = self.a.members.keys().copied().collect();
        for id in ids {
            self.recreate_pod(id);
        }
    }

    /// Rule 1.
    fn bootstrap(&mut self) {
        let a = self.a;
        // Volumes that vanished before anything was initialized: nothing to
        // keep, the member is simply replaced.
        let gone: Vec<NodeId> = a.lost.iter().copied().collect();
        for id in gone {
            self.push(Action::DeleteMember {
                id,
                delete_volume: true,
            });
        }
        if a.pending.is_empty() {
            self.create_member();
            return;
        }
        let want = a.desired.replicas as usize;
        let surplus = a.pending.len().saturating_sub(want);
        let mut order: Vec<NodeId> = a.pending.iter().copied().collect();
        order.sort_by_key(|id| (a.fresh.contains(id), Reverse(*id)));
        let surplus: BTreeSet<NodeId> = order.into_iter().take(surplus).collect();
        for &id in &surplus {
            self.push(Action::DeleteMember {
                id,
                delete_volume: a.fresh.contains(&id) || a.desired.delete_volume_on_scale_down,
            });
        }
        let kept: Vec<NodeId> = a.pending.difference(&surplus).copied().collect();
        for &id in &kept {
            self.recreate_pod(id);
        }
        // Initialize only when every kept member answers as fresh: a member
        // that does not answer might hold an initialized cluster.
        if kept.iter().all(|id| a.fresh.contains(id)) {
            if let Some(&first) = kept.first() {
                self.push(Action::Initialize { id: first });
            }
        }
    }

    /// Rules 2 to 8 with a healthy quorum.
    fn normal(&mut self) {
        let a = self.a;
        let want = a.desired.replicas as usize;

        // Members outside the membership that only need deleting.
        for &id in a.members.keys() {
            if a.foreign.contains(&id) || a.is_member(id) {
                continue;
            }
            if a.lost.contains(&id) {
                self.push(Action::DeleteMember {
                    id,
                    delete_volume: true,
                });
            } else if a.orphans.contains(&id) {
                self.push(Action::DeleteMember {
                    id,
                    delete_volume: a.desired.delete_volume_on_scale_down,
                });
            }
        }

        // Rule 2 and 5: count what is or will be a member; create the rest.
        let v_live: BTreeSet<NodeId> = a.voters.difference(&a.lost).copied().collect();
        let l_live: BTreeSet<NodeId> = a.learners.difference(&a.lost).copied().collect();
        let total = v_live.len() + l_live.len() + a.pending.len();
        for _ in total..want {
            self.create_member();
        }

        // Rule 3: surplus pending members go first, then learners (unhealthy
        // ones first, then the highest ids); voters go by ChangeVoters below.
        let mut surplus = total.saturating_sub(want);
        let mut order: Vec<NodeId> = a.pending.iter().copied().collect();
        order.sort_by_key(|id| (a.fresh.contains(id), Reverse(*id)));
        let surplus_p: BTreeSet<NodeId> = order.into_iter().take(surplus).collect();
        surplus -= surplus_p.len();
        let mut order: Vec<NodeId> = l_live.iter().copied().collect();
        order.sort_by_key(|id| (a.healthy.contains(id), Reverse(*id)));
        let surplus_l: BTreeSet<NodeId> = order.into_iter().take(surplus).collect();
        for &id in &surplus_p {
            self.push(Action::DeleteMember {
                id,
                delete_volume: a.fresh.contains(&id) || a.desired.delete_volume_on_scale_down,
            });
        }

        // Rule 5: intact members get their pod back under the same id.
        let mut kept: BTreeSet<NodeId> = v_live.clone();
        kept.extend(l_live.difference(&surplus_l));
        kept.extend(a.pending.difference(&surplus_p));
        for &id in &kept {
            self.recreate_pod(id);
        }

        if !self.voter_change(&v_live, &surplus_l) {
            self.learner_changes(&surplus_l, &surplus_p);
        }
        if self.actions.is_empty() {
            self.upgrade(&kept);
        }
    }

    /// Rules 3, 5 and 6: at most one `ChangeVoters` (or the `TransferLeader`
    /// that must precede it). Returns whether it planned one.
    fn voter_change(&mut self, v_live: &BTreeSet<NodeId>, surplus_l: &BTreeSet<NodeId>) -> bool {
        let a = self.a;
        let want = a.desired.replicas as usize;
        let leader = a.leader();
        let scaling_down = v_live.len() > want;

        // Healthy voters, the leader first, then by id: the ones to keep.
        let mut keep: Vec<NodeId> = a.healthy_voters.iter().copied().collect();
        keep.sort_by_key(|id| (Some(*id) != leader, *id));
        // Caught-up learners that are not about to be removed, by id.
        let promote: Vec<NodeId> = a
            .learners
            .iter()
            .copied()
            .filter(|id| a.healthy.contains(id) && !surplus_l.contains(id))
            .collect();

        let (target, partial): (BTreeSet<NodeId>, bool) = if keep.len() >= want {
            (keep.iter().copied().take(want).collect(), false)
        } else if keep.len() + promote.len() >= want {
            let n = want - keep.len();
            (
                keep.iter().chain(promote.iter().take(n)).copied().collect(),
                false,
            )
        } else {
            // Not enough for the target yet: the largest odd set that keeps
            // every healthy voter, if it drops only lost voters.
            let mut t = keep.len() + promote.len();
            if t.is_multiple_of(2) {
                t = t.saturating_sub(1);
            }
            if t < keep.len() || t == 0 {
                if scaling_down {
                    self.refuse_scale_down(v_live);
                }
                return false;
            }
            let n = t - keep.len();
            (
                keep.iter().chain(promote.iter().take(n)).copied().collect(),
                true,
            )
        };
        if target == a.voters {
            return false;
        }
        let dropped: BTreeSet<NodeId> = a.voters.difference(&target).copied().collect();
        let droppable = |id: &NodeId| a.lost.contains(id) || (scaling_down && !partial);
        if !dropped.iter().all(droppable) {
            // Unhealthy voters that will come back are waited for.
            if scaling_down {
                self.refuse_scale_down(v_live);
            }
            return false;
        }
        if target.len().is_multiple_of(2) || target.is_empty() {
            return false;
        }
        if let Some(l) = leader.filter(|l| dropped.contains(l)) {
            // The leader must go: hand leadership to a healthy voter that stays.
            let to = target
                .iter()
                .copied()
                .filter(|id| *id != l && a.healthy_voters.contains(id))
                .min_by_key(|id| (!a.runs_desired(*id), *id));
            match to {
                Some(to) => self.push(Action::TransferLeader { to }),
                None => {
                    self.block(
                        "NoTransferTarget",
                        format!("leader {l} must leave the voters but no healthy voter stays to take over"),
                    );
                    return false;
                }
            }
            return true;
        }
        self.push(Action::ChangeVoters { voters: target });
        true
    }

    fn refuse_scale_down(&mut self, v_live: &BTreeSet<NodeId>) {
        let a = self.a;
        let unhealthy: BTreeSet<NodeId> = v_live.difference(&a.healthy_voters).copied().collect();
        self.block(
            "ScaleDownRefused",
            format!(
                "scaling down to {} voters needs {} healthy voters to keep; healthy voters: {}; unhealthy voters: {}",
                a.desired.replicas,
                a.desired.replicas,
                ids(&a.healthy_voters),
                ids(&unhealthy),
            ),
        );
    }

    /// Rules 2 and 5: learner-only membership changes (safe together).
    fn learner_changes(&mut self, surplus_l: &BTreeSet<NodeId>, surplus_p: &BTreeSet<NodeId>) {
        let a = self.a;
        let lost_learners: Vec<NodeId> = a.learners.intersection(&a.lost).copied().collect();
        for id in lost_learners {
            self.push(Action::RemoveMember { id });
        }
        for &id in surplus_l {
            self.push(Action::RemoveMember { id });
        }
        let joiners: Vec<NodeId> = a.fresh.difference(surplus_p).copied().collect();
        for id in joiners {
            self.push(Action::AddLearner { id });
        }
    }

    /// Rule 4: at most one restart, only when nothing else is planned.
    fn upgrade(&mut self, kept: &BTreeSet<NodeId>) {
        let a = self.a;
        let outdated: Vec<NodeId> = a.outdated.intersection(kept).copied().collect();
        if outdated.is_empty() {
            return;
        }
        let leader = a.leader();
        // Members already down: restarting them costs nothing. Not the
        // leader, though: it still leads, and hands over first. Other members
        // that are down on the old version do not hold this up (they would
        // hold each other up forever), but any other member on its way back
        // (pod gone or starting, or restarted and catching up) does.
        if let Some(&id) = outdated
            .iter()
            .find(|id| !a.healthy.contains(id) && Some(**id) != leader)
        {
            let in_flight: BTreeSet<NodeId> = a
                .voters
                .union(&a.learners)
                .chain(a.pending.iter())
                .copied()
                .filter(|other| *other != id && !a.healthy.contains(other))
                .filter(|other| {
                    let broken_outdated = a.outdated.contains(other)
                        && a.members
                            .get(other)
                            .is_some_and(|m| matches!(m.pod, PodState::Running { .. }));
                    !broken_outdated
                })
                .collect();
            if in_flight.is_empty() {
                self.push(Action::DeletePod { id });
            } else {
                self.block(
                    "UpgradePaused",
                    format!(
                        "restart of member {id} waits for {} to come back and catch up",
                        named("member", &in_flight)
                    ),
                );
            }
            return;
        }
        if let Some(l) = leader.filter(|l| outdated.contains(l) && !a.healthy.contains(l)) {
            let to = a
                .healthy_voters
                .iter()
                .copied()
                .filter(|id| *id != l)
                .min_by_key(|id| (!a.runs_desired(*id), *id));
            match to {
                Some(to) => self.push(Action::TransferLeader { to }),
                None => self.block(
                    "UpgradePaused",
                    format!(
                        "leader {l} is outdated and unhealthy but no healthy voter can take over"
                    ),
                ),
            }
            return;
        }
        // Everything outdated is healthy. Restart only a fully healthy,
        // settled cluster.
        let mut unhealthy = a.unhealthy_or_pending();
        unhealthy.extend(&a.lost);
        if !unhealthy.is_empty() {
            self.block(
                "UpgradePaused",
                format!(
                    "upgrade of {} waits for {} to be healthy and caught up",
                    named("member", &outdated),
                    named("member", &unhealthy)
                ),
            );
            return;
        }
        let want = a.desired.replicas as usize;
        if a.voters.len() != want {
            self.block(
                "UpgradePaused",
                format!(
                    "upgrade of {} waits until the cluster has {want} voters (now {})",
                    ids(&outdated),
                    a.voters.len()
                ),
            );
            return;
        }
        // Learners, then followers, by id.
        if let Some(&id) = outdated
            .iter()
            .filter(|id| Some(**id) != leader)
            .min_by_key(|id| (a.voters.contains(id), **id))
        {
            let voter = a.voters.contains(&id);
            if !voter || a.healthy_voters.len() > a.quorum() {
                self.push(Action::DeletePod { id });
            } else {
                self.block(
                    "UpgradePaused",
                    format!("restarting voter {id} would leave fewer healthy voters than a quorum"),
                );
            }
            return;
        }
        // Only the leader is left.
        let Some(l) = leader else { return };
        if a.voters.len() == 1 && want == 1 {
            // A one-member cluster has no redundancy: restarting it is the
            // only way to upgrade it (the documented exception to rule 7).
            self.push(Action::DeletePod { id: l });
            return;
        }
        let to = a
            .healthy_voters
            .iter()
            .copied()
            .find(|id| *id != l && a.runs_desired(*id));
        match to {
            Some(to) => self.push(Action::TransferLeader { to }),
            None => self.block(
                "UpgradePaused",
                format!("leader {l} is outdated but no healthy follower runs the desired version to take over"),
            ),
        }
    }
}

impl Planner<'_, '_> {
    /// Finishes a joint-consensus change left behind (parent module docs).
    fn finish_joint(&mut self) {
        let a = self.a;
        let Some(target) = a.raft.and_then(|r| r.joint_target.as_ref()) else {
            return;
        };
        let healthy = target
            .iter()
            .filter(|id| a.healthy_voters.contains(id))
            .count();
        let why_not = if target.len() % 2 == 0 {
            Some(format!("its voter set {} is even", ids(target)))
        } else if target.iter().any(|id| a.foreign.contains(id)) {
            Some(format!(
                "its voter set {} names a member of another cluster",
                ids(target)
            ))
        } else if healthy < super::quorum(target.len()) {
            Some(format!(
                "only {healthy} of its voters {} are healthy, fewer than a quorum",
                ids(target)
            ))
        } else {
            None
        };
        match why_not {
            None => self.push(Action::ChangeVoters {
                voters: target.clone(),
            }),
            Some(why) => self.block(
                "JointConsensus",
                format!("a joint-consensus change cannot be finished: {why}"),
            ),
        }
    }
}

/// Chooses the mode (see the parent module's docs).
fn mode(a: &Analysis<'_>) -> Mode {
    let Some(raft) = a.raft else {
        if a.evidence {
            return Mode::QuorumLost;
        }
        if a.spec_error.is_some() {
            return Mode::Frozen(Freeze::InvalidSpec);
        }
        return Mode::Bootstrap;
    };
    if a.spec_error.is_some() {
        return Mode::Frozen(Freeze::InvalidSpec);
    }
    if raft.joint {
        return Mode::Frozen(Freeze::Joint);
    }
    if a.foreign.iter().any(|id| a.is_member(*id)) {
        return Mode::Frozen(Freeze::ForeignMember);
    }
    if a.healthy_voters.len() < a.quorum() || a.voters.is_empty() {
        return Mode::QuorumLost;
    }
    Mode::Normal
}
