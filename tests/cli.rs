//! The `sluice` binary's configuration commands, run as a user would run them.

use std::process::Command;

mod support;

fn sluice() -> Command {
    let mut cmd = support::sluice_command();
    // Nor a `./sluice.toml` of the checkout (the README suggests one): the commands run
    // in an empty folder, so one without `--config` takes the embedded defaults.
    static EMPTY: std::sync::LazyLock<std::path::PathBuf> = std::sync::LazyLock::new(|| {
        let dir = std::env::temp_dir().join(format!("sluice-cli-cwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    cmd.current_dir(&*EMPTY);
    cmd
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A configuration file that points `sluice` at the test database `db`.
fn db_config(db: &support::TestDb) -> std::path::PathBuf {
    write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n",
            support::mongo_uri(),
            db.name
        ),
    )
}

/// [`sluice_with`], which must succeed: its stdout.
async fn sluice_ok(config: &std::path::Path, args: &[&str]) -> String {
    let out = sluice_with(config, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A page view of `/page` by visitor `user` in `session` at `ts`, stored then too.
fn page_view(
    id: &str,
    user: &str,
    session: &str,
    page: &str,
    ts: bson::DateTime,
) -> sluice_core::model::Event {
    sluice_core::model::Event {
        id: None,
        event_id: id.into(),
        user_id: user.into(),
        session_id: session.into(),
        event_type: sluice_core::model::EventType::PageView,
        timestamp: ts,
        properties: bson::doc! {},
        metadata: Default::default(),
        page_url: Some(page.into()),
        referrer: None,
        duration: None,
        created_at: ts,
        updated_at: ts,
    }
}

/// `sluice --config CONFIG ARGS...`, off the test's runtime.
async fn sluice_with(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        sluice()
            .arg("--config")
            .arg(&config)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// `sluice import run NAME` with `config`, off the test's runtime.
async fn import_run(config: &std::path::Path, name: &str) -> std::process::Output {
    sluice_with(config, &["import", "run", name]).await
}

#[test]
fn a_database_that_does_not_answer_is_said_in_one_short_line() {
    // Nothing listens on port 1: the driver's error repeats each server's error with its
    // debug fields, and the error chain printed it twice.
    let config = write_temp(
        "sluice.toml",
        "[mongodb]\nuri = \"mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300\"\ndatabase = \"unreachable\"\n",
    );
    let out = sluice()
        .env_remove("SLUICE_MONGODB_URI")
        .arg("--config")
        .arg(&config)
        .args(["jobs", "history"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database `unreachable`: cannot connect to MongoDB: ")
            && err.contains("127.0.0.1:1")
            && err.contains("Connection refused"),
        "{err}"
    );
    assert!(
        err.matches("Connection refused").count() == 1
            && !err.contains("Kind:")
            && !err.contains("labels:")
            && !err.contains("source: None"),
        "{err}"
    );
}

#[tokio::test]
async fn running_a_job_that_does_not_exist_leaves_no_run_record() {
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[schedules]]\nname = \"nightly\"\ntype = \"EVENT_DATA\"\ncron = \"0 0 2 * * *\"\n",
    );
    std::fs::write(&config, text).unwrap();
    for (args, says) in [
        (
            ["jobs", "run", "no-such-feed"],
            "no integration config `no-such-feed`",
        ),
        // An export schedule's name without its prefix: the way to run it is said.
        (
            ["jobs", "run", "nightly"],
            "`nightly` is an export schedule: run it as `export:nightly`",
        ),
        (
            ["import", "run", "no-such-feed"],
            "no integration config `no-such-feed`",
        ),
        (
            ["jobs", "run", "export:no-such-export"],
            "no export schedule `no-such-export`",
        ),
    ] {
        let out = sluice_with(&config, &args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let runs = db
        .store
        .collection("scheduled_runs")
        .count_documents(bson::doc! {})
        .await
        .unwrap();
    assert_eq!(runs, 0);
}

#[tokio::test]
async fn logs_written_to_a_file_or_pipe_carry_no_colour_codes() {
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let dest = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4().simple()));
    let out = sluice_with(
        &config,
        &[
            "export",
            "run",
            "event-data",
            "--dest",
            dest.to_str().unwrap(),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("export started"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("is not over"));
    // A window reaching today says its partition is not final.
    let today = chrono::Utc::now().date_naive().to_string();
    let out = sluice_with(
        &config,
        &[
            "export",
            "run",
            "event-data",
            "--to",
            &today,
            "--dest",
            dest.to_str().unwrap(),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("today ({today}) is not over")),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(dest);
}

#[tokio::test]
async fn jobs_history_takes_a_bare_config_name_like_jobs_run() {
    let db = support::TestDb::initialized().await;
    let now = bson::DateTime::now();
    let runs = db.store.collection("scheduled_runs");
    for (id, job) in [
        ("integration:shop@manual-1", "integration:shop"),
        ("export:daily@2026-01-01T00:00:00Z", "export:daily"),
    ] {
        runs.insert_one(bson::doc! {
            "_id": id, "job": job, "status": "COMPLETED", "owner": "cli",
            "scheduledFor": now, "result": "fine",
        })
        .await
        .unwrap();
    }
    let config = db_config(&db);
    for name in ["shop", "integration:shop"] {
        let out = sluice_with(&config, &["jobs", "history", name]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("integration:shop@manual-1"),
            "{name}: {stdout}"
        );
        assert!(!stdout.contains("export:daily"), "{name}: {stdout}");
    }
    // A name with no run says so, instead of printing nothing.
    let out = sluice_with(&config, &["jobs", "history", "nosuch"]).await;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no run of `integration:nosuch` is recorded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A RUNNING run whose process died (its lease lapsed) says so; a live one does not.
    for (id, lease_ms) in [
        ("integration:dead@manual-1", -60_000),
        ("integration:live@manual-1", 60_000),
    ] {
        runs.insert_one(bson::doc! {
            "_id": id, "job": id.split('@').next().unwrap(), "status": "RUNNING", "owner": "cli",
            "scheduledFor": now,
            "expiresAt": bson::DateTime::from_millis(now.timestamp_millis() + lease_ms),
        })
        .await
        .unwrap();
    }
    for (name, lapsed) in [("dead", true), ("live", false)] {
        let out = sluice_with(&config, &["jobs", "history", name]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.contains("lease lapsed at"),
            lapsed,
            "{name}: {stdout}"
        );
    }
    // One a shutdown handed back (its lease set to 1970) says when it was handed back.
    let back = bson::DateTime::from_millis(now.timestamp_millis() - 5_000);
    runs.insert_one(bson::doc! {
        "_id": "integration:back@manual-1", "job": "integration:back", "status": "RUNNING",
        "owner": "cli", "scheduledFor": now, "expiresAt": bson::DateTime::from_millis(0),
        "handedBack": true, "handedBackAt": back,
    })
    .await
    .unwrap();
    let out = sluice_with(&config, &["jobs", "history", "back"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "handed back at {}",
            back.try_to_rfc3339_string().unwrap()
        )) && !stdout.contains("1970"),
        "{stdout}"
    );
    // One another replica took over says so, with its attempt.
    let taken = bson::DateTime::from_millis(now.timestamp_millis() - 2_000);
    runs.insert_one(bson::doc! {
        "_id": "integration:moved@manual-1", "job": "integration:moved", "status": "COMPLETED",
        "owner": "survivor", "scheduledFor": now, "takenOverAt": taken, "attempts": 2,
        "result": "12 records",
        "startedAt": bson::DateTime::from_millis(now.timestamp_millis() - 125_000),
        "endedAt": now,
    })
    .await
    .unwrap();
    let out = sluice_with(&config, &["jobs", "history", "moved"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "taken over at {} (attempt 2); 12 records",
            taken.try_to_rfc3339_string().unwrap()
        )),
        "{stdout}"
    ); // Under a header, with when it started and how long it took.
    assert!(stdout.starts_with("RUN "), "{stdout}");
    let started = bson::DateTime::from_millis(now.timestamp_millis() - 125_000)
        .to_chrono()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("integration:moved@"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words[2..5],
        [&started[..10], &started[11..], "2m05s"],
        "{stdout}"
    );
}

/// `sluice config check PATH`, which must refuse the file (exit 2): what it said.
fn refused_config(path: &std::path::Path) -> String {
    let out = sluice()
        .args(["config", "check"])
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

#[test]
fn config_check_names_the_file_and_field_of_a_bad_value() {
    let path = write_temp(
        "bad.toml",
        "[tracking]\nsession_timeout_minutes = 30\nbots = \"sometimes\"\n",
    );
    let err = refused_config(&path);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(
        err.contains("`tracking.bots`") && err.contains("`keep` or `drop`"),
        "{err}"
    );
}

#[test]
fn a_command_line_that_cannot_be_read_exits_64_not_as_a_bad_config() {
    for args in [
        &["export", "run", "event-data", "--from", "2025-02-30"][..],
        &["export", "run", "weekly"],
        &["no-such-command"],
    ] {
        let out = sluice().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let help = sluice().arg("--help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage"));
}

#[test]
fn config_check_names_an_unknown_field() {
    let path = write_temp("typo.toml", "[mongodb]\ndatabse = \"x\"\n");
    let err = refused_config(&path);
    assert!(
        err.contains("typo.toml") && err.contains("databse"),
        "{err}"
    );
}

#[test]
fn config_check_prints_references_never_secret_values() {
    let path = write_temp(
        "ok.toml",
        "[server]\nwrite_keys = [\"${env:TEST_WRITE_KEY}\"]\n[s3]\naccess_key = \"AKIAEXAMPLE\"\nsecret_key = \"${env:TEST_S3_SECRET}\"\n[plugins.config.redact-pii]\nsalt = \"pepper-literal-3\"\nfields = [\"email-literal-4\"]\npepper = \"${env:TEST_PEPPER}\"\n",
    );
    let out = sluice()
        .args(["config", "check"])
        .arg(&path)
        .env("TEST_WRITE_KEY", "wk-very-secret-1")
        .env("TEST_S3_SECRET", "s3-very-secret-2")
        .env("TEST_PEPPER", "pepper-from-env-5")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("${env:TEST_WRITE_KEY}"), "{text}");
    assert!(text.contains("${env:TEST_PEPPER}"), "{text}");
    for secret in [
        "wk-very-secret-1",
        "s3-very-secret-2",
        "AKIAEXAMPLE",
        "pepper-literal-3",
        "email-literal-4",
        "pepper-from-env-5",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[test]
fn environment_overrides_are_validated_and_named() {
    let out = sluice()
        .args(["config", "check"])
        .env("SLUICE_MONGODB_URI", "postgres://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLUICE_MONGODB_URI") && err.contains("mongodb.uri"),
        "{err}"
    );
}

#[test]
fn plugin_test_prints_outputs_failures_and_timing() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    assert!(
        dir.join("currency-normalize.wasm").exists(),
        "run scripts/build-plugins.sh"
    );
    let input = write_temp(
        "records.ndjson",
        "{\"eventType\":\"PURCHASE\",\"properties\":{\"amount\":10,\"currency\":\"USD\"}}\n{\"eventType\":\"PURCHASE\",\"properties\":{\"amount\":5,\"currency\":\"JPY\"}}\n",
    );
    // The plugin folder named by a config of the test's own, not found from the checkout.
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let out = sluice()
        .arg("--config")
        .arg(&config)
        .args(["plugin", "test", "currency-normalize", "--input"])
        .arg(&input)
        .args(["--plugin-config", r#"{"target":"EUR","rates":{"USD":0.9}}"#])
        .env("SLUICE_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("1 of 2 records failed in the plugin"),
        "a failed record fails the command: {stderr}"
    );
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["properties"]["amount"], 9.0);
    assert!(
        stderr.contains("record 2: failed: no rate for `JPY`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("batch 1: 2 records in, 1 out, 1 failed, 0 dropped"),
        "{stderr}"
    );
    // A record the plugin filters out is counted as dropped.
    let input = write_temp(
        "records.ndjson",
        "{\"eventType\":\"PAGE_VIEW\",\"metadata\":{\"bot\":true}}\n{\"eventType\":\"PAGE_VIEW\",\"metadata\":{\"bot\":false}}\n",
    );
    let out = sluice()
        .arg("--config")
        .arg(&config)
        .args(["plugin", "test", "bot-filter", "--input"])
        .arg(&input)
        .env("SLUICE_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("batch 1: 2 records in, 1 out, 0 failed, 1 dropped")
            && stderr.contains("2 records in, 1 out, 0 failed, 1 dropped"),
        "{stderr}"
    );
}

/// A plugin compiled by one command is read by the next from the plugin folder's
/// `.compiled/`; `compile_cache = ""` keeps nothing; and a command run where the plugin
/// folder does not exist leaves no folder behind.
#[test]
fn plugin_commands_keep_compiled_components_for_the_next_command() {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let root = write_temp("records.ndjson", "{\"eventType\":\"PAGE_VIEW\"}\n");
    let input = root.clone();
    let root = root.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for f in ["noop.toml", "noop.wasm"] {
        std::fs::copy(built.join(f), plugins.join(f)).unwrap();
    }
    let run = |config: &str, extra: &[&str]| {
        let path = root.join("sluice.toml");
        std::fs::write(&path, config).unwrap();
        let out = sluice()
            .arg("--config")
            .arg(&path)
            .args(["plugin", "test", "noop", "--input"])
            .arg(&input)
            .args(extra)
            .env("SLUICE_LOG_LEVEL", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let config = format!("[plugins]\ndir = \"{}\"\n", plugins.display());
    let first = run(&config, &[]);
    assert!(
        first.contains("noop 0.1.0 (sha256 ") && first.contains("): compiled in "),
        "{first}"
    );
    let cache = plugins.join(".compiled");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    let second = run(&config, &[]);
    assert!(
        second.contains("): read from the compile cache"),
        "{second}"
    );

    // Off: compiled at every command, nothing kept.
    std::fs::remove_dir_all(&cache).unwrap();
    let off = format!("{config}compile_cache = \"\"\n");
    for _ in 0..2 {
        assert!(run(&off, &[]).contains("): compiled in "));
    }
    assert!(!cache.exists());

    // Another folder, absolute.
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let other = format!(
        "{config}compile_cache = \"{}\"\n",
        elsewhere.join("cache").display()
    );
    run(&other, &[]);
    assert!(run(&other, &[]).contains("): read from the compile cache"));
    assert!(!cache.exists());
    // One that cannot be made is said.
    let nowhere = format!(
        "{config}compile_cache = \"{}\"\n",
        root.join("nowhere/cache").display()
    );
    let said = run(&nowhere, &[]);
    assert!(
        said.contains("`plugins.compile_cache`: `") && said.contains("nowhere` does not exist"),
        "{said}"
    );
    // And by `config check`, which loads no plugin.
    let path = root.join("sluice.toml");
    let out = sluice()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{checked}");
    assert!(
        checked.contains("# warning: `plugins.compile_cache`: `")
            && checked.contains("nowhere` does not exist"),
        "{checked}"
    );

    // A build tested where the configured plugin folder does not exist.
    let missing = root.join("no-plugins-here");
    let absent = format!("[plugins]\ndir = \"{}\"\n", missing.display());
    let wasm = plugins.join("noop.wasm");
    let said = run(&absent, &["--wasm", wasm.to_str().unwrap()]);
    assert!(said.contains("): compiled in "), "{said}");
    assert!(!missing.exists(), "no folder is made for the cache");
    std::fs::remove_dir_all(root).unwrap();
}

/// Output into a reader that stopped reading (`| head`) ends the command quietly, not in
/// a panic.
#[test]
fn output_piped_into_a_reader_that_stops_ends_quietly() {
    use std::io::BufRead;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let input = write_temp(
        "records.ndjson",
        &"{\"eventType\":\"PAGE_VIEW\"}\n".repeat(20_000),
    );
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let mut child = sluice()
        .arg("--config")
        .arg(&config)
        .args(["plugin", "test", "noop", "--input"])
        .arg(&input)
        .env("SLUICE_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("PAGE_VIEW"), "{first}");
    // The reader is gone: the rest of the output has nowhere to go.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{:?} {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `plugin test` reads records from standard input with `--input -`, and says what is
/// wrong with its input, config or plugin name before it loads the plugin.
#[test]
fn plugin_test_reads_standard_input_and_refuses_a_config_that_is_no_object() {
    use std::io::Write;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let run = |name: &str, extra: &[&str], stdin: &str| {
        let mut child = sluice()
            .arg("--config")
            .arg(&config)
            .args(["plugin", "test", name])
            .args(extra)
            .env("SLUICE_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let records = "{\"eventType\":\"PAGE_VIEW\",\"n\":1}\n{\"eventType\":\"CLICK\",\"n\":2}\n";
    let out = run("noop", &["--input", "-"], records);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("CLICK"), "{stdout}");
    for (name, extra, says) in [
        (
            "noop",
            &["--input", "-", "--plugin-config", "[1]"][..],
            "--plugin-config must be a JSON object",
        ),
        (
            "not-installed",
            &["--input", "-"][..],
            "no plugin `not-installed` in",
        ),
    ] {
        let out = run(name, extra, records);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{says}: {stderr}"
        );
    }
}

/// What a plugin author gets from `plugin new` alone, in an empty folder with no Sluice
/// source: a crate that builds into a component which loads and transforms records.
#[test]
fn a_scaffolded_plugin_builds_on_its_own() {
    let dir = std::env::temp_dir().join(format!("sluice-own-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = sluice()
        .args(["plugin", "new", "stamp"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let crate_dir = dir.join("stamp");
    // A change an author makes: a field added to every record.
    let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
    let lib = lib.replace(
        "Ok(vec![record])",
        "let mut record = record;\n        record[\"stamped\"] = Value::from(true);\n        Ok(vec![record])",
    );
    std::fs::write(crate_dir.join("src/lib.rs"), lib).unwrap();
    // Built as the crate's README says, into a folder of its own, kept between runs.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold");
    let build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let input = write_temp("records.ndjson", "{\"eventType\":\"CLICK\"}\n");
    let out = sluice()
        .args(["plugin", "test", "stamp", "--input"])
        .arg(&input)
        .arg("--wasm")
        .arg(target.join("wasm32-wasip2/release/stamp.wasm"))
        .env("SLUICE_LOG_LEVEL", "warn")
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["stamped"], true, "{stdout}");
    assert_eq!(record["eventType"], "CLICK", "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plugin_test_names_outputs_an_import_could_not_write() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let input = write_temp(
        "records.ndjson",
        "{\"thingId\":\"a\",\"title\":\"t0\"}\n{\"thingId\":\"b\",\"title\":\"t2\"}\n{\"thingId\":\"c\",\"title\":\"t3\"}\n{\"thingId\":\"d\",\"title\":\"two-bad-names\"}\n",
    );
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let out = sluice()
        .arg("--config")
        .arg(&config)
        .args(["plugin", "test", "hostile", "--input"])
        .arg(&input)
        .args(["--plugin-config", r#"{"mode":"vandal"}"#])
        .env("SLUICE_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
    assert!(
        stderr.contains("output 2: the field name \"$where\" cannot be written by an import")
            && stderr.contains("output 3: the field name \"a.b\" cannot be written by an import")
            && stderr.contains(
                "output 4: the field names \"$where\", \"a.b\" cannot be written by an import"
            )
            && !stderr.contains("output 1:"),
        "{stderr}"
    );
}

#[test]
fn plugin_test_runs_a_fresh_build_under_the_installed_manifest() {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    // A build outside the plugins folder (no manifest, no checksum for it): the noop
    // component, tested as `currency-normalize`, whose installed manifest it borrows.
    let build = write_temp("build.wasm", "");
    std::fs::copy(dist.join("noop.wasm"), &build).unwrap();
    let input = write_temp(
        "records.ndjson",
        "{\"eventType\":\"PURCHASE\",\"properties\":{\"amount\":5,\"currency\":\"JPY\"}}\n",
    );
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dist.display()),
    );
    let tmp = config.parent().unwrap().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let run = |name: &str| {
        sluice()
            .arg("--config")
            .arg(&config)
            .args(["plugin", "test", name, "--input"])
            .arg(&input)
            .arg("--wasm")
            .arg(&build)
            .args(["--plugin-config", "{}"])
            .env("SLUICE_LOG_LEVEL", "warn")
            // A temporary folder of its own: other tests stage plugins at the same time.
            .env("TMPDIR", &tmp)
            .output()
            .unwrap()
    };
    let manifest_before = std::fs::read_to_string(dist.join("currency-normalize.toml")).unwrap();
    // currency-normalize would fail the JPY purchase; the noop build passes it through.
    for name in ["currency-normalize", "not-installed"] {
        let out = run(name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let first: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        assert_eq!(first["properties"]["currency"], "JPY", "{name}");
    }
    // Nothing installed changed, and the staging folders are gone.
    assert_eq!(
        std::fs::read_to_string(dist.join("currency-normalize.toml")).unwrap(),
        manifest_before
    );
    let left = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("sluice-plugin-test-")
        })
        .count();
    assert_eq!(left, 0, "staging folders left behind");
    // Not a plugin name: refused before anything is written.
    let out = run("../escape");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no plugin name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_build_with_debug_information_is_noted_at_install_and_in_plugin_test() {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let release = std::fs::read(dist.join("noop.wasm")).unwrap();
    // What a debug build carries: DWARF in a custom section (id 0: size, name, payload).
    let name = b".debug_info";
    let payload = [0u8; 16];
    let mut debug = release.clone();
    debug.extend([0, (1 + name.len() + payload.len()) as u8, name.len() as u8]);
    debug.extend(name);
    debug.extend(payload);
    let debug_file = write_temp("noop-debug.wasm", "");
    std::fs::write(&debug_file, &debug).unwrap();
    let dir =
        std::env::temp_dir().join(format!("sluice-install-{}", uuid::Uuid::new_v4().simple()));
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let input = write_temp("one.ndjson", "{\"eventType\":\"PAGE_VIEW\"}\n");
    let run = |args: &[&str], wasm: &std::path::Path| {
        let out = sluice()
            .arg("--config")
            .arg(&config)
            .args(args)
            .arg(wasm)
            .env("SLUICE_LOG_LEVEL", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let install = ["plugin", "install", "noop", "--version", "1.0.0", "--wasm"];
    let test = [
        "plugin",
        "test",
        "noop",
        "--input",
        input.to_str().unwrap(),
        "--wasm",
    ];
    for args in [&install[..], &test[..]] {
        let said = run(args, &debug_file);
        assert!(
            said.contains(&format!(
                "note: `{}` carries debug information",
                debug_file.display()
            )),
            "{said}"
        );
        // A release build is not noted.
        let said = run(args, &dist.join("noop.wasm"));
        assert!(!said.contains("debug information"), "{said}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plugin_install_puts_a_build_in_place_once_it_loads_and_keeps_the_manifest() {
    use sha2::{Digest, Sha256};
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let dir =
        std::env::temp_dir().join(format!("sluice-install-{}", uuid::Uuid::new_v4().simple()));
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{}\"\n", dir.display()),
    );
    let install = |wasm: &std::path::Path, version: Option<&str>| {
        let mut cmd = sluice();
        cmd.arg("--config")
            .arg(&config)
            .args(["plugin", "install", "noop", "--wasm"])
            .arg(wasm)
            .env("SLUICE_LOG_LEVEL", "warn");
        if let Some(v) = version {
            cmd.args(["--version", v]);
        }
        cmd.output().unwrap()
    };
    // The plugin folder's files (the compile cache, `.compiled/`, is not one).
    let files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|f| f != ".compiled")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let component = |sha: &str| format!("noop-{}.wasm", &sha[..12]);
    let sha_of = |p: &std::path::Path| format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()));
    let manifest = || -> toml::Table {
        std::fs::read_to_string(dir.join("noop.toml"))
            .unwrap()
            .parse()
            .unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // No manifest yet and no version; a file that is no component, or a core module (the
    // header of a `wasm32-wasip1` build): nothing installed, and each says why.
    let junk = write_temp("junk.wasm", "not a component");
    let module = write_temp("module.wasm", "\0asm\u{1}\0\0\0");
    for (file, version, says) in [
        (dist.join("noop.wasm"), None, "--version".to_string()),
        (
            junk.clone(),
            Some("1.0.0"),
            format!("`{}` is not WebAssembly", junk.display()),
        ),
        (
            module.clone(),
            Some("1.0.0"),
            format!(
                "`{}` is a core WebAssembly module, not a component",
                module.display()
            ),
        ),
    ] {
        let out = install(&file, version);
        assert!(
            !out.status.success() && stderr(&out).contains(&says),
            "{says}: {}",
            stderr(&out)
        );
    }
    assert!(files().is_empty(), "{:?}", files());

    // Installed with a manifest of its own; the plugin then runs from the folder.
    let first = sha_of(&dist.join("noop.wasm"));
    let out = install(&dist.join("noop.wasm"), Some("1.0.0"));
    assert!(out.status.success(), "{}", stderr(&out));
    // The folder did not exist: made, and said (a run without `-c` would make one under
    // the current folder).
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("did not exist and was created"),
        "{out:?}"
    );
    // And the check's compile is kept in it all the same, for the first run.
    assert!(std::fs::read_dir(dir.join(".compiled"))
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(&first)));
    assert_eq!(
        files(),
        sorted(vec![component(&first), "noop.toml".to_string()])
    );
    let m = manifest();
    assert_eq!(
        (
            m["name"].as_str(),
            m["version"].as_str(),
            m["wasm"].as_str(),
            m["sha256"].as_str()
        ),
        (
            Some("noop"),
            Some("1.0.0"),
            Some(component(&first).as_str()),
            Some(first.as_str())
        )
    );
    let input = write_temp(
        "records.ndjson",
        "{\"eventType\":\"PAGE_VIEW\",\"metadata\":{\"bot\":true,\"userAgent\":\"Googlebot/2.1\"}}\n",
    );
    let run = || {
        sluice()
            .arg("--config")
            .arg(&config)
            .args(["plugin", "test", "noop", "--input"])
            .arg(&input)
            .env("SLUICE_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "noop passes the record"
    );

    // A version no load would take is refused, and nothing changes.
    let before = std::fs::read(dir.join("noop.toml")).unwrap();
    let out = install(&dist.join("noop.wasm"), Some("v2"));
    assert!(
        !out.status.success()
            && stderr(&out).contains("--version: expected a semantic version")
            && !stderr(&out).contains("sluice-plugin-test"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(dir.join("noop.toml")).unwrap(), before);

    // The operator's lines (and line endings) stay; a new build (bot-filter's, as `noop`)
    // replaces wasm and sha256, and the previous component is kept.
    let text = std::fs::read_to_string(dir.join("noop.toml")).unwrap();
    std::fs::write(
        dir.join("noop.toml"),
        format!("# the operator's note\n{text}\n[metadata]\ndescription = \"kept\"\n")
            .replace('\n', "\r\n"),
    )
    .unwrap();
    let second = sha_of(&dist.join("bot-filter.wasm"));
    let out = install(&dist.join("bot-filter.wasm"), None);
    assert!(out.status.success(), "{}", stderr(&out));
    // Its compile is kept for the runs that load it (the folder existed by now).
    assert!(std::fs::read_dir(dir.join(".compiled"))
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(&second)));
    let text = std::fs::read_to_string(dir.join("noop.toml")).unwrap();
    assert!(text.starts_with("# the operator's note\r\n"), "{text}");
    assert!(!text.replace("\r\n", "").contains('\n'), "{text:?}");
    let m = manifest();
    assert_eq!(
        m["metadata"]["description"].as_str(),
        Some("kept"),
        "{text}"
    );
    assert_eq!(m["version"].as_str(), Some("1.0.0"));
    assert_eq!(m["sha256"].as_str(), Some(second.as_str()));
    assert_eq!(
        files(),
        sorted(vec![
            component(&first),
            component(&second),
            "noop.toml".to_string()
        ])
    );
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        0,
        "the new build drops bots"
    );

    // A third build (noop with a custom section appended): the oldest goes, one stays back.
    let third_file = write_temp("third.wasm", "");
    let mut bytes = std::fs::read(dist.join("noop.wasm")).unwrap();
    bytes.extend_from_slice(&[0, 5, 4, b't', b'e', b's', b't']);
    std::fs::write(&third_file, &bytes).unwrap();
    let third = sha_of(&third_file);
    let out = install(&third_file, Some("1.1.0"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("removed older {}", component(&first))),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        files(),
        sorted(vec![
            component(&second),
            component(&third),
            "noop.toml".to_string()
        ])
    );
    assert_eq!(manifest()["version"].as_str(), Some("1.1.0"));
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_copy_of_the_sdk_folder_is_a_crate_of_its_own() {
    // Vendored into a plugin's repository, outside this workspace, its manifest must
    // read without it (nothing inherited with `workspace = true`).
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk");
    let copy =
        std::env::temp_dir().join(format!("sluice-sdk-copy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(copy.join("src")).unwrap();
    std::fs::copy(sdk.join("Cargo.toml"), copy.join("Cargo.toml")).unwrap();
    for entry in std::fs::read_dir(sdk.join("src")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join("src").join(entry.file_name())).unwrap();
    }
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(copy.join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        meta["packages"][0]["version"],
        env!("CARGO_PKG_VERSION"),
        "the SDK's version is the workspace's"
    );
    let _ = std::fs::remove_dir_all(copy);
}

#[test]
fn plugin_new_scaffolds_a_crate_that_uses_the_sdk() {
    let dir = std::env::temp_dir().join(format!("sluice-new-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // Scaffolding reads no config: a broken one in the environment does not stop it.
    let out = sluice()
        .args(["plugin", "new", "tag-events", "--dir"])
        .arg(&dir)
        .env("SLUICE_CONFIG", dir.join("no-such-sluice.toml"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = std::fs::read_to_string(dir.join("tag-events/src/lib.rs")).unwrap();
    assert!(lib.contains("impl Plugin for TagEvents") && lib.contains("export_plugin!(TagEvents)"));
    let manifest = std::fs::read_to_string(dir.join("tag-events/Cargo.toml")).unwrap();
    assert!(manifest.contains("sluice-plugin-sdk") && manifest.contains("cdylib"));
    let again = sluice()
        .args(["plugin", "new", "tag-events", "--dir"])
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing folder is not overwritten"
    );
    // By default the crate gets a copy of the SDK, wherever it is made: it builds without
    // the Sluice source (the build is tested in `a_scaffolded_plugin_builds_on_its_own`).
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk");
    assert!(
        manifest.contains("sluice-plugin-sdk = { path = \"sluice-plugin-sdk\" }"),
        "{manifest}"
    );
    for file in ["Cargo.toml", "src/lib.rs", "wit/transform.wit"] {
        assert_eq!(
            std::fs::read_to_string(dir.join("tag-events/sluice-plugin-sdk").join(file)).unwrap(),
            std::fs::read_to_string(sdk.join(file)).unwrap(),
            "{file}"
        );
    }
    // `--sdk` must name an SDK.
    let elsewhere = sluice()
        .args(["plugin", "new", "other", "--dir"])
        .arg(&dir)
        .args(["--sdk", "no-sdk-here"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && stderr.contains("--sdk"),
        "{stderr}"
    );
    let named = sluice()
        .args(["plugin", "new", "value", "--dir"])
        .arg(&dir)
        .arg("--sdk")
        .arg(&sdk)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    let lib = std::fs::read_to_string(dir.join("value/src/lib.rs")).unwrap();
    assert!(lib.contains("impl Plugin for ValueTransform"), "{lib}");
    // Named, the SDK is depended on where it is, and not copied.
    assert!(!dir.join("value/sluice-plugin-sdk").exists());
    let manifest = std::fs::read_to_string(dir.join("value/Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!(
            "path = \"{}\"",
            sdk.canonicalize().unwrap().display()
        )),
        "{manifest}"
    );
    for bad in ["9lives", "-x", "a--b", "../up", "Tag"] {
        let out = sluice()
            .args(["plugin", "new", bad, "--dir"])
            .arg(&dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn configs_validate_lists_good_files_and_names_the_bad_ones() {
    let dir =
        std::env::temp_dir().join(format!("sluice-configs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/integrations");
    std::fs::copy(
        examples.join("public-link-header.toml"),
        dir.join("good.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.toml"),
        "name = \"x\"\ntype = \"IMPORT\"\nendpoint = \"ftp://nope\"\n",
    )
    .unwrap();
    let good = std::fs::read_to_string(dir.join("good.toml")).unwrap();
    let bad_cron = good.replacen(
        "name = \"",
        "schedule = \"99 99 99 * * *\"\nname = \"cron-",
        1,
    );
    let cron_line = 1 + bad_cron
        .lines()
        .position(|l| l.starts_with("schedule = "))
        .unwrap();
    std::fs::write(dir.join("bad-cron.toml"), &bad_cron).unwrap();
    // Several mistakes in one file are all named, each at its line; a field of a table
    // whose other field is wrong is not (it may be wrong only because of the other).
    std::fs::write(
        dir.join("many.toml"),
        "name = \"many\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/items\"\nschedule = \"every day\"\ntimezone = \"Mars/Olympus\"\n\n[source]\nrecords = \"$.items[*]\"\ntimeout_seconds = 0\n\n[source.pagination]\ntype = \"page\"\nsize = 0\n\n[target]\ncollection = \"products\"\nkey = \"sku\"\n\n[mapping.sku]\npath = \"$.id\"\ntype = \"text\"\n\n[mapping.price]\npath = \"$.price\"\ntype = \"number\"\nformat = \"%Y\"\n\n[mapping.when]\npath = \"$.t\"\ntype = \"dat\"\nformat = \"%Y-%m-%d\"\n\n[mapping.amount]\npath = \"$..[?(@.total\"\n",
    )
    .unwrap();
    // A file reusing another's name is told so at its `name` line, with its other errors.
    std::fs::write(
        dir.join("zz-dup.toml"),
        format!("timezone = \"Mars/Olympus\"\n{good}"),
    )
    .unwrap();
    let name_line = 2 + good.lines().position(|l| l.starts_with("name = ")).unwrap();
    let out = sluice()
        .args(["configs", "validate"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "zz-dup.toml:{name_line}: field `name`: expected a unique name"
        )) && stderr.contains("good.toml)")
            && stderr.contains("zz-dup.toml:1: field `timezone`"),
        "{stderr}"
    );
    let many: Vec<&str> = stderr.lines().filter(|l| l.contains("many.toml")).collect();
    for (line, field) in [
        (4, "schedule"),
        (5, "timezone"),
        (9, "source.timeout_seconds"),
        (13, "source.pagination.size"),
        (21, "mapping.sku.type"),
        (26, "mapping.price.format"),
        (30, "mapping.when.type"),
        // A bad path is named, and the mappings after it in the check still are (the
        // path is required: its mapping is set aside whole).
        (34, "mapping.amount.path"),
    ] {
        assert!(
            many.iter()
                .any(|l| l.contains(&format!("many.toml:{line}: field `{field}`"))),
            "{field}: {many:#?}"
        );
    }
    // A field missing: at the line where its table begins (`mapping` has no header of
    // its own: its first `[mapping.*]`).
    assert!(
        many.iter()
            .any(|l| l.contains("many.toml:19: field `mapping.productId`")),
        "{many:#?}"
    );
    // `format` is refused once `type` is set aside (no `format` unless a date): that
    // follows from the type's typo, and is not said.
    assert!(
        !many.iter().any(|l| l.contains("mapping.when.format")),
        "{many:#?}"
    );
    assert_eq!(many.len(), 9, "{many:#?}");
    // In the file's order.
    let lines: Vec<usize> = many
        .iter()
        .map(|l| {
            l.split("many.toml")
                .nth(1)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX)
        })
        .collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{many:#?}");
    assert!(!stderr.contains("may have more"), "{stderr}");
    // Past ten, a note says more may be left.
    let twelve = dir.join("twelve");
    std::fs::create_dir_all(&twelve).unwrap();
    let mappings: String = (1..=12)
        .map(|i| format!("\n[mapping.f{i:02}]\npath = \"$.f\"\ntype = \"txt\"\n"))
        .collect();
    std::fs::write(
        twelve.join("twelve.toml"),
        format!("name = \"twelve\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/items\"\n\n[target]\ncollection = \"things\"\nkey = \"f01\"\n{mappings}"),
    )
    .unwrap();
    let out = sluice()
        .args(["configs", "validate"])
        .arg(&twelve)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("error: ").count(), 11, "{said}");
    // One file named rather than its folder: that file alone.
    let one = sluice()
        .args(["configs", "validate"])
        .arg(twelve.join("twelve.toml"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&one.stderr), said);
    assert_eq!(one.status.code(), Some(2));
    assert!(
        said.contains("twelve.toml: the first 10 errors in the file's order; it may have more")
            && said.contains("1 invalid config file(s) (10 error(s))"),
        "{said}"
    );
    assert!(
        stderr.contains("4 invalid config file(s) (14 error(s))"),
        "{stderr}"
    );
    // A required field refused (`endpoint`) has a stand-in: the rest is still checked.
    assert!(
        stderr.contains("bad.toml: field `mapping`: expected at least one mapped field"),
        "{stderr}"
    );
    assert!(stdout.contains("good.toml"), "{stdout}");
    // Each names the line that sets the field.
    assert!(stderr.contains("bad.toml:3: field `endpoint`"), "{stderr}");
    assert!(
        stderr.contains(&format!("bad-cron.toml:{cron_line}: field `schedule`")),
        "{stderr}"
    );
    // `configs apply` refuses the same files with the same exit code, storing nothing
    // (it checks before it connects).
    let out = sluice()
        .args(["configs", "apply"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nothing applied"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn export_types_without_a_window_refuse_one() {
    for kind in ["archive", "user-data"] {
        let out = sluice()
            .args(["export", "run", kind, "--from", "2020-01-01"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("takes no --from / --to"), "{kind}: {err}");
    }
    // Nor does an integration, which runs from its cursor and checkpoint.
    let out = sluice()
        .args(["jobs", "run", "shop", "--from", "2020-01-01"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`integration:shop` takes no --from"), "{err}");
    // A day that has not begun would be published empty, looking complete. (Two days on:
    // still not begun if midnight passes during the test.)
    let later = chrono::Utc::now().date_naive() + chrono::Days::new(2);
    let out = sluice()
        .args(["export", "run", "event-data", "--to"])
        .arg(later.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has not begun"), "{err}");
}

#[test]
fn configs_validate_can_check_configs_whose_secrets_are_not_set() {
    let dir =
        std::env::temp_dir().join(format!("sluice-configs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/integrations");
    std::fs::copy(
        examples.join("products-oauth-pages.toml"),
        dir.join("oauth.toml"),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.join("oauth.toml")).unwrap();
    let var = text
        .split("${env:")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("the example names a secret")
        .to_string();
    let run = |extra: &[&str]| {
        sluice()
            .args(["configs", "validate"])
            .arg(&dir)
            .args(extra)
            .env_remove(&var)
            .output()
            .unwrap()
    };
    let strict = run(&[]);
    assert!(!strict.status.success(), "an unset secret fails by default");
    let lenient = run(&["--allow-missing-env"]);
    let stderr = String::from_utf8_lossy(&lenient.stderr);
    assert!(lenient.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("`{var}` is not set")), "{stderr}");
    // Set but empty (as CI gives a secret a fork may not read): refused by default, taken
    // as unset with the flag.
    let empty_var = |extra: &[&str]| {
        sluice()
            .args(["configs", "validate"])
            .arg(&dir)
            .args(extra)
            .env(&var, "")
            .output()
            .unwrap()
    };
    let strict = empty_var(&[]);
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(!strict.status.success(), "{stderr}");
    assert!(stderr.contains("(it is empty)"), "{stderr}");
    let lenient = empty_var(&["--allow-missing-env"]);
    let stderr = String::from_utf8_lossy(&lenient.stderr);
    assert!(lenient.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("`{var}` is not set")), "{stderr}");
    // An empty folder is an error, not a silent success.
    std::fs::remove_file(dir.join("oauth.toml")).unwrap();
    let empty = run(&[]);
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no `*.toml`"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The lines a child process writes to `stderr`, as they come, read on a thread of their
/// own (a test waits for one with a deadline).
fn lines_of(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test]
async fn serve_with_json_logs_writes_nothing_but_json_lines() {
    // A fresh database: serve creates collections and indexes (and, on the test server,
    // warns that the text index is refused) before it listens.
    let db = support::TestDb::new().await;
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n\
             [export]\ndestination = \"s3://sluice-wrong-secret/exports\"\n\
             [s3]\nendpoint = \"http://{}\"\naccess_key = \"sluice\"\nsecret_key = \"not-the-secret\"\npath_style = true\n\
             [[schedules]]\nname = \"daily\"\ntype = \"EVENT_DATA\"\ncron = \"0 5 1 * * *\"\n",
            support::mongo_uri(),
            db.name,
            support::s3_upstream()
        ),
    );
    let mut child = sluice()
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    // Read until the server says it serves (or gives up, or a minute passed), then stop it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut lines = Vec::new();
    // Both lines: the destination is checked in the background, so before or after.
    let (mut serving, mut warned) = (false, false);
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        serving |= line.contains("sluice serving");
        warned |= line.contains("the export destination refuses this replica");
        lines.push(line);
        if serving && warned {
            break;
        }
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("sluice serving")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("created collection")),
        "what init did is logged: {lines:?}"
    );
    // Its export destination refuses it (a wrong secret): it says so before it serves.
    assert!(
        lines.iter().any(
            |l| l.contains("the export destination refuses this replica")
                && l.contains("SignatureDoesNotMatch")
        ),
        "{lines:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in lines.iter().map(String::as_str).chain(stdout.lines()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
}

/// `serve` started while MongoDB is down waits for it (each try logged, without the
/// driver's topology dump) and serves once it answers, instead of exiting.
#[tokio::test]
async fn serve_waits_for_a_database_that_is_not_up_yet() {
    let port = support::free_port();
    let ops = support::free_port();
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=500\"\ndatabase = \"sluice_wait\"\n[server]\nlisten = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:{ops}\"\n[scheduler]\nenabled = false\n"
        ),
    );
    let mut child = sluice()
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("SLUICE_LOG_LEVEL", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    let wait_for = |what: &str, lines: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while let Ok(line) =
            rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            let found = line.contains(what);
            lines.push(line);
            if found {
                return true;
            }
        }
        false
    };
    let mut lines = Vec::new();
    // Two tries, both logged, and the process still there.
    assert!(wait_for("serve waits for it", &mut lines), "{lines:?}");
    assert!(wait_for("serve waits for it", &mut lines), "{lines:?}");
    assert!(child.try_wait().unwrap().is_none(), "{lines:?}");
    // The first try says why each server did not answer (the driver's topology); the
    // next ones say it short.
    let waits: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("serve waits for it"))
        .collect();
    assert!(waits[0].contains("Topology"), "{waits:?}");
    assert!(!waits[1].contains("Topology"), "{waits:?}");
    // Meanwhile the ops address says it is alive and not ready, with its metrics.
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://127.0.0.1:{ops}{path}"))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(get("/healthz").await.0, 200);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"starting\""), "{body}");
    let (status, body) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("process_start_time_seconds "), "{body}");
    // The database comes up on that port: serve gets on with it.
    let server = support::OwnMongo::start_on(port).await;
    let served = wait_for("sluice serving", &mut lines);
    // The server has the ops address now: ready.
    let ready = if served {
        get("/readyz").await
    } else {
        (0, String::new())
    };
    child.kill().unwrap();
    let _ = child.wait();
    drop(server);
    assert!(served, "{lines:?}");
    assert_eq!(ready.0, 200, "{}", ready.1);
}

#[tokio::test]
async fn an_archive_with_nothing_to_archive_says_why() {
    let db = support::TestDb::initialized().await;
    let out_dir = write_temp("keep", "").parent().unwrap().join("out");
    let config = db_config(&db);
    let out = sluice()
        .arg("--config")
        .arg(&config)
        .args(["export", "run", "archive", "--dest"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nothing to archive") && stdout.contains("archive_after_days"),
        "{stdout}"
    );
}

/// `export run archive --dest` elsewhere takes a late day once the scheduled EVENT_DATA
/// has published it again at the configured destination (it looked for that read at its
/// own destination, found none, and held the day for 3 days).
#[tokio::test]
async fn an_archive_elsewhere_takes_a_late_day_the_schedule_published_at_home() {
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    let db = support::TestDb::initialized().await;
    let temp = |what: &str| {
        std::env::temp_dir().join(format!("sluice-{what}-{}", uuid::Uuid::new_v4().simple()))
    };
    let (home, elsewhere) = (temp("home"), temp("elsewhere"));
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[export]\ndestination = \"{}\"\n\n[[schedules]]\nname = \"daily\"\ntype = \"EVENT_DATA\"\ncron = \"0 5 1 * * *\"\n",
            support::mongo_uri(),
            db.name,
            home.display()
        ),
    );
    let old = chrono::Utc::now().date_naive() - chrono::Days::new(100);
    let ts = bson::DateTime::from_chrono(old.and_hms_opt(10, 0, 0).unwrap().and_utc());
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: std::time::Duration::ZERO,
            ..Default::default()
        },
    );
    writer
        .write(&[page_view("late-1", "v", "s", "/", ts)])
        .await
        .unwrap();
    let elsewhere_arg = elsewhere.display().to_string();
    let archive = ["export", "run", "archive", "--dest", elsewhere_arg.as_str()];
    let waited = sluice_ok(&config, &archive).await;
    assert!(
        waited.contains(&format!("{old}: its late events")),
        "{waited}"
    );
    let events = db.store.collection("events");
    assert_eq!(events.count_documents(bson::doc! {}).await.unwrap(), 1);
    // The schedule's kind publishes the late day again where it publishes.
    sluice_ok(&config, &["export", "run", "event-data", "--late-days"]).await;
    assert!(home.join(format!("EVENT_DATA/dt={old}")).exists());
    let taken = sluice_ok(&config, &archive).await;
    assert!(!taken.contains("its late events"), "{taken}");
    assert_eq!(
        events.count_documents(bson::doc! {}).await.unwrap(),
        0,
        "{taken}"
    );
    assert!(
        elsewhere.join(format!("ARCHIVE/dt={old}")).exists(),
        "{taken}"
    );
    for dir in [home, elsewhere] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// `[plugins.export_transforms_by_type]`: a type with a chain of its own runs it, the
/// others `export_transforms`, whether run by its schedule or by hand; the manifest names
/// the chain each partition went through.
#[tokio::test]
async fn an_export_type_runs_its_own_chain() {
    let db = support::TestDb::initialized().await;
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    assert!(
        plugins.join("noop.wasm").exists(),
        "run scripts/build-plugins.sh"
    );
    let dest =
        std::env::temp_dir().join(format!("sluice-chains-{}", uuid::Uuid::new_v4().simple()));
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[export]\ndestination = \"{}\"\n[plugins]\ndir = \"{}\"\nexport_transforms = [\"bot-filter\"]\n[plugins.export_transforms_by_type]\nUSER_DATA = [\"noop\"]\n\n[[schedules]]\nname = \"users\"\ntype = \"USER_DATA\"\ncron = \"0 0 3 * * *\"\n",
            support::mongo_uri(),
            db.name,
            dest.display(),
            plugins.display()
        ),
    );
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let ts = bson::DateTime::from_chrono(yesterday.and_hms_opt(12, 0, 0).unwrap().and_utc());
    sluice_connectors::mongo::EventWriter::new(db.store.clone(), Default::default())
        .write(&[page_view("e1", "v1", "s1", "/", ts)])
        .await
        .unwrap();
    let chain = |kind: &str| {
        let partition = std::fs::read_dir(dest.join(kind))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.join("_manifest.json").exists())
            .unwrap_or_else(|| panic!("no {kind} partition"));
        let text = std::fs::read_to_string(partition.join("_manifest.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["transforms"].clone()
    };
    sluice_ok(&config, &["jobs", "run", "export:users"]).await;
    assert_eq!(chain("USER_DATA"), serde_json::json!(["noop"]), "scheduled");
    std::fs::remove_dir_all(dest.join("USER_DATA")).unwrap();
    sluice_ok(&config, &["export", "run", "user-data"]).await;
    assert_eq!(chain("USER_DATA"), serde_json::json!(["noop"]), "by hand");
    sluice_ok(&config, &["export", "run", "event-data"]).await;
    assert_eq!(chain("EVENT_DATA"), serde_json::json!(["bot-filter"]));
    std::fs::remove_dir_all(dest).unwrap();
}

/// Applying a config that changes how its incremental cursor is read, while a cursor is
/// stored, says that the cursor is kept and how to start over.
#[tokio::test]
async fn applying_a_new_cursor_unit_over_a_stored_cursor_says_so() {
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let dir = write_temp("cursor-keep", "")
        .parent()
        .unwrap()
        .join("cursor-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |unit: &str| {
        format!("name = \"feed\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/things\"\n\n[target]\ncollection = \"things\"\nkey = \"id\"\n\n[mapping.id]\npath = \"$.id\"\n[mapping.changed]\npath = \"$.changed\"\ntype = \"date\"\nunit = \"{unit}\"\n\n[incremental]\ncursor_field = \"changed\"\nparam = \"since\"\n")
    };
    let apply = |unit: &'static str| {
        std::fs::write(dir.join("feed.toml"), file(unit)).unwrap();
        let (config, dir) = (config.clone(), dir.clone());
        async move {
            let out = sluice_with(&config, &["configs", "apply", dir.to_str().unwrap()]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    // No cursor stored yet: nothing to say.
    assert!(!apply("milliseconds").await.contains("note:"));
    db.store
        .collection("integration_configs")
        .update_one(
            bson::doc! { "name": "feed" },
            bson::doc! { "$set": { "syncCursor": 1_701_468_000_000i64 } },
        )
        .await
        .unwrap();
    let said = apply("seconds").await;
    assert!(
        said.contains("note: feed: the incremental cursor is now read another way")
            && said.contains("`1701468000000`")
            && said.contains("sluice import reset feed --cursor"),
        "{said}"
    );
    // Applied again unchanged: nothing more.
    assert!(!apply("seconds").await.contains("note:"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `export history` lists the runs `export_jobs` records, by hand ones too, which `jobs
/// history` does not (it points there).
#[tokio::test]
async fn export_history_lists_runs_by_hand_and_jobs_history_points_there() {
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let out = sluice_with(&config, &["jobs", "history"]).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("listed by `sluice export history`"), "{said}");
    let dest = write_temp("history-keep", "")
        .parent()
        .unwrap()
        .join("history-out");
    let day = (chrono::Utc::now().date_naive() - chrono::Days::new(2)).to_string();
    let out = sluice_with(
        &config,
        &[
            "export",
            "run",
            "daily-analytics",
            "--from",
            &day,
            "--dest",
            dest.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sluice_with(&config, &["export", "history"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listed}");
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with("JOB ") && lines[0].contains("DAYS"),
        "{listed}"
    );
    for part in [
        "daily-analytics-",
        "COMPLETED",
        day.as_str(),
        "1 files",
        "by hand",
        "DAILY_ANALYTICS",
    ] {
        assert!(lines[1].contains(part), "{part}: {listed}");
    }
    let out = sluice_with(&config, &["export", "history", "archive"]).await;
    assert!(out.stdout.is_empty());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no export run is recorded") && said.contains("ARCHIVE"),
        "{said}"
    );
    // An archive has no window: the days it archived are shown, and the events deleted.
    let at = bson::DateTime::now();
    db.store
        .collection("export_jobs")
        .insert_one(bson::doc! {
            "jobId": "archive-x", "type": "ARCHIVE", "status": "COMPLETED",
            "recordsProcessed": 7i64, "files": 2i64, "destination": "s3://b/ARCHIVE",
            "createdAt": at, "updatedAt": at, "eventsDeleted": 7i64, "manual": false,
            "partitions": [
                { "prefix": "ARCHIVE/dt=2025-01-02", "rows": 3i64 },
                { "prefix": "ARCHIVE/dt=2025-01-01", "rows": 4i64 },
            ],
        })
        .await
        .unwrap();
    let out = sluice_with(&config, &["export", "history", "archive"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("2025-01-01..2025-01-02 (2 days)") && listed.contains("7 events deleted"),
        "{listed}"
    );
}

/// A local destination that cannot be made is named in the error, as an S3 one is; and
/// a database without Sluice's collections (a typo in its name) is refused, and nothing
/// is created there.
#[tokio::test]
async fn a_local_destination_that_cannot_be_made_is_named() {
    let empty = support::TestDb::new().await;
    let out = sluice()
        .arg("--config")
        .arg(db_config(&empty))
        .args(["export", "run", "event-data"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "database `{}` holds no `events` collection",
            empty.name
        )),
        "{stderr}"
    );
    let created = empty.store.db().list_collection_names().await.unwrap();
    assert!(created.is_empty(), "{created:?}");
    let db = support::TestDb::initialized().await;
    let file = write_temp("a-file-not-a-folder", "");
    let under = file.join("out");
    let out = sluice()
        .arg("--config")
        .arg(db_config(&db))
        .args(["export", "run", "event-data", "--dest"])
        .arg(&under)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "local `{}/`: create the destination folder",
            under.display()
        )),
        "{stderr}"
    );
}

/// A field no column holds (written by another tool) is left out of an EVENT_DATA file,
/// and the log says so.
#[tokio::test]
async fn an_event_data_export_says_which_fields_no_column_holds() {
    let db = support::TestDb::initialized().await;
    let out_dir = write_temp("keep-foreign", "")
        .parent()
        .unwrap()
        .join("out-foreign");
    let at = bson::DateTime::from_millis(1_767_268_800_000); // 2026-01-01T12:00:00Z
    let event = |id: &str| {
        bson::doc! { "eventId": id, "userId": "u", "sessionId": "s", "eventType": "CLICK",
        "timestamp": at, "createdAt": at, "metadata": { "bot": false } }
    };
    let mut foreign = event("foreign");
    foreign.insert("campaignCode", "XYZ");
    // Values of other types than their columns': a duration as text that is no number
    // (null in the file), a page as a number (written as its text), and a duration as
    // the text of a number (written as that number).
    let mut odd = event("odd");
    odd.insert("duration", "about 1.5 s");
    odd.insert("pageUrl", 42);
    let mut text_number = event("text-number");
    text_number.insert("duration", "1500");
    db.store
        .collection("events")
        .insert_many([event("plain"), foreign, odd, text_number])
        .await
        .unwrap();
    let config = db_config(&db);
    let out = sluice()
        .arg("--config")
        .arg(&config)
        .args([
            "export",
            "run",
            "event-data",
            "--from",
            "2026-01-01",
            "--dest",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no column of `events/v4` holds")
            && stderr.contains("event `foreign` has `campaignCode`")
            && stderr.contains("events=1"),
        "{stderr}"
    );
    // Counted for a reader of the files too: in the manifest and the run's record.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("EVENT_DATA/dt=2026-01-01/_manifest.json")).unwrap(),
    )
    .unwrap();
    let run = db
        .store
        .collection("export_jobs")
        .find_one(bson::doc! {})
        .await
        .unwrap()
        .unwrap();
    for (field, n) in [
        ("rowsWithFieldsLeftOut", 1),
        ("valuesNulled", 1),
        ("valuesConverted", 2),
    ] {
        assert_eq!(manifest[field], n, "{field}: {manifest}");
        assert_eq!(run.get_i64(field), Ok(n), "{field}: {run}");
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// A file that cannot be read says why once; a GeoIP database path starting with `~`
/// that cannot be opened says `~` is not expanded.
#[test]
fn config_check_says_why_a_file_cannot_be_opened_once() {
    let err = refused_config(std::path::Path::new("/no/such/sluice.toml"));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let path = write_temp(
        "geoip.toml",
        "[tracking]\ngeoip_database = \"~/GeoLite2-City.mmdb\"\n",
    );
    let err = refused_config(&path);
    assert!(
        err.contains("a `~` is not expanded in sluice.toml"),
        "{err}"
    );
}

#[test]
fn config_check_parses_schedules_with_the_scheduler_s_cron_parser() {
    let path = write_temp(
        "cron.toml",
        "[[schedules]]\nname = \"daily\"\ntype = \"DAILY_ANALYTICS\"\ncron = \"0 0 25 * * *\"\n\n[tracking]\nbots = \"sometimes\"\n",
    );
    let err = refused_config(&path);
    assert!(
        err.contains("`schedules[0].cron`")
            && err.contains("`0 0 25 * * *` is not one: field 3 (the hour: 0-23)"),
        "hour 25 has six fields but is no schedule: {err}"
    );
    // Each error of the file, on a line of its own, at its line.
    let file = path.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!("error: {file}:4: field `schedules[0].cron`")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("error: {file}:7: field `tracking.bots`")),
        "{err}"
    );
}

/// Validates the integration config `text` and stores it.
async fn apply_config(db: &support::TestDb, text: &str) {
    let file = sluice_core::integration::parse_file("config.toml", text).unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
}

/// Applies an IMPORT config `name` of two products (`p1` Lamp, `p2` Desk) from an API on
/// loopback, into `products`.
async fn apply_two_products(db: &support::TestDb, name: &str) {
    apply_two_slow_products(db, name, std::time::Duration::ZERO, "").await;
}

/// [`apply_two_products`] from an API that answers after `delay`, with `more` mapping.
async fn apply_two_slow_products(
    db: &support::TestDb,
    name: &str,
    delay: std::time::Duration,
    more: &str,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = axum::Router::new().route(
        "/items",
        axum::routing::get(move || async move {
            tokio::time::sleep(delay).await;
            axum::Json(
                serde_json::json!([{ "id": "p1", "name": "Lamp" }, { "id": "p2", "name": "Desk" }]),
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, api).await });
    apply_config(db, &format!(
            "name = \"{name}\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:{port}/items\"\nallow_private_network = true\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n[mapping.name]\npath = \"$.name\"\n{more}"
        )).await;
}

#[tokio::test]
async fn import_run_records_its_run_and_waits_for_the_one_in_flight() {
    let db = support::TestDb::initialized().await;
    apply_two_products(&db, "shop").await;
    let config = db_config(&db);
    let runs = db.store.collection("scheduled_runs");
    // A scheduled fire of the same config holds its lease on another replica.
    runs.insert_one(bson::doc! {
        "_id": "integration:shop@2026-12-03T00:00:00Z", "job": "integration:shop",
        "status": "RUNNING", "owner": "replica-b",
        "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 60_000),
    })
    .await
    .unwrap();
    let out = import_run(&config, "shop").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused while a run is going");
    assert!(err.contains("replica-b"), "{err}");
    assert!(err.contains("its lease lapses at 20"), "{err}");
    let products = db.store.collection("products");
    assert_eq!(products.count_documents(bson::doc! {}).await.unwrap(), 0);

    runs.delete_many(bson::doc! {}).await.unwrap();
    let out = import_run(&config, "shop").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 inserted"), "{stdout}");
    let recorded = runs
        .find_one(bson::doc! { "job": "integration:shop" })
        .await
        .unwrap()
        .expect("the run is recorded");
    assert_eq!(recorded.get_bool("manual"), Ok(true));
    assert_eq!(
        recorded.get_str("status").unwrap(),
        "COMPLETED",
        "{recorded}"
    );
    assert!(
        recorded
            .get_str("result")
            .unwrap()
            .starts_with("2 records, 2 inserted"),
        "{recorded}"
    );
}

#[tokio::test]
async fn import_progress_is_printed_when_it_moves_not_again_while_a_page_is_slow() {
    let db = support::TestDb::initialized().await;
    apply_two_slow_products(&db, "slow", std::time::Duration::from_secs(7), "").await;
    let out = import_run(&db_config(&db), "slow").await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    // Checked every 2 s for 7 s: nothing moved, so one line, not three alike.
    let still: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("0 pages, 0 records"))
        .collect();
    assert_eq!(still.len(), 1, "{stderr}");
    assert!(
        stdout.contains(": 1 page, 2 records, 2 inserted")
            && stdout.contains("1 request (0 retries)"),
        "counts in the singular: {stdout}"
    );
}

#[tokio::test]
async fn import_progress_says_when_a_retry_after_is_waited_out() {
    let db = support::TestDb::initialized().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let api = axum::Router::new().route(
        "/items",
        axum::routing::get(move || async move {
            use axum::response::IntoResponse;
            // The first request is refused with a wait longer than a progress tick.
            if asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "5")],
                    "slow down",
                )
                    .into_response();
            }
            axum::Json(serde_json::json!([{ "id": "p1", "name": "Lamp" }])).into_response()
        }),
    );
    tokio::spawn(async move { axum::serve(listener, api).await });
    apply_config(&db, &format!(
        "name = \"limited\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:{port}/items\"\nallow_private_network = true\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n[mapping.name]\npath = \"$.name\"\n"
    )).await;
    let out = import_run(&db_config(&db), "limited").await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains(" s before attempt 2 of 5: 429 Too Many Requests (the server asked to wait 5000 ms)")
        })
        .collect();
    assert_eq!(said.len(), 1, "said once, when the wait began: {stderr}");
    assert!(said[0].trim_start().starts_with("waiting "), "{stderr}");
    assert!(stdout.contains("1 record"), "{stdout}");
}

#[tokio::test]
async fn configs_delete_removes_a_config_with_its_checkpoint_and_saved_token() {
    let db = support::TestDb::initialized().await;
    apply_two_products(&db, "gone").await;
    for coll in ["import_checkpoints", "oauth_tokens"] {
        db.store
            .collection(coll)
            .insert_one(bson::doc! { "_id": "gone", "pages": 3i64 })
            .await
            .unwrap();
    }
    let config = db_config(&db);
    let out = sluice_with(&config, &["configs", "delete", "gone"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "deleted gone, with its interrupted run's checkpoint and its saved OAuth refresh token"
        ),
        "{stdout}"
    );
    for coll in ["integration_configs", "import_checkpoints", "oauth_tokens"] {
        let left = db
            .store
            .collection(coll)
            .count_documents(bson::doc! {})
            .await
            .unwrap();
        assert_eq!(left, 0, "{coll}");
    }
    // The deletion is recorded as a run of the job, and a second one finds nothing.
    let runs = db.store.collection("scheduled_runs");
    let run = runs
        .find_one(bson::doc! { "job": "integration:gone" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("result"), Ok("config deleted"), "{run}");
    let out = sluice_with(&config, &["configs", "delete", "gone"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no integration config `gone`"));
    // One stored that no longer reads as a config (by hand, another version) goes too.
    let configs = db.store.collection("integration_configs");
    configs
        .insert_one(bson::doc! { "name": "junk", "spec": 5 })
        .await
        .unwrap();
    let out = sluice_with(&config, &["configs", "delete", "junk"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(configs.count_documents(bson::doc! {}).await.unwrap(), 0);
}

#[tokio::test]
async fn a_dry_run_of_an_export_config_says_it_has_none() {
    let db = support::TestDb::initialized().await;
    apply_config(&db, "name = \"push\"\ntype = \"EXPORT\"\nendpoint = \"https://crm.example/in\"\n[push]\ncollection = \"users\"\n[mapping.id]\npath = \"$.visitorId\"\n").await;
    let out = sluice_with(&db_config(&db), &["import", "run", "push", "--dry-run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`push` is an EXPORT config: --dry-run is for IMPORT configs"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_import_that_stored_none_of_its_records_fails() {
    let db = support::TestDb::initialized().await;
    // `Title`: the API sends `name`.
    let typo = "[mapping.title]\npath = \"$.Title\"\nrequired = true\n";
    apply_two_slow_products(&db, "typo", std::time::Duration::ZERO, typo).await;
    let out = import_run(&db_config(&db), "typo").await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("0 inserted, 0 updated, 2 failed mapping"),
        "{stdout}"
    );
    // Mapping failures are not said to be a plugin's (the config has none).
    assert!(
        stdout.contains("2 records kept in dead_letters (failed mapping or validation"),
        "{stdout}"
    );
    assert!(!stdout.contains("failed in a plugin"), "{stdout}");
    assert!(stderr.contains("none was stored"), "{stderr}");
    let run = db
        .store
        .collection("scheduled_runs")
        .find_one(bson::doc! { "job": "integration:typo" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("status"), Ok("FAILED"), "{run}");
}

/// `sluice --config CONFIG config check ARGS...`.
fn config_check(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    sluice()
        .arg("--config")
        .arg(config)
        .args(["config", "check"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_check_and_configs_validate_load_the_plugins_they_name() {
    let plugins = write_temp("README", "no plugins here");
    let plugins = plugins.parent().unwrap().display().to_string();
    // `config check` loads what `serve` loads before it starts.
    for section in ["tracking_transforms", "export_transforms"] {
        let config = write_temp(
            "sluice.toml",
            &format!("[plugins]\ndir = \"{plugins}\"\n{section} = [\"no-such-plugin\"]\n"),
        );
        let out = config_check(&config, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{section}: {err}");
        assert!(err.contains("no-such-plugin"), "{section}: {err}");
    }
    // A plugin config no plugin has (a typo) is warned of, naming what is installed.
    let installed = support::plugin_dir().display().to_string();
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{installed}\"\n[plugins.config.redact_pii]\nsalt = \"s\"\n[plugins.config.noop]\n"),
    );
    let out = config_check(&config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warned: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("names no plugin"))
        .collect();
    assert_eq!(warned.len(), 1, "{stdout}");
    assert!(
        warned[0].contains("[plugins.config.redact_pii]") && warned[0].contains("redact-pii"),
        "{stdout}"
    );
    // `configs validate` refuses a config whose plugin does not load, and says `ok` only
    // of the others.
    let config = write_temp("sluice.toml", &format!("[plugins]\ndir = \"{plugins}\"\n"));
    let configs = write_temp(
        "shop.toml",
        "name = \"shop\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/items\"\ntransforms = [\"no-such-plugin\"]\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n",
    );
    let dir = configs.parent().unwrap();
    std::fs::write(
        dir.join("plain.toml"),
        "name = \"plain\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/items\"\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n",
    )
    .unwrap();
    let validate = |config: &std::path::Path| {
        sluice()
            .arg("--config")
            .arg(config)
            .args(["configs", "validate"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = validate(&config);
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    // At the line of `transforms`.
    assert!(
        err.contains("shop.toml:4: field `transforms` of `shop`") && err.contains("no-such-plugin"),
        "{err}"
    );
    assert!(
        stdout.contains("plain.toml") && !stdout.contains("shop.toml"),
        "{stdout}"
    );
    // Without a sluice.toml that loads (its secrets absent in CI), or none at all, plugins
    // are not checked, and a note says so of each config naming some.
    let unloadable = write_temp(
        "sluice.toml",
        "[mongodb]\nuri = \"http://db\"\n[tracking]\nbots = \"sometimes\"\n",
    );
    let out = validate(&unloadable);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Its first error, on the note's line, and how many more.
    let note = err
        .lines()
        .find(|l| l.contains("shop.toml: `transforms` not checked: the sluice.toml did not load"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        note.contains(":2: field `mongodb.uri`") && note.contains("(and 1 more error)"),
        "{err}"
    );
    let out = sluice()
        .args(["configs", "validate"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("`transforms` not checked: no sluice.toml given")
            && !err.contains("plain.toml"),
        "{err}"
    );
    // `config check --skip-files` checks the file alone.
    let config = write_temp(
        "sluice.toml",
        &format!("[plugins]\ndir = \"{plugins}\"\ntracking_transforms = [\"no-such-plugin\"]\n"),
    );
    let out = config_check(&config, &["--skip-files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_import_whose_plugin_cannot_load_leaves_no_run_behind() {
    let db = support::TestDb::initialized().await;
    apply_config(&db, "name = \"shop\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/items\"\nallow_private_network = true\ntransforms = [\"no-such-plugin\"]\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n").await;
    let config = db_config(&db);
    let out = import_run(&config, "shop").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no-such-plugin"), "{err}");
    // Nothing holds the job's lease: a scheduled fire in the next minute is not skipped.
    let runs = db.store.collection("scheduled_runs");
    assert_eq!(runs.count_documents(bson::doc! {}).await.unwrap(), 0);
}

#[tokio::test]
async fn serve_with_a_missing_geoip_database_stops_before_touching_the_database() {
    let db = support::TestDb::new().await;
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n[tracking]\ngeoip_database = \"no-such-dir/GeoLite2-City.mmdb\"\n",
            support::mongo_uri(),
            db.name
        ),
    );
    let out = sluice_with(&config, &["serve"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    // A config whose files do not load: exit 2, as for any config that does not load.
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("GeoLite2-City.mmdb"), "{err}");
    // No collection, so no scheduled run was claimed either.
    let names = db.store.db().list_collection_names().await.unwrap();
    assert!(names.is_empty(), "{names:?}");
}

#[tokio::test]
async fn claim_events_gives_another_writers_events_claims_and_says_how_many() {
    use bson::doc;
    let db = support::TestDb::initialized().await;
    let at = bson::DateTime::from_millis(1_700_000_000_000);
    db.store
        .collection("events")
        .insert_many((0..3).map(|i| {
            doc! { "eventId": format!("e{i}"), "userId": "v", "sessionId": "s",
            "eventType": "CLICK", "timestamp": at }
        }))
        .await
        .unwrap();
    let config = db_config(&db);
    let first = sluice_ok(&config, &["db", "claim-events"]).await;
    assert!(
        first.contains("3 events read: 3 claimed now, 0 claimed before"),
        "{first}"
    );
    let claim = db
        .store
        .collection("event_ids")
        .find_one(doc! { "_id": "e1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.get_bool("stored"), Ok(true), "{claim}");
    assert_eq!(claim.get_datetime("ts"), Ok(&at));
    let again = sluice_ok(&config, &["db", "claim-events"]).await;
    assert!(again.contains("0 claimed now, 3 claimed before"), "{again}");
}

#[tokio::test]
async fn prune_ledger_deletes_only_claims_of_archived_events_before_the_day() {
    use bson::{doc, DateTime};
    let db = support::TestDb::initialized().await;
    let day = |s: &str| {
        DateTime::from_chrono(
            format!("{s}T12:00:00Z")
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap(),
        )
    };
    // More old archived claims than one round trip deletes, so pruning goes in chunks.
    let old_archived = 20_005;
    let mut claims: Vec<bson::Document> = (0..old_archived)
        .map(|i| doc! { "_id": format!("old-{i}"), "ts": day("2026-01-10"), "at": day("2026-01-10"), "archived": true })
        .collect();
    claims.extend((0..3).map(|i| {
        doc! { "_id": format!("recent-{i}"), "ts": day("2026-03-01"), "at": day("2026-03-01"), "archived": true }
    }));
    // Old claims whose events are still stored (or were never): a resend of them must
    // stay a duplicate, so they are never pruned.
    claims.extend((0..4).map(|i| {
        doc! { "_id": format!("kept-{i}"), "ts": day("2026-01-10"), "at": day("2026-01-10") }
    }));
    // Marked archived, but its event is still stored (an ARCHIVE stopped between marking
    // its claims and deleting its events): kept too.
    claims.push(doc! { "_id": "stored-0", "ts": day("2026-01-10"), "at": day("2026-01-10"), "archived": true });
    db.store
        .collection("events")
        .insert_one(
            doc! { "eventId": "stored-0", "userId": "v", "sessionId": "s",
            "eventType": "CLICK", "timestamp": day("2026-01-10") },
        )
        .await
        .unwrap();
    let ledger = db.store.collection("event_ids");
    ledger.insert_many(claims).await.unwrap();
    let config = db_config(&db);
    let prune = |args: &'static [&'static str]| {
        let config = config.clone();
        async move { sluice_with(&config, &[&["db", "prune-ledger"], args].concat()).await }
    };

    let dry = prune(&["--before", "2026-02-01", "--dry-run"]).await;
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("{} claims", old_archived + 1)),
        "{stdout}"
    );
    assert_eq!(
        ledger.count_documents(doc! {}).await.unwrap(),
        old_archived + 8,
        "a dry run deletes nothing"
    );

    let done = prune(&["--before", "2026-02-01"]).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
    );
    assert!(done.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("deleted {old_archived} claims")),
        "{stdout}"
    );
    assert!(stdout.contains("kept 1 claims"), "{stdout}");
    assert!(
        stderr.lines().filter(|l| l.starts_with("deleted ")).count() >= 3,
        "progress after each chunk: {stderr}"
    );
    let mut left: Vec<String> = {
        use futures_util::TryStreamExt;
        ledger
            .find(doc! {})
            .await
            .unwrap()
            .try_collect::<Vec<bson::Document>>()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.get_str("_id").unwrap().to_string())
            .collect()
    };
    left.sort();
    assert_eq!(
        left,
        ["kept-0", "kept-1", "kept-2", "kept-3", "recent-0", "recent-1", "recent-2", "stored-0"]
    );

    let bad = prune(&["--before", "2026-02-30"]).await;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("--before"), "{stderr}");
}

#[tokio::test]
async fn import_reset_says_what_it_dropped() {
    let db = support::TestDb::initialized().await;
    apply_config(&db, "name = \"shop\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/items\"\nallow_private_network = true\n[source]\nrecords = \"$[*]\"\n[mapping.productId]\npath = \"$.id\"\n[mapping.version]\npath = \"$.v\"\ntype = \"integer\"\n[incremental]\ncursor_field = \"version\"\nparam = \"after\"\n").await;
    // As a completed run leaves it.
    db.store
        .collection("integration_configs")
        .update_one(
            bson::doc! { "name": "shop" },
            bson::doc! { "$set": { "syncCursor": 42i64 } },
        )
        .await
        .unwrap();
    let config = db_config(&db);
    let reset = |args: &'static [&'static str]| {
        let config = config.clone();
        async move { sluice_with(&config, &[&["import", "reset"], args].concat()).await }
    };
    let out = reset(&["shop", "--cursor"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no interrupted run"), "{stdout}");
    assert!(stdout.contains("cleared the cursor (was 42)"), "{stdout}");
    let stored = db
        .store
        .collection("integration_configs")
        .find_one(bson::doc! { "name": "shop" })
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.contains_key("syncCursor"), "{stored}");

    let out = reset(&["nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no integration config named `nope`"), "{err}");
}

/// `export run` says when a partition was kept as published rather than replaced (a
/// rerun reading no rows where rows were published), instead of "0 rows 0 files" for a
/// partition that still holds them.
#[tokio::test]
async fn export_run_reports_a_kept_partition_as_kept() {
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let day = chrono::Utc::now().date_naive() - chrono::Days::new(10);
    let at = bson::DateTime::from_millis(
        day.and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis(),
    );
    let events = db.store.collection("events");
    for i in 0..3 {
        events
            .insert_one(bson::doc! {
                "eventId": format!("e{i}"), "userId": "u", "sessionId": "s",
                "eventType": "CLICK", "timestamp": at, "createdAt": at,
                "metadata": { "bot": false },
            })
            .await
            .unwrap();
    }
    let dest =
        std::env::temp_dir().join(format!("sluice-cli-kept-{}", uuid::Uuid::new_v4().simple()));
    let run = || {
        let args = [
            "export".to_string(),
            "run".into(),
            "event-data".into(),
            "--from".into(),
            day.to_string(),
            "--dest".into(),
            dest.display().to_string(),
        ];
        let config = config.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = sluice_with(&config, &args).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let partition = format!("EVENT_DATA/dt={day}");
    let first = run().await;
    let line = first
        .lines()
        .find(|l| l.contains(&partition))
        .expect(&first);
    assert!(
        line.contains(" 3 rows") && line.contains("1 files"),
        "{first}"
    );
    events.delete_many(bson::doc! {}).await.unwrap();
    let second = run().await;
    let line = second
        .lines()
        .find(|l| l.contains(&partition))
        .expect(&second);
    assert!(line.contains("kept as published before"), "{second}");
    assert!(!line.contains("0 rows"), "{second}");
    std::fs::remove_dir_all(&dest).unwrap();
}

/// `sluice jobs list`: a scheduled job whose latest instant no replica ran is flagged
/// MISSED under its line; once that fire is recorded FAILED, the line shows it with the
/// first line of its error.
#[tokio::test]
async fn jobs_list_shows_missed_fires_and_the_last_error() {
    let db = support::TestDb::initialized().await;
    let cron = support::apply_missed_nightly(&db).await;
    let config = db_config(&db);
    let line_of = |stdout: &str| -> Vec<String> {
        let lines: Vec<&str> = stdout.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with("integration:nightly "))
            .unwrap_or_else(|| panic!("{stdout}"));
        lines[i..(i + 2).min(lines.len())]
            .iter()
            .map(|l| l.to_string())
            .collect()
    };
    let out = sluice_with(&config, &["jobs", "list"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = line_of(&stdout);
    assert!(
        lines[0].contains(&cron) && lines[0].contains("last never run"),
        "{stdout}"
    );
    assert_missed(&stdout, "integration:nightly");
    let job = sluice_jobs::schedule::ScheduledJob {
        name: "integration:nightly".into(),
        cron: cron.clone(),
        timezone: None,
        since: None,
    };
    let fire = sluice_jobs::schedule::previous_fire(&job, chrono::Utc::now()).unwrap();
    let id = sluice_jobs::schedule::run_id("integration:nightly", fire);
    db.store
        .collection("scheduled_runs")
        .insert_one(bson::doc! {
            "_id": &id, "job": "integration:nightly",
            "scheduledFor": bson::DateTime::from_chrono(fire), "status": "FAILED",
            "error": "the API answered 500\nsecond line of detail",
        })
        .await
        .unwrap();
    let out = sluice_with(&config, &["jobs", "list"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = line_of(&stdout);
    assert!(
        lines[0].ends_with(&format!("last FAILED ({id}): the API answered 500")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("second line") && !stdout.contains("MISSED"),
        "{stdout}"
    );
    assert!(stdout.starts_with("JOB "), "a header first: {stdout}");
    // A run that completed before the failed one is named under it (the latest fire may
    // hide it).
    let before = fire - chrono::Duration::days(1);
    let ended = before + chrono::Duration::seconds(30);
    db.store
        .collection("scheduled_runs")
        .insert_one(bson::doc! {
            "_id": sluice_jobs::schedule::run_id("integration:nightly", before),
            "job": "integration:nightly", "status": "COMPLETED",
            "scheduledFor": bson::DateTime::from_chrono(before),
            "endedAt": bson::DateTime::from_chrono(ended),
        })
        .await
        .unwrap();
    let stdout = sluice_ok(&config, &["jobs", "list"]).await;
    let lines = line_of(&stdout);
    assert!(
        lines[1].trim_start()
            == format!(
                "last COMPLETED run ended {}",
                ended.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        "{stdout}"
    );
    // A RUNNING run no replica holds (its lease lapsed) is said to be so.
    let now = chrono::Utc::now();
    db.store
        .collection("scheduled_runs")
        .insert_one(bson::doc! {
            "_id": "integration:nightly@manual-1", "job": "integration:nightly",
            "status": "RUNNING", "manual": true,
            "scheduledFor": bson::DateTime::from_chrono(now),
            "expiresAt": bson::DateTime::from_chrono(now - chrono::Duration::minutes(1)),
        })
        .await
        .unwrap();
    let stdout = sluice_ok(&config, &["jobs", "list"]).await;
    assert!(stdout.contains("held by no replica"), "{stdout}");
}

/// A job firing every minute shows its misses too: its latest instant is always within
/// the time to claim it, so the one before that time is looked at.
#[tokio::test]
async fn jobs_list_shows_the_misses_of_a_job_firing_every_minute() {
    let db = support::TestDb::initialized().await;
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    support::apply_scheduled_since(&db, "frequent", "0 * * * * *", since).await;
    let stdout = sluice_ok(&db_config(&db), &["jobs", "list"]).await;
    assert_missed(&stdout, "integration:frequent");
}

/// `jobs list` flags `job` MISSED, on the line after its own.
fn assert_missed(stdout: &str, job: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(&format!("{job} ")))
        .unwrap_or_else(|| panic!("no {job} in {stdout}"));
    assert!(
        lines
            .get(i + 1)
            .is_some_and(|l| l.trim_start().starts_with("MISSED: ")),
        "{stdout}"
    );
}

/// A `[[schedules]]` job (no known start) that ran at an instant of its cron and then
/// not for many periods stays MISSED (it showed for one period, then the instant before
/// the one looked at was unclaimed too, and it was taken for a schedule not yet begun).
#[tokio::test]
async fn a_config_file_schedule_stays_missed_through_a_long_outage() {
    let db = support::TestDb::initialized().await;
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n\n[[schedules]]\nname = \"minutely\"\ntype = \"EVENT_DATA\"\ncron = \"0 * * * * *\"\n",
            support::mongo_uri(),
            db.name
        ),
    );
    let job = sluice_jobs::schedule::ScheduledJob {
        name: "export:minutely".into(),
        cron: "0 * * * * *".into(),
        timezone: None,
        since: None,
    };
    let at = sluice_jobs::schedule::previous_fire(
        &job,
        chrono::Utc::now() - chrono::Duration::minutes(20),
    )
    .unwrap();
    db.store
        .collection("scheduled_runs")
        .insert_one(bson::doc! {
            "_id": sluice_jobs::schedule::run_id("export:minutely", at),
            "job": "export:minutely", "status": "COMPLETED",
            "scheduledFor": bson::DateTime::from_chrono(at),
            "endedAt": bson::DateTime::from_chrono(at + chrono::Duration::seconds(1)),
        })
        .await
        .unwrap();
    let stdout = sluice_ok(&config, &["jobs", "list"]).await;
    assert_missed(&stdout, "export:minutely");
}

/// Connector requests never go through a proxy named by `HTTP_PROXY`: a proxy resolves
/// the host again itself, past the vetted, pinned addresses.
#[tokio::test]
async fn imports_ignore_proxies_named_by_the_environment() {
    let db = support::TestDb::initialized().await;
    apply_two_products(&db, "proxied").await;
    // A "proxy" that counts the connections it is offered and answers none.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let offered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let offered = offered.clone();
        async move {
            while let Ok((conn, _)) = proxy.accept().await {
                offered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        }
    });
    let config = db_config(&db);
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = sluice();
        // `sluice()` cleared the caller's NO_PROXY.
        for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env(var, &proxy_url);
        }
        cmd.arg("--config")
            .arg(&config)
            .args(["import", "run", "proxied"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 inserted"), "{stdout}");
    assert_eq!(offered.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// A proxy that answers every request 502 and records its request lines.
fn refusing_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_ok() {
                log.lock().unwrap().push(line.trim_end().to_string());
            }
            let _ = conn.write_all(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    (format!("http://{addr}"), seen)
}

/// `sluice export run daily-analytics` of yesterday into `s3://BUCKET/PREFIX` with the
/// test store's keys and path style; the caller names the endpoint.
fn daily_export_to_s3(config: &std::path::Path, bucket: &str, prefix: &str) -> Command {
    let s3 = support::s3_settings(bucket);
    let day = (chrono::Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .to_string();
    let mut cmd = sluice();
    cmd.arg("--config")
        .arg(config)
        .args([
            "export",
            "run",
            "daily-analytics",
            "--from",
            &day,
            "--to",
            &day,
        ])
        .env(
            "SLUICE_EXPORT_DESTINATION",
            format!("s3://{bucket}/{prefix}"),
        )
        .env("SLUICE_S3_ACCESS_KEY", &s3.access_key)
        .env("SLUICE_S3_SECRET_KEY", &s3.secret_key)
        .env("SLUICE_S3_PATH_STYLE", "true");
    cmd
}

/// The keys of the Parquet files under `prefix` of `bucket`.
async fn parquet_keys(bucket: &str, prefix: &str) -> Vec<String> {
    let store =
        sluice_connectors::objstore::S3Store::connect(&sluice_connectors::objstore::S3Settings {
            prefix: prefix.into(),
            ..support::s3_settings(bucket)
        })
        .await
        .unwrap();
    store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".parquet"))
        .collect()
}

#[tokio::test]
async fn s3_requests_follow_the_proxy_environment_as_the_aws_sdk_does() {
    let db = support::TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let config = db_config(&db);
    let endpoint = support::s3_settings(&bucket.name).endpoint;
    let (proxy, seen) = refusing_proxy();
    // `sluice()` clears the caller's proxy settings: these are the only ones.
    let run = |no_proxy: Option<&str>| {
        let mut cmd = daily_export_to_s3(&config, &bucket.name, "proxied");
        cmd.env("SLUICE_S3_ENDPOINT", &endpoint)
            .env("HTTP_PROXY", &proxy);
        if let Some(no) = no_proxy {
            cmd.env("NO_PROXY", no);
        }
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    // Through the proxy, which refuses: the export fails and the proxy saw S3's URL.
    let out = run(None).await.unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines = seen.lock().unwrap().clone();
    let host = endpoint.trim_start_matches("http://");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("http://{host}/{}", bucket.name))),
        "{lines:?}"
    );
    // With the endpoint's host in NO_PROXY it goes direct, and the file is there.
    let before = seen.lock().unwrap().len();
    let out = run(Some("127.0.0.1,localhost")).await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "nothing through the proxy"
    );
    let keys = parquet_keys(&bucket.name, "proxied").await;
    assert!(!keys.is_empty(), "no Parquet file under the prefix");
}

#[tokio::test]
async fn the_aws_settings_of_the_environment_apply_under_sluice_s() {
    // No `[s3] endpoint`: `AWS_ENDPOINT_URL` (as the AWS SDKs and CLI read it) names the
    // store, as it would a FIPS or private endpoint.
    let db = support::TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let config = db_config(&db);
    let mut cmd = daily_export_to_s3(&config, &bucket.name, "from-env");
    cmd.env(
        "AWS_ENDPOINT_URL",
        support::s3_settings(&bucket.name).endpoint,
    )
    .env("AWS_REGION", "us-east-1");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = parquet_keys(&bucket.name, "from-env").await;
    assert!(!keys.is_empty(), "no Parquet file under the prefix");
}

#[tokio::test]
async fn db_check_reports_what_differs_and_skips_archived_days() {
    use bson::{doc, DateTime};
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    let db = support::TestDb::initialized().await;
    let at = |day: &str, hour: u32| {
        DateTime::from_chrono(
            format!("{day}T{hour:02}:00:00Z")
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap(),
        )
    };
    let event = |id: &str, session: &str, ts: DateTime| {
        page_view(id, &format!("v-{session}"), session, &format!("/{id}"), ts)
    };
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    writer
        .write(&[
            event("a1", "old", at("2026-01-10", 9)),
            event("a2", "old", at("2026-01-10", 10)),
            event("b1", "new", at("2026-03-01", 9)),
            event("b2", "new", at("2026-03-01", 10)),
            event("c1", "lost", at("2026-03-02", 9)),
            event("c2", "lost", at("2026-03-02", 10)),
        ])
        .await
        .unwrap();
    let config = db_config(&db);
    let check = || sluice_with(&config, &["db", "check", "--settle", "0"]);
    let clean = check().await;
    let stdout = String::from_utf8_lossy(&clean.stdout).to_string();
    assert!(clean.status.success(), "{stdout}");
    assert!(
        stdout.contains("checked 3 sessions and 3 visitors against 6 events and 6 ledger claims"),
        "{stdout}"
    );
    assert!(stdout.contains("aggregates match the events"), "{stdout}");

    // January archived (as an ARCHIVE run records it), both sessions edited by hand, and
    // an event lost after its claim counted it.
    db.store
        .collection("export_jobs")
        .insert_one(
            doc! { "jobId": "archive-1", "type": "ARCHIVE", "status": "COMPLETED",
            "partitions": [{ "prefix": "ARCHIVE/dt=2026-01-10", "rows": 2_i64, "files": [] }] },
        )
        .await
        .unwrap();
    for sid in ["old", "new"] {
        db.store
            .collection("sessions")
            .update_one(
                doc! { "sessionId": sid },
                doc! { "$set": { "pageViews": 7_i64 } },
            )
            .await
            .unwrap();
    }
    db.store
        .collection("events")
        .delete_many(doc! { "eventId": "c2" })
        .await
        .unwrap();
    // A stray session document: a copy of `new` under another id, with no events.
    let sessions = db.store.collection("sessions");
    let mut ghost = sessions
        .find_one(doc! { "sessionId": "new" })
        .await
        .unwrap()
        .unwrap();
    ghost.remove("_id");
    ghost.insert("sessionId", "ghost");
    sessions.insert_one(ghost).await.unwrap();
    db.store
        .collection("event_ids")
        .update_many(doc! {}, doc! { "$set": { "at": at("2026-03-02", 11) } })
        .await
        .unwrap();
    let found = check().await;
    let stdout = String::from_utf8_lossy(&found.stdout).to_string();
    let stderr = String::from_utf8_lossy(&found.stderr).to_string();
    assert_eq!(found.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout
            .contains("skipped 1 sessions and 1 visitors with events before 2026-01-11T00:00:00Z"),
        "{stdout}"
    );
    assert!(stdout.contains("claims without their event: 1"), "{stdout}");
    assert!(
        stdout.contains("event c2 at 2026-03-02T10:00:00Z (visitor v-lost, session lost)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 sessions differ (stored / recomputed from events):\n")
            && stdout.contains("  new: pageViews 7 / 2\n")
            && stdout.contains("  ghost: events 2 / 0 (no event of this session is stored)"),
        "{stdout}"
    );
    // Its visitor's count of sessions says where it comes from.
    assert!(
        stdout.contains(
            "  v-new: totalSessions 1 / 2 (the `sessions` documents naming this visitor)"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("  old:"), "{stdout}");
    assert!(
        stderr.contains("error: 2 sessions and 1 visitors differ from their events"),
        "{stderr}"
    );
}

/// `sluice export run --late-days`, for an export driven by an orchestrator rather than
/// `[[schedules]]`: a run without it names the days that received events after their
/// export; with it, those days are published again (a day of the run's own window is
/// read by the run itself, so it is not published twice), and then none are left.
#[tokio::test]
async fn export_run_names_late_days_and_publishes_them_again_with_late_days() {
    use bson::DateTime;
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    use sluice_core::model::Event;
    let db = support::TestDb::initialized().await;
    let dest = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4().simple()));
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[export]\ndestination = \"{}\"\n",
            support::mongo_uri(),
            db.name,
            dest.display()
        ),
    );
    let today = chrono::Utc::now().date_naive();
    let late = today - chrono::Days::new(3);
    // Marks are written with no reach ahead, so a run that begins after a write has read it.
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: std::time::Duration::ZERO,
            ..Default::default()
        },
    );
    let store = |ids: std::ops::Range<u32>| {
        let events: Vec<Event> = ids
            .map(|i| {
                let ts = DateTime::from_chrono(late.and_hms_opt(10, 0, i).unwrap().and_utc());
                page_view(&format!("late-{i}"), "v", "s", "/", ts)
            })
            .collect();
        let writer = &writer;
        async move {
            writer.write(&events).await.unwrap();
        }
    };
    let run = |args: &[&str]| {
        let all: Vec<String> = ["export", "run", "event-data"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let config = config.clone();
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            sluice_ok(&config, &all).await
        }
    };
    let rows = |day: chrono::NaiveDate| {
        let text =
            std::fs::read_to_string(dest.join(format!("EVENT_DATA/dt={day}/_manifest.json")))
                .unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["rows"].clone()
    };
    let line = |stdout: &str, what: &str| {
        stdout
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with `{what}`: {stdout}"))
            .to_string()
    };

    // Yesterday's run, while three-days-ago received events: named, not published.
    store(0..2).await;
    let stdout = run(&[]).await;
    let named = line(
        &stdout,
        "received events after this kind last read it, or within a minute before",
    );
    assert!(named.contains("1 day received events"), "{named}");
    assert!(named.contains(&late.to_string()), "{named}");
    assert!(named.contains("no schedule of this kind"), "{named}");
    assert!(!dest.join(format!("EVENT_DATA/dt={late}")).exists());

    // With --late-days it is published, then nothing is left.
    let stdout = run(&["--late-days"]).await;
    let again = line(&stdout, "published again: late events");
    assert!(again.contains(&format!("EVENT_DATA/dt={late}")), "{again}");
    assert_eq!(rows(late), 2);
    let total = line(&stdout, "late days: 1 day published again");
    assert!(
        total.contains("2 rows, besides the window above"),
        "{total}"
    );
    let stdout = run(&["--late-days"]).await;
    assert!(stdout.contains("late days: none"), "{stdout}");
    assert!(!stdout.contains("published again"), "{stdout}");

    // More events for the day: published again with them.
    store(2..3).await;
    run(&["--late-days"]).await;
    assert_eq!(rows(late), 3);

    // A late day inside the run's own window is read by the run: not published twice,
    // and not left for the next run.
    store(3..4).await;
    let day = late.to_string();
    let stdout = run(&["--from", &day, "--to", &day, "--late-days"]).await;
    assert!(stdout.contains("late days: none"), "{stdout}");
    assert_eq!(rows(late), 4);
    let stdout = run(&[]).await;
    assert!(
        !stdout.contains("received events after this kind"),
        "{stdout}"
    );

    // Only where the marks are kept: not elsewhere (--dest), not for other kinds.
    for args in [
        &[
            "export",
            "run",
            "event-data",
            "--late-days",
            "--dest",
            "elsewhere",
        ][..],
        &["export", "run", "archive", "--late-days"][..],
    ] {
        let out = sluice_with(&config, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("--late-days"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dest);
}

/// `sluice db dead-letters` counts the letters by pipeline and plugin;
/// `db purge-dead-letters` deletes one pipeline's, all or those not seen again since a day.
#[tokio::test]
async fn dead_letters_are_listed_and_purged_by_pipeline() {
    use bson::{doc, DateTime};
    let db = support::TestDb::initialized().await;
    let config = db_config(&db);
    let day = |d: &str| {
        DateTime::from_chrono(
            format!("{d}T12:00:00Z")
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap(),
        )
    };
    db.store
        .collection("dead_letters")
        .insert_many(vec![
            // Kept in March, not failed again: stale by April.
            doc! { "_id": "a", "pipeline": "import:crm", "plugin": "mapping", "reason": "r", "record": {}, "createdAt": day("2026-03-01") },
            // Kept in March, failed again in May: not stale.
            doc! { "_id": "b", "pipeline": "import:crm", "plugin": "mapping", "reason": "r", "record": {}, "createdAt": day("2026-03-02"), "lastSeenAt": day("2026-05-01") },
            doc! { "_id": "c", "pipeline": "tracking", "plugin": "hostile", "reason": "r", "record": {}, "createdAt": day("2026-04-01") },
        ])
        .await
        .unwrap();
    let listed = sluice_ok(&config, &["db", "dead-letters"]).await;
    assert!(
        listed.contains("import:crm\tmapping\t2\t2026-03-01T12:00:00Z\t2026-05-01T12:00:00Z")
            && listed.contains("tracking\thostile\t1\t"),
        "{listed}"
    );
    let purge = |args: &'static [&'static str]| {
        let mut all = vec!["db", "purge-dead-letters"];
        all.extend_from_slice(args);
        let config = config.clone();
        async move { sluice_ok(&config, &all).await }
    };
    let dry = purge(&[
        "--pipeline",
        "import:crm",
        "--before",
        "2026-04-01",
        "--dry-run",
    ])
    .await;
    assert!(
        dry.starts_with(
            "1 dead letters of `import:crm` last seen before 2026-04-01 would be deleted"
        ),
        "{dry}"
    );
    let done = purge(&["--pipeline", "import:crm", "--before", "2026-04-01"]).await;
    assert!(done.starts_with("deleted 1 "), "{done}");
    let left: Vec<String> = {
        use futures_util::TryStreamExt;
        db.store
            .collection("dead_letters")
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .map(|d| d.get_str("_id").unwrap().to_string())
            .collect()
    };
    assert_eq!(left, ["b", "c"]);
    let all = purge(&["--pipeline", "tracking"]).await;
    assert!(
        all.starts_with("deleted 1 dead letters of `tracking`"),
        "{all}"
    );
}

/// `config check` names every plugin of a chain that does not load, not only the first.
#[test]
fn config_check_names_every_plugin_that_does_not_load() {
    let dir = support::plugin_dir().display().to_string();
    let config = write_temp(
        "sluice.toml",
        &format!(
            "[plugins]\ndir = \"{dir}\"\ntracking_transforms = [\"missing-a\", \"noop\", \"missing-b\"]\n"
        ),
    );
    let out = sluice()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plugin `missing-a`: cannot load")
            && stderr.contains("plugin `missing-b`: cannot load"),
        "{stderr}"
    );
}
