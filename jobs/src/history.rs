//! `export_jobs`: one document per run, PENDING -> RUNNING -> COMPLETED | FAILED.

use bson::{doc, DateTime, Document};
use sluice_connectors::{Store, StoreError};
use sluice_core::model::{
    collections as c, common, export_job_fields as f, ExportJob, ExportJobStatus, ExportJobType,
};

/// Set (true) on runs not started by the schedule: `export run`, backfills, the demo.
pub const MANUAL: &str = "manual";
/// A day published again because it received late events.
pub const LATE_EVENTS: &str = "lateEvents";
/// `export_jobs.root`: the destination root partition prefixes and file keys are
/// relative to.
pub const ROOT: &str = "root";
/// `export_jobs.schedule`: the `[[schedules]]` entry a run was made for.
pub const SCHEDULE: &str = "schedule";

/// A run about to start, as [`create`] records it.
pub struct NewJob<'a> {
    pub kind: ExportJobType,
    /// The kind's folder (`s3://bucket/prefix/EVENT_DATA`).
    pub destination: &'a str,
    /// The destination's root, which partition prefixes and file keys are relative to.
    pub root: &'a str,
    pub window: Option<(String, String)>,
    /// Not run by a schedule's catch-up (`export run`, a backfill, `jobs run`).
    pub manual: bool,
    /// The `[[schedules]]` entry it runs for, if any.
    pub schedule: Option<&'a str>,
    /// A day published again because it received late events.
    pub late: bool,
}

/// Records a new run as PENDING and returns its jobId.
pub async fn create(store: &Store, new: NewJob<'_>) -> Result<String, StoreError> {
    let NewJob {
        kind,
        destination,
        root,
        window,
        manual,
        schedule,
        late,
    } = new;
    let now = store.now();
    let job_id = format!(
        "{}-{}-{}",
        kind.as_str().to_ascii_lowercase().replace('_', "-"),
        now.to_chrono().format("%Y%m%dT%H%M%S"),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let (window_start, window_end) = window.unzip();
    let job = ExportJob {
        id: None,
        job_id: job_id.clone(),
        kind,
        status: ExportJobStatus::Pending,
        start_time: None,
        end_time: None,
        records_processed: 0,
        destination: destination.to_string(),
        error: None,
        window_start,
        window_end,
        files: 0,
        created_at: now,
        updated_at: now,
    };
    let mut document = bson::to_document(&job).map_err(|e| StoreError::Encode {
        collection: c::EXPORT_JOBS.into(),
        message: e.to_string(),
    })?;
    document.insert(MANUAL, manual);
    if late {
        document.insert(LATE_EVENTS, true);
    }
    document.insert(ROOT, root);
    if let Some(name) = schedule {
        document.insert(SCHEDULE, name);
    }
    store
        .collection(c::EXPORT_JOBS)
        .insert_one(document)
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "record job"))?;
    Ok(job_id)
}

async fn set(store: &Store, job_id: &str, fields: bson::Document) -> Result<(), StoreError> {
    let mut fields = fields;
    fields.insert(common::UPDATED_AT, store.now());
    store
        .collection(c::EXPORT_JOBS)
        .update_one(doc! { f::JOB_ID: job_id }, doc! { "$set": fields })
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "update job"))?;
    Ok(())
}

/// How long a run's outcome is tried again when the store does not take it (a failover
/// as the run ends): a COMPLETED run recorded as nothing would be failed as dead, and its
/// window exported again, however whole its files are.
pub const OUTCOME_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// What [`set_outcome`] does, in its warnings and its timeout error.
const SET_OUTCOME: &str = "record an export's outcome";

/// [`set`], tried again for up to [`OUTCOME_RETRY`] while the error is one a later
/// attempt may not meet (the update is idempotent: a first attempt that did land is
/// simply written again).
async fn set_outcome(store: &Store, job_id: &str, fields: Document) -> Result<(), StoreError> {
    crate::retry::retry_within(OUTCOME_RETRY, SET_OUTCOME, retryable, || {
        set(store, job_id, fields.clone())
    })
    .await
    .map_err(|e| {
        e.unwrap_or_else(|| StoreError::TimedOut {
            step: SET_OUTCOME,
            seconds: OUTCOME_RETRY.as_secs(),
        })
    })
}

fn retryable(e: &StoreError) -> bool {
    e.is_transient()
        || matches!(e, StoreError::Mongo { error, .. } if sluice_connectors::mongo::is_write_concern_error(error))
}

pub async fn running(store: &Store, job_id: &str) -> Result<(), StoreError> {
    set(
        store,
        job_id,
        doc! { f::STATUS: ExportJobStatus::Running.as_str(), f::START_TIME: store.now() },
    )
    .await
}

/// What a run read but did not write.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAside {
    /// Dropped by a transform plugin under the skip-batch policy.
    pub skipped: u64,
    /// Documents that could not be rows of the table, kept in `dead_letters`.
    pub rejected: u64,
    /// Records a transform plugin failed under the dead-letter policy, kept in
    /// `dead_letters`.
    pub dead_lettered: u64,
    /// What of the rows written was not written as read.
    pub unfitting: crate::export::Unfitting,
}

/// [`SetAside`]'s fields of `export_jobs`.
fn set_aside_fields(s: &SetAside) -> Document {
    doc! {
        ROWS_SKIPPED: s.skipped as i64,
        ROWS_REJECTED: s.rejected as i64,
        ROWS_DEAD_LETTERED: s.dead_lettered as i64,
        "valuesNulled": s.unfitting.values_nulled as i64,
        "valuesConverted": s.unfitting.values_converted as i64,
        "rowsWithFieldsLeftOut": s.unfitting.rows_with_fields_left_out as i64,
    }
}

pub async fn completed(
    store: &Store,
    job_id: &str,
    records: u64,
    files: u64,
    set_aside: SetAside,
    destination: &str,
    deferred: &[String],
) -> Result<(), StoreError> {
    let mut outcome = doc! {
        f::STATUS: ExportJobStatus::Completed.as_str(),
        f::END_TIME: store.now(),
        f::RECORDS_PROCESSED: records as i64,
        f::FILES: files as i64,
        f::DESTINATION: destination,
    };
    outcome.extend(set_aside_fields(&set_aside));
    if !deferred.is_empty() {
        outcome.insert(DEFERRED, deferred.to_vec());
    }
    set_outcome(store, job_id, outcome).await
}

pub async fn failed(
    store: &Store,
    job_id: &str,
    rows_read: u64,
    set_aside: SetAside,
    error: &str,
) -> Result<(), StoreError> {
    let mut outcome = doc! {
        f::STATUS: ExportJobStatus::Failed.as_str(),
        f::END_TIME: store.now(),
        ROWS_READ: rows_read as i64,
        f::ERROR: error,
    };
    outcome.extend(set_aside_fields(&set_aside));
    set_outcome(store, job_id, outcome).await
}

/// One run's status (`RUNNING`, `FAILED`...), if the run is on record.
pub async fn status(store: &Store, job_id: &str) -> Result<Option<String>, StoreError> {
    Ok(store
        .collection(c::EXPORT_JOBS)
        .find_one(doc! { f::JOB_ID: job_id })
        .projection(doc! { f::STATUS: 1 })
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "read job"))?
        .and_then(|d| d.get_str(f::STATUS).ok().map(str::to_string)))
}

/// How often a running export shows it is alive (`updatedAt`).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(30);
/// A RUNNING export whose `updatedAt` is older than this has died (its process stopped).
pub const PRESUMED_DEAD: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Keeps `updatedAt` of a running export fresh while it lives. Dropped before
/// [`Heartbeat::end`] (the run's future was cancelled: its scheduled run lost its lease, or
/// its process is stopping), it records the run FAILED rather than leaving it RUNNING.
pub struct Heartbeat {
    store: Store,
    job_id: String,
    beat: tokio::task::JoinHandle<()>,
    ended: bool,
}

pub fn heartbeat(store: &Store, job_id: &str) -> Heartbeat {
    let (s, id) = (store.clone(), job_id.to_string());
    let beat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            if let Err(e) = set(&s, &id, doc! {}).await {
                // Missed beats make the run look abandoned to the check for interrupted
                // runs: said, so a run marked FAILED while it went on is explained.
                tracing::warn!(job_id = %id, error = %e, "export heartbeat not recorded");
            }
        }
    });
    Heartbeat {
        store: store.clone(),
        job_id: job_id.to_string(),
        beat,
        ended: false,
    }
}

impl Heartbeat {
    /// The run ended (and records its own outcome).
    pub fn end(mut self) {
        self.ended = true;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.beat.abort();
        if self.ended {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, job_id) = (self.store.clone(), std::mem::take(&mut self.job_id));
            runtime.spawn(async move {
                let _ = fail_stopped_runs(&store, &[job_id]).await;
            });
        }
    }
}

/// Marks RUNNING runs matching `filter` FAILED with `error`; returns how many.
async fn fail_running(store: &Store, mut filter: Document, error: &str) -> Result<u64, StoreError> {
    let now = store.now();
    if !filter.contains_key(f::STATUS) {
        filter.insert(f::STATUS, ExportJobStatus::Running.as_str());
    }
    let result = store
        .collection(c::EXPORT_JOBS)
        .update_many(
            filter,
            doc! { "$set": {
                f::STATUS: ExportJobStatus::Failed.as_str(),
                f::END_TIME: now,
                f::ERROR: error,
                common::UPDATED_AT: now,
            } },
        )
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "fail interrupted runs"))?;
    Ok(result.modified_count)
}

/// The export runs this process is running (see [`InFlight`]).
static IN_FLIGHT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Holds a run in [`exports_in_flight`] while it lives.
pub struct InFlight(String);

impl InFlight {
    pub fn enter(job_id: &str) -> Self {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job_id.to_string());
        Self(job_id.to_string())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut runs = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        runs.retain(|r| *r != self.0);
    }
}

/// The jobIds of the export runs this process is running now.
pub fn exports_in_flight() -> Vec<String> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The error of a run stopped before it ended.
const STOPPED: &str = "interrupted: the run was stopped before it ended (the process was stopped, or its scheduled run lost its lease); a scheduled run's windows are exported by the schedule's next run (or by the replica taking the run over), nothing to do; a run by hand must be run again";

/// Marks the RUNNING runs `job_ids` FAILED because they were stopped (their process is
/// stopping, or their future was cancelled), so they do not show RUNNING until the next
/// export presumes them dead; returns how many.
pub async fn fail_stopped_runs(store: &Store, job_ids: &[String]) -> Result<u64, StoreError> {
    fail_running(store, doc! { f::JOB_ID: { "$in": job_ids } }, STOPPED).await
}

/// Marks RUNNING exports without a heartbeat for `PRESUMED_DEAD` as FAILED, and PENDING
/// ones as old (a run turns RUNNING as soon as it is recorded: one left PENDING died, or
/// could not record its start); returns how many.
pub async fn fail_dead_runs(store: &Store) -> Result<u64, StoreError> {
    let cutoff =
        DateTime::from_millis(store.now().timestamp_millis() - PRESUMED_DEAD.as_millis() as i64);
    fail_running(
        store,
        doc! {
            common::UPDATED_AT: { "$lt": cutoff },
            f::STATUS: { "$in": [ExportJobStatus::Running.as_str(), ExportJobStatus::Pending.as_str()] },
        },
        "interrupted: the run stopped sending heartbeats (its process ended)",
    )
    .await
}

/// Marks every RUNNING ARCHIVE but `holder` FAILED: called under the archive lock, when
/// no other archive can be alive.
pub async fn fail_other_archives(store: &Store, holder: &str) -> Result<u64, StoreError> {
    fail_running(
        store,
        doc! { f::TYPE: ExportJobType::Archive.as_str(), f::JOB_ID: { "$ne": holder } },
        &format!("interrupted (the process stopped); found by {holder}"),
    )
    .await
}

/// Field of an ARCHIVE run listing the partitions it published and has not deleted yet:
/// `{prefix, day, createdBefore, rows, files: [{key, bytes, sha256}]}`.
pub const PENDING_DELETES: &str = "pendingDeletes";

/// Records a partition an ARCHIVE run is about to publish and then delete from MongoDB
/// (see `export::recover_archives` for what the next archive does with it).
pub async fn add_pending_delete(
    store: &Store,
    job_id: &str,
    pending: Document,
) -> Result<(), StoreError> {
    update(
        store,
        job_id,
        doc! { "$push": { PENDING_DELETES: pending } },
        "record a pending deletion",
    )
    .await
}

/// The field listing the partitions a run published: `{prefix, rows, files, kept}`.
pub const PARTITIONS: &str = "partitions";
/// ARCHIVE: how many events the run deleted from MongoDB after archiving them.
pub const EVENTS_DELETED: &str = "eventsDeleted";
/// Rows a failed run had read when it stopped.
pub const ROWS_READ: &str = "rowsRead";
/// Records a transform plugin dropped under the skip-batch policy (not written).
pub const ROWS_SKIPPED: &str = "rowsSkipped";
/// Documents that could not be rows of the table (kept in `dead_letters`).
pub const ROWS_REJECTED: &str = "rowsRejected";
/// Records a transform plugin failed under the dead-letter policy (kept in
/// `dead_letters`).
pub const ROWS_DEAD_LETTERED: &str = "rowsDeadLettered";
/// ARCHIVE: the days a run left for a later one, with why.
pub const DEFERRED: &str = "deferred";

/// How a run's files change its partition, as `export_jobs` says it (`mode`): ARCHIVE adds
/// its files beside those published before (`append`: the partition's `_manifest.json`
/// lists them all); every other kind replaces the partition with its files (`replace`).
pub fn publish_mode(prefix: &str) -> &'static str {
    let archive = ExportJobType::Archive.as_str();
    if prefix
        .strip_prefix(archive)
        .is_some_and(|rest| rest.starts_with('/'))
    {
        "append"
    } else {
        "replace"
    }
}

/// Records a partition the run published (as it is published, so a run that fails later
/// still says which partitions it replaced).
pub async fn partition_published(
    store: &Store,
    job_id: &str,
    prefix: &str,
    rows: u64,
    files: &[String],
    kept: bool,
) -> Result<(), StoreError> {
    update(
        store,
        job_id,
        doc! {
            "$push": { PARTITIONS: {
                "prefix": prefix,
                // A kept partition is as published before: these files replace nothing.
                "mode": if kept { "kept" } else { publish_mode(prefix) },
                "rows": rows as i64, "files": files, "kept": kept,
            } },
            "$inc": { f::RECORDS_PROCESSED: rows as i64, f::FILES: files.len() as i64 },
        },
        "record a published partition",
    )
    .await
}

/// [`partition_published`] unless the run lists `prefix` already: for a run finishing
/// another's work, which may itself die between this and what follows.
pub async fn partition_published_once(
    store: &Store,
    job_id: &str,
    prefix: &str,
    rows: u64,
    files: &[String],
) -> Result<(), StoreError> {
    push_partition_once(store, job_id, prefix, rows, files, false).await
}

/// A partition an interrupted publish of run `job_id` left in place, which a later run's
/// repair made whole (its manifest names that run's parts): listed among the run's
/// `partitions` with `repaired: true`, once, so a reader following `export_jobs` learns
/// that the partition changed although the run never recorded its publish.
pub async fn partition_repaired(
    store: &Store,
    job_id: &str,
    prefix: &str,
    rows: u64,
    files: &[String],
) -> Result<(), StoreError> {
    push_partition_once(store, job_id, prefix, rows, files, true).await
}

/// Lists `prefix` among run `job_id`'s partitions unless it is there already.
async fn push_partition_once(
    store: &Store,
    job_id: &str,
    prefix: &str,
    rows: u64,
    files: &[String],
    repaired: bool,
) -> Result<(), StoreError> {
    let mut partition = doc! {
        "prefix": prefix, "mode": publish_mode(prefix), "rows": rows as i64, "files": files,
        "kept": false,
    };
    if repaired {
        partition.insert("repaired", true);
    }
    store
        .collection(c::EXPORT_JOBS)
        .update_one(
            doc! { f::JOB_ID: job_id, format!("{PARTITIONS}.prefix"): { "$ne": prefix } },
            doc! {
                "$push": { PARTITIONS: partition },
                "$inc": { f::RECORDS_PROCESSED: rows as i64, f::FILES: files.len() as i64 },
                "$currentDate": { common::UPDATED_AT: true },
            },
        )
        .await
        .map_err(StoreError::mongo(
            c::EXPORT_JOBS,
            "record a published partition",
        ))?;
    Ok(())
}

/// ARCHIVE: adds `n` to the events the run deleted.
pub async fn events_deleted(store: &Store, job_id: &str, n: u64) -> Result<(), StoreError> {
    update(
        store,
        job_id,
        doc! { "$inc": { EVENTS_DELETED: n as i64 } },
        "count deleted events",
    )
    .await
}

async fn update(
    store: &Store,
    job_id: &str,
    change: Document,
    what: &'static str,
) -> Result<(), StoreError> {
    let mut change = change;
    change.insert("$currentDate", doc! { common::UPDATED_AT: true });
    store
        .collection(c::EXPORT_JOBS)
        .update_one(doc! { f::JOB_ID: job_id }, change)
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, what))?;
    Ok(())
}

/// Counts `n` events of the pending partition `prefix` that run `job_id` deleted before
/// its deletion stopped short, in the run's `eventsDeleted` and in the pending entry
/// (`deleted`), so that the run finishing the deletion counts only the rest.
pub async fn pending_events_deleted(
    store: &Store,
    job_id: &str,
    prefix: &str,
    n: u64,
) -> Result<(), StoreError> {
    store
        .collection(c::EXPORT_JOBS)
        .update_one(
            doc! { f::JOB_ID: job_id, format!("{PENDING_DELETES}.prefix"): prefix },
            doc! {
                "$inc": {
                    EVENTS_DELETED: n as i64,
                    format!("{PENDING_DELETES}.$.deleted"): n as i64,
                },
                "$currentDate": { common::UPDATED_AT: true },
            },
        )
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "count deleted events"))?;
    Ok(())
}

pub async fn pending_deleted(store: &Store, job_id: &str, prefix: &str) -> Result<(), StoreError> {
    store
        .collection(c::EXPORT_JOBS)
        .update_one(
            doc! { f::JOB_ID: job_id },
            doc! { "$pull": { PENDING_DELETES: { "prefix": prefix } } },
        )
        .await
        .map_err(StoreError::mongo(
            c::EXPORT_JOBS,
            "clear a pending deletion",
        ))?;
    Ok(())
}

/// ARCHIVE runs other than `except` that still list pending deletions.
pub async fn interrupted_archives(
    store: &Store,
    except: &str,
) -> Result<Vec<Document>, StoreError> {
    use futures_util::TryStreamExt;
    store
        .collection(c::EXPORT_JOBS)
        .find(doc! {
            f::TYPE: ExportJobType::Archive.as_str(),
            f::JOB_ID: { "$ne": except },
            format!("{PENDING_DELETES}.0"): { "$exists": true },
        })
        .await
        .map_err(StoreError::mongo(
            c::EXPORT_JOBS,
            "find interrupted archives",
        ))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(
            c::EXPORT_JOBS,
            "find interrupted archives",
        ))
}

/// The days of `days` an ARCHIVE run names, as published (`partitions`) or about to be
/// deleted (`pendingDeletes`), whatever destination it archived to: their events were, or
/// are being, moved out of MongoDB. Sorted, each once.
pub async fn archived_days(
    store: &Store,
    days: &[chrono::NaiveDate],
) -> Result<Vec<chrono::NaiveDate>, StoreError> {
    let mut archived: Vec<chrono::NaiveDate> = archived_days_where(store, days)
        .await?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    archived.dedup();
    Ok(archived)
}

/// The latest day an ARCHIVE run archived, or began deleting from `events`, if any.
pub async fn latest_archived_day(store: &Store) -> Result<Option<chrono::NaiveDate>, StoreError> {
    use futures_util::TryStreamExt;
    let step = "find the latest archived day";
    let archive = ExportJobType::Archive.as_str();
    let mut latest = None;
    for list in [PARTITIONS, PENDING_DELETES] {
        let field = format!("${list}.prefix");
        let found: Vec<Document> = store
            .collection(c::EXPORT_JOBS)
            .aggregate([
                doc! { "$match": { f::TYPE: archive, format!("{list}.0"): { "$exists": true } } },
                doc! { "$unwind": format!("${list}") },
                doc! { "$group": { "_id": null, "last": { "$max": field } } },
            ])
            .await
            .map_err(StoreError::mongo(c::EXPORT_JOBS, step))?
            .try_collect()
            .await
            .map_err(StoreError::mongo(c::EXPORT_JOBS, step))?;
        let day = found
            .first()
            .and_then(|d| d.get_str("last").ok())
            .and_then(|p| p.rsplit("dt=").next())
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
        latest = latest.max(day);
    }
    Ok(latest)
}

/// [`archived_days`], each with the destination the run archiving it wrote to (its
/// `destination`, the ARCHIVE folder), in order of day.
pub async fn archived_days_where(
    store: &Store,
    days: &[chrono::NaiveDate],
) -> Result<Vec<(chrono::NaiveDate, String)>, StoreError> {
    use futures_util::TryStreamExt;
    let archive = ExportJobType::Archive.as_str();
    let prefixes: Vec<String> = days.iter().map(|d| format!("{archive}/dt={d}")).collect();
    let step = "look for archived days";
    let runs: Vec<Document> = store
        .collection(c::EXPORT_JOBS)
        .find(doc! { f::TYPE: archive, "$or": [
            { format!("{PARTITIONS}.prefix"): { "$in": &prefixes } },
            { format!("{PENDING_DELETES}.prefix"): { "$in": &prefixes } },
        ] })
        .projection(doc! {
            format!("{PARTITIONS}.prefix"): 1,
            format!("{PENDING_DELETES}.prefix"): 1,
            "destination": 1,
        })
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, step))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, step))?;
    let mut archived: Vec<(chrono::NaiveDate, String)> = runs
        .iter()
        .flat_map(|r| {
            let destination = r.get_str("destination").unwrap_or("?");
            [PARTITIONS, PENDING_DELETES]
                .into_iter()
                .filter_map(|k| r.get_array(k).ok())
                .flatten()
                .filter_map(|p| p.as_document()?.get_str("prefix").ok())
                .filter_map(|p| prefixes.iter().position(|c| c == p))
                .map(move |i| (days[i], destination.to_string()))
        })
        .collect();
    archived.sort_unstable();
    archived.dedup();
    Ok(archived)
}
