//! The scheduler: cron triggers (tokio-cron-scheduler), and lease documents in MongoDB so
//! that each scheduled fire runs exactly once across every `sluice serve` replica.
//!
//! A fire is identified by its job and its cron instant (computed from the cron
//! expression, not from when the trigger woke up), so every replica derives the same
//! `scheduled_runs` `_id`; inserting it is the claim, and only one insert wins. The winner
//! renews the claim's `expiresAt` by heartbeat while it runs; if it dies, the claim expires
//! and another replica's sweeper takes it over (a compare-and-set on `expiresAt`) and runs
//! the job again (imports resume from their checkpoint, exports replace their partitions).
//! A replica that loses its lease stops the run. A fire that comes while the job's previous
//! run is still going is recorded as SKIPPED.
//!
//! A replica runs at most `max_concurrent_runs` jobs at once. A fire beyond that is
//! claimed as usual and waits for a slot, its lease renewed meanwhile; its record says so
//! (`waitingSince`, and a `reason`). It stays this replica's: moving it to a replica with
//! a free slot would need the claim handed over at the right moment, and a fire whose
//! claim waited unheld could be fired again by the missed-fire check, or flagged missed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, DateTime, Document};
use chrono::Utc;
use sluice_connectors::mongo::{is_duplicate_key, is_write_concern_error};
use sluice_connectors::{Store, StoreError};
use sluice_core::model::{collections as c, common};
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::tally::Tally;

/// What to run, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledJob {
    pub name: String,
    pub cron: String,
    /// IANA time zone of the cron; `None` = UTC.
    pub timezone: Option<String>,
    /// When the job's schedule took effect (an integration config's `scheduleSince`: its
    /// creation, or a change of its schedule, time zone or `isActive`): an instant before
    /// it is not run, neither fired as missed (a config applied, or turned back on, a few
    /// seconds after its cron's instant did not miss that instant) nor by a trigger.
    /// `None`: always in effect (export schedules in the config file).
    pub since: Option<chrono::DateTime<Utc>>,
}

/// Runs a job's fire; returns a one-line result, or the error.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
pub trait Runner: Send + Sync + 'static {
    fn run(&self, job: &ScheduledJob, fire: chrono::DateTime<Utc>) -> RunFuture;

    /// A run of `job` whose process stopped renewing its lease (which lapsed at
    /// `lapsed_at`) was recorded FAILED with `error` by the sweeper: what the run wrote
    /// of its own progress (an import's run record) may be closed too. Nothing by
    /// default.
    fn lapsed(
        &self,
        job: &str,
        lapsed_at: chrono::DateTime<Utc>,
        error: &str,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let _ = (job, lapsed_at, error);
        Box::pin(async {})
    }
}

/// Where the set of jobs comes from; called again every `reload_every`, so config changes
/// take effect without a restart. When it fails, the schedule stays as it was.
pub type JobSource = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<ScheduledJob>, String>> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// This replica's name in claims.
    pub instance: String,
    /// A claim not renewed for this long may be taken over.
    pub lease: Duration,
    pub reload_every: Duration,
    /// Runs this replica executes at once; a fire beyond waits for one to end.
    pub max_concurrent_runs: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            // The pid and a random tail tell processes apart, and the host (a pod's
            // name) says which replica ran a job in `jobs history`.
            instance: format!(
                "{}-{}{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..6],
                host_name().map(|h| format!("@{h}")).unwrap_or_default(),
            ),
            lease: Duration::from_secs(60),
            reload_every: Duration::from_secs(30),
            max_concurrent_runs: 4,
        }
    }
}

/// The outcome of one fire on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireOutcome {
    Ran(Result<String, String>),
    /// Another replica claimed this fire.
    Claimed,
    /// The job's previous run is still going.
    Skipped,
    /// The lease was lost mid-run (another replica took over); the run was stopped.
    LeaseLost,
    /// The scheduler is shutting down: the run was stopped and handed back, for another
    /// replica to take over.
    Stopped,
    /// The claim step failed (the store was unreachable): this replica did not run the
    /// fire. If no claim reached the store, no replica runs it (the missed-fire check
    /// within two reloads aside), and `jobs list` flags it missed; if one did (its
    /// acknowledgement was lost, or its check failed), it is handed back and a sweep runs
    /// it once the store answers.
    ClaimFailed(String),
}

impl FireOutcome {
    /// The `outcome` label of `sluice_job_fires_total`.
    fn label(&self) -> &'static str {
        match self {
            FireOutcome::Ran(Ok(_)) => "completed",
            FireOutcome::Ran(Err(_)) => "failed",
            FireOutcome::Claimed => "claimed_elsewhere",
            FireOutcome::Skipped => "skipped",
            FireOutcome::LeaseLost => "lease_lost",
            FireOutcome::Stopped => "stopped",
            FireOutcome::ClaimFailed(_) => "claim_failed",
        }
    }
}

const FIRE_OUTCOMES: [&str; 8] = [
    "completed",
    "failed",
    "claimed_elsewhere",
    "skipped",
    "lease_lost",
    "stopped",
    "claim_failed",
    // Counted by the sweep (a stopped run a later fire completed past), not as a fire's
    // outcome on the replica that fired it.
    "superseded",
];

fn count_fire(job: &str, outcome: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_job_fires_total",
        "Fires of scheduled jobs seen by this replica, by job and outcome (completed, failed, claimed_elsewhere, skipped, lease_lost, stopped, claim_failed, superseded).",
        &[("job_name", job), ("outcome", outcome)],
        n,
    );
}

fn count_job_run(job: &str, status: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_job_runs_total",
        "Scheduled job runs, by job and outcome.",
        &[("job_name", job), ("status", status)],
        n,
    );
}

/// This host's name (a Kubernetes pod's name), from the kernel or `$HOSTNAME`, in letters,
/// digits, dots and dashes, at most 63 of them; none when neither says.
pub fn host_name() -> Option<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(63)
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Parses a cron expression with seconds (6 or 7 fields).
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    sluice_core::cron::parse(expr).map_err(|e| format!("invalid schedule: expected {e}"))
}

/// The time zone `job`'s cron is read in (UTC when it names none).
pub fn job_timezone(job: &ScheduledJob) -> Result<chrono_tz::Tz, String> {
    match job.timezone.as_deref() {
        None => Ok(chrono_tz::UTC),
        Some(name) => name
            .parse()
            .map_err(|_| format!("unknown time zone `{name}`")),
    }
}

/// What a registered trigger was made from. It includes the time zone's UTC offset at
/// `now`, because the cron library computes every tick after the first with the offset it
/// found when the trigger was added: when daylight saving time begins or ends, the key
/// changes and the next reload (every `reload_seconds`) replaces the trigger, so a
/// `0 0 2 * * *` in Europe/Paris keeps firing at 02:00 local, not an hour off until the
/// process restarts.
fn trigger_key(job: &ScheduledJob, now: chrono::DateTime<Utc>) -> String {
    use chrono::{Offset, TimeZone};
    let offset = job_timezone(job)
        .map(|tz| {
            tz.offset_from_utc_datetime(&now.naive_utc())
                .fix()
                .local_minus_utc()
        })
        .unwrap_or(0);
    format!("{}|{:?}|{offset}", job.cron, job.timezone)
}

/// The first fire of `job` after `now`, its cron read in its time zone.
pub fn next_fire(
    job: &ScheduledJob,
    now: chrono::DateTime<Utc>,
) -> Result<chrono::DateTime<Utc>, String> {
    let cron = parse_cron(&job.cron)?;
    let tz = job_timezone(job)?;
    cron.find_next_occurrence(&whole_second(now).with_timezone(&tz), false)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{}` has no next fire: {e}", job.cron))
}

/// The latest instant of `job`'s schedule at or before `now`.
pub fn previous_fire(
    job: &ScheduledJob,
    now: chrono::DateTime<Utc>,
) -> Result<chrono::DateTime<Utc>, String> {
    Ok(fire_instant(
        &parse_cron(&job.cron)?,
        job_timezone(job)?,
        now,
    ))
}

/// The latest instant of `cron` (read in `tz`) at or before `now`.
///
/// The hour a fall-back repeats: the cron library maps a local time that happens twice
/// to its first pass. A job at one fixed time of day runs once, at the first (as cron
/// does); any other job (`0 */15 * * * *`, hourly) fires in both passes. Instants are
/// searched in the UTC offsets in force now and a few hours ago as well, where local
/// time runs straight, and the latest that is a real instant of the job is taken (for a
/// job at one fixed time, a second pass counts as its first): within the repeated hour,
/// before its second pass of the job's time, the cron library's answer is the day
/// before's instant, and a trigger firing then would run it again.
pub fn fire_instant(
    cron: &croner::Cron,
    tz: chrono_tz::Tz,
    now: chrono::DateTime<Utc>,
) -> chrono::DateTime<Utc> {
    use chrono::{Offset, TimeZone};
    let now = whole_second(now);
    let in_zone = cron
        .find_previous_occurrence(&now.with_timezone(&tz), true)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now);
    let fixed = cron.determine_job_type() == croner::JobType::FixedTime;
    let offset_at = |t: chrono::DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    // The first pass of the local time `t` falls on, when that time happens twice.
    let first_pass = |t: chrono::DateTime<Utc>| match tz
        .from_local_datetime(&t.with_timezone(&tz).naive_local())
    {
        chrono::LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        _ => t,
    };
    let mut latest = in_zone;
    for probe in [now, now - chrono::Duration::hours(3)] {
        let offset = offset_at(probe);
        let Ok(found) = cron.find_previous_occurrence(&now.with_timezone(&offset), true) else {
            continue;
        };
        let found = found.with_timezone(&Utc);
        // An instant of the job only where that offset is the zone's.
        if offset_at(found) != offset {
            continue;
        }
        let found = if fixed { first_pass(found) } else { found };
        if found <= now && found > latest {
            latest = found;
        }
    }
    latest
}

/// `t` without its fraction of a second: fires are on whole seconds, and croner carries
/// the fraction of the instant it searches from over into what it finds.
fn whole_second(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    chrono::Timelike::with_nanosecond(&t, 0).unwrap_or(t)
}

/// The id of the claim of `job`'s fire at `fire` in `scheduled_runs`.
pub fn run_id(job: &str, fire: chrono::DateTime<Utc>) -> String {
    format!(
        "{job}@{}",
        fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

struct Inner {
    store: Store,
    runner: Arc<dyn Runner>,
    options: SchedulerOptions,
    /// Set once by `shutdown`: every run of this scheduler stops.
    stop: tokio::sync::watch::Sender<bool>,
    /// Runs of this scheduler executing now.
    executing: Arc<Tally>,
    /// Set by `hand_back`, before it hands the runs back: a run claimed later (a fire
    /// already under way when the triggers stopped) hands itself back.
    handed_back: std::sync::atomic::AtomicBool,
    /// Between `stop_runs` and `hand_back`: keeps the leases of the stopped runs, which
    /// stay this replica's while their stop is recorded.
    keepalive: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The jobs this replica schedules (as of its last reload): it takes over only their
    /// runs. A replica that does not know a job (an older one, mid-rollout of a new
    /// schedule) leaves its run to one that does, instead of failing it.
    /// `None` until the jobs were first loaded: until then every lapsed run is taken over.
    known: std::sync::RwLock<Option<std::collections::HashSet<String>>>,
    /// One permit per run this replica may execute at once.
    slots: tokio::sync::Semaphore,
}

/// A running scheduler. Dropping it does not stop it; `shutdown` does.
pub struct Scheduler {
    inner: Arc<Inner>,
    cron: Mutex<JobScheduler>,
    registered: Mutex<HashMap<String, (String, uuid::Uuid)>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Scheduler {
    pub async fn start(
        store: Store,
        runner: Arc<dyn Runner>,
        source: JobSource,
        options: SchedulerOptions,
    ) -> Result<Arc<Self>, String> {
        let sched = JobScheduler::new().await.map_err(|e| e.to_string())?;
        sched.start().await.map_err(|e| e.to_string())?;
        let slots = options.max_concurrent_runs.max(1);
        // The gauge exists, at 0, from the start.
        Waiting::change(|_| {});
        let inner = Arc::new(Inner {
            store,
            runner,
            options,
            stop: tokio::sync::watch::channel(false).0,
            executing: Default::default(),
            handed_back: Default::default(),
            keepalive: Default::default(),
            known: Default::default(),
            slots: tokio::sync::Semaphore::new(slots),
        });
        let this = Scheduler {
            inner: inner.clone(),
            cron: Mutex::new(sched),
            registered: Mutex::new(HashMap::new()),
            tasks: Default::default(),
        };
        let this = Arc::new(this);
        match source().await {
            Ok(jobs) => {
                if let Err(e) = this.reconcile(&jobs).await {
                    // Nothing of this scheduler may outlive the error.
                    let _ = this.cron.lock().await.shutdown().await;
                    return Err(e);
                }
                fire_missed(&inner, &jobs).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not read the jobs to schedule; trying again at the next reload")
            }
        }
        // Takes over fires whose owner stopped renewing its lease. Its first pass is at
        // once, once the schedules are loaded: runs handed back by a shutdown (a restart,
        // a rolling upgrade) are taken over as this replica starts, not half a lease later.
        let sweeper = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let every = (inner.options.lease / 2).max(Duration::from_millis(200));
                loop {
                    if let Err(e) = sweep(&inner).await {
                        sluice_core::metrics::count_background_error("scheduler_sweep", 1);
                        tracing::warn!(error = %e, "scheduler sweep failed");
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        let reloader = {
            let weak = Arc::downgrade(&this);
            let every = inner.options.reload_every;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(s) = weak.upgrade() else { return };
                    let reloaded = match source().await {
                        Ok(jobs) => {
                            let done = s.reconcile(&jobs).await;
                            fire_missed(&s.inner, &jobs).await;
                            done
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = reloaded {
                        sluice_core::metrics::count_background_error("scheduler_reload", 1);
                        tracing::warn!(error = %e, "scheduler reload failed; the schedule stays as it was");
                    }
                    // An export whose process died shows FAILED within a reload of its
                    // heartbeat going silent, not only when the next export starts (a
                    // day later for a daily job).
                    match crate::history::fail_dead_runs(&s.inner.store).await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(
                            runs = n,
                            "export runs that stopped sending heartbeats are marked FAILED"
                        ),
                        Err(e) => {
                            sluice_core::metrics::count_background_error("dead_export_check", 1);
                            tracing::warn!(error = %e, "could not check for interrupted export runs")
                        }
                    }
                }
            })
        };
        if let Ok(mut tasks) = this.tasks.lock() {
            tasks.push(sweeper);
            tasks.push(reloader);
        }
        Ok(this)
    }

    /// Adds, replaces and removes cron triggers to match `jobs`.
    pub async fn reconcile(&self, jobs: &[ScheduledJob]) -> Result<(), String> {
        // Every outcome's series exists from the start, at 0: a job's first failure is
        // then an increase an alert (`increase(...[1h]) > 0`) sees, not a new series.
        for job in jobs {
            for status in ["COMPLETED", "FAILED"] {
                count_job_run(&job.name, status, 0);
            }
            for outcome in FIRE_OUTCOMES {
                count_fire(&job.name, outcome, 0);
            }
        }
        if let Ok(mut known) = self.inner.known.write() {
            *known = Some(jobs.iter().map(|j| j.name.clone()).collect());
        }
        let mut registered = self.registered.lock().await;
        let sched = self.cron.lock().await;
        let wanted: HashMap<&str, &ScheduledJob> =
            jobs.iter().map(|j| (j.name.as_str(), j)).collect();
        let stale: Vec<String> = registered
            .iter()
            .filter(|(name, (key, _))| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|j| trigger_key(j, Utc::now()) != *key)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, id)) = registered.remove(&name) {
                let _ = sched.remove(&id).await;
                tracing::info!(job = %name, "unscheduled");
            }
        }
        for job in jobs {
            if registered.contains_key(&job.name) {
                continue;
            }
            let cron = match parse_cron(&job.cron) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "not scheduled");
                    continue;
                }
            };
            let tz = match job_timezone(job) {
                Ok(tz) => tz,
                Err(e) => {
                    tracing::warn!(job = %job.name, error = %e, "not scheduled");
                    continue;
                }
            };
            let inner = self.inner.clone();
            let job_clone = job.clone();
            // A trigger fires for instants after it was made: one from before (a trigger
            // remade as the zone's offset changed fires at once, finding the last
            // instant) is the missed-fire check's to run, if no replica claimed it.
            let made = whole_second(Utc::now());
            let trigger = Job::new_async_tz(job.cron.as_str(), tz, move |_, _| {
                let inner = inner.clone();
                let job = job_clone.clone();
                let cron = cron.clone();
                Box::pin(async move {
                    let fire = fire_instant(&cron, tz, Utc::now());
                    // Nor one from before the job's schedule took effect.
                    if fire < made || job.since.is_some_and(|since| fire < since) {
                        tracing::info!(job = %job.name, %fire, "a trigger fired with no new instant of the job due (remade as its time zone changed offset, or just scheduled); nothing run");
                        return;
                    }
                    let outcome = fire_job(&inner, &job, fire).await;
                    log_outcome(&job.name, fire, &outcome);
                })
            })
            .map_err(|e| format!("job `{}`: {e}", job.name))?;
            let id = sched.add(trigger).await.map_err(|e| e.to_string())?;
            registered.insert(job.name.clone(), (trigger_key(job, Utc::now()), id));
            tracing::info!(job = %job.name, cron = %job.cron, "scheduled");
        }
        Ok(())
    }

    /// Runs one fire now, with the same claim and lease as a cron trigger (and logged and
    /// counted as one).
    pub async fn fire(&self, job: &ScheduledJob, fire: chrono::DateTime<Utc>) -> FireOutcome {
        let outcome = fire_job(&self.inner, job, fire).await;
        log_outcome(&job.name, fire, &outcome);
        outcome
    }

    /// [`Scheduler::stop`], then [`Scheduler::hand_back`].
    pub async fn shutdown(&self) {
        self.stop().await;
        self.hand_back().await;
    }

    /// Stops taking work and stops the runs in flight: [`Scheduler::stop_triggers`], then
    /// [`Scheduler::stop_runs`]. Calling it again does nothing more.
    pub async fn stop(&self) {
        self.stop_triggers().await;
        self.stop_runs().await;
    }

    /// Stops taking work: the triggers, the sweeper's take-overs, the reloads.
    pub async fn stop_triggers(&self) {
        let _ = self.cron.lock().await.shutdown().await;
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }

    /// Stops the runs in flight, waiting for them to end: up to 10 s, or as long as a run
    /// that has finished may take to record its end (half a lease, with retries), since
    /// one handed back before its end is recorded would run again elsewhere. The runs
    /// stay this replica's, their leases kept, until [`Scheduler::hand_back`], so what
    /// they leave can be recorded first (an interrupted import) without racing a replica
    /// that took them over, and a slow shutdown does not count as their owner dying.
    pub async fn stop_runs(&self) {
        self.inner.stop.send_replace(true);
        // Started before the runs are waited for: a stopped run's own heartbeat ends at
        // once. Renewing one still ending is harmless (it is this replica's).
        self.keep_stopped_runs_leased();
        let wait =
            (self.inner.options.lease / 2 + Duration::from_secs(1)).max(Duration::from_secs(10));
        self.inner.executing.wait_idle(wait).await;
    }

    fn keep_stopped_runs_leased(&self) {
        let mut keepalive = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if keepalive.is_none() {
            let inner = self.inner.clone();
            *keepalive = Some(tokio::spawn(async move {
                let runs = inner.store.lease_collection(c::SCHEDULED_RUNS);
                let lease = inner.options.lease;
                loop {
                    let _ = runs
                        .update_many(
                            // Never one handed back meanwhile (a renewal still on the
                            // wire when `hand_back` aborted this task).
                            unlapsed(&doc! {
                                "owner": &inner.options.instance, "status": "RUNNING",
                                "handedBack": { "$ne": true },
                            }),
                            doc! { "$set": { "expiresAt": inner.store.now_plus(lease) } },
                        )
                        .await;
                    tokio::time::sleep(lease / 3).await;
                }
            }));
        }
    }

    /// Hands back the runs this replica still holds: their lease is expired at once, so
    /// another replica takes them over now rather than after the lease. Call it after
    /// [`Scheduler::stop`]: a run handed back while it still ran could be taken over and
    /// run twice at once.
    pub async fn hand_back(&self) {
        if let Some(k) = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            k.abort();
        }
        self.inner
            .handed_back
            .store(true, std::sync::atomic::Ordering::SeqCst);
        hand_back(&self.inner, doc! {}).await;
    }
}

/// How long after a cron instant a replica may still claim it: the missed-fire check of
/// each replica looks back two reloads and 10 s.
pub fn missed_fire_window(reload_every: Duration) -> Duration {
    reload_every * 2 + Duration::from_secs(10)
}

/// Whether a claim of `job`'s fire at `fire` is recorded (any status), read from the
/// primary as claims are.
pub async fn fire_claimed(
    store: &Store,
    job: &str,
    fire: chrono::DateTime<Utc>,
) -> Result<bool, StoreError> {
    store
        .lease_collection(c::SCHEDULED_RUNS)
        .find_one(doc! { common::ID: run_id(job, fire) })
        .projection(doc! { common::ID: 1 })
        .await
        .map(|found| found.is_some())
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, "find a fire's claim"))
}

/// Whether `job` was in effect at its instant `fire`: from its start when one is recorded
/// (an integration config's `scheduleSince`), else (a `[[schedules]]` entry, whose start
/// no one recorded) when the instant before `fire` was claimed, or the latest fire
/// recorded before `fire` (runs by hand aside) was an instant of this same cron. A schedule added, or whose
/// cron changed, since then was not: it has no instant to make up for, where firing one
/// would run a window its old cron never had.
pub async fn in_effect_at(
    store: &Store,
    job: &ScheduledJob,
    fire: chrono::DateTime<Utc>,
) -> Result<bool, StoreError> {
    if let Some(since) = job.since {
        return Ok(fire >= since);
    }
    let latest = store
        .lease_collection(c::SCHEDULED_RUNS)
        .find_one(
            // Fires only: a run by hand between is no instant of the cron.
            doc! { "job": &job.name, "manual": { "$ne": true }, "scheduledFor": { "$lt": bson::DateTime::from_chrono(fire) } },
        )
        .sort(doc! { "scheduledFor": -1 })
        .projection(doc! { "scheduledFor": 1 })
        .await
        .map_err(StoreError::mongo(
            c::SCHEDULED_RUNS,
            "find a job's latest run",
        ))?;
    let ran_this_cron = latest
        .and_then(|d| d.get_datetime("scheduledFor").ok().map(|t| t.to_chrono()))
        .is_some_and(|at| previous_fire(job, at).is_ok_and(|p| p == at));
    if ran_this_cron {
        return Ok(true);
    }
    match previous_fire(job, fire - chrono::Duration::seconds(1)) {
        Ok(before) if before < fire => fire_claimed(store, &job.name, before).await,
        _ => Ok(false),
    }
}

/// Fires the latest instant of each job that passed recently (within two reloads and 10
/// s) without any replica claiming it: a trigger remade as daylight saving time began
/// skipped it (the cron library fixes a zone's offset per trigger), or every replica was
/// restarting at that instant. The claim is the usual one (`job@instant`), so an instant
/// a trigger fired, or another replica's check, is not run twice.
async fn fire_missed(inner: &Arc<Inner>, jobs: &[ScheduledJob]) {
    let now = Utc::now();
    let window = missed_fire_window(inner.options.reload_every);
    for job in jobs {
        let Ok(last) = previous_fire(job, now) else {
            continue;
        };
        let Ok(age) = (now - last).to_std() else {
            continue;
        };
        // The trigger that fires an instant on time has had two seconds to claim it.
        if age < Duration::from_secs(2) || age > window {
            continue;
        }
        match fire_claimed(&inner.store, &job.name, last).await {
            Ok(false) => {}
            Ok(true) => continue,
            Err(e) => {
                tracing::warn!(job = %job.name, error = %e, "could not look for a missed fire");
                continue;
            }
        }
        // Not an instant of the schedule as it was then (one just added, or whose cron
        // changed): nothing was missed.
        match in_effect_at(&inner.store, job, last).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(job = %job.name, error = %e, "could not look for a missed fire");
                continue;
            }
        }
        tracing::warn!(job = %job.name, fire = %last, "firing an instant no replica claimed (missed by its trigger)");
        let (inner, job) = (inner.clone(), job.clone());
        tokio::spawn(async move {
            let outcome = fire_job(&inner, &job, last).await;
            log_outcome(&job.name, last, &outcome);
        });
    }
}

/// Logs how a fire ended, a failed run at ERROR so that alerting on log level sees it.
fn log_outcome(job: &str, fire: chrono::DateTime<Utc>, outcome: &FireOutcome) {
    count_fire(job, outcome.label(), 1);
    match outcome {
        FireOutcome::Ran(Ok(summary)) => tracing::info!(job, %fire, summary, "run completed"),
        FireOutcome::Ran(Err(error)) => tracing::error!(job, %fire, error, "run failed"),
        FireOutcome::Claimed => tracing::debug!(job, %fire, "fire claimed by another replica"),
        FireOutcome::Skipped => {
            tracing::warn!(job, %fire, "fire skipped: the job's previous run is still going")
        }
        FireOutcome::LeaseLost => tracing::warn!(job, %fire, "run stopped: its lease was lost"),
        FireOutcome::Stopped => {
            tracing::warn!(job, %fire, "run stopped by the shutdown; handed back for another replica")
        }
        FireOutcome::ClaimFailed(error) => {
            tracing::error!(job, %fire, error, "fire not run here: its claim failed (`sluice jobs list` says if no replica ran it)")
        }
    }
}

async fn fire_job(
    inner: &Arc<Inner>,
    job: &ScheduledJob,
    fire: chrono::DateTime<Utc>,
) -> FireOutcome {
    // The lease is counted from before the claim that writes it.
    let leased = tokio::time::Instant::now();
    match claim(inner, job, fire).await {
        Ok(Some(outcome)) => outcome,
        Ok(None) => execute(inner, job, fire, leased).await,
        Err(e) => FireOutcome::ClaimFailed(e.to_string()),
    }
}

/// `Ok(None)`: the claim is ours; otherwise why not.
async fn claim(
    inner: &Inner,
    job: &ScheduledJob,
    fire: chrono::DateTime<Utc>,
) -> Result<Option<FireOutcome>, StoreError> {
    let runs = inner.store.lease_collection(c::SCHEDULED_RUNS);
    let now = inner.store.now();
    let id = run_id(&job.name, fire);
    if let Some(other) = live_run(&inner.store, &job.name, &id).await? {
        let skipped = doc! {
            common::ID: &id, "job": &job.name, "scheduledFor": DateTime::from_chrono(fire),
            "status": "SKIPPED", "owner": &inner.options.instance,
            "reason": format!(
                "the run `{}` (owner {}) is {}",
                other.get_str(common::ID).unwrap_or("?"),
                other.get_str("owner").unwrap_or("?"),
                if other.contains_key(WAITING_SINCE) {
                    "waiting for a run slot".to_string()
                } else {
                    // A live lease: the run goes on, or its process stopped and the
                    // lease has not lapsed yet.
                    let until = other
                        .get_datetime("expiresAt")
                        .ok()
                        .and_then(|t| t.try_to_rfc3339_string().ok())
                        .unwrap_or_else(|| "?".into());
                    format!("still going (its lease holds until {until}, renewed while its process runs)")
                },
            ),
            common::CREATED_AT: now, "endedAt": now,
        };
        return match runs.insert_one(skipped).await {
            Ok(_) => Ok(Some(FireOutcome::Skipped)),
            Err(e) if is_duplicate_key(&e) => Ok(Some(FireOutcome::Claimed)),
            Err(e) => Err(StoreError::mongo(c::SCHEDULED_RUNS, "record skip")(e)),
        };
    }
    let claim = doc! {
        common::ID: &id, "job": &job.name, "scheduledFor": DateTime::from_chrono(fire),
        "status": "RUNNING", "owner": &inner.options.instance,
        "startedAt": now, "expiresAt": inner.store.now_plus(inner.options.lease),
        "attempts": 1, common::CREATED_AT: now,
    };
    let inserted = match runs.insert_one(claim).await {
        // Applied, but no majority acknowledged it in time: the claim is this replica's
        // if the record says so (left alone, it would lapse as if its owner had died).
        Err(e) if is_write_concern_error(&e) => {
            match owned_by(&runs, &id, &inner.options.instance).await {
                true => Ok(()),
                false => Err(e),
            }
        }
        other => other.map(|_| ()),
    };
    match inserted {
        // A run by hand started at the same moment: whichever looks second steps back.
        Ok(()) => {
            let looked = match live_run(&inner.store, &job.name, &id).await {
                Ok(Some(other)) => step_back(&inner.store, &id, &other)
                    .await
                    .map(|()| Some(FireOutcome::Skipped)),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            if looked.is_err() {
                // The claim is ours but could not be checked: handed back at once (not
                // counted as its owner dying), for the sweep to run once the store
                // answers, instead of held until its lease lapses.
                hand_back(inner, doc! { common::ID: &id }).await;
            }
            looked
        }
        Err(e) if is_duplicate_key(&e) => Ok(Some(FireOutcome::Claimed)),
        Err(e) => Err(StoreError::mongo(c::SCHEDULED_RUNS, "claim")(e)),
    }
}

/// Whether the record `id` is RUNNING and owned by `owner` (read back after a write whose
/// acknowledgement timed out).
async fn owned_by(runs: &mongodb::Collection<Document>, id: &str, owner: &str) -> bool {
    runs.count_documents(doc! { common::ID: id, "owner": owner, "status": "RUNNING" })
        .await
        .is_ok_and(|n| n == 1)
}

/// Runs a claimed fire with a heartbeat; stops if the lease is lost.
async fn execute(
    inner: &Arc<Inner>,
    job: &ScheduledJob,
    fire: chrono::DateTime<Utc>,
    leased: tokio::time::Instant,
) -> FireOutcome {
    let id = run_id(&job.name, fire);
    let runs = inner.store.lease_collection(c::SCHEDULED_RUNS);
    let me = inner.options.instance.clone();
    let lease = inner.options.lease;
    let heartbeat = {
        let store = inner.store.clone();
        let filter = doc! { common::ID: &id, "owner": &me, "status": "RUNNING" };
        let id = id.clone();
        async move {
            let why = keep_lease(&store, filter, lease, leased).await;
            tracing::warn!(run = %id, why, "lease lost");
        }
    };
    let mut heartbeat = std::pin::pin!(heartbeat);
    let mut stop = inner.stop.subscribe();
    let _executing = inner.executing.enter();
    let stopping = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    let result = tokio::select! {
        // A run that has finished counts, whatever became ready with it: its result
        // thrown away, the job would run again elsewhere.
        biased;
        r = async {
            let _slot = take_slot(inner, &id).await;
            // Timed from its slot: `sluice_job_run_seconds` is the run's own time.
            let started = std::time::Instant::now();
            (inner.runner.run(job, fire).await, started)
        } => Some(r),
        _ = &mut heartbeat => {
            tracing::warn!(job = %job.name, run = %id, "lease lost; run stopped");
            return FireOutcome::LeaseLost;
        }
        _ = stopping => None,
    };
    let Some((result, started)) = result else {
        // Handed back with the rest by `Scheduler::hand_back`, once the stop is recorded;
        // claimed after that, it hands itself back.
        if inner.handed_back.load(std::sync::atomic::Ordering::SeqCst) {
            hand_back(inner, doc! { common::ID: &id }).await;
        }
        return FireOutcome::Stopped;
    };
    let (status, ended) = run_end(&result, inner.store.now());
    count_job_run(&job.name, status, 1);
    sluice_core::metrics::observe_seconds(
        "sluice_job_run_seconds",
        "Duration of scheduled job runs, by job.",
        &[("job_name", job.name.as_str())],
        started.elapsed().as_secs_f64(),
    );
    // The lease is still renewed while the end is recorded (with retries): a run whose
    // end is not recorded would run again once its lease lapsed.
    tokio::select! {
        biased;
        _ = record_end(&runs, doc! { common::ID: &id, "owner": &me }, ended, lease / 2) => {}
        _ = &mut heartbeat => {
            tracing::error!(job = %job.name, run = %id, "the run's lease was lost before its end was recorded; another replica may run it again");
        }
    }
    FireOutcome::Ran(result)
}

/// A waiting run's record field: when it began waiting for a slot (unset once it has one).
const WAITING_SINCE: &str = "waitingSince";

/// A slot to execute a claimed run in: at once when one is free; otherwise the run's
/// record says it waits (`waitingSince`, `reason`) until one is, then `startedAt` is set
/// to when it got the slot and `waitedMs` to how long it waited.
/// (`None` only if the slots were closed, which they never are.)
async fn take_slot<'a>(inner: &'a Inner, id: &str) -> Option<tokio::sync::SemaphorePermit<'a>> {
    if let Ok(slot) = inner.slots.try_acquire() {
        return Some(slot);
    }
    let runs = inner.store.lease_collection(c::SCHEDULED_RUNS);
    let mine = doc! { common::ID: id, "owner": &inner.options.instance, "status": "RUNNING" };
    let limit = inner.options.max_concurrent_runs;
    let since = inner.store.now();
    let noted = runs
        .update_one(
            mine.clone(),
            doc! { "$set": {
                WAITING_SINCE: since,
                "reason": format!("waiting for a run slot: this replica runs {limit} at once ([scheduler] max_concurrent_runs)"),
            } },
        )
        .await;
    if let Err(e) = noted {
        tracing::warn!(run = id, error = %e, "could not note that the run waits for a slot");
    }
    tracing::info!(
        run = id,
        limit,
        "run waits for a slot: this replica runs its limit at once"
    );
    let slot = {
        let _waiting = Waiting::enter();
        inner.slots.acquire().await
    };
    let now = inner.store.now();
    let started = runs
        .update_one(
            mine,
            doc! {
                "$set": { "startedAt": now, "waitedMs": now.timestamp_millis() - since.timestamp_millis() },
                "$unset": { WAITING_SINCE: "", "reason": "" },
            },
        )
        .await;
    if let Err(e) = started {
        tracing::warn!(run = id, error = %e, "could not note when the waiting run started");
    }
    slot.ok()
}

/// Claimed runs of this process waiting for a slot; the gauge is set under the same lock
/// as the count changes, so it cannot be left showing an older count.
static WAITING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Counts a run waiting for a slot in `sluice_job_runs_waiting` until dropped (a run
/// stopped while it waits is dropped too).
struct Waiting;

impl Waiting {
    fn enter() -> Self {
        Self::change(|n| *n += 1);
        Self
    }

    fn change(f: impl FnOnce(&mut usize)) {
        let mut n = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut n);
        show_waiting(*n);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        Self::change(|n| *n = n.saturating_sub(1));
    }
}

fn show_waiting(n: usize) {
    sluice_core::metrics::set(
        "sluice_job_runs_waiting",
        "Claimed scheduled runs waiting for a slot on this replica ([scheduler] max_concurrent_runs).",
        &[],
        n as f64,
    );
}

/// A run's outcome as its status and the fields that record its end (`status`, `result`
/// or `error`, `endedAt`): the same for scheduled fires and manual runs.
fn run_end(result: &Result<String, String>, ended_at: DateTime) -> (&'static str, Document) {
    let (status, field, text) = match result {
        Ok(summary) => ("COMPLETED", "result", summary),
        Err(e) => ("FAILED", "error", e),
    };
    (
        status,
        doc! { "status": status, field: text, "endedAt": ended_at },
    )
}

/// How long a run started by hand holds its lease between renewals (it renews every third
/// of it while it runs).
pub const MANUAL_LEASE: Duration = Duration::from_secs(60);

/// Records a run started by hand (`sluice jobs run`, `sluice import run`,
/// `POST /v1/admin/jobs/{name}/run`) in `scheduled_runs` beside the fires, so `jobs list`,
/// `jobs history` and the admin API show it and how it ended. It holds a lease like a fire
/// (renewed by [`hold_manual_run`]): while it runs, the job's fires are recorded SKIPPED and
/// other runs by hand are refused, so two runs never share an import's checkpoint. It is
/// marked `manual`: if its process dies, no replica runs it again (the sweeper records it
/// FAILED once its lease lapses). Returns its id.
pub async fn start_manual_run(store: &Store, job: &str, owner: &str) -> Result<String, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        check_not_running(store, job).await?;
        let now = store.now();
        let id = format!(
            "{job}@manual-{}-{}",
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let runs = store.lease_collection(c::SCHEDULED_RUNS);
        runs.insert_one(doc! {
            common::ID: &id, "job": job, "scheduledFor": now, "status": "RUNNING",
            "manual": true, "startedAt": now,
            "owner": match host_name() {
                Some(host) => format!("{owner} on {host}"),
                None => owner.to_string(),
            },
            "expiresAt": store.now_plus(MANUAL_LEASE), "attempts": 1, common::CREATED_AT: now,
        })
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, "record a manual run"))?;
        // Two runs started at the same moment both passed the check above; whichever
        // looks second sees the other and steps back, so at most one of them runs.
        let Some(other) = live_run(store, job, &id).await? else {
            return Ok(id);
        };
        step_back(store, &id, &other).await?;
        // When both looked after both inserted, both stepped back and nothing runs:
        // tried again after a random pause (each attempt is as safe as the first), so
        // one of them goes instead of both answering that a run is in progress.
        if tries < MANUAL_START_TRIES && live_run(store, job, &id).await?.is_none() {
            let pause = rand::random_range(20..200u64);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            continue;
        }
        return Err(busy(job, &other));
    }
}

/// Attempts of a run by hand that stepped back from a tie.
const MANUAL_START_TRIES: u32 = 4;

/// Runs `work` for the manual run `id`, renewing its lease; if the lease is lost (the
/// record was ended elsewhere, or the store stayed unreachable for a whole lease), `work`
/// is stopped and the answer is the error saying so.
pub async fn hold_manual_run<T>(
    store: &Store,
    id: &str,
    work: impl Future<Output = T>,
) -> Result<T, String> {
    hold_manual_run_for(store, id, MANUAL_LEASE, work).await
}

/// [`hold_manual_run`], then [`end_manual_run`] with its outcome, the run counted as held
/// until its end is recorded: a shutdown ([`stop_manual_runs`]) waits for that record
/// instead of recording a run that had just completed as stopped, or exiting before its
/// end was written.
pub async fn run_and_end_manual_run(
    store: &Store,
    id: &str,
    work: impl Future<Output = Result<String, String>>,
) -> Result<String, String> {
    let (_until_recorded, stop) = Held::enter(store, id);
    let result = hold_while(store, id, MANUAL_LEASE, work, stop)
        .await
        .unwrap_or_else(Err);
    if let Err(e) = end_manual_run(store, id, &result).await {
        tracing::error!(run = id, error = %e, "could not record the manual run's end");
    }
    result
}

/// A run by hand this process holds now: its database and the switch that stops it.
struct HeldRun {
    id: String,
    database: String,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Runs by hand this process holds now.
static MANUAL_HELD: std::sync::Mutex<Vec<HeldRun>> = std::sync::Mutex::new(Vec::new());

/// An entry of [`MANUAL_HELD`], removed when its run stops holding.
struct Held(String);

impl Held {
    fn enter(store: &Store, id: &str) -> (Self, tokio::sync::watch::Receiver<bool>) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        MANUAL_HELD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HeldRun {
                id: id.to_string(),
                database: store.db().name().to_string(),
                stop,
            });
        (Self(id.to_string()), stopped)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = MANUAL_HELD.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|h| h.id == self.0) {
            held.swap_remove(i);
        }
    }
}

/// Stops the runs by hand this process holds on `store`'s database (runs started through
/// the admin API in `sluice serve`), waits up to `within` for them to stop, and records
/// those still RUNNING as FAILED "stopped by a shutdown", so their job is free at once
/// rather than once their lease lapses. Returns how many were stopped.
pub async fn stop_manual_runs(store: &Store, within: Duration) -> usize {
    let database = store.db().name().to_string();
    let ids: Vec<String> = {
        let held = MANUAL_HELD.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .filter(|h| h.database == database)
            .map(|h| {
                h.stop.send_replace(true);
                h.id.clone()
            })
            .collect()
    };
    if ids.is_empty() {
        return 0;
    }
    let deadline = tokio::time::Instant::now() + within;
    let still_held = || {
        MANUAL_HELD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|h| ids.contains(&h.id))
    };
    while tokio::time::Instant::now() < deadline && still_held() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ended) = run_end(
        &Err("stopped by a shutdown of its process; run it again".to_string()),
        store.now(),
    );
    let ended = store
        .lease_collection(c::SCHEDULED_RUNS)
        .update_many(
            doc! { common::ID: { "$in": &ids }, "status": "RUNNING" },
            doc! { "$set": ended },
        )
        .await;
    if let Err(e) = ended {
        tracing::error!(error = %e, runs = ?ids, "could not record runs by hand stopped by the shutdown");
    }
    ids.len()
}

/// [`hold_manual_run`] with a lease of `lease` (tests shorten it).
pub async fn hold_manual_run_for<T>(
    store: &Store,
    id: &str,
    lease: Duration,
    work: impl Future<Output = T>,
) -> Result<T, String> {
    let (_held, stop) = Held::enter(store, id);
    hold_while(store, id, lease, work, stop).await
}

/// [`hold_manual_run_for`] of a run already entered in [`MANUAL_HELD`], stopped through
/// `stop`.
async fn hold_while<T>(
    store: &Store,
    id: &str,
    lease: Duration,
    work: impl Future<Output = T>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<T, String> {
    let stopping = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    // The lease the start wrote was timed before its insert and read-back, which a slow
    // majority may stretch: renewed now, it is counted from a known instant.
    let filter = doc! { common::ID: id, "status": "RUNNING" };
    let sent = tokio::time::Instant::now();
    match store
        .lease_collection(c::SCHEDULED_RUNS)
        .update_one(
            unlapsed(&filter),
            doc! { "$set": { "expiresAt": store.now_plus(lease) } },
        )
        .await
    {
        Ok(r) if r.matched_count == 1 => {}
        Ok(_) => return Err(format!("run `{id}` lapsed before it began; start it again")),
        Err(e) => return Err(format!("run `{id}` could not take its lease: {e}")),
    }
    let heartbeat = keep_lease(store, filter, lease, sent);
    tokio::select! {
        biased; // (as in `execute`: finished work counts)
        out = work => Ok(out),
        _ = stopping => Err(format!("run `{id}` stopped: its process is shutting down")),
        why = heartbeat => {
            tracing::warn!(run = id, why, "manual run stopped: lease lost");
            Err(format!("run `{id}` stopped: {why}"))
        }
    }
}

/// Records how a run ended, trying again for up to `within` (a failover as it ends):
/// a run whose end is not recorded stays RUNNING, and once its lease lapses another
/// replica would run it again.
async fn record_end(
    runs: &mongodb::Collection<Document>,
    filter: Document,
    ended: Document,
    within: Duration,
) {
    let recorded = crate::retry::retry_within(
        within,
        "record a run's end",
        |_| true,
        || async {
            runs.update_one(filter.clone(), doc! { "$set": ended.clone() })
                .await
        },
    )
    .await;
    match recorded {
        Ok(r) if r.matched_count == 0 => {
            tracing::error!(run = ?filter, "a run's end was not recorded: its record belongs to another replica now");
        }
        Ok(_) => {}
        Err(Some(e)) => {
            tracing::error!(error = %e, run = ?filter, "could not record a run's end; once its lease lapses it runs again");
        }
        Err(None) => {
            tracing::error!(run = ?filter, "the store did not record a run's end in time; once its lease lapses it runs again");
        }
    }
}

/// Renews the lease of the run `filter` selects every third of `lease` until it is lost,
/// and returns why. The holder stops a sixth of a lease before the lease could lapse
/// (counted from the last renewal sent that the store confirmed), whether or not the store
/// answers: another replica may take the run over at `expiresAt`, and a renewal that
/// hangs (a failover, a half-open connection) must not keep the run going past it.
async fn keep_lease(
    store: &Store,
    filter: Document,
    lease: Duration,
    since: tokio::time::Instant,
) -> String {
    let runs = store.lease_collection(c::SCHEDULED_RUNS);
    let margin = lease / 6;
    // When the lease held now was written (just before its write was sent).
    let mut renewed_at = since;
    loop {
        let hold_until = renewed_at + (lease - margin);
        let wake = (tokio::time::Instant::now() + lease / 3).min(hold_until);
        tokio::time::sleep_until(wake).await;
        if tokio::time::Instant::now() >= hold_until {
            return "its lease could not be renewed before it would lapse".into();
        }
        let sent = tokio::time::Instant::now();
        let renewal = runs.update_one(
            unlapsed(&filter),
            doc! { "$set": { "expiresAt": store.now_plus(lease) } },
        );
        match tokio::time::timeout_at(hold_until, renewal).await {
            Err(_) => {
                return "the store did not answer a renewal before the lease would lapse".into()
            }
            Ok(Ok(r)) if r.matched_count == 1 => renewed_at = sent,
            Ok(Ok(_)) => {
                return "its record is no longer RUNNING, or another replica holds it".into()
            }
            // Tried again until the lease would lapse: no other replica can take the run
            // over before that.
            Ok(Err(e)) => {
                tracing::warn!(run = ?filter, error = %e, "could not renew a run's lease; trying again")
            }
        }
    }
}

/// `filter`, matching only while the lease has not lapsed by the server's own clock: a
/// renewal that reaches the server late (a failover, a stalled connection) must not revive
/// a lease another replica may be taking over.
fn unlapsed(filter: &Document) -> Document {
    let mut live = filter.clone();
    live.insert("$expr", doc! { "$gt": ["$expiresAt", "$$NOW"] });
    live
}

/// Runs going: RUNNING, their lease live.
fn live(store: &Store) -> Document {
    doc! { "status": "RUNNING", "expiresAt": { "$gt": store.now() } }
}

/// A run of `job` other than `except` that holds a live lease.
async fn live_run(store: &Store, job: &str, except: &str) -> Result<Option<Document>, StoreError> {
    let mut filter = live(store);
    filter.insert("job", job);
    filter.insert(common::ID, doc! { "$ne": except });
    store
        .lease_collection(c::SCHEDULED_RUNS)
        .find_one(filter)
        .await
        .map_err(StoreError::mongo(
            c::SCHEDULED_RUNS,
            "look for a run in flight",
        ))
}

/// A scheduled fire of `job` after `fire` that started once the run of `fire` had stopped
/// (`stopped_at`), and completed.
async fn later_fire(
    store: &Store,
    job: &str,
    fire: DateTime,
    stopped_at: DateTime,
) -> Result<Option<Document>, StoreError> {
    store
        .lease_collection(c::SCHEDULED_RUNS)
        .find_one(doc! {
            "job": job, "scheduledFor": { "$gt": fire }, "manual": { "$ne": true },
            "status": "COMPLETED", "startedAt": { "$gte": stopped_at },
        })
        .projection(doc! { common::ID: 1 })
        .await
        .map_err(StoreError::mongo(
            c::SCHEDULED_RUNS,
            "look for a later fire",
        ))
}

/// Ends the lapsed or handed-back run `run` as SKIPPED, superseded by the fire `later`
/// (a compare-and-set on its `expiresAt`, as a take-over is); whether it was ended here.
async fn supersede(
    runs: &mongodb::Collection<Document>,
    run: &Document,
    later: &str,
    now: DateTime,
) -> Result<bool, StoreError> {
    let ended = doc! {
        "$set": {
            "status": "SKIPPED", "endedAt": now,
            "reason": format!("superseded: its replica stopped before it ended, and the later fire `{later}` has run the job since, to completion (an import or push went on from the checkpoint this run left, or started over if its config had changed; an export caught its windows up)"),
        },
        "$unset": { "expiresAt": "", WAITING_SINCE: "" },
    };
    Ok(end_lapsed(runs, run, ended, "record a superseded run")
        .await?
        .is_some())
}

/// A run going now (RUNNING, its lease live).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunGoing {
    pub id: String,
    /// Claimed and waiting for a run slot (it has not started).
    pub waiting: bool,
    /// When it started, if it has.
    pub started_at: Option<DateTime>,
}

/// The run going now of each job that has one, read in one query (of a job with two, the
/// one that started first).
pub async fn runs_going(store: &Store) -> Result<HashMap<String, RunGoing>, StoreError> {
    use futures_util::TryStreamExt;
    let step = "look for runs in flight";
    let mut cursor = store
        .lease_collection(c::SCHEDULED_RUNS)
        .find(live(store))
        .projection(doc! { "job": 1, "startedAt": 1, WAITING_SINCE: 1 })
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, step))?;
    let mut going: HashMap<String, RunGoing> = HashMap::new();
    while let Some(d) = cursor
        .try_next()
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, step))?
    {
        let Ok(job) = d.get_str("job") else { continue };
        let run = RunGoing {
            id: d.get_str(common::ID).unwrap_or("?").to_string(),
            waiting: d.contains_key(WAITING_SINCE),
            started_at: d.get_datetime("startedAt").ok().copied(),
        };
        // A run that started comes before one that waits; of two, the earlier.
        let first = |r: &RunGoing| (r.started_at.is_none(), r.started_at);
        match going.get(job) {
            Some(held) if first(held) <= first(&run) => {}
            _ => {
                going.insert(job.to_string(), run);
            }
        }
    }
    Ok(going)
}

/// Ends the just-claimed run `id` as SKIPPED because `other` is going.
async fn step_back(store: &Store, id: &str, other: &Document) -> Result<(), StoreError> {
    store
        .lease_collection(c::SCHEDULED_RUNS)
        .update_one(
            doc! { common::ID: id },
            doc! {
                "$set": {
                    "status": "SKIPPED", "endedAt": store.now(),
                    "reason": format!("the run `{}` started at the same time", other.get_str(common::ID).unwrap_or("?")),
                },
                "$unset": { "expiresAt": "" },
            },
        )
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, "record a skip"))?;
    Ok(())
}

fn busy(job: &str, run: &Document) -> StoreError {
    let what = if run.contains_key(WAITING_SINCE) {
        "is claimed and waiting for a run slot"
    } else {
        "is in progress"
    };
    let lapse = run
        .get_datetime("expiresAt")
        .ok()
        .and_then(|t| t.try_to_rfc3339_string().ok())
        .map(|t| {
            format!(" (if its process died, its lease lapses at {t}, and the job may run then)")
        })
        .unwrap_or_default();
    StoreError::Busy(format!(
        "a run of `{job}` {what} ({}, owner {}); try again once it has ended{lapse}",
        run.get_str(common::ID).unwrap_or("?"),
        run.get_str("owner").unwrap_or("?")
    ))
}

/// Refuses to start `job` by hand while another run of it (a scheduled fire or a run by
/// hand) holds a live lease: two runs of one import would share its checkpoint, and one
/// would end the other's run.
pub async fn check_not_running(store: &Store, job: &str) -> Result<(), StoreError> {
    match live_run(store, job, "").await? {
        Some(r) => Err(busy(job, &r)),
        None => Ok(()),
    }
}

/// Records how a run from [`start_manual_run`] ended.
pub async fn end_manual_run(
    store: &Store,
    id: &str,
    result: &Result<String, String>,
) -> Result<(), StoreError> {
    let (_, ended) = run_end(result, store.now());
    store
        .lease_collection(c::SCHEDULED_RUNS)
        .update_one(doc! { common::ID: id }, doc! { "$set": ended })
        .await
        .map_err(StoreError::mongo(
            c::SCHEDULED_RUNS,
            "record a manual run's end",
        ))?;
    Ok(())
}

/// Hands back this replica's RUNNING runs matching `filter`: their lease expires at once,
/// so another replica's sweeper takes them over at its next pass.
async fn hand_back(inner: &Inner, mut filter: Document) {
    filter.insert("owner", &inner.options.instance);
    filter.insert("status", "RUNNING");
    let _ = inner
        .store
        .lease_collection(c::SCHEDULED_RUNS)
        .update_many(
            filter,
            doc! { "$set": { "expiresAt": DateTime::from_millis(0), "handedBackAt": inner.store.now(), "handedBack": true } },
        )
        .await;
}

/// How long a lapsed run of a job this replica does not schedule waits for a replica that
/// does (a rolling upgrade adding the job) before it is recorded FAILED.
const UNKNOWN_JOB_GRACE: Duration = Duration::from_secs(3600);

/// Takes over RUNNING fires whose lease expired (their owner died) and runs them.
async fn sweep(inner: &Arc<Inner>) -> Result<(), StoreError> {
    use futures_util::TryStreamExt;
    let runs = inner.store.lease_collection(c::SCHEDULED_RUNS);
    let now = inner.store.now();
    let orphans: Vec<Document> = runs
        .find(doc! { "status": "RUNNING", "expiresAt": { "$lt": now } })
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, "find orphans"))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, "find orphans"))?;
    for o in orphans {
        if o.get_bool("manual").unwrap_or(false) {
            // A run by hand is not run again by a replica: its process stopped renewing it.
            abandon(inner, &runs, &o, now).await?;
            continue;
        }
        // An owner that handed the run back was stopping; one whose lease lapsed died (or
        // lost the store). A run whose owners keep dying may be what kills them (a job
        // that exhausts memory): after MAX_LAPSES it is recorded FAILED instead of being
        // handed from replica to replica, taking each one down.
        // A run that was waiting for a slot never ran there: its owner's death is not
        // counted against it.
        let handed_back = o.get_bool("handedBack").unwrap_or(false);
        let never_ran = o.contains_key(WAITING_SINCE);
        let lapses = o.get_i32("lapses").unwrap_or(0) + i32::from(!handed_back && !never_ran);
        if lapses >= MAX_LAPSES {
            give_up(inner, &runs, &o, lapses, now).await?;
            continue;
        }
        let (Ok(id), Ok(job), Ok(expires), Ok(fire)) = (
            o.get_str(common::ID),
            o.get_str("job"),
            o.get_datetime("expiresAt"),
            o.get_datetime("scheduledFor"),
        ) else {
            continue;
        };
        // Until this replica has loaded its schedules once, it cannot tell which jobs it
        // runs: it takes nothing over (another replica, or its next pass, will).
        let loaded = inner.known.read().is_ok_and(|k| k.is_some());
        if !loaded {
            continue;
        }
        let unknown = inner
            .known
            .read()
            .is_ok_and(|k| k.as_ref().is_some_and(|k| !k.contains(job)));
        let stopped_at = stopped_at(&o).unwrap_or(*expires);
        if unknown {
            // Left to a replica that schedules the job. A job no replica has taken over
            // for an hour is scheduled by none (its config was turned off or removed):
            // its run is recorded FAILED instead of staying RUNNING for ever.
            let unclaimed = now.timestamp_millis() - stopped_at.timestamp_millis();
            if unclaimed > UNKNOWN_JOB_GRACE.as_millis() as i64 {
                let error = format!(
                    "abandoned: its process ({}) stopped, and no running replica schedules `{job}` any more",
                    o.get_str("owner").unwrap_or("?")
                );
                if let Some(id) = fail_lapsed(&runs, &o, &error, doc! {}, now).await? {
                    tracing::warn!(
                        run = id,
                        job,
                        "a run of a job no replica schedules was recorded FAILED"
                    );
                    ended_lapsed(inner, &o, &error).await;
                }
            }
            continue;
        }
        // A later fire of the job that started after this run stopped and completed has
        // done this one's work: an import went on from the checkpoint the stopped run
        // left, an export caught its windows up. Run again, it would repeat that work (a
        // whole import). One still going is waited for (below); one that failed or was
        // skipped leaves this run to be taken over.
        if let Some(later) = later_fire(&inner.store, job, *fire, stopped_at).await? {
            let later = later.get_str(common::ID).unwrap_or("?");
            if supersede(&runs, &o, later, now).await? {
                count_fire(job, "superseded", 1);
                tracing::warn!(
                    run = id,
                    later,
                    "a run whose owner stopped is not run again: a later fire of its job completed since"
                );
            }
            continue;
        }
        if live_run(&inner.store, job, id).await?.is_some() {
            continue; // taken over once the job's current run has ended
        }
        let leased = tokio::time::Instant::now();
        let taken = runs
            .update_one(
                doc! { common::ID: id, "status": "RUNNING", "expiresAt": *expires },
                doc! {
                    "$set": {
                        "owner": &inner.options.instance, "expiresAt": inner.store.now_plus(inner.options.lease),
                        "takenOverAt": now, "handedBack": false, "lapses": lapses,
                    },
                    "$unset": { WAITING_SINCE: "", "reason": "" },
                    "$inc": { "attempts": 1 },
                },
            )
            .await;
        let taken = match taken {
            Ok(r) => r.modified_count == 1,
            // Applied but not acknowledged in time: taken if the record says so.
            Err(e) if is_write_concern_error(&e) => {
                owned_by(&runs, id, &inner.options.instance).await
            }
            Err(e) => return Err(StoreError::mongo(c::SCHEDULED_RUNS, "take over")(e)),
        };
        if taken {
            // A fire of the job may have been claimed between the look above and the
            // take-over; it checks for this run after claiming, this checks for it after
            // taking over, so the two never both run (at worst both step back: the fire is
            // skipped and this run is taken over at a later pass).
            if live_run(&inner.store, job, id).await?.is_some() {
                hand_back(inner, doc! { common::ID: id }).await;
                continue;
            }
            let job = ScheduledJob {
                name: job.to_string(),
                cron: String::new(),
                timezone: None,
                since: None,
            };
            let fire = fire.to_chrono();
            tracing::warn!(job = %job.name, run = id, "took over a run whose owner stopped");
            let inner = inner.clone();
            tokio::spawn(async move {
                let outcome = execute(&inner, &job, fire, leased).await;
                log_outcome(&job.name, fire, &outcome);
            });
        }
    }
    Ok(())
}

/// Times a scheduled run's owner may die (its lease lapse) before the run is recorded
/// FAILED instead of taken over again.
pub const MAX_LAPSES: i32 = 3;

/// Records FAILED a scheduled run whose owners died `lapses` times running it.
async fn give_up(
    inner: &Arc<Inner>,
    runs: &mongodb::Collection<Document>,
    run: &Document,
    lapses: i32,
    now: DateTime,
) -> Result<(), StoreError> {
    let error = format!("given up: the replicas running it stopped renewing its lease {lapses} times (a run that takes its process down is not handed on); see their logs, then run it by hand");
    if let Some(id) = fail_lapsed(runs, run, &error, doc! { "lapses": lapses }, now).await? {
        ended_lapsed(inner, run, &error).await;
        tracing::error!(
            run = id,
            lapses,
            "a scheduled run whose owners kept dying was recorded FAILED"
        );
        // Counted where it is recorded: no owner lived to count it, and the alert on
        // FAILED runs is the one that must see a job that takes its process down.
        count_job_run(run.get_str("job").unwrap_or("?"), "FAILED", 1);
    }
    Ok(())
}

/// Records the run by hand `run`, whose lease lapsed, as FAILED.
async fn abandon(
    inner: &Arc<Inner>,
    runs: &mongodb::Collection<Document>,
    run: &Document,
    now: DateTime,
) -> Result<(), StoreError> {
    let error = format!(
        "abandoned: its process ({}) stopped renewing its lease",
        run.get_str("owner").unwrap_or("?")
    );
    if let Some(id) = fail_lapsed(runs, run, &error, doc! {}, now).await? {
        ended_lapsed(inner, run, &error).await;
        tracing::warn!(
            run = id,
            "a run by hand was abandoned (its process stopped); recorded FAILED"
        );
    }
    Ok(())
}

/// When the run `run` stopped: a run handed back has `expiresAt` 0, so when it was
/// handed back; otherwise when its lease lapsed.
fn stopped_at(run: &Document) -> Option<DateTime> {
    match run.get_datetime("handedBackAt") {
        Ok(at) if run.get_bool("handedBack").unwrap_or(false) => Some(*at),
        _ => run.get_datetime("expiresAt").ok().copied(),
    }
}

/// Tells the runner that the lapsed run `run` was recorded FAILED with `error`.
async fn ended_lapsed(inner: &Arc<Inner>, run: &Document, error: &str) {
    if let (Ok(job), Some(stopped_at)) = (run.get_str("job"), stopped_at(run)) {
        inner
            .runner
            .lapsed(job, stopped_at.to_chrono(), error)
            .await;
    }
}

/// Ends the lapsed run `run` FAILED with `error` (and `more` fields), if it is still
/// RUNNING with the lease it was found with; returns its id when this call ended it.
async fn fail_lapsed<'a>(
    runs: &mongodb::Collection<Document>,
    run: &'a Document,
    error: &str,
    more: Document,
    now: DateTime,
) -> Result<Option<&'a str>, StoreError> {
    let (_, mut ended) = run_end(&Err(error.to_string()), now);
    ended.extend(more);
    end_lapsed(
        runs,
        run,
        doc! { "$set": ended },
        "record a lapsed run FAILED",
    )
    .await
}

/// Applies `update` to the lapsed or handed-back run `run` if it is still as read (RUNNING
/// with the same `expiresAt`: no replica took it over meanwhile); its id when it did.
async fn end_lapsed<'a>(
    runs: &mongodb::Collection<Document>,
    run: &'a Document,
    update: Document,
    what: &'static str,
) -> Result<Option<&'a str>, StoreError> {
    let (Ok(id), Ok(expires)) = (run.get_str(common::ID), run.get_datetime("expiresAt")) else {
        return Ok(None);
    };
    let done = runs
        .update_one(
            doc! { common::ID: id, "status": "RUNNING", "expiresAt": *expires },
            update,
        )
        .await
        .map_err(StoreError::mongo(c::SCHEDULED_RUNS, what))?;
    Ok((done.modified_count == 1).then_some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every outcome's label is among those zero-initialised (a variant added without
    /// one would start its series at 1, invisible to `increase()`).
    #[test]
    fn every_fire_outcome_is_zero_initialised() {
        let every = [
            FireOutcome::Ran(Ok(String::new())),
            FireOutcome::Ran(Err(String::new())),
            FireOutcome::Claimed,
            FireOutcome::Skipped,
            FireOutcome::LeaseLost,
            FireOutcome::Stopped,
            FireOutcome::ClaimFailed(String::new()),
        ];
        for outcome in &every {
            // No wildcard: a new variant does not compile until it is named here (then
            // list it above too).
            match outcome {
                FireOutcome::Ran(_)
                | FireOutcome::Claimed
                | FireOutcome::Skipped
                | FireOutcome::LeaseLost
                | FireOutcome::Stopped
                | FireOutcome::ClaimFailed(_) => {}
            }
            assert!(
                FIRE_OUTCOMES.contains(&outcome.label()),
                "{}",
                outcome.label()
            );
        }
        let labels: std::collections::HashSet<_> = every.iter().map(FireOutcome::label).collect();
        // And `superseded`, which the sweep counts.
        assert_eq!(labels.len() + 1, FIRE_OUTCOMES.len());
    }

    #[test]
    fn fire_instants_follow_the_schedules_time_zone() {
        let cron = parse_cron("0 0 2 * * *").unwrap();
        let now = "2026-11-25T10:00:00Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap();
        // A fraction of a second in `now` does not leak into the fire instant.
        let later = "2026-11-25T10:00:00.75Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap();
        assert_eq!(
            fire_instant(&cron, chrono_tz::UTC, later).to_rfc3339(),
            "2026-11-25T02:00:00+00:00"
        );
        // 02:00 in Paris is 01:00 UTC in winter.
        assert_eq!(
            fire_instant(&cron, chrono_tz::Europe::Paris, now).to_rfc3339(),
            "2026-11-25T01:00:00+00:00"
        );
        assert_eq!(
            fire_instant(&cron, chrono_tz::UTC, now).to_rfc3339(),
            "2026-11-25T02:00:00+00:00"
        );
    }

    #[test]
    fn an_instant_that_daylight_saving_time_skips_is_fired_at_the_change() {
        // 02:30 does not exist in Paris on 2026-03-29: clocks go from 02:00 to 03:00
        // (01:00 UTC). Just after the change, the latest instant is that day's, moved to
        // the change, so the missed-fire check runs it within a reload.
        let cron = parse_cron("0 30 2 * * *").unwrap();
        let after = "2026-03-29T01:00:40Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap();
        let skipped = fire_instant(&cron, chrono_tz::Europe::Paris, after);
        assert!(
            (after - skipped) < chrono::Duration::seconds(60),
            "{skipped}"
        );
        // 02:30 happens twice in Paris on 2026-10-25 (00:30 and 01:30 UTC): the latest
        // instant after the second is still the first, so that day runs once.
        let twice = "2026-10-25T01:30:40Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap();
        assert_eq!(
            fire_instant(&cron, chrono_tz::Europe::Paris, twice).to_rfc3339(),
            "2026-10-25T00:30:00+00:00"
        );
        // So it is within the repeated hour before its second 02:30: not the day before's
        // instant, which a trigger remade then would run again.
        for now in ["2026-10-25T01:00:05Z", "2026-10-25T01:29:59Z"] {
            let now = now.parse::<chrono::DateTime<Utc>>().unwrap();
            assert_eq!(
                fire_instant(&cron, chrono_tz::Europe::Paris, now).to_rfc3339(),
                "2026-10-25T00:30:00+00:00",
                "{now}"
            );
        }
    }

    #[test]
    fn a_job_that_is_not_one_fixed_time_fires_in_both_passes_of_a_repeated_hour() {
        // Paris falls back on 2026-10-25 at 01:00 UTC: local 02:00-03:00 happens twice.
        let at = |t: &str| t.parse::<chrono::DateTime<Utc>>().unwrap();
        let paris = chrono_tz::Europe::Paris;
        let quarter = parse_cron("0 */15 * * * *").unwrap();
        for (now, fire) in [
            // The first pass (CEST), the second (CET), and just before and after it.
            ("2026-10-25T00:15:03Z", "2026-10-25T00:15:00+00:00"),
            ("2026-10-25T00:59:59Z", "2026-10-25T00:45:00+00:00"),
            ("2026-10-25T01:00:01Z", "2026-10-25T01:00:00+00:00"),
            ("2026-10-25T01:15:03Z", "2026-10-25T01:15:00+00:00"),
            ("2026-10-25T01:46:00Z", "2026-10-25T01:45:00+00:00"),
            ("2026-10-25T02:00:02Z", "2026-10-25T02:00:00+00:00"),
        ] {
            assert_eq!(
                fire_instant(&quarter, paris, at(now)).to_rfc3339(),
                fire,
                "{now}"
            );
        }
        // Half past every hour: just after the change, the latest is 02:30 of the first
        // pass (00:30 UTC), not 01:30 local of the hour before it.
        let half = parse_cron("0 30 * * * *").unwrap();
        assert_eq!(
            fire_instant(&half, paris, at("2026-10-25T01:02:00Z")).to_rfc3339(),
            "2026-10-25T00:30:00+00:00"
        );
        assert_eq!(
            fire_instant(&half, paris, at("2026-10-25T01:31:00Z")).to_rfc3339(),
            "2026-10-25T01:30:00+00:00"
        );
        // An ordinary day is unchanged.
        assert_eq!(
            fire_instant(&quarter, paris, at("2026-11-25T10:07:00Z")).to_rfc3339(),
            "2026-11-25T10:00:00+00:00"
        );
    }

    #[test]
    fn a_trigger_is_remade_when_its_time_zone_changes_offset() {
        let at = |t: &str| t.parse::<chrono::DateTime<Utc>>().unwrap();
        let job = |tz: Option<&str>| ScheduledJob {
            name: "j".into(),
            cron: "0 0 2 * * *".into(),
            timezone: tz.map(str::to_string),
            since: None,
        };
        let paris = job(Some("Europe/Paris"));
        // Summer time ends on 2026-10-25 at 01:00 UTC.
        assert_ne!(
            trigger_key(&paris, at("2026-10-25T00:59:00Z")),
            trigger_key(&paris, at("2026-10-25T01:01:00Z"))
        );
        assert_eq!(
            trigger_key(&paris, at("2026-11-01T00:00:00Z")),
            trigger_key(&paris, at("2026-12-01T00:00:00Z"))
        );
        let utc = job(None);
        assert_eq!(
            trigger_key(&utc, at("2026-07-01T00:00:00Z")),
            trigger_key(&utc, at("2026-12-01T00:00:00Z"))
        );
    }

    #[test]
    fn next_fires_follow_the_schedules_time_zone() {
        let now = "2026-11-25T10:00:00.25Z"
            .parse::<chrono::DateTime<Utc>>()
            .unwrap();
        let job = |tz: Option<&str>| ScheduledJob {
            name: "j".into(),
            cron: "0 0 2 * * *".into(),
            timezone: tz.map(str::to_string),
            since: None,
        };
        assert_eq!(
            next_fire(&job(Some("Europe/Paris")), now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-26T01:00:00+00:00"
        );
        assert_eq!(
            next_fire(&job(None), now).unwrap().to_rfc3339(),
            "2026-11-26T02:00:00+00:00"
        );
        assert!(next_fire(&job(Some("Mars/Olympus")), now)
            .unwrap_err()
            .contains("Mars/Olympus"));
    }

    #[test]
    fn cron_expressions_need_seconds() {
        assert!(parse_cron("*/5 * * * *").is_err());
        assert!(parse_cron("0 */5 * * * *").is_ok());
    }
}
