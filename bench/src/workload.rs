//! Closed-loop workloads: N client tasks, each with its own connection,
//! issue one request at a time for a fixed duration after a warm-up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::target::Target;

/// What a workload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Puts of distinct keys.
    Write,
    /// Gets of pre-written keys.
    Read,
}

/// A workload to run.
#[derive(Clone, Debug, Serialize)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
    pub serializable: bool,
    pub clients: usize,
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub warmup: Duration,
    pub value_size: usize,
    /// Keys written before a read workload and read at random.
    pub read_keys: usize,
    /// Endpoints the clients are spread over (round-robin).
    pub endpoints: Vec<String>,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// Outcome of one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub spec: Spec,
    pub target: String,
    /// Successful operations in the measured window.
    pub ops: u64,
    /// Failed operations in the measured window (and in the warm-up).
    pub errors: u64,
    pub warmup_errors: u64,
    /// First few distinct error messages.
    pub error_samples: Vec<String>,
    pub elapsed_s: f64,
    pub ops_per_sec: f64,
    pub latency: Latency,
}

impl Outcome {
    /// True when the workload completed at least one op and saw no error.
    pub fn clean(&self) -> bool {
        self.ops > 0 && self.errors == 0 && self.warmup_errors == 0
    }
}

/// A latency histogram for 1 µs .. 60 s with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// xorshift64*: cheap per-client key choice without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn run_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

const MAX_ERROR_SAMPLES: usize = 5;

struct ClientResult {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    warmup_errors: u64,
    samples: Vec<String>,
    last_done: Instant,
}

/// Writes the keys a read workload reads; returns their names.
async fn populate(target: &dyn Target, spec: &Spec, prefix: &str) -> Result<Vec<String>> {
    let keys: Vec<String> = (0..spec.read_keys.max(1))
        .map(|i| format!("{prefix}/r/{i}"))
        .collect();
    let value = vec![b'r'; spec.value_size];
    let writers = 8.min(keys.len());
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = target.connect(&spec.endpoints, w)?;
        let mine: Vec<String> = keys.iter().skip(w).step_by(writers).cloned().collect();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            for k in &mine {
                let mut attempt = 0;
                loop {
                    match client.put(k, &value).await {
                        Ok(()) => break,
                        Err(e) if attempt < 3 => {
                            attempt += 1;
                            eprintln!("lockbench: populate {k}: {e:#} (retrying)");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e.context(format!("populate {k}"))),
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(keys)
}

/// Runs `spec` against `target`.
pub async fn run(target: &dyn Target, spec: &Spec) -> Result<Outcome> {
    if spec.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let prefix = format!("/bench/{}", run_id());
    let keys = match spec.kind {
        Kind::Read => Arc::new(populate(target, spec, &prefix).await?),
        Kind::Write => Arc::new(Vec::new()),
    };
    let value = Arc::new(vec![b'x'; spec.value_size]);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut tasks = Vec::with_capacity(spec.clients);
    for c in 0..spec.clients {
        let mut client = target.connect(&spec.endpoints, c)?;
        let (keys, value, prefix) = (keys.clone(), value.clone(), prefix.clone());
        let (kind, serializable) = (spec.kind, spec.serializable);
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult {
                hist: new_histogram(),
                ops: 0,
                errors: 0,
                warmup_errors: 0,
                samples: Vec::new(),
                last_done: measure_from,
            };
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) << 17));
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let res = match kind {
                    Kind::Write => {
                        let key = format!("{prefix}/w/{c}/{seq}");
                        seq += 1;
                        client.put(&key, &value).await
                    }
                    Kind::Read => {
                        let key = &keys[(rng.next() % keys.len() as u64) as usize];
                        if serializable {
                            client.get_serializable(key).await
                        } else {
                            client.get_linearizable(key).await
                        }
                    }
                };
                let done = Instant::now();
                let measured = t0 >= measure_from;
                match res {
                    Ok(()) if measured => {
                        let us = done.duration_since(t0).as_micros();
                        r.hist
                            .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                        r.ops += 1;
                        r.last_done = done;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if measured {
                            r.errors += 1;
                        } else {
                            r.warmup_errors += 1;
                        }
                        let msg = format!("{e:#}");
                        if r.samples.len() < MAX_ERROR_SAMPLES && !r.samples.contains(&msg) {
                            r.samples.push(msg);
                        }
                        // Do not spin on errors that come back at once.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            r
        }));
    }
    let mut hist = new_histogram();
    let (mut ops, mut errors, mut warmup_errors) = (0u64, 0u64, 0u64);
    let mut samples: Vec<String> = Vec::new();
    let mut last_done = measure_from;
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist)?;
        ops += r.ops;
        errors += r.errors;
        warmup_errors += r.warmup_errors;
        for s in r.samples {
            if samples.len() < MAX_ERROR_SAMPLES && !samples.contains(&s) {
                samples.push(s);
            }
        }
        last_done = last_done.max(r.last_done);
    }
    let elapsed = last_done
        .max(end)
        .duration_since(measure_from)
        .as_secs_f64();
    Ok(Outcome {
        spec: spec.clone(),
        target: target.name().to_string(),
        ops,
        errors,
        warmup_errors,
        error_samples: samples,
        elapsed_s: elapsed,
        ops_per_sec: if elapsed > 0.0 {
            ops as f64 / elapsed
        } else {
            0.0
        },
        latency: Latency::of(&hist),
    })
}
