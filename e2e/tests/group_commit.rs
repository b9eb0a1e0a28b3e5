//! Group commit: concurrent writes to the leader share log fsyncs, as
//! reported by the leader's Prometheus metrics.

use std::time::Duration;

use lockd_e2e::v1::kv_client::KvClient;
use lockd_e2e::v1::PutRequest;
use lockd_e2e::{bounded, channel, http_get, put, Cluster, ClusterOptions};

const WAIT: Duration = Duration::from_secs(20);
const WRITERS: usize = 64;
const PUTS_PER_WRITER: usize = 40;
const CHANNELS: usize = 8;

/// Sum of the samples of metric `name` (exact name, before any labels) whose
/// label set contains every `k="v"` of `labels`; `None` if there is none.
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, l) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let v: f64 = value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad sample value in {line:?}: {e}"));
        *found.get_or_insert(0.0) += v;
    }
    found
}

struct Scrape {
    fsyncs: f64,
    fsynced_requests: f64,
    put_ok: f64,
    body: String,
}

async fn scrape(c: &Cluster, id: u64) -> Scrape {
    let (code, body) = http_get(&c.http_addr(id), "/metrics", Duration::from_secs(5))
        .await
        .expect("GET /metrics");
    assert_eq!(code, 200, "/metrics of member {id}: {body}");
    let get = |name: &str| {
        metric(&body, name, &[])
            .unwrap_or_else(|| panic!("metric {name} missing on member {id}:\n{body}"))
    };
    Scrape {
        fsyncs: get("lockd_log_fsync_batch_requests_count"),
        fsynced_requests: get("lockd_log_fsync_batch_requests_sum"),
        put_ok: metric(
            &body,
            "lockd_grpc_requests_total",
            &[("method", "KV/Put"), ("code", "Ok")],
        )
        .unwrap_or_else(|| panic!("no KV/Put Ok request counter on member {id}:\n{body}")),
        body,
    }
}

#[test]
fn metric_parser() {
    let body = "# HELP x y\n\
        lockd_grpc_requests_total{method=\"KV/Put\",code=\"Ok\"} 3\n\
        lockd_grpc_requests_total{method=\"KV/Get\",code=\"Ok\"} 5\n\
        lockd_grpc_requests_total{method=\"KV/Put\",code=\"NotFound\"} 1\n\
        lockd_log_fsync_batch_requests_sum 6.0\n\
        lockd_log_fsync_batch_requests_count 4\n";
    let put_ok = [("method", "KV/Put"), ("code", "Ok")];
    assert_eq!(
        metric(body, "lockd_grpc_requests_total", &put_ok),
        Some(3.0)
    );
    assert_eq!(metric(body, "lockd_grpc_requests_total", &[]), Some(9.0));
    assert_eq!(
        metric(body, "lockd_log_fsync_batch_requests_sum", &[]),
        Some(6.0)
    );
    assert_eq!(metric(body, "lockd_log_fsync_batch_requests", &[]), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_fsyncs() {
    // A generous election timeout: the leader must not change under load, or
    // its counters would not cover the whole run.
    let opts = ClusterOptions {
        heartbeat_ms: 100,
        election_timeout_ms: 2000,
        ..ClusterOptions::default()
    };
    let c = Cluster::start(3, opts).await.expect("start 3 members");
    bounded(
        Duration::from_secs(180),
        "concurrent_writes_share_fsyncs",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let term = c.status(leader).await.expect("leader status").term;
            put(&mut c.kv(leader), "/gc", "").await.expect("create /gc");
            let before = scrape(&c, leader).await;

            let chans: Vec<_> = (0..CHANNELS)
                .map(|_| channel(&c.endpoint(leader), Duration::from_secs(30)))
                .collect();
            let tasks: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let mut kv = KvClient::new(chans[w % CHANNELS].clone());
                    tokio::spawn(async move {
                        let mut acked = 0usize;
                        for i in 0..PUTS_PER_WRITER {
                            let req = PutRequest {
                                path: format!("/gc/w{w}-{i}"),
                                data: format!("{w}:{i}").into_bytes(),
                                expected_version: None,
                                parents: false,
                            };
                            match kv.put(req).await {
                                Ok(_) => acked += 1,
                                Err(e) => return Err(format!("writer {w} put {i}: {e}")),
                            }
                        }
                        Ok(acked)
                    })
                })
                .collect();
            let mut acked = 0usize;
            let mut errors = Vec::new();
            for t in tasks {
                match t.await.expect("writer task") {
                    Ok(n) => acked += n,
                    Err(e) => errors.push(e),
                }
            }
            assert!(errors.is_empty(), "failed puts: {errors:?}");
            assert_eq!(acked, WRITERS * PUTS_PER_WRITER);

            let after = scrape(&c, leader).await;
            let s = c.status(leader).await.expect("leader status");
            assert_eq!(
                (s.leader_id, s.term),
                (leader, term),
                "leadership changed during the run; the counters do not cover it"
            );

            // Every put was served (not forwarded) by the leader.
            let puts = after.put_ok - before.put_ok;
            assert_eq!(
                puts, acked as f64,
                "KV/Put Ok counter moved by {puts}, {acked} puts were acknowledged"
            );
            // The writes were made durable, and fsyncs were shared.
            let fsyncs = after.fsyncs - before.fsyncs;
            let covered = after.fsynced_requests - before.fsynced_requests;
            assert!(
                fsyncs > 0.0,
                "no fsync on the leader for {acked} writes:\n{}",
                after.body
            );
            assert!(
                covered >= fsyncs,
                "an fsync covers at least one append request: {covered} < {fsyncs}"
            );
            assert!(
                fsyncs < acked as f64,
                "no group commit: {fsyncs} fsyncs for {acked} acknowledged writes \
                 ({covered} append requests)"
            );
            eprintln!(
                "group commit: {acked} writes, {fsyncs} fsyncs on the leader, \
                 {covered} append requests, {:.1} requests per fsync",
                covered / fsyncs
            );
        },
    )
    .await;
}
