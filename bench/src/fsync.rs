//! Disk fsync latency: sequential 4 KiB appends, each followed by
//! `fdatasync` (`File::sync_data`), like a write-ahead log without
//! preallocation (and like etcd's recommended fio check).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::workload::{new_histogram, Latency};

#[derive(Clone, Debug, Serialize)]
pub struct FsyncOutcome {
    pub iterations: usize,
    pub block_bytes: usize,
    pub dir: String,
    pub latency: Latency,
}

/// Runs `iterations` write+sync_data rounds in a file under `dir` (removed
/// afterwards). Blocking: call from `spawn_blocking`.
pub fn measure(dir: &Path, iterations: usize) -> Result<FsyncOutcome> {
    const BLOCK: usize = 4096;
    let path = dir.join("lockbench-fsync.dat");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let block = vec![0xA5u8; BLOCK];
    let mut hist = new_histogram();
    for _ in 0..iterations {
        let t0 = Instant::now();
        f.write_all(&block)
            .with_context(|| format!("write {}", path.display()))?;
        f.sync_data()
            .with_context(|| format!("sync_data {}", path.display()))?;
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(us);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(FsyncOutcome {
        iterations,
        block_bytes: BLOCK,
        dir: dir.display().to_string(),
        latency: Latency::of(&hist),
    })
}
