//! [`LeaderLatch`]: Curator's `LeaderLatch`, a [`LeaderElection`] campaign
//! seen as a flag.

use std::sync::{Arc, Mutex as StdMutex, MutexGuard as StdGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::election::{ElectionConfig, ElectionEvent, LeaderElection};
use crate::client::Client;
use crate::error::Error;
use crate::Result;

/// Where a [`LeaderLatch`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Not started yet.
    Latent,
    /// Started, not leader.
    Candidate,
    /// Started and leader in the term of this node.
    Leader { fencing_token: u64, path: String },
    /// Closed: final.
    Closed,
}

/// What the latch and its task share.
#[derive(Debug)]
struct Shared {
    state: watch::Sender<State>,
    leading: watch::Sender<bool>,
}

impl Shared {
    fn set(&self, s: State) {
        let leader = matches!(s, State::Leader { .. });
        self.state.send_replace(s);
        self.leading
            .send_if_modified(|l| std::mem::replace(l, leader) != leader);
    }

    fn apply(&self, ev: ElectionEvent) {
        match ev {
            ElectionEvent::StartedLeading {
                fencing_token,
                path,
            } => self.set(State::Leader {
                fencing_token,
                path,
            }),
            ElectionEvent::StoppedLeading { .. } => self.set(State::Candidate),
            ElectionEvent::NewLeader { .. } => {}
        }
    }
}

/// The running campaign, as seen from [`LeaderLatch`].
#[derive(Debug)]
enum Run {
    Latent,
    /// Sending (or dropping) `close` ends the task, which cancels the
    /// campaign (resigns and closes its session).
    Started {
        close: oneshot::Sender<()>,
        task: JoinHandle<()>,
    },
    Closed,
}

/// A leader latch (Curator's `LeaderLatch`): once [started](LeaderLatch::start),
/// it campaigns in the background for as long as it lives and tells whether
/// it currently holds leadership.
///
/// It is a [`LeaderElection`] campaign underneath (same `candidate-` layout,
/// same promises and [`ElectionConfig`] knobs), so latches, campaigns,
/// [`observe`](super::observe) and `lockctl elect` on the same directory all
/// take part in one election. Leadership can be lost without
/// [`LeaderLatch::close`] (renew deadline passed, session lost, node deleted):
/// follow [`LeaderLatch::leadership`] and stop leader-only work when it turns
/// `false`. After a loss the latch campaigns again by itself. Each term has
/// its own [`fencing token`](LeaderLatch::fencing_token).
///
/// [`LeaderLatch::close`] (or dropping the latch) resigns: the next
/// candidate leads at once. A closed latch cannot be started again.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::LeaderLatch;
///
/// let latch = LeaderLatch::new(client, "/elections/compactor", "host-a", Duration::from_secs(10))?;
/// latch.start()?;
/// latch.await_leadership().await?;
/// println!("leading, token {:?}", latch.fencing_token());
///
/// let mut leading = latch.leadership();
/// tokio::select! {
///     _ = leading.wait_for(|l| !*l) => println!("lost leadership"),
///     _ = tokio::signal::ctrl_c() => {}
/// }
/// latch.close().await; // resign: the next candidate takes over
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LeaderLatch {
    election: LeaderElection,
    shared: Arc<Shared>,
    run: StdMutex<Run>,
}

impl LeaderLatch {
    /// A latch on the election directory `name` for the candidate
    /// `identity`, whose node is owned by a session with TTL `lease_ttl`
    /// (the other knobs: [`ElectionConfig::new`]'s defaults). Nothing is
    /// sent until [`LeaderLatch::start`]. Fails with
    /// [`Error::InvalidArgument`] for a TTL too short to derive a valid
    /// configuration from (zero).
    pub fn new(
        client: Client,
        name: impl Into<String>,
        identity: impl Into<String>,
        lease_ttl: Duration,
    ) -> Result<LeaderLatch> {
        Self::with_config(client, name, ElectionConfig::new(identity, lease_ttl))
    }

    /// A latch with an explicit [`ElectionConfig`]; fails with
    /// [`Error::InvalidArgument`] when it does not pass
    /// [`ElectionConfig::validate`].
    pub fn with_config(
        client: Client,
        name: impl Into<String>,
        config: ElectionConfig,
    ) -> Result<LeaderLatch> {
        let election = LeaderElection::new(client, name, config)?;
        Ok(LeaderLatch {
            election,
            shared: Arc::new(Shared {
                state: watch::channel(State::Latent).0,
                leading: watch::channel(false).0,
            }),
            run: StdMutex::new(Run::Latent),
        })
    }

    /// The election directory.
    pub fn name(&self) -> &str {
        self.election.name()
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.election.config().identity
    }

    fn run(&self) -> StdGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn precondition(&self, what: &str) -> Error {
        Error::FailedPrecondition(format!("leader latch {}: {what}", self.name()))
    }

    /// Starts campaigning in a background task (needs a Tokio runtime).
    /// Fails with [`Error::FailedPrecondition`] if the latch was already
    /// started or closed.
    pub fn start(&self) -> Result<()> {
        let mut run = self.run();
        match *run {
            Run::Latent => {}
            Run::Started { .. } => return Err(self.precondition("already started")),
            Run::Closed => return Err(self.precondition("closed")),
        }
        let mut campaign = self.election.campaign();
        let (close, mut closed) = oneshot::channel::<()>();
        let shared = self.shared.clone();
        shared.set(State::Candidate);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = campaign.next() => match ev {
                        Some(ev) => shared.apply(ev),
                        None => break,
                    },
                    // Closed, or the latch dropped.
                    _ = &mut closed => break,
                }
            }
            for ev in campaign.cancel().await {
                shared.apply(ev);
            }
            shared.set(State::Closed);
        });
        *run = Run::Started { close, task };
        Ok(())
    }

    /// True while this latch holds leadership.
    pub fn has_leadership(&self) -> bool {
        *self.shared.leading.borrow()
    }

    /// A receiver of [`LeaderLatch::has_leadership`]: `true` from the start
    /// of a term to its end. Await `changed()` or `wait_for` on it to follow
    /// leadership.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.shared.leading.subscribe()
    }

    /// The fencing token of the current term (our node's
    /// `create_revision`) while we lead; `None` otherwise. Tokens of
    /// successive terms strictly increase.
    pub fn fencing_token(&self) -> Option<u64> {
        match &*self.shared.state.borrow() {
            State::Leader { fencing_token, .. } => Some(*fencing_token),
            _ => None,
        }
    }

    /// Our candidate node while we lead (for guarded writes with
    /// [`holds_lock_compare`](super::holds_lock_compare)); `None` otherwise.
    pub fn path(&self) -> Option<String> {
        match &*self.shared.state.borrow() {
            State::Leader { path, .. } => Some(path.clone()),
            _ => None,
        }
    }

    /// Waits until this latch holds leadership. Fails with
    /// [`Error::FailedPrecondition`] if the latch is not started, or is
    /// closed before leadership comes.
    pub async fn await_leadership(&self) -> Result<()> {
        let mut rx = self.shared.state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, State::Candidate))
            .await
            .map_err(|_| self.precondition("closed"))?
            .clone();
        match state {
            State::Leader { .. } => Ok(()),
            State::Latent => Err(self.precondition("not started")),
            State::Candidate | State::Closed => Err(self.precondition("closed")),
        }
    }

    /// Like [`LeaderLatch::await_leadership`], giving up after `timeout`:
    /// `Ok(true)` once leader, `Ok(false)` if the timeout passed first.
    pub async fn await_leadership_timeout(&self, timeout: Duration) -> Result<bool> {
        match tokio::time::timeout(timeout, self.await_leadership()).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        }
    }

    /// Stops campaigning: resigns if leader (our node is deleted, so the
    /// next candidate leads at once) and closes the session. Leadership is
    /// `false` when it returns. The latch cannot be started again; closing
    /// twice, or a latch never started, is fine.
    pub async fn close(&self) {
        let run = std::mem::replace(&mut *self.run(), Run::Closed);
        match run {
            Run::Started { close, task } => {
                let _ = close.send(());
                if let Err(e) = task.await {
                    tracing::debug!(error = %e, "leader latch task failed");
                }
            }
            Run::Latent | Run::Closed => {}
        }
        self.shared.set(State::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latch() -> LeaderLatch {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        LeaderLatch::new(client, "/e/latch/", "me", Duration::from_secs(5)).unwrap()
    }

    #[tokio::test]
    async fn preconditions() {
        let l = latch();
        assert_eq!((l.name(), l.identity()), ("/e/latch", "me"));
        assert!(!l.has_leadership());
        let e = l.await_leadership().await.unwrap_err();
        assert!(e.to_string().contains("not started"), "{e}");
        l.close().await;
        let e = l.start().unwrap_err();
        assert!(
            e.to_string().contains("leader latch /e/latch: closed"),
            "{e}"
        );
        let e = l.await_leadership().await.unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        l.close().await;
    }

    #[tokio::test]
    async fn a_zero_ttl_is_refused() {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        let r = LeaderLatch::new(client, "/e/latch", "me", Duration::ZERO);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }

    #[tokio::test]
    async fn close_ends_a_waiting_campaign() {
        // Nothing listens on port 1: the campaign keeps retrying.
        let l = latch();
        l.start().unwrap();
        let e = l.start().unwrap_err();
        assert!(e.to_string().contains("already started"), "{e}");
        assert!(!l
            .await_leadership_timeout(Duration::from_millis(50))
            .await
            .unwrap());
        let (r, ()) = tokio::join!(l.await_leadership(), l.close());
        assert!(r.unwrap_err().to_string().contains("closed"));
        assert!(!l.has_leadership());
        assert_eq!(l.fencing_token(), None);
    }

    #[test]
    fn events_drive_leadership() {
        let shared = Shared {
            state: watch::channel(State::Candidate).0,
            leading: watch::channel(false).0,
        };
        let mut rx = shared.leading.subscribe();
        shared.apply(ElectionEvent::NewLeader {
            identity: "other".into(),
            fencing_token: 3,
        });
        assert!(!rx.has_changed().unwrap());
        shared.apply(ElectionEvent::StartedLeading {
            fencing_token: 7,
            path: "/e/candidate-0000000001".into(),
        });
        assert!(rx.has_changed().unwrap() && *rx.borrow_and_update());
        assert!(matches!(
            *shared.state.borrow(),
            State::Leader {
                fencing_token: 7,
                ..
            }
        ));
        shared.apply(ElectionEvent::StoppedLeading {
            reason: "resigned".into(),
        });
        assert!(rx.has_changed().unwrap() && !*rx.borrow_and_update());
        assert_eq!(*shared.state.borrow(), State::Candidate);
    }
}
