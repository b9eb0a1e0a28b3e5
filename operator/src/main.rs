//! `lockd-operator`: runs the LockCluster controller.

fn main() {}
