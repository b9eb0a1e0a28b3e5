//! A local actuator for the operator's planner: the same pure
//! [`lockd_operator::plan::plan`] the Kubernetes controller runs, executed
//! against real `lockd` processes of a [`Cluster`] instead of pods and
//! volumes.
//!
//! The mapping to the planner's world:
//!
//! - a member's *pod* is its process: [`PodState::Absent`] while it does not
//!   run, [`PodState::Pending`] while it runs but its admin API does not
//!   answer yet, else [`PodState::Running`] with `ready` from `/readyz`,
//!   smoothed like a kubelet readiness probe: ready after one success, not
//!   ready after [`LocalOperatorOptions::ready_failure_threshold`] failures
//!   in a row (lockd's `/readyz` requires applied >= committed, which
//!   flickers under a steady write load);
//! - its *volume* is its data dir: `VolumeState::Absent` when the dir is
//!   gone, `VolumeState::Lost` when the member reports another instance id
//!   than the one recorded when it was first seen, else
//!   `VolumeState::Present`;
//! - its *version* is the version string its process was started with;
//!   [`LocalOperatorOptions::version_args`] turns it into lockd flags so that
//!   an upgrade is a real configuration change;
//! - `next_id`, `bootstrapped` and the instance ids live in memory (the
//!   controller keeps them in the resource's status).
//!
//! Actions: `CreateMember` starts a new process on a fresh data dir without
//! `--initial-members` (it waits to be initialized or added), `CreatePod`
//! starts the process again on its existing data dir with the desired
//! version, `DeletePod` SIGTERMs it (lockd hands leadership over on SIGTERM)
//! and waits for the exit, `DeleteMember` stops it and deletes the data dir
//! if asked; membership actions go through
//! [`lockd_operator::lockd_admin::Admin`].
//!
//! Every executed action is logged ([`LocalOperator::actions`]) with the
//! leader of the pass that planned it, every restart is recorded with its
//! timing ([`LocalOperator::restarts`]), and, with a [`ProgressMonitor`]
//! attached, with the longest interval without acknowledged writes around
//! it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lockd_operator::lockd_admin::{self, Admin, Outcome};
use lockd_operator::plan::{
    self, Action, Desired, NodeId, Observed, ObservedMember, Phase, Plan, PodState, RaftView,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::v1::StatusResponse;
use crate::{http_get, Cluster, ClusterOptions, MemberConfig};

/// How a [`LocalOperator`] runs its members.
#[derive(Clone, Debug)]
pub struct LocalOperatorOptions {
    /// The lockd cluster id (`--cluster-id` of every member; the planner's
    /// [`Observed::cluster_id`]).
    pub cluster_id: String,
    /// Options of the underlying [`Cluster`] (its `cluster_id` is replaced
    /// by [`LocalOperatorOptions::cluster_id`]).
    pub cluster: ClusterOptions,
    /// Bound of one status probe and one `/readyz` request.
    pub probe_timeout: Duration,
    /// Bound of one admin call to one member.
    pub admin_timeout: Duration,
    /// Bound for a started process to answer `/healthz`.
    pub start_timeout: Duration,
    /// Bound for a SIGTERMed process to exit (then it is SIGKILLed).
    pub stop_timeout: Duration,
    /// Pause before the next pass when a pass had nothing to do (waiting
    /// for a member to become ready or catch up) or failed.
    pub pass_interval: Duration,
    /// `/readyz` failures in a row (one per pass) after which a ready member
    /// counts as not ready (a kubelet probe's `failureThreshold`).
    pub ready_failure_threshold: u32,
    /// The lockd flags a version adds to the command line.
    pub version_args: fn(&str) -> Vec<String>,
}

impl Default for LocalOperatorOptions {
    fn default() -> Self {
        LocalOperatorOptions {
            cluster_id: "lockd-local-operator".to_string(),
            cluster: ClusterOptions::default(),
            probe_timeout: Duration::from_secs(1),
            admin_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(20),
            pass_interval: Duration::from_millis(100),
            ready_failure_threshold: 3,
            version_args: default_version_args,
        }
    }
}

/// A harmless flag that differs per version, so that restarting a member on
/// another version changes its configuration: `--watch-progress-interval-ms`
/// between 5000 and 14999, derived from the version string (FNV-1a).
pub fn default_version_args(version: &str) -> Vec<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in version.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    vec![
        "--watch-progress-interval-ms".to_string(),
        (5_000 + h % 10_000).to_string(),
    ]
}

/// One action the operator executed.
#[derive(Clone, Debug)]
pub struct ExecutedAction {
    /// The pass that planned it (from 1).
    pub pass: u64,
    /// When execution started.
    pub at: Instant,
    /// The action.
    pub action: Action,
    /// Leader of the raft view the pass planned from.
    pub leader: Option<NodeId>,
    /// The desired version of the pass.
    pub version: String,
    /// Ok, or why it failed.
    pub result: Result<(), String>,
}

impl ExecutedAction {
    /// True when it succeeded.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// One restart (`DeletePod` and the `CreatePod` that followed).
#[derive(Clone, Debug)]
pub struct Restart {
    /// The member.
    pub id: NodeId,
    /// Version it ran before.
    pub from_version: Option<String>,
    /// Version it was asked to come back on.
    pub to_version: String,
    /// Whether it was the leader when it was stopped (by the pass's view).
    pub was_leader: bool,
    /// When leadership was transferred away from it right before (when the
    /// action before its `DeletePod` was a `TransferLeader` away from it).
    pub transfer_at: Option<Instant>,
    /// When the SIGTERM was sent.
    pub stopped_at: Instant,
    /// When it was started again.
    pub started_at: Option<Instant>,
    /// When a pass first judged it healthy again.
    pub healthy_at: Option<Instant>,
    /// Longest interval without an acknowledged write that overlaps
    /// `transfer_at.unwrap_or(stopped_at)..healthy_at` (None without a
    /// [`ProgressMonitor`] or while no write was acknowledged after it).
    pub write_gap: Option<Duration>,
}

/// A change of the membership (as reported by the leader).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipChange {
    /// When it was first observed.
    pub at: Instant,
    /// The pass that observed it.
    pub pass: u64,
    /// Leader reporting it.
    pub leader: NodeId,
    /// Voters.
    pub voters: BTreeSet<NodeId>,
    /// Learners.
    pub learners: BTreeSet<NodeId>,
}

/// What one pass saw.
#[derive(Clone, Debug)]
pub struct Observation {
    /// The planner's input.
    pub observed: Observed,
    /// Status of every member that answered.
    pub statuses: BTreeMap<NodeId, StatusResponse>,
    /// Members counted as ready (smoothed `/readyz`, see the module docs).
    pub ready: BTreeSet<NodeId>,
}

/// The result of one pass.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The pass number.
    pub pass: u64,
    /// What was observed.
    pub observation: Observation,
    /// What the planner answered.
    pub plan: Plan,
    /// Actions executed successfully.
    pub executed: usize,
    /// The failure that stopped the pass's actions, if any.
    pub error: Option<String>,
}

/// The state in which [`LocalOperator::reconcile_until_steady`] returned.
#[derive(Clone, Debug)]
pub struct Steady {
    /// The last pass.
    pub report: StepReport,
    /// Passes it took.
    pub passes: u64,
    /// Time it took.
    pub elapsed: Duration,
}

impl Steady {
    /// The leader's raft view at the end.
    pub fn view(&self) -> Option<&RaftView> {
        self.report.observation.observed.raft.as_ref()
    }

    /// Voters at the end.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.view().map(|v| v.voters.clone()).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Progress monitor
// ---------------------------------------------------------------------------

/// Samples a progress counter (e.g. [`crate::Writer::acked`]) and records
/// when it grew, to measure the longest interval without progress around an
/// event. The resolution is the sampling interval.
pub struct ProgressMonitor {
    times: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl ProgressMonitor {
    /// Samples `counter` every `every` in a background task.
    pub fn spawn<F>(counter: F, every: Duration) -> ProgressMonitor
    where
        F: Fn() -> usize + Send + 'static,
    {
        let times = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (times.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last = counter();
            while !s.load(Ordering::SeqCst) {
                tick.tick().await;
                let now = counter();
                if now > last {
                    last = now;
                    crate::lock(&t).push(Instant::now());
                }
            }
        });
        ProgressMonitor {
            times,
            stop,
            handle,
        }
    }

    /// When the counter was seen to grow, in order.
    pub fn progress_times(&self) -> Vec<Instant> {
        crate::lock(&self.times).clone()
    }

    /// The longest interval without progress that overlaps `from..to`: the
    /// largest distance between consecutive progress times, counting from
    /// the last progress at or before `from` (or `from` itself) to the first
    /// progress after `to`. None while there is no progress after `to` yet.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Option<Duration> {
        longest_gap(&crate::lock(&self.times), from, to)
    }

    /// Stops the sampling task (it drops `counter`).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.await;
    }
}

fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    let after = *times.iter().find(|t| **t > to)?;
    let start = times
        .iter()
        .rev()
        .find(|t| **t <= from)
        .copied()
        .unwrap_or(from);
    let mut prev = start;
    let mut gap = Duration::ZERO;
    for &t in times.iter().filter(|t| **t > from && **t <= to) {
        gap = gap.max(t - prev);
        prev = t;
    }
    Some(gap.max(after - prev))
}

// ---------------------------------------------------------------------------
// The operator
// ---------------------------------------------------------------------------

struct LocalMember {
    data_dir: PathBuf,
    /// Version the current (or last) process was started with.
    version: Option<String>,
}

/// Receives the endpoints clients should use whenever they change.
pub type EndpointSink = Box<dyn Fn(&[String]) + Send + Sync>;

/// Runs the operator's planner against real lockd processes.
pub struct LocalOperator {
    cluster: Cluster,
    opts: LocalOperatorOptions,
    started: Instant,
    next_id: NodeId,
    bootstrapped: bool,
    members: BTreeMap<NodeId, LocalMember>,
    instances: BTreeMap<NodeId, String>,
    created: Vec<NodeId>,
    log: Vec<ExecutedAction>,
    restarts: Vec<Restart>,
    memberships: Vec<MembershipChange>,
    pass: u64,
    last_view: Option<RaftView>,
    published: Vec<String>,
    /// Smoothed readiness: (ready, `/readyz` failures in a row).
    readiness: BTreeMap<NodeId, (bool, u32)>,
    last_phase: Option<Phase>,
    sink: Option<EndpointSink>,
    progress: Option<ProgressMonitor>,
}

impl LocalOperator {
    /// An operator with no member yet (an empty [`Cluster`] temp dir).
    pub async fn start(opts: LocalOperatorOptions) -> Result<LocalOperator> {
        let mut copts = opts.cluster.clone();
        copts.cluster_id = Some(opts.cluster_id.clone());
        let cluster = Cluster::start(0, copts).await.context("empty harness")?;
        Ok(LocalOperator {
            cluster,
            opts,
            started: Instant::now(),
            next_id: 1,
            bootstrapped: false,
            members: BTreeMap::new(),
            instances: BTreeMap::new(),
            created: Vec::new(),
            log: Vec::new(),
            restarts: Vec::new(),
            memberships: Vec::new(),
            pass: 0,
            last_view: None,
            published: Vec::new(),
            readiness: BTreeMap::new(),
            last_phase: None,
            sink: None,
            progress: None,
        })
    }

    /// The process harness (for faults injected by tests: terminate, kill,
    /// wipe...). The operator derives pod and volume states from processes
    /// and data dirs on every pass, so such changes are observed.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The options.
    pub fn options(&self) -> &LocalOperatorOptions {
        &self.opts
    }

    /// Every executed action, in order.
    pub fn actions(&self) -> &[ExecutedAction] {
        &self.log
    }

    /// Ids of every member ever created, in creation order.
    pub fn created_ids(&self) -> &[NodeId] {
        &self.created
    }

    /// Ids of the members that exist (process or data dir).
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// Version member `id`'s process was last started with.
    pub fn version_of(&self, id: NodeId) -> Option<&str> {
        self.members.get(&id).and_then(|m| m.version.as_deref())
    }

    /// Membership as it changed over time (one entry per change).
    pub fn membership_changes(&self) -> &[MembershipChange] {
        &self.memberships
    }

    /// The last raft view observed.
    pub fn last_view(&self) -> Option<&RaftView> {
        self.last_view.as_ref()
    }

    /// Every restart, with the write gaps measured by the attached
    /// [`ProgressMonitor`] (if any).
    pub fn restarts(&self) -> Vec<Restart> {
        let now = Instant::now();
        self.restarts
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if let Some(p) = &self.progress {
                    let from = r.transfer_at.unwrap_or(r.stopped_at);
                    r.write_gap = p.longest_gap(from, r.healthy_at.unwrap_or(now));
                }
                r
            })
            .collect()
    }

    /// Endpoints (`http://127.0.0.1:P`) of the running, ready members of the
    /// membership, as last published.
    pub fn member_endpoints(&self) -> Vec<String> {
        self.published.clone()
    }

    /// Calls `sink` now and whenever the member endpoints change (like a
    /// Service's endpoints: a member about to be stopped is removed first).
    pub fn on_endpoints(&mut self, sink: impl Fn(&[String]) + Send + Sync + 'static) {
        sink(&self.published);
        self.sink = Some(Box::new(sink));
    }

    /// Removes the endpoint sink.
    pub fn clear_endpoint_sink(&mut self) {
        self.sink = None;
    }

    /// Attaches a progress monitor used to measure write gaps per restart.
    pub fn set_progress(&mut self, monitor: ProgressMonitor) {
        self.progress = Some(monitor);
    }

    /// Detaches the progress monitor (e.g. to stop it).
    pub fn take_progress(&mut self) -> Option<ProgressMonitor> {
        self.progress.take()
    }

    fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[local-operator +{:>7.2}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    fn publish(&mut self, eps: Vec<String>) {
        if eps != self.published {
            self.say(format!("endpoints: {eps:?}"));
            self.published = eps;
            if let Some(s) = &self.sink {
                s(&self.published);
            }
        }
    }

    fn endpoint_of(&self, id: NodeId) -> String {
        self.cluster.endpoint(id)
    }

    /// Probes every member and maps what it sees to the planner's input.
    pub async fn observe(&mut self) -> Observation {
        let t = self.opts.probe_timeout;
        let mut probes = JoinSet::new();
        let mut running = BTreeSet::new();
        for &id in self.members.keys() {
            if !self.cluster.is_running(id) {
                continue;
            }
            running.insert(id);
            let ep = self.endpoint_of(id);
            let http = self.cluster.http_addr(id);
            probes.spawn(async move {
                let st = lockd_admin::probe(&ep, t).await;
                let ready = match st {
                    Some(_) => matches!(http_get(&http, "/readyz", t).await, Ok((200, _))),
                    None => false,
                };
                (id, st, ready)
            });
        }
        let mut statuses = BTreeMap::new();
        let threshold = self.opts.ready_failure_threshold.max(1);
        self.readiness.retain(|id, _| running.contains(id));
        while let Some(r) = probes.join_next().await {
            let Ok((id, st, passed)) = r else { continue };
            if let Some(s) = st {
                statuses.insert(id, s);
            }
            let (ready, failures) = self.readiness.entry(id).or_insert((false, 0));
            if passed {
                (*ready, *failures) = (true, 0);
            } else {
                *failures += 1;
                if *failures >= threshold {
                    *ready = false;
                }
            }
        }
        let ready: BTreeSet<NodeId> = self
            .readiness
            .iter()
            .filter(|(id, r)| r.0 && statuses.contains_key(*id))
            .map(|(id, _)| *id)
            .collect();
        // Instance ids: recorded the first time a member answers.
        for (id, s) in &statuses {
            if !s.instance_id.is_empty() {
                self.instances
                    .entry(*id)
                    .or_insert_with(|| s.instance_id.clone());
            }
        }
        let raft =
            lockd_admin::pick_leader_status(statuses.values()).and_then(lockd_admin::raft_view);
        if raft.is_some() {
            self.bootstrapped = true;
        }
        let members = self
            .members
            .iter()
            .map(|(&id, m)| {
                let st = statuses.get(&id);
                let pod = if !running.contains(&id) {
                    PodState::Absent
                } else if st.is_none() {
                    PodState::Pending
                } else {
                    PodState::Running {
                        ready: ready.contains(&id),
                    }
                };
                ObservedMember {
                    id,
                    pod,
                    volume: lockd_admin::volume_state(
                        m.data_dir.is_dir(),
                        self.instances.get(&id).map(String::as_str),
                        st,
                    ),
                    version: (pod != PodState::Absent)
                        .then(|| m.version.clone())
                        .flatten(),
                    status: st.map(lockd_admin::member_status),
                }
            })
            .collect();
        Observation {
            observed: Observed {
                cluster_id: self.opts.cluster_id.clone(),
                next_id: self.next_id,
                bootstrapped: self.bootstrapped,
                members,
                raft,
                unhealthy_for: BTreeMap::new(),
            },
            statuses,
            ready,
        }
    }

    /// Records membership changes and publishes the endpoints of the ready
    /// members of the membership.
    fn note_view(&mut self, obs: &Observation) {
        let Some(view) = obs.observed.raft.clone() else {
            return;
        };
        let changed = self
            .memberships
            .last()
            .is_none_or(|m| m.voters != view.voters || m.learners != view.learners);
        if changed {
            self.say(format!(
                "membership: voters {:?} learners {:?} (leader {}, term {})",
                view.voters, view.learners, view.leader, view.term
            ));
            self.memberships.push(MembershipChange {
                at: Instant::now(),
                pass: self.pass,
                leader: view.leader,
                voters: view.voters.clone(),
                learners: view.learners.clone(),
            });
        }
        let eps: Vec<String> = view
            .voters
            .iter()
            .chain(view.learners.iter())
            .filter(|id| obs.ready.contains(id) && self.members.contains_key(id))
            .map(|id| self.endpoint_of(*id))
            .collect();
        if !eps.is_empty() {
            self.publish(eps);
        }
        self.last_view = Some(view);
    }

    fn unpublish(&mut self, id: NodeId) {
        if self.members.contains_key(&id) {
            let ep = self.endpoint_of(id);
            let eps: Vec<String> = self
                .published
                .iter()
                .filter(|e| **e != ep)
                .cloned()
                .collect();
            self.publish(eps);
        }
    }

    /// One pass: observe, plan, execute the plan's actions in order (the
    /// first failure ends the pass).
    pub async fn step(&mut self, desired: &Desired) -> StepReport {
        self.pass += 1;
        let obs = self.observe().await;
        self.note_view(&obs);
        let p = plan::plan(desired, &obs.observed);
        self.next_id = self.next_id.max(p.next_id);
        if self.last_phase != Some(p.phase) {
            let why: Vec<String> = p
                .conditions
                .iter()
                .filter(|c| c.status && c.kind != plan::ConditionKind::Progressing)
                .map(|c| format!("{} {}", c.kind.as_str(), c.reason))
                .collect();
            self.say(format!("pass {}: phase {:?} {why:?}", self.pass, p.phase));
            self.last_phase = Some(p.phase);
        }

        // Restarted members that are healthy again.
        let healthy: BTreeSet<NodeId> = p
            .health
            .voters
            .union(&p.health.learners)
            .filter(|id| !p.health.unhealthy.contains(id))
            .copied()
            .collect();
        let now = Instant::now();
        for r in &mut self.restarts {
            if r.healthy_at.is_none() && r.started_at.is_some() && healthy.contains(&r.id) {
                r.healthy_at = Some(now);
            }
        }

        let leader = obs.observed.raft.as_ref().map(|r| r.leader);
        let mut executed = 0;
        let mut error = None;
        for action in &p.actions {
            let at = Instant::now();
            let result = self.execute(action, desired, &obs).await;
            let result = result.map_err(|e| format!("{e:#}"));
            match &result {
                Ok(()) => self.say(format!("pass {}: {action}: done", self.pass)),
                Err(e) => self.say(format!("pass {}: {action}: FAILED: {e}", self.pass)),
            }
            self.log.push(ExecutedAction {
                pass: self.pass,
                at,
                action: action.clone(),
                leader,
                version: desired.version.clone(),
                result: result.clone(),
            });
            match result {
                Ok(()) => executed += 1,
                Err(e) => {
                    error = Some(format!("{action}: {e}"));
                    break;
                }
            }
        }
        StepReport {
            pass: self.pass,
            observation: obs,
            plan: p,
            executed,
            error,
        }
    }

    async fn execute(
        &mut self,
        action: &Action,
        desired: &Desired,
        obs: &Observation,
    ) -> Result<()> {
        let version = desired.version.clone();
        match action {
            Action::CreateMember { id } => self.create_member(*id, &version).await,
            Action::CreatePod { id } => self.create_pod(*id, &version).await,
            Action::DeletePod { id } => self.delete_pod(*id, desired, obs).await,
            Action::DeleteMember { id, delete_volume } => {
                self.delete_member(*id, *delete_volume).await
            }
            Action::Initialize { .. }
            | Action::AddLearner { .. }
            | Action::ChangeVoters { .. }
            | Action::RemoveMember { .. }
            | Action::TransferLeader { .. } => {
                let endpoints: Vec<(NodeId, String)> = obs
                    .statuses
                    .keys()
                    .filter(|id| self.cluster.is_running(**id))
                    .map(|id| (*id, self.endpoint_of(*id)))
                    .collect();
                let addrs: BTreeMap<NodeId, String> = self
                    .members
                    .keys()
                    .map(|id| (*id, self.cluster.addr(*id)))
                    .collect();
                let admin = Admin::new(endpoints, self.opts.admin_timeout)
                    .with_leader(obs.observed.raft.as_ref().map(|r| r.leader));
                match admin.execute(action, |id| addrs.get(&id).cloned()).await? {
                    Outcome::Done { .. } => {
                        if matches!(action, Action::Initialize { .. }) {
                            self.bootstrapped = true;
                        }
                        Ok(())
                    }
                    Outcome::Caller(a) => bail!("{a} is not a membership action"),
                }
            }
        }
    }

    async fn create_member(&mut self, id: NodeId, version: &str) -> Result<()> {
        if self.created.contains(&id) || self.members.contains_key(&id) {
            bail!("node id {id} was used before: ids are never reused");
        }
        let data_dir = self.cluster.root().join(format!("node-{id}"));
        if data_dir.exists() {
            bail!("data dir {} already exists", data_dir.display());
        }
        // The "volume" exists before the "pod" starts: an empty data dir.
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("create {}", data_dir.display()))?;
        self.created.push(id);
        self.members.insert(
            id,
            LocalMember {
                data_dir,
                version: Some(version.to_string()),
            },
        );
        self.start_process(id, version).await
    }

    async fn create_pod(&mut self, id: NodeId, version: &str) -> Result<()> {
        let m = self
            .members
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no member {id} to start"))?;
        m.version = Some(version.to_string());
        let now = Instant::now();
        if let Some(r) = self
            .restarts
            .iter_mut()
            .rev()
            .find(|r| r.id == id && r.started_at.is_none())
        {
            r.started_at = Some(now);
        }
        self.start_process(id, version).await
    }

    async fn start_process(&mut self, id: NodeId, version: &str) -> Result<()> {
        self.readiness.remove(&id);
        let m = self
            .members
            .get(&id)
            .ok_or_else(|| anyhow!("no member {id}"))?;
        let config = MemberConfig {
            data_dir: Some(m.data_dir.clone()),
            initial_members: false,
            extra_args: (self.opts.version_args)(version),
        };
        self.cluster.start_member(id, config)?;
        self.cluster
            .wait_healthy(id, self.opts.start_timeout)
            .await
            .with_context(|| format!("member {id} did not come up"))
    }

    async fn stop_process(&mut self, id: NodeId) -> Result<()> {
        self.unpublish(id);
        self.readiness.remove(&id);
        if self.members.contains_key(&id) && self.cluster.is_running(id) {
            self.cluster.terminate(id, self.opts.stop_timeout).await?;
        }
        Ok(())
    }

    async fn delete_pod(&mut self, id: NodeId, desired: &Desired, obs: &Observation) -> Result<()> {
        let leader = obs.observed.raft.as_ref().map(|r| r.leader);
        // A TransferLeader away from this member right before its restart.
        let transfer_at = self.log.last().and_then(|a| match a.action {
            Action::TransferLeader { to } if a.ok() && a.leader == Some(id) && to != id => {
                Some(a.at)
            }
            _ => None,
        });
        self.restarts.push(Restart {
            id,
            from_version: self.members.get(&id).and_then(|m| m.version.clone()),
            to_version: desired.version.clone(),
            was_leader: leader == Some(id),
            transfer_at,
            stopped_at: Instant::now(),
            started_at: None,
            healthy_at: None,
            write_gap: None,
        });
        self.stop_process(id).await
    }

    async fn delete_member(&mut self, id: NodeId, delete_volume: bool) -> Result<()> {
        self.stop_process(id).await?;
        if delete_volume {
            if let Some(m) = self.members.remove(&id) {
                match std::fs::remove_dir_all(&m.data_dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("remove {}", m.data_dir.display()))
                    }
                }
            }
            self.instances.remove(&id);
        }
        Ok(())
    }

    /// Whether the cluster matches `desired` in `r`: nothing to do, phase
    /// Running, exactly `replicas` voters, all healthy and on the desired
    /// version, no learner, and no other member left (process or data dir).
    pub fn is_steady(&self, desired: &Desired, r: &StepReport) -> bool {
        let h = &r.plan.health;
        r.plan.actions.is_empty()
            && r.error.is_none()
            && r.plan.phase == Phase::Running
            && h.voters.len() == desired.replicas as usize
            && h.healthy_voters == h.voters
            && h.learners.is_empty()
            && h.unhealthy.is_empty()
            && h.lost.is_empty()
            && h.outdated.is_empty()
            && h.mismatched.is_empty()
            && self.members.keys().all(|id| h.voters.contains(id))
            && h.voters.iter().all(|id| {
                self.version_of(*id) == Some(desired.version.as_str())
                    && self.cluster.is_running(*id)
            })
    }

    /// Passes until [`LocalOperator::is_steady`] (a short pause after a pass
    /// with nothing to do or a failure; right away after a pass that acted).
    pub async fn reconcile_until_steady(
        &mut self,
        desired: &Desired,
        timeout: Duration,
    ) -> Result<Steady> {
        let began = Instant::now();
        let deadline = began + timeout;
        let first_pass = self.pass;
        self.say(format!(
            "reconciling to {} replicas on version {:?}",
            desired.replicas, desired.version
        ));
        let mut last_error = None;
        loop {
            let r = self.step(desired).await;
            if r.error.is_some() {
                last_error = r.error.clone();
            }
            if self.is_steady(desired, &r) {
                let passes = self.pass - first_pass;
                self.say(format!(
                    "steady after {passes} passes, {:.2}s: voters {:?}, leader {:?}",
                    began.elapsed().as_secs_f64(),
                    r.plan.health.voters,
                    r.plan.health.leader
                ));
                return Ok(Steady {
                    report: r,
                    passes,
                    elapsed: began.elapsed(),
                });
            }
            if Instant::now() >= deadline {
                bail!(
                    "not steady after {timeout:?} ({} passes): {}; last error: {}",
                    self.pass - first_pass,
                    describe(&r),
                    last_error.as_deref().unwrap_or("none")
                );
            }
            if r.executed == 0 {
                tokio::time::sleep(self.opts.pass_interval).await;
            }
        }
    }
}

/// A one-paragraph description of a pass, for errors.
pub fn describe(r: &StepReport) -> String {
    let mut s = String::new();
    let h = &r.plan.health;
    let _ = write!(
        s,
        "pass {}: phase {:?}, actions {:?}, leader {:?}, voters {:?}, learners {:?}, healthy voters {:?}, unhealthy {:?}, lost {:?}, outdated {:?}",
        r.pass, r.plan.phase, r.plan.actions, h.leader, h.voters, h.learners, h.healthy_voters, h.unhealthy, h.lost, h.outdated
    );
    for c in &r.plan.conditions {
        if c.status {
            let _ = write!(s, "; {} ({}): {}", c.kind.as_str(), c.reason, c.message);
        }
    }
    for m in &r.observation.observed.members {
        let _ = write!(
            s,
            "; member {}: pod {:?} volume {:?} version {:?} initialized {:?}",
            m.id,
            m.pod,
            m.volume,
            m.version,
            m.status.as_ref().map(|s| s.initialized)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let times = vec![ms(0), ms(10), ms(20), ms(500), ms(510), ms(600)];
        // Window 100..400: from 20 to 500.
        assert_eq!(
            longest_gap(&times, ms(100), ms(400)),
            Some(Duration::from_millis(480))
        );
        // Window 15..505: from 20 to 500 again (inside).
        assert_eq!(
            longest_gap(&times, ms(15), ms(505)),
            Some(Duration::from_millis(480))
        );
        // Nothing after the window yet.
        assert_eq!(longest_gap(&times, ms(100), ms(700)), None);
        // No progress before: counted from the window's start.
        assert_eq!(
            longest_gap(&times[3..], ms(100), ms(505)),
            Some(Duration::from_millis(400))
        );
    }

    #[test]
    fn versions_give_different_flags() {
        assert_ne!(default_version_args("v1"), default_version_args("v2"));
        assert_eq!(default_version_args("v1"), default_version_args("v1"));
    }
}
