//! The README's first command runs the main job (`sluice demo`); this checks its report
//! against what is in MongoDB and in the output folder.

mod support;

use bson::doc;
use futures_util::TryStreamExt;
use support::TestDb;

fn number_after(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` in\n{text}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `sluice demo` with 15 visitors into database `db`, exporting to `out_dir`.
async fn run_demo(db: &str, out_dir: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--visitors", "15"])
        .env("SLUICE_MONGODB_URI", support::mongo_uri())
        .env("SLUICE_MONGODB_DATABASE", db)
        .env("SLUICE_EXPORT_DESTINATION", out_dir)
        .env("SLUICE_LOG_LEVEL", "warn")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_main_job_reports_what_it_stored_and_wrote() {
    let db = TestDb::new().await;
    let out_dir =
        std::env::temp_dir().join(format!("sluice-demo-{}", uuid::Uuid::new_v4().simple()));
    let out = run_demo(&db.name, &out_dir).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let count = |c: &'static str| {
        let coll = db.store.collection(c);
        async move { coll.count_documents(doc! {}).await.unwrap() }
    };
    let (events, sessions, users) = (
        count("events").await,
        count("sessions").await,
        count("users").await,
    );
    assert_eq!(number_after(&stdout, "events"), events);
    assert_eq!(number_after(&stdout, "sessions"), sessions);
    assert_eq!(number_after(&stdout, "users"), users);
    assert!(
        events > 30 && sessions >= 15 && users == 16,
        "15 visitors and a crawler: {stdout}"
    );
    let sent_line = stdout.lines().find(|l| l.starts_with("sent ")).unwrap();
    assert!(
        sent_line.contains(&format!("{events} stored")),
        "{sent_line}"
    );
    assert!(
        sent_line.contains("duplicates ignored") && !sent_line.contains(" 0 duplicates"),
        "the resent batch is deduplicated: {sent_line}"
    );
    let bots = db
        .store
        .collection("events")
        .count_documents(doc! { "metadata.bot": true })
        .await
        .unwrap();
    assert_eq!(bots, 3);

    // The export files it lists exist, with their manifests, and hold every event.
    for kind in ["EVENT_DATA", "DAILY_ANALYTICS", "USER_DATA"] {
        assert!(
            stdout.contains(&format!("{kind}/dt=")),
            "{kind} not reported"
        );
        assert!(out_dir.join(kind).exists(), "{kind} not written");
    }
    let mut exported = 0;
    for entry in std::fs::read_dir(out_dir.join("EVENT_DATA")).unwrap() {
        // Partitions (`dt=...`), beside the symlink manifests' folder.
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('_') {
            continue;
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("_manifest.json")).unwrap()).unwrap();
        exported += manifest["rows"].as_u64().unwrap();
    }
    assert_eq!(
        exported, events,
        "yesterday's and today's partitions hold every event"
    );
    let jobs = db
        .store
        .collection("export_jobs")
        .count_documents(doc! { "status": "COMPLETED" })
        .await
        .unwrap();
    assert_eq!(jobs, 3);

    // Its config is kept for reference but inactive: its API died with the demo, so a
    // later `sluice serve` must not schedule it.
    let stored = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": "demo-crm-contacts" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_bool("isActive"), Ok(false), "{stored}");
    assert!(
        stdout.contains(&format!("getSiblingDB(\"{}\")", db.name)),
        "the hint names the demo's database: {stdout}"
    );
    // The resent batch counts among the events sent.
    let sent: u64 = sent_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent >= events + 100, "{sent_line}");

    // The bundled import: one contact per tracked visitor, fetched page by page behind
    // OAuth2, emails replaced by the WASM plugin's digests.
    let contacts: Vec<bson::Document> = db
        .store
        .collection("contacts")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(number_after(&stdout, "contacts"), contacts.len() as u64);
    assert_eq!(contacts.len(), 15, "{stdout}");
    for c in &contacts {
        let email = c.get_str("email").unwrap();
        assert!(
            email.len() == 64 && email.chars().all(|ch| ch.is_ascii_hexdigit()),
            "email not redacted: {c}"
        );
        let visitor = c.get_str("visitorId").unwrap();
        let known = db
            .store
            .collection("users")
            .count_documents(doc! { "visitorId": visitor })
            .await
            .unwrap();
        assert_eq!(known, 1, "a contact's visitor is a tracked user");
    }
    let import_line = stdout
        .lines()
        .find(|l| l.starts_with("Import `demo-crm-contacts`"))
        .unwrap_or_else(|| panic!("no import line in\n{stdout}"));
    assert!(
        import_line.contains("15 contacts fetched in 1 page "),
        "{import_line}"
    );
    assert!(import_line.contains("15 inserted"), "{import_line}");

    // Re-running works: the same import updates what it inserted, nothing is duplicated.
    let again = run_demo(&db.name, &out_dir).await;
    let stdout2 = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{stdout2}");
    let contacts2 = db
        .store
        .collection("contacts")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(number_after(&stdout2, "contacts"), contacts2);
    assert_eq!(
        number_after(&stdout2, "users"),
        32,
        "two runs, new visitors each"
    );
    assert!(
        stdout2.contains("0 inserted, 15 updated"),
        "the contacts are upserted by contactId: {stdout2}"
    );
    std::fs::remove_dir_all(out_dir).unwrap();
}

/// `scripts/test.sh` runs the README's first command (`scripts/demo.sh`, exactly as a
/// new user would, into the default `sluice` database and `./sluice-output`) and keeps
/// what it printed; this checks that report against MongoDB and the output folder.
#[tokio::test]
async fn the_quick_start_report_matches_mongodb_and_the_output_folder() {
    let path = std::env::var("SLUICE_DEMO_REPORT").expect(
        "SLUICE_DEMO_REPORT is not set: run the tests through `scripts/test.sh`, which runs the quick start first",
    );
    let report = std::fs::read_to_string(&path).unwrap();
    let store = sluice_connectors::Store::connect_uri(
        &support::mongo_uri(),
        "sluice",
        &sluice_core::config::WriteConcernLevel::Majority,
    )
    .await
    .unwrap();
    for (label, collection) in [
        ("events", "events"),
        ("sessions", "sessions"),
        ("users", "users"),
        ("contacts", "contacts"),
    ] {
        let stored = store
            .collection(collection)
            .count_documents(doc! {})
            .await
            .unwrap();
        assert_eq!(number_after(&report, label), stored, "{label} in\n{report}");
        assert!(stored > 0, "{label}: the quick start stored nothing");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = 0;
    for line in report.lines() {
        if let Some(file) = line.trim().strip_prefix("e.g. ") {
            let file = root.join("sluice-output").join(file);
            assert!(file.exists(), "{} is reported but missing", file.display());
            files += 1;
        }
    }
    assert_eq!(files, 3, "one file listed per export kind:\n{report}");
    assert!(report.contains("Import `demo-crm-contacts`"), "{report}");
}
