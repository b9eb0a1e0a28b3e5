//! The operator's planner: a pure, deterministic function from what the user
//! asked for ([`Desired`]) and what the controller saw ([`Observed`]) to the
//! next steps and the status to report ([`Plan`]).
//!
//! The planner knows nothing about Kubernetes, tokio or the CRD types: the
//! controller (and the e2e process harness) map their world to these plain
//! types, execute [`Plan::actions`] in order, observe again and call
//! [`plan`] again. Each call plans one small step; the cluster converges over
//! several passes.
//!
//! # Vocabulary
//!
//! - A *member* is one Raft node id (>= 1): one pod plus one volume, both
//!   named by the id. Ids come from [`Observed::next_id`], which only grows;
//!   an id is never reused.
//! - *Membership* is the voters plus learners of the leader's [`RaftView`].
//! - A member is *healthy* when it is in the membership, its pod is running
//!   and ready, its volume is [`VolumeState::Present`], its admin API answers
//!   with the expected cluster id and reports itself initialized, and it is
//!   *caught up*: the leader, or at most [`Desired::caught_up_lag`] entries
//!   behind the leader.
//! - `quorum(n) = n / 2 + 1` voters. Learners never count toward a quorum.
//! - A member is *lost* when its volume is [`VolumeState::Absent`] or
//!   [`VolumeState::Lost`], or when it is in the membership but no pod or
//!   volume of it is observed at all. A lost member never comes back under
//!   its id.
//! - A member is *foreign* when its admin API reports a cluster id other
//!   than [`Observed::cluster_id`].
//! - A *pending* member is outside the membership, not foreign, not lost and
//!   not known to be initialized (fresh, or not answering yet). A *fresh*
//!   member is a pending member whose pod runs and whose admin API answers
//!   with the expected cluster id and `initialized = false`: it can be added.
//!   (Readiness is not required: lockd reports ready only once it is a
//!   member of an initialized cluster.)
//! - An *orphan* is a member outside the membership of a running cluster that
//!   reports itself initialized: it was removed (scale-down, replacement) and
//!   only its pod and volume are left to delete.
//! - A member is *outdated* when its pod runs a version other than
//!   [`Desired::version`].
//!
//! # Modes
//!
//! Each pass first picks a mode:
//!
//! - **Bootstrap** (no raft view and no sign that the cluster was ever
//!   initialized): rule 1.
//! - **Quorum lost** (no raft view but the cluster exists, or fewer healthy
//!   voters than a quorum): rule 10, only pods of intact members are
//!   recreated.
//! - **Frozen** (invalid spec, a joint-consensus change in flight, or a
//!   foreign member inside the membership): no membership change, no
//!   restart; only pods of intact members are recreated.
//! - **Normal**: everything below.
//!
//! # Rules
//!
//! 1. **Bootstrap.** No member at all: `CreateMember{next_id}` (one member).
//!    Pending members whose pod is absent get their pod back. Once every
//!    pending member is fresh, `Initialize` the lowest id alone; the others
//!    join as learners afterwards (rule 2). A member whose volume vanished
//!    before the cluster was ever initialized is deleted.
//!    [`Observed::bootstrapped`] (or any member reporting itself
//!    initialized, or a lost volume) forbids a second `Initialize`.
//! 2. **Joining.** Members are counted as voters and learners that are not
//!    lost plus pending members; when that count is below
//!    [`Desired::replicas`], new members are created (all the missing ones at
//!    once). Fresh members get `AddLearner`. Learners are promoted only when
//!    caught up, and only so many at once that the voter set stays odd: 3 -> 5
//!    waits until both new learners are caught up and promotes them in one
//!    `ChangeVoters`.
//! 3. **Scale-down.** When more voters than wanted are not lost, the target
//!    voter set keeps the leader first, then the lowest ids among healthy
//!    voters; unhealthy and lost voters go first. If the leader would go, it
//!    is asked to `TransferLeader` to a healthy voter that stays first. Then
//!    one `ChangeVoters` to the target; the dropped members become orphans
//!    and are deleted (`DeleteMember`, volume per
//!    [`Desired::delete_volume_on_scale_down`]) on a later pass. Without
//!    enough healthy voters to form the target, scale-down is refused
//!    (condition Degraded, reason `ScaleDownRefused`). Surplus pending
//!    members and learners are removed before voters.
//! 4. **Rolling upgrade.** Outdated members are restarted with `DeletePod`
//!    (the next pass's `CreatePod` brings them back with the desired
//!    version), at most one per pass and only when nothing else is planned.
//!    Members that are already down (not healthy) go first: restarting them
//!    costs no availability. Such a restart waits while another member is on
//!    its way back (pod absent or starting, or restarted and catching up);
//!    members down on the old version do not hold each other up (they would
//!    wait for each other forever). A leader that is down hands over
//!    (`TransferLeader`) before its restart. A healthy member is restarted
//!    only when every member is healthy, the membership is at its target
//!    size and no other work is pending (so healthy voters - 1 >= quorum);
//!    learners first, then followers by id, the leader last, after
//!    `TransferLeader` to a healthy follower that already runs the desired
//!    version. Otherwise the upgrade pauses (condition Degraded, reason
//!    `UpgradePaused`).
//! 5. **Failed members.** A lost member is never recreated under its id: the
//!    count of rule 2 excludes it, so a new member is created, added as a
//!    learner and, once caught up, swapped in with one `ChangeVoters` (old
//!    out, new in). Then `DeleteMember` deletes the old id's pod and volume.
//!    A lost learner is `RemoveMember`ed. A member whose pod is absent but
//!    whose volume is present gets `CreatePod` under the same id.
//! 6. **Odd voter sets.** Every `ChangeVoters` set is odd-sized and contains
//!    only healthy voters and caught-up learners, and is only issued while the
//!    current voters have a healthy quorum (joint consensus needs both). When
//!    fewer members are ready than wanted, the planner may move to the largest
//!    odd set that keeps every healthy voter and drops only lost ones (it never
//!    reduces the failures the cluster tolerates).
//! 7. **Quorum.** No `DeletePod` or `DeleteMember` of a healthy voter leaves
//!    fewer than a quorum of healthy voters. `DeleteMember` is only ever
//!    planned for members outside the membership. The single exception:
//!    with `replicas = 1`, upgrading the only voter means restarting it (a
//!    one-member cluster has no redundancy; the spec chose that).
//! 8. **Cluster id mismatch.** A foreign member is left alone entirely: it is
//!    never initialized, added or promoted, and no action names it (its pod
//!    and volume are kept for a human to inspect). It does not count toward
//!    the members of rule 2. If it is inside the membership, membership
//!    changes and restarts freeze. Condition `ClusterIDMismatch` lists it.
//! 9. **Invalid spec.** Even, zero or more than [`MAX_REPLICAS`] replicas, or
//!    an empty version: no membership change, no creation, deletion or restart;
//!    condition `InvalidSpec`. Pods of intact members are still recreated
//!    (unless the version is empty).
//! 10. **Quorum lost.** Only `CreatePod` for members whose volume is present
//!     (that is how quorum comes back); condition QuorumAtRisk, reason
//!     `QuorumLost`.
//! 11. **PodDisruptionBudget.** See [`Plan::pdb_min_available`].
//! 12. **Phase and conditions.** See [`Phase`] and [`ConditionKind`].
//!
//! A joint configuration is finished, not reasoned about: lockd's
//! ChangeVoters call leaves the joint state by itself (openraft commits the
//! joint and then the uniform configuration in one call), so a joint state
//! seen by a pass is one whose leader crashed or lost leadership between the
//! two, or a change still in flight. The planner then issues `ChangeVoters`
//! to the set the change was moving to (the last of the two the leader
//! reports), which only needs that set's quorum, and nothing else. If that set
//! is not odd, names a foreign member or lacks a healthy quorum, or lockd does
//! not report it, the planner waits and reports Progressing false with reason
//! `JointConsensus`. A change still in flight makes the call fail harmlessly
//! (openraft refuses a second change while one is in progress).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

mod analysis;
mod report;
mod steps;
#[cfg(test)]
mod tests;

/// A Raft node id. Valid ids are >= 1.
pub type NodeId = u64;

/// Fewest replicas a spec may ask for.
pub const MIN_REPLICAS: u32 = 1;
/// Most replicas a spec may ask for (the CRD enforces the same bound).
pub const MAX_REPLICAS: u32 = 9;

/// Number of voters that form a majority of `voters` voters.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Number of voters. Must be odd and within
    /// [`MIN_REPLICAS`]..=[`MAX_REPLICAS`] (rule 9).
    pub replicas: u32,
    /// Fingerprint of the pod template (the lockd version) every member must
    /// run (rule 4). Must not be empty.
    pub version: String,
    /// Most log entries a member may be behind the leader and still count as
    /// caught up.
    pub caught_up_lag: u64,
    /// Whether `DeleteMember` of a member removed by scale-down also deletes
    /// its volume. Volumes of lost and never-initialized members are always
    /// deleted; volumes of foreign members never.
    pub delete_volume_on_scale_down: bool,
    /// How long a member may stay unhealthy before it is reported stuck
    /// (never acted on: see [`Health::stuck`]).
    pub progress_deadline: Duration,
}

/// State of a member's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// No pod exists.
    Absent,
    /// The pod exists but is not running yet (scheduling, pulling, starting).
    Pending,
    /// The pod runs; `ready` is its readiness.
    Running {
        /// Whether the pod's readiness probe passes.
        ready: bool,
    },
    /// The pod is being deleted.
    Terminating,
}

impl PodState {
    /// Running and ready.
    pub fn is_ready(self) -> bool {
        matches!(self, PodState::Running { ready: true })
    }
}

/// State of a member's volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// The volume exists and holds the member's data (or is fresh for a
    /// member that never joined).
    Present,
    /// No volume exists.
    Absent,
    /// The volume exists but the member's data is gone: it reports an
    /// instance id other than the recorded one. (Not "reports itself
    /// uninitialized while in the membership": a learner just added does
    /// exactly that until the leader's first replication reaches it.)
    Lost,
}

/// Raft role a member reports for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The leader.
    Leader,
    /// A voter following a leader.
    Follower,
    /// A non-voting member.
    Learner,
    /// A voter campaigning for leadership.
    Candidate,
    /// Waiting to be initialized or added.
    Uninitialized,
}

/// What a member's admin API (Cluster.Status) reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Cluster id recorded in the member's data dir (or given by its flags).
    pub cluster_id: String,
    /// False for a fresh member waiting to be initialized or added.
    pub initialized: bool,
    /// The member's own view of its role.
    pub role: Role,
    /// The member's current term.
    pub term: u64,
    /// The leader the member knows of.
    pub leader_id: Option<NodeId>,
    /// Last log index the member applied.
    pub applied_index: u64,
}

/// One member as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedMember {
    /// Raft node id; pod and volume are named by it.
    pub id: NodeId,
    /// The member's pod.
    pub pod: PodState,
    /// The member's volume.
    pub volume: VolumeState,
    /// Version fingerprint the member's pod runs (None without a pod).
    pub version: Option<String>,
    /// The member's admin API answer; None when unreachable.
    pub status: Option<MemberStatus>,
}

/// Membership and replication progress as reported by the current leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    /// The leader that reported this view.
    pub leader: NodeId,
    /// The leader's term.
    pub term: u64,
    /// Voters of the current configuration.
    pub voters: BTreeSet<NodeId>,
    /// Learners of the current configuration.
    pub learners: BTreeSet<NodeId>,
    /// True while a joint-consensus change is in flight.
    pub joint: bool,
    /// During a joint-consensus change, the voter set being moved to (None
    /// otherwise, and from lockd versions that do not report it).
    pub joint_target: Option<BTreeSet<NodeId>>,
    /// Per member: the leader's last log index minus the member's matched
    /// index. A member without an entry counts as not caught up (except the
    /// leader, which is always caught up).
    pub lag: BTreeMap<NodeId, u64>,
    /// The leader's commit index.
    pub commit_index: u64,
}

/// What the controller saw in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The lockd cluster id this resource owns.
    pub cluster_id: String,
    /// Next unused node id (persisted by the controller, only ever grows).
    /// The planner never allocates below it nor below any id it sees.
    pub next_id: NodeId,
    /// True once the cluster was initialized (recorded by the controller
    /// after a successful `Initialize`, or once a raft view was seen). Once
    /// true the planner never initializes again, even if every member is
    /// unreachable or lost.
    pub bootstrapped: bool,
    /// Every member the controller found (pods and volumes named by id).
    pub members: Vec<ObservedMember>,
    /// The leader's view; None when no leader is known (not bootstrapped
    /// yet, election in progress or quorum lost).
    pub raft: Option<RaftView>,
    /// How long members have been unhealthy without a break, as recorded
    /// by earlier passes (absent: healthy, or first seen unhealthy now).
    pub unhealthy_for: BTreeMap<NodeId, Duration>,
}

/// One step for the controller. Actions of one plan are safe to execute
/// together, in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Create the volume and the pod (desired version) of a new member.
    CreateMember {
        /// The new member's id (allocated from `next_id`).
        id: NodeId,
    },
    /// Recreate the pod (desired version) of a member whose volume is
    /// present.
    CreatePod {
        /// The member.
        id: NodeId,
    },
    /// Delete a member's pod to restart it; a later pass recreates it with
    /// the desired version.
    DeletePod {
        /// The member.
        id: NodeId,
    },
    /// Delete a member that is outside the membership: its pod and, if
    /// `delete_volume`, its volume.
    DeleteMember {
        /// The member.
        id: NodeId,
        /// Whether to delete the volume too.
        delete_volume: bool,
    },
    /// Initialize a single-voter cluster on this (fresh) member.
    Initialize {
        /// The member.
        id: NodeId,
    },
    /// Add a fresh member as a learner.
    AddLearner {
        /// The member.
        id: NodeId,
    },
    /// One joint-consensus change to exactly this voter set; voters left out
    /// are removed from the membership (`remove_dropped = true`).
    ChangeVoters {
        /// The complete new voter set.
        voters: BTreeSet<NodeId>,
    },
    /// Remove a learner (or a lost member) from the membership.
    RemoveMember {
        /// The member.
        id: NodeId,
    },
    /// Ask the leader to hand leadership to this voter.
    TransferLeader {
        /// The new leader.
        to: NodeId,
    },
}

impl Action {
    /// The member a single-member action names (None for `ChangeVoters`).
    pub fn member(&self) -> Option<NodeId> {
        match self {
            Action::CreateMember { id }
            | Action::CreatePod { id }
            | Action::DeletePod { id }
            | Action::DeleteMember { id, .. }
            | Action::Initialize { id }
            | Action::AddLearner { id }
            | Action::RemoveMember { id } => Some(*id),
            Action::TransferLeader { to } => Some(*to),
            Action::ChangeVoters { .. } => None,
        }
    }

    /// True for actions that go through the Raft membership (admin API).
    pub fn is_membership(&self) -> bool {
        matches!(
            self,
            Action::Initialize { .. }
                | Action::AddLearner { .. }
                | Action::ChangeVoters { .. }
                | Action::RemoveMember { .. }
                | Action::TransferLeader { .. }
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateMember { id } => write!(f, "create member {id}"),
            Action::CreatePod { id } => write!(f, "recreate pod of member {id}"),
            Action::DeletePod { id } => write!(f, "restart member {id}"),
            Action::DeleteMember { id, delete_volume } => {
                if *delete_volume {
                    write!(f, "delete member {id} and its volume")
                } else {
                    write!(f, "delete member {id} (volume retained)")
                }
            }
            Action::Initialize { id } => write!(f, "initialize the cluster on member {id}"),
            Action::AddLearner { id } => write!(f, "add member {id} as a learner"),
            Action::ChangeVoters { voters } => write!(f, "change voters to {}", ids(voters)),
            Action::RemoveMember { id } => write!(f, "remove member {id} from the membership"),
            Action::TransferLeader { to } => write!(f, "transfer leadership to member {to}"),
        }
    }
}

/// Health of the cluster as the planner judged it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// Leader of the raft view.
    pub leader: Option<NodeId>,
    /// Voters of the raft view (empty without one).
    pub voters: BTreeSet<NodeId>,
    /// Learners of the raft view.
    pub learners: BTreeSet<NodeId>,
    /// Voters that are healthy (see the module docs).
    pub healthy_voters: BTreeSet<NodeId>,
    /// `voters / 2 + 1` (0 without a raft view).
    pub quorum: u32,
    /// Healthy voters beyond the quorum: how many more voter failures the
    /// cluster survives (0 at or below quorum).
    pub tolerated_failures: u32,
    /// Members (voters, learners, pending members) that are not healthy.
    pub unhealthy: BTreeSet<NodeId>,
    /// Unhealthy members that have been so for at least
    /// [`Desired::progress_deadline`]. Reported (Degraded `MembersStuck`,
    /// Progressing `ProgressDeadlineExceeded`), never acted on: what is
    /// wrong with a member (a bad image, a full disk, a node that is gone)
    /// is for a human to judge, and no action is safer than the rules'.
    pub stuck: BTreeSet<NodeId>,
    /// Lost members (never recreated under their id).
    pub lost: BTreeSet<NodeId>,
    /// Members reporting another cluster id.
    pub mismatched: BTreeSet<NodeId>,
    /// Members running a version other than the desired one.
    pub outdated: BTreeSet<NodeId>,
}

/// Coarse state of the cluster, for `status.phase`. Chosen in this order:
///
/// 1. No raft view, no sign of an initialized cluster and a valid spec:
///    `Pending` while no member exists (foreign ones aside), else
///    `Bootstrapping`.
/// 2. `Failed` (needs a human): quorum lost with no leader, invalid spec,
///    or a foreign member inside the membership. When a quorum of voters
///    is up and answering but too few count as caught up (often for one
///    pass after a leadership change, while the new leader learns its
///    followers' progress): `Degraded`.
/// 3. `Scaling` while a joint-consensus change is in flight.
/// 4. `Degraded` while a lost member is being replaced.
/// 5. `Upgrading` while some member runs an outdated version.
/// 6. `Scaling` while the membership differs from the target (voter count,
///    learners, pending or orphaned members).
/// 7. `Degraded` while some voter is unhealthy.
/// 8. `Running` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing exists yet.
    Pending,
    /// Creating the first member and initializing the cluster.
    Bootstrapping,
    /// All members healthy at the requested count and version.
    Running,
    /// Adding or removing members.
    Scaling,
    /// Restarting members onto the desired version.
    Upgrading,
    /// Serving with a quorum, but some member is lost or unhealthy.
    Degraded,
    /// Needs a human: quorum lost, invalid spec, foreign member in the
    /// membership.
    Failed,
}

/// Kinds of conditions the planner reports; every plan reports each kind
/// exactly once, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConditionKind {
    /// True when a quorum of voters is healthy (writes are served).
    Available,
    /// True when the plan has actions.
    Progressing,
    /// True when some member is lost or unhealthy, quorum is lost, or the
    /// planner refuses a step (scale-down, upgrade).
    Degraded,
    /// True when one more voter failure would lose quorum (healthy voters <=
    /// quorum), or quorum is lost.
    QuorumAtRisk,
    /// True when some member reports another cluster id.
    ClusterIDMismatch,
    /// True when the spec cannot be acted on (rule 9).
    InvalidSpec,
}

impl ConditionKind {
    /// All kinds in report order.
    pub const ALL: [ConditionKind; 6] = [
        ConditionKind::Available,
        ConditionKind::Progressing,
        ConditionKind::Degraded,
        ConditionKind::QuorumAtRisk,
        ConditionKind::ClusterIDMismatch,
        ConditionKind::InvalidSpec,
    ];

    /// The Kubernetes condition type string.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionKind::Available => "Available",
            ConditionKind::Progressing => "Progressing",
            ConditionKind::Degraded => "Degraded",
            ConditionKind::QuorumAtRisk => "QuorumAtRisk",
            ConditionKind::ClusterIDMismatch => "ClusterIDMismatch",
            ConditionKind::InvalidSpec => "InvalidSpec",
        }
    }
}

/// One condition to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionReport {
    /// Which condition.
    pub kind: ConditionKind,
    /// Whether it holds.
    pub status: bool,
    /// CamelCase machine-readable reason.
    pub reason: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

/// The planner's answer for one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Steps to execute in order, then observe again. Empty when there is
    /// nothing to do now (converged, waiting, or blocked: see conditions).
    pub actions: Vec<Action>,
    /// The `next_id` to persist: greater than every id created by `actions`
    /// and every id seen.
    pub next_id: NodeId,
    /// Health as judged for this plan.
    pub health: Health,
    /// `minAvailable` for the members' PodDisruptionBudget (which selects
    /// every member pod). A voluntary eviction must never take the healthy
    /// voters below a quorum, and pods of learners, joining, restarting or
    /// unhealthy members are not available for disruption. The formula:
    ///
    /// - while anything is not settled (no raft view or not the normal mode,
    ///   any action planned, any member unhealthy, lost, pending, orphaned,
    ///   foreign or a learner): `pods`, so no eviction is allowed;
    /// - else `pods - (healthy_voters - quorum)`: exactly as many evictions as
    ///   the cluster tolerates failures.
    ///
    /// `pods` counts every observed member pod that exists (not `Absent`).
    pub pdb_min_available: u32,
    /// Coarse state (see [`Phase`]).
    pub phase: Phase,
    /// One report per [`ConditionKind`], in [`ConditionKind::ALL`] order.
    pub conditions: Vec<ConditionReport>,
}

impl Plan {
    /// The report of one condition kind.
    pub fn condition(&self, kind: ConditionKind) -> Option<&ConditionReport> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// Plans the next step (see the module docs for the rules). Pure and
/// deterministic: the same input gives the same plan, whatever the order of
/// [`Observed::members`] (members are taken by id; should an id appear twice,
/// the first entry wins; id 0 is ignored).
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let analysis = analysis::Analysis::new(desired, observed);
    let steps = steps::Planner::run(&analysis);
    report::finish(&analysis, steps)
}

/// "member 3" or "members 3, 4" (`noun` is the singular).
pub(crate) fn named<'a>(noun: &str, set: impl IntoIterator<Item = &'a NodeId>) -> String {
    let v: Vec<&NodeId> = set.into_iter().collect();
    let plural = if v.len() == 1 { "" } else { "s" };
    format!("{noun}{plural} {}", ids(v))
}

/// Formats a set of ids as "1, 2, 3" (or "none").
pub(crate) fn ids<'a>(set: impl IntoIterator<Item = &'a NodeId>) -> String {
    let v: Vec<String> = set.into_iter().map(|id| id.to_string()).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}
