//! Process-wide Prometheus counters for the stages outside the tracking endpoint: imports,
//! pushes, exports, scheduled jobs and plugins. Stages record once per batch or run (never
//! per record), so one mutex is cheap; `sluice serve` appends [`render`] to `/metrics`.
//!
//! Series are created when first recorded; a counter never goes down. Durations are
//! summaries (`_sum` and `_count`); a gauge holds the last value set.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

struct Family {
    help: &'static str,
    kind: &'static str,
    /// Rendered label set (`{a="x",b="y"}`) -> value.
    series: BTreeMap<String, f64>,
}

static REGISTRY: Mutex<BTreeMap<&'static str, Family>> = Mutex::new(BTreeMap::new());

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn add_to(name: &'static str, help: &'static str, kind: &'static str, labels: String, v: f64) {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let family = reg.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    *family.series.entry(labels).or_insert(0.0) += v;
}

/// Adds `v` to the counter `name{labels}`.
pub fn count(name: &'static str, help: &'static str, labels: &[(&str, &str)], v: u64) {
    add_to(name, help, "counter", label_text(labels), v as f64);
}

/// Sets the gauge `name{labels}` to `v`.
pub fn set(name: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let family = reg.entry(name).or_insert_with(|| Family {
        help,
        kind: "gauge",
        series: BTreeMap::new(),
    });
    family.series.insert(label_text(labels), v);
}

/// Records one duration of `name{labels}` (a summary: `name_sum` seconds, `name_count`).
pub fn observe_seconds(name: &'static str, help: &'static str, labels: &[(&str, &str)], secs: f64) {
    let text = label_text(labels);
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let family = reg.entry(name).or_insert_with(|| Family {
        help,
        kind: "summary",
        series: BTreeMap::new(),
    });
    *family.series.entry(format!("_sum{text}")).or_insert(0.0) += secs;
    *family.series.entry(format!("_count{text}")).or_insert(0.0) += 1.0;
}

/// Removes, from every family whose name starts with `prefix`, the series whose `label`
/// has a value `gone` names (the series of a job no longer scheduled, which an alert
/// would otherwise keep seeing until the process restarts).
pub fn forget(prefix: &str, label: &str, gone: impl Fn(&str) -> bool) {
    let needle = format!("{label}=\"");
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    for (_, family) in reg.iter_mut().filter(|(name, _)| name.starts_with(prefix)) {
        family.series.retain(|key, _| {
            let Some(at) = key.find(&needle) else {
                return true;
            };
            let rest = &key[at + needle.len()..];
            !gone(&rest[..rest.find('"').unwrap_or(rest.len())])
        });
    }
}

/// The background tasks of `sluice serve` whose failures [`count_background_error`]
/// counts.
pub const BACKGROUND_TASKS: [&str; 5] = [
    "session_sweeper",
    "scheduler_sweep",
    "scheduler_reload",
    "dead_export_check",
    "job_gauges",
];

/// `sluice_background_errors_total{task}`: a background task's pass that failed (the
/// store unreachable, mostly), which the log alone would show otherwise.
pub fn count_background_error(task: &str, n: u64) {
    count(
        "sluice_background_errors_total",
        "Failed passes of background tasks (session_sweeper, scheduler_sweep, scheduler_reload, dead_export_check, job_gauges); each is tried again at its next pass.",
        &[("task", task)],
        n,
    );
}

/// The current value of a series (tests and reports).
pub fn value(name: &str, labels: &[(&str, &str)]) -> f64 {
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let text = label_text(labels);
    reg.get(name)
        .and_then(|f| {
            f.series
                .get(&text)
                .or_else(|| f.series.get(&format!("_count{text}")))
        })
        .copied()
        .unwrap_or(0.0)
}

/// The total seconds recorded by a summary (tests and reports).
pub fn seconds_sum(name: &str, labels: &[(&str, &str)]) -> f64 {
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let key = format!("_sum{}", label_text(labels));
    reg.get(name)
        .and_then(|f| f.series.get(&key))
        .copied()
        .unwrap_or(0.0)
}

/// Every recorded series in the Prometheus text exposition format.
pub fn render() -> String {
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, family) in reg.iter() {
        let _ = writeln!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}",
            family.help, family.kind
        );
        for (labels, v) in &family.series {
            // Summaries keep their suffix in front of the labels.
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_a_label_value_no_longer_kept_are_forgotten() {
        count(
            "t_forget_runs_total",
            "Runs.",
            &[("job_name", "a"), ("status", "OK")],
            1,
        );
        count(
            "t_forget_runs_total",
            "Runs.",
            &[("job_name", "b"), ("status", "OK")],
            2,
        );
        observe_seconds("t_forget_run_seconds", "Runs.", &[("job_name", "b")], 1.0);
        count("t_other_total", "Other.", &[("job_name", "b")], 1);
        forget("t_forget_", "job_name", |j| j == "b");
        assert_eq!(
            value(
                "t_forget_runs_total",
                &[("job_name", "a"), ("status", "OK")]
            ),
            1.0
        );
        let text = render();
        assert!(
            !text.contains("t_forget_runs_total{job_name=\"b\""),
            "{text}"
        );
        assert!(
            !text.contains("t_forget_run_seconds_sum{job_name=\"b\""),
            "{text}"
        );
        assert!(text.contains("t_other_total{job_name=\"b\"} 1"), "{text}");
    }

    #[test]
    fn counters_and_summaries_render_in_the_text_format() {
        count("t_records_total", "Records.", &[("config", "a\"b")], 3);
        count("t_records_total", "Records.", &[("config", "a\"b")], 2);
        observe_seconds("t_run_seconds", "Runs.", &[("job", "x")], 1.5);
        observe_seconds("t_run_seconds", "Runs.", &[("job", "x")], 0.5);
        let text = render();
        assert!(text.contains("# TYPE t_records_total counter"), "{text}");
        assert!(
            text.contains("t_records_total{config=\"a\\\"b\"} 5"),
            "{text}"
        );
        assert!(text.contains("t_run_seconds_sum{job=\"x\"} 2"), "{text}");
        assert!(text.contains("t_run_seconds_count{job=\"x\"} 2"), "{text}");
        assert_eq!(value("t_records_total", &[("config", "a\"b")]), 5.0);
        assert_eq!(value("t_run_seconds", &[("job", "x")]), 2.0);
        assert_eq!(seconds_sum("t_run_seconds", &[("job", "x")]), 2.0);
        assert_eq!(seconds_sum("t_run_seconds", &[("job", "nope")]), 0.0);
    }
}
