//! The WASM plugin host: hostile plugins are stopped with clear errors while the host goes
//! on serving, and the example plugins change records as documented in a pipeline on the
//! real server.

mod support;

use std::sync::Arc;

use bson::{doc, Document};
use serde_json::json;
use sluice_core::transform::{Call, Transform};
use sluice_plugins::{FailurePolicy, Grants, Limits, PluginError, PluginHost};

fn host() -> PluginHost {
    PluginHost::new(false).unwrap()
}

fn tight() -> Option<Limits> {
    Some(Limits {
        memory_mib: 16,
        batch_deadline_ms: 300,
        fuel: None,
    })
}

fn batch() -> Vec<Document> {
    vec![
        doc! { "eventId": "a", "n": 1 },
        doc! { "eventId": "b", "n": 2 },
    ]
}

/// A fresh, empty plugin folder.
fn scratch_dir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sluice-plugins-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `hostile` plugin in `mode`, with a deadline a loaded machine cannot miss: for
/// modes whose batches must end in time (or fail for another reason than time).
fn hostile(host: &PluginHost, mode: &str) -> sluice_plugins::WasmTransform {
    hostile_within(host, mode, 10_000)
}

/// The `hostile` plugin with the tight deadline (300 ms): for modes that run it out
/// (`loop`, `sleep`), and where the test is about what a deadline bounds.
fn hostile_slow(host: &PluginHost, mode: &str) -> sluice_plugins::WasmTransform {
    hostile_within(host, mode, tight().unwrap().batch_deadline_ms)
}

fn hostile_within(
    host: &PluginHost,
    mode: &str,
    deadline_ms: u64,
) -> sluice_plugins::WasmTransform {
    host.load(
        &support::plugin_dir(),
        "hostile",
        json!({ "mode": mode }),
        &Grants::default(),
        Some(Limits {
            batch_deadline_ms: deadline_ms,
            ..tight().unwrap()
        }),
    )
    .unwrap()
}

#[test]
fn hostile_plugins_are_stopped_with_clear_errors_and_the_host_goes_on() {
    let host = host();
    let dir = support::plugin_dir();

    let looping = hostile_slow(&host, "loop");
    let err = looping.run_batch(&batch()).unwrap_err();
    assert_eq!(
        err,
        PluginError::Deadline {
            plugin: "hostile".into(),
            ms: 300
        }
    );
    assert!(
        err.to_string()
            .starts_with("plugin `hostile` exceeded its deadline of 300 ms for a batch (the manifest's `[limits] batch_deadline_ms`"),
        "{err}"
    );

    let err = hostile(&host, "memory").run_batch(&batch()).unwrap_err();
    assert_eq!(
        err,
        PluginError::Memory {
            plugin: "hostile".into(),
            mib: 16
        }
    );

    let err = hostile(&host, "panic").run_batch(&batch()).unwrap_err();
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    // The panic's own message, which the plugin wrote to stderr, is in the error.
    assert!(
        err.to_string().contains("the plugin panicked on purpose"),
        "{err}"
    );

    // No preopened directory, no network: the attempts fail inside the sandbox.
    let out = hostile(&host, "file").run_batch(&batch()).unwrap();
    assert!(out.records.is_empty());
    assert!(
        out.failed[0].1.contains("file access denied"),
        "{:?}",
        out.failed
    );
    // A reason is kept short and on one line, whatever the plugin wrote.
    let out = hostile(&host, "long-reason").run_batch(&batch()).unwrap();
    let reason = &out.failed[0].1;
    assert!(
        reason.starts_with("line one forged line xxx"),
        "{}",
        &reason[..40]
    );
    assert!(
        reason.len() < sluice_plugins::MAX_REASON_CHARS + 100
            && reason.ends_with(&format!("({} more characters cut)", (2 << 20) + 21 - 1000)),
        "{}",
        &reason[reason.len() - 60..]
    );
    let out = hostile(&host, "socket").run_batch(&batch()).unwrap();
    assert!(
        out.failed[0].1.contains("network access denied"),
        "{:?}",
        out.failed
    );
    let out = hostile(&host, "env").run_batch(&batch()).unwrap();
    assert_eq!(
        out.records[0].get_i32("env").unwrap(),
        0,
        "no environment leaks in"
    );

    // Output that does not decode fails its record (the plugin knew which), not the batch.
    let out = hostile(&host, "garbage").run_batch(&batch()).unwrap();
    assert!(out.records.is_empty());
    assert_eq!(out.failed.len(), 2, "{:?}", out.failed);
    assert!(
        out.failed
            .iter()
            .all(|(_, reason)| reason.contains("malformed") && reason.contains("not JSON")),
        "{:?}",
        out.failed
    );
    let mut call = Call::default();
    let picky = hostile(&host, "garbage-on-bad").with_policy(FailurePolicy::DeadLetter);
    let mixed = vec![
        doc! { "eventId": "a", "n": 1 },
        doc! { "eventId": "b", "n": "bad" },
        doc! { "eventId": "c", "n": 3 },
    ];
    let kept = picky.apply(mixed.clone(), &mut call).unwrap();
    let letters = std::mem::take(&mut call.letters);
    assert_eq!(kept, [mixed[0].clone(), mixed[2].clone()]);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, mixed[1]);
    let err = hostile(&host, "short").run_batch(&batch()).unwrap_err();
    assert!(
        err.to_string().contains("0 results for a batch of 2"),
        "{err}"
    );

    // A sleep in a host call ends at the deadline; the epoch interruption alone would only
    // stop the plugin once it returned to wasm code, a minute later.
    let started = std::time::Instant::now();
    let err = hostile_slow(&host, "sleep")
        .run_batch(&batch())
        .unwrap_err();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "stopped at the deadline, not after the sleep: {:?}",
        started.elapsed()
    );
    // Output far larger than the input is refused before it is decoded into host memory.
    let err = hostile(&host, "fanout").run_batch(&batch()).unwrap_err();
    assert!(
        matches!(err, PluginError::Fanout { .. }) && err.to_string().contains("JSON values"),
        "{err}"
    );
    // The bound grows with the batch, plus a constant: a fan-out of 6 over a large batch
    // (3,000 records of 20 fields) is over it, and in a pipeline the batch is split until
    // each part fits, nothing lost.
    let wide: Vec<Document> = (0..3000)
        .map(|i| {
            let mut d = doc! { "eventId": format!("w{i}") };
            for f in 0..19 {
                d.insert(format!("f{f}"), f);
            }
            d
        })
        .collect();
    let six = hostile(&host, "fanout-6");
    let err = six.run_batch(&wide).unwrap_err();
    assert!(matches!(err, PluginError::Fanout { .. }), "{err}");
    let out = six.apply(wide.clone(), &mut Call::default()).unwrap();
    assert_eq!(out.len(), 6 * wide.len());
    assert_eq!(out[5], wide[0]);
    assert_eq!(out[6 * 2999], wide[2999]);
    // Printing a lot, batch after batch, never fills the plugin's output pipe.
    let printing = hostile(&host, "print");
    for _ in 0..10 {
        assert_eq!(printing.run_batch(&batch()).unwrap().records, batch());
    }
    // One call printing more than the buffer holds (80 records of 60 KB) fails as output,
    // not as its input; the next batch runs on a fresh instance.
    let printing = host
        .load(
            &dir,
            "hostile",
            json!({ "mode": "print" }),
            &Grants::default(),
            Some(Limits {
                batch_deadline_ms: 10_000,
                ..tight().unwrap()
            }),
        )
        .unwrap();
    let many: Vec<Document> = (0..80)
        .map(|i| doc! { "eventId": format!("m{i}") })
        .collect();
    let err = printing.run_batch(&many).unwrap_err();
    assert!(
        matches!(err, PluginError::Output { .. }) && !err.caused_by_input(),
        "{err}"
    );
    assert_eq!(printing.run_batch(&batch()).unwrap().records, batch());
    // In a pipeline the batch is split until each part's printing fits.
    assert_eq!(
        printing.apply(many.clone(), &mut Call::default()).unwrap(),
        many
    );
    // A panic is reported with the trap's reason, not only where it happened.
    let err = hostile(&host, "panic").run_batch(&batch()).unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    // A host-side error (here the plugin's call to exit; WASI has only success and
    // failure, so the status is 1) is reported by its cause, not
    // by the wasm backtrace wasmtime wraps around it.
    let err = hostile(&host, "exit").run_batch(&batch()).unwrap_err();
    assert!(
        err.to_string().contains("exit status") && !err.to_string().contains("backtrace"),
        "{err}"
    );

    // The host is unharmed: a well-behaved plugin still runs, and a plugin that trapped is
    // rebuilt for its next batch.
    let noop = host
        .load(&dir, "noop", json!({}), &Grants::default(), None)
        .unwrap();
    assert_eq!(noop.run_batch(&batch()).unwrap().records, batch());
    for _ in 0..2 {
        assert!(matches!(
            looping.run_batch(&batch()),
            Err(PluginError::Deadline { .. })
        ));
    }
}

#[test]
fn a_tampered_component_or_a_bad_config_is_refused_at_load() {
    let host = host();
    let src = support::plugin_dir();
    let dir = scratch_dir();
    std::fs::copy(src.join("noop.wasm"), dir.join("noop.wasm")).unwrap();
    std::fs::write(
        dir.join("noop.toml"),
        "name = \"noop\"\nversion = \"0.1.0\"\nwasm = \"noop.wasm\"\nsha256 = \"00\"\n",
    )
    .unwrap();
    let err = host
        .load(&dir, "noop", json!({}), &Grants::default(), None)
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::Hash { .. }), "{err}");
    // A manifest speaking for another plugin, or pointing outside the folder, is refused;
    // so is a plugin name that is a path.
    for (manifest, expected) in [
        (
            "name = \"other\"\nversion = \"0.1.0\"\nwasm = \"noop.wasm\"\nsha256 = \"00\"\n",
            "named after its plugin",
        ),
        (
            "name = \"noop\"\nversion = \"0.1.0\"\nwasm = \"../noop.wasm\"\nsha256 = \"00\"\n",
            "not a path",
        ),
        (
            "name = \"noop\"\nversion = \"0.1.0\"\nwasm = \"/tmp/noop.wasm\"\nsha256 = \"00\"\n",
            "not a path",
        ),
    ] {
        std::fs::write(dir.join("noop.toml"), manifest).unwrap();
        let err = host
            .load(&dir, "noop", json!({}), &Grants::default(), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains(expected), "{err}");
    }
    // A component too big to compile in reasonable time and memory is refused unread (a
    // sparse file: nothing is written).
    std::fs::File::create(dir.join("huge.wasm"))
        .unwrap()
        .set_len(sluice_plugins::MAX_COMPONENT_BYTES + 1)
        .unwrap();
    std::fs::write(
        dir.join("noop.toml"),
        "name = \"noop\"\nversion = \"0.1.0\"\nwasm = \"huge.wasm\"\nsha256 = \"00\"\n",
    )
    .unwrap();
    let err = host
        .load(&dir, "noop", json!({}), &Grants::default(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("are refused"), "{err}");
    let err = host
        .load(&dir, "../noop", json!({}), &Grants::default(), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("lowercase letters"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();

    let err = host
        .load(&src, "redact-pii", json!({}), &Grants::default(), None)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "plugin `redact-pii` refused its config: `salt` is required: a string of at least 16 characters"
    );
}

#[test]
fn limits_no_batch_could_run_under_are_refused_when_the_plugin_loads() {
    let host = host();
    let dir = support::plugin_dir();
    let with = |f: fn(&mut Limits)| {
        let mut l = Limits::default();
        f(&mut l);
        l
    };
    for (limits, field) in [
        (
            with(|l| l.batch_deadline_ms = 0),
            "limits.batch_deadline_ms",
        ),
        // Beyond the ceiling, a deadline's arithmetic would overflow.
        (
            with(|l| l.batch_deadline_ms = u64::MAX),
            "limits.batch_deadline_ms",
        ),
        (with(|l| l.memory_mib = 0), "limits.memory_mib"),
        (with(|l| l.fuel = Some(0)), "limits.fuel"),
    ] {
        let err = host
            .load(&dir, "noop", json!({}), &Grants::default(), Some(limits))
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let ceiling = with(|l| l.batch_deadline_ms = sluice_plugins::MAX_BATCH_DEADLINE_MS);
    assert!(host
        .load(&dir, "noop", json!({}), &Grants::default(), Some(ceiling))
        .is_ok());
}

#[test]
fn a_replaced_component_takes_the_place_of_its_old_compile_and_versions_are_checked() {
    use sha2::Digest;
    let host = host();
    let src = support::plugin_dir();
    let dir = scratch_dir();
    let install_as = |file: &str, component: &str, version: &str| {
        let bytes = std::fs::read(src.join(component)).unwrap();
        std::fs::write(dir.join(file), &bytes).unwrap();
        let sha = format!("{:x}", sha2::Sha256::digest(&bytes));
        std::fs::write(
            dir.join("p.toml"),
            format!(
                "name = \"p\"\nversion = \"{version}\"\nwasm = \"{file}\"\nsha256 = \"{sha}\"\n"
            ),
        )
        .unwrap();
    };
    let install = |component: &str, version: &str| install_as("p.wasm", component, version);
    let bots = || {
        vec![
            doc! { "eventId": "a", "metadata": { "bot": true } },
            doc! { "eventId": "b", "metadata": { "bot": false } },
        ]
    };
    install("noop.wasm", "1.0.0");
    let v1 = host
        .load(&dir, "p", json!({}), &Grants::default(), None)
        .unwrap();
    assert_eq!(v1.version(), "1.0.0");
    assert_eq!(v1.apply(bots(), &mut Call::default()).unwrap().len(), 2);
    // Loading it again compiles nothing new.
    host.load(&dir, "p", json!({}), &Grants::default(), None)
        .unwrap();
    assert_eq!(host.compiled_components(), 1);
    // A new version in the same file replaces the old compile instead of adding to it.
    install("bot-filter.wasm", "1.1.0-rc.1+build.7");
    let v2 = host
        .load(&dir, "p", json!({}), &Grants::default(), None)
        .unwrap();
    assert_eq!(v2.version(), "1.1.0-rc.1+build.7");
    assert_eq!(host.compiled_components(), 1);
    assert_eq!(
        v2.apply(bots(), &mut Call::default()).unwrap().len(),
        1,
        "the new component runs"
    );
    // So does a new version under its own file name: one compile per plugin, not one
    // per file it ever pointed at.
    install_as("p-1.2.wasm", "noop.wasm", "1.2.0");
    let v3 = host
        .load(&dir, "p", json!({}), &Grants::default(), None)
        .unwrap();
    assert_eq!(host.compiled_components(), 1);
    assert_eq!(v3.apply(bots(), &mut Call::default()).unwrap().len(), 2);
    // The version the manifest gives must be a semantic version.
    for bad in ["1.0", "v1.0.0", "01.0.0", "1.0.0-", ""] {
        install("noop.wasm", bad);
        let err = host
            .load(&dir, "p", json!({}), &Grants::default(), None)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("not a semantic version"),
            "{bad}: {err}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The entries of a compile cache folder.
fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_compiled_component_is_kept_on_disk_for_other_processes_and_checked_before_use() {
    use sluice_plugins::CompiledFrom;
    let plugins = support::plugin_dir();
    let cache = scratch_dir().join("compiled");
    let load = |host: &PluginHost| {
        host.load(&plugins, "bot-filter", json!({}), &Grants::default(), None)
            .unwrap()
    };
    let bots = || {
        vec![
            doc! { "eventId": "a", "metadata": { "bot": true } },
            doc! { "eventId": "b", "metadata": { "bot": false } },
        ]
    };
    // A process with an empty cache compiles, and keeps the compile.
    let first = load(&host().with_compile_cache(&cache));
    assert!(matches!(first.compiled_from(), CompiledFrom::Compiled(_)));
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(first.sha256()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&entries[0]), 0o600);
    }
    // Another process (another engine) reads it, and it runs as the compiled one does.
    let second = load(&host().with_compile_cache(&cache));
    assert_eq!(second.compiled_from(), CompiledFrom::Disk);
    assert_eq!(second.apply(bots(), &mut Call::default()).unwrap().len(), 1);
    // Within one process, a second load uses the compile in memory.
    let host3 = host().with_compile_cache(&cache);
    load(&host3);
    assert_eq!(load(&host3).compiled_from(), CompiledFrom::Memory);

    // A damaged entry is compiled again, never run, and replaced by a sound one.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&entries[0], &bytes).unwrap();
    let repaired = load(&host().with_compile_cache(&cache));
    assert!(matches!(
        repaired.compiled_from(),
        CompiledFrom::Compiled(_)
    ));
    assert_eq!(
        repaired.apply(bots(), &mut Call::default()).unwrap().len(),
        1
    );
    assert_eq!(
        load(&host().with_compile_cache(&cache)).compiled_from(),
        CompiledFrom::Disk
    );
    // So is a torn one.
    let len = std::fs::metadata(&entries[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&entries[0])
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    assert!(matches!(
        load(&host().with_compile_cache(&cache)).compiled_from(),
        CompiledFrom::Compiled(_)
    ));

    // Engines whose code differs (fuel metering) keep entries of their own.
    let metered = PluginHost::new(true).unwrap().with_compile_cache(&cache);
    assert!(matches!(
        load(&metered).compiled_from(),
        CompiledFrom::Compiled(_)
    ));
    assert_eq!(cache_entries(&cache).len(), 2);
    let metered = PluginHost::new(true).unwrap().with_compile_cache(&cache);
    assert_eq!(load(&metered).compiled_from(), CompiledFrom::Disk);

    // Entries unused for a month go when another is written, as do temporary files a
    // dead writer left; entries in use stay.
    let old = cache.join(format!("{}-0000000000000000.cwasm", "0".repeat(64)));
    let temp = cache.join(".tmp-1-dead");
    for f in [&old, &temp] {
        std::fs::write(f, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(
                std::time::SystemTime::now() - std::time::Duration::from_secs(31 * 24 * 3600),
            )
            .unwrap();
    }
    let noop = host()
        .with_compile_cache(&cache)
        .load(&plugins, "noop", json!({}), &Grants::default(), None)
        .unwrap();
    assert!(matches!(noop.compiled_from(), CompiledFrom::Compiled(_)));
    assert!(!old.exists() && !temp.exists());
    assert_eq!(cache_entries(&cache).len(), 3);

    // A folder other users may write is not used: its entries could be anyone's code.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Compiled(_)
        ));
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Disk
        );
        // Nor is an entry others may write, nor one reached through a link: each is
        // compiled again and replaced by an entry of this process.
        let entry = entries[0].clone();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Compiled(_)
        ));
        assert_eq!(
            std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let elsewhere = cache.parent().unwrap().join("elsewhere.cwasm");
        std::fs::rename(&entry, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &entry).unwrap();
        assert!(matches!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Compiled(_)
        ));
        assert!(!std::fs::symlink_metadata(&entry)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Disk
        );
        // A cache made read-only (as baked into an image) is read (the bug this guards
        // against, opening entries for writing, shows only when not run as root).
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o500)).unwrap();
        assert_eq!(
            load(&host().with_compile_cache(&cache)).compiled_from(),
            CompiledFrom::Disk
        );
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::remove_dir_all(cache.parent().unwrap()).unwrap();
}

#[test]
fn failure_policies_fail_skip_or_dead_letter() {
    let host = host();
    let dir = support::plugin_dir();
    let config = json!({ "target": "EUR", "rates": { "USD": 0.5 } });
    let records = vec![
        doc! { "eventType": "PURCHASE", "properties": { "amount": 10.0, "currency": "USD" } },
        doc! { "eventType": "PURCHASE", "properties": { "amount": 10.0, "currency": "JPY" } },
    ];
    let load = |p| {
        host.load(
            &dir,
            "currency-normalize",
            config.clone(),
            &Grants::default(),
            None,
        )
        .unwrap()
        .with_policy(p)
    };

    let err = load(FailurePolicy::FailRun)
        .apply(records.clone(), &mut Call::default())
        .unwrap_err();
    assert_eq!(err.to_string(), "transform `currency-normalize` failed: plugin `currency-normalize` failed record 2 of 2: no rate for `JPY`");
    // An amount that is no JSON number (a Decimal128) fails its record, not passes
    // unconverted in dollars.
    let decimal = doc! { "eventType": "PURCHASE", "properties": {
    "amount": "12.50".parse::<bson::Decimal128>().unwrap(), "currency": "USD" } };
    let out = load(FailurePolicy::FailRun).run_batch(&[decimal]).unwrap();
    assert!(
        out.failed.len() == 1 && out.failed[0].1.contains("is not a number"),
        "{:?}",
        out.failed
    );

    let dl = load(FailurePolicy::DeadLetter);
    let mut call = Call::default();
    let out = dl.apply(records.clone(), &mut call).unwrap();
    let letters = std::mem::take(&mut call.letters);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0]
            .get_document("properties")
            .unwrap()
            .get_f64("amount")
            .unwrap(),
        5.0
    );
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, "no rate for `JPY`");

    // Under skip-batch, only the record the plugin failed is dropped; the others of
    // its batch go on. The dropped one is handed back to be counted, not kept.
    let skip = load(FailurePolicy::SkipBatch);
    let mut call = Call::default();
    let out = skip.apply(records.clone(), &mut call).unwrap();
    assert_eq!(out, dl.apply(records, &mut Call::default()).unwrap());
    assert!(
        call.letters.is_empty(),
        "skipped records are no dead letters"
    );
    assert_eq!(call.skipped.len(), 1);
    assert_eq!(
        call.skipped[0]
            .0
            .get_document("properties")
            .unwrap()
            .get_str("currency")
            .unwrap(),
        "JPY"
    );
    assert_eq!(call.skipped[0].1, "no rate for `JPY`");
    assert_eq!(skip.skipped_records(), 1);
    // The records dropped are counted where an operator looks.
    let metrics = sluice_core::metrics::render();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("sluice_plugin_skipped_records_total") && l.contains("currency-normalize")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{line}");
}

/// Yesterday (a day exports take) and its noon in epoch milliseconds.
fn yesterday_noon() -> (chrono::NaiveDate, i64) {
    let day = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let noon = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    (day, noon.timestamp_millis())
}

/// Purchase `p{i}` of visitor `u{i}` in session `s`, at `t0 + i` ms.
fn export_event(i: i64, t0: i64, properties: Document) -> sluice_core::model::Event {
    sluice_core::model::Event {
        id: None,
        event_id: format!("p{i}"),
        user_id: format!("u{i}"),
        session_id: "s".into(),
        event_type: sluice_core::model::EventType::Purchase,
        timestamp: bson::DateTime::from_millis(t0 + i),
        properties,
        metadata: Default::default(),
        page_url: None,
        referrer: None,
        duration: None,
        created_at: bson::DateTime::now(),
        updated_at: bson::DateTime::now(),
    }
}

#[tokio::test]
async fn an_export_keeps_its_dead_letters_as_it_goes() {
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    use sluice_connectors::objstore::{LocalDir, ObjectStore};
    use sluice_jobs::export::{run_export, ExportContext, ExportRequest};

    let db = support::TestDb::initialized().await;
    let (day, t0) = yesterday_noon();
    // 2,500 purchases, every other one in a currency the plugin has no rate for.
    let events: Vec<sluice_core::model::Event> = (0..2_500i64)
        .map(|i| sluice_core::model::Event {
            user_id: format!("u{}", i % 50),
            session_id: format!("s{}", i % 50),
            ..export_event(
                i,
                t0,
                doc! { "amount": 10.0, "currency": if i % 2 == 0 { "USD" } else { "JPY" } },
            )
        })
        .collect();
    EventWriter::new(db.store.clone(), WriterOptions::default())
        .write(&events)
        .await
        .unwrap();
    let convert = host()
        .load(
            &support::plugin_dir(),
            "currency-normalize",
            json!({ "target": "EUR", "rates": { "USD": 0.5 } }),
            &Grants::default(),
            None,
        )
        .unwrap()
        .with_policy(FailurePolicy::DeadLetter);
    let out = std::env::temp_dir().join(format!(
        "sluice-plugin-letters-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&out)));
    ctx.transforms = vec![Arc::new(convert)];
    // Small batches: the letters are kept over several writes, during the day's staging.
    ctx.batch_rows = 100;
    let summary = run_export(
        &ctx,
        &ExportRequest::day(sluice_core::model::ExportJobType::EventData, day, 90),
    )
    .await
    .unwrap();
    assert_eq!(summary.rows, 1_250);
    let letters = db.store.collection("dead_letters");
    let kept = letters
        .count_documents(
            doc! { "pipeline": "export:EVENT_DATA", "runId": &summary.job_id,
            "reason": "no rate for `JPY`" },
        )
        .await
        .unwrap();
    assert_eq!(kept, 1_250);
    // A rerun of the day keeps them once.
    run_export(
        &ctx,
        &ExportRequest::day(sluice_core::model::ExportJobType::EventData, day, 90),
    )
    .await
    .unwrap();
    assert_eq!(letters.count_documents(doc! {}).await.unwrap(), 1_250);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn example_plugins_transform_an_export_pipeline_as_documented() {
    use arrow::array::AsArray;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    use sluice_connectors::objstore::{LocalDir, ObjectStore};
    use sluice_jobs::export::{run_export, ExportContext, ExportRequest};

    let db = support::TestDb::initialized().await;
    let (day, t0) = yesterday_noon();
    let mk = |i: i64, kind: &str, ua: &str, props: Document| sluice_core::model::Event {
        event_type: sluice_core::model::EventType::parse(kind).unwrap(),
        metadata: sluice_core::model::EventMetadata {
            user_agent: Some(ua.into()),
            ip_address: Some(format!("203.0.113.{i}")),
            ..Default::default()
        },
        ..export_event(i, t0, props)
    };
    let human = "Mozilla/5.0 (X11; Linux x86_64) Firefox/127.0";
    let events = vec![
        mk(
            1,
            "PURCHASE",
            human,
            doc! { "amount": 100.0, "currency": "USD", "email": "ann@example.com" },
        ),
        mk(
            2,
            "PAGE_VIEW",
            "Googlebot/2.1 (+http://www.google.com/bot.html)",
            doc! {},
        ),
        mk(
            3,
            "PURCHASE",
            human,
            doc! { "amount": 40.0, "currency": "EUR" },
        ),
        mk(4, "SIGNUP", human, doc! { "email": "bob@example.com" }),
    ];
    EventWriter::new(db.store.clone(), WriterOptions::default())
        .write(&events)
        .await
        .unwrap();

    let host = host();
    let dir = support::plugin_dir();
    let salt = "pepper-pepper-pepper";
    let chain: Vec<Arc<dyn Transform>> = vec![
        Arc::new(
            host.load(&dir, "bot-filter", json!({}), &Grants::default(), None)
                .unwrap(),
        ),
        Arc::new(
            host.load(
                &dir,
                "redact-pii",
                json!({ "salt": salt }),
                &Grants::default(),
                None,
            )
            .unwrap(),
        ),
        Arc::new(
            host.load(
                &dir,
                "currency-normalize",
                json!({ "target": "EUR", "rates": { "USD": 0.9 } }),
                &Grants::default(),
                None,
            )
            .unwrap(),
        ),
    ];
    let out = std::env::temp_dir().join(format!(
        "sluice-plugin-export-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&out)));
    ctx.transforms = chain;
    let summary = run_export(
        &ctx,
        &ExportRequest::day(sluice_core::model::ExportJobType::EventData, day, 90),
    )
    .await
    .unwrap();
    assert_eq!(summary.rows, 3, "the crawler's event is dropped");

    let file = std::fs::File::open(out.join(&summary.partitions[0].files[0])).unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let ids = b.column_by_name("eventId").unwrap().as_string::<i32>();
    let props = b.column_by_name("properties").unwrap().as_string::<i32>();
    let ips = b.column_by_name("ipAddress").unwrap().as_string::<i32>();
    let expected_digest = salted_sha256(salt, "ann@example.com");
    for r in 0..b.num_rows() {
        let p: serde_json::Value = serde_json::from_str(props.value(r)).unwrap();
        assert_eq!(
            ips.value(r).len(),
            64,
            "IP replaced by a SHA-256 hex digest"
        );
        assert!(!ips.value(r).starts_with("203.0.113"));
        match ids.value(r) {
            "p1" => {
                assert_eq!(p["amount"], 90.0);
                assert_eq!(p["currency"], "EUR");
                assert_eq!(p["originalAmount"], 100.0);
                assert_eq!(p["originalCurrency"], "USD");
                assert_eq!(p["email"], expected_digest.as_str());
            }
            "p3" => assert_eq!(
                (p["amount"].as_f64(), p["currency"].as_str()),
                (Some(40.0), Some("EUR"))
            ),
            "p4" => assert_eq!(p["email"], salted_sha256(salt, "bob@example.com")),
            other => panic!("unexpected event {other}"),
        }
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// What `redact-pii` documents it writes, computed here rather than by the plugin's own
/// code: the lowercase hex SHA-256 of the salt followed by the value.
fn salted_sha256(salt: &str, value: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{salt}{value}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn the_tracking_endpoint_runs_its_plugin_chain_before_storing() {
    let db = support::TestDb::initialized().await;
    let dir = support::plugin_dir().display().to_string();
    let server = support::start_server(&db, |raw| {
        raw.plugins.dir = dir.clone();
        raw.plugins.tracking_transforms = vec!["bot-filter".into(), "redact-pii".into()];
        raw.plugins.config.insert(
            "redact-pii".into(),
            toml::Value::Table(toml::toml! { salt = "tracking-salt-0123456789" }),
        );
    })
    .await;
    // Counters are process-wide (other tests add to them): compared with their values now.
    let counted = |name: &str, plugin: &str, direction: Option<&str>| {
        let mut labels = vec![("plugin", plugin)];
        labels.extend(direction.map(|d| ("direction", d)));
        sluice_core::metrics::value(name, &labels)
    };
    let before = [
        counted("sluice_plugin_records_total", "bot-filter", Some("in")),
        counted("sluice_plugin_records_total", "redact-pii", Some("out")),
        counted("sluice_plugin_batch_seconds", "redact-pii", None),
    ];
    let body = json!({ "batch": [
        { "eventId": "t1", "userId": "v", "sessionId": "s", "eventType": "SIGNUP", "properties": { "email": "eve@example.com" } },
        { "eventId": "t2", "userId": "c", "sessionId": "c", "eventType": "PAGE_VIEW", "context": { "userAgent": "Googlebot/2.1" } },
    ] });
    let answer = post_batch(&server, &body).await;
    assert_eq!(answer["results"][0]["status"], "stored", "{answer}");
    assert_eq!(answer["results"][1]["status"], "dropped");
    assert_eq!(answer["results"][1]["reason"], "transform");
    assert_eq!(answer["results"][1]["eventId"], "t2", "{answer}");
    let stored = db
        .store
        .collection("events")
        .find_one(doc! { "eventId": "t1" })
        .await
        .unwrap()
        .unwrap();
    let email = stored
        .get_document("properties")
        .unwrap()
        .get_str("email")
        .unwrap();
    assert_eq!(
        email,
        salted_sha256("tracking-salt-0123456789", "eve@example.com")
    );
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );
    // The plugin stage shows in /metrics (other tests of this process may add to it).
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(
        value("sluice_plugin_records_total{plugin=\"bot-filter\",direction=\"in\"}") - before[0]
            >= 2.0
    );
    assert!(
        value("sluice_plugin_records_total{plugin=\"redact-pii\",direction=\"out\"}") - before[1]
            >= 1.0
    );
    assert!(value("sluice_plugin_batch_seconds_count{plugin=\"redact-pii\"}") - before[2] >= 1.0);
    // This server's own counters: the plugin's drop is not counted as a bot.
    assert_eq!(
        value("sluice_events_rejected_total{reason=\"transform\"}"),
        1.0
    );
    assert_eq!(value("sluice_events_rejected_total{reason=\"bot\"}"), 0.0);
    server.shutdown().await;
}

#[test]
fn records_a_plugin_leaves_alone_come_back_exactly_as_they_were() {
    // A small Int64 would come back as Int32 from JSON; an untouched record is not decoded.
    let original = doc! {
        "eventId": "x", "small": 5i64, "i32": 7i32, "whole": 3.0,
        "at": bson::DateTime::from_millis(1_750_000_000_123),
        "oid": bson::oid::ObjectId::new(), "nested": { "z": 1i64, "a": [1i64, "two"] },
    };
    assert_eq!(
        bson::Bson::try_from(serde_json::json!(5)).unwrap(),
        bson::Bson::Int32(5),
        "JSON integers decode as Int32"
    );
    let noop = host()
        .load(
            &support::plugin_dir(),
            "noop",
            json!({}),
            &Grants::default(),
            None,
        )
        .unwrap();
    let out = noop
        .apply(
            vec![original.clone(), original.clone()],
            &mut Call::default(),
        )
        .unwrap();
    assert_eq!(out, vec![original.clone(), original.clone()]);

    // A record a plugin changes keeps the integer widths of the fields it left alone.
    let redact = host()
        .load(
            &support::plugin_dir(),
            "redact-pii",
            json!({ "salt": "widths-salt-0123456789" }),
            &Grants::default(),
            None,
        )
        .unwrap();
    let mut with_email = original.clone();
    with_email.insert("email", "eve@example.com");
    let out = redact
        .apply(vec![with_email], &mut Call::default())
        .unwrap();
    assert_ne!(out[0].get_str("email").unwrap(), "eve@example.com");
    assert_eq!(out[0].get("small"), Some(&bson::Bson::Int64(5)));
    assert_eq!(out[0].get("i32"), Some(&bson::Bson::Int32(7)));
    let nested = out[0].get_document("nested").unwrap();
    assert_eq!(nested.get("z"), Some(&bson::Bson::Int64(1)));
    assert_eq!(nested.get_array("a").unwrap()[0], bson::Bson::Int64(1));
}

/// A tracking server converting USD purchases to EUR (`currency-normalize`, no other
/// rate) under the failure `policy`.
async fn converting_server(db: &support::TestDb, policy: &str) -> sluice::server::ServerHandle {
    let dir = support::plugin_dir().display().to_string();
    support::start_server(db, |raw| {
        raw.plugins.dir = dir;
        raw.plugins.failure_policy = policy.into();
        raw.plugins.tracking_transforms = vec!["currency-normalize".into()];
        raw.plugins.config.insert(
            "currency-normalize".into(),
            toml::Value::Table(toml::toml! { target = "EUR"
            [rates]
            USD = 0.5 }),
        );
    })
    .await
}

#[tokio::test]
async fn a_later_copy_of_an_event_in_a_request_is_answered_as_the_first_is() {
    let db = support::TestDb::initialized().await;
    let server = converting_server(&db, "fail-run").await;
    let purchase = |id: &str, currency: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                "timestamp": 1_700_000_000_000_i64,
                "properties": { "amount": 10.0, "currency": currency } })
    };
    let mut same = purchase("x", "USD");
    same.as_object_mut().unwrap().remove("eventId");
    // Sent twice without an id (one content id), and one id sent again with other
    // content the plugin would fail: the eventId names the first, which is stored.
    let body = json!({ "batch": [
        same.clone(), same, purchase("p1", "USD"), purchase("p1", "JPY")
    ] });
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["stored", "duplicate", "stored", "duplicate"],
        "{answer}"
    );
    assert_eq!(answer["stored"], 2, "{answer}");
    assert_eq!(answer["duplicates"], 2, "{answer}");
    let stored: Vec<Document> = {
        use futures_util::TryStreamExt;
        db.store
            .collection("events")
            .find(doc! { "eventId": "p1" })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(stored.len(), 1);
    let amount = stored[0]
        .get_document("properties")
        .unwrap()
        .get_f64("amount")
        .unwrap();
    assert_eq!(amount, 5.0);
    let total = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(total, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn dead_lettered_events_are_stored_with_their_reason_not_lost() {
    let db = support::TestDb::initialized().await;
    let server = converting_server(&db, "dead-letter").await;
    let purchase = |id: &str, currency: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                "properties": { "amount": 10.0, "currency": currency } })
    };
    let body = json!({ "batch": [purchase("usd", "USD"), purchase("yen", "JPY")] });
    let answer = post_batch(&server, &body).await;
    assert_eq!(answer["results"][0]["status"], "stored", "{answer}");
    // Kept, so not to be resent: `dropped`, but told apart from a plugin's own choice,
    // with the plugin's reason, and counted as its failure.
    let failed = &answer["results"][1];
    assert_eq!(failed["status"], "dropped", "{answer}");
    assert_eq!(failed["reason"], "transform_error", "{answer}");
    assert_eq!(
        failed["error"], "transform `currency-normalize` failed: no rate for `JPY`",
        "{answer}"
    );
    for (reason, count) in [("transform_error", 1.0), ("transform", 0.0)] {
        assert_eq!(
            server_metric(
                &server,
                &format!("sluice_events_rejected_total{{reason=\"{reason}\"}}")
            )
            .await,
            count,
            "{reason}"
        );
    }
    let letters: Vec<Document> = {
        use futures_util::TryStreamExt;
        db.store
            .collection("dead_letters")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.get_str("pipeline").unwrap(), "tracking");
    assert_eq!(letter.get_str("plugin").unwrap(), "currency-normalize");
    assert_eq!(letter.get_str("reason").unwrap(), "no rate for `JPY`");
    assert_eq!(
        letter
            .get_document("record")
            .unwrap()
            .get_str("eventId")
            .unwrap(),
        "yen"
    );
    // A resend of the batch is answered the same way and keeps the letter once.
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["results"][1]["status"], "dropped", "{answer}");
    let kept = db
        .store
        .collection("dead_letters")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(kept, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn under_fail_run_the_tracking_endpoint_rejects_the_events_a_plugin_fails_and_stores_the_rest(
) {
    let db = support::TestDb::initialized().await;
    let dir = support::plugin_dir().display().to_string();
    let server = support::start_server(&db, |raw| {
        raw.plugins.dir = dir.clone();
        raw.plugins.failure_policy = "fail-run".into();
        raw.plugins.tracking_transforms = vec!["currency-normalize".into(), "hostile".into()];
        raw.plugins.config.insert(
            "currency-normalize".into(),
            toml::Value::Table(toml::toml! { target = "EUR"
            [rates]
            USD = 0.5
            XAU = 1e9 }),
        );
        raw.plugins.config.insert(
            "hostile".into(),
            toml::Value::Table(toml::toml! { mode = "panic-on-bad" }),
        );
    })
    .await;
    let event = |id: &str, currency: &str, note: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                "properties": { "amount": 10.0, "currency": currency, "note": note } })
    };
    // One event the first plugin rejects, one that makes the second trap, and good ones
    // around them: the good ones are stored, the two are rejected with their reasons.
    let batch: Vec<serde_json::Value> = (0..8)
        .map(|i| match i {
            2 => event("yen", "JPY", "fine"),
            5 => event("trap", "USD", "bad"),
            // Converted to 1e10, beyond the largest amount a client may send.
            7 => event("gold", "XAU", "fine"),
            _ => event(&format!("ok{i}"), "USD", "fine"),
        })
        .collect();
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value, path: &str| {
        client
            .post(format!("http://{}{path}", server.addr))
            .json(&body)
            .send()
    };
    let resp = post(json!({ "batch": batch }), "/v1/events/batch")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (answer["stored"].as_u64(), answer["rejected"].as_u64()),
        (Some(5), Some(3)),
        "{answer}"
    );
    assert_eq!(answer["results"][2]["status"], "rejected");
    let reason = answer["results"][2]["reason"].as_str().unwrap();
    assert!(
        reason.contains("currency-normalize") && reason.contains("no rate for `JPY`"),
        "{reason}"
    );
    assert_eq!(answer["results"][5]["status"], "rejected");
    let reason = answer["results"][5]["reason"].as_str().unwrap();
    assert!(
        reason.contains("hostile") && reason.contains("trapped"),
        "{reason}"
    );
    // What the plugin wrote to stderr (its panic's message here) is the operator's.
    assert!(
        !reason.contains("cannot take") && !reason.contains("stderr"),
        "{reason}"
    );
    let reason = answer["results"][7]["reason"].as_str().unwrap();
    assert!(
        reason.contains("invalid event") && reason.contains("properties.amount"),
        "{reason}"
    );
    // Counted as a plugin's failures, not as its drops.
    assert_eq!(
        server_metric(
            &server,
            "sluice_events_rejected_total{reason=\"transform_error\"}"
        )
        .await,
        3.0
    );
    assert_eq!(
        server_metric(
            &server,
            "sluice_events_rejected_total{reason=\"transform\"}"
        )
        .await,
        0.0
    );
    let events = db.store.collection("events");
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 5);
    assert_eq!(
        events
            .count_documents(doc! { "eventId": { "$in": ["yen", "trap", "gold"] } })
            .await
            .unwrap(),
        0
    );
    // The stored events were converted by the first plugin.
    let ok = events
        .find_one(doc! { "eventId": "ok0" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ok.get_document("properties")
            .unwrap()
            .get_str("currency")
            .unwrap(),
        "EUR"
    );

    // Alone, such an event is a 422 (not a 503 the client would retry forever).
    let resp = post(event("yen1", "JPY", "fine"), "/v1/events")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["error"], "transform_rejected", "{answer}");
    // Named by its eventId: a place in the batch the plugin was given says nothing here.
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .ends_with("failed its record (eventId `yen1`): no rate for `JPY`"),
        "{answer}"
    );
    // A batch of nothing but such events is a 400, like one of invalid events.
    let resp = post(
        json!({ "batch": [event("yen2", "JPY", "fine")] }),
        "/v1/events/batch",
    )
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    server.shutdown().await;
}

#[test]
fn overlapping_batches_get_instances_of_their_own_up_to_the_operators_number() {
    let host = host();
    for (instances, peak) in [(1, 1), (3, 3)] {
        let grants = Grants {
            instances,
            ..Grants::default()
        };
        // Each batch sleeps until its deadline (2 s), so the three calls overlap however
        // late a loaded machine starts the last one.
        let plugin = host
            .load(
                &support::plugin_dir(),
                "hostile",
                json!({ "mode": "sleep" }),
                &grants,
                Some(Limits {
                    batch_deadline_ms: 2_000,
                    ..tight().unwrap()
                }),
            )
            .unwrap();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let err = plugin.run_batch(&batch()).unwrap_err();
                    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
                });
            }
        });
        assert_eq!(plugin.peak_instances(), peak, "instances = {instances}");
        // Failed instances are discarded and their places freed: the next batch gets a
        // new instance (a leaked place would make it wait forever).
        let err = plugin.run_batch(&batch()).unwrap_err();
        assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    }
}

#[test]
fn the_operators_ceilings_lower_what_a_plugin_asks_for() {
    let host = host();
    let grants = Grants {
        max_memory_mib: Some(8),
        max_batch_deadline_ms: Some(100),
        ..Grants::default()
    };
    let load = |mode: &str| {
        host.load(
            &support::plugin_dir(),
            "hostile",
            json!({ "mode": mode }),
            &grants,
            tight(),
        )
        .unwrap()
    };
    assert_eq!(load("ok").limits().memory_mib, 8, "16 asked, 8 allowed");
    let err = load("memory").run_batch(&batch()).unwrap_err();
    assert_eq!(
        err,
        PluginError::Memory {
            plugin: "hostile".into(),
            mib: 8
        }
    );
    let err = load("loop").run_batch(&batch()).unwrap_err();
    assert_eq!(
        err,
        PluginError::Deadline {
            plugin: "hostile".into(),
            ms: 100
        }
    );
}

#[test]
fn a_batch_too_big_for_the_cap_is_split_and_a_trap_is_narrowed_to_the_records_that_cause_it() {
    let host = host();
    let dir = support::plugin_dir();
    // 4,000 records of 1 KB do not fit a 3 MiB plugin at once; halves of halves do.
    let small = Some(Limits {
        memory_mib: 3,
        batch_deadline_ms: 5_000,
        fuel: None,
    });
    let noop = host
        .load(&dir, "noop", json!({}), &Grants::default(), small)
        .unwrap();
    let big: Vec<Document> = (0..4000)
        .map(|i| doc! { "eventId": format!("e{i}"), "pad": "x".repeat(1000) })
        .collect();
    assert!(
        matches!(noop.run_batch(&big), Err(PluginError::Memory { .. })),
        "the whole batch is over the cap"
    );
    assert_eq!(
        noop.apply(big.clone(), &mut Call::default()).unwrap(),
        big,
        "split, in order, all kept"
    );

    let picky = hostile(&host, "panic-on-bad").with_policy(FailurePolicy::DeadLetter);
    let records: Vec<Document> = (0..8)
        .map(|i| doc! { "eventId": format!("r{i}"), "kind": if i == 5 { "bad" } else { "good" } })
        .collect();
    let mut call = Call::default();
    let out = picky.apply(records.clone(), &mut call).unwrap();
    let letters = std::mem::take(&mut call.letters);
    let mut expected = records.clone();
    expected.remove(5);
    assert_eq!(out, expected, "only the record that traps is held back");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0.get_str("eventId").unwrap(), "r5");
    assert!(letters[0].1.contains("trapped"), "{}", letters[0].1);

    // Calls running at once (tracking requests share their transforms) each get their
    // own letters, never another call's.
    std::thread::scope(|s| {
        for t in 0..6 {
            let picky = &picky;
            s.spawn(move || {
                let records: Vec<Document> = (0..4)
                    .map(|i| doc! { "eventId": format!("t{t}-{i}"), "kind": if i == t % 4 { "bad" } else { "good" } })
                    .collect();
                let mut call = Call::default();
                let out = picky.apply(records, &mut call).unwrap();
                let letters = std::mem::take(&mut call.letters);
                assert_eq!(out.len(), 3);
                let ids: Vec<&str> = letters.iter().map(|(d, _)| d.get_str("eventId").unwrap()).collect();
                assert_eq!(ids, vec![format!("t{t}-{}", t % 4)]);
            });
        }
    });

    // Under skip-batch the same: only the record that traps is dropped.
    let skipper = hostile(&host, "panic-on-bad").with_policy(FailurePolicy::SkipBatch);
    let mut call = Call::default();
    let out = skipper.apply(records.clone(), &mut call).unwrap();
    assert_eq!(out, expected, "only the record that traps is dropped");
    assert!(call.letters.is_empty());
    let skipped: Vec<&str> = call
        .skipped
        .iter()
        .map(|(d, _)| d.get_str("eventId").unwrap())
        .collect();
    assert_eq!(skipped, ["r5"]);
    assert!(call.skipped[0].1.contains("trapped"), "{:?}", call.skipped);
    assert_eq!(skipper.skipped_records(), 1);

    // A caller's time limit bounds the narrowing too (the tracking endpoint passes its
    // write deadline). Spent already, nothing is split, and since which records fail is
    // unknown, the batch fails as not their fault: nothing is set aside, good records are
    // neither dropped nor dead-lettered with the bad one (the client resends).
    let records: Vec<Document> = (0..8)
        .map(|i| doc! { "eventId": format!("q{i}"), "kind": if i == 5 { "bad" } else { "good" } })
        .collect();
    for t in [&picky, &skipper] {
        let mut call = Call::until(Some(std::time::Instant::now()));
        let err = t.apply(records.clone(), &mut call).unwrap_err();
        assert!(!err.caused_by_input, "{err}");
        assert!(
            err.reason
                .contains("finding which of 8 records fail ran out of time"),
            "{err}"
        );
        assert!(call.letters.is_empty() && call.skipped.is_empty());
    }
    assert_eq!(
        skipper.skipped_records(),
        1,
        "nothing more counted as skipped"
    );

    // Narrowing a batch that fails everywhere stops once it has spent its budget (three
    // deadlines, here 900 ms): the parts still failing are dead-lettered whole, not one
    // call per record.
    let panicky = hostile_slow(&host, "panic").with_policy(FailurePolicy::DeadLetter);
    let records: Vec<Document> = (0..8192)
        .map(|i| doc! { "eventId": format!("p{i}") })
        .collect();
    let mut call = Call::default();
    let out = panicky.apply(records, &mut call).unwrap();
    let letters = std::mem::take(&mut call.letters);
    assert!(out.is_empty());
    assert_eq!(letters.len(), 8192, "every record is kept, none lost");
    // Unbounded, this is 16,383 calls, each on a fresh instance, and every letter alone.
    let together = letters
        .iter()
        .filter(|(_, reason)| reason.contains("records kept together"))
        .count();
    assert!(together > 4096, "{together} of 8192 dead-lettered in parts");
    // For a caller with a time limit of its own (the tracking endpoint), narrowing
    // stopped by the plugin's budget fails the batch as not the records' fault too.
    let records: Vec<Document> = (0..8192)
        .map(|i| doc! { "eventId": format!("p{i}") })
        .collect();
    let mut call = Call::until(Some(
        std::time::Instant::now() + std::time::Duration::from_secs(600),
    ));
    let err = panicky.apply(records, &mut call).unwrap_err();
    assert!(!err.caused_by_input, "{err}");
    assert!(err.reason.contains("ran out of time"), "{err}");
}

/// Posts one event to `server`; the status and the JSON answer.
async fn post_event(
    server: &sluice::server::ServerHandle,
    event: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/events", server.addr))
        .json(event)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Posts `body` to the batch endpoint of `server`; the answer, which must be a 200.
async fn post_batch(
    server: &sluice::server::ServerHandle,
    body: &serde_json::Value,
) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

/// A tracking server whose events go through the `hostile` plugin in `mode`.
async fn hostile_tracking(
    db: &support::TestDb,
    mode: &str,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice::server::ServerHandle {
    let dir = support::plugin_dir().display().to_string();
    let mut config = toml::Table::new();
    config.insert("mode".into(), toml::Value::String(mode.into()));
    support::start_server(db, |raw| {
        raw.plugins.dir = dir;
        raw.plugins.tracking_transforms = vec!["hostile".into()];
        raw.plugins
            .config
            .insert("hostile".into(), toml::Value::Table(config));
        adjust(raw);
    })
    .await
}

#[tokio::test]
async fn events_a_plugin_renames_are_not_stored_behind_the_clients_back() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "rename-id", |_| {}).await;
    let body =
        json!({ "eventId": "r1", "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW" });
    let (status, answer) = post_event(&server, &body).await;
    // Rejected, not dropped: the output may be the event under another id, and a client
    // told `dropped` would take it as the plugin's choice.
    assert_eq!(status, 422);
    assert_eq!(answer["error"], "transform_rejected", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("must keep eventId"),
        "{answer}"
    );
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(
        stored, 0,
        "neither the event nor its renamed output is stored"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn under_skip_batch_the_tracking_endpoint_rejects_only_the_events_a_plugin_fails() {
    let db = support::TestDb::initialized().await;
    let dir = support::plugin_dir().display().to_string();
    let server = support::start_server(&db, |raw| {
        raw.plugins.dir = dir.clone();
        raw.plugins.failure_policy = "skip-batch".into();
        raw.plugins.tracking_transforms = vec!["currency-normalize".into()];
        raw.plugins.config.insert(
            "currency-normalize".into(),
            toml::Value::Table(toml::toml! { target = "EUR"
            [rates]
            USD = 0.5 }),
        );
    })
    .await;
    let event = |id: &str, currency: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                "properties": { "amount": 10.0, "currency": currency } })
    };
    let body = json!({ "batch": [event("k1", "USD"), event("k2", "JPY"), event("k3", "USD")] });
    let answer = post_batch(&server, &body).await;
    let statuses: Vec<&str> = (0..3)
        .map(|i| answer["results"][i]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["stored", "rejected", "stored"], "{answer}");
    let reason = answer["results"][1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("currency-normalize") && reason.contains("no rate for `JPY`"),
        "{reason}"
    );
    use futures_util::TryStreamExt;
    let events = db.store.collection("events");
    let mut ids: Vec<String> = events
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_str("eventId").unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["k1", "k3"]);
    server.shutdown().await;
}

#[tokio::test]
async fn an_event_skipped_under_an_id_a_plugin_changed_is_rejected_not_dropped() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "rename-id", |raw| {
        raw.plugins.failure_policy = "skip-batch".into();
        raw.plugins.tracking_transforms = vec!["hostile".into(), "currency-normalize".into()];
        raw.plugins.config.insert(
            "currency-normalize".into(),
            toml::Value::Table(toml::toml! { target = "EUR"
            [rates]
            USD = 0.5 }),
        );
    })
    .await;
    // The second plugin skips the event, under the id the first gave it: the endpoint
    // cannot tell it from an event dropped on purpose, so the client must resend.
    let event = json!({ "eventId": "y1", "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                        "properties": { "amount": 10.0, "currency": "JPY" } });
    let (status, answer) = post_event(&server, &event).await;
    assert_eq!(status, 422);
    assert_eq!(answer["error"], "transform_rejected", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("returned or skipped 1 record(s) under an eventId"),
        "{answer}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn what_a_plugin_wrote_to_stderr_before_it_trapped_is_kept_from_tracking_clients() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "panic-on-bad", |raw| {
        raw.plugins.failure_policy = "dead-letter".into();
    })
    .await;
    let event = |id: &str, kind: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK",
                "properties": { "kind": kind } })
    };
    let answer = post_batch(
        &server,
        &json!({ "batch": [event("d1", "good"), event("d2", "bad")] }),
    )
    .await;
    assert_eq!(answer["results"][1]["status"], "dropped", "{answer}");
    let error = answer["results"][1]["error"].as_str().unwrap();
    assert!(error.contains("trapped"), "{error}");
    assert!(
        !error.contains("cannot take") && !error.contains("stderr"),
        "{error}"
    );
    // The dead letter keeps it, for the operator.
    let letter = db
        .store
        .collection("dead_letters")
        .find_one(doc! { "pipeline": "tracking" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        letter
            .to_string()
            .contains("a record the plugin cannot take"),
        "{letter}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn under_skip_batch_an_event_a_plugin_traps_on_is_rejected_alone() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "panic-on-bad", |raw| {
        raw.plugins.failure_policy = "skip-batch".into();
    })
    .await;
    let event = |id: &str, kind: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK",
                "properties": { "kind": kind } })
    };
    let body = json!({ "batch": (0..6)
        .map(|i| event(&format!("t{i}"), if i == 4 { "bad" } else { "good" }))
        .collect::<Vec<_>>() });
    let answer = post_batch(&server, &body).await;
    let statuses: Vec<&str> = (0..6)
        .map(|i| answer["results"][i]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["stored", "stored", "stored", "stored", "rejected", "stored"],
        "{answer}"
    );
    let reason = answer["results"][4]["reason"].as_str().unwrap();
    assert!(reason.contains("trapped"), "{reason}");
    assert!(
        !reason.contains("cannot take") && !reason.contains("stderr"),
        "{reason}"
    );
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 5);
    server.shutdown().await;
}

#[tokio::test]
async fn an_event_a_plugin_made_unstorable_is_rejected_alone() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "nul-key-on-bad", |_| {}).await;
    let event = |id: &str, tag: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "properties": { "tag": tag } })
    };
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .json(&json!({ "batch": [event("n1", "fine"), event("n2", "bad"), event("n3", "fine")] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["stored"], 2, "{answer}");
    assert_eq!(answer["results"][1]["status"], "rejected", "{answer}");
    assert!(
        answer["results"][1]
            .to_string()
            .contains("must not contain a NUL"),
        "{answer}"
    );
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn plugin_output_a_client_could_not_send_is_rejected_by_event() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "break-by-tag", |_| {}).await;
    let event = |id: &str, tag: &str| {
        json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "properties": { "tag": tag } })
    };
    let batch = [
        event("b1", "fine"),
        event("b2", "bloat"),
        event("b3", "dollar"),
        event("b4", "retype"),
        event("b5", "fine"),
        event("b6", "dated"),
    ];
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["stored"], 3, "{answer}");
    for (i, says) in [
        (1, "bytes as stored"),
        (2, "metadata.context.$where"),
        (3, "not an event"),
    ] {
        let result = &answer["results"][i];
        assert_eq!(result["status"], "rejected", "{answer}");
        assert!(result.to_string().contains(says), "{i}: {result}");
    }
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 3);
    // A date a plugin adds (as `{"$date": ..}`) is stored as a date, not refused as a
    // `$` property name.
    let dated = db
        .store
        .collection("events")
        .find_one(doc! { "eventId": "b6" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        dated
            .get_document("properties")
            .unwrap()
            .get_datetime("seenAt")
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap(),
        "2026-01-02T03:04:05Z"
    );
    server.shutdown().await;
}

#[test]
fn example_plugins_leave_what_they_do_not_handle_as_it_was() {
    let host = host();
    let dir = support::plugin_dir();
    let load = |name: &str, config: serde_json::Value| {
        host.load(&dir, name, config, &Grants::default(), None)
    };
    // An empty marker would match every user agent: refused.
    let Err(err) = load("bot-filter", json!({ "extra_markers": ["monitor", " "] })) else {
        panic!("an empty marker was accepted");
    };
    assert!(err.to_string().contains("empty marker"), "{err}");
    // A purchase without an amount passes unchanged (no `properties: null` added).
    let convert = load(
        "currency-normalize",
        json!({ "target": "EUR", "rates": { "USD": 0.5 } }),
    )
    .unwrap();
    let bare = doc! { "eventId": "b", "eventType": "PURCHASE" };
    assert_eq!(
        convert
            .apply(vec![bare.clone()], &mut Call::default())
            .unwrap(),
        [bare]
    );
    // Redaction leaves absent fields absent and nulls null.
    let redact = load("redact-pii", json!({ "salt": "pepper-pepper-pepper" })).unwrap();
    let nulls = doc! { "eventId": "n", "email": null, "metadata": { "ipAddress": null } };
    assert_eq!(
        redact
            .apply(vec![nulls.clone()], &mut Call::default())
            .unwrap(),
        [nulls]
    );
}

#[test]
fn a_plugin_that_cannot_start_says_why() {
    let host = host();
    let start = |mode: &str| match host.load(
        &support::plugin_dir(),
        "hostile",
        json!({ "mode": mode }),
        &Grants::default(),
        tight(),
    ) {
        Ok(_) => panic!("{mode}: loaded"),
        Err(e) => e.to_string(),
    };
    // A panic in `configure`: its message, as for a batch's trap.
    let err = start("configure-panic");
    assert!(
        err.contains("could not start an instance") && err.contains("this plugin cannot start"),
        "{err}"
    );
    // A `configure` that never returns: its deadline, not a batch's.
    let err = start("configure-loop");
    assert!(
        err.contains(
            "could not start an instance: its `configure` ran past the deadline of 300 ms"
        ),
        "{err}"
    );
    // A mode the plugin does not have: said, with those it has.
    let err = start("xyz");
    assert!(err.contains("unknown mode `xyz`: one of ok, loop"), "{err}");
}

/// A call takes at most 1,000 records, each with its own deadline: an export's batch of
/// 8,192 rows is handed over in parts, as `plugin test` times a plugin (1,000 records).
#[test]
fn a_big_batch_is_handed_to_a_plugin_in_parts_of_a_thousand() {
    let host = host();
    let counting = hostile(&host, "batch-size");
    let records: Vec<Document> = (0..2_500)
        .map(|i| doc! { "eventId": format!("r{i}") })
        .collect();
    let out = counting.apply(records, &mut Call::default()).unwrap();
    assert_eq!(out.len(), 2_500);
    let sizes: Vec<i64> = out
        .iter()
        .map(|d| {
            d.get_i64("batchSize")
                .or_else(|_| d.get_i32("batchSize").map(i64::from))
                .unwrap()
        })
        .collect();
    assert!(
        sizes[..2_000].iter().all(|&n| n == 1_000),
        "{:?}",
        &sizes[..3]
    );
    assert!(sizes[2_000..].iter().all(|&n| n == 500));
    // In order, each record once.
    assert_eq!(out[1_999].get_str("eventId").unwrap(), "r1999");
    assert_eq!(out[2_499].get_str("eventId").unwrap(), "r2499");
}

#[test]
fn what_earlier_batches_left_in_an_instance_is_not_blamed_on_the_next_batch() {
    let host = host();
    // Each record leaks 3 MiB of the 16 MiB cap: an instance serves a few one-record
    // batches, then the next one hits the cap on it, though it fits in a fresh instance.
    let leaky = hostile(&host, "leak");
    for i in 0..12 {
        let record = doc! { "eventId": format!("e{i}") };
        let out = leaky
            .apply(vec![record.clone()], &mut Call::default())
            .unwrap_or_else(|e| panic!("batch {i}: {e}"));
        assert_eq!(out, [record]);
    }
    // A batch that does not fit a fresh instance either is still its own failure.
    let big: Vec<Document> = (0..8)
        .map(|i| doc! { "eventId": format!("b{i}") })
        .collect();
    let err = leaky.run_batch(&big).unwrap_err();
    assert!(matches!(err, PluginError::Memory { .. }), "{err}");
}

#[test]
fn a_deadline_is_no_reason_to_drop_or_dead_letter_a_batch() {
    // A deadline depends on the load of the moment, not on the records: under every
    // policy the batch fails, so its records are processed again instead of lost.
    let host = host();
    for policy in [FailurePolicy::SkipBatch, FailurePolicy::DeadLetter] {
        let slow = hostile_slow(&host, "sleep").with_policy(policy);
        let mut call = Call::default();
        let err = slow.apply(batch(), &mut call).unwrap_err();
        let letters = std::mem::take(&mut call.letters);
        assert!(!err.caused_by_input, "{policy:?}: {err}");
        assert!(
            err.to_string()
                .contains("exceeded its deadline of 300 ms for a batch"),
            "{policy:?}: {err}"
        );
        assert!(letters.is_empty(), "{policy:?}: {letters:?}");
        assert_eq!(slow.skipped_records(), 0, "{policy:?}");
    }
}

#[tokio::test]
async fn a_deadline_under_skip_batch_is_answered_503_not_dropped() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "sleep", |raw| {
        raw.plugins.failure_policy = "skip-batch".into();
    })
    .await;
    let event = json!({ "eventId": "slow", "userId": "v", "sessionId": "s", "eventType": "CLICK" });
    let (status, body) = post_event(&server, &event).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "transform_failed", "{body}");
    assert_eq!(
        server_metric(
            &server,
            "sluice_events_rejected_total{reason=\"transform_error\"}"
        )
        .await,
        1.0
    );
    server.shutdown().await;
}

/// One series of a tracking server's `/metrics`.
async fn server_metric(server: &sluice::server::ServerHandle, series: &str) -> f64 {
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test]
async fn requests_beyond_the_plugins_instances_wait_their_turn_then_are_answered_overloaded() {
    let db = support::TestDb::initialized().await;
    let server = hostile_tracking(&db, "sleep", |raw| {
        raw.plugins.instances = 1;
        raw.tracking.write_timeout_seconds = 1;
    })
    .await;
    let post = |id: &'static str| {
        let url = format!("http://{}/v1/events", server.addr);
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK" }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // Whichever request gets the only instance holds it until its plugin's deadline
    // (2 s); the other waits its write deadline (1 s) and is answered overloaded. (The
    // second is sent a little later, but on a loaded machine it may still come first.)
    let first = tokio::spawn(post("w1"));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = post("w2").await;
    let first = first.await.unwrap();
    let mut answers: Vec<(u16, String)> = [first, second]
        .into_iter()
        .map(|(status, body)| (status, body["error"].as_str().unwrap_or("").to_string()))
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            (503, "overloaded".to_string()),
            (503, "transform_failed".to_string())
        ]
    );
    for reason in ["transform_busy", "transform_error"] {
        let series = format!("sluice_events_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(server_metric(&server, &series).await, 1.0, "{reason}");
    }
    server.shutdown().await;
}

#[test]
fn a_batch_out_of_fuel_is_split_until_its_parts_fit() {
    let metered = PluginHost::new(true).unwrap();
    let src = support::plugin_dir();
    let noop = |fuel: u64| {
        metered
            .load(
                &src,
                "noop",
                json!({}),
                &Grants::default(),
                Some(Limits {
                    memory_mib: 16,
                    batch_deadline_ms: 60_000,
                    fuel: Some(fuel),
                }),
            )
            .unwrap()
    };
    let records = |n: usize| -> Vec<Document> {
        (0..n)
            .map(|i| doc! { "eventId": format!("e{i}"), "payload": "x".repeat(200) })
            .collect()
    };
    // The least budget (to a factor of two) that takes a batch of two records.
    let mut fuel = 10_000u64;
    while noop(fuel).run_batch(&records(2)).is_err() {
        fuel *= 2;
        assert!(fuel < 1 << 40, "noop never fit");
    }
    // A batch of 1,024 does not fit in it whole, and is split until its parts do.
    let big = records(1_024);
    let err = noop(fuel).run_batch(&big).unwrap_err();
    assert!(matches!(err, PluginError::Fuel { .. }), "{err}");
    let out = noop(fuel).apply(big.clone(), &mut Call::default()).unwrap();
    assert_eq!(out, big);
}

#[test]
fn a_failed_record_is_named_by_its_place_in_the_whole_batch_and_its_event_id() {
    let metered = PluginHost::new(true).unwrap();
    let convert = |fuel: u64| {
        metered
            .load(
                &support::plugin_dir(),
                "currency-normalize",
                json!({ "target": "EUR", "rates": { "USD": 0.5 } }),
                &Grants::default(),
                Some(Limits {
                    memory_mib: 16,
                    batch_deadline_ms: 60_000,
                    fuel: Some(fuel),
                }),
            )
            .ok()
    };
    let purchases = |n: usize, yen_at: usize| -> Vec<Document> {
        (0..n)
            .map(|i| {
                let currency = if i == yen_at { "JPY" } else { "USD" };
                doc! { "eventId": format!("e{i}"), "eventType": "PURCHASE",
                "properties": { "amount": 10.0, "currency": currency } }
            })
            .collect()
    };
    // A budget for about two records: a batch of 16 is split into small parts.
    let mut fuel = 10_000u64;
    // (Its `configure` runs on the same budget.)
    while convert(fuel).is_none_or(|c| c.run_batch(&purchases(2, 99)).is_err()) {
        fuel *= 2;
        assert!(fuel < 1 << 40, "never fit");
    }
    let err = convert(fuel)
        .unwrap()
        .apply(purchases(16, 11), &mut Call::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("failed record 12 of 16 (eventId `e11`): no rate for `JPY`"),
        "{err}"
    );
}

#[test]
fn fuel_budgets_and_the_clocks_grant_are_enforced() {
    use sha2::Digest;
    let src = support::plugin_dir();
    let limits = |fuel: Option<u64>| {
        Some(Limits {
            memory_mib: 16,
            batch_deadline_ms: 60_000,
            fuel,
        })
    };
    // Fuel: a plugin that never returns runs out of its budget, whatever its deadline.
    let metered = PluginHost::new(true).unwrap();
    let looping = metered
        .load(
            &src,
            "hostile",
            json!({ "mode": "loop" }),
            &Grants::default(),
            limits(Some(50_000_000)),
        )
        .unwrap();
    let err = looping.run_batch(&batch()).unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::Fuel {
                fuel: 50_000_000,
                ..
            }
        ),
        "{err}"
    );
    // A budget large enough for the work lets the plugin do it.
    let noop = metered
        .load(
            &src,
            "noop",
            json!({}),
            &Grants::default(),
            limits(Some(1_000_000_000)),
        )
        .unwrap();
    assert_eq!(noop.run_batch(&batch()).unwrap().records, batch());
    // A host that meters nothing refuses a fuel limit when the plugin is loaded.
    let Err(err) = host().load(&src, "noop", json!({}), &Grants::default(), limits(Some(1))) else {
        panic!("a fuel limit on a host without fuel was loaded");
    };
    assert!(
        err.to_string().contains("meters no fuel")
            && err.to_string().contains("`[plugins] fuel = true`"),
        "{err}"
    );

    // Clocks: frozen, unless the manifest asks for them and the operator grants them.
    let seen = |t: &sluice_plugins::WasmTransform| {
        let out = t.run_batch(&batch()).unwrap().records;
        let n = |k: &str| match out[0].get(k) {
            Some(bson::Bson::Int64(n)) => *n,
            Some(bson::Bson::Int32(n)) => i64::from(*n),
            other => panic!("{k}: {other:?}"),
        };
        (n("wallMs"), n("movedMs"))
    };
    let granted = Grants {
        clocks: true,
        ..Default::default()
    };
    let unasked = host()
        .load(&src, "hostile", json!({ "mode": "clock" }), &granted, None)
        .unwrap();
    assert_eq!(
        seen(&unasked),
        (0, 0),
        "not asked for: frozen even when granted"
    );
    let dir = scratch_dir();
    let bytes = std::fs::read(src.join("hostile.wasm")).unwrap();
    std::fs::write(dir.join("timed.wasm"), &bytes).unwrap();
    std::fs::write(
        dir.join("timed.toml"),
        format!(
            "name = \"timed\"\nversion = \"0.1.0\"\nwasm = \"timed.wasm\"\nsha256 = \"{:x}\"\npermissions = [\"clocks\"]\n",
            sha2::Sha256::digest(&bytes)
        ),
    )
    .unwrap();
    let Err(err) = host().load(
        &dir,
        "timed",
        json!({ "mode": "clock" }),
        &Grants::default(),
        None,
    ) else {
        panic!("a plugin asking for clocks was loaded without the grant");
    };
    assert!(err.to_string().contains("has not granted"), "{err}");
    let timed = host()
        .load(&dir, "timed", json!({ "mode": "clock" }), &granted, None)
        .unwrap();
    let (wall, moved) = seen(&timed);
    let now = chrono::Utc::now().timestamp_millis();
    assert!((now - wall).abs() < 60_000, "{wall} vs {now}");
    assert!(moved >= 50, "{moved}");
}

/// `plugin install` of another build while `serve` runs: the tracking endpoint keeps the
/// build it started with, and says so once, naming both, while the process's scheduled
/// runs would load the new one.
#[tokio::test]
async fn the_tracking_endpoint_says_when_another_build_of_its_plugin_is_installed() {
    let db = support::TestDb::initialized().await;
    let dir = scratch_dir();
    std::fs::copy(
        support::plugin_dir().join("noop.wasm"),
        dir.join("noop.wasm"),
    )
    .unwrap();
    let sha = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(dir.join("noop.wasm")).unwrap())
    );
    let manifest = |version: &str, sha: &str| {
        std::fs::write(
            dir.join("noop.toml"),
            format!("name = \"noop\"\nversion = \"{version}\"\nwasm = \"noop.wasm\"\nsha256 = \"{sha}\"\n"),
        )
        .unwrap()
    };
    manifest("1.0.0", &sha);
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    let plugins = dir.display().to_string();
    let server = support::start_server(&db, |raw| {
        raw.plugins.dir = plugins;
        raw.plugins.tracking_transforms = vec!["noop".into()];
        raw.scheduler.reload_seconds = 1;
    })
    .await;
    let said = |logged: &support::Logged| {
        logged
            .text()
            .lines()
            .filter(|l| l.contains("the tracking endpoint runs plugin"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // The same build installed again: nothing to say.
    manifest("1.0.0", &sha);
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    assert!(said(&logged).is_empty(), "{}", logged.text());
    let other = "ab".repeat(32);
    manifest("2.0.0", &other);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while said(&logged).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Said once, however often it is looked at.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    drop(guard);
    let lines = said(&logged);
    assert_eq!(lines.len(), 1, "{}", logged.text());
    assert!(
        lines[0].contains(&format!("runs plugin `noop` 1.0.0 (sha256 {})", &sha[..12]))
            && lines[0].contains("but `noop` 2.0.0 (sha256 abababababab) is installed")
            && lines[0].contains("until `sluice serve` restarts"),
        "{}",
        lines[0]
    );
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn what_a_plugin_prints_is_logged_without_its_control_characters() {
    let host = host();
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    let forger = hostile(&host, "print-forged");
    assert_eq!(forger.run_batch(&batch()).unwrap().records, batch());
    drop(guard);
    let text = logged.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR sluice: forged"))
        .collect();
    // From stdout and from stderr for each record, each on a line of its own.
    assert_eq!(lines.len(), 2 * batch().len(), "{text}");
    for line in lines {
        assert!(
            line.contains("hello 2026-01-01T00:00:00Z ERROR") && line.contains("stream="),
            "{line:?}"
        );
    }
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
}

#[test]
fn a_plugin_leaking_wasi_resources_fails_naming_the_limit() {
    let host = host();
    let leaker = hostile(&host, "pollables");
    let err = leaker.run_batch(&batch()).unwrap_err();
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("as many WASI resources at once as an instance may (1000 entries"),
        "{err}"
    );
    // The host goes on: a well-behaved plugin runs beside it.
    assert_eq!(
        hostile(&host, "ok").run_batch(&batch()).unwrap().records,
        batch()
    );
}

#[test]
fn limits_the_operator_s_ceilings_lower_are_said() {
    let host = host();
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    let grants = Grants {
        max_memory_mib: Some(64),
        max_batch_deadline_ms: Some(2_000),
        ..Grants::default()
    };
    let load = |limits: Limits| {
        host.load(
            &support::plugin_dir(),
            "hostile",
            json!({ "mode": "ok" }),
            &grants,
            Some(limits),
        )
        .unwrap()
    };
    load(Limits {
        memory_mib: 1_000,
        batch_deadline_ms: 5_000,
        ..tight().unwrap()
    });
    let text = logged.text();
    assert!(
        text.contains("`memory_mib` = 1000 is above the operator's ceiling")
            && text.contains("64 is used")
            && text.contains("`batch_deadline_ms` = 5000 is above")
            && text.contains("2000 is used"),
        "{text}"
    );
    // Within them: nothing to say.
    load(Limits {
        memory_mib: 32,
        batch_deadline_ms: 1_000,
        ..tight().unwrap()
    });
    drop(guard);
    assert_eq!(
        logged
            .text()
            .matches("is above the operator's ceiling")
            .count(),
        2
    );
}
