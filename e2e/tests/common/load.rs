//! A background load for operator tests: a [`Writer`] plus lock contenders
//! following whatever endpoints the test publishes, and the checks run on
//! their reports. Independent of how the cluster is run (local operator or
//! Kubernetes).

// Each including test crate uses a different subset of these items.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_client::recipes::Mutex;
use lockd_client::{proto, Client, ClientOptions, Error};
use lockd_e2e::{kv_client, verify_acked, wait_until, Writer, WriterReport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bound of waits for load progress.
const WAIT: Duration = Duration::from_secs(60);

/// The keys a [`Load`] under one prefix uses.
#[derive(Clone, Debug)]
pub struct LoadPaths {
    /// The contended lock: `<prefix>/lock`.
    pub lock: String,
    /// The counter incremented under the lock: `<prefix>/counter`.
    pub counter: String,
    /// One child per applied increment: `<n>-t<token>-<task>-<attempt>`,
    /// under `<prefix>/log`.
    pub log: String,
    /// The writer's key prefix: `<prefix>/w`.
    pub writes: String,
}

impl LoadPaths {
    pub fn new(prefix: &str) -> LoadPaths {
        LoadPaths {
            lock: format!("{prefix}/lock"),
            counter: format!("{prefix}/counter"),
            log: format!("{prefix}/log"),
            writes: format!("{prefix}/w"),
        }
    }
}

/// One acquisition of the lock by a contender.
#[derive(Clone, Debug)]
pub struct Hold {
    pub task: usize,
    pub token: u64,
    pub acquired: Instant,
    /// When the last successful guarded write was sent.
    pub last_ok_sent: Option<Instant>,
    pub writes: u32,
}

#[derive(Debug, Default)]
pub struct LockerReport {
    pub holds: Vec<Hold>,
    /// Guarded writes that failed without an answer: may have applied.
    pub uncertain: u64,
    /// Guarded writes rejected because the lock moved on.
    pub fenced: u64,
    pub errors: Vec<String>,
}

pub fn put_op(path: String, data: impl Into<Vec<u8>>) -> proto::Op {
    proto::Op {
        op: Some(proto::op::Op::Put(proto::PutRequest {
            path,
            data: data.into(),
            expected_version: None,
            parents: true,
        })),
    }
}

pub async fn read_counter(client: &Client, counter: &str) -> Result<u64, Error> {
    match client.get(counter).await {
        Ok(r) => {
            let data = r.node.map(|n| n.data).unwrap_or_default();
            String::from_utf8_lossy(&data)
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("counter {data:?}: {e}")))
        }
        Err(Error::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Acquires the lock again and again: under it, reads the counter and
/// writes counter + 1 with a guarded transaction (which also creates a log
/// child naming the new value), three times, then releases. One session
/// (and client, on the endpoints current at that time) per few holds.
async fn locker(
    task: usize,
    paths: LoadPaths,
    mut endpoints: watch::Receiver<Vec<String>>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> LockerReport {
    const HOLDS_PER_SESSION: usize = 5;
    const WRITES_PER_HOLD: usize = 3;
    let mut rep = LockerReport::default();
    let mut attempt = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let eps = match endpoints.wait_for(|e| !e.is_empty()).await {
            Ok(e) => e.clone(),
            Err(_) => break,
        };
        let opts = ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(20),
        };
        let client = match Client::connect_with(eps, opts) {
            Ok(c) => c,
            Err(e) => {
                rep.errors.push(format!("connect: {e}"));
                break;
            }
        };
        let session = match client.open_session(Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                rep.errors.push(format!("open session: {e}"));
                // Retry pacing while the cluster is not reachable.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mutex = Mutex::new(client.clone(), &paths.lock, &session);
        for _ in 0..HOLDS_PER_SESSION {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let guard = match mutex.lock_timeout(Duration::from_secs(30)).await {
                Ok(Some(g)) => g,
                Ok(None) => {
                    rep.errors.push("lock: not acquired within 30s".into());
                    break;
                }
                Err(e) => {
                    rep.errors.push(format!("lock: {e}"));
                    break;
                }
            };
            let token = guard.fencing_token();
            let mut hold = Hold {
                task,
                token,
                acquired: Instant::now(),
                last_ok_sent: None,
                writes: 0,
            };
            for _ in 0..WRITES_PER_HOLD {
                let n = match read_counter(&client, &paths.counter).await {
                    Ok(n) => n,
                    Err(e) => {
                        rep.errors.push(format!("read counter: {e}"));
                        break;
                    }
                };
                attempt += 1;
                let entry = format!("{}/{:010}-t{token}-{task}-{attempt}", paths.log, n + 1);
                let txn = proto::TxnRequest {
                    success: vec![
                        put_op(paths.counter.clone(), (n + 1).to_string()),
                        put_op(entry, token.to_string()),
                    ],
                    ..Default::default()
                };
                let sent = Instant::now();
                match guard.guarded_txn(txn).await {
                    Ok(r) if r.succeeded => {
                        hold.last_ok_sent = Some(sent);
                        hold.writes += 1;
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {
                        rep.fenced += 1;
                        break;
                    }
                    Err(e) => {
                        if !e.is_unavailable() {
                            rep.uncertain += 1;
                        }
                        rep.errors.push(format!("guarded txn: {e}"));
                        break;
                    }
                }
            }
            rep.holds.push(hold);
            if let Err(e) = guard.unlock().await {
                rep.errors.push(format!("unlock: {e}"));
                break;
            }
        }
        if let Err(e) = session.close().await {
            rep.errors.push(format!("close session: {e}"));
        }
    }
    rep
}

/// The background load: a [`Writer`] and (optionally) two lock contenders,
/// all following the endpoints given to [`Load::set_endpoints`] or to the
/// closure from [`Load::endpoint_sink`]. Nothing runs against the cluster
/// until endpoints are set.
pub struct Load {
    paths: LoadPaths,
    writer: Arc<Writer>,
    endpoints: Arc<watch::Sender<Vec<String>>>,
    lock_writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    lockers: Vec<JoinHandle<LockerReport>>,
}

impl Load {
    /// Starts the writer (keys under `<prefix>/w`) and, if `with_lock`, two
    /// contenders on `<prefix>/lock` (see [`LoadPaths`]).
    pub fn start(prefix: &str, with_lock: bool) -> Load {
        let paths = LoadPaths::new(prefix);
        let writer = Arc::new(Writer::spawn(
            Vec::new(),
            &paths.writes,
            Duration::from_secs(5),
        ));
        let (tx, rx) = watch::channel(Vec::<String>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let lock_writes = Arc::new(AtomicU64::new(0));
        let lockers = if with_lock {
            (0..2)
                .map(|task| {
                    tokio::spawn(locker(
                        task,
                        paths.clone(),
                        rx.clone(),
                        stop.clone(),
                        lock_writes.clone(),
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        Load {
            paths,
            writer,
            endpoints: Arc::new(tx),
            lock_writes,
            stop,
            lockers,
        }
    }

    pub fn paths(&self) -> &LoadPaths {
        &self.paths
    }

    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// Points the writer and the contenders (at their next session) at
    /// `eps`.
    pub fn set_endpoints(&self, eps: Vec<String>) {
        self.writer.set_endpoints(eps.clone());
        self.endpoints.send_replace(eps);
    }

    /// A closure doing [`Load::set_endpoints`], e.g. for
    /// `LocalOperator::on_endpoints`. It holds a reference to the writer:
    /// drop it before [`Load::stop`].
    pub fn endpoint_sink(&self) -> impl Fn(&[String]) + Send + Sync + 'static {
        let w = self.writer.clone();
        let tx = self.endpoints.clone();
        move |eps: &[String]| {
            w.set_endpoints(eps.to_vec());
            tx.send_replace(eps.to_vec());
        }
    }

    /// Waits until both the writer and (if any) the lock holders made
    /// progress.
    pub async fn progressed(&self, what: &str) {
        let n = self.writer.acked();
        self.writer
            .wait_acked(n + 20, WAIT)
            .await
            .unwrap_or_else(|e| panic!("writes progress {what}: {e:#}"));
        if !self.lockers.is_empty() {
            let l = self.lock_writes.load(Ordering::SeqCst);
            wait_until(WAIT, &format!("guarded writes progress {what}"), || async {
                self.lock_writes.load(Ordering::SeqCst) >= l + 3
            })
            .await
            .expect("guarded writes progress");
        }
    }

    /// Stops the contenders, then the writer. Every other holder of the
    /// writer (endpoint sinks, progress monitors) must be dropped first.
    pub async fn stop(self) -> (WriterReport, Vec<LockerReport>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for l in self.lockers {
            reports.push(l.await.expect("locker task"));
        }
        let writer =
            Arc::try_unwrap(self.writer).unwrap_or_else(|_| panic!("the writer is still shared"));
        (writer.stop().await, reports)
    }
}

/// The counter equals the number of applied increments, each value was
/// written exactly once (no two holders ever read the same value), and in
/// value order the fencing tokens never go back; the holds that wrote are
/// disjoint in time with strictly increasing tokens.
pub async fn check_lock(client: &Client, load_prefix: &str, reports: &[LockerReport]) {
    let paths = LoadPaths::new(load_prefix);
    let counter = read_counter(client, &paths.counter)
        .await
        .expect("read the counter");
    let list = client
        .list(&paths.log)
        .await
        .expect("list the increment log");
    let mut entries: Vec<(u64, u64)> = list
        .children
        .iter()
        .map(|n| {
            let name = n.path.rsplit('/').next().unwrap_or_default();
            let mut parts = name.split('-');
            let value = parts.next().and_then(|v| v.parse().ok()).expect("value");
            let token = parts
                .next()
                .and_then(|t| t.strip_prefix('t'))
                .and_then(|t| t.parse().ok())
                .expect("token");
            (value, token)
        })
        .collect();
    entries.sort();
    let values: Vec<u64> = entries.iter().map(|e| e.0).collect();
    let expected: Vec<u64> = (1..=counter).collect();
    assert_eq!(
        values, expected,
        "every increment 1..={counter} applied exactly once (a duplicate means two holders at once)"
    );
    assert!(
        entries.windows(2).all(|w| w[0].1 <= w[1].1),
        "fencing tokens go back in increment order: {entries:?}"
    );

    let mut holds: Vec<&Hold> = reports
        .iter()
        .flat_map(|r| r.holds.iter())
        .filter(|h| h.writes > 0)
        .collect();
    holds.sort_by_key(|h| h.acquired);
    for w in holds.windows(2) {
        assert!(
            w[1].token > w[0].token,
            "tokens not strictly increasing: task {} token {} then task {} token {}",
            w[0].task,
            w[0].token,
            w[1].task,
            w[1].token
        );
        let end = w[0].last_ok_sent.expect("a hold that wrote");
        assert!(
            w[1].acquired >= end,
            "two holders at once: token {} wrote at {:?}, token {} held from {:?}",
            w[0].token,
            end,
            w[1].token,
            w[1].acquired
        );
    }
    let writes: u64 = holds.iter().map(|h| u64::from(h.writes)).sum();
    let uncertain: u64 = reports.iter().map(|r| r.uncertain).sum();
    assert!(
        writes <= counter && counter <= writes + uncertain,
        "counter {counter}, acknowledged guarded writes {writes}, uncertain {uncertain}"
    );
    for (task, r) in reports.iter().enumerate() {
        assert!(
            r.holds.iter().any(|h| h.writes > 0),
            "contender {task} never wrote under the lock: {:?}",
            r.errors
        );
    }
    eprintln!(
        "lock: counter {counter}, {} holds with writes, fenced {}, uncertain {uncertain}, errors {:?}",
        holds.len(),
        reports.iter().map(|r| r.fenced).sum::<u64>(),
        reports.iter().flat_map(|r| r.errors.iter()).take(10).collect::<Vec<_>>()
    );
}

/// Reads every acknowledged write back from `endpoint` (the leader's).
pub async fn check_writes(endpoint: &str, report: &WriterReport) {
    assert!(
        report.errors.is_empty(),
        "unexpected write errors: {:?}",
        report.errors
    );
    verify_acked(
        &mut kv_client(endpoint, Duration::from_secs(10)),
        &report.acked,
    )
    .await
    .expect("no acknowledged write lost");
    eprintln!(
        "writes: {} acknowledged and read back, {} ambiguous, {} unavailable",
        report.acked.len(),
        report.ambiguous,
        report.unavailable
    );
}
