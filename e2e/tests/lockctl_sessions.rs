//! `lockctl session ...` and `lockctl create --ephemeral/--sequential/
//! --container` against a real 3-member cluster: ephemeral nodes live as long
//! as the lockctl process keeps its session, and go when it is interrupted,
//! killed, or simply ends.

use std::time::Duration;

use lockd_e2e::lockctl::{run_on, Background, Out};
use lockd_e2e::{bounded, get, wait_until, Cluster};

const WAIT: Duration = Duration::from_secs(20);

/// Runs lockctl with all members as endpoints.
async fn run(c: &Cluster, args: &[&str]) -> Out {
    run_on(&c.endpoints().join(","), args).await
}

/// A background lockctl against all members.
fn background(c: &Cluster, args: &[&str]) -> Background {
    Background::spawn(&c.endpoints().join(","), args)
}

/// True when `path` exists, read (linearizably) through member `id`.
async fn exists(c: &Cluster, id: u64, path: &str) -> bool {
    get(&mut c.kv(id), path, false).await.is_ok()
}

async fn wait_gone(c: &Cluster, id: u64, path: &str, limit: Duration) {
    let kv = c.kv(id);
    wait_until(limit, &format!("{path} deleted"), || {
        let mut kv = kv.clone();
        async move {
            matches!(get(&mut kv, path, false).await, Err(s) if s.code() == tonic::Code::NotFound)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_hold_lives_until_sigint() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "ephemeral hold + SIGINT", async {
        let mut bg = background(
            &c,
            &[
                "create",
                "--ephemeral",
                "--hold",
                "--parents",
                "/svc/a",
                "host-a",
            ],
        );
        assert_eq!(bg.line().await, "/svc/a");
        // Visible from the other members, with its owner.
        for id in [2, 3] {
            assert!(exists(&c, id, "/svc/a").await, "/svc/a on member {id}");
        }
        let o = run_on(&c.addr(3), &["-o", "json", "get", "/svc/a"]).await;
        let v = o.ok().json();
        let owner = v["node"]["ephemeral_owner"]
            .as_u64()
            .unwrap_or_else(|| panic!("ephemeral_owner in {v}"));
        assert!(owner > 0, "{v}");
        assert_eq!(v["node"]["value"], "host-a", "{v}");
        // ls -o json shows the owner too; the parent is persistent.
        let v = run(&c, &["-o", "json", "ls", "/svc"]).await.ok().json();
        assert_eq!(v[0]["ephemeral_owner"], owner, "{v}");
        let v = run(&c, &["-o", "json", "get", "/svc"]).await.ok().json();
        assert!(v["node"].get("ephemeral_owner").is_none(), "{v}");
        // The session lists it.
        let o = run(&c, &["-o", "json", "session", "info", &owner.to_string()]).await;
        let v = o.ok().json();
        assert_eq!(v["ephemerals"], serde_json::json!(["/svc/a"]), "{v}");
        assert_eq!(v["ttl_ms"], 10_000, "{v}");

        bg.signal(libc::SIGINT);
        let (code, err) = bg.exit().await;
        assert_eq!(code, 0, "stderr: {err}");
        wait_gone(&c, 2, "/svc/a", WAIT).await;
        let o = run(&c, &["session", "info", &owner.to_string()]).await;
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.stderr.contains("expired"), "{o:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_hold_killed_expires_after_ttl() {
    let c = Cluster::start_three().await;
    bounded(
        Duration::from_secs(120),
        "ephemeral hold + kill -9",
        async {
            let mut bg = background(
                &c,
                &["create", "--ephemeral", "--hold", "--ttl", "2s", "/k", "v"],
            );
            assert_eq!(bg.line().await, "/k");
            assert!(exists(&c, 2, "/k").await);
            bg.signal(libc::SIGKILL);
            let _ = bg.exit().await;
            // TTL 2s plus slack for checkpoints, elections and slow machines.
            wait_gone(&c, 3, "/k", Duration::from_secs(2) + WAIT).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_container_and_short_lived_ephemeral() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "create kinds", async {
        // Sequential: the generated names, increasing.
        let a = run(&c, &["create", "--sequential", "--parents", "/q/job-", "1"]).await;
        let b = run(&c, &["create", "--sequential", "/q/job-", "2"]).await;
        let names: Vec<String> = [&a, &b]
            .iter()
            .map(|o| o.ok().stdout.trim().to_string())
            .collect();
        for n in &names {
            let digits = n.strip_prefix("/q/job-").unwrap_or_else(|| panic!("{n}"));
            assert_eq!(digits.len(), 10, "{n}");
            assert!(digits.chars().all(|c| c.is_ascii_digit()), "{n}");
        }
        assert!(names[0] < names[1], "{names:?}");
        let o = run(&c, &["get", &names[1]]).await;
        assert_eq!(o.ok().stdout, "2\n");

        // Container: shown in JSON, removed after its last child goes.
        let o = run(&c, &["create", "--container", "/box", ""]).await;
        assert_eq!(o.ok().stdout, "/box\n");
        let v = run(&c, &["-o", "json", "get", "/box"]).await.ok().json();
        assert_eq!(v["node"]["container"], true, "{v}");
        run(&c, &["put", "/box/x", "1"]).await.ok();
        run(&c, &["del", "/box/x"]).await.ok();
        wait_gone(&c, 2, "/box", WAIT).await;

        // Ephemeral without --hold: gone once the command has exited.
        let o = run(&c, &["create", "--ephemeral", "/e", "v"]).await;
        assert_eq!(o.ok().stdout, "/e\n");
        assert_eq!(run(&c, &["get", "/e"]).await.code, 1, "/e must be gone");
        // Sequential ephemeral: prints the generated name.
        let o = run(
            &c,
            &["create", "--ephemeral", "--sequential", "/q/eph-", "v"],
        )
        .await;
        let name = o.ok().stdout.trim().to_string();
        assert_eq!(name.len(), "/q/eph-".len() + 10, "{o:?}");
        assert_eq!(run(&c, &["get", &name]).await.code, 1, "{name} gone");

        // Usage errors exit 2 and create nothing.
        for args in [
            &["create", "--ephemeral", "--container", "/u", "v"][..],
            &["create", "--hold", "/u", "v"],
            &["create", "--ttl", "2s", "/u", "v"],
            &["create", "--ephemeral", "--ttl", "2x", "/u", "v"],
        ] {
            let o = run(&c, args).await;
            assert_eq!(o.code, 2, "{args:?}: {o:?}");
            assert!(o.stderr.starts_with("Error: "), "{o:?}");
        }
        assert_eq!(run(&c, &["get", "/u"]).await.code, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_open_info_close() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "session commands", async {
        // open prints "ID ttl=TTL" and holds the session until SIGINT.
        let mut bg = background(&c, &["session", "open", "--ttl", "5s"]);
        let line = bg.line().await;
        let (id, ttl) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("'{line}' is not 'ID ttl=TTL'"));
        assert_eq!(ttl, "ttl=5s", "{line}");
        id.parse::<u64>()
            .unwrap_or_else(|_| panic!("'{id}' is not an id"));
        let o = run(&c, &["session", "info", id]).await;
        assert!(
            o.ok().stdout.contains(&format!("session:    {id}\n")),
            "{o:?}"
        );
        let v = run(&c, &["-o", "json", "session", "info", id])
            .await
            .ok()
            .json();
        assert_eq!(v["ttl_ms"], 5000, "{v}");
        assert!(v["remaining_ms"].as_u64().unwrap() <= 5000, "{v}");
        bg.signal(libc::SIGINT);
        let (code, err) = bg.exit().await;
        assert_eq!(code, 0, "stderr: {err}");
        let o = run(&c, &["session", "info", id]).await;
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.stderr.contains("expired"), "{o:?}");

        // Closing a held session from elsewhere: the holder learns it is
        // lost, prints one error line and exits 1.
        let mut bg = background(&c, &["-o", "json", "session", "open", "--ttl", "3s"]);
        let v: serde_json::Value = serde_json::from_str(&bg.line().await).expect("json line");
        let id = v["session_id"].as_u64().expect("session_id").to_string();
        assert_eq!(v["ttl_ms"], 3000, "{v}");
        run(&c, &["session", "close", &id]).await.ok();
        let (code, err) = bg.exit().await;
        assert_eq!(code, 1, "stderr: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("Error: session lost") && lines[0].contains("expired"),
            "{err}"
        );
        // Closing it again: expired, exit 1.
        let o = run(&c, &["session", "close", &id]).await;
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.stderr.contains("expired"), "{o:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_session_survives_losing_its_member() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "session failover", async {
        // lockctl talks to member 1 first.
        let mut bg = background(
            &c,
            &["create", "--ephemeral", "--hold", "--ttl", "3s", "/f", "v"],
        );
        assert_eq!(bg.line().await, "/f");
        c.kill(1);
        c.wait_for_leader_among(&[2, 3], WAIT)
            .await
            .expect("leader");
        // Outlive the TTL several times over: the keepalives must have moved
        // to another member (this waits on purpose; the assertion is that
        // nothing expired, not how fast anything happened).
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            exists(&c, 2, "/f").await,
            "/f survived the loss of member 1"
        );
        bg.signal(libc::SIGTERM);
        let (code, err) = bg.exit().await;
        assert_eq!(code, 0, "stderr: {err}");
        wait_gone(&c, 3, "/f", WAIT).await;
    })
    .await;
}

/// What `Client::create_protected` relies on: a retried create with the same
/// request id returns the first node instead of making another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_dedups_sequential_creates() {
    use lockd_e2e::v1::{self, session_client::SessionClient};
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "request id dedup", async {
        let create = |path: &str, session_id: u64, request_id: &str| v1::CreateRequest {
            path: path.into(),
            data: b"v".to_vec(),
            parents: true,
            session_id,
            sequential: true,
            container: false,
            request_id: request_id.into(),
        };
        let node = |r: v1::CreateResponse| r.node.expect("node").path;
        // Without a session (shared table), through different members.
        let a = node(
            c.kv(1)
                .create(create("/d/n-", 0, "r1"))
                .await
                .unwrap()
                .into_inner(),
        );
        let b = node(
            c.kv(2)
                .create(create("/d/n-", 0, "r1"))
                .await
                .unwrap()
                .into_inner(),
        );
        let n = node(
            c.kv(1)
                .create(create("/d/n-", 0, "r2"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(a, b, "same request id, same node");
        assert!(n > a, "{n} after {a}");
        // With a session: ephemeral, deduplicated per session.
        let mut sc = SessionClient::new(lockd_e2e::channel(&c.endpoint(1), WAIT));
        let s = sc
            .open(v1::OpenSessionRequest { ttl_ms: 10_000 })
            .await
            .unwrap()
            .into_inner();
        let a = node(
            c.kv(1)
                .create(create("/d/e-", s.session_id, "x"))
                .await
                .unwrap()
                .into_inner(),
        );
        let b = node(
            c.kv(3)
                .create(create("/d/e-", s.session_id, "x"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(a, b);
        let info = sc
            .info(v1::SessionInfoRequest {
                session_id: s.session_id,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.ephemerals, [a.as_str()]);
        sc.close(v1::CloseSessionRequest {
            session_id: s.session_id,
        })
        .await
        .unwrap();
        wait_gone(&c, 2, &a, WAIT).await;
    })
    .await;
}
