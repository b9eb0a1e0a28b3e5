//! Unit tests, one group per rule of the parent module's docs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;

const CID: &str = "cluster-a";
const V1: &str = "v1";

fn desired(replicas: u32) -> Desired {
    Desired {
        replicas,
        version: V1.to_string(),
        caught_up_lag: 10,
        delete_volume_on_scale_down: true,
        progress_deadline: Duration::from_secs(600),
    }
}

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// A test world: an `Observed` with builder methods.
#[derive(Clone)]
struct W(Observed);

impl W {
    fn empty() -> Self {
        W(Observed {
            cluster_id: CID.to_string(),
            next_id: 1,
            bootstrapped: false,
            members: Vec::new(),
            raft: None,
            unhealthy_for: BTreeMap::new(),
        })
    }

    /// Healthy voters on V1, caught up, `leader` leading.
    fn cluster(voters: &[NodeId], leader: NodeId) -> Self {
        let mut w = W::empty();
        w.0.bootstrapped = true;
        w.0.next_id = voters.iter().max().copied().unwrap_or(0) + 1;
        for &id in voters {
            w.0.members.push(ObservedMember {
                id,
                pod: PodState::Running { ready: true },
                volume: VolumeState::Present,
                version: Some(V1.to_string()),
                status: Some(MemberStatus {
                    cluster_id: CID.to_string(),
                    initialized: true,
                    role: if id == leader {
                        Role::Leader
                    } else {
                        Role::Follower
                    },
                    term: 3,
                    leader_id: Some(leader),
                    applied_index: 100,
                }),
            });
        }
        w.0.raft = Some(RaftView {
            leader,
            term: 3,
            voters: set(voters),
            learners: BTreeSet::new(),
            joint: false,
            joint_target: None,
            lag: voters.iter().map(|id| (*id, 0)).collect(),
            commit_index: 100,
        });
        w
    }

    fn m(&mut self, id: NodeId) -> &mut ObservedMember {
        let pos = self.0.members.iter().position(|m| m.id == id);
        let pos = match pos {
            Some(p) => p,
            None => {
                self.0.members.push(ObservedMember {
                    id,
                    pod: PodState::Absent,
                    volume: VolumeState::Present,
                    version: None,
                    status: None,
                });
                self.0.members.len() - 1
            }
        };
        &mut self.0.members[pos]
    }

    fn raft(&mut self) -> &mut RaftView {
        self.0.raft.as_mut().expect("test world has a raft view")
    }

    /// A fresh member: running (not ready: lockd is ready only once it is
    /// a member), answering uninitialized.
    fn fresh(mut self, id: NodeId) -> Self {
        let m = self.m(id);
        m.pod = PodState::Running { ready: false };
        m.volume = VolumeState::Present;
        m.version = Some(V1.to_string());
        m.status = Some(MemberStatus {
            cluster_id: CID.to_string(),
            initialized: false,
            role: Role::Uninitialized,
            term: 0,
            leader_id: None,
            applied_index: 0,
        });
        self.0.next_id = self.0.next_id.max(id + 1);
        self
    }

    /// A freshly created member whose pod is not running yet.
    fn starting(mut self, id: NodeId) -> Self {
        let m = self.m(id);
        m.pod = PodState::Pending;
        m.version = Some(V1.to_string());
        self.0.next_id = self.0.next_id.max(id + 1);
        self
    }

    /// A member back up: running, ready, initialized, on V1.
    fn up(self, id: NodeId) -> Self {
        let mut w = self.fresh(id);
        w.m(id).pod = PodState::Running { ready: true };
        if let Some(s) = w.m(id).status.as_mut() {
            s.initialized = true;
            s.role = Role::Follower;
        }
        w
    }

    /// A learner with the given lag.
    fn learner(self, id: NodeId, lag: u64) -> Self {
        let mut w = self.fresh(id);
        w.m(id).pod = PodState::Running { ready: true };
        if let Some(s) = w.m(id).status.as_mut() {
            s.initialized = true;
            s.role = Role::Learner;
        }
        w.raft().learners.insert(id);
        w.raft().lag.insert(id, lag);
        w
    }

    fn lag(mut self, id: NodeId, lag: u64) -> Self {
        self.raft().lag.insert(id, lag);
        self
    }

    fn pod(mut self, id: NodeId, pod: PodState) -> Self {
        let m = self.m(id);
        m.pod = pod;
        if pod == PodState::Absent {
            m.version = None;
        }
        if !pod.is_ready() {
            m.status = None;
        }
        self
    }

    fn volume(mut self, id: NodeId, volume: VolumeState) -> Self {
        self.m(id).volume = volume;
        self
    }

    fn version(mut self, id: NodeId, v: &str) -> Self {
        self.m(id).version = Some(v.to_string());
        self
    }

    fn all_version(mut self, v: &str) -> Self {
        for m in &mut self.0.members {
            if m.version.is_some() {
                m.version = Some(v.to_string());
            }
        }
        self
    }

    fn cluster_id(mut self, id: NodeId, cid: &str) -> Self {
        if let Some(s) = self.m(id).status.as_mut() {
            s.cluster_id = cid.to_string();
        }
        self
    }

    /// Drops a member from the membership (as ChangeVoters/RemoveMember do).
    fn not_member(mut self, id: NodeId) -> Self {
        let r = self.raft();
        r.voters.remove(&id);
        r.learners.remove(&id);
        r.lag.remove(&id);
        self
    }

    fn plan(&self, d: &Desired) -> Plan {
        plan(d, &self.0)
    }
}

fn cond(p: &Plan, kind: ConditionKind) -> &ConditionReport {
    p.condition(kind).expect("every kind is reported")
}

fn voters(ids: &[NodeId]) -> Action {
    Action::ChangeVoters { voters: set(ids) }
}

// ---- rule 1: bootstrap ----------------------------------------------------

#[test]
fn bootstrap_creates_the_first_member() {
    let p = W::empty().plan(&desired(3));
    assert_eq!(p.actions, vec![Action::CreateMember { id: 1 }]);
    assert_eq!(p.next_id, 2);
    assert_eq!(p.phase, Phase::Pending);
    assert!(cond(&p, ConditionKind::Progressing).status);
    assert_eq!(cond(&p, ConditionKind::Available).reason, "NotBootstrapped");
}

#[test]
fn bootstrap_waits_for_the_first_member_then_initializes_it() {
    let p = W::empty().starting(1).plan(&desired(3));
    assert!(p.actions.is_empty());
    assert_eq!(p.phase, Phase::Bootstrapping);

    let p = W::empty().fresh(1).plan(&desired(3));
    assert_eq!(p.actions, vec![Action::Initialize { id: 1 }]);
    assert_eq!(cond(&p, ConditionKind::Progressing).reason, "Initializing");
}

#[test]
fn bootstrap_initializes_only_the_lowest_fresh_member() {
    let p = W::empty().fresh(4).fresh(2).fresh(3).plan(&desired(3));
    assert_eq!(p.actions, vec![Action::Initialize { id: 2 }]);
}

#[test]
fn bootstrap_waits_while_a_member_does_not_answer() {
    // Member 1 might hold data: never initialize beside it.
    let p = W::empty().fresh(2).starting(1).plan(&desired(3));
    assert!(p.actions.is_empty());
}

#[test]
fn bootstrap_recreates_an_absent_pod_and_replaces_a_vanished_volume() {
    let w = W::empty().starting(1).pod(1, PodState::Absent);
    assert_eq!(
        w.plan(&desired(1)).actions,
        vec![Action::CreatePod { id: 1 }]
    );

    let w = W::empty().starting(1).volume(1, VolumeState::Absent);
    let p = w.plan(&desired(1));
    assert_eq!(
        p.actions,
        vec![
            Action::DeleteMember {
                id: 1,
                delete_volume: true
            },
            Action::CreateMember { id: 2 }
        ]
    );
    assert_eq!(p.next_id, 3);
}

#[test]
fn bootstrap_never_initializes_twice() {
    // The controller recorded an earlier initialization: no second cluster.
    let mut w = W::empty().fresh(5);
    w.0.bootstrapped = true;
    let p = w.plan(&desired(3));
    assert!(p.actions.is_empty());
    assert_eq!(cond(&p, ConditionKind::QuorumAtRisk).reason, "QuorumLost");

    // A member reporting itself initialized is evidence too.
    let mut w = W::empty().fresh(5).fresh(1);
    if let Some(s) = w.m(1).status.as_mut() {
        s.initialized = true;
    }
    assert!(w.plan(&desired(3)).actions.is_empty());
}

#[test]
fn bootstrap_deletes_surplus_fresh_members() {
    let p = W::empty().fresh(1).fresh(2).plan(&desired(1));
    assert_eq!(
        p.actions,
        vec![
            Action::DeleteMember {
                id: 2,
                delete_volume: true
            },
            Action::Initialize { id: 1 }
        ]
    );
}

#[test]
fn after_initialize_the_other_members_are_created_and_join() {
    let w = W::cluster(&[1], 1);
    let p = w.plan(&desired(3));
    assert_eq!(
        p.actions,
        vec![
            Action::CreateMember { id: 2 },
            Action::CreateMember { id: 3 }
        ]
    );
    assert_eq!(p.next_id, 4);
    assert_eq!(p.phase, Phase::Scaling);
}

// ---- rule 2: joining ------------------------------------------------------

#[test]
fn fresh_member_becomes_a_learner() {
    let p = W::cluster(&[1], 1).fresh(2).fresh(3).plan(&desired(3));
    assert_eq!(
        p.actions,
        vec![Action::AddLearner { id: 2 }, Action::AddLearner { id: 3 }]
    );
    assert_eq!(
        cond(&p, ConditionKind::Progressing).reason,
        "AddingLearners"
    );
}

#[test]
fn one_to_three_promotes_both_learners_together() {
    let w = W::cluster(&[1], 1).learner(2, 0).learner(3, 500);
    assert!(w.plan(&desired(3)).actions.is_empty(), "3 is not caught up");
    let p = w.lag(3, 10).plan(&desired(3));
    assert_eq!(p.actions, vec![voters(&[1, 2, 3])]);
}

#[test]
fn three_to_five_creates_adds_and_promotes_in_one_change() {
    let w = W::cluster(&[1, 2, 3], 2);
    let d = desired(5);
    assert_eq!(
        w.plan(&d).actions,
        vec![
            Action::CreateMember { id: 4 },
            Action::CreateMember { id: 5 }
        ]
    );
    assert!(w
        .clone()
        .starting(4)
        .starting(5)
        .plan(&d)
        .actions
        .is_empty());
    assert_eq!(
        w.clone().fresh(4).fresh(5).plan(&d).actions,
        vec![Action::AddLearner { id: 4 }, Action::AddLearner { id: 5 }]
    );
    let w = w.learner(4, 0).learner(5, 11);
    let p = w.plan(&d);
    assert!(p.actions.is_empty(), "never 4 voters: {:?}", p.actions);
    assert_eq!(w.lag(5, 3).plan(&d).actions, vec![voters(&[1, 2, 3, 4, 5])]);
}

#[test]
fn a_learner_with_unknown_lag_is_not_caught_up() {
    let w = W::cluster(&[1], 1).learner(2, 0).learner(3, 0);
    let mut w2 = w.clone();
    w2.raft().lag.remove(&3);
    assert!(w2.plan(&desired(3)).actions.is_empty());
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[1, 2, 3])]);
}

#[test]
fn three_to_seven_promotes_in_odd_steps() {
    let w = W::cluster(&[1, 2, 3], 1)
        .learner(4, 0)
        .learner(5, 0)
        .learner(6, 0)
        .learner(7, 99);
    assert_eq!(w.plan(&desired(7)).actions, vec![voters(&[1, 2, 3, 4, 5])]);
}

// ---- rule 3: scale-down ---------------------------------------------------

#[test]
fn scale_down_keeps_the_leader_and_lowest_ids() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 1);
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[1, 2, 3])]);
    let w = W::cluster(&[1, 2, 3, 4, 5], 5);
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![voters(&[1, 2, 5])]);
    assert_eq!(p.phase, Phase::Scaling);
}

#[test]
fn scale_down_drops_unhealthy_voters_first() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 5).pod(2, PodState::Pending);
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[1, 3, 5])]);
    let w = W::cluster(&[1, 2, 3, 4, 5], 5).volume(1, VolumeState::Lost);
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[2, 3, 5])]);
}

#[test]
fn scale_down_transfers_leadership_before_dropping_an_unhealthy_leader() {
    // The leader's pod is not ready: it is not healthy, so it goes.
    let w = W::cluster(&[1, 2, 3, 4, 5], 4).pod(4, PodState::Running { ready: false });
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![Action::TransferLeader { to: 1 }]);
}

#[test]
fn scale_down_deletes_removed_members_afterwards() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 1).not_member(4).not_member(5);
    let p = w.plan(&desired(3));
    assert_eq!(
        p.actions,
        vec![
            Action::DeleteMember {
                id: 4,
                delete_volume: true
            },
            Action::DeleteMember {
                id: 5,
                delete_volume: true
            }
        ]
    );
    let mut d = desired(3);
    d.delete_volume_on_scale_down = false;
    assert_eq!(
        w.plan(&d).actions[0],
        Action::DeleteMember {
            id: 4,
            delete_volume: false
        }
    );
}

#[test]
fn scale_down_is_refused_without_enough_healthy_voters() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .pod(3, PodState::Pending)
        .pod(4, PodState::Pending)
        .pod(5, PodState::Pending);
    // 2 healthy of 5: no quorum at all, frozen.
    let p = w.plan(&desired(3));
    assert!(p.actions.iter().all(|a| !a.is_membership()));

    // 3 healthy of 5, scaling to 5 -> 3 works from them...
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .pod(4, PodState::Pending)
        .pod(5, PodState::Pending);
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[1, 2, 3])]);

    // ...but 7 -> 5 with 4 healthy is refused.
    let w = W::cluster(&[1, 2, 3, 4, 5, 6, 7], 1)
        .pod(5, PodState::Pending)
        .pod(6, PodState::Pending)
        .pod(7, PodState::Pending);
    let p = w.plan(&desired(5));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    let c = cond(&p, ConditionKind::Degraded);
    assert!(c.status);
    assert_eq!(c.reason, "ScaleDownRefused");
}

#[test]
fn scale_down_removes_surplus_learners_and_pending_members_first() {
    let w = W::cluster(&[1, 2, 3], 1)
        .learner(4, 0)
        .learner(5, 0)
        .fresh(6);
    let p = w.plan(&desired(3));
    assert_eq!(
        p.actions,
        vec![
            Action::DeleteMember {
                id: 6,
                delete_volume: true
            },
            Action::RemoveMember { id: 4 },
            Action::RemoveMember { id: 5 },
        ]
    );
}

// ---- rule 4: rolling upgrade ----------------------------------------------

#[test]
fn upgrade_restarts_followers_by_id_then_the_leader_after_a_transfer() {
    let d = desired(3);
    let w = W::cluster(&[1, 2, 3], 2).all_version("v0");
    let p = w.plan(&d);
    assert_eq!(p.actions, vec![Action::DeletePod { id: 1 }]);
    assert_eq!(p.phase, Phase::Upgrading);

    // 1 restarted and caught up; 3 next, never the leader.
    let w = w.version(1, V1);
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 3 }]);

    // Only the leader is outdated: transfer first, to an upgraded follower.
    let w = w.version(3, V1);
    assert_eq!(w.plan(&d).actions, vec![Action::TransferLeader { to: 1 }]);
}

#[test]
fn upgrade_recreates_the_restarted_pod_and_waits_for_it() {
    let d = desired(3);
    let w = W::cluster(&[1, 2, 3], 2).all_version("v0");
    let w = w.pod(1, PodState::Absent);
    assert_eq!(w.plan(&d).actions, vec![Action::CreatePod { id: 1 }]);
    let w = w.pod(1, PodState::Pending).version(1, V1);
    let p = w.plan(&d);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(cond(&p, ConditionKind::Degraded).reason, "UpgradePaused");
    // Back and ready but not caught up yet: still waiting.
    let w = w.up(1).lag(1, 1_000);
    assert!(w.plan(&d).actions.is_empty());
    // Caught up: next member.
    let w = w.lag(1, 0);
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 3 }]);
}

#[test]
fn upgrade_restarts_members_that_are_already_down_first() {
    let d = desired(3);
    let w = W::cluster(&[1, 2, 3], 1)
        .all_version("v0")
        .pod(3, PodState::Running { ready: false })
        .version(3, "v0");
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 3 }]);
    // A lagging voter is down too.
    let w = W::cluster(&[1, 2, 3], 1).all_version("v0").lag(3, 5_000);
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 3 }]);
}

#[test]
fn members_down_on_the_old_version_do_not_hold_each_other_up() {
    let d = desired(5);
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .all_version("v0")
        .pod(4, PodState::Running { ready: false })
        .pod(5, PodState::Running { ready: false });
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 4 }]);
    // 4 is on its way back: 5 waits.
    let w = w.pod(4, PodState::Pending).version(4, V1);
    let p = w.plan(&d);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(cond(&p, ConditionKind::Degraded).reason, "UpgradePaused");
    // 4 is back and caught up: 5 next.
    let w = w.up(4);
    assert_eq!(w.plan(&d).actions, vec![Action::DeletePod { id: 5 }]);
}

#[test]
fn a_down_leader_hands_over_before_its_restart() {
    let w = W::cluster(&[1, 2, 3], 2)
        .all_version("v0")
        .pod(2, PodState::Running { ready: false })
        .version(1, V1);
    assert_eq!(
        w.plan(&desired(3)).actions,
        vec![Action::TransferLeader { to: 1 }]
    );
}

#[test]
fn upgrade_pauses_while_a_voter_is_unhealthy() {
    let d = desired(5);
    // 4 is down and already on the new version: 1, 2, 3, 5 must wait.
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .all_version("v0")
        .pod(4, PodState::Pending)
        .version(4, V1);
    let p = w.plan(&d);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    let c = cond(&p, ConditionKind::Degraded);
    assert!(c.status);
    assert_eq!(c.reason, "UpgradePaused");
}

#[test]
fn upgrade_restarts_a_lagging_learner_first() {
    // 5 caught up and current, 4 lagging and outdated: restarting 4 costs
    // nothing, the voters wait.
    let w = W::cluster(&[1, 2, 3], 1)
        .all_version("v0")
        .learner(4, 500)
        .version(4, "v0")
        .learner(5, 0);
    assert_eq!(
        w.plan(&desired(5)).actions,
        vec![Action::DeletePod { id: 4 }]
    );
}

#[test]
fn caught_up_learners_are_promoted_before_any_restart() {
    let w = W::cluster(&[1, 2, 3], 1)
        .learner(4, 0)
        .learner(5, 0)
        .all_version("v0");
    assert_eq!(w.plan(&desired(5)).actions, vec![voters(&[1, 2, 3, 4, 5])]);
}

#[test]
fn single_member_cluster_is_restarted_in_place() {
    let w = W::cluster(&[1], 1).all_version("v0");
    let p = w.plan(&desired(1));
    assert_eq!(p.actions, vec![Action::DeletePod { id: 1 }]);
}

#[test]
fn leader_is_never_restarted_while_others_are_outdated() {
    let w = W::cluster(&[1, 2, 3], 1).all_version("v0");
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![Action::DeletePod { id: 2 }]);
}

#[test]
fn upgrade_waits_for_membership_changes() {
    let w = W::cluster(&[1, 2, 3], 1)
        .all_version("v0")
        .fresh(4)
        .fresh(5);
    let p = w.plan(&desired(5));
    assert_eq!(
        p.actions,
        vec![Action::AddLearner { id: 4 }, Action::AddLearner { id: 5 }]
    );
}

// ---- rule 5: failed members -----------------------------------------------

#[test]
fn lost_voter_is_replaced_under_a_new_id() {
    let d = desired(3);
    let w = W::cluster(&[1, 2, 3], 1).volume(3, VolumeState::Lost);
    let p = w.plan(&d);
    assert_eq!(p.actions, vec![Action::CreateMember { id: 4 }]);
    assert_eq!(p.phase, Phase::Degraded);
    assert_eq!(
        cond(&p, ConditionKind::QuorumAtRisk).reason,
        "NoFailureTolerance"
    );

    let w = w.fresh(4);
    assert_eq!(w.plan(&d).actions, vec![Action::AddLearner { id: 4 }]);
    let w = w.learner(4, 2_000);
    assert!(w.plan(&d).actions.is_empty());
    let w = w.lag(4, 1);
    assert_eq!(w.plan(&d).actions, vec![voters(&[1, 2, 4])]);
    let w = w.not_member(3);
    let mut w = w;
    w.raft().voters.insert(4);
    w.raft().learners.remove(&4);
    assert_eq!(
        w.plan(&d).actions,
        vec![Action::DeleteMember {
            id: 3,
            delete_volume: true
        }]
    );
}

#[test]
fn vanished_voter_is_replaced_too() {
    // Neither pod nor volume is observed any more.
    let mut w = W::cluster(&[1, 2, 3], 1);
    w.0.members.retain(|m| m.id != 2);
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![Action::CreateMember { id: 4 }]);
    assert!(p.health.lost.contains(&2));
}

#[test]
fn two_lost_of_five_shrinks_to_three_healthy_then_grows() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .volume(4, VolumeState::Absent)
        .volume(5, VolumeState::Lost);
    let p = w.plan(&desired(5));
    // A 3-voter cluster of 3 healthy tolerates one failure; 5 with 3 healthy none.
    assert_eq!(
        p.actions,
        vec![
            Action::CreateMember { id: 6 },
            Action::CreateMember { id: 7 },
            voters(&[1, 2, 3])
        ]
    );
}

#[test]
fn lost_learner_is_removed() {
    let w = W::cluster(&[1, 2, 3], 1)
        .learner(4, 0)
        .volume(4, VolumeState::Lost);
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![Action::RemoveMember { id: 4 }]);
}

#[test]
fn absent_pod_with_intact_volume_is_recreated_under_its_id() {
    let w = W::cluster(&[1, 2, 3], 1).pod(2, PodState::Absent);
    assert_eq!(
        w.plan(&desired(3)).actions,
        vec![Action::CreatePod { id: 2 }]
    );
    // Never for a lost volume.
    let w = W::cluster(&[1, 2, 3], 1)
        .pod(2, PodState::Absent)
        .volume(2, VolumeState::Lost);
    assert!(!w
        .plan(&desired(3))
        .actions
        .contains(&Action::CreatePod { id: 2 }));
}

// ---- rule 6: odd voter sets -----------------------------------------------

#[test]
fn even_voter_set_is_never_the_target() {
    // 1 voter + 1 caught-up learner with 3 wanted: waits (never 2).
    let w = W::cluster(&[1], 1).learner(2, 0).starting(3);
    assert!(w.plan(&desired(3)).actions.is_empty());
    // An even set observed (4 voters) is fixed to an odd one.
    let w = W::cluster(&[1, 2, 3, 4], 1);
    assert_eq!(w.plan(&desired(3)).actions, vec![voters(&[1, 2, 3])]);
    let w = W::cluster(&[1, 2, 3, 4], 1).learner(5, 0);
    assert_eq!(w.plan(&desired(5)).actions, vec![voters(&[1, 2, 3, 4, 5])]);
}

#[test]
fn temporarily_unhealthy_voter_is_not_replaced() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 1)
        .pod(4, PodState::Pending)
        .pod(5, PodState::Pending);
    let p = w.plan(&desired(5));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

// ---- rule 7: quorum -------------------------------------------------------

#[test]
fn no_restart_of_a_healthy_voter_at_quorum() {
    // 3 voters, one down on the new version: the two healthy ones wait.
    let w = W::cluster(&[1, 2, 3], 1)
        .all_version("v0")
        .pod(3, PodState::Pending)
        .version(3, V1);
    assert!(w.plan(&desired(3)).actions.is_empty());
}

#[test]
fn quorum_lost_with_leader_only_recreates_pods() {
    let w = W::cluster(&[1, 2, 3], 1)
        .pod(2, PodState::Absent)
        .pod(3, PodState::Pending)
        .volume(3, VolumeState::Lost);
    let p = w.plan(&desired(3));
    assert_eq!(p.actions, vec![Action::CreatePod { id: 2 }]);
    assert_eq!(p.phase, Phase::Failed);
}

#[test]
fn lagging_but_serving_voters_are_degraded_not_failed() {
    // Right after a leadership change the new leader reports its followers
    // far behind until it has matched them: no action, but not "Failed".
    let w = W::cluster(&[1, 2, 3], 1).lag(2, 10_000).lag(3, 10_000);
    let p = w.plan(&desired(3));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.phase, Phase::Degraded);
}

// ---- rule 8: cluster id mismatch --------------------------------------------

#[test]
fn foreign_member_is_never_added_nor_touched() {
    let w = W::cluster(&[1, 2, 3], 1).fresh(4).cluster_id(4, "other");
    let p = w.plan(&desired(3));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    let c = cond(&p, ConditionKind::ClusterIDMismatch);
    assert!(c.status);
    assert!(c.message.contains('4'), "{}", c.message);

    // Scaling up does not count it: a new member is created instead.
    let p = w.plan(&desired(5));
    assert_eq!(
        p.actions,
        vec![
            Action::CreateMember { id: 5 },
            Action::CreateMember { id: 6 }
        ]
    );
}

#[test]
fn foreign_member_is_never_initialized() {
    let w = W::empty().fresh(1).cluster_id(1, "other");
    let p = w.plan(&desired(1));
    assert_eq!(p.actions, vec![Action::CreateMember { id: 2 }]);
    let w = w.fresh(2);
    assert_eq!(
        w.plan(&desired(1)).actions,
        vec![Action::Initialize { id: 2 }]
    );
}

#[test]
fn foreign_member_in_the_membership_freezes_changes() {
    let w = W::cluster(&[1, 2, 3], 1)
        .cluster_id(3, "other")
        .pod(2, PodState::Absent);
    let p = w.plan(&desired(5));
    assert_eq!(p.actions, vec![Action::CreatePod { id: 2 }]);
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(cond(&p, ConditionKind::Degraded).reason, "ForeignMember");
}

// ---- rule 9: invalid spec ---------------------------------------------------

#[test]
fn even_or_out_of_range_replicas_change_nothing() {
    for replicas in [0, 2, 4, 11] {
        let w = W::cluster(&[1, 2, 3], 1).pod(2, PodState::Absent).fresh(4);
        let p = w.plan(&desired(replicas));
        assert_eq!(p.actions, vec![Action::CreatePod { id: 2 }], "{replicas}");
        let c = cond(&p, ConditionKind::InvalidSpec);
        assert!(c.status);
        assert!(c.reason == "EvenReplicas" || c.reason == "ReplicasOutOfRange");
        assert_eq!(p.phase, Phase::Failed);
    }
    let p = W::empty().plan(&desired(2));
    assert!(p.actions.is_empty());
    let mut d = desired(3);
    d.version.clear();
    let p = W::cluster(&[1, 2, 3], 1).pod(2, PodState::Absent).plan(&d);
    assert!(p.actions.is_empty());
    assert_eq!(cond(&p, ConditionKind::InvalidSpec).reason, "EmptyVersion");
}

// ---- rule 10: quorum lost ---------------------------------------------------

#[test]
fn quorum_lost_only_recreates_intact_pods() {
    let mut w = W::cluster(&[1, 2, 3], 1)
        .pod(1, PodState::Absent)
        .pod(2, PodState::Absent)
        .volume(2, VolumeState::Lost)
        .all_version("v0");
    w.0.raft = None;
    let p = w.plan(&desired(5));
    assert_eq!(p.actions, vec![Action::CreatePod { id: 1 }]);
    let c = cond(&p, ConditionKind::QuorumAtRisk);
    assert!(c.status);
    assert_eq!(c.reason, "QuorumLost");
    assert!(!cond(&p, ConditionKind::Available).status);
    assert_eq!(p.phase, Phase::Failed);
    // Only member 3's pod exists; no eviction allowed.
    assert_eq!(p.pdb_min_available, 1);
}

// ---- rule 11: PodDisruptionBudget ---------------------------------------------

#[test]
fn pdb_allows_exactly_the_tolerated_failures() {
    let p = W::cluster(&[1, 2, 3], 1).plan(&desired(3));
    assert_eq!(p.pdb_min_available, 2);
    let p = W::cluster(&[1, 2, 3, 4, 5], 1).plan(&desired(5));
    assert_eq!(p.pdb_min_available, 3);
    let p = W::cluster(&[1], 1).plan(&desired(1));
    assert_eq!(p.pdb_min_available, 1);
}

#[test]
fn pdb_blocks_evictions_while_anything_is_in_flight() {
    // A restart in progress.
    let p = W::cluster(&[1, 2, 3, 4, 5], 1)
        .pod(3, PodState::Pending)
        .plan(&desired(5));
    assert_eq!(p.pdb_min_available, 5);
    // A joining learner.
    let p = W::cluster(&[1, 2, 3], 1).learner(4, 100).plan(&desired(3));
    assert_eq!(p.pdb_min_available, 4);
    // An action planned (upgrade restart).
    let p = W::cluster(&[1, 2, 3], 1)
        .all_version("v0")
        .plan(&desired(3));
    assert_eq!(p.pdb_min_available, 3);
}

// ---- rule 12: phase and conditions ----------------------------------------------

#[test]
fn converged_cluster_reports_running() {
    let p = W::cluster(&[1, 2, 3], 2).plan(&desired(3));
    assert!(p.actions.is_empty());
    assert_eq!(p.phase, Phase::Running);
    let kinds: Vec<ConditionKind> = p.conditions.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, ConditionKind::ALL.to_vec());
    assert!(cond(&p, ConditionKind::Available).status);
    let c = cond(&p, ConditionKind::Progressing);
    assert!(!c.status);
    assert_eq!(c.reason, "Converged");
    assert!(!cond(&p, ConditionKind::Degraded).status);
    assert!(!cond(&p, ConditionKind::QuorumAtRisk).status);
    assert!(!cond(&p, ConditionKind::ClusterIDMismatch).status);
    assert!(!cond(&p, ConditionKind::InvalidSpec).status);
    assert_eq!(p.health.tolerated_failures, 1);
}

#[test]
fn degraded_and_quorum_at_risk_with_one_voter_down() {
    let p = W::cluster(&[1, 2, 3], 2)
        .pod(3, PodState::Running { ready: false })
        .plan(&desired(3));
    assert_eq!(p.phase, Phase::Degraded);
    assert_eq!(cond(&p, ConditionKind::Degraded).reason, "VotersUnhealthy");
    assert_eq!(
        cond(&p, ConditionKind::QuorumAtRisk).reason,
        "NoFailureTolerance"
    );
    assert!(cond(&p, ConditionKind::Available).status);
}

#[test]
fn joint_state_waits() {
    let mut w = W::cluster(&[1, 2, 3], 1).learner(4, 0).learner(5, 0);
    w.raft().joint = true;
    let p = w.plan(&desired(5));
    assert!(p.actions.is_empty());
    assert_eq!(p.phase, Phase::Scaling);
    assert_eq!(
        cond(&p, ConditionKind::Progressing).reason,
        "JointConsensus"
    );
}

/// A world left in the joint configuration (all of `voters`) of a change
/// to `to` by a leader that crashed between its two steps.
fn joint(voters: &[NodeId], to: &[NodeId]) -> W {
    let mut w = W::cluster(voters, 1);
    w.raft().joint = true;
    w.raft().joint_target = Some(set(to));
    w
}

#[test]
fn joint_state_left_by_a_scale_up_is_finished() {
    let p = joint(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]).plan(&desired(5));
    assert_eq!(
        p.actions,
        vec![Action::ChangeVoters {
            voters: set(&[1, 2, 3, 4, 5])
        }]
    );
    assert_eq!(p.phase, Phase::Scaling);
    assert_eq!(
        cond(&p, ConditionKind::Progressing).reason,
        "ChangingVoters"
    );
}

#[test]
fn joint_state_left_by_a_scale_down_is_finished_without_the_dropped_voters() {
    // 4 and 5 were being removed and are down: only the target's quorum
    // matters, and nothing else is planned in the same pass.
    let w = joint(&[1, 2, 3, 4, 5], &[1, 2, 3])
        .pod(4, PodState::Running { ready: false })
        .pod(5, PodState::Pending);
    let p = w.plan(&desired(3));
    assert_eq!(
        p.actions,
        vec![Action::ChangeVoters {
            voters: set(&[1, 2, 3])
        }]
    );
}

#[test]
fn joint_state_waits_when_its_target_cannot_commit_or_is_not_ours() {
    let unhealthy = joint(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5])
        .pod(3, PodState::Terminating)
        .pod(4, PodState::Running { ready: false })
        .pod(5, PodState::Pending);
    let even = joint(&[1, 2, 3, 4], &[1, 2, 3, 4]);
    let foreign = joint(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]).cluster_id(5, "other");
    for (w, says) in [
        (unhealthy, "only 2 of its voters"),
        (even, "is even"),
        (foreign, "another cluster"),
    ] {
        let p = w.plan(&desired(5));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::ChangeVoters { .. })),
            "{:?}",
            p.actions
        );
        let progressing = cond(&p, ConditionKind::Progressing);
        assert_eq!(progressing.reason, "JointConsensus");
        assert!(
            progressing.message.contains(says),
            "{}",
            progressing.message
        );
    }
}

#[test]
fn members_unhealthy_past_the_deadline_are_reported_stuck_and_nothing_else_changes() {
    // Scaling 3 -> 5: learner 4 caught up, learner 5 far behind.
    let base = W::cluster(&[1, 2, 3], 1).learner(4, 0).learner(5, 5_000);
    let before = base.plan(&desired(5));
    assert!(!cond(&before, ConditionKind::Degraded).status);
    assert!(before.health.stuck.is_empty());

    let mut w = base.clone();
    w.0.unhealthy_for.insert(5, Duration::from_secs(601));
    // A stale entry of a member that is healthy again does not count.
    w.0.unhealthy_for.insert(4, Duration::from_secs(3_600));
    let p = w.plan(&desired(5));
    assert_eq!(p.health.stuck, set(&[5]));
    assert_eq!(p.actions, before.actions, "stuck members are only reported");
    assert_eq!(p.pdb_min_available, before.pdb_min_available);
    let degraded = cond(&p, ConditionKind::Degraded);
    assert!(degraded.status);
    assert_eq!(degraded.reason, "MembersStuck");
    assert!(
        degraded.message.contains("member 5") && degraded.message.contains("600s"),
        "{}",
        degraded.message
    );
    assert_eq!(
        cond(&p, ConditionKind::Progressing).reason,
        "ProgressDeadlineExceeded"
    );

    // Short of the deadline: waiting, not stuck.
    let mut w = base;
    w.0.unhealthy_for.insert(5, Duration::from_secs(599));
    let p = w.plan(&desired(5));
    assert!(p.health.stuck.is_empty());
    assert_eq!(
        cond(&p, ConditionKind::Progressing),
        cond(&before, ConditionKind::Progressing)
    );
}

#[test]
fn reasons_are_camel_case() {
    let worlds = [
        W::empty(),
        W::cluster(&[1, 2, 3], 1),
        W::cluster(&[1, 2, 3], 1).fresh(4).cluster_id(4, "x"),
        W::cluster(&[1, 2, 3], 1).volume(3, VolumeState::Lost),
    ];
    for w in worlds {
        for r in [0, 1, 3, 4] {
            for c in w.plan(&desired(r)).conditions {
                let mut chars = c.reason.chars();
                assert!(chars.next().is_some_and(|c| c.is_ascii_uppercase()));
                assert!(c.reason.chars().all(|c| c.is_ascii_alphanumeric()));
                assert!(!c.message.is_empty());
            }
        }
    }
}

// ---- determinism and ids -----------------------------------------------------

#[test]
fn member_order_does_not_matter() {
    let w = W::cluster(&[1, 2, 3, 4, 5], 3)
        .fresh(7)
        .volume(2, VolumeState::Lost)
        .all_version("v0");
    let mut r = w.clone();
    r.0.members.reverse();
    assert_eq!(w.plan(&desired(5)), r.plan(&desired(5)));
}

#[test]
fn ids_are_never_reused() {
    // next_id lags behind what exists: allocation starts above every id seen.
    let mut w = W::cluster(&[1, 2, 3], 1);
    w.0.next_id = 2;
    w.raft().lag.insert(9, 0);
    let p = w.plan(&desired(5));
    assert_eq!(
        p.actions,
        vec![
            Action::CreateMember { id: 10 },
            Action::CreateMember { id: 11 }
        ]
    );
    assert_eq!(p.next_id, 12);
}
