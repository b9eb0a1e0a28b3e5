//! `lockd dev`: a local cluster in one process that prints its endpoints,
//! serves reads and writes, stops cleanly on Ctrl-C and resumes its data.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use lockd_e2e::v1::StatusRequest;
use lockd_e2e::{bounded, cluster_client, get, kv_client, lockd_bin, put, signal, wait_for};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(30);

/// A base port with `n` free consecutive ports after it (gRPC), and another
/// for HTTP. Probed by binding; a race with another process makes the start
/// fail loudly rather than pass wrongly.
fn consecutive_free(n: u16) -> (u16, u16) {
    for _ in 0..200 {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        if base > 65535 - 2 * n - 10 {
            continue;
        }
        let ok = (0..2 * n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return (base, base + n);
        }
    }
    panic!("no run of free ports found");
}

async fn start_dev(dir: &std::path::Path, grpc: u16, http: u16) -> (Child, Vec<String>) {
    let mut child = Command::new(lockd_bin())
        .args(["dev", "--nodes", "3", "--data-dir"])
        .arg(dir)
        .args([
            "--base-port",
            &grpc.to_string(),
            "--base-http-port",
            &http.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lockd dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    while let Some(line) = lines.next_line().await.expect("read stdout") {
        let done = line.contains("Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    (child, printed)
}

async fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    signal(child.id().expect("running"), libc::SIGINT);
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("lockd dev stops within 20 s of Ctrl-C")
        .expect("wait")
}

async fn wait_leader(endpoint: &str) {
    wait_for(WAIT, "a leader in the dev cluster", || async {
        let s = cluster_client(endpoint, Duration::from_secs(2))
            .status(StatusRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_inner();
        if s.leader_id != 0 {
            Ok(())
        } else {
            anyhow::bail!("no leader yet")
        }
    })
    .await
    .expect("leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_serves_stops_and_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let (grpc, http) = consecutive_free(3);
    bounded(Duration::from_secs(120), "lockd dev", async {
        let (mut child, printed) = start_dev(dir.path(), grpc, http).await;
        let text = printed.join("\n");
        for i in 0..3 {
            assert!(
                text.contains(&format!("127.0.0.1:{}", grpc + i)),
                "endpoints printed:\n{text}"
            );
        }
        assert!(
            text.contains("lockctl"),
            "prints a lockctl example:\n{text}"
        );
        let ep = format!("http://127.0.0.1:{}", grpc + 2);
        wait_leader(&ep).await;
        put(
            &mut kv_client(&ep, Duration::from_secs(10)),
            "/dev/x",
            "kept",
        )
        .await
        .expect("write to the dev cluster");
        let st = interrupt(&mut child).await;
        assert!(st.success(), "clean exit on Ctrl-C, got {st}");

        let (mut child, _) = start_dev(dir.path(), grpc, http).await;
        let ep = format!("http://127.0.0.1:{grpc}");
        wait_leader(&ep).await;
        let g = get(
            &mut kv_client(&ep, Duration::from_secs(10)),
            "/dev/x",
            false,
        )
        .await
        .expect("data resumed after restart");
        assert_eq!(g.node.expect("node").data, b"kept");
        let st = interrupt(&mut child).await;
        assert!(st.success(), "clean exit on Ctrl-C, got {st}");
    })
    .await;
}
