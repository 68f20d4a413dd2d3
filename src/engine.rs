//! What the scheduler runs: export schedules from `sluice.toml` (with catch-up of missed
//! daily windows) and integration configs with a `schedule` (imports and pushes).

use std::sync::Arc;

use bson::doc;
use futures_util::TryStreamExt;
use sluice_connectors::Store;
use sluice_core::config::Config;
use sluice_core::model::{collections as c, integration_fields as f, ExportJobType};
use sluice_jobs::schedule::{JobSource, RunFuture, Runner, ScheduledJob};

/// Export schedules are named `export:NAME`; integrations `integration:NAME`.
pub const EXPORT_PREFIX: &str = "export:";
pub const INTEGRATION_PREFIX: &str = "integration:";

/// Every job that should be scheduled now (re-read on every reload). An error reading the
/// integration configs is an error, not "no configs": the scheduler keeps its current
/// schedule rather than unscheduling every import while the store is unreachable.
pub async fn scheduled_jobs(
    config: &Config,
    store: &Store,
) -> Result<Vec<ScheduledJob>, sluice_connectors::StoreError> {
    let read = || {
        sluice_connectors::StoreError::mongo(
            c::INTEGRATION_CONFIGS,
            "read the scheduled integration configs",
        )
    };
    let mut jobs: Vec<ScheduledJob> = config
        .schedules
        .iter()
        .map(|s| ScheduledJob {
            name: format!("{EXPORT_PREFIX}{}", s.name),
            cron: s.cron.clone(),
            timezone: s.timezone.clone(),
            since: None,
        })
        .collect();
    let docs: Vec<bson::Document> = store
        .collection(c::INTEGRATION_CONFIGS)
        .find(doc! { f::IS_ACTIVE: true, "schedule": { "$type": "string" } })
        .await
        .map_err(read())?
        .try_collect()
        .await
        .map_err(read())?;
    for d in docs {
        if let (Ok(name), Ok(cron)) = (d.get_str(f::NAME), d.get_str("schedule")) {
            jobs.push(ScheduledJob {
                name: format!("{INTEGRATION_PREFIX}{name}"),
                cron: cron.to_string(),
                timezone: sluice_jobs::configs::timezone(&d),
                since: d
                    .get_datetime(f::SCHEDULE_SINCE)
                    .ok()
                    .map(|t| t.to_chrono()),
            });
        }
    }
    Ok(jobs)
}

/// A scheduled job as `sluice jobs list` and `GET /v1/admin/jobs` show it.
#[derive(Debug, Clone)]
pub struct JobOverview {
    pub name: String,
    /// None: an integration config not scheduled (or turned off) that was run by hand.
    pub cron: Option<String>,
    /// IANA time zone the cron is read in.
    pub timezone: String,
    /// The next fire (RFC 3339, UTC), or why there is none.
    pub next_fire: Result<String, String>,
    /// The latest recorded run (`scheduled_runs`): the latest fire, which may be one
    /// SKIPPED because a run is still going.
    pub last_run: Option<LastRun>,
    /// The run going now (its lease live), if any: whether it waits for a run slot, when
    /// it started.
    pub running: Option<sluice_jobs::schedule::RunGoing>,
    /// The job's latest cron instant, when no run was recorded for it although the time a
    /// replica has to claim it (the missed-fire check included) is over: no replica ran
    /// it (all were down, or MongoDB was unreachable then). Says when, and what to do.
    pub missed: Option<String>,
}

/// A job's latest recorded run.
#[derive(Debug, Clone)]
pub struct LastRun {
    pub id: String,
    pub status: String,
    /// The fire it ran, or when it was started by hand.
    pub scheduled_for: Option<chrono::DateTime<chrono::Utc>>,
    /// When it ended (RFC 3339), if it has.
    pub ended_at: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// When the job's latest COMPLETED run ended, when this one is not it (a SKIPPED fire
    /// hides the run that completed seconds before).
    pub last_completed_at: Option<String>,
}

/// A time as the API writes every time: RFC 3339 in UTC, to the millisecond
/// (`2026-12-08T00:15:00.000Z`).
pub(crate) fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Every scheduled job with its next fire and latest run, then every other integration
/// config that has a recorded run (run by hand, or scheduled while it was active).
pub async fn job_overview(
    config: &Config,
    store: &Store,
) -> Result<Vec<JobOverview>, sluice_connectors::StoreError> {
    let now = chrono::Utc::now();
    let latest_run = |job: String| async move {
        let find = |filter: bson::Document| async move {
            store
                .collection(c::SCHEDULED_RUNS)
                .find_one(filter)
                .sort(doc! { "scheduledFor": -1 })
                .await
                .map_err(sluice_connectors::StoreError::mongo(
                    c::SCHEDULED_RUNS,
                    "find the latest run",
                ))
        };
        let run = find(doc! { "job": &job }).await?;
        let last_completed_at = match &run {
            Some(d) if d.get_str("status") != Ok("COMPLETED") => {
                find(doc! { "job": &job, "status": "COMPLETED" })
                    .await?
                    .and_then(|d| {
                        d.get_datetime("endedAt")
                            .ok()
                            .map(|t| rfc3339(t.to_chrono()))
                    })
            }
            _ => None,
        };
        Ok::<_, sluice_connectors::StoreError>(run.map(|d| {
            LastRun {
                last_completed_at,
                id: d.get_str("_id").unwrap_or("?").to_string(),
                status: d.get_str("status").unwrap_or("?").to_string(),
                scheduled_for: d.get_datetime("scheduledFor").ok().map(|t| t.to_chrono()),
                ended_at: d
                    .get_datetime("endedAt")
                    .ok()
                    .map(|t| rfc3339(t.to_chrono())),
                error: d.get_str("error").ok().map(str::to_string),
            }
        }))
    };
    // A fire is claimed at its instant, or by the missed-fire check within two reloads
    // (and 10 s); past that (and five minutes at least), an instant with no claim was not
    // run by any replica.
    let reload = std::time::Duration::from_secs(config.scheduler.reload_seconds);
    let grace =
        sluice_jobs::schedule::missed_fire_window(reload).max(std::time::Duration::from_secs(300));
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    // Claims are kept this long after they end; an older instant's is gone either way.
    let kept = chrono::Duration::days(sluice_connectors::mongo::SCHEDULED_RUNS_KEPT_DAYS as i64);
    let claimed = sluice_jobs::schedule::fire_claimed;
    let mut going = sluice_jobs::schedule::runs_going(store).await?;
    let mut out = Vec::new();
    for job in scheduled_jobs(config, store).await? {
        let last_run = latest_run(job.name.clone()).await?;
        let mut missed = None;
        // The latest instant whose time to claim is over: a job firing more often than
        // that has later ones still within theirs, and would never show a miss.
        let claim_over = now
            .checked_sub_signed(grace)
            .and_then(|t| sluice_jobs::schedule::previous_fire(&job, t).ok());
        if let Some(fire) = claim_over {
            // Not missed: an instant still within its claim time or older than the
            // claims kept, one before the schedule took effect, or one a later run (by
            // hand, say) has made up for.
            let candidate = now - fire > grace
                && now - fire < kept
                && job.since.is_none_or(|since| fire >= since)
                && last_run
                    .as_ref()
                    .and_then(|r| r.scheduled_for)
                    .is_none_or(|at| at < fire);
            // A schedule with no known start (`[[schedules]]` in the config file) was in
            // effect at that instant only if it ran an earlier instant of this cron, or
            // claimed the one before (an outage longer than a period stays missed); a
            // server started, or a cron changed, since then missed nothing.
            let in_effect =
                candidate && sluice_jobs::schedule::in_effect_at(store, &job, fire).await?;
            if in_effect && !claimed(store, &job.name, fire).await? {
                missed = Some(format!(
                    "no run was recorded for the fire at {} (no replica was running, or MongoDB was unreachable then); run it by hand: `sluice jobs run {}`",
                    rfc3339(fire),
                    job.name
                ));
            }
        }
        out.push(JobOverview {
            next_fire: sluice_jobs::schedule::next_fire(&job, now).map(rfc3339),
            timezone: job.timezone.clone().unwrap_or_else(|| "UTC".into()),
            running: still_going(going.remove(&job.name), last_run.as_ref()),
            last_run,
            missed,
            name: job.name,
            cron: Some(job.cron),
        });
    }
    let read = || sluice_connectors::StoreError::mongo(c::INTEGRATION_CONFIGS, "list the configs");
    let names: Vec<bson::Document> = store
        .collection(c::INTEGRATION_CONFIGS)
        .find(doc! {})
        .projection(doc! { f::NAME: 1, f::IS_ACTIVE: 1 })
        .sort(doc! { f::NAME: 1 })
        .await
        .map_err(read())?
        .try_collect()
        .await
        .map_err(read())?;
    for d in names {
        let Ok(name) = d.get_str(f::NAME) else {
            continue;
        };
        let job = format!("{INTEGRATION_PREFIX}{name}");
        if out.iter().any(|j| j.name == job) {
            continue;
        }
        if let Some(last) = latest_run(job.clone()).await? {
            let why = if d.get_bool(f::IS_ACTIVE) == Ok(false) {
                "turned off (isActive: false)"
            } else {
                "no schedule: runs by hand only"
            };
            out.push(JobOverview {
                running: still_going(going.remove(&job), Some(&last)),
                name: job,
                cron: None,
                timezone: "UTC".into(),
                next_fire: Err(why.into()),
                last_run: Some(last),
                missed: None,
            });
        }
    }
    Ok(out)
}

/// The runs going are read before each job's latest run: a run that ended between the two
/// reads is its job's latest run, ended, and not going any more.
fn still_going(
    going: Option<sluice_jobs::schedule::RunGoing>,
    latest: Option<&LastRun>,
) -> Option<sluice_jobs::schedule::RunGoing> {
    going.filter(|g| latest.is_none_or(|l| l.id != g.id || l.status == "RUNNING"))
}

pub fn job_source(config: Arc<Config>, store: Store) -> JobSource {
    Arc::new(move || {
        let config = config.clone();
        let store = store.clone();
        Box::pin(async move {
            scheduled_jobs(&config, &store)
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// Runs scheduled jobs for real.
pub struct EngineRunner {
    pub config: Arc<Config>,
    pub store: Store,
}

/// A job's full name: `export:NAME` and `integration:NAME` as they are; a bare name is
/// the integration config of that name.
pub fn job_name(name: &str) -> String {
    if name.starts_with(EXPORT_PREFIX) || name.starts_with(INTEGRATION_PREFIX) {
        name.to_string()
    } else {
        format!("{INTEGRATION_PREFIX}{name}")
    }
}

/// The integration configs this process is importing (scheduled or manual runs), so that
/// a process stopping mid-run can record those runs as interrupted.
static IN_FLIGHT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The integration configs this process is importing now.
pub fn imports_in_flight() -> Vec<String> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// An import in [`IN_FLIGHT`]. Dropped when its run ends: a task dropped mid-run (the
/// process stopping) drops it too, so `serve` reads the set before it stops the tasks.
struct InFlight(String);

impl InFlight {
    fn enter(name: &str) -> Self {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
        Self(name.to_string())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut names = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = names.iter().position(|n| *n == self.0) {
            names.remove(i);
        }
    }
}

/// Live counters of a job run, for a progress display (only the one matching the job's
/// kind moves).
#[derive(Default, Clone)]
pub struct JobProgress {
    pub export: Arc<sluice_jobs::export::Progress>,
    pub import: Arc<sluice_jobs::import::ImportProgress>,
}

impl EngineRunner {
    pub async fn run_job(&self, name: &str) -> Result<String, String> {
        self.run_job_with(name, &JobProgress::default()).await
    }

    /// [`Self::run_job`], counting into `progress`.
    pub async fn run_job_with(&self, name: &str, progress: &JobProgress) -> Result<String, String> {
        if let Some(schedule) = name.strip_prefix(EXPORT_PREFIX) {
            let s = self
                .config
                .schedules
                .iter()
                .find(|s| s.name == schedule)
                .ok_or_else(|| format!("no export schedule `{schedule}`"))?;
            let kind = ExportJobType::parse(&s.kind)
                .map_err(|e| format!("schedule `{schedule}`: type: expected {e}"))?;
            let dest = crate::cli::open_destination(&self.config, None)
                .await
                .map_err(|e| e.to_string())?;
            let mut ctx = sluice_jobs::export::ExportContext::new(self.store.clone(), dest);
            ctx.progress = progress.export.clone();
            ctx.keep_replaced = self.config.keep_replaced_parts;
            ctx.work_dir = self.config.export_work_dir.clone();
            ctx.late_days_per_run = s.late_days_per_run();
            ctx.schedule = Some(s.name.clone());
            ctx.transforms = crate::cli::load_plugins_off_runtime(
                &self.config,
                self.config.plugins.export_chain(kind).to_vec(),
            )
            .await
            .map_err(|e| e.to_string())?;
            // The database's day, as the event writer's late-day marks see it.
            let yesterday = self.store.now().to_chrono().date_naive() - chrono::Days::new(1);
            let done = match kind {
                ExportJobType::EventData | ExportJobType::DailyAnalytics => {
                    sluice_jobs::export::catch_up(
                        &ctx,
                        kind,
                        yesterday,
                        s.catch_up(),
                        self.config.archive_after_days,
                    )
                    .await
                    .map_err(|e| e.to_string())?
                }
                _ => vec![sluice_jobs::export::run_export(
                    &ctx,
                    &sluice_jobs::export::ExportRequest {
                        late_readers: crate::cli::late_readers(&self.config),
                        late_readers_at: None,
                        late: false,
                        ..sluice_jobs::export::ExportRequest::day(
                            kind,
                            yesterday,
                            self.config.archive_after_days,
                        )
                        .scheduled()
                    },
                )
                .await
                .map_err(|e| e.to_string())?],
            };
            let rows: u64 = done.iter().map(|s| s.rows).sum();
            return Ok(format!(
                "{}, {}",
                sluice_core::counted(done.len() as u64, "run"),
                sluice_core::counted(rows, "row")
            ));
        }
        let integration = name.strip_prefix(INTEGRATION_PREFIX).unwrap_or(name);
        let _in_flight = InFlight::enter(integration);
        let options = sluice_jobs::import::ImportOptions {
            transforms: crate::cli::integration_transforms(&self.config, &self.store, integration)
                .await
                .map_err(|e| format!("{e:#}"))?,
            token_key: self.config.token_key.clone(),
            progress: progress.import.clone(),
            tracking: self.config.tracking.clone(),
            ..Default::default()
        };
        match sluice_jobs::import::run_import(&self.store, integration, &options).await {
            Ok(s) => import_outcome(&s),
            Err(sluice_jobs::import::ImportError::WrongType { .. }) => {
                sluice_jobs::import::run_push(&self.store, integration, &options)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|s| sluice_jobs::import::push_outcome(&s))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Runner for EngineRunner {
    fn run(&self, job: &ScheduledJob, _fire: chrono::DateTime<chrono::Utc>) -> RunFuture {
        let this = EngineRunner {
            config: self.config.clone(),
            store: self.store.clone(),
        };
        let name = job.name.clone();
        Box::pin(async move {
            // Turned off (or removed) since the schedule was loaded: its triggers fire
            // until the next reload, but an operator stopping a config must not see its
            // next fire run anyway (a run by hand of it is refused too).
            if let Some(config) = name.strip_prefix(INTEGRATION_PREFIX) {
                match sluice_jobs::configs::load(&this.store, config).await {
                    Ok(Some((_, stored))) if stored.get_bool(f::IS_ACTIVE) == Ok(false) => {
                        return Ok("not run: the config was turned off (isActive: false)".into())
                    }
                    Ok(None) => return Ok("not run: the config was removed".into()),
                    _ => {}
                }
            }
            this.run_job(&name).await
        })
    }

    fn lapsed(
        &self,
        job: &str,
        lapsed_at: chrono::DateTime<chrono::Utc>,
        error: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let store = self.store.clone();
        let (job, error) = (job.to_string(), error.to_string());
        Box::pin(async move {
            let Some(config) = job.strip_prefix(INTEGRATION_PREFIX) else {
                return;
            };
            let at = bson::DateTime::from_chrono(lapsed_at);
            if let Err(e) = sluice_jobs::import::close_lapsed_runs(&store, config, at, &error).await
            {
                tracing::warn!(job, error = %e, "could not close the import run of a lapsed run; the config's next run closes it");
            }
        })
    }
}

/// A completed import as its job's run ends: its line, or an error when it stored none of
/// the records it fetched because they all failed (a mapping that fits no record, a
/// required field the API stopped sending, a plugin failing every record), none of them
/// dropped by a plugin on purpose. The import itself is COMPLETED (its failures
/// are in `dead_letters`, its cursor moved on); the job's run, and `import run`'s exit
/// status, say that nothing came of it, so alerting sees it.
pub fn import_outcome(s: &sluice_jobs::import::ImportSummary) -> Result<String, String> {
    // Records a plugin chose to drop are no failure: with some, the run is not one
    // where everything failed. What the plugins failed is counted by this run's
    // failures, not by the letters it added: a run failing the same records again adds
    // none (they are kept once), and must fail again. (A checkpoint written before the
    // run's own count was kept has only the letters.)
    let plugin_failed = s.dead_letters.max(s.plugin_dead_letters);
    // Records a plugin filtered out on purpose were handled, not failed (none when it
    // fanned records out, which this cannot tell apart).
    let filtered = s
        .plugin_in
        .saturating_sub(s.plugin_out + s.plugin_dead_letters + s.skipped);
    if s.failed + plugin_failed > 0
        && s.inserted + s.updated + s.unchanged + s.skipped + filtered == 0
    {
        return Err(format!(
            "{}: every record failed (mapping, validation, a plugin or MongoDB's refusal) and none was stored; the reasons are in `dead_letters` and the run's samples",
            import_line(s)
        ));
    }
    Ok(import_line(s))
}

/// What the plugin chain did to an import's records, when it had any to do something
/// to: `plugins: 4 in, 2 out (1 skipped, 1 in dead_letters)`. Records a plugin filters
/// out appear nowhere else.
pub fn plugin_counts(s: &sluice_jobs::import::ImportSummary) -> Option<String> {
    if s.plugin_in == 0 {
        return None;
    }
    let mut set_aside = Vec::new();
    if s.skipped > 0 {
        set_aside.push(format!("{} skipped", s.skipped));
    }
    if s.plugin_dead_letters > 0 {
        set_aside.push(format!("{} in dead_letters", s.plugin_dead_letters));
    }
    let set_aside = if set_aside.is_empty() {
        String::new()
    } else {
        format!(" ({})", set_aside.join(", "))
    };
    Some(format!(
        "plugins: {} in, {} out{set_aside}",
        s.plugin_in, s.plugin_out
    ))
}

/// An import's outcome in one line, as `scheduled_runs` records it.
pub fn import_line(s: &sluice_jobs::import::ImportSummary) -> String {
    let mut line = format!(
        "{}, {} inserted, {} updated, {}{} failed mapping",
        sluice_core::counted(s.fetched, "record"),
        s.inserted,
        s.updated,
        already_stored(s.unchanged),
        s.failed
    );
    if let Some(counts) = plugin_counts(s) {
        line.push_str(&format!("; {counts}"));
    }
    // A run that completed with something to look at says so where its status is read
    // (`jobs history`); the warnings themselves are in its `import_runs` record. A run
    // cut short (a loop guard, `max_pages`, an error page answered with 200) read only
    // part of the source, though it completed.
    if let Some(note) = &s.stopped_early {
        line.push_str(&format!("; stopped early: {note}"));
    }
    if let Some(first) = s.warnings.first() {
        line.push_str(&format!(
            "; {} (import_runs): {first}",
            sluice_core::counted(s.warnings.len() as u64, "warning")
        ));
    }
    line
}

/// `N already stored, ` for a run's summary line, when an import met records it had
/// stored before and left unchanged (events); empty otherwise.
pub fn already_stored(unchanged: u64) -> String {
    if unchanged == 0 {
        String::new()
    } else {
        format!("{unchanged} already stored, ")
    }
}

/// When each job's latest COMPLETED run ended. The first reading groups every recorded run
/// (once per process); later ones read only the runs that ended since (by the `endedAt`
/// index), with a minute's margin for runs recorded late.
async fn last_successes(
    store: &Store,
) -> Result<std::collections::HashMap<String, bson::DateTime>, sluice_connectors::StoreError> {
    // By database: one process has one, but a test process has many.
    type Seen = (
        String,
        std::collections::HashMap<String, bson::DateTime>,
        bson::DateTime,
    );
    static SEEN: tokio::sync::Mutex<Option<Seen>> = tokio::sync::Mutex::const_new(None);
    let runs =
        || sluice_connectors::StoreError::mongo(c::SCHEDULED_RUNS, "read the latest successes");
    let mut seen = SEEN.lock().await;
    let now = store.now();
    let database = store.db().name().to_string();
    let (mut latest, since) = match seen.take() {
        Some((db, latest, read_at)) if db == database => (
            latest,
            Some(bson::DateTime::from_millis(
                read_at.timestamp_millis() - 60_000,
            )),
        ),
        _ => (Default::default(), None),
    };
    let mut filter = doc! { "status": "COMPLETED", "endedAt": { "$type": "date" } };
    if let Some(since) = since {
        filter.insert("endedAt", doc! { "$gte": since });
    }
    let mut cursor = store
        .collection(c::SCHEDULED_RUNS)
        .aggregate([
            doc! { "$match": filter },
            doc! { "$group": { "_id": "$job", "last": { "$max": "$endedAt" } } },
        ])
        .await
        .map_err(runs())?;
    while let Some(d) = cursor.try_next().await.map_err(runs())? {
        if let (Ok(job), Ok(at)) = (d.get_str("_id"), d.get_datetime("last")) {
            let entry = latest.entry(job.to_string()).or_insert(*at);
            *entry = (*entry).max(*at);
        }
    }
    *seen = Some((database, latest.clone(), now));
    Ok(latest)
}

/// How often `sluice serve` reads the scheduled jobs' state for its gauges
/// ([`publish_job_gauges`]): the reload interval, at least a minute (the reading costs a
/// few queries per job).
pub fn job_gauges_every(config: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(config.scheduler.reload_seconds.max(60))
}

/// Sets the scheduled jobs' gauges from `scheduled_runs`, so that every replica shows the
/// same values whichever ran the job: `sluice_job_last_success_timestamp_seconds` (the
/// end of its latest COMPLETED run; 0 when none is recorded),
/// `sluice_job_running_since_timestamp_seconds` (when the run going now started; 0 when
/// none is going) and `sluice_job_missed` (1 while its latest cron instant has no run, as
/// `sluice jobs list` flags it `MISSED`). Creates at 0 the run counters of each scheduled
/// export and import, and forgets every `sluice_job_*` series of a job it published
/// before and no longer schedules.
pub async fn publish_job_gauges(
    config: &Config,
    store: &Store,
) -> Result<(), sluice_connectors::StoreError> {
    use sluice_core::metrics::set;
    let overview: Vec<JobOverview> = job_overview(config, store)
        .await?
        .into_iter()
        .filter(|j| j.cron.is_some())
        .collect();
    let successes = last_successes(store).await?;
    for job in &overview {
        let last_success = successes
            .get(&job.name)
            .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
        let l = [("job_name", job.name.as_str())];
        set(
            "sluice_job_last_success_timestamp_seconds",
            "When the latest COMPLETED run of each scheduled job ended (Unix seconds; 0 when none is recorded), as scheduled_runs holds it for every replica.",
            &l,
            last_success,
        );
        set(
            "sluice_job_running_since_timestamp_seconds",
            "When the run going now of each scheduled job started (Unix seconds; 0 when none is going), on any replica.",
            &l,
            // A run claimed and waiting for a slot has not started.
            job.running
                .as_ref()
                .and_then(|r| r.started_at)
                .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0),
        );
        set(
            "sluice_job_missed",
            "1 while a scheduled job's latest cron instant has no run recorded although the time to claim it is over (sluice jobs list: MISSED).",
            &l,
            if job.missed.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(name) = job.name.strip_prefix(INTEGRATION_PREFIX) {
            sluice_jobs::import::declare_metrics(name);
        }
    }
    for s in &config.schedules {
        if let Ok(kind) = ExportJobType::parse(&s.kind) {
            sluice_jobs::export::declare_metrics(kind);
        }
    }
    // The jobs this process published before and no longer schedules lose their series.
    static PUBLISHED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let scheduled: Vec<String> = overview.into_iter().map(|j| j.name).collect();
    let before = std::mem::replace(
        &mut *PUBLISHED.lock().unwrap_or_else(|p| p.into_inner()),
        scheduled.clone(),
    );
    sluice_core::metrics::forget("sluice_job_", "job_name", |j| {
        before.iter().any(|b| b == j) && !scheduled.iter().any(|s| s == j)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::import_outcome;
    use sluice_jobs::import::ImportSummary;

    #[test]
    fn a_run_that_ended_between_the_two_reads_is_not_shown_going() {
        use super::{still_going, LastRun};
        use sluice_jobs::schedule::RunGoing;
        let going = |id: &str| RunGoing {
            id: id.into(),
            waiting: false,
            started_at: None,
        };
        let latest = |id: &str, status: &str| LastRun {
            id: id.into(),
            status: status.into(),
            scheduled_for: None,
            ended_at: None,
            error: None,
            last_completed_at: None,
        };
        // Going when the runs were read, COMPLETED by the time the latest was.
        assert_eq!(
            still_going(Some(going("a@1")), Some(&latest("a@1", "COMPLETED"))),
            None
        );
        assert!(still_going(Some(going("a@1")), Some(&latest("a@1", "RUNNING"))).is_some());
        // A run by hand going beside a later fire's record, and a job never run before.
        assert!(still_going(Some(going("a@1")), Some(&latest("a@2", "SKIPPED"))).is_some());
        assert!(still_going(Some(going("a@1")), None).is_some());
        assert_eq!(still_going(None, Some(&latest("a@1", "RUNNING"))), None);
    }

    #[test]
    fn an_import_fails_only_when_every_record_failed() {
        let run = |failed, dead_letters, skipped, unchanged| {
            let mut s = ImportSummary::default();
            (s.fetched, s.failed, s.dead_letters, s.skipped, s.unchanged) =
                (5, failed, dead_letters, skipped, unchanged);
            import_outcome(&s)
        };
        assert!(run(5, 0, 0, 0).is_err(), "every record failed mapping");
        assert!(run(2, 3, 0, 0).is_err(), "or a plugin failed the rest");
        assert!(run(1, 0, 4, 0).is_ok(), "a plugin dropped some on purpose");
        assert!(run(0, 0, 0, 5).is_ok(), "all stored already");
        assert!(run(0, 0, 0, 0).is_ok(), "nothing failed");
        // A plugin failing every record again: its letters are kept already, so the run
        // adds none, and still fails.
        let mut again = ImportSummary::default();
        (again.fetched, again.plugin_in, again.plugin_dead_letters) = (5, 5, 5);
        assert!(import_outcome(&again).is_err());
        // With records a plugin filtered out on purpose beside them, the run did not fail
        // every record.
        (again.plugin_in, again.plugin_out, again.plugin_dead_letters) = (8, 0, 5);
        assert!(import_outcome(&again).is_ok());
    }

    #[test]
    fn a_push_fails_when_every_document_failed_and_none_was_sent() {
        use sluice_jobs::import::{push_outcome, PushSummary};
        let run = |read, sent, failed, plugin_failed, skipped| {
            let mut s = PushSummary::default();
            (s.read, s.sent, s.failed, s.plugin_failed, s.skipped) =
                (read, sent, failed, plugin_failed, skipped);
            push_outcome(&s)
        };
        let all_failed = run(12, 0, 0, 12, 0).unwrap_err();
        assert!(
            all_failed.contains("12 failed by a plugin (in dead_letters)")
                && all_failed.contains("every document failed"),
            "{all_failed}"
        );
        assert!(run(12, 0, 12, 0, 0).is_err(), "every one failed mapping");
        assert!(run(12, 10, 0, 2, 0).is_ok(), "some were sent");
        assert!(
            run(12, 0, 0, 2, 10).is_ok(),
            "a plugin skipped the rest on purpose"
        );
        assert!(run(0, 0, 0, 0, 0).is_ok(), "nothing to send");
    }

    #[test]
    fn a_run_with_warnings_says_so_in_its_line() {
        let mut s = ImportSummary::default();
        (s.fetched, s.inserted) = (3, 3);
        assert_eq!(
            super::import_line(&s),
            "3 records, 3 inserted, 0 updated, 0 failed mapping"
        );
        s.warnings = vec!["`price` found no value".into(), "another".into()];
        assert_eq!(
            super::import_line(&s),
            "3 records, 3 inserted, 0 updated, 0 failed mapping; 2 warnings (import_runs): `price` found no value"
        );
        s.warnings.clear();
        s.stopped_early = Some("page 2 repeated the previous page; stopped (loop guard)".into());
        assert_eq!(
            super::import_line(&s),
            "3 records, 3 inserted, 0 updated, 0 failed mapping; stopped early: page 2 repeated the previous page; stopped (loop guard)"
        );
    }
}
