//! The LockCluster operator.

pub mod api_requests;
pub mod controller;
pub mod lease;
pub mod lockd_admin;
pub mod metrics;
pub mod plan;
pub mod resources;
