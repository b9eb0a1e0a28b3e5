//! Generated types and gRPC stubs for the `lockd.v1` API.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `lockd.v1`: KV, Cluster and the member-to-member Raft service.
pub mod v1 {
    tonic::include_proto!("lockd.v1");
}
