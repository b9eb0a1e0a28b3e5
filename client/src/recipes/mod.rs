//! Coordination recipes built on sessions, ephemeral-sequential nodes,
//! transactions and watches (in the style of ZooKeeper's Curator).
//!
//! Every recipe keeps its nodes in a container directory named by the lock
//! (or election): `/locks/build/lock-0000000042`, one ephemeral-sequential
//! child per contender, owned by the contender's [`Session`](crate::Session).
//! The fencing token of an acquisition is that child's `create_revision`.
//! See docs/design.md, "Recipes: the lock layout".

mod mutex;

pub use mutex::{holds_lock_compare, Mutex, MutexGuard, LOCK_PREFIX};
mod queue;
mod rwlock;
pub use rwlock::{RwLock, RwLockGuard, RwLockMode, READ_PREFIX, WRITE_PREFIX};
mod election;
pub use election::{
    observe, Campaign, ElectionConfig, ElectionEvent, Leader, LeaderElection, LeaderObserver,
    CANDIDATE_PREFIX,
};
mod latch;
pub use latch::LeaderLatch;
mod semaphore;
pub use semaphore::{Lease, Semaphore, PERMIT_PREFIX};
mod barrier;
pub use barrier::{Barrier, DoubleBarrier, MEMBER_PREFIX, READY_NODE};
