//! Generated types and gRPC stubs for the `lockd.v1` API.
#![deny(missing_docs)]

pub mod layout;

/// `lockd.v1`: KV, Cluster and the member-to-member Raft service.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("lockd.v1");
}

/// The encoded `FileDescriptorSet` of every `lockd.v1` file, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lockd_descriptor.bin"));
