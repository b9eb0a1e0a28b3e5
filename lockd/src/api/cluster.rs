//! `lockd.v1.Cluster`: status and membership administration. Membership
//! changes run on the leader; any member forwards them there (once: a
//! forwarded call that lands on a non-leader fails with UNAVAILABLE).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lockd_proto::v1 as pb;
use lockd_proto::v1::cluster_client::ClusterClient;
use lockd_proto::v1::cluster_server::Cluster;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, ServerState};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{header, observe, NodeRef};
use crate::node::LockdNode;

const FORWARDED: &str = "x-lockd-forwarded";

/// The Cluster service.
pub struct ClusterService {
    node: NodeRef,
}

impl ClusterService {
    /// Serves Cluster on `node`.
    pub fn new(node: NodeRef) -> ClusterService {
        ClusterService { node }
    }

    fn rev(&self) -> u64 {
        self.node.sm.read().state.revision()
    }

    /// Ok(None) when this member leads; Ok(Some(client)) for the leader.
    async fn leader_or_forward<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<ClusterClient<Channel>>, Status> {
        let m = self.node.raft_metrics();
        if m.state == ServerState::Leader {
            return Ok(None);
        }
        if req.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable(
                "this member is not the leader (forwarded call)",
            ));
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(5)
            + self.node.config.election_timeout * 2;
        let mut rx = self.node.raft.metrics();
        let leader = loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                break l;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(Status::unavailable(
                    "no leader: the cluster has no quorum reachable from this member",
                ));
            }
        };
        if leader == self.node.config.id {
            return Ok(None);
        }
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(|| Status::unavailable(format!("leader {leader} has no known address")))?;
        let ch = self
            .node
            .peers
            .channel(&addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Some(ClusterClient::new(ch)))
    }

    fn members(&self) -> Vec<pb::Member> {
        members_of(&self.node)
    }

    /// Runs a membership change on the leader and returns the membership
    /// once this member has applied it.
    async fn change(
        &self,
        change: impl Into<ChangeMembers<u64, BasicNode>>,
        retain: bool,
    ) -> Result<(Option<pb::ResponseHeader>, Vec<pb::Member>), Status> {
        self.node
            .raft
            .change_membership(change, retain)
            .await
            .map_err(raft_status)?;
        self.wait_membership_applied().await;
        Ok((header(&self.node, self.rev()), self.members()))
    }

    async fn wait_membership_applied(&self) {
        // Membership changes return once committed; status readers expect the
        // new membership to be visible on this member right after.
        let m = self.node.raft_metrics();
        if let Some(idx) = m.membership_config.log_id().map(|l| l.index) {
            let _ = self
                .node
                .raft
                .wait(Some(Duration::from_secs(5)))
                .applied_index_at_least(Some(idx), "membership applied")
                .await;
        }
    }
}

fn forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

fn raft_status<E: std::fmt::Display>(e: E) -> Status {
    let msg = e.to_string();
    if msg.contains("has to forward request to") || msg.contains("ForwardToLeader") {
        Status::unavailable(msg)
    } else {
        Status::failed_precondition(msg)
    }
}

/// The membership of a member as protobuf.
pub fn members_of(node: &LockdNode) -> Vec<pb::Member> {
    let m = node.raft_metrics();
    let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
    m.membership_config
        .nodes()
        .map(|(id, n)| pb::Member {
            id: *id,
            addr: n.addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        observe(&self.node, "Cluster/Status", async {
            let m = self.node.raft_metrics();
            let role = LockdNode::role(&m);
            let last_log = m.last_log_index.unwrap_or(0);
            let replication = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, matched)| {
                            let mi = matched.map(|l| l.index).unwrap_or(0);
                            pb::Replication {
                                id: *id,
                                matched_index: mi,
                                lag: last_log.saturating_sub(mi),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let leader_addr = m
                .current_leader
                .and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone())
                })
                .unwrap_or_default();
            Ok(Response::new(pb::StatusResponse {
                header: header(&self.node, self.rev()),
                id: self.node.config.id,
                cluster_id: self.node.identity.cluster_id.clone(),
                role: role as i32,
                term: m.current_term,
                leader_id: m.current_leader.unwrap_or(0),
                leader_addr,
                last_log_index: last_log,
                commit_index: m.local_committed.map(|l| l.index).unwrap_or(0),
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                members: self.members(),
                replication,
                joint: m.membership_config.membership().get_joint_config().len() > 1,
                voter_sets: m
                    .membership_config
                    .membership()
                    .get_joint_config()
                    .iter()
                    .map(|set| pb::VoterSet {
                        ids: set.iter().copied().collect(),
                    })
                    .collect(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                instance_id: self.node.identity.instance.clone(),
                advertise_addr: self.node.config.advertise.clone(),
                purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            }))
        })
        .await
    }

    async fn initialize(
        &self,
        req: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        observe(&self.node, "Cluster/Initialize", async {
            let req = req.into_inner();
            let mut members: BTreeMap<u64, BasicNode> = req
                .members
                .into_iter()
                .map(|m| (m.id, BasicNode::new(m.addr)))
                .collect();
            if members.is_empty() {
                members.insert(
                    self.node.config.id,
                    BasicNode::new(self.node.config.advertise.clone()),
                );
            }
            if !members.contains_key(&self.node.config.id) {
                return Err(Status::invalid_argument(format!(
                    "the initial members must include this member (id {})",
                    self.node.config.id
                )));
            }
            let initialized = self.node.raft.is_initialized().await.map_err(raft_status)?;
            if initialized {
                return Err(Status::failed_precondition(
                    "this member is already part of an initialized cluster",
                ));
            }
            self.node
                .raft
                .initialize(members)
                .await
                .map_err(raft_status)?;
            Ok(Response::new(pb::InitializeResponse {
                header: header(&self.node, self.rev()),
            }))
        })
        .await
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        observe(&self.node, "Cluster/AddLearner", async {
            if let Some(mut c) = self.leader_or_forward(&req).await? {
                return c.add_learner(forwarded(req.into_inner())).await;
            }
            let req = req.into_inner();
            if req.id == 0 {
                return Err(Status::invalid_argument("node id 0 is reserved; use ids from 1"));
            }
            if req.addr.is_empty() {
                return Err(Status::invalid_argument("the learner's address is empty"));
            }
            let is_member = self.node.raft_metrics().membership_config.membership().get_node(&req.id).is_some();
            let bound = self.node.sm.read().state.instance_of(req.id).map(str::to_string);
            if !is_member && bound.is_some() {
                return Err(Status::failed_precondition(format!(
                    "node id {} was already used by this cluster; node ids are never reused, give the new member a new id",
                    req.id
                )));
            }
            // Ask the new member who it is before adding it.
            let ch = self.node.peers.channel(&req.addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let probe = tokio::time::timeout(
                Duration::from_secs(5),
                ClusterClient::new(ch).status(pb::StatusRequest {}),
            )
            .await;
            let status = match probe {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(s)) => {
                    return Err(Status::failed_precondition(format!(
                        "cannot reach the new member at {}: {}",
                        req.addr,
                        s.message()
                    )))
                }
                Err(_) => {
                    return Err(Status::failed_precondition(format!(
                        "the new member at {} did not answer in time",
                        req.addr
                    )))
                }
            };
            if status.id != req.id {
                return Err(Status::failed_precondition(format!(
                    "the member at {} has node id {}, not {}",
                    req.addr, status.id, req.id
                )));
            }
            if status.cluster_id != self.node.identity.cluster_id {
                return Err(Status::failed_precondition(format!(
                    "the member at {} belongs to cluster {:?}, not {:?}",
                    req.addr, status.cluster_id, self.node.identity.cluster_id
                )));
            }
            if let Some(b) = bound {
                if b != status.instance_id {
                    return Err(Status::failed_precondition(format!(
                        "node id {} is bound to another data dir; the member at {} must join with a new id",
                        req.id, req.addr
                    )));
                }
            }
            self.node
                .raft
                .add_learner(req.id, BasicNode::new(req.addr), req.wait)
                .await
                .map_err(raft_status)?;
            self.wait_membership_applied().await;
            Ok(Response::new(pb::AddLearnerResponse {
                header: header(&self.node, self.rev()),
                members: self.members(),
            }))
        })
        .await
    }

    async fn change_voters(
        &self,
        req: Request<pb::ChangeVotersRequest>,
    ) -> Result<Response<pb::ChangeVotersResponse>, Status> {
        observe(&self.node, "Cluster/ChangeVoters", async {
            if let Some(mut c) = self.leader_or_forward(&req).await? {
                return c.change_voters(forwarded(req.into_inner())).await;
            }
            let req = req.into_inner();
            let voters: BTreeSet<u64> = req.voters.iter().copied().collect();
            if voters.is_empty() {
                return Err(Status::invalid_argument("the voter set cannot be empty"));
            }
            let m = self.node.raft_metrics();
            for v in &voters {
                if m.membership_config.membership().get_node(v).is_none() {
                    return Err(Status::failed_precondition(format!(
                        "node {v} is not a member; add it as a learner first"
                    )));
                }
            }
            let (header, members) = self.change(voters, !req.remove_dropped).await?;
            Ok(Response::new(pb::ChangeVotersResponse { header, members }))
        })
        .await
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        observe(&self.node, "Cluster/Promote", async {
            if let Some(mut c) = self.leader_or_forward(&req).await? {
                return c.promote(forwarded(req.into_inner())).await;
            }
            let id = req.into_inner().id;
            let m = self.node.raft_metrics();
            if m.membership_config.membership().get_node(&id).is_none() {
                return Err(Status::failed_precondition(format!(
                    "node {id} is not a member; add it as a learner first"
                )));
            }
            let (header, members) = self
                .change(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
                .await?;
            Ok(Response::new(pb::PromoteResponse { header, members }))
        })
        .await
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        observe(&self.node, "Cluster/RemoveMember", async {
            if let Some(mut c) = self.leader_or_forward(&req).await? {
                return c.remove_member(forwarded(req.into_inner())).await;
            }
            let id = req.into_inner().id;
            let m = self.node.raft_metrics();
            if m.membership_config.membership().get_node(&id).is_none() {
                return Err(Status::not_found(format!("node {id} is not a member")));
            }
            let is_voter = m.membership_config.voter_ids().any(|v| v == id);
            let change = if is_voter {
                if m.membership_config.voter_ids().all(|v| v == id) {
                    return Err(Status::failed_precondition("cannot remove the last voter"));
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            let (header, members) = self.change(change, false).await?;
            Ok(Response::new(pb::RemoveMemberResponse { header, members }))
        })
        .await
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        observe(&self.node, "Cluster/TransferLeader", async {
            if let Some(mut c) = self.leader_or_forward(&req).await? {
                return c.transfer_leader(forwarded(req.into_inner())).await;
            }
            let id = req.into_inner().id;
            let m = self.node.raft_metrics();
            if !m.membership_config.voter_ids().any(|v| v == id) {
                return Err(Status::failed_precondition(format!(
                    "node {id} is not a voter"
                )));
            }
            if m.current_leader == Some(id) {
                return Ok(Response::new(pb::TransferLeaderResponse {
                    header: header(&self.node, self.rev()),
                    leader_id: id,
                }));
            }
            self.node
                .raft
                .trigger()
                .transfer_leader(id)
                .await
                .map_err(raft_status)?;
            let wait = Duration::from_secs(5) + self.node.config.election_timeout * 4;
            self.node
                .raft
                .wait(Some(wait))
                .current_leader(id, "leadership transfer")
                .await
                .map_err(|e| {
                    Status::unavailable(format!("leadership did not move to {id}: {e}"))
                })?;
            Ok(Response::new(pb::TransferLeaderResponse {
                header: header(&self.node, self.rev()),
                leader_id: id,
            }))
        })
        .await
    }

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        observe(&self.node, "Cluster/Snapshot", async {
            let applied = self.node.raft_metrics().last_applied.map(|l| l.index);
            self.node
                .raft
                .trigger()
                .snapshot()
                .await
                .map_err(raft_status)?;
            let m = self
                .node
                .raft
                .wait(Some(Duration::from_secs(60)))
                .metrics(|m| m.snapshot.map(|l| l.index) >= applied, "snapshot built")
                .await
                .map_err(|e| Status::unavailable(format!("snapshot did not complete: {e}")))?;
            Ok(Response::new(pb::SnapshotResponse {
                header: header(&self.node, self.rev()),
                snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            }))
        })
        .await
    }
}
