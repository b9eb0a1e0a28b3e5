//! Compiles proto/lockd/v1/*.proto with protox (pure Rust), so building lockd
//! needs no system protoc.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "lockd/v1/kv.proto",
        "lockd/v1/cluster.proto",
        "lockd/v1/raft.proto",
        "lockd/v1/session.proto",
        "lockd/v1/watch.proto",
        "lockd/v1/lock.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // The encoded descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("lockd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
