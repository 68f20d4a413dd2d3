//! The scheduler on the real server: each fire runs once across replicas, a dead owner's
//! run is taken over after its lease expires, overlapping fires are skipped and recorded,
//! a lost lease stops the run, a shutdown stops its runs before handing them back, and
//! missed export windows are caught up in order, and fires beyond a replica's run slots
//! wait for one, claimed.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::doc;
use chrono::Utc;
use futures_util::TryStreamExt;
use sluice_jobs::schedule::{
    FireOutcome, JobSource, RunFuture, Runner, ScheduledJob, Scheduler, SchedulerOptions,
};
use support::TestDb;

/// (replica, fire) of every run.
type RunLog = Arc<Mutex<Vec<(String, chrono::DateTime<Utc>)>>>;

/// Records every run; takes `delay` per run.
struct Counting {
    log: RunLog,
    instance: String,
    delay: Duration,
}

impl Runner for Counting {
    fn run(&self, job: &ScheduledJob, fire: chrono::DateTime<Utc>) -> RunFuture {
        let log = self.log.clone();
        let who = self.instance.clone();
        let delay = self.delay;
        let name = job.name.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            log.lock().unwrap().push((who, fire));
            Ok(format!("{name} done"))
        })
    }

    fn lapsed(
        &self,
        job: &str,
        _lapsed_at: chrono::DateTime<Utc>,
        error: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        LAPSED
            .lock()
            .unwrap()
            .push((job.to_string(), error.to_string()));
        Box::pin(async {})
    }
}

/// The runs the sweepers of this process told their runner were recorded FAILED after
/// their lease lapsed: (job, error).
static LAPSED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Waits until the run `filter` selects has `status`.
async fn status_becomes(db: &TestDb, filter: bson::Document, status: &str) {
    let runs = db.store.collection("scheduled_runs");
    support::wait_until(&format!("{filter} becomes {status}"), || async {
        runs.find_one(filter.clone())
            .await
            .unwrap()
            .is_some_and(|d| d.get_str("status") == Ok(status))
    })
    .await;
}

/// Waits until the run `filter` selects is going: claimed, and its lease renewed once
/// (so its claim is behind it and its heartbeat runs).
async fn renewed_once(store: &sluice_connectors::Store, filter: bson::Document) {
    let runs = store.collection("scheduled_runs");
    let expires = || async {
        runs.find_one(filter.clone())
            .await
            .unwrap()
            .and_then(|d| d.get_datetime("expiresAt").ok().copied())
    };
    support::wait_until("the run is claimed", || async { expires().await.is_some() }).await;
    let first = expires().await;
    support::wait_until("the run's lease is renewed", || async {
        expires().await != first
    })
    .await;
}

/// A scheduler with no cron triggers on `store` (its runs come from `fire` and its
/// sweeper), whose runs take `delay` and are recorded in the returned log.
async fn idle_scheduler(
    store: &sluice_connectors::Store,
    instance: &str,
    delay: Duration,
    lease_ms: u64,
) -> (Arc<Scheduler>, RunLog) {
    let log: RunLog = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(Counting {
        log: log.clone(),
        instance: instance.into(),
        delay,
    });
    // Jobs it knows without firing them: a replica takes over only runs of jobs it
    // schedules.
    let known = ["nightly", "crasher", "restarted", "long", "integration:crm"]
        .map(unscheduled)
        .to_vec();
    let s = Scheduler::start(
        store.clone(),
        runner,
        source(known),
        options(instance, lease_ms),
    )
    .await
    .unwrap();
    (s, log)
}

/// A job with no cron expression, run only by `fire` (or by hand).
fn unscheduled(name: &str) -> ScheduledJob {
    ScheduledJob {
        name: name.into(),
        cron: String::new(),
        timezone: None,
        since: None,
    }
}

fn source(jobs: Vec<ScheduledJob>) -> JobSource {
    Arc::new(move || {
        let jobs = jobs.clone();
        Box::pin(async move { Ok(jobs) })
    })
}

fn options(instance: &str, lease_ms: u64) -> SchedulerOptions {
    SchedulerOptions {
        instance: instance.into(),
        lease: Duration::from_millis(lease_ms),
        reload_every: Duration::from_secs(60),
        max_concurrent_runs: 8,
    }
}

async fn runs(db: &TestDb) -> Vec<bson::Document> {
    db.store
        .collection("scheduled_runs")
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_fire_runs_exactly_once_across_two_replicas() {
    let db = TestDb::initialized().await;
    // Process-wide (another test runs a `tick` too): compared with its value now.
    let counted_before = sluice_core::metrics::value(
        "sluice_job_runs_total",
        &[("job_name", "tick"), ("status", "COMPLETED")],
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let job = ScheduledJob {
        name: "tick".into(),
        cron: "* * * * * *".into(),
        timezone: None,
        since: None,
    };
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let runner = Arc::new(Counting {
            log: log.clone(),
            instance: name.into(),
            delay: Duration::from_millis(50),
        });
        replicas.push(
            Scheduler::start(
                db.store.clone(),
                runner,
                source(vec![job.clone()]),
                options(name, 5_000),
            )
            .await
            .unwrap(),
        );
    }
    support::wait_until("three fires ran", || async {
        log.lock().unwrap().len() >= 3
    })
    .await;
    for r in &replicas {
        r.shutdown().await;
    }
    // Trigger tasks in flight at the shutdown hand their claims back.
    let handed_back =
        doc! { "status": "RUNNING", "expiresAt": { "$ne": bson::DateTime::from_millis(0) } };
    support::wait_until("claims in flight are handed back", || async {
        db.store
            .collection("scheduled_runs")
            .count_documents(handed_back.clone())
            .await
            .unwrap()
            == 0
    })
    .await;
    let log = log.lock().unwrap().clone();
    let mut fires: Vec<_> = log.iter().map(|(_, f)| *f).collect();
    fires.sort();
    let before = fires.len();
    fires.dedup();
    assert!(before >= 3, "three fires or more: {log:?}");
    assert_eq!(before, fires.len(), "a fire ran twice: {log:?}");
    let docs = runs(&db).await;
    let (completed, stopped): (Vec<_>, Vec<_>) = docs
        .iter()
        .partition(|d| d.get_str("status").unwrap() == "COMPLETED");
    assert_eq!(
        completed.len(),
        before,
        "one claim per fire that ran: {docs:?}"
    );
    // A fire in flight when its replica shut down was stopped and handed back, not run.
    for d in &stopped {
        assert_eq!(d.get_str("status").unwrap(), "RUNNING", "{d}");
        assert_eq!(
            d.get_datetime("expiresAt").unwrap().timestamp_millis(),
            0,
            "{d}"
        );
    }
    assert!(stopped.len() <= 2, "{docs:?}");
    let counted = sluice_core::metrics::value(
        "sluice_job_runs_total",
        &[("job_name", "tick"), ("status", "COMPLETED")],
    ) - counted_before;
    assert!(
        counted >= before as f64,
        "{counted} runs counted for /metrics"
    );
}

#[tokio::test]
async fn a_trigger_runs_no_instant_from_before_the_job_was_scheduled() {
    let db = TestDb::initialized().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let since = Utc::now() + chrono::Duration::seconds(3);
    let job = ScheduledJob {
        name: "later".into(),
        cron: "* * * * * *".into(),
        timezone: None,
        since: Some(since),
    };
    let runner = Arc::new(Counting {
        log: log.clone(),
        instance: "only".into(),
        delay: Duration::from_millis(10),
    });
    let s = Scheduler::start(
        db.store.clone(),
        runner,
        source(vec![job]),
        options("only", 5_000),
    )
    .await
    .unwrap();
    support::wait_until("two fires ran", || async { log.lock().unwrap().len() >= 2 }).await;
    s.shutdown().await;
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().all(|(_, fire)| *fire >= since),
        "{since}: {log:?}"
    );
}

#[tokio::test]
async fn a_replica_leaves_the_orphaned_run_of_a_job_it_does_not_schedule_alone() {
    let db = TestDb::initialized().await;
    let fire = Utc::now() - chrono::Duration::seconds(30);
    // A job a newer replica added (mid-rollout): this one does not know it.
    db.store
        .collection("scheduled_runs")
        .insert_one(doc! {
            "_id": "export:new@x", "job": "export:new", "scheduledFor": bson::DateTime::from_chrono(fire),
            "status": "RUNNING", "owner": "killed-replica", "attempts": 1,
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1),
        })
        .await
        .unwrap();
    // And an orphan of a job it does schedule, which it takes over: once that is done,
    // its sweeps have looked at both.
    let known_fire = fire - chrono::Duration::seconds(1);
    let known_id = format!(
        "nightly@{}",
        known_fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    db.store
        .collection("scheduled_runs")
        .insert_one(doc! {
            "_id": &known_id, "job": "nightly", "scheduledFor": bson::DateTime::from_chrono(known_fire),
            "status": "RUNNING", "owner": "killed-replica", "attempts": 1,
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1),
        })
        .await
        .unwrap();
    let (s, log) = idle_scheduler(&db.store, "old-replica", Duration::ZERO, 400).await;
    status_becomes(&db, doc! { "_id": &known_id }, "COMPLETED").await;
    s.shutdown().await;
    let ran: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(_, f)| f.timestamp_millis())
        .collect();
    assert_eq!(
        ran,
        [known_fire.timestamp_millis()],
        "only the known job's orphan was run"
    );
    let run = db
        .store
        .collection("scheduled_runs")
        .find_one(doc! { "_id": "export:new@x" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("status").unwrap(), "RUNNING", "{run}");
    assert_eq!(run.get_str("owner").unwrap(), "killed-replica", "{run}");

    // One that no replica has taken over for an hour belongs to a job none schedules
    // any more: recorded FAILED rather than left RUNNING for ever.
    db.store
        .collection("scheduled_runs")
        .insert_one(doc! {
            "_id": "integration:gone@x", "job": "integration:gone", "scheduledFor": bson::DateTime::from_chrono(fire),
            "status": "RUNNING", "owner": "killed-replica", "attempts": 1,
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 2 * 3_600_000),
        })
        .await
        .unwrap();
    let (s, log) = idle_scheduler(&db.store, "old-replica", Duration::ZERO, 400).await;
    status_becomes(&db, doc! { "_id": "integration:gone@x" }, "FAILED").await;
    s.shutdown().await;
    assert!(log.lock().unwrap().is_empty());
    let gone = db
        .store
        .collection("scheduled_runs")
        .find_one(doc! { "_id": "integration:gone@x" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gone.get_str("status").unwrap(), "FAILED", "{gone}");
    assert!(
        gone.to_string().contains("no running replica schedules"),
        "{gone}"
    );
    // Its runner is told, as for any lapsed run recorded FAILED.
    assert!(
        LAPSED
            .lock()
            .unwrap()
            .iter()
            .any(|(job, error)| job == "integration:gone"
                && error.contains("no running replica schedules")),
        "{:?}",
        LAPSED.lock().unwrap()
    );
}

/// What a killed replica leaves behind: a RUNNING claim of `nightly` it no longer renews,
/// with `fields`. A replica takes it over; the run is waited for and its record returned.
async fn taken_over(db: &TestDb, fields: bson::Document) -> bson::Document {
    let fire = Utc::now() - chrono::Duration::seconds(30);
    let id = format!(
        "nightly@{}",
        fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let mut orphan = doc! {
        "_id": &id, "job": "nightly", "scheduledFor": bson::DateTime::from_chrono(fire),
        "status": "RUNNING", "owner": "killed-replica", "attempts": 1,
        "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1),
    };
    orphan.extend(fields);
    let runs = db.store.collection("scheduled_runs");
    runs.insert_one(orphan).await.unwrap();
    let (s, log) = idle_scheduler(&db.store, "survivor", Duration::ZERO, 400).await;
    status_becomes(db, doc! { "_id": &id }, "COMPLETED").await;
    s.shutdown().await;
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "the orphaned run ran once more"
    );
    runs.find_one(doc! { "_id": &id }).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_dead_owners_run_is_taken_over_after_the_lease() {
    let db = TestDb::initialized().await;
    let doc = taken_over(&db, doc! {}).await;
    assert_eq!(doc.get_str("owner").unwrap(), "survivor");
    assert_eq!(doc.get_i32("attempts").unwrap(), 2);
}

#[tokio::test]
async fn a_run_handed_back_by_a_shutdown_is_taken_over_as_a_replica_starts() {
    let db = TestDb::initialized().await;
    let fire = Utc::now() - chrono::Duration::seconds(30);
    let id = format!(
        "nightly@{}",
        fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    // What a restart leaves: the stopping process handed its run back.
    db.store
        .collection("scheduled_runs")
        .insert_one(doc! {
            "_id": &id, "job": "nightly", "scheduledFor": bson::DateTime::from_chrono(fire),
            "status": "RUNNING", "owner": "restarting", "attempts": 1,
            "handedBack": true, "handedBackAt": bson::DateTime::now(),
            "expiresAt": bson::DateTime::from_millis(0),
        })
        .await
        .unwrap();
    // A lease of ten minutes: a sweep every five. The run is taken over well before.
    let (s, log) = idle_scheduler(&db.store, "restarted", Duration::ZERO, 600_000).await;
    status_becomes(&db, doc! { "_id": &id }, "COMPLETED").await;
    s.shutdown().await;
    assert_eq!(log.lock().unwrap().len(), 1, "the handed-back run ran once");
}

#[tokio::test]
async fn a_dead_owners_run_is_not_run_again_once_a_later_fire_has_run_the_job() {
    let db = TestDb::initialized().await;
    let at = |secs: i64| Utc::now() - chrono::Duration::seconds(secs);
    let ms = |t: chrono::DateTime<Utc>| bson::DateTime::from_chrono(t);
    let id = |job: &str, fire: chrono::DateTime<Utc>| {
        format!(
            "{job}@{}",
            fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    };
    let (stopped, later) = (at(60), at(20));
    let runs = db.store.collection("scheduled_runs");
    // `nightly`: handed back by a replica that stopped 30 s ago; a later fire started
    // after that and completed (a cron shorter than a run). `restarted`: the same, but
    // its later fire started before the run stopped, so it did not go on from it.
    let mut docs = Vec::new();
    for (job, later_started) in [("nightly", at(25)), ("restarted", at(40))] {
        docs.push(doc! {
            "_id": id(job, stopped), "job": job, "scheduledFor": ms(stopped),
            "status": "RUNNING", "owner": "stopped-replica", "attempts": 1,
            "handedBack": true, "handedBackAt": ms(at(30)),
            "expiresAt": bson::DateTime::from_millis(0),
        });
        docs.push(doc! {
            "_id": id(job, later), "job": job, "scheduledFor": ms(later),
            "status": "COMPLETED", "owner": "survivor", "startedAt": ms(later_started),
            "endedAt": bson::DateTime::now(),
        });
    }
    runs.insert_many(docs).await.unwrap();
    let (s, log) = idle_scheduler(&db.store, "survivor", Duration::ZERO, 400).await;
    status_becomes(&db, doc! { "_id": id("nightly", stopped) }, "SKIPPED").await;
    status_becomes(&db, doc! { "_id": id("restarted", stopped) }, "COMPLETED").await;
    s.shutdown().await;
    // Only `restarted`'s stopped run ran again.
    assert_eq!(log.lock().unwrap().len(), 1, "{:?}", log.lock().unwrap());
    let doc = runs
        .find_one(doc! { "_id": id("nightly", stopped) })
        .await
        .unwrap()
        .unwrap();
    let reason = doc.get_str("reason").unwrap();
    assert!(
        reason.starts_with("superseded") && reason.contains(&id("nightly", later)),
        "{doc}"
    );
    assert!(
        sluice_core::metrics::value(
            "sluice_job_fires_total",
            &[("job_name", "nightly"), ("outcome", "superseded")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_run_that_was_waiting_for_a_slot_when_its_owner_died_is_not_counted_against() {
    let db = TestDb::initialized().await;
    // Two lapses already: one more counted would give it up. But it was waiting for a
    // slot (never ran there) when its owner died.
    let doc = taken_over(
        &db,
        doc! {
            "attempts": 3, "lapses": 2,
            "waitingSince": bson::DateTime::now(), "reason": "waiting for a run slot",
        },
    )
    .await;
    assert_eq!(doc.get_i32("lapses").unwrap(), 2, "{doc}");
    assert!(
        !doc.contains_key("waitingSince") && !doc.contains_key("reason"),
        "{doc}"
    );
}

#[tokio::test]
async fn a_run_whose_owners_keep_dying_is_given_up_but_hand_backs_do_not_count() {
    let db = TestDb::initialized().await;
    let orphan = |job: &str, lapses: i32, handed_back: bool| {
        let fire = Utc::now() - chrono::Duration::seconds(30);
        doc! {
            "_id": format!("{job}@{}", fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "job": job, "scheduledFor": bson::DateTime::from_chrono(fire),
            "status": "RUNNING", "owner": "gone", "attempts": lapses + 1, "lapses": lapses,
            "handedBack": handed_back,
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1),
        }
    };
    let runs = db.store.collection("scheduled_runs");
    // Its owners died twice already and this one died too: the third lapse.
    runs.insert_one(orphan("crasher", 2, false)).await.unwrap();
    // Two lapses, but this owner handed it back (a rolling restart): run it.
    runs.insert_one(orphan("restarted", 2, true)).await.unwrap();
    let (s, log) = idle_scheduler(&db.store, "survivor", Duration::ZERO, 400).await;
    status_becomes(&db, doc! { "job": "crasher" }, "FAILED").await;
    status_becomes(&db, doc! { "job": "restarted" }, "COMPLETED").await;
    s.shutdown().await;
    assert_eq!(log.lock().unwrap().len(), 1, "only the restarted run ran");
    let crasher = runs
        .find_one(doc! { "job": "crasher" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(crasher.get_str("status").unwrap(), "FAILED");
    assert_eq!(crasher.get_i32("lapses").unwrap(), 3);
    assert!(
        crasher.get_str("error").unwrap().contains("3 times"),
        "{crasher}"
    );
    // The runner is told, to close what the run wrote of its own progress.
    assert!(
        LAPSED
            .lock()
            .unwrap()
            .iter()
            .any(|(job, error)| job == "crasher" && error.starts_with("given up")),
        "{:?}",
        LAPSED.lock().unwrap()
    );
    // Counted FAILED where it was recorded: no owner lived to count it.
    assert_eq!(
        sluice_core::metrics::value(
            "sluice_job_runs_total",
            &[("job_name", "crasher"), ("status", "FAILED")]
        ),
        1.0
    );
    let restarted = runs
        .find_one(doc! { "job": "restarted" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restarted.get_str("status").unwrap(), "COMPLETED");
    assert_eq!(restarted.get_i32("lapses").unwrap(), 2);
}

#[tokio::test]
async fn an_instant_no_replica_claimed_is_fired_by_the_next_check_once() {
    use chrono::{Datelike, Timelike};
    let db = TestDb::initialized().await;
    // Crons that matched exactly once, a few seconds ago and two minutes ago: their
    // triggers will not fire again for a year, as a trigger remade when daylight saving
    // time began skips the instant, or as every replica restarting at that instant would.
    let at = |t: chrono::DateTime<Utc>| {
        format!(
            "{} {} {} {} {} *",
            t.second(),
            t.minute(),
            t.hour(),
            t.day(),
            t.month()
        )
    };
    let now = Utc::now().with_nanosecond(0).unwrap();
    let recent = now - chrono::Duration::seconds(3);
    let old = now - chrono::Duration::seconds(120);
    let jobs = vec![
        ScheduledJob {
            name: "recent".into(),
            cron: at(recent),
            timezone: None,
            since: None,
        },
        ScheduledJob {
            name: "old".into(),
            cron: at(old),
            timezone: None,
            since: None,
        },
        // Applied a second after its instant: it did not miss it.
        ScheduledJob {
            name: "applied-after".into(),
            cron: at(recent),
            timezone: None,
            since: Some(recent + chrono::Duration::seconds(1)),
        },
        // A `[[schedules]]` entry (no recorded start) that never ran this cron: added, or
        // its cron changed, since that instant; it missed nothing.
        ScheduledJob {
            name: "new-cron".into(),
            cron: at(recent),
            timezone: None,
            since: None,
        },
    ];
    // `recent` ran its cron's instant before (a year ago): it was in effect.
    let year_ago = recent.with_year(recent.year() - 1).unwrap();
    db.store
        .collection("scheduled_runs")
        .insert_one(doc! {
            "_id": sluice_jobs::schedule::run_id("recent", year_ago), "job": "recent",
            "scheduledFor": bson::DateTime::from_chrono(year_ago), "status": "COMPLETED",
        })
        .await
        .unwrap();
    let log: RunLog = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(Counting {
        log: log.clone(),
        instance: "a".into(),
        delay: Duration::ZERO,
    });
    let mut opts = options("a", 5_000);
    opts.reload_every = Duration::from_millis(300);
    let s = Scheduler::start(db.store.clone(), runner, source(jobs), opts)
        .await
        .unwrap();
    // The instant runs; several checks more pass (one per reload) and it runs once.
    support::wait_until("the missed instant runs", || async {
        !log.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    s.shutdown().await;
    let fires: Vec<_> = log.lock().unwrap().iter().map(|(_, f)| *f).collect();
    assert_eq!(
        fires,
        [recent],
        "the recent instant, once; not the old one, nor one before its job was applied, nor one of a cron that never ran"
    );
    let docs = runs(&db).await;
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert!(docs
        .iter()
        .all(|d| d.get_str("status").unwrap() == "COMPLETED"
            && d.get_str("_id").unwrap().starts_with("recent@")));
}

/// Records the most runs going at once; each takes `delay`.
struct Concurrent {
    going: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
    delay: Duration,
}

impl Runner for Concurrent {
    fn run(&self, job: &ScheduledJob, _fire: chrono::DateTime<Utc>) -> RunFuture {
        use std::sync::atomic::Ordering::SeqCst;
        let (going, most, delay) = (self.going.clone(), self.most.clone(), self.delay);
        let name = job.name.clone();
        Box::pin(async move {
            most.fetch_max(going.fetch_add(1, SeqCst) + 1, SeqCst);
            tokio::time::sleep(delay).await;
            going.fetch_sub(1, SeqCst);
            Ok(format!("{name} done"))
        })
    }
}

/// A scheduler running one job at a time, its runs taking `delay`, the most going at
/// once recorded in `most`.
async fn one_slot_scheduler(
    db: &TestDb,
    jobs: &[ScheduledJob],
    most: Arc<std::sync::atomic::AtomicUsize>,
    delay: Duration,
) -> Arc<Scheduler> {
    let runner = Arc::new(Concurrent {
        going: Default::default(),
        most,
        delay,
    });
    Scheduler::start(
        db.store.clone(),
        runner,
        source(jobs.to_vec()),
        SchedulerOptions {
            max_concurrent_runs: 1,
            ..options("narrow", 10_000)
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn fires_beyond_the_replicas_run_slots_wait_claimed_and_all_run_or_stop_at_shutdown() {
    let db = TestDb::initialized().await;
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs: Vec<ScheduledJob> = ["one", "two", "three"].map(unscheduled).to_vec();
    let s = one_slot_scheduler(&db, &jobs, most.clone(), Duration::from_secs(3)).await;
    let fire = Utc::now() - chrono::Duration::seconds(5);
    let fires = futures_util::future::join_all(jobs.iter().map(|j| s.fire(j, fire)));
    let gauge = || sluice_core::metrics::value("sluice_job_runs_waiting", &[]);
    let watch = async {
        // Two of the three are claimed and say why they wait, counted by the gauge.
        let runs = db.store.collection("scheduled_runs");
        let waiting = doc! {
            "status": "RUNNING", "waitingSince": { "$exists": true },
            "reason": { "$regex": "max_concurrent_runs" },
        };
        support::wait_until("two runs wait for a slot, counted", || async {
            runs.count_documents(waiting.clone()).await.unwrap() == 2 && gauge() == 2.0
        })
        .await;
    };
    let (outcomes, ()) = tokio::join!(fires, watch);
    s.shutdown().await;
    for o in &outcomes {
        assert!(matches!(o, FireOutcome::Ran(Ok(_))), "{outcomes:?}");
    }
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(gauge(), 0.0);
    let docs = runs(&db).await;
    assert_eq!(docs.len(), 3, "{docs:?}");
    let mut waited = Vec::new();
    for d in &docs {
        assert_eq!(d.get_str("status").unwrap(), "COMPLETED", "{d}");
        // The wait's fields went once the run had its slot; `waitedMs` says how long.
        assert!(d.get_str("reason").is_err(), "{d}");
        assert!(!d.contains_key("waitingSince"), "{d}");
        if let Ok(ms) = d.get_i64("waitedMs") {
            waited.push(ms);
        }
    }
    waited.sort();
    assert_eq!(waited.len(), 2, "{docs:?}");
    // Behind one run of 3 s, then behind two.
    assert!(waited[0] >= 2_500 && waited[1] >= 5_500, "{waited:?}");

    // A shutdown stops a run that waits as well (and it is no longer counted). In the
    // same test: the gauge is the process's.
    let jobs: Vec<ScheduledJob> = ["first", "second"].map(unscheduled).to_vec();
    let s = one_slot_scheduler(&db, &jobs, Default::default(), Duration::from_secs(60)).await;
    let fires = tokio::spawn({
        let s = s.clone();
        async move { futures_util::future::join_all(jobs.iter().map(|j| s.fire(j, fire))).await }
    });
    let runs = db.store.collection("scheduled_runs");
    support::wait_until("a run waits for a slot", || async {
        runs.count_documents(doc! { "status": "RUNNING", "waitingSince": { "$exists": true } })
            .await
            .unwrap()
            == 1
    })
    .await;
    s.shutdown().await;
    let outcomes = fires.await.unwrap();
    assert_eq!(outcomes, vec![FireOutcome::Stopped, FireOutcome::Stopped]);
    assert_eq!(
        sluice_core::metrics::value("sluice_job_runs_waiting", &[]),
        0.0
    );
}

#[tokio::test]
async fn an_overlapping_fire_is_skipped_and_recorded() {
    let db = TestDb::initialized().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(Counting {
        log: log.clone(),
        instance: "solo".into(),
        delay: Duration::from_millis(2_500),
    });
    let job = ScheduledJob {
        name: "slow".into(),
        cron: "* * * * * *".into(),
        timezone: None,
        since: None,
    };
    let s = Scheduler::start(
        db.store.clone(),
        runner,
        source(vec![job]),
        options("solo", 10_000),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(3_700)).await;
    s.shutdown().await;
    let docs = runs(&db).await;
    let skipped: Vec<_> = docs
        .iter()
        .filter(|d| d.get_str("status").unwrap() == "SKIPPED")
        .collect();
    assert!(!skipped.is_empty(), "{docs:?}");
    let reason = skipped[0].get_str("reason").unwrap();
    // It names the run, its owner and how long its lease holds (a stopped process's
    // run is taken for going until then).
    assert!(
        reason.contains("still going (its lease holds until ") && reason.contains("(owner "),
        "{reason}"
    );
}

#[tokio::test]
async fn a_run_that_loses_its_lease_stops() {
    let db = TestDb::initialized().await;
    // A run that would go on for 30 s: only the lease loss ends it sooner.
    let (s, log) = idle_scheduler(&db.store, "a", Duration::from_secs(30), 600).await;
    let job = unscheduled("long");
    let fire = Utc::now();
    let steal = {
        let store = db.store.clone();
        tokio::spawn(async move {
            let running = doc! { "job": "long", "status": "RUNNING" };
            renewed_once(&store, running.clone()).await;
            let runs = store.collection("scheduled_runs");
            let stolen = runs
                .update_one(running, doc! { "$set": { "owner": "b" } })
                .await
                .unwrap();
            assert_eq!(stolen.matched_count, 1);
        })
    };
    let outcome = s.fire(&job, fire).await;
    steal.await.unwrap();
    s.shutdown().await;
    assert_eq!(outcome, FireOutcome::LeaseLost);
    assert!(
        log.lock().unwrap().is_empty(),
        "the run was stopped before it finished"
    );
}

#[tokio::test]
async fn shutdown_stops_its_runs_before_handing_them_back() {
    let db = TestDb::initialized().await;
    let (s, log) = idle_scheduler(&db.store, "a", Duration::from_secs(30), 60_000).await;
    let job = unscheduled("long");
    let firing = tokio::spawn({
        let s = s.clone();
        async move { s.fire(&job, Utc::now()).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runs(&db).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fire never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await;
    // By the time the run is handed back (another replica may take it over at once), it
    // has stopped here: it can never run on two replicas at the same time.
    assert!(
        firing.is_finished(),
        "the run still going after the shutdown"
    );
    assert_eq!(firing.await.unwrap(), FireOutcome::Stopped);
    assert!(log.lock().unwrap().is_empty());
    let run = &runs(&db).await[0];
    assert_eq!(run.get_str("status").unwrap(), "RUNNING", "{run}");
    assert_eq!(
        run.get_datetime("expiresAt").unwrap().timestamp_millis(),
        0,
        "handed back: {run}"
    );
}

#[tokio::test]
async fn missed_export_windows_are_caught_up_in_order() {
    use sluice_connectors::objstore::{LocalDir, ObjectStore};
    use sluice_core::model::ExportJobType;
    use sluice_jobs::export::{catch_up, ExportContext};
    let db = TestDb::initialized().await;
    let today = Utc::now().date_naive();
    let last_done = today - chrono::Days::new(5);
    db.store
        .collection("export_jobs")
        .insert_one(doc! { "jobId": "old", "type": "DAILY_ANALYTICS", "status": "COMPLETED", "windowStart": last_done.to_string(), "windowEnd": last_done.to_string() })
        .await
        .unwrap();
    let dir =
        std::env::temp_dir().join(format!("sluice-catchup-{}", uuid::Uuid::new_v4().simple()));
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let yesterday = today - chrono::Days::new(1);
    // A manual run of a later window (a backfill, `export run`) does not move the point
    // catch-up resumes from: the days between are still exported.
    let manual = sluice_jobs::export::run_export(
        &ctx,
        &sluice_jobs::export::ExportRequest::day(ExportJobType::DailyAnalytics, today, 90),
    )
    .await
    .unwrap();
    let recorded = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "jobId": &manual.job_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.get_bool("manual"), Ok(true));
    let done = catch_up(&ctx, ExportJobType::DailyAnalytics, yesterday, 10, 90)
        .await
        .unwrap();
    let windows: Vec<String> = done
        .iter()
        .map(|s| s.partitions[0].prefix.clone())
        .collect();
    let expected: Vec<String> = (1..=4)
        .rev()
        .map(|n| format!("DAILY_ANALYTICS/dt={}", today - chrono::Days::new(n)))
        .collect();
    assert_eq!(windows, expected, "the four missed days, oldest first");
    assert!(
        catch_up(&ctx, ExportJobType::DailyAnalytics, yesterday, 10, 90)
            .await
            .unwrap()
            .is_empty(),
        "nothing left"
    );
    // Bounded: with only two allowed, the two most recent missing windows run.
    db.store
        .collection("export_jobs")
        .delete_many(doc! { "jobId": { "$nin": ["old", &manual.job_id] } })
        .await
        .unwrap();
    let bounded = catch_up(&ctx, ExportJobType::DailyAnalytics, yesterday, 2, 90)
        .await
        .unwrap();
    assert_eq!(bounded.len(), 2);
    assert_eq!(
        bounded[1].partitions[0].prefix,
        format!("DAILY_ANALYTICS/dt={yesterday}")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_engine_schedules_export_schedules_and_integration_configs() {
    let db = TestDb::initialized().await;
    let dir = std::env::temp_dir().join(format!("sluice-engine-{}", uuid::Uuid::new_v4().simple()));
    let dest = dir.display().to_string();
    let config = support::test_config(&db.name, |raw| {
        raw.export.destination = dest.clone();
        raw.schedules = vec![sluice_core::config::ScheduleSection {
            name: "daily".into(),
            kind: "DAILY_ANALYTICS".into(),
            cron: "0 15 2 * * *".into(),
            catch_up: Some(3),
            late_days_per_run: Some(7),
            timezone: None,
        }];
    });
    let file = sluice_core::integration::parse_file(
        "t",
        "name = \"feed\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/x\"\nschedule = \"0 0 * * * *\"\n[mapping.productId]\npath = \"$.id\"\n",
    )
    .unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    let jobs = sluice::engine::scheduled_jobs(&config, &db.store)
        .await
        .unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["export:daily", "integration:feed"]);

    let runner = sluice::engine::EngineRunner {
        config: Arc::new(config),
        store: db.store.clone(),
    };
    let summary = runner.run_job("export:daily").await.unwrap();
    assert_eq!(summary, "1 run, 1 row", "no earlier run: only yesterday");
    let yesterday = Utc::now().date_naive() - chrono::Days::new(1);
    assert!(dir
        .join(format!("DAILY_ANALYTICS/dt={yesterday}/_SUCCESS"))
        .exists());
    // Its record names the schedule, says it was not run by hand, and gives the root its
    // file keys are relative to.
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "type": "DAILY_ANALYTICS" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_str("schedule"), Ok("daily"), "{job}");
    assert_eq!(job.get_bool("manual"), Ok(false), "{job}");
    let root = job.get_str("root").unwrap();
    let first_file = job.get_array("partitions").unwrap()[0]
        .as_document()
        .unwrap()
        .get_array("files")
        .unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        std::path::Path::new(&format!("{root}{first_file}")).exists(),
        "{root} + {first_file}"
    );
    let err = runner.run_job("integration:feed").await.unwrap_err();
    assert!(
        err.contains("loopback"),
        "the private-network guard applies to scheduled runs: {err}"
    );
    // A fire of a config turned off since the schedule was loaded does not run it (its
    // trigger fires until the next reload).
    let feed = &jobs[1];
    assert!(
        feed.since.is_some(),
        "when its schedule took effect: {feed:?}"
    );
    // Re-applied unchanged (a deploy re-applying every file), it keeps that instant, so
    // an instant missed while every replica restarted is still fired.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let updated_at = || async {
        db.store
            .collection("integration_configs")
            .find_one(doc! { "name": "feed" })
            .await
            .unwrap()
            .unwrap()
            .get_datetime("updatedAt")
            .copied()
            .unwrap()
    };
    let applied_at = updated_at().await;
    assert_eq!(
        sluice_jobs::configs::apply(&db.store, &file).await.unwrap(),
        sluice_jobs::configs::Applied::Unchanged
    );
    assert_eq!(updated_at().await, applied_at, "nothing written");
    let since = || async {
        sluice::engine::scheduled_jobs(&runner.config, &db.store)
            .await
            .unwrap()[1]
            .since
    };
    assert_eq!(since().await, feed.since);
    // A new schedule takes effect when applied.
    let mut moved = file.clone();
    moved.schedule = Some("0 30 * * * *".into());
    assert_eq!(
        sluice_jobs::configs::apply(&db.store, &moved)
            .await
            .unwrap(),
        sluice_jobs::configs::Applied::Updated
    );
    assert!(since().await > feed.since);
    assert!(updated_at().await > applied_at);
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    let fire = |runner: &sluice::engine::EngineRunner| {
        sluice_jobs::schedule::Runner::run(runner, feed, Utc::now())
    };
    assert!(fire(&runner).await.unwrap_err().contains("loopback"));
    db.store
        .collection("integration_configs")
        .update_one(
            doc! { "name": "feed" },
            doc! { "$set": { "isActive": false } },
        )
        .await
        .unwrap();
    let skipped = fire(&runner).await.unwrap();
    assert!(skipped.contains("turned off"), "{skipped}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_job_is_not_started_by_hand_while_a_scheduled_run_holds_its_lease() {
    let db = TestDb::initialized().await;
    let runs = db.store.collection("scheduled_runs");
    let lease_until = |ms: i64| bson::DateTime::from_millis(Utc::now().timestamp_millis() + ms);
    runs.insert_one(doc! {
        "_id": "integration:crm@2026-12-03T00:00:00Z", "job": "integration:crm",
        "status": "RUNNING", "owner": "host-a", "expiresAt": lease_until(60_000),
    })
    .await
    .unwrap();
    let err = sluice_jobs::schedule::start_manual_run(&db.store, "integration:crm", "cli")
        .await
        .unwrap_err();
    assert!(
        matches!(err, sluice_connectors::StoreError::Busy(ref m) if m.contains("host-a")),
        "{err}"
    );
    // Another job, or a lease that lapsed (its owner died), does not hold it back.
    sluice_jobs::schedule::start_manual_run(&db.store, "integration:other", "cli")
        .await
        .unwrap();
    runs.update_one(
        doc! { "job": "integration:crm" },
        doc! { "$set": { "expiresAt": lease_until(-1_000) } },
    )
    .await
    .unwrap();
    sluice_jobs::schedule::start_manual_run(&db.store, "integration:crm", "cli")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_run_by_hand_holds_the_job_against_fires_and_other_runs_by_hand() {
    use sluice_jobs::schedule::{end_manual_run, hold_manual_run, start_manual_run};
    let db = TestDb::initialized().await;
    let (s, log) = idle_scheduler(&db.store, "a", Duration::ZERO, 10_000).await;
    let job = unscheduled("integration:crm");
    let id = start_manual_run(&db.store, &job.name, "cli").await.unwrap();
    let refused = start_manual_run(&db.store, &job.name, "admin-api")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains(&id), "{refused}");
    // A fire during the run by hand is skipped and recorded, not run beside it.
    let fire = Utc::now();
    assert_eq!(s.fire(&job, fire).await, FireOutcome::Skipped);
    assert!(log.lock().unwrap().is_empty());
    let held = hold_manual_run(&db.store, &id, async { 7 }).await;
    assert_eq!(held, Ok(7));
    end_manual_run(&db.store, &id, &Ok("done".into()))
        .await
        .unwrap();
    // Once it has ended, the job is free again.
    let next = fire + chrono::Duration::seconds(1);
    assert!(matches!(s.fire(&job, next).await, FireOutcome::Ran(Ok(_))));
    s.shutdown().await;
    let statuses: Vec<(String, String)> = runs(&db)
        .await
        .iter()
        .map(|d| {
            (
                d.get_str("owner").unwrap().to_string(),
                d.get_str("status").unwrap().to_string(),
            )
        })
        .collect();
    // A run by hand names its host after what started it.
    let by_hand = match sluice_jobs::schedule::host_name() {
        Some(host) => format!("cli on {host}"),
        None => "cli".to_string(),
    };
    assert!(
        statuses.contains(&(by_hand, "COMPLETED".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("a".into(), "SKIPPED".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("a".into(), "COMPLETED".into())),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_run_by_hand_renews_its_lease_and_stops_when_its_record_is_ended_elsewhere() {
    use sluice_jobs::schedule::{hold_manual_run_for, start_manual_run};
    let db = TestDb::initialized().await;
    let runs = db.store.collection("scheduled_runs");
    let id = start_manual_run(&db.store, "integration:crm", "cli")
        .await
        .unwrap();
    let expiry = |d: Option<bson::Document>| {
        d.unwrap()
            .get_datetime("expiresAt")
            .unwrap()
            .timestamp_millis()
    };
    let first = expiry(runs.find_one(doc! { "_id": &id }).await.unwrap());
    // A run longer than its (shortened) lease keeps it: the record is renewed, not lost.
    let lease = Duration::from_millis(600);
    let held = hold_manual_run_for(&db.store, &id, lease, async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        "finished"
    })
    .await;
    assert_eq!(held, Ok("finished"));
    let doc = runs.find_one(doc! { "_id": &id }).await.unwrap().unwrap();
    assert_eq!(doc.get_str("status").unwrap(), "RUNNING", "{doc}");
    let renewed = expiry(Some(doc));
    assert_ne!(renewed, first, "the lease was renewed");
    assert!(
        renewed > bson::DateTime::now().timestamp_millis(),
        "the renewed lease is live"
    );
    // Ended elsewhere (the sweeper found it abandoned): the work is stopped at the next
    // renewal and the answer says why.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, target) = (finished.clone(), id.clone());
    let held = hold_manual_run_for(&db.store, &id, lease, async move {
        runs.update_one(
            doc! { "_id": &target },
            doc! { "$set": { "status": "FAILED", "error": "abandoned" } },
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .await;
    let why = held.unwrap_err();
    assert!(why.contains("no longer RUNNING"), "{why}");
    assert!(!finished.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn runs_by_hand_started_at_once_never_both_run() {
    let db = TestDb::initialized().await;
    let mut started = 0;
    for round in 0..15 {
        let job = format!("integration:race{round}");
        let (a, b) = tokio::join!(
            sluice_jobs::schedule::start_manual_run(&db.store, &job, "cli"),
            sluice_jobs::schedule::start_manual_run(&db.store, &job, "admin-api"),
        );
        assert!(
            !(a.is_ok() && b.is_ok()),
            "round {round}: both started: {a:?} {b:?}"
        );
        let ok = u64::from(a.is_ok() || b.is_ok());
        started += ok;
        // A start that stepped back says why, naming the run in progress.
        for refused in [&a, &b].into_iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                refused.to_string().contains("is in progress"),
                "round {round}: {refused}"
            );
        }
        let live = db
            .store
            .collection("scheduled_runs")
            .count_documents(doc! { "job": &job, "status": "RUNNING" })
            .await
            .unwrap();
        assert_eq!(live, ok, "round {round}: {live} RUNNING records");
    }
    // Starts that interleave exactly (both insert, then both look) both step back, and
    // try again after a random pause: nearly always one of them then runs (here, where
    // every round is such a tie).
    assert!(started >= 12, "only {started} of 15 rounds started a run");
    // A start alone does start.
    let alone =
        sluice_jobs::schedule::start_manual_run(&db.store, "integration:race-alone", "cli").await;
    assert!(alone.is_ok(), "{alone:?}");
}

#[tokio::test]
async fn a_run_by_hand_whose_process_died_is_recorded_failed_and_not_run_again() {
    let db = TestDb::initialized().await;
    let id = sluice_jobs::schedule::start_manual_run(&db.store, "integration:crm", "cli")
        .await
        .unwrap();
    // Its process died: nobody renews the lease.
    db.store
        .collection("scheduled_runs")
        .update_one(
            doc! { "_id": &id },
            doc! { "$set": { "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1) } },
        )
        .await
        .unwrap();
    let (s, log) = idle_scheduler(&db.store, "sweeper", Duration::ZERO, 400).await;
    status_becomes(&db, doc! { "_id": &id }, "FAILED").await;
    s.shutdown().await;
    assert!(
        log.lock().unwrap().is_empty(),
        "a run by hand is not run again"
    );
    let doc = db
        .store
        .collection("scheduled_runs")
        .find_one(doc! { "_id": &id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.get_str("status").unwrap(), "FAILED");
    assert!(doc.get_str("error").unwrap().contains("abandoned"), "{doc}");
    sluice_jobs::schedule::start_manual_run(&db.store, "integration:crm", "cli")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_reload_keeps_the_schedule() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let db = TestDb::initialized().await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(Counting {
        log: log.clone(),
        instance: "a".into(),
        delay: Duration::ZERO,
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let source: JobSource = {
        let calls = calls.clone();
        Arc::new(move || {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                if first {
                    Ok(vec![ScheduledJob {
                        name: "tick".into(),
                        cron: "* * * * * *".into(),
                        timezone: None,
                        since: None,
                    }])
                } else {
                    Err("the store is unreachable".to_string())
                }
            })
        })
    };
    let mut opts = options("a", 5_000);
    opts.reload_every = Duration::from_millis(200);
    let s = Scheduler::start(db.store.clone(), runner, source, opts)
        .await
        .unwrap();
    support::wait_until("reloads are tried, and fail", || async {
        calls.load(Ordering::SeqCst) >= 5
    })
    .await;
    let before = log.lock().unwrap().len();
    support::wait_until("the job keeps firing through failed reloads", || async {
        log.lock().unwrap().len() >= before + 2
    })
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_run_whose_lease_lapsed_while_the_store_was_stuck_stops() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (uri, frozen) = support::freezable_mongo_proxy().await;
    let store = support::store_via(&uri, &db.name).await;
    let (s, log) = idle_scheduler(&store, "a", Duration::from_secs(4), 900).await;
    let job = unscheduled("long");
    let firing = tokio::spawn({
        let s = s.clone();
        async move { s.fire(&job, Utc::now()).await }
    });
    // Mid-run, the store stops answering for longer than the lease: the run stops before
    // its lease could lapse, while the renewal still hangs, since another replica may
    // take the run over once it has (a renewal answered late is no excuse either).
    renewed_once(&db.store, doc! { "job": "long", "status": "RUNNING" }).await;
    frozen.store(true, Ordering::SeqCst);
    // Waited for with the store still stuck (a run that went on would finish only once
    // it answers again, with its work done and logged).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !firing.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped_while_stuck = firing.is_finished();
    frozen.store(false, Ordering::SeqCst);
    assert!(stopped_while_stuck, "the run went on past its lease");
    let outcome = firing.await.unwrap();
    s.shutdown().await;
    assert_eq!(outcome, FireOutcome::LeaseLost);
    assert!(log.lock().unwrap().is_empty(), "the run was stopped");
}

#[tokio::test]
async fn a_shutdown_stops_runs_by_hand_and_frees_their_job_at_once() {
    use sluice_jobs::schedule::{hold_manual_run, start_manual_run, stop_manual_runs};
    let db = TestDb::initialized().await;
    // As the admin API starts one in `sluice serve`: its work is a task of its own.
    let id = start_manual_run(&db.store, "integration:slow", "admin-api")
        .await
        .unwrap();
    let held = tokio::spawn({
        let (store, id) = (db.store.clone(), id.clone());
        async move { hold_manual_run(&store, &id, tokio::time::sleep(Duration::from_secs(60))).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another database's shutdown leaves it alone.
    let other = TestDb::initialized().await;
    assert_eq!(
        stop_manual_runs(&other.store, Duration::from_secs(1)).await,
        0
    );
    assert!(!held.is_finished());
    assert_eq!(stop_manual_runs(&db.store, Duration::from_secs(5)).await, 1);
    let why = held.await.unwrap().unwrap_err();
    assert!(why.contains("shutting down"), "{why}");
    let run = runs(&db).await.pop().unwrap();
    assert_eq!(run.get_str("status").unwrap(), "FAILED", "{run}");
    assert!(run.get_str("error").unwrap().contains("shutdown"), "{run}");
    // The job is free at once, not after the run's lease.
    start_manual_run(&db.store, "integration:slow", "cli")
        .await
        .unwrap();

    // As the admin API runs one: held until its end is recorded, by itself, and counted
    // once.
    let id = start_manual_run(&db.store, "integration:other", "admin-api")
        .await
        .unwrap();
    let held = tokio::spawn({
        let (store, id) = (db.store.clone(), id.clone());
        async move {
            sluice_jobs::schedule::run_and_end_manual_run(&store, &id, async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok("done".to_string())
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stop_manual_runs(&db.store, Duration::from_secs(5)).await, 1);
    assert!(
        held.is_finished(),
        "the shutdown waited for its end to be recorded"
    );
    let why = held.await.unwrap().unwrap_err();
    let run = runs(&db)
        .await
        .into_iter()
        .find(|r| r.get_str("_id").unwrap() == id)
        .unwrap();
    assert_eq!(run.get_str("status").unwrap(), "FAILED", "{run}");
    assert_eq!(
        run.get_str("error").unwrap(),
        why,
        "recorded by the run itself"
    );
}

#[tokio::test]
async fn stopped_runs_keep_their_lease_until_they_are_handed_back() {
    let db = TestDb::initialized().await;
    let (s, _log) = idle_scheduler(&db.store, "a", Duration::from_secs(30), 600).await;
    let job = unscheduled("long");
    let firing = tokio::spawn({
        let s = s.clone();
        async move { s.fire(&job, Utc::now()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Stopped (the signal), then recorded for longer than a lease (a slow shutdown).
    s.stop().await;
    assert_eq!(firing.await.unwrap(), FireOutcome::Stopped);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let run = runs(&db).await.pop().unwrap();
    assert_eq!(run.get_str("status").unwrap(), "RUNNING");
    assert!(
        *run.get_datetime("expiresAt").unwrap() > bson::DateTime::now(),
        "the lease was kept: {run}"
    );
    s.hand_back().await;
    let run = runs(&db).await.pop().unwrap();
    assert_eq!(run.get_datetime("expiresAt").unwrap().timestamp_millis(), 0);
    assert!(run.get_bool("handedBack").unwrap());
}

/// A renewal that reaches the server after the lease lapsed (held up in the network)
/// does not revive the lease: another replica may be taking the run over.
#[tokio::test]
async fn a_renewal_arriving_after_the_lease_lapsed_does_not_revive_it() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (uri, hold, held) = support::holding_mongo_proxy(b"expiresAt").await;
    let store = support::store_via(&uri, &db.name).await;
    let (s, log) = idle_scheduler(&store, "a", Duration::from_secs(4), 900).await;
    // A job this replica does not schedule: its sweeper leaves the lapsed run alone.
    let job = unscheduled("unswept");
    let firing = tokio::spawn({
        let s = s.clone();
        async move { s.fire(&job, Utc::now()).await }
    });
    let running = doc! { "job": "unswept", "status": "RUNNING" };
    renewed_once(&db.store, running.clone()).await;
    // The next renewal is held; the run stops before its lease could lapse.
    hold.store(true, Ordering::SeqCst);
    support::wait_until("a renewal is held", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(firing.await.unwrap(), FireOutcome::LeaseLost);
    let runs = db.store.collection("scheduled_runs");
    let expires = || async {
        runs.find_one(running.clone())
            .await
            .unwrap()
            .and_then(|d| d.get_datetime("expiresAt").ok().copied())
    };
    let lapsed = expires().await.expect("still RUNNING");
    support::wait_until("the lease lapses", || async { db.store.now() > lapsed }).await;
    // Delivered now, the renewal matches nothing.
    hold.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        expires().await,
        Some(lapsed),
        "the lapsed lease was renewed"
    );
    assert!(log.lock().unwrap().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn a_running_scheduler_fails_export_runs_whose_heartbeat_went_silent() {
    let db = TestDb::initialized().await;
    let jobs = db.store.collection("export_jobs");
    let now = bson::DateTime::now().timestamp_millis();
    for (id, updated) in [("dead-run", now - 600_000), ("live-run", now - 1_000)] {
        jobs.insert_one(doc! {
            "jobId": id, "type": "EVENT_DATA", "status": "RUNNING",
            "updatedAt": bson::DateTime::from_millis(updated),
        })
        .await
        .unwrap();
    }
    let log: RunLog = Arc::new(Mutex::new(Vec::new()));
    let runner = Arc::new(Counting {
        log,
        instance: "a".into(),
        delay: Duration::ZERO,
    });
    let mut opts = options("a", 5_000);
    opts.reload_every = Duration::from_millis(200);
    // No export runs meanwhile: the scheduler's reloads find the silent run.
    let s = Scheduler::start(db.store.clone(), runner, source(Vec::new()), opts)
        .await
        .unwrap();
    let status = |id: &'static str| {
        let jobs = jobs.clone();
        async move {
            jobs.find_one(doc! { "jobId": id })
                .await
                .unwrap()
                .unwrap()
                .get_str("status")
                .unwrap()
                .to_string()
        }
    };
    support::wait_until("the silent run is marked FAILED", || async {
        status("dead-run").await == "FAILED"
    })
    .await;
    assert_eq!(status("live-run").await, "RUNNING");
    s.shutdown().await;
}

#[tokio::test]
async fn a_job_s_outcome_series_start_at_zero_and_a_fire_that_could_not_be_claimed_is_counted() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (uri, armed, severed, _) = support::severing_mongo_proxy(b"scheduled_runs").await;
    let store = support::store_via(&uri, &db.name).await;
    let (s, log) = idle_scheduler(&store, "a", Duration::from_millis(10), 5_000).await;
    let job = ScheduledJob {
        name: "zero-series".into(),
        cron: "0 0 3 * * *".into(),
        timezone: None,
        since: None,
    };
    s.reconcile(std::slice::from_ref(&job)).await.unwrap();
    // Every outcome is a series from the moment the job is scheduled: its first failure
    // is then an increase from 0, which `increase()` sees.
    let text = sluice_core::metrics::render();
    for line in [
        r#"sluice_job_runs_total{job_name="zero-series",status="FAILED"} 0"#,
        r#"sluice_job_runs_total{job_name="zero-series",status="COMPLETED"} 0"#,
        r#"sluice_job_fires_total{job_name="zero-series",outcome="claim_failed"} 0"#,
        r#"sluice_job_fires_total{job_name="zero-series",outcome="skipped"} 0"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    // The store cannot be reached: the fire is not run, not recorded, and counted apart
    // from a run that failed.
    armed.store(true, Ordering::SeqCst);
    let outcome = s.fire(&job, Utc::now()).await;
    armed.store(false, Ordering::SeqCst);
    assert!(severed.load(Ordering::SeqCst) >= 1);
    assert!(
        matches!(outcome, FireOutcome::ClaimFailed(_)),
        "{outcome:?}"
    );
    assert!(log.lock().unwrap().is_empty());
    let claim_failed = sluice_core::metrics::value(
        "sluice_job_fires_total",
        &[("job_name", "zero-series"), ("outcome", "claim_failed")],
    );
    assert_eq!(claim_failed, 1.0);
    assert_eq!(
        sluice_core::metrics::value(
            "sluice_job_runs_total",
            &[("job_name", "zero-series"), ("status", "FAILED")],
        ),
        0.0
    );
    assert!(runs(&db).await.is_empty());
    s.shutdown().await;
}

/// The jobs' gauges are read from `scheduled_runs`, as every replica reads them: the end
/// of the latest success, the start of the run going, a missed instant; a job no longer
/// scheduled loses its series.
#[tokio::test]
async fn the_job_gauges_follow_the_runs_recorded_and_go_with_their_job() {
    use sluice_core::metrics::{render, value};
    let db = TestDb::initialized().await;
    support::apply_missed_nightly(&db).await;
    let schedule = |name: &str| sluice_core::config::ScheduleSection {
        name: name.into(),
        kind: "DAILY_ANALYTICS".into(),
        cron: "0 15 2 * * *".into(),
        catch_up: Some(3),
        late_days_per_run: Some(7),
        timezone: None,
    };
    let config = support::test_config(&db.name, |raw| raw.schedules = vec![schedule("gauged")]);
    let at = |secs_ago: i64| {
        bson::DateTime::from_millis(Utc::now().timestamp_millis() - secs_ago * 1000)
    };
    let ended = at(7_200);
    let started = at(60);
    db.store
        .collection("scheduled_runs")
        .insert_many([
            doc! { "_id": "g1", "job": "export:gauged", "status": "COMPLETED", "scheduledFor": at(7_300), "startedAt": at(7_300), "endedAt": ended },
            doc! { "_id": "g0", "job": "export:gauged", "status": "FAILED", "scheduledFor": at(90_000), "endedAt": at(89_000) },
            doc! { "_id": "g2", "job": "export:gauged", "status": "RUNNING", "scheduledFor": started, "startedAt": started, "expiresAt": at(-60) },
        ])
        .await
        .unwrap();
    sluice::engine::publish_job_gauges(&config, &db.store)
        .await
        .unwrap();
    let gauge = |name: &str, job: &str| value(name, &[("job_name", job)]);
    let secs = |t: bson::DateTime| t.timestamp_millis() as f64 / 1000.0;
    assert_eq!(
        gauge("sluice_job_last_success_timestamp_seconds", "export:gauged"),
        secs(ended)
    );
    assert_eq!(
        gauge(
            "sluice_job_running_since_timestamp_seconds",
            "export:gauged"
        ),
        secs(started)
    );
    assert_eq!(gauge("sluice_job_missed", "export:gauged"), 0.0);
    assert_eq!(gauge("sluice_job_missed", "integration:nightly"), 1.0);
    assert_eq!(
        gauge(
            "sluice_job_last_success_timestamp_seconds",
            "integration:nightly"
        ),
        0.0
    );
    let text = render();
    for series in [
        "sluice_job_last_success_timestamp_seconds{job_name=\"integration:nightly\"} 0",
        "sluice_import_runs_total{config=\"nightly\",status=\"FAILED\"} ",
        "sluice_export_runs_total{kind=\"DAILY_ANALYTICS\",status=\"FAILED\"} ",
        "sluice_export_windows_not_exported_total{kind=\"DAILY_ANALYTICS\",reason=\"beyond_catch_up\"} ",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }

    // The schedule removed and the config turned off: their series go.
    let config = support::test_config(&db.name, |raw| raw.schedules = vec![]);
    db.store
        .collection("integration_configs")
        .update_one(
            doc! { "name": "nightly" },
            doc! { "$set": { "isActive": false } },
        )
        .await
        .unwrap();
    sluice::engine::publish_job_gauges(&config, &db.store)
        .await
        .unwrap();
    let text = render();
    for job in ["export:gauged", "integration:nightly"] {
        assert!(
            !text.contains(&format!("job_name=\"{job}\"")),
            "{job} still has series:\n{text}"
        );
    }
}
