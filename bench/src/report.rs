//! Machine description and table/JSON output.

use serde::Serialize;

/// The machine the benchmark ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let kernel = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine { cores, kernel, cpu }
    }
}

/// One `metric | value` row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: String,
}

pub fn row(metric: impl Into<String>, value: impl Into<String>) -> Row {
    Row {
        metric: metric.into(),
        value: value.into(),
    }
}

/// The exact command line this process was started with.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Formats microseconds as milliseconds with 2 decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub fn ops(v: f64) -> String {
    format!("{v:.0} ops/s")
}

/// Renders the rows as a markdown table preceded by the machine and command.
pub fn markdown(title: &str, machine: &Machine, command: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!("## {title}\n\n"));
    s.push_str(&format!("- command: `{command}`\n"));
    s.push_str(&format!(
        "- machine: {} cores, {}, kernel {}\n\n",
        machine.cores, machine.cpu, machine.kernel
    ));
    s.push_str("| metric | value |\n|---|---|\n");
    for r in rows {
        s.push_str(&format!("| {} | {} |\n", r.metric, r.value));
    }
    s
}
