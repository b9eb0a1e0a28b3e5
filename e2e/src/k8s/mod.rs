//! A real Kubernetes control plane for the operator's end-to-end tier:
//! etcd, kube-apiserver and kube-controller-manager built from their Go
//! modules (`e2e/k8s/go.mod`), plus a test kubelet that runs Pods as local
//! processes.

pub mod control_plane;
pub mod env;
pub mod kubelet;
