//! Compiles lockbench's own minimal etcd v3 schema (proto/etcd/**) with
//! protox (pure Rust), so building lockbench needs no system protoc. Only
//! client stubs: lockbench talks to etcd, it never serves its API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/etcd";
    let files = [
        "mvccpb/kv.proto",
        "etcdserverpb/rpc.proto",
        "v3lockpb/v3lock.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={root}/{f}");
    }
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
