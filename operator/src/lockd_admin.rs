//! The lockd side of observe and act, shared by the Kubernetes controller and
//! the e2e process harness (`lockd_e2e::local_operator`).
//!
//! - **Observe**: [`probe`] asks one member for `lockd.v1.Cluster/Status`;
//!   the pure mappings [`member_status`], [`raft_view`],
//!   [`pick_leader_status`], [`instance_changed`] and [`volume_state`] turn
//!   the answers into the planner's input types ([`crate::plan`]).
//! - **Act**: [`Admin::execute`] runs one membership [`Action`] (Initialize,
//!   AddLearner, ChangeVoters, RemoveMember, TransferLeader) through the
//!   admin API and hands every other action (pods, volumes, processes) back
//!   to the caller as [`Outcome::Caller`].
//!
//! Endpoints are `host:port` or `http://host:port`. Nothing here panics on
//! what the network returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lockd_proto::v1::cluster_client::ClusterClient;
use lockd_proto::v1::{
    AddLearnerRequest, ChangeVotersRequest, InitializeRequest, Member, RemoveMemberRequest,
    Role as PbRole, StatusRequest, StatusResponse, TransferLeaderRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::plan::{Action, MemberStatus, NodeId, RaftView, Role, VolumeState};

/// Longest time spent establishing a connection to one member for an admin
/// call (the request itself may take longer: see [`Admin::new`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `http://host:port` for `host:port`; an endpoint that already names a
/// scheme is returned unchanged.
pub fn endpoint_uri(endpoint: &str) -> String {
    let e = endpoint.trim();
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

fn endpoint(endpoint: &str, connect: Duration, request: Duration) -> Result<Endpoint, String> {
    Endpoint::from_shared(endpoint_uri(endpoint))
        .map(|e| {
            e.connect_timeout(connect)
                .timeout(request)
                .tcp_nodelay(true)
        })
        .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))
}

/// Connects to `ep` within `connect`; each request on the channel may take
/// up to `request`.
async fn connect(
    ep: &str,
    connect: Duration,
    request: Duration,
) -> Result<ClusterClient<Channel>, String> {
    let e = endpoint(ep, connect, request)?;
    match tokio::time::timeout(connect, e.connect()).await {
        Ok(Ok(ch)) => Ok(ClusterClient::new(ch)),
        Ok(Err(err)) => Err(format!("connect {ep}: {err}")),
        Err(_) => Err(format!("connect {ep}: no connection within {connect:?}")),
    }
}

/// `Cluster/Status` of the member at `endpoint`, or None when it does not
/// answer within `timeout` (connecting included) or answers with an error.
pub async fn probe(endpoint: &str, timeout: Duration) -> Option<StatusResponse> {
    let fut = async {
        let mut c = connect(endpoint, timeout, timeout).await.ok()?;
        c.status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// The role a status reports (unknown values map to `ROLE_UNKNOWN`).
pub fn pb_role(s: &StatusResponse) -> PbRole {
    PbRole::try_from(s.role).unwrap_or(PbRole::Unknown)
}

/// Whether the member is part of a cluster: a role other than
/// `ROLE_UNINITIALIZED` (and `ROLE_UNKNOWN`, a member shutting down), or a
/// non-empty membership. A member started without `--initial-members`
/// reports `ROLE_UNINITIALIZED` and no members until it is initialized or
/// added; lockd derives the role from the membership, so the two agree.
pub fn is_initialized(s: &StatusResponse) -> bool {
    !s.members.is_empty() || !matches!(pb_role(s), PbRole::Uninitialized | PbRole::Unknown)
}

/// The planner's view of one member's status.
///
/// `ROLE_UNKNOWN` (a member shutting down, or a role this operator does not
/// know) maps to [`Role::Follower`] when the member reports a membership and
/// to [`Role::Uninitialized`] otherwise; the planner does not decide on
/// roles, it reads `initialized`.
pub fn member_status(s: &StatusResponse) -> MemberStatus {
    let initialized = is_initialized(s);
    let role = match pb_role(s) {
        PbRole::Leader => Role::Leader,
        PbRole::Follower => Role::Follower,
        PbRole::Learner => Role::Learner,
        PbRole::Candidate => Role::Candidate,
        PbRole::Uninitialized => Role::Uninitialized,
        PbRole::Unknown if initialized => Role::Follower,
        PbRole::Unknown => Role::Uninitialized,
    };
    MemberStatus {
        cluster_id: s.cluster_id.clone(),
        initialized,
        role,
        term: s.term,
        leader_id: (s.leader_id != 0).then_some(s.leader_id),
        applied_index: s.applied_index,
    }
}

/// The raft view reported by a leader: voters and learners from
/// `members[].voter`, per-member lag from `replication[]` (the leader itself
/// lags 0; members without a replication entry get none, so the planner
/// counts them as not caught up; entries of non-members are ignored), the
/// joint flag and the commit index. None unless the status reports role
/// Leader.
pub fn raft_view(leader: &StatusResponse) -> Option<RaftView> {
    if pb_role(leader) != PbRole::Leader {
        return None;
    }
    let voters: BTreeSet<NodeId> = leader
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    let learners: BTreeSet<NodeId> = leader
        .members
        .iter()
        .filter(|m| !m.voter && !voters.contains(&m.id))
        .map(|m| m.id)
        .collect();
    let mut lag: BTreeMap<NodeId, u64> = leader
        .replication
        .iter()
        .filter(|r| voters.contains(&r.id) || learners.contains(&r.id))
        .map(|r| (r.id, r.lag))
        .collect();
    lag.insert(leader.id, 0);
    Some(RaftView {
        leader: leader.id,
        term: leader.term,
        voters,
        learners,
        joint: leader.joint,
        joint_target: match leader.voter_sets.as_slice() {
            [_, .., to] if leader.joint => Some(to.ids.iter().copied().collect()),
            _ => None,
        },
        lag,
        commit_index: leader.commit_index,
    })
}

/// Among `statuses`, the one reporting role Leader with the highest term
/// (a deposed leader that has not noticed yet reports an older term). Ties,
/// which Raft rules out within one cluster, go to the higher commit index,
/// then to the lower id, so the choice does not depend on the order.
pub fn pick_leader_status<'a, I>(statuses: I) -> Option<&'a StatusResponse>
where
    I: IntoIterator<Item = &'a StatusResponse>,
{
    statuses
        .into_iter()
        .filter(|s| pb_role(s) == PbRole::Leader)
        .max_by(|a, b| {
            (a.term, a.commit_index, std::cmp::Reverse(a.id)).cmp(&(
                b.term,
                b.commit_index,
                std::cmp::Reverse(b.id),
            ))
        })
}

/// True when the member's data dir is not the one recorded for its node id
/// when it first joined: it reports another (non-empty) instance id, so its
/// volume was lost and replaced by an empty one ([`VolumeState::Lost`]).
/// False when nothing was recorded yet or the member reports no instance id.
pub fn instance_changed(recorded: Option<&str>, s: &StatusResponse) -> bool {
    match recorded {
        Some(r) if !r.is_empty() && !s.instance_id.is_empty() => r != s.instance_id,
        _ => false,
    }
}

/// The volume state of one member: [`VolumeState::Absent`] without a volume;
/// [`VolumeState::Lost`] when its status reports another instance id than
/// the recorded one ([`instance_changed`]); else [`VolumeState::Present`]
/// (also when the member does not answer).
///
/// A member that reports itself uninitialized although the leader lists it
/// is deliberately *not* judged lost: a learner just added reports exactly
/// that until the leader's first replication reaches it, and calling it lost
/// makes the planner replace every new member (seen in the e2e harness: each
/// AddLearner was followed by a replacement). A wiped volume shows as a new
/// instance id instead.
pub fn volume_state(
    exists: bool,
    recorded_instance: Option<&str>,
    status: Option<&StatusResponse>,
) -> VolumeState {
    if !exists {
        return VolumeState::Absent;
    }
    match status {
        Some(s) if instance_changed(recorded_instance, s) => VolumeState::Lost,
        _ => VolumeState::Present,
    }
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No endpoint is known for the member the call must go to, or no
    /// advertised address for the member to add.
    #[error("{action}: no {what} known for member {id}")]
    UnknownMember {
        /// The action.
        action: String,
        /// "endpoint" or "address".
        what: &'static str,
        /// The member.
        id: NodeId,
    },
    /// No member could be asked: none configured, or every one was
    /// unreachable or answered UNAVAILABLE (not the leader, no quorum).
    #[error("{action}: no member could take the call (tried {tried:?}): {last}")]
    Unavailable {
        /// The action.
        action: String,
        /// The endpoints tried, in order.
        tried: Vec<String>,
        /// The last failure.
        last: String,
    },
    /// A member answered with an error other than UNAVAILABLE; the call was
    /// not retried elsewhere.
    #[error("{action} via {endpoint}: {code:?}: {message}")]
    Rejected {
        /// The action.
        action: String,
        /// The member that answered.
        endpoint: String,
        /// The gRPC status code.
        code: Code,
        /// The gRPC status message.
        message: String,
    },
}

impl AdminError {
    /// The gRPC code of a rejection (None for the other kinds).
    pub fn code(&self) -> Option<Code> {
        match self {
            AdminError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What [`Admin::execute`] did with an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Executed through the admin API of the member at `via`; `members` is
    /// the membership the call returned (empty for Initialize and
    /// TransferLeader).
    Done {
        /// The endpoint that took the call.
        via: String,
        /// Membership after the call, as returned by lockd.
        members: Vec<Member>,
    },
    /// Not a membership action: the caller creates or deletes the pod,
    /// volume or process.
    Caller(Action),
}

/// Runs membership actions against a lockd cluster.
///
/// Every call but Initialize may go to any member (lockd forwards
/// membership calls to its leader); the leader (see [`Admin::with_leader`])
/// is tried first, then the other members by id. When a member is
/// unreachable or answers UNAVAILABLE (not the leader, no leader, forwarded
/// to a member that lost leadership), the call goes to the next one: such a
/// call was not applied. Any other error is returned as is.
#[derive(Debug, Clone)]
pub struct Admin {
    endpoints: BTreeMap<NodeId, String>,
    leader: Option<NodeId>,
    timeout: Duration,
    connect_timeout: Duration,
}

impl Admin {
    /// An admin for members reached at `endpoints` (node id -> `host:port`
    /// or `http://host:port`); `timeout` bounds one call to one member
    /// (membership changes wait for a commit, a leadership transfer for the
    /// new leader: give it several election timeouts).
    pub fn new(endpoints: impl IntoIterator<Item = (NodeId, String)>, timeout: Duration) -> Admin {
        Admin {
            endpoints: endpoints.into_iter().collect(),
            leader: None,
            timeout,
            connect_timeout: CONNECT_TIMEOUT.min(timeout),
        }
    }

    /// Tries `leader` first (saves a forwarding hop).
    pub fn with_leader(mut self, leader: Option<NodeId>) -> Admin {
        self.leader = leader;
        self
    }

    /// The endpoints, node id -> endpoint.
    pub fn endpoints(&self) -> &BTreeMap<NodeId, String> {
        &self.endpoints
    }

    /// Order in which members are asked: the leader, then by id.
    fn order(&self) -> Vec<(NodeId, &str)> {
        let mut v: Vec<(NodeId, &str)> = self
            .endpoints
            .iter()
            .map(|(id, ep)| (*id, ep.as_str()))
            .collect();
        v.sort_by_key(|(id, _)| (Some(*id) != self.leader, *id));
        v
    }

    /// Executes `action`. Membership actions go to lockd: `Initialize{id}`
    /// on `id`'s own endpoint with `id` alone as the initial voter (at the
    /// address it advertises itself),
    /// `AddLearner{id}` at `addr_of(id)` (the address the member advertises
    /// to its peers) without waiting for catch-up (the planner promotes once
    /// caught up), `ChangeVoters` with `remove_dropped`, `RemoveMember` and
    /// `TransferLeader`. Every other action is returned as
    /// [`Outcome::Caller`].
    pub async fn execute(
        &self,
        action: &Action,
        addr_of: impl Fn(NodeId) -> Option<String>,
    ) -> Result<Outcome, AdminError> {
        let what = action.to_string();
        match action {
            Action::Initialize { id } => {
                let ep = self
                    .endpoints
                    .get(id)
                    .ok_or_else(|| AdminError::UnknownMember {
                        action: what.clone(),
                        what: "endpoint",
                        id: *id,
                    })?;
                // No members: lockd initializes with itself alone, at the
                // address it advertises.
                let req = InitializeRequest { members: vec![] };
                self.call_on(&what, &[(*id, ep.as_str())], |mut c| {
                    let req = req.clone();
                    async move { c.initialize(req).await.map(|_| Vec::new()) }
                })
                .await
            }
            Action::AddLearner { id } => {
                let addr = addr_of(*id).ok_or_else(|| AdminError::UnknownMember {
                    action: what.clone(),
                    what: "address",
                    id: *id,
                })?;
                let req = AddLearnerRequest {
                    id: *id,
                    addr,
                    wait: false,
                };
                self.call_any(&what, |mut c| {
                    let req = req.clone();
                    async move { c.add_learner(req).await.map(|r| r.into_inner().members) }
                })
                .await
            }
            Action::ChangeVoters { voters } => {
                let req = ChangeVotersRequest {
                    voters: voters.iter().copied().collect(),
                    remove_dropped: true,
                };
                self.call_any(&what, |mut c| {
                    let req = req.clone();
                    async move { c.change_voters(req).await.map(|r| r.into_inner().members) }
                })
                .await
            }
            Action::RemoveMember { id } => {
                let req = RemoveMemberRequest { id: *id };
                self.call_any(&what, |mut c| async move {
                    c.remove_member(req).await.map(|r| r.into_inner().members)
                })
                .await
            }
            Action::TransferLeader { to } => {
                let req = TransferLeaderRequest { id: *to };
                self.call_any(&what, |mut c| async move {
                    c.transfer_leader(req).await.map(|_| Vec::new())
                })
                .await
            }
            Action::CreateMember { .. }
            | Action::CreatePod { .. }
            | Action::DeletePod { .. }
            | Action::DeleteMember { .. } => Ok(Outcome::Caller(action.clone())),
        }
    }

    async fn call_any<F, Fut>(&self, what: &str, f: F) -> Result<Outcome, AdminError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Member>, tonic::Status>>,
    {
        let order = self.order();
        self.call_on(what, &order, f).await
    }

    async fn call_on<F, Fut>(
        &self,
        what: &str,
        targets: &[(NodeId, &str)],
        f: F,
    ) -> Result<Outcome, AdminError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Member>, tonic::Status>>,
    {
        let mut tried = Vec::new();
        let mut last = String::from("no member endpoint is known");
        for (_, ep) in targets {
            tried.push(ep.to_string());
            let client = match connect(ep, self.connect_timeout, self.timeout).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match tokio::time::timeout(self.timeout, f(client)).await {
                Ok(Ok(members)) => {
                    return Ok(Outcome::Done {
                        via: ep.to_string(),
                        members,
                    })
                }
                Ok(Err(st)) if st.code() == Code::Unavailable => {
                    last = format!("{ep}: {}", st.message());
                }
                Ok(Err(st)) => {
                    return Err(AdminError::Rejected {
                        action: what.to_string(),
                        endpoint: ep.to_string(),
                        code: st.code(),
                        message: st.message().to_string(),
                    })
                }
                Err(_) => {
                    // The call may still complete: do not repeat it elsewhere.
                    return Err(AdminError::Rejected {
                        action: what.to_string(),
                        endpoint: ep.to_string(),
                        code: Code::DeadlineExceeded,
                        message: format!("no answer within {:?}", self.timeout),
                    });
                }
            }
        }
        Err(AdminError::Unavailable {
            action: what.to_string(),
            tried,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockd_proto::v1::{Replication, VoterSet};

    fn member(id: u64, voter: bool) -> Member {
        Member {
            id,
            addr: format!("127.0.0.1:{}", 7000 + id),
            voter,
        }
    }

    fn status(id: u64, role: PbRole, term: u64) -> StatusResponse {
        StatusResponse {
            id,
            cluster_id: "c1".into(),
            role: role as i32,
            term,
            leader_id: if role == PbRole::Leader { id } else { 0 },
            instance_id: format!("inst-{id}"),
            ..Default::default()
        }
    }

    fn leader_of_three() -> StatusResponse {
        let mut s = status(2, PbRole::Leader, 7);
        s.members = vec![
            member(1, true),
            member(2, true),
            member(3, true),
            member(4, false),
        ];
        s.replication = vec![
            Replication {
                id: 1,
                matched_index: 90,
                lag: 10,
            },
            Replication {
                id: 3,
                matched_index: 100,
                lag: 0,
            },
            Replication {
                id: 4,
                matched_index: 0,
                lag: 100,
            },
            // Not a member any more: ignored.
            Replication {
                id: 9,
                matched_index: 5,
                lag: 95,
            },
        ];
        s.commit_index = 99;
        s.last_log_index = 100;
        s
    }

    #[test]
    fn fresh_member_is_not_initialized() {
        let s = status(5, PbRole::Uninitialized, 0);
        let m = member_status(&s);
        assert!(!m.initialized);
        assert_eq!(m.role, Role::Uninitialized);
        assert_eq!(m.leader_id, None);
        assert_eq!(m.cluster_id, "c1");
    }

    #[test]
    fn members_or_role_mean_initialized() {
        let mut s = status(1, PbRole::Follower, 3);
        s.leader_id = 2;
        s.applied_index = 42;
        let m = member_status(&s);
        assert!(m.initialized);
        assert_eq!(m.role, Role::Follower);
        assert_eq!(m.leader_id, Some(2));
        assert_eq!(m.applied_index, 42);
        assert_eq!(m.term, 3);

        // Shutting down (role unknown) but with a membership: initialized.
        let mut s = status(1, PbRole::Unknown, 3);
        s.members = vec![member(1, true)];
        let m = member_status(&s);
        assert!(m.initialized);
        assert_eq!(m.role, Role::Follower);
        // Unknown role and no membership: not initialized.
        let m = member_status(&status(1, PbRole::Unknown, 0));
        assert!(!m.initialized);
        assert_eq!(m.role, Role::Uninitialized);
        // A role value from a newer lockd is treated as unknown.
        let mut s = status(1, PbRole::Leader, 1);
        s.role = 42;
        assert!(!member_status(&s).initialized);

        assert_eq!(
            member_status(&status(1, PbRole::Learner, 1)).role,
            Role::Learner
        );
        assert_eq!(
            member_status(&status(1, PbRole::Candidate, 1)).role,
            Role::Candidate
        );
        assert_eq!(
            member_status(&status(1, PbRole::Leader, 1)).role,
            Role::Leader
        );
    }

    #[test]
    fn raft_view_from_a_leader() {
        let v = raft_view(&leader_of_three()).expect("a leader's view");
        assert_eq!(v.leader, 2);
        assert_eq!(v.term, 7);
        assert_eq!(v.voters, BTreeSet::from([1, 2, 3]));
        assert_eq!(v.learners, BTreeSet::from([4]));
        assert!(!v.joint);
        assert_eq!(v.commit_index, 99);
        assert_eq!(v.lag, BTreeMap::from([(1, 10), (2, 0), (3, 0), (4, 100)]));
    }

    #[test]
    fn raft_view_only_from_a_leader_and_keeps_joint() {
        let mut s = leader_of_three();
        s.role = PbRole::Follower as i32;
        assert_eq!(raft_view(&s), None);
        s.role = PbRole::Candidate as i32;
        assert_eq!(raft_view(&s), None);
        let mut s = leader_of_three();
        s.joint = true;
        assert!(raft_view(&s).expect("view").joint);
        assert_eq!(raft_view(&s).expect("view").joint_target, None);
        s.voter_sets = vec![
            VoterSet { ids: vec![1, 2, 3] },
            VoterSet {
                ids: vec![1, 2, 3, 4, 5],
            },
        ];
        assert_eq!(
            raft_view(&s).expect("view").joint_target,
            Some(BTreeSet::from([1, 2, 3, 4, 5]))
        );
        // A member without a replication entry has no lag (not caught up).
        s.replication.clear();
        assert_eq!(raft_view(&s).expect("view").lag, BTreeMap::from([(2, 0)]));
    }

    #[test]
    fn single_member_leader_view() {
        let mut s = status(1, PbRole::Leader, 1);
        s.members = vec![member(1, true)];
        let v = raft_view(&s).expect("view");
        assert_eq!(v.voters, BTreeSet::from([1]));
        assert!(v.learners.is_empty());
        assert_eq!(v.lag, BTreeMap::from([(1, 0)]));
    }

    #[test]
    fn leader_with_the_highest_term_wins() {
        let old = status(1, PbRole::Leader, 4);
        let new = status(3, PbRole::Leader, 5);
        let follower = status(2, PbRole::Follower, 9);
        let all = [old.clone(), follower.clone(), new.clone()];
        assert_eq!(pick_leader_status(&all).map(|s| s.id), Some(3));
        let reversed = [new, follower.clone(), old];
        assert_eq!(pick_leader_status(reversed.iter()).map(|s| s.id), Some(3));
        assert_eq!(pick_leader_status(std::slice::from_ref(&follower)), None);
        assert_eq!(pick_leader_status(&[] as &[StatusResponse]), None);
        // Works on map values, as the controller holds them.
        let m: BTreeMap<u64, StatusResponse> =
            BTreeMap::from([(1, status(1, PbRole::Leader, 2)), (2, follower)]);
        assert_eq!(pick_leader_status(m.values()).map(|s| s.id), Some(1));
        // Equal terms (impossible within one cluster): deterministic.
        let a = status(4, PbRole::Leader, 6);
        let b = status(5, PbRole::Leader, 6);
        assert_eq!(
            pick_leader_status(&[a.clone(), b.clone()]).map(|s| s.id),
            pick_leader_status(&[b, a]).map(|s| s.id)
        );
    }

    #[test]
    fn instance_change_means_a_lost_volume() {
        let s = status(1, PbRole::Follower, 1);
        assert!(!instance_changed(None, &s));
        assert!(!instance_changed(Some("inst-1"), &s));
        assert!(instance_changed(Some("inst-0"), &s));
        let recorded = String::from("inst-0");
        assert!(instance_changed(Some(&recorded), &s));
        // Nothing to compare with: not a loss.
        assert!(!instance_changed(Some(""), &s));
        let mut blank = s.clone();
        blank.instance_id.clear();
        assert!(!instance_changed(Some("inst-0"), &blank));
    }

    #[test]
    fn volume_states() {
        let mut s = status(1, PbRole::Follower, 1);
        s.members = vec![member(1, true)];
        let fresh = status(1, PbRole::Uninitialized, 0);
        let v = volume_state;
        assert_eq!(v(false, None, Some(&s)), VolumeState::Absent);
        assert_eq!(v(true, None, None), VolumeState::Present);
        assert_eq!(v(true, Some("inst-1"), Some(&s)), VolumeState::Present);
        assert_eq!(v(true, Some("other"), Some(&s)), VolumeState::Lost);
        // Fresh with its recorded instance (e.g. a learner the leader's log
        // has not reached yet), or nothing recorded: not lost.
        assert_eq!(v(true, Some("inst-1"), Some(&fresh)), VolumeState::Present);
        assert_eq!(v(true, None, Some(&fresh)), VolumeState::Present);
        // A wiped dir: a new instance id.
        assert_eq!(v(true, Some("inst-0"), Some(&fresh)), VolumeState::Lost);
    }

    #[test]
    fn endpoint_uris() {
        assert_eq!(endpoint_uri("10.0.0.1:7001"), "http://10.0.0.1:7001");
        assert_eq!(endpoint_uri("http://a:1"), "http://a:1");
    }

    #[tokio::test]
    async fn non_membership_actions_go_back_to_the_caller() {
        let admin = Admin::new([], Duration::from_secs(1));
        for a in [
            Action::CreateMember { id: 1 },
            Action::CreatePod { id: 1 },
            Action::DeletePod { id: 1 },
            Action::DeleteMember {
                id: 1,
                delete_volume: true,
            },
        ] {
            let out = admin.execute(&a, |_| None).await.expect("no call made");
            assert_eq!(out, Outcome::Caller(a));
        }
    }

    #[tokio::test]
    async fn unreachable_members_and_unknown_targets() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let ep = format!("127.0.0.1:{port}");
        assert!(probe(&ep, Duration::from_millis(500)).await.is_none());
        let admin = Admin::new([(1, ep.clone()), (2, ep.clone())], Duration::from_secs(1))
            .with_leader(Some(2));
        let err = admin
            .execute(&Action::RemoveMember { id: 3 }, |_| None)
            .await
            .expect_err("nobody answers");
        match err {
            AdminError::Unavailable { tried, .. } => assert_eq!(tried.len(), 2),
            e => panic!("unexpected {e}"),
        }
        let err = admin
            .execute(&Action::Initialize { id: 5 }, |_| None)
            .await
            .expect_err("no endpoint for 5");
        assert!(
            matches!(err, AdminError::UnknownMember { id: 5, .. }),
            "{err}"
        );
        let err = admin
            .execute(&Action::AddLearner { id: 5 }, |_| None)
            .await
            .expect_err("no address for 5");
        assert!(
            matches!(
                err,
                AdminError::UnknownMember {
                    what: "address",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn leader_is_asked_first() {
        let admin = Admin::new(
            [(1, "a:1".to_string()), (2, "b:1".into()), (3, "c:1".into())],
            Duration::from_secs(1),
        )
        .with_leader(Some(3));
        let ids: Vec<NodeId> = admin.order().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![3, 1, 2]);
    }
}
