//! Health, PodDisruptionBudget, phase and conditions of a plan (rules 11, 12).

use std::collections::BTreeSet;

use super::analysis::Analysis;
use super::steps::{Freeze, Mode, Planner};
use super::{named, Action, ConditionKind, ConditionReport, Health, Phase, Plan, PodState};

pub(super) fn finish(a: &Analysis<'_>, p: Planner<'_, '_>) -> Plan {
    let health = health(a);
    let settled = settled(a, &p, &health);
    let pdb_min_available = pdb_min_available(a, &health, settled);
    let phase = phase(a, &p, &health);
    let conditions = conditions(a, &p, &health);
    Plan {
        actions: p.actions,
        next_id: p.next_id,
        health,
        pdb_min_available,
        phase,
        conditions,
    }
}

fn health(a: &Analysis<'_>) -> Health {
    let quorum = if a.raft.is_some() { a.quorum() } else { 0 };
    let unhealthy = a.unhealthy_or_pending();
    let stuck = unhealthy
        .iter()
        .copied()
        .filter(|id| {
            a.observed
                .unhealthy_for
                .get(id)
                .is_some_and(|d| *d >= a.desired.progress_deadline)
        })
        .collect();
    Health {
        stuck,
        leader: a.leader(),
        voters: a.voters.clone(),
        learners: a.learners.clone(),
        healthy_voters: a.healthy_voters.clone(),
        quorum: to_u32(quorum),
        tolerated_failures: to_u32(a.healthy_voters.len().saturating_sub(quorum)),
        unhealthy,
        lost: a.lost.clone(),
        mismatched: a.foreign.clone(),
        outdated: a.outdated.clone(),
    }
}

/// Normal mode, nothing planned, every member a healthy voter, nothing
/// pending, lost, orphaned or foreign.
fn settled(a: &Analysis<'_>, p: &Planner<'_, '_>, h: &Health) -> bool {
    p.mode == Mode::Normal
        && p.actions.is_empty()
        && h.unhealthy.is_empty()
        && h.lost.is_empty()
        && h.mismatched.is_empty()
        && a.learners.is_empty()
        && a.orphans.is_empty()
}

/// Rule 11 (see [`Plan::pdb_min_available`]).
fn pdb_min_available(a: &Analysis<'_>, h: &Health, settled: bool) -> u32 {
    let pods = a
        .observed
        .members
        .iter()
        .filter(|m| m.id != 0 && m.pod != PodState::Absent)
        .map(|m| m.id)
        .collect::<BTreeSet<_>>()
        .len();
    let spare = if settled {
        a.healthy_voters.len().saturating_sub(h.quorum as usize)
    } else {
        0
    };
    to_u32(pods.saturating_sub(spare))
}

/// Rule 12 (see [`Phase`]).
fn phase(a: &Analysis<'_>, p: &Planner<'_, '_>, h: &Health) -> Phase {
    match p.mode {
        Mode::Bootstrap => {
            if a.members.keys().all(|id| a.foreign.contains(id)) {
                Phase::Pending
            } else {
                Phase::Bootstrapping
            }
        }
        // A leader still leads (it was elected by a quorum): too few voters
        // look healthy, often for one pass right after a leadership change
        // while the new leader learns its followers' progress. Degraded,
        // not Failed ("needs a human").
        Mode::QuorumLost if a.serving_voters() >= a.quorum() => Phase::Degraded,
        Mode::QuorumLost | Mode::Frozen(Freeze::InvalidSpec | Freeze::ForeignMember) => {
            Phase::Failed
        }
        Mode::Frozen(Freeze::Joint) => Phase::Scaling,
        Mode::Normal => {
            if !h.lost.is_empty() {
                Phase::Degraded
            } else if !h.outdated.is_empty() {
                Phase::Upgrading
            } else if a.voters.len() != a.desired.replicas as usize
                || !a.learners.is_empty()
                || !a.pending.is_empty()
                || !a.orphans.is_empty()
            {
                Phase::Scaling
            } else if a.healthy_voters.len() != a.voters.len() {
                Phase::Degraded
            } else {
                Phase::Running
            }
        }
    }
}

fn conditions(a: &Analysis<'_>, p: &Planner<'_, '_>, h: &Health) -> Vec<ConditionReport> {
    ConditionKind::ALL
        .iter()
        .map(|&kind| {
            let (status, reason, message) = match kind {
                ConditionKind::Available => available(a, h),
                ConditionKind::Progressing => progressing(a, p, h),
                ConditionKind::Degraded => degraded(a, p, h),
                ConditionKind::QuorumAtRisk => quorum_at_risk(a, h),
                ConditionKind::ClusterIDMismatch => mismatch(a),
                ConditionKind::InvalidSpec => match &a.spec_error {
                    Some((reason, message)) => (true, *reason, message.clone()),
                    None => (false, "SpecValid", "the spec is valid".to_string()),
                },
            };
            ConditionReport {
                kind,
                status,
                reason,
                message,
            }
        })
        .collect()
}

type Cond = (bool, &'static str, String);

fn voters_summary(h: &Health) -> String {
    format!(
        "{} of {} voters healthy (quorum {})",
        h.healthy_voters.len(),
        h.voters.len(),
        h.quorum
    )
}

fn available(a: &Analysis<'_>, h: &Health) -> Cond {
    if a.raft.is_none() {
        if a.evidence {
            return (
                false,
                "NoLeader",
                "no leader is known: quorum is lost or an election is in progress".to_string(),
            );
        }
        return (
            false,
            "NotBootstrapped",
            "the cluster is not initialized yet".to_string(),
        );
    }
    if !h.voters.is_empty() && h.healthy_voters.len() >= h.quorum as usize {
        (true, "QuorumHealthy", voters_summary(h))
    } else {
        (false, "QuorumLost", voters_summary(h))
    }
}

fn action_reason(action: &Action) -> (u8, &'static str) {
    match action {
        Action::Initialize { .. } => (0, "Initializing"),
        Action::ChangeVoters { .. } => (1, "ChangingVoters"),
        Action::TransferLeader { .. } => (2, "TransferringLeader"),
        Action::RemoveMember { .. } => (3, "RemovingMembers"),
        Action::AddLearner { .. } => (4, "AddingLearners"),
        Action::DeletePod { .. } => (5, "RestartingMember"),
        Action::CreateMember { .. } => (6, "CreatingMembers"),
        Action::DeleteMember { .. } => (7, "DeletingMembers"),
        Action::CreatePod { .. } => (8, "RecreatingPods"),
    }
}

fn progressing(a: &Analysis<'_>, p: &Planner<'_, '_>, h: &Health) -> Cond {
    if let Some(reason) = p.actions.iter().map(action_reason).min().map(|r| r.1) {
        let what: Vec<String> = p.actions.iter().map(|x| x.to_string()).collect();
        return (true, reason, what.join("; "));
    }
    if p.mode == Mode::Frozen(Freeze::Joint) {
        let message = p
            .blocks
            .first()
            .map(|b| b.message.clone())
            .unwrap_or_else(|| {
                "a joint-consensus membership change is in flight; waiting for it to finish"
                    .to_string()
            });
        return (false, "JointConsensus", message);
    }
    if let Some(b) = p.blocks.first() {
        return (false, b.reason, b.message.clone());
    }
    // Converged: `replicas` healthy voters on the desired version and no
    // other member of ours (foreign members are left alone, see rule 8).
    let converged = p.mode == Mode::Normal
        && h.unhealthy.is_empty()
        && h.lost.is_empty()
        && h.outdated.is_empty()
        && a.learners.is_empty()
        && a.orphans.is_empty()
        && h.voters.len() == a.desired.replicas as usize;
    if converged {
        let foreign = if h.mismatched.is_empty() {
            String::new()
        } else {
            format!(
                "; {} with another cluster id left alone",
                named("member", &h.mismatched)
            )
        };
        return (
            false,
            "Converged",
            format!(
                "{} healthy voters on version {}{foreign}",
                h.voters.len(),
                a.desired.version
            ),
        );
    }
    if !h.stuck.is_empty() {
        return (
            false,
            "ProgressDeadlineExceeded",
            format!("{}; still waiting", stuck_message(a, h)),
        );
    }
    let message = if h.unhealthy.is_empty() {
        "waiting for the cluster to settle".to_string()
    } else {
        format!(
            "waiting for {} to be ready and caught up",
            named("member", &h.unhealthy)
        )
    };
    (false, "Waiting", message)
}

/// Names the stuck members and the deadline they passed.
fn stuck_message(a: &Analysis<'_>, h: &Health) -> String {
    let verb = if h.stuck.len() == 1 { "has" } else { "have" };
    format!(
        "{} {verb} not been ready and caught up for over {}s (progressDeadlineSeconds)",
        named("member", &h.stuck),
        a.desired.progress_deadline.as_secs()
    )
}

fn degraded(a: &Analysis<'_>, p: &Planner<'_, '_>, h: &Health) -> Cond {
    if p.mode == Mode::QuorumLost {
        return (
            true,
            "QuorumLost",
            format!(
                "no healthy quorum: {}; only pods of members with intact volumes are recreated",
                voters_summary(h)
            ),
        );
    }
    if let Some(b) = p.blocks.first() {
        return (true, b.reason, b.message.clone());
    }
    if !h.stuck.is_empty() {
        return (true, "MembersStuck", stuck_message(a, h));
    }
    if !h.lost.is_empty() {
        return (
            true,
            "MembersLost",
            format!("replacing {} whose data is lost", named("member", &h.lost)),
        );
    }
    let unhealthy_voters: BTreeSet<u64> = h.voters.difference(&h.healthy_voters).copied().collect();
    if !unhealthy_voters.is_empty() {
        return (
            true,
            "VotersUnhealthy",
            format!(
                "not ready or not caught up: {}; {}",
                named("voter", &unhealthy_voters),
                voters_summary(h)
            ),
        );
    }
    (
        false,
        "AllMembersHealthy",
        "no member is lost or unhealthy".to_string(),
    )
}

fn quorum_at_risk(a: &Analysis<'_>, h: &Health) -> Cond {
    if a.raft.is_none() {
        if a.evidence {
            return (
                true,
                "QuorumLost",
                "no leader is known for an initialized cluster".to_string(),
            );
        }
        return (
            false,
            "NotBootstrapped",
            "the cluster is not initialized yet".to_string(),
        );
    }
    let healthy = h.healthy_voters.len();
    let q = h.quorum as usize;
    if h.voters.is_empty() || healthy < q {
        (true, "QuorumLost", voters_summary(h))
    } else if h.voters.len() == 1 {
        (
            true,
            "SingleVoter",
            "a single voter has no redundancy: its failure stops writes".to_string(),
        )
    } else if healthy == q {
        (
            true,
            "NoFailureTolerance",
            format!("{}; one more failure loses quorum", voters_summary(h)),
        )
    } else {
        (
            false,
            "QuorumSafe",
            format!(
                "{}; tolerates {} more voter failure{}",
                voters_summary(h),
                healthy - q,
                if healthy - q == 1 { "" } else { "s" }
            ),
        )
    }
}

fn mismatch(a: &Analysis<'_>) -> Cond {
    if a.foreign.is_empty() {
        return (
            false,
            "ClusterIDsMatch",
            "every reachable member reports the expected cluster id".to_string(),
        );
    }
    let detail: Vec<String> = a
        .foreign
        .iter()
        .filter_map(|id| {
            let m = a.members.get(id)?;
            let s = m.status.as_ref()?;
            Some(format!("{id} reports {:?}", s.cluster_id))
        })
        .collect();
    (
        true,
        "ForeignClusterID",
        format!(
            "a cluster id other than {:?} is reported by {} ({}); left alone, pod and volume untouched",
            a.observed.cluster_id,
            named("member", &a.foreign),
            detail.join(", ")
        ),
    )
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
