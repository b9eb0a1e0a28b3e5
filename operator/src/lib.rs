//! The LockCluster operator.

pub mod plan;
