//! Real `sluice` processes stopped mid-run. Two `sluice serve` on one database: the
//! scheduled run of an import is claimed by one; `kill -9` it mid-run and the other takes
//! the run over after the lease (or a later fire of the job goes on first, and the run is
//! recorded superseded) and completes it from the import's checkpoint, with nothing lost
//! or duplicated. `serve`, `export run` and `jobs run` stopped by a signal record what
//! they were running (INTERRUPTED imports, FAILED exports), never leave it RUNNING, and a
//! stopped archive hands back the archive lock. Export runs cancelled in a living process
//! are recorded FAILED at once and still finish (or undo) the partition they were
//! publishing; an archive that lost its lock deletes nothing. A process whose clock is
//! wrong dates its exports by the database's clock.

mod support;

use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::{Json, Router};
use bson::doc;
use serde_json::{json, Value};
use sluice_connectors::objstore::{ObjectStore, S3Store};
use sluice_core::model::ExportJobType;
use sluice_jobs::export::{run_export, ExportContext, ExportError, ExportRequest, ExportSummary};
use support::TestDb;

/// 6 pages of 10 records, 700 ms a page.
async fn slow_api() -> String {
    let app = Router::new().route(
        "/items",
        get(
            |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let from: u64 = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
                let data: Vec<Value> = (from..from + 10).map(|i| json!({ "id": i })).collect();
                let next = if from + 10 < 60 {
                    json!((from + 10).to_string())
                } else {
                    Value::Null
                };
                Json(json!({ "data": data, "next": next }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/items")
}

/// Applies an every-second IMPORT of the slow API, and writes a `sluice.toml` for this
/// database with `extra` settings; returns its folder and path.
async fn setup(db: &TestDb, feed: &str, extra: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    setup_on(db, feed, extra, &slow_api().await).await
}

/// [`setup`], importing from `url`.
async fn setup_on(
    db: &TestDb,
    feed: &str,
    extra: &str,
    url: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let file = sluice_core::integration::parse_file(
        "feed.toml",
        &format!(
            r#"
name = "{feed}"
type = "IMPORT"
endpoint = "{url}"
schedule = "* * * * * *"
allow_private_network = true
[source]
records = "$.data[*]"
[source.pagination]
type = "cursor"
cursor_path = "$.next"
[target]
collection = "things"
key = "thingId"
[mapping.thingId]
path = "$.id"
type = "string"
required = true
"#
        ),
    )
    .unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    let dir =
        std::env::temp_dir().join(format!("sluice-replicas-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n{extra}[log]\nlevel = \"warn\"\n",
            support::mongo_uri(),
            db.name
        ),
    )
    .unwrap();
    (dir, config)
}

/// `sluice serve` on `config` (the database named there, not the caller's), its output
/// discarded.
fn serve_command(config: &std::path::Path) -> std::process::Command {
    let mut cmd = support::sluice_command();
    cmd.args(["--config"])
        .arg(config)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd
}

/// A child process that is killed and reaped when dropped: a test that fails while it
/// runs leaves no `sluice` behind (one with a schedule would go on claiming runs and
/// writing to the test's database after the test binary exited).
struct Proc(Option<std::process::Child>);

impl Proc {
    fn spawn(cmd: &mut std::process::Command) -> Self {
        Proc(Some(cmd.spawn().unwrap()))
    }

    fn into_inner(mut self) -> std::process::Child {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A child already waited for is not signalled again.
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `sluice serve` process on `config`.
fn serve(config: &std::path::Path) -> Proc {
    Proc::spawn(&mut serve_command(config))
}

#[tokio::test]
async fn a_killed_replicas_run_is_taken_over_and_completed_by_the_other() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup(
        &db,
        "slow-feed",
        "[scheduler]\nlease_seconds = 3\nreload_seconds = 1\n",
    )
    .await;
    let spawn = || serve(&config);
    let mut replicas = vec![spawn(), spawn()];
    let runs = db.store.collection("scheduled_runs");

    // Wait for the first claim, then kill its owner mid-run (6 pages take 4.2 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let first = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no replica claimed a run"
        );
        if let Some(d) = runs
            .find_one(doc! { "status": "RUNNING" })
            .sort(doc! { "scheduledFor": 1 })
            .await
            .unwrap()
        {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = first.get_str("_id").unwrap().to_string();
    let owner = first.get_str("owner").unwrap().to_string();
    let owner_pid: u32 = owner.split('-').next().unwrap().parse().unwrap();
    // Killed once a page is checkpointed, so the survivor has something to resume from.
    wait_for_checkpoint(&db, "slow-feed").await;
    let victim = replicas
        .iter()
        .position(|p| p.id() == owner_pid)
        .expect("the owner is one of ours");
    let mut killed = replicas.remove(victim);
    killed.kill().unwrap(); // SIGKILL: no chance to hand the run back
    killed.wait().unwrap();

    // The survivor takes it over once the lease (3 s) has expired, and finishes it.
    let done = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the run was never finished"
        );
        let d = runs.find_one(doc! { "_id": &id }).await.unwrap().unwrap();
        if d.get_str("status").unwrap() != "RUNNING" {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Either the other replica took the run over and finished it, or (the job fires
    // every second) a later fire claimed once the lease lapsed went on from the run's
    // checkpoint first, and the run is recorded superseded by it, not run again.
    let finisher = match done.get_str("status").unwrap() {
        "COMPLETED" => {
            // At least one take-over; one more if a fire of the job was claimed while the
            // first was being taken (that take-over is then handed back and retried).
            assert!(done.get_i32("attempts").unwrap() >= 2, "{done}");
            done.clone()
        }
        "SKIPPED" => {
            let reason = done.get_str("reason").unwrap();
            assert!(reason.starts_with("superseded"), "{done}");
            let later = reason.split('`').nth(1).unwrap();
            // It may still be going: waited for.
            loop {
                assert!(std::time::Instant::now() < deadline, "{later} never ended");
                let d = runs.find_one(doc! { "_id": later }).await.unwrap().unwrap();
                if d.get_str("status").unwrap() != "RUNNING" {
                    assert_eq!(d.get_str("status").unwrap(), "COMPLETED", "{d}");
                    break d;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        other => panic!("{other}: {done}"),
    };
    let mut survivor = replicas.remove(0);
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(survivor.id().to_string())
        .status();
    let _ = survivor.wait();
    assert_ne!(
        finisher.get_str("owner").unwrap(),
        owner,
        "finished by the other replica"
    );
    let things = db.store.collection("things");
    assert_eq!(
        things.count_documents(doc! {}).await.unwrap(),
        60,
        "nothing lost, nothing duplicated"
    );
    let resumed = db
        .store
        .collection("import_runs")
        .count_documents(doc! { "config": "slow-feed", "resumed": true, "status": "COMPLETED" })
        .await
        .unwrap();
    assert!(resumed >= 1, "the survivor resumed from the checkpoint");
    let _ = std::fs::remove_dir_all(dir);
}

/// A `sluice serve` process on `config` whose wall clock runs `ahead` of the real one
/// (libfaketime), logging to `log`.
fn serve_with_clock_ahead(config: &std::path::Path, ahead: &str, log: &std::path::Path) -> Proc {
    let lib = std::env::var("SLUICE_FAKETIME_LIB")
        .ok()
        .filter(|l| !l.is_empty())
        .expect("SLUICE_FAKETIME_LIB is not set: run the tests through `scripts/test.sh`");
    Proc::spawn(
        serve_command(config)
            .env("LD_PRELOAD", lib)
            .env("FAKETIME", ahead)
            .stderr(std::fs::File::create(log).unwrap()),
    )
}

/// Two replicas whose clocks disagree by 30 s: leases are timed by the database's clock,
/// so the one running fast neither takes over the other's live runs nor starts a run of
/// the job beside them, and it warns about its clock.
#[tokio::test]
async fn a_replica_whose_clock_runs_fast_takes_over_no_live_run() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup(
        &db,
        "skewed-feed",
        "[scheduler]\nlease_seconds = 3\nreload_seconds = 1\n",
    )
    .await;
    let runs = db.store.collection("scheduled_runs");
    let mut on_time = serve(&config);
    // The replica on time claims a run first (6 pages take 4.2 s)...
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while runs
        .count_documents(doc! { "status": "RUNNING" })
        .await
        .unwrap()
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no run was claimed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...then one 30 s fast joins. Timed by its own clock, every lease the other writes
    // (3 s) looks 27 s lapsed to it.
    let log = dir.join("fast.log");
    let mut fast = serve_with_clock_ahead(&config, "+30s", &log);
    // Watched for 12 s at least, and until two runs completed (a loaded machine may take
    // longer): the RUNNING records seen at the same moment.
    let mut together: Vec<Vec<String>> = Vec::new();
    let watch_from = std::time::Instant::now();
    let deadline = watch_from + Duration::from_secs(90);
    loop {
        let running: Vec<String> = {
            use futures_util::TryStreamExt;
            runs.find(doc! { "status": "RUNNING" })
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .iter()
                .map(|r| r.get_str("_id").unwrap().to_string())
                .collect()
        };
        if running.len() > 1 {
            together.push(running);
        }
        let completed = runs
            .count_documents(doc! { "status": "COMPLETED" })
            .await
            .unwrap();
        if watch_from.elapsed() >= Duration::from_secs(12) && completed >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job stopped running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in [&on_time, &fast] {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(p.id().to_string())
            .status();
    }
    let _ = on_time.wait();
    let _ = fast.wait();

    let all: Vec<bson::Document> = {
        use futures_util::TryStreamExt;
        runs.find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    let taken_over: Vec<_> = all
        .iter()
        .filter(|r| r.get_i32("attempts").unwrap_or(1) > 1 || r.contains_key("takenOverAt"))
        .collect();
    assert!(
        taken_over.is_empty(),
        "no replica died, so no run was taken over: {taken_over:?}"
    );
    // Two records can be RUNNING for a moment (both replicas claimed an instant, and
    // one is about to step back): of any such pair, at most one ran.
    let status = |id: &str| {
        all.iter()
            .find(|r| r.get_str("_id") == Ok(id))
            .and_then(|r| r.get_str("status").ok())
            .unwrap_or("?")
            .to_string()
    };
    for ids in &together {
        let ran = ids.iter().filter(|id| status(id) != "SKIPPED").count();
        assert!(ran <= 1, "one run of the job at a time: {ids:?} in {all:?}");
    }
    let completed = all
        .iter()
        .filter(|r| r.get_str("status") == Ok("COMPLETED"))
        .count();
    assert!(completed >= 2, "the job kept running: {all:?}");
    let warned = std::fs::read_to_string(&log).unwrap();
    assert!(
        warned.contains("s ahead of the database's"),
        "the fast replica warns about its clock: {warned}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_import_in_flight_when_serve_stops_is_recorded_interrupted_with_its_progress() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup(&db, "stopped-feed", "").await;
    let mut serve = serve(&config);
    // Wait until the run has checkpointed a page or two of its six, then stop serve.
    wait_for_checkpoint(&db, "stopped-feed").await;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(serve.id().to_string())
        .status();
    let _ = serve.wait();
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "stopped-feed" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("status").unwrap(), "INTERRUPTED", "{run}");
    let pages = run.get_i64("pages").unwrap();
    assert!((1..6).contains(&pages), "the checkpoint's progress: {run}");
    assert!(run.get("endTime").is_some_and(|t| *t != bson::Bson::Null));
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (up to a minute) until the import `feed` has checkpointed a page.
async fn wait_for_checkpoint(db: &TestDb, feed: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no page was checkpointed"
        );
        let cp = db
            .store
            .collection("import_checkpoints")
            .find_one(doc! { "_id": feed })
            .await
            .unwrap();
        if cp.and_then(|c| c.get_i64("pages").ok()).unwrap_or(0) >= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `sluice.toml` exporting to `bucket` through a proxy whose uploads never end, with
/// `extra` settings; returns its folder and path.
async fn export_config(
    db: &TestDb,
    bucket: &support::TestBucket,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let proxy = s3_proxy_delaying(false, Duration::from_secs(3600)).await;
    let dir =
        std::env::temp_dir().join(format!("sluice-replicas-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    write_export_config(&config, db, bucket, &support::mongo_uri(), &proxy, extra);
    (dir, config)
}

/// Writes at `path` a `sluice.toml` for `db` through `mongo`, exporting to `bucket`
/// through `s3_endpoint`, with `extra` settings.
fn write_export_config(
    path: &std::path::Path,
    db: &TestDb,
    bucket: &support::TestBucket,
    mongo: &str,
    s3_endpoint: &str,
    extra: &str,
) {
    let settings = support::s3_settings(&bucket.name);
    std::fs::write(
        path,
        format!(
            "[mongodb]\nuri = \"{mongo}\"\ndatabase = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [export]\ndestination = \"s3://{}/exports\"\n\
             [s3]\nendpoint = \"{s3_endpoint}\"\naccess_key = \"{}\"\nsecret_key = \"{}\"\npath_style = true\n\
             {extra}[log]\nlevel = \"warn\"\n",
            db.name,
            bucket.name,
            settings.access_key,
            settings.secret_key,
        ),
    )
    .unwrap();
}

/// Waits (up to a minute) for an export to be RUNNING and returns its record.
async fn wait_for_running_export(jobs: &mongodb::Collection<bson::Document>) -> bson::Document {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "no export started");
        if let Some(d) = jobs.find_one(doc! { "status": "RUNNING" }).await.unwrap() {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the export `running` is now recorded FAILED by its stopped process.
async fn assert_recorded_stopped(
    jobs: &mongodb::Collection<bson::Document>,
    running: &bson::Document,
) {
    let job = jobs
        .find_one(doc! { "jobId": running.get_str("jobId").unwrap() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_str("status").unwrap(), "FAILED", "{job}");
    assert!(
        job.get_str("error")
            .unwrap()
            .contains("process was stopped"),
        "{job}"
    );
}

/// A DAILY_ANALYTICS schedule firing every second, its one day to catch up.
const DAILY_EVERY_SECOND: &str = "[[schedules]]\nname = \"daily\"\ntype = \"DAILY_ANALYTICS\"\ncron = \"* * * * * *\"\ncatch_up = 1\n";

#[tokio::test]
async fn an_export_in_flight_when_serve_stops_is_recorded_failed_not_left_running() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let (dir, config) = export_config(&db, &bucket, DAILY_EVERY_SECOND).await;
    // Its parts staged in a work folder of its own, to see what is left there.
    let work = work_dir_of(&config, &dir, "");
    let serve = sluice(&config, &["serve"]);
    let jobs = db.store.collection("export_jobs");
    let running = wait_for_running_export(&jobs).await;
    // Its upload hangs, its part in the work folder; stop serve.
    wait_for_staging(&work).await;
    let (status, stderr) = stop(serve, "-TERM");
    assert!(status.success(), "serve ends cleanly on SIGTERM: {stderr}");
    assert_recorded_stopped(&jobs, &running).await;
    // The stopped stage's part folder went with the process.
    assert_eq!(staged(&work), 0, "the stopped run's work folder is removed");
    let _ = std::fs::remove_dir_all(dir);
}

/// A stage whose encoder is busy when serve stops (here a plugin that never returns,
/// allowed a minute per batch) is not waited for: its part folder is removed as the
/// process exits, not left until a later run's sweep a day on.
#[tokio::test]
async fn a_stage_busy_encoding_when_serve_stops_leaves_no_work_folder() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let (dir, config) = export_config(&db, &bucket, DAILY_EVERY_SECOND).await;
    // The `hostile` plugin looping, with a manifest of its own giving it a minute.
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        support::plugin_dir().join("hostile.wasm"),
        plugins.join("hostile.wasm"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(support::plugin_dir().join("hostile.toml")).unwrap();
    std::fs::write(
        plugins.join("hostile.toml"),
        format!("{manifest}\n[limits]\nbatch_deadline_ms = 60000\n"),
    )
    .unwrap();
    let work = work_dir_of(
        &config,
        &dir,
        &format!(
            "[plugins]\ndir = {:?}\nexport_transforms = [\"hostile\"]\nmax_batch_deadline_ms = 60000\n[plugins.config.hostile]\nmode = \"loop\"\n",
            plugins.display().to_string()
        ),
    );
    let serve = sluice(&config, &["serve"]);
    let jobs = db.store.collection("export_jobs");
    let running = wait_for_running_export(&jobs).await;
    wait_for_staging(&work).await;
    // The plugin is looping on the day's row.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, stderr) = stop(serve, "-TERM");
    assert!(status.success(), "serve ends cleanly on SIGTERM: {stderr}");
    assert_recorded_stopped(&jobs, &running).await;
    assert_eq!(
        staged(&work),
        0,
        "the stopped run's work folder is removed: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Points `config`'s exports at a work folder of their own in `dir` (returned), with
/// `sections` added before its `[log]`.
fn work_dir_of(
    config: &std::path::Path,
    dir: &std::path::Path,
    sections: &str,
) -> std::path::PathBuf {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replacen(
            "[export]\n",
            &format!("[export]\nwork_dir = {:?}\n", work.display().to_string()),
            1,
        )
        .replacen("[log]", &format!("{sections}[log]"), 1);
    std::fs::write(config, text).unwrap();
    work
}

/// How many stages' folders (or id spools) are in the work folder `work`.
fn staged(work: &std::path::Path) -> usize {
    std::fs::read_dir(work)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("sluice-work-")
        })
        .count()
}

/// Waits (up to 30 s) for a stage to begin in `work`.
async fn wait_for_staging(work: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while staged(work) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing was staged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `sluice` command on `config` with none of the environment's `SLUICE_*` settings, its
/// stderr captured.
fn sluice(config: &std::path::Path, args: &[&str]) -> Proc {
    Proc::spawn(&mut sluice_command(config, args))
}

fn sluice_command(config: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = support::sluice_command();
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// An export run by a process whose clock is two hours fast dates what it writes (the
/// manifest's `createdAt`, the run's id and record) by the database's clock, as it reads
/// by it: a warehouse comparing a manifest's times with the run's sees one clock.
#[tokio::test]
async fn an_export_by_a_process_whose_clock_is_wrong_is_dated_by_the_database() {
    use sluice_core::model::{Event, EventMetadata, EventType};
    let db = TestDb::initialized().await;
    let day = chrono::Utc::now().date_naive() - chrono::Days::new(2);
    let noon = bson::DateTime::from_millis(
        day.and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis(),
    );
    let events: Vec<bson::Document> = (0..5)
        .map(|i| {
            bson::to_document(&Event {
                id: None,
                event_id: format!("clock-{i}"),
                user_id: "u".into(),
                session_id: "s".into(),
                event_type: EventType::PageView,
                timestamp: noon,
                properties: doc! {},
                metadata: EventMetadata::default(),
                page_url: Some("/".into()),
                referrer: None,
                duration: None,
                created_at: noon,
                updated_at: noon,
            })
            .unwrap()
        })
        .collect();
    db.store
        .collection("events")
        .insert_many(events)
        .await
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("sluice-replicas-{}", uuid::Uuid::new_v4().simple()));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n[export]\ndestination = \"{}\"\n[log]\nlevel = \"warn\"\n",
            support::mongo_uri(),
            db.name,
            out.display()
        ),
    )
    .unwrap();
    let lib = std::env::var("SLUICE_FAKETIME_LIB")
        .ok()
        .filter(|l| !l.is_empty())
        .expect("SLUICE_FAKETIME_LIB is not set: run the tests through `scripts/test.sh`");
    let run = sluice_command(
        &config,
        &["export", "run", "event-data", "--from", &day.to_string()],
    )
    .env("LD_PRELOAD", lib)
    .env("FAKETIME", "+2h")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let real_now = chrono::Utc::now();
    let near_now = |t: chrono::DateTime<chrono::Utc>, what: &str| {
        let off = (t - real_now).num_seconds().abs();
        assert!(off < 15 * 60, "{what} is {t}, the time is {real_now}");
    };
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_str("status").unwrap(), "COMPLETED", "{job}");
    near_now(
        job.get_datetime("createdAt").unwrap().to_chrono(),
        "the run's createdAt",
    );
    // `event-data-YYYYMMDDTHHMMSS-...`
    let job_id = job.get_str("jobId").unwrap();
    let stamp = job_id.split('-').nth(2).unwrap();
    let at = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S")
        .unwrap_or_else(|e| panic!("{job_id}: {e}"))
        .and_utc();
    near_now(at, "the run id's time");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(out.join(format!("EVENT_DATA/dt={day}/_manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows"], 5, "{manifest}");
    let created = chrono::DateTime::parse_from_rfc3339(manifest["createdAt"].as_str().unwrap())
        .unwrap()
        .to_utc();
    near_now(created, "the manifest's createdAt");
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `signal` (`-INT` is Ctrl-C) to `child` and returns its exit status and stderr.
fn stop(child: Proc, signal: &str) -> (std::process::ExitStatus, String) {
    let _ = std::process::Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status();
    let out = child.into_inner().wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_export_run_stopped_by_ctrl_c_is_recorded_failed_not_left_running() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let (dir, config) = export_config(&db, &bucket, "").await;
    let run = sluice(&config, &["export", "run", "DAILY_ANALYTICS"]);
    let jobs = db.store.collection("export_jobs");
    let running = wait_for_running_export(&jobs).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, stderr) = stop(run, "-INT");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("stopped by a signal"), "{stderr}");
    assert_recorded_stopped(&jobs, &running).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Answers the first page at once; every later one after an hour.
async fn stalling_api() -> String {
    let app = Router::new().route(
        "/items",
        get(
            |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                if q.contains_key("cursor") {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let data: Vec<Value> = (0..10).map(|i| json!({ "id": i })).collect();
                Json(json!({ "data": data, "next": "10" }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/items")
}

#[tokio::test]
async fn a_second_ctrl_c_stops_an_import_at_once_and_records_it_interrupted() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup_on(&db, "stalled-feed", "", &stalling_api().await).await;
    let run = sluice(&config, &["import", "run", "stalled-feed"]);
    wait_for_checkpoint(&db, "stalled-feed").await;
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .arg(sig)
            .arg(run.id().to_string())
            .status();
    };
    signal("-INT");
    // The next page's fetch hangs: the first signal alone would wait for it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    signal("-INT");
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || run.into_inner().wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped at once"), "{stderr}");
    let import = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "stalled-feed" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(import.get_str("status").unwrap(), "INTERRUPTED", "{import}");
    assert_eq!(import.get_i64("pages").unwrap(), 1, "{import}");
    let manual = db
        .store
        .collection("scheduled_runs")
        .find_one(doc! { "job": "integration:stalled-feed", "manual": true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manual.get_str("status").unwrap(), "FAILED", "{manual}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_job_run_by_hand_and_stopped_by_ctrl_c_records_its_run_and_its_import() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup(&db, "hand-feed", "").await;
    let run = sluice(&config, &["jobs", "run", "integration:hand-feed"]);
    wait_for_checkpoint(&db, "hand-feed").await;
    let (status, stderr) = stop(run, "-INT");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("resumes from the last checkpoint"),
        "{stderr}"
    );
    // The run by hand is ended, so it no longer holds the job...
    let manual = db
        .store
        .collection("scheduled_runs")
        .find_one(doc! { "job": "integration:hand-feed", "manual": true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manual.get_str("status").unwrap(), "FAILED", "{manual}");
    assert!(
        manual
            .get_str("error")
            .unwrap()
            .contains("stopped by a signal"),
        "{manual}"
    );
    // ...and the import is INTERRUPTED with its checkpoint's progress, not RUNNING.
    let import = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "hand-feed" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(import.get_str("status").unwrap(), "INTERRUPTED", "{import}");
    assert!(import.get_i64("pages").unwrap() >= 1, "{import}");
    // The next run by hand is not refused and finishes the feed from the checkpoint (run
    // off this thread: the API it reads is served by this test's runtime).
    let again = config.clone();
    let out = tokio::task::spawn_blocking(move || {
        sluice_command(&again, &["jobs", "run", "integration:hand-feed"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = db
        .store
        .collection("things")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 60);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_archive_stopped_by_ctrl_c_hands_back_the_archive_lock() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    seed_old_events(&db, 20).await;
    let (dir, config) = export_config(&db, &bucket, "").await;
    let run = sluice(&config, &["export", "run", "ARCHIVE"]);
    let jobs = db.store.collection("export_jobs");
    let running = wait_for_running_export(&jobs).await;
    let locks = db.store.collection("job_locks");
    // The run is recorded RUNNING just before it takes the lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = locks.find_one(doc! { "_id": "ARCHIVE" }).await.unwrap();
        let owner = held.and_then(|l| l.get_str("owner").ok().map(str::to_string));
        if owner.as_deref() == Some(running.get_str("jobId").unwrap()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the running archive never held the lock: {owner:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its upload hangs; stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, stderr) = stop(run, "-INT");
    assert!(!status.success(), "{stderr}");
    assert_recorded_stopped(&jobs, &running).await;
    assert_eq!(
        locks.find_one(doc! { "_id": "ARCHIVE" }).await.unwrap(),
        None,
        "the stopped archive handed its lock back"
    );
    // Nothing was deleted: the day was never published.
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        20
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP proxy to the S3 server that holds requests for `delay` before forwarding them:
/// every `PUT` (an upload that never ends when the delay is long), or with `copies_only`
/// only server-side copies (`x-amz-copy-source`: a slow publish).
async fn s3_proxy_delaying(copies_only: bool, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = support::s3_upstream();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    let held = head.starts_with("put ")
                        && (!copies_only || head.contains("x-amz-copy-source"));
                    if held {
                        tokio::time::sleep(delay).await;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    format!("http://{addr}")
}

/// The bucket's object store reached through `endpoint`.
async fn s3_through(bucket: &support::TestBucket, endpoint: String) -> ObjectStore {
    let mut settings = support::s3_settings(&bucket.name);
    settings.endpoint = endpoint;
    ObjectStore::S3(S3Store::connect(&settings).await.unwrap())
}

#[tokio::test]
async fn an_export_whose_run_is_cancelled_is_recorded_failed_at_once() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    // Its uploads never finish: the run is cancelled while it stages.
    let dest = s3_through(
        &bucket,
        s3_proxy_delaying(false, Duration::from_secs(3600)).await,
    )
    .await;
    let ctx = ExportContext::new(db.store.clone(), dest);
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let run = tokio::spawn(async move {
        run_export(
            &ctx,
            &ExportRequest::day(ExportJobType::DailyAnalytics, yesterday, 90),
        )
        .await
    });
    let jobs = db.store.collection("export_jobs");
    let running = wait_for_running_export(&jobs).await;
    // What a scheduled run that lost its lease does to its work.
    run.abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let job = jobs
            .find_one(doc! { "jobId": running.get_str("jobId").unwrap() })
            .await
            .unwrap()
            .unwrap();
        if job.get_str("status").unwrap() == "FAILED" {
            assert!(
                job.get_str("error")
                    .unwrap()
                    .contains("stopped before it ended"),
                "{job}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still RUNNING after its run was cancelled: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_run_cancelled_while_publishing_still_leaves_the_partition_whole() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let request = ExportRequest::day(ExportJobType::DailyAnalytics, yesterday, 90);
    let first = run_export(
        &ExportContext::new(db.store.clone(), bucket.object_store()),
        &request,
    )
    .await
    .unwrap();
    let prefix = &first.partitions[0].prefix;
    let store = bucket.object_store();
    let success = format!("{prefix}/_SUCCESS");
    let listed = || async { store.list(&format!("{prefix}/")).await.unwrap() };
    assert!(listed().await.iter().any(|o| o.key == success));

    // A second run whose copies into place take a while; cancel it once it has started
    // publishing (the old `_SUCCESS` is gone).
    let slow = s3_through(
        &bucket,
        s3_proxy_delaying(true, Duration::from_millis(1500)).await,
    )
    .await;
    let ctx = ExportContext::new(db.store.clone(), slow);
    let second = tokio::spawn({
        let request = request.clone();
        async move { run_export(&ctx, &request).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while listed().await.iter().any(|o| o.key == success) {
        assert!(
            std::time::Instant::now() < deadline,
            "never started publishing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.abort();
    assert!(sluice_jobs::export::wait_for_publishes(Duration::from_secs(30)).await);

    // The publish went on to its end.
    let manifest = assert_whole(&store, prefix).await;
    assert_ne!(
        manifest["jobId"],
        first.job_id.as_str(),
        "the second run's files"
    );
    // Its FAILED record (written when it was cancelled) lists the partition it replaced.
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "jobId": manifest["jobId"].as_str().unwrap() })
        .await
        .unwrap()
        .expect("the second run's record");
    assert_eq!(job.get_str("status").unwrap(), "FAILED", "{job}");
    let listed: Vec<&str> = job
        .get_array("partitions")
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_document()?.get_str("prefix").ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed, [prefix.as_str()], "{job}");
}

/// An ARCHIVE of 20 old events started in the background, writing to a bucket through
/// a proxy that delays every S3 request by 1.5 s (the bucket lives as long as the
/// returned guard).
async fn slow_archive(
    db: &TestDb,
) -> (
    support::TestBucket,
    tokio::task::JoinHandle<Result<ExportSummary, ExportError>>,
) {
    let bucket = support::TestBucket::new().await;
    seed_old_events(db, 20).await;
    let slow = s3_through(
        &bucket,
        s3_proxy_delaying(true, Duration::from_millis(1500)).await,
    )
    .await;
    let ctx = ExportContext::new(db.store.clone(), slow);
    let mut request =
        ExportRequest::day(ExportJobType::Archive, chrono::Utc::now().date_naive(), 90);
    request.archive_settle = Duration::ZERO;
    (
        bucket,
        tokio::spawn(async move { run_export(&ctx, &request).await }),
    )
}

#[tokio::test]
async fn an_archive_that_lost_its_lock_while_staging_publishes_nothing() {
    let db = TestDb::initialized().await;
    let (_bucket, run) = slow_archive(&db).await;
    // As soon as it holds the lock (its staging is slow), another archive takes it over.
    let locks = db.store.collection("job_locks");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while locks
        .update_one(
            doc! { "_id": "ARCHIVE" },
            doc! { "$set": { "owner": "another-archive" } },
        )
        .await
        .unwrap()
        .matched_count
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "never took the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = run.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("lost its lock"), "{err}");
    // It did not make the day pending nor publish it next to the new holder.
    let pending = db
        .store
        .collection("export_jobs")
        .count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
        .await
        .unwrap();
    assert_eq!(pending, 0);
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        20
    );
}

#[tokio::test]
async fn an_archive_that_lost_its_lock_while_publishing_deletes_nothing() {
    let db = TestDb::initialized().await;
    let (_bucket, run) = slow_archive(&db).await;
    // Once it records the day it is about to publish, its lease lapses and another
    // archive takes the lock.
    let jobs = db.store.collection("export_jobs");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while jobs
        .count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
        .await
        .unwrap()
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never started publishing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.store
        .collection("job_locks")
        .update_one(
            doc! { "_id": "ARCHIVE" },
            doc! { "$set": { "owner": "another-archive" } },
        )
        .await
        .unwrap();
    let err = run.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("lost its lock"), "{err}");
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        20,
        "nothing deleted"
    );
}

/// `n` events of a day 100 days ago, stored long since (past the archive's settle time).
async fn seed_old_events(db: &TestDb, n: usize) {
    use sluice_core::model::{Event, EventMetadata, EventType};
    let old = bson::DateTime::from_millis(
        (chrono::Utc::now() - chrono::Duration::days(100)).timestamp_millis(),
    );
    let events: Vec<bson::Document> = (0..n)
        .map(|i| {
            bson::to_document(&Event {
                id: None,
                event_id: format!("old-{i}"),
                user_id: format!("u{i}"),
                session_id: format!("s{i}"),
                event_type: EventType::PageView,
                timestamp: old,
                properties: doc! {},
                metadata: EventMetadata::default(),
                page_url: Some("/".into()),
                referrer: None,
                duration: None,
                created_at: old,
                updated_at: old,
            })
            .unwrap()
        })
        .collect();
    db.store
        .collection("events")
        .insert_many(events)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_event_export_of_a_day_archived_while_it_ran_publishes_nothing() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    seed_old_events(&db, 20).await;
    let day = (chrono::Utc::now() - chrono::Duration::days(100)).date_naive();
    // The export's uploads take 3 s; an archive of the same day runs meanwhile.
    let slow = s3_through(
        &bucket,
        s3_proxy_delaying(false, Duration::from_secs(3)).await,
    )
    .await;
    let exporting = tokio::spawn({
        let ctx = ExportContext::new(db.store.clone(), slow);
        async move { run_export(&ctx, &ExportRequest::day(ExportJobType::EventData, day, 90)).await }
    });
    wait_for_running_export(&db.store.collection("export_jobs")).await;
    let mut archive =
        ExportRequest::day(ExportJobType::Archive, chrono::Utc::now().date_naive(), 90);
    archive.archive_settle = Duration::ZERO;
    let archived = run_export(
        &ExportContext::new(db.store.clone(), bucket.object_store()),
        &archive,
    )
    .await
    .unwrap();
    assert_eq!(archived.deleted, 20);
    let err = exporting.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("archived") && err.contains(&day.to_string()),
        "{err}"
    );
    let event_data = bucket
        .object_store()
        .list(&format!("EVENT_DATA/dt={day}/"))
        .await
        .unwrap();
    assert!(event_data.is_empty(), "{event_data:?}");
}

#[tokio::test]
async fn two_runs_publishing_one_partition_at_once_leave_it_whole() {
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let request = ExportRequest::day(ExportJobType::DailyAnalytics, yesterday, 90);
    // Both runs' copies into place are slow, so their publishes would overlap.
    let mut running = Vec::new();
    for _ in 0..2 {
        let slow = s3_through(
            &bucket,
            s3_proxy_delaying(true, Duration::from_millis(1500)).await,
        )
        .await;
        let ctx = ExportContext::new(db.store.clone(), slow);
        let request = request.clone();
        running.push(tokio::spawn(
            async move { run_export(&ctx, &request).await },
        ));
    }
    let mut prefix = String::new();
    for run in running {
        prefix = run.await.unwrap().unwrap().partitions[0].prefix.clone();
    }
    assert_whole(&bucket.object_store(), &prefix).await;
    let locks = db.store.collection("job_locks");
    assert_eq!(
        locks.count_documents(doc! {}).await.unwrap(),
        0,
        "locks released"
    );
}

/// Asserts the partition `prefix` is whole: `_SUCCESS` is there and its manifest names
/// exactly the partition's part files. Returns the manifest.
async fn assert_whole(store: &ObjectStore, prefix: &str) -> Value {
    let objects = store.list(&format!("{prefix}/")).await.unwrap();
    assert!(
        objects
            .iter()
            .any(|o| o.key == format!("{prefix}/_SUCCESS")),
        "{objects:?}"
    );
    let manifest: Value = serde_json::from_slice(
        &store
            .get_bytes(&format!("{prefix}/_manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    let mut named: Vec<String> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| format!("{prefix}/{}", f["path"].as_str().unwrap()))
        .collect();
    let mut parts: Vec<String> = objects
        .iter()
        .map(|o| o.key.clone())
        .filter(|k| k.ends_with(".parquet"))
        .collect();
    named.sort();
    parts.sort();
    assert_eq!(
        named, parts,
        "the manifest names exactly the partition's files"
    );
    manifest
}

/// `[scheduler] enabled = false` makes a tracking-only replica: beside one, nothing is
/// fired until a replica with the scheduler joins.
#[tokio::test]
async fn a_replica_with_the_scheduler_disabled_fires_nothing() {
    let db = TestDb::initialized().await;
    let (dir, config) = setup(&db, "idle-feed", "[scheduler]\nenabled = false\n").await;
    let runs = db.store.collection("scheduled_runs");
    let mut tracking_only = serve(&config);
    // The every-second schedule would have fired several times by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let fired = runs.count_documents(doc! {}).await.unwrap();
    let still_serving = tracking_only.try_wait().unwrap().is_none();
    // One with the scheduler (the same config otherwise) fires it.
    let enabled = dir.join("enabled.toml");
    std::fs::write(
        &enabled,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("enabled = false", "enabled = true"),
    )
    .unwrap();
    let mut scheduling = serve(&enabled);
    // Three fires, each an instant both replicas were up for (the tracking-only one
    // started first, however slowly either starts): had it a scheduler, it would have
    // claimed some of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while runs.count_documents(doc! {}).await.unwrap() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler never fired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    use futures_util::TryStreamExt;
    let owners: Vec<String> = runs
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|r| r.get_str("owner").unwrap().to_string())
        .collect();
    let scheduler_pid = scheduling.id();
    for p in [&mut tracking_only, &mut scheduling] {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert!(still_serving, "the tracking-only replica kept running");
    assert_eq!(fired, 0, "nothing fired without a scheduler");
    assert!(
        owners
            .iter()
            .all(|o| o.split('-').next() == Some(&scheduler_pid.to_string())),
        "only the replica with a scheduler claims fires: {owners:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An ARCHIVE killed outright (SIGKILL: no chance to record anything or hand its lock
/// back) while its delete of the archived events is held: once its lock's lease has
/// lapsed, the next ARCHIVE finishes the day. Every event ends up in the archive once and
/// out of MongoDB, and the dead run is not left looking alive for ever.
#[tokio::test]
async fn an_archive_killed_before_its_delete_is_finished_by_the_next() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let bucket = support::TestBucket::new().await;
    seed_old_events(&db, 20).await;
    let (uri, hold, held) =
        support::holding_mongo_proxy(b"delete\x00\x07\x00\x00\x00events\x00").await;
    let s3 = support::s3_settings(&bucket.name).endpoint;
    let dir =
        std::env::temp_dir().join(format!("sluice-replicas-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_via = |name: &str, mongo: &str| {
        let path = dir.join(name);
        write_export_config(&path, &db, &bucket, mongo, &s3, "");
        path
    };
    let held_config = config_via("held.toml", &uri);
    let direct_config = config_via("direct.toml", &support::mongo_uri());
    hold.store(true, Ordering::SeqCst);
    let mut run = sluice(&held_config, &["export", "run", "ARCHIVE"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while held.load(Ordering::SeqCst) == 0 {
        assert!(
            run.try_wait().unwrap().is_none(),
            "the archive ended before its delete"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the archive never reached its delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    let jobs = db.store.collection("export_jobs");
    let dead = jobs
        .find_one(doc! { "type": "ARCHIVE" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.get_str("status").unwrap(), "RUNNING", "{dead}");
    // Time passes: the lock's lease (60 s) lapses, and the dead run's heartbeat is older
    // than the five minutes after which a run is taken for dead.
    let past = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 600_000);
    db.store
        .collection("job_locks")
        .update_many(doc! {}, doc! { "$set": { "expiresAt": past } })
        .await
        .unwrap();
    jobs.update_one(
        doc! { "jobId": dead.get_str("jobId").unwrap() },
        doc! { "$set": { "updatedAt": past } },
    )
    .await
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        sluice_command(&direct_config, &["export", "run", "ARCHIVE"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0,
        "every archived event deleted"
    );
    // The archive holds each event once.
    let dest = bucket.object_store();
    let manifests: Vec<String> = dest
        .list("ARCHIVE/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with("/_manifest.json"))
        .collect();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&dest.get_bytes(&manifests[0]).await.unwrap()).unwrap();
    assert_eq!(manifest["rows"], 20, "{manifest}");
    let dead = jobs
        .find_one(doc! { "jobId": dead.get_str("jobId").unwrap() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.get_str("status").unwrap(), "FAILED", "{dead}");
    hold.store(false, Ordering::SeqCst);
    let _ = std::fs::remove_dir_all(dir);
}
