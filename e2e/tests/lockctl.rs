//! The real `lockctl` binary against a real 3-member cluster: output, exit
//! codes and error messages a user or a script relies on.

use std::time::Duration;

use anyhow::{anyhow, bail};
use lockd_e2e::lockctl::{run_with, Out, Run};
use lockd_e2e::v1::Role;
use lockd_e2e::{bounded, member_set, role_of, wait_for, Cluster};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// `lockctl --endpoints=<all 3> args...`.
async fn run(c: &Cluster, args: &[&str]) -> Out {
    run_with(
        Run {
            endpoints: Some(eps(c)),
            ..Default::default()
        },
        args,
    )
    .await
}

fn eps(c: &Cluster) -> String {
    c.ids()
        .into_iter()
        .filter(|&id| id <= 3)
        .map(|id| c.addr(id))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_commands() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "kv_commands", async {
        // put then get prints the value.
        let o = run(&c, &["put", "/a", "1"]).await;
        o.ok();
        let o = run(&c, &["get", "/a"]).await;
        assert_eq!(o.ok().stdout, "1\n");

        // A missing key: exit 1, one line on stderr saying "not found".
        let o = run(&c, &["get", "/missing"]).await;
        assert_eq!(o.code, 1, "{o:?}");
        assert_eq!(o.stdout, "", "{o:?}");
        let lines = o.stderr_lines();
        assert_eq!(lines.len(), 1, "one error line: {o:?}");
        assert!(lines[0].contains("not found"), "{o:?}");

        // put under a missing parent without --parents names the parent.
        let o = run(&c, &["put", "/x/y", "v"]).await;
        assert_ne!(o.code, 0, "{o:?}");
        assert_eq!(o.stderr_lines().len(), 1, "{o:?}");
        assert!(
            o.stderr.contains("parent /x "),
            "error must name the missing parent /x: {o:?}"
        );
        let o = run(&c, &["get", "/x/y"]).await;
        assert_eq!(o.code, 1, "failed put must not create anything: {o:?}");
        // ... and with --parents it works.
        run(&c, &["put", "--parents", "/x/y", "v"]).await.ok();
        assert_eq!(run(&c, &["get", "/x/y"]).await.ok().stdout, "v\n");

        // create on an existing key fails and leaves the value alone.
        let o = run(&c, &["create", "/a", "2"]).await;
        assert_ne!(o.code, 0, "{o:?}");
        assert!(o.stderr.contains("exists"), "{o:?}");
        assert_eq!(run(&c, &["get", "/a"]).await.ok().stdout, "1\n");
        // create of a new key works.
        run(&c, &["create", "/b", "2"]).await.ok();
        assert_eq!(run(&c, &["get", "/b"]).await.ok().stdout, "2\n");

        // ls lists the children one per line.
        run(&c, &["put", "--parents", "/dir/c1", "1"]).await.ok();
        run(&c, &["put", "/dir/c2", "2"]).await.ok();
        run(&c, &["put", "--parents", "/dir/c3/deep", "3"])
            .await
            .ok();
        let o = run(&c, &["ls", "/dir"]).await;
        let mut names: Vec<&str> = o.ok().stdout.lines().collect();
        names.sort_unstable();
        assert_eq!(names, ["c1", "c2", "c3"], "{o:?}");
        // -o json ls: children's metadata; the server omits their data, so
        // no (empty, wrong) value may be printed for them.
        let o = run(&c, &["-o", "json", "ls", "/dir"]).await;
        let v = o.ok().json();
        let arr = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
        assert_eq!(arr.len(), 3, "{v}");
        for child in arr {
            assert!(child["path"].as_str().unwrap().starts_with("/dir/c"), "{v}");
            assert_eq!(child["version"], 1, "{v}");
            assert!(child.get("value").is_none(), "ls shows no data: {v}");
        }
        assert_eq!(arr[2]["num_children"], 1, "{v}");
        let o = run(&c, &["ls", "/nope"]).await;
        assert_eq!(o.code, 1, "ls of a missing node: {o:?}");

        // del of a node with children needs --recursive.
        let o = run(&c, &["del", "/dir"]).await;
        assert_ne!(o.code, 0, "{o:?}");
        assert_eq!(o.stderr_lines().len(), 1, "{o:?}");
        assert_eq!(run(&c, &["get", "/dir/c1"]).await.ok().stdout, "1\n");
        let o = run(&c, &["del", "--recursive", "/dir"]).await;
        // /dir, c1, c2, c3, c3/deep
        assert_eq!(o.ok().stdout, "5\n", "{o:?}");
        assert_eq!(run(&c, &["get", "/dir"]).await.code, 1);
        assert_eq!(run(&c, &["get", "/dir/c3/deep"]).await.code, 1);
        // del of a leaf needs no flag.
        assert_eq!(run(&c, &["del", "/b"]).await.ok().stdout, "1\n");

        // -o json get: valid JSON with the value and revisions.
        let put = run(&c, &["-o", "json", "put", "/j", "hello world"]).await;
        let put = put.ok().json();
        let put_rev = put["revision"].as_u64().expect("put revision");
        assert!(put_rev > 0, "{put}");
        let o = run(&c, &["-o", "json", "get", "/j"]).await;
        let v = o.ok().json();
        assert_eq!(v["node"]["value"], "hello world", "{v}");
        assert_eq!(v["node"]["path"], "/j", "{v}");
        assert_eq!(v["node"]["version"], 1, "{v}");
        assert_eq!(v["node"]["mod_revision"].as_u64(), Some(put_rev), "{v}");
        let rev = v["revision"].as_u64().expect("get revision");
        assert!(
            rev >= put_rev,
            "get revision {rev} < put revision {put_rev}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_from_stdin() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(90), "txn_from_stdin", async {
        let txn = |spec: &'static str| {
            let c = &c;
            async move {
                run_with(
                    Run {
                        endpoints: Some(eps(c)),
                        stdin: Some(spec),
                        ..Default::default()
                    },
                    &["txn"],
                )
                .await
            }
        };
        // The compare holds: then-branch.
        let o = txn(
            "# take the lock\nif !exists /lock\nthen\nput /lock \"owner 1\"\nelse\nget /lock\n",
        )
        .await;
        assert_eq!(o.ok().stdout, "SUCCESS\nput /lock OK\n", "{o:?}");
        // The compare fails now: else-branch, then-branch not applied.
        let o = txn("if !exists /lock\nthen\nput /lock \"owner 2\"\nelse\nget /lock\n").await;
        assert_eq!(o.ok().stdout, "FAILURE\nget /lock owner 1\n", "{o:?}");
        assert_eq!(run(&c, &["get", "/lock"]).await.ok().stdout, "owner 1\n");

        // Version compare + JSON output.
        let o = run_with(
            Run {
                endpoints: Some(eps(&c)),
                stdin: Some("if version /lock = 1\nthen\ndel /lock\n"),
                ..Default::default()
            },
            &["-o", "json", "txn"],
        )
        .await;
        let v = o.ok().json();
        assert_eq!(v["succeeded"], true, "{v}");
        assert_eq!(v["results"][0]["deleted"], 1, "{v}");
        assert_eq!(run(&c, &["get", "/lock"]).await.code, 1);

        // A malformed spec: exit 2 naming the line; nothing is sent.
        let o = txn("# comment\nif exists /lock\nif bogus /lock = 1\nthen\nput /lock x\n").await;
        assert_eq!(o.code, 2, "{o:?}");
        assert!(o.stderr.contains("txn line 3"), "{o:?}");
        assert_eq!(o.stdout, "", "{o:?}");
        let o = txn("if exists /lock\nput /lock x\n").await;
        assert_eq!(o.code, 2, "op before `then`: {o:?}");
        assert!(o.stderr.contains("txn line "), "{o:?}");
        assert_eq!(run(&c, &["get", "/lock"]).await.code, 1);
    })
    .await;
}

fn status_rows(v: &Value) -> anyhow::Result<&Vec<Value>> {
    let arr = v.as_array().ok_or_else(|| anyhow!("not an array: {v}"))?;
    for row in arr {
        let obj = row
            .as_object()
            .ok_or_else(|| anyhow!("row is not an object: {row}"))?;
        for k in [
            "endpoint", "id", "role", "leader", "term", "commit", "applied",
        ] {
            if !obj.contains_key(k) {
                bail!("row lacks key {k}: {row}");
            }
        }
    }
    Ok(arr)
}

/// The leader all rows agree on (exactly one row says role leader).
fn agreed_leader(rows: &[Value]) -> anyhow::Result<u64> {
    let leaders: Vec<&Value> = rows.iter().filter(|r| r["role"] == "leader").collect();
    if leaders.len() != 1 {
        bail!("{} rows with role leader: {rows:?}", leaders.len());
    }
    let id = leaders[0]["id"].as_u64().ok_or_else(|| anyhow!("no id"))?;
    for r in rows {
        if r["leader"].as_u64() != Some(id) {
            bail!("row {r} does not name leader {id}");
        }
    }
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_all_and_partial() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(90), "status_all_and_partial", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let o = run(&c, &["status", "-o", "json"]).await;
        let v = o.ok().json();
        let rows = status_rows(&v).expect("status rows");
        assert_eq!(rows.len(), 3, "{v}");
        let mut ids: Vec<u64> = rows.iter().filter_map(|r| r["id"].as_u64()).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3], "{v}");
        for r in rows {
            let id = r["id"].as_u64().unwrap();
            assert_eq!(r["endpoint"], c.addr(id), "{r}");
            assert!(r["term"].as_u64() > Some(0), "{r}");
        }
        assert_eq!(agreed_leader(rows).expect("one agreed leader"), leader);

        // Table output: header plus one row per member.
        let o = run(&c, &["status"]).await;
        let lines: Vec<&str> = o.ok().stdout.lines().collect();
        assert_eq!(lines.len(), 4, "{o:?}");
        assert!(lines[0].starts_with("ENDPOINT"), "{o:?}");

        // One member down: rows for the others, the dead one marked, exit != 0.
        let dead = c.ids().into_iter().find(|&i| i != leader).unwrap();
        c.kill(dead);
        let short = |args: &'static [&'static str]| {
            let c = &c;
            async move {
                run_with(
                    Run {
                        endpoints: Some(eps(c)),
                        timeouts: Some(("3", "3")),
                        ..Default::default()
                    },
                    args,
                )
                .await
            }
        };
        let o = short(&["status"]).await;
        assert_ne!(o.code, 0, "{o:?}");
        assert!(o.stderr.contains(&c.addr(dead)), "{o:?}");
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines.len(), 4, "{o:?}");
        for id in c.ids() {
            let row = lines
                .iter()
                .find(|l| l.split_whitespace().next() == Some(c.addr(id).as_str()))
                .unwrap_or_else(|| panic!("no row for member {id}: {o:?}"));
            if id == dead {
                assert!(row.contains("error"), "{row}");
            } else {
                assert!(row.contains(if id == leader { "leader" } else { "follower" }));
            }
        }
        let o = short(&["-o", "json", "status"]).await;
        assert_ne!(o.code, 0, "{o:?}");
        let v = o.json();
        let arr = v.as_array().expect("array");
        assert_eq!(arr.len(), 3, "{v}");
        let live: Vec<Value> = arr
            .iter()
            .filter(|r| r.get("error").is_none())
            .cloned()
            .collect();
        assert_eq!(live.len(), 2, "{v}");
        status_rows(&Value::Array(live.clone())).expect("live rows complete");
        let dead_row = arr
            .iter()
            .find(|r| r["endpoint"] == c.addr(dead))
            .expect("row of the dead member");
        assert!(dead_row["error"].is_string(), "{dead_row}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_leadership_snapshot() {
    let c = Cluster::start_three().await;
    bounded(
        Duration::from_secs(180),
        "membership_leadership_snapshot",
        async {
            let members = |o: &Out| -> Vec<(u64, String, bool)> {
                let v = o.json();
                let mut m: Vec<(u64, String, bool)> = v
                    .as_array()
                    .unwrap_or_else(|| panic!("member list is not an array: {v}"))
                    .iter()
                    .map(|m| {
                        (
                            m["id"].as_u64().expect("id"),
                            m["addr"].as_str().expect("addr").to_string(),
                            m["voter"].as_bool().expect("voter"),
                        )
                    })
                    .collect();
                m.sort();
                m
            };
            let voters3: Vec<(u64, String, bool)> =
                (1..=3).map(|id| (id, c.addr(id), true)).collect();

            let o = run(&c, &["member", "list"]).await;
            let lines: Vec<&str> = o.ok().stdout.lines().collect();
            assert_eq!(lines.len(), 4, "header + 3 members: {o:?}");
            assert_eq!(
                lines.iter().filter(|l| l.ends_with("voter")).count(),
                3,
                "{o:?}"
            );
            let o = run(&c, &["-o", "json", "member", "list"]).await;
            assert_eq!(members(o.ok()), voters3);

            // add of an unreachable member: a definite error at once (not
            // retried until the retry budget is spent), nothing changes.
            let dead = lockd_e2e::free_ports(1).expect("a free port")[0];
            let dead_addr = format!("127.0.0.1:{dead}");
            let o = run(&c, &["member", "add", "9", &dead_addr]).await;
            assert_eq!(o.code, 1, "{o:?}");
            assert!(o.stderr.contains("failed precondition"), "{o:?}");
            assert!(o.stderr.contains(&dead_addr), "{o:?}");
            assert!(!o.stderr.contains("gave up after"), "retried: {o:?}");
            let o = run(&c, &["-o", "json", "member", "list"]).await;
            assert_eq!(members(o.ok()), voters3);

            // add: a learner that has caught up.
            let addr4 = c.start_new_member(4).expect("start member 4");
            c.wait_healthy(4, WAIT).await.expect("member 4 up");
            let o = run(&c, &["-o", "json", "member", "add", "4", &addr4]).await;
            let mut want = voters3.clone();
            want.push((4, addr4.clone(), false));
            assert_eq!(members(o.ok()), want);
            // The learner learns of its own membership from the leader's next
            // append, which may land just after `member add` returns.
            lockd_e2e::wait_until(WAIT, "member 4 to report itself a learner", || async {
                matches!(c.status(4).await, Ok(s) if role_of(&s) == Role::Learner)
            })
            .await
            .expect("member 4 is a learner");
            // The learner got the data: a write before is visible there.
            run(&c, &["put", "/m", "x"]).await.ok();
            let leader = c.wait_for_leader(WAIT).await.expect("leader");
            let ls = c.status(leader).await.expect("leader status");
            c.wait_applied(4, ls.commit_index, WAIT)
                .await
                .expect("learner applies");

            // promote: a voter.
            let o = run(&c, &["-o", "json", "member", "promote", "4"]).await;
            want[3].2 = true;
            assert_eq!(members(o.ok()), want);
            wait_for(WAIT, "member 4 to report voters 1-4", || async {
                let s = c.status(4).await?;
                let got = member_set(&s.members);
                if got == [(1, true), (2, true), (3, true), (4, true)] && !s.joint {
                    Ok(())
                } else {
                    bail!("members {got:?} joint={}", s.joint)
                }
            })
            .await
            .expect("4 is a voter");

            // remove: gone from the list everywhere.
            let o = run(&c, &["-o", "json", "member", "remove", "4"]).await;
            assert_eq!(members(o.ok()), voters3);
            let o = run(&c, &["-o", "json", "member", "list"]).await;
            assert_eq!(members(o.ok()), voters3);
            c.kill(4);

            // leader transfer to a follower, seen by status.
            let leader = c.wait_for_leader_among(&[1, 2, 3], WAIT).await.unwrap();
            let target = (1..=3).find(|&i| i != leader).unwrap();
            let o = run(&c, &["leader", "transfer", &target.to_string()]).await;
            assert!(
                o.ok().stdout.contains(&format!("leader is now {target}")),
                "{o:?}"
            );
            wait_for(WAIT, "lockctl status to show the new leader", || async {
                let o = run(&c, &["-o", "json", "status"]).await;
                if o.code != 0 {
                    bail!("status failed: {o:?}");
                }
                let v = o.json();
                let l = agreed_leader(status_rows(&v)?)?;
                if l == target {
                    Ok(())
                } else {
                    bail!("leader is {l}")
                }
            })
            .await
            .expect("leadership moved");
            // Writes still work after the transfer.
            run(&c, &["put", "/after", "t"]).await.ok();

            // snapshot.
            let o = run(&c, &["-o", "json", "snapshot"]).await;
            let v = o.ok().json();
            assert!(v["snapshot_index"].as_u64().unwrap_or(0) > 0, "{v}");
            let o = run(&c, &["snapshot"]).await;
            assert!(o.ok().stdout.starts_with("snapshot at index "), "{o:?}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_errors_exit_2() {
    bounded(Duration::from_secs(60), "endpoint_errors_exit_2", async {
        for bad in [
            "",
            "https://x",
            "https://127.0.0.1:7001",
            "127.0.0.1",
            "a:b",
        ] {
            let o = run_with(
                Run {
                    endpoints: Some(bad.to_string()),
                    ..Default::default()
                },
                &["get", "/a"],
            )
            .await;
            assert_eq!(o.code, 2, "--endpoints {bad:?}: {o:?}");
            assert_eq!(o.stderr_lines().len(), 1, "--endpoints {bad:?}: {o:?}");
            assert!(o.stderr.starts_with("Error: "), "{o:?}");
        }
        // Same for the environment variable.
        let o = run_with(
            Run {
                env_endpoints: Some("https://x".into()),
                ..Default::default()
            },
            &["get", "/a"],
        )
        .await;
        assert_eq!(o.code, 2, "LOCKD_ENDPOINTS=https://x: {o:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_endpoints_honoured() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "env_endpoints_honoured", async {
        let env = |args: &'static [&'static str]| {
            let c = &c;
            async move {
                run_with(
                    Run {
                        env_endpoints: Some(eps(c)),
                        ..Default::default()
                    },
                    args,
                )
                .await
            }
        };
        env(&["put", "/env", "from-env"]).await.ok();
        assert_eq!(env(&["get", "/env"]).await.ok().stdout, "from-env\n");
        // The value written through the env endpoints is in the cluster.
        let o = run(&c, &["get", "/env"]).await;
        assert_eq!(o.ok().stdout, "from-env\n");
        // --endpoints wins over the variable: a dead endpoint in the
        // variable does not matter.
        let o = run_with(
            Run {
                endpoints: Some(eps(&c)),
                env_endpoints: Some("127.0.0.1:1".into()),
                ..Default::default()
            },
            &["get", "/env"],
        )
        .await;
        assert_eq!(o.ok().stdout, "from-env\n");
        // And the variable is really used: pointing it at nothing fails.
        let o = run_with(
            Run {
                env_endpoints: Some("127.0.0.1:1".into()),
                timeouts: Some(("2", "3")),
                ..Default::default()
            },
            &["get", "/env"],
        )
        .await;
        assert_eq!(o.code, 1, "{o:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_dead_leader_endpoint() {
    let c = Cluster::start_three().await;
    bounded(
        Duration::from_secs(90),
        "survives_dead_leader_endpoint",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("leader");
            run(&c, &["put", "/f", "before"]).await.ok();
            c.kill(leader);
            // The dead leader comes first in the list: lockctl moves on to the
            // others and waits out the election within its retry budget.
            let mut ids = vec![leader];
            ids.extend(c.ids().into_iter().filter(|&i| i != leader));
            let endpoints = ids
                .iter()
                .map(|&id| c.addr(id))
                .collect::<Vec<_>>()
                .join(",");
            let r = |args: &'static [&'static str]| {
                let endpoints = endpoints.clone();
                async move {
                    run_with(
                        Run {
                            endpoints: Some(endpoints),
                            ..Default::default()
                        },
                        args,
                    )
                    .await
                }
            };
            assert_eq!(r(&["get", "/f"]).await.ok().stdout, "before\n");
            r(&["put", "/f", "after"]).await.ok();
            assert_eq!(r(&["get", "/f"]).await.ok().stdout, "after\n");
        },
    )
    .await;
}
