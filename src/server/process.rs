//! The standard `process_*` metrics of the Prometheus client libraries, read from
//! `/proc/self` on Linux (elsewhere only the start time is known), and
//! `sluice_build_info`. Read at each scrape: a few small files.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// When this process started serving (Unix seconds), set once by the server.
static STARTED: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Notes the start time, once per process.
pub fn mark_started() {
    STARTED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
}

/// Clock ticks per second of `/proc/self/stat` times: USER_HZ, which Linux fixes at 100
/// for user space on every architecture it exports it to.
const TICKS_PER_SECOND: f64 = 100.0;

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line, 12th and 13th after it.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The process metrics in the Prometheus text format.
pub fn render() -> String {
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    };
    put(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        cpu_seconds(),
    );
    put(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size, in bytes.",
        resident_bytes(),
    );
    put(
        "process_open_fds",
        "gauge",
        "Open file descriptors (sockets included).",
        open_fds(),
    );
    put(
        "process_max_fds",
        "gauge",
        "The limit on open file descriptors.",
        max_fds(),
    );
    put(
        "process_start_time_seconds",
        "gauge",
        "When the process started, in Unix seconds.",
        STARTED.get().copied(),
    );
    let _ = writeln!(
        out,
        "# HELP sluice_build_info The running version (always 1).\n# TYPE sluice_build_info gauge\nsluice_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_metrics_read_this_process() {
        super::mark_started();
        let text = super::render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            let v: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
            assert!(v > 0.0 || name == "process_cpu_seconds_total", "{line}");
        }
        assert!(text.contains("sluice_build_info{version=\""), "{text}");
    }
}
