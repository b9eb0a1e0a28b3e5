//! openraft glue: type configuration, log storage, state machine storage
//! and the peer network.

pub mod log;
pub mod network;
pub mod sm;
pub mod types;
