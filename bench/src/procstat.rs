//! CPU and memory of processes from /proc: utime + stime ticks
//! (`/proc/<pid>/stat`) and VmRSS (`/proc/<pid>/status`), sampled into
//! [`CpuWindow`]s by a [`Probe`] over a set of pids (the cluster's members,
//! and optionally this process).

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use lockd_e2e::Cluster;
use serde::Serialize;
use tokio::time::Instant;

/// CPU and memory of the members over one window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuWindow {
    pub seconds: f64,
    /// Percent of one core, per member id.
    pub cpu_percent: BTreeMap<u64, f64>,
    /// VmRSS at the end of the window, KiB, per member id.
    pub rss_kib: BTreeMap<u64, u64>,
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`, else 100).
pub(crate) fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces; fields
    // after it start at field 3 (state), so utime (14) and stime (15) are
    // at indices 11 and 12.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: no ')'"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        f.get(i)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// VmRSS of `pid`, KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status: no VmRSS"))
}

/// CPU ticks of every probed pid at one instant.
pub(crate) struct Sample {
    at: Instant,
    ticks: BTreeMap<u64, u64>,
}

/// The processes to sample, by id (member id; 0 for this process).
pub(crate) struct Probe {
    pub(crate) pids: BTreeMap<u64, u32>,
    pub(crate) tck: u64,
}

impl Probe {
    /// A probe of every member of `cluster` (all must be running).
    pub(crate) fn members(cluster: &Cluster, tck: u64) -> Result<Probe> {
        let mut pids = BTreeMap::new();
        for id in cluster.ids() {
            pids.insert(
                id,
                cluster
                    .pid(id)
                    .ok_or_else(|| anyhow!("member {id} is not running"))?,
            );
        }
        Ok(Probe { pids, tck })
    }

    /// CPU ticks of every pid now.
    pub(crate) fn sample(&self) -> Result<Sample> {
        let mut ticks = BTreeMap::new();
        for (id, pid) in &self.pids {
            ticks.insert(*id, cpu_ticks(*pid)?);
        }
        Ok(Sample {
            at: Instant::now(),
            ticks,
        })
    }

    /// CPU percent per id between samples `a` and `b`, and VmRSS now.
    pub(crate) fn window(&self, a: &Sample, b: &Sample) -> Result<CpuWindow> {
        let seconds = b.at.duration_since(a.at).as_secs_f64();
        let mut w = CpuWindow {
            seconds,
            ..Default::default()
        };
        for (id, pid) in &self.pids {
            let dt = b.ticks[id].saturating_sub(a.ticks[id]) as f64 / self.tck as f64;
            w.cpu_percent.insert(*id, 100.0 * dt / seconds.max(1e-9));
            w.rss_kib.insert(*id, rss_kib(*pid)?);
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_files() {
        let pid = std::process::id();
        cpu_ticks(pid).unwrap();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(clk_tck() > 0);
    }
}
