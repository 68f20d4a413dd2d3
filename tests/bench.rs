//! The benchmark binary runs end to end and prints one well-formed JSON line per
//! scenario (tiny sizes: this checks the harness, not the speed).

use std::process::Command;

#[test]
fn every_scenario_prints_a_ratio_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args([
            "--events",
            "300",
            "--export-events",
            "1000",
            "--import-records",
            "1000",
            "--transform-records",
            "2000",
            "--idle-seconds",
            "2",
            "--rounds",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "mongo-insert",
            "track-ingest",
            "segment-ingest",
            "parquet-export",
            "archive",
            "http-import",
            "http-push",
            "wasm-transform-noop",
            "wasm-transform-redact",
            "scheduler-idle",
            "aggregate-check"
        ]
    );
    for l in &lines {
        if l["scenario"] == "scheduler-idle" {
            // CPU seconds of an idle process over two seconds may round to zero.
            assert!(
                l["baseline_cpu_s"].as_f64().is_some() && l["sluice_cpu_s"].as_f64().is_some(),
                "{l}"
            );
            assert!(l["fire_delay_p99_ms"].as_f64().unwrap() >= 0.0, "{l}");
            continue;
        }
        let (base, sluice, ratio) = (
            l["baseline_per_s"].as_f64().unwrap(),
            l["sluice_per_s"].as_f64().unwrap(),
            l["ratio"].as_f64().unwrap(),
        );
        assert!(base > 0.0 && sluice > 0.0, "{l}");
        assert!((ratio - sluice / base).abs() < 0.01, "{l}");
        if l["scenario"]
            .as_str()
            .unwrap()
            .starts_with("wasm-transform")
        {
            assert!(l["stage_ratio"].as_f64().unwrap() > 0.0, "{l}");
        }
        if l["scenario"] == "aggregate-check" {
            // Every event stored was checked, and found consistent (or the run failed).
            assert_eq!(l["events"], 300, "{l}");
            assert!(l["sessions"].as_u64().unwrap() > 0, "{l}");
        }
        if l["scenario"] == "archive" {
            // Where the time went: each phase was seen.
            for phase in [
                "seconds_reading",
                "seconds_to_first_delete",
                "seconds_deleting",
            ] {
                assert!(l[phase].as_f64().is_some_and(|s| s >= 0.0), "{l}");
            }
        }
        if l["scenario"] == "mongo-insert" || l["scenario"] == "track-ingest" {
            let share = &l["writer_time_share"];
            let total: f64 = sluice_connectors::mongo::WRITE_PHASES
                .iter()
                .map(|p| share[p].as_f64().unwrap())
                .sum();
            assert!((total - 1.0).abs() < 0.05, "{l}");
            let aggregating = l["aggregating_baseline_per_s"].as_f64().unwrap();
            assert!(aggregating > 0.0, "{l}");
            let vs = l["ratio_vs_aggregating_baseline"].as_f64().unwrap();
            assert!((vs - sluice / aggregating).abs() < 0.01, "{l}");
        }
        if l["scenario"] == "track-ingest" {
            let per_session = l["request_per_session_per_s"].as_f64().unwrap();
            let r = l["request_per_session_ratio"].as_f64().unwrap();
            assert!(
                per_session > 0.0 && (r - per_session / base).abs() < 0.01,
                "{l}"
            );
            let share = &l["request_per_session_writer_time_share"];
            let total: f64 = sluice_connectors::mongo::WRITE_PHASES
                .iter()
                .map(|p| share[p].as_f64().unwrap())
                .sum();
            assert!((total - 1.0).abs() < 0.05, "{l}");
        }
        if l["scenario"] == "http-import" {
            assert!(l["ratio_no_index"].as_f64().unwrap() > 0.0, "{l}");
        }
    }
}

#[test]
fn unknown_scenario_is_named_with_the_available_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`nope`") && err.contains("mongo-insert"),
        "{err}"
    );
}
