//! Export runs: MongoDB -> (transforms) -> Arrow -> Parquet -> object storage.
//!
//! Each run reads its partitions (one per day, `dt=YYYY-MM-DD`) through a pipeline of three
//! stages joined by bounded channels: a cursor reader, an encoder on a blocking thread
//! (transforms, Arrow, Parquet parts) and an uploader that stages each finished part under
//! `_staging/{jobId}/`. Only when every partition is staged does the run publish, one
//! partition at a time: it removes `_SUCCESS`, copies the parts into place under names of
//! its own (`part-{jobId}-NNNNN.parquet`, so no file a reader may hold is overwritten),
//! writes `_manifest.json` and the partition's symlink manifest (see [`symlink_key`]),
//! removes the parts of the earlier run, then writes `_SUCCESS`.
//! A publish that fails before its manifest is undone (its copies removed, `_SUCCESS` put
//! back), so every partition is always either the old one or the new one; partitions
//! published before the failure stay replaced and are listed in the run's `export_jobs`
//! document. A failure while staging publishes nothing.
//!
//! ARCHIVE adds to its partitions (the events it archives are deleted, so a rerun never
//! sees them again) and goes one day at a time: records the day as pending, publishes,
//! verifies every published file, and only then deletes from MongoDB exactly the
//! documents it read. The next archive finishes (or undoes) a day left pending.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document};
use chrono::{Days, NaiveDate};
use futures_util::TryStreamExt;
use serde_json::json;
use sluice_connectors::objstore::{ObjectStore, StorageError};
use sluice_connectors::parquet::{
    columns as pc, encode_counted, fits, schema_description, EncodeError, LocalPart, PartWriter,
    PartWriterOptions, RecordBatch, TableSpec, DAILY_TABLE, EVENT_TABLE, USER_TABLE,
};
use sluice_connectors::{Store, StoreError};
use sluice_core::model::{
    collections as c, common, event_fields as e, event_id_fields as l, export_job_fields as x,
    user_fields as u, EventType, ExportJobType,
};
use sluice_core::transform::{apply_chain, DeadLetter, Transform, TransformError};
use tokio::sync::mpsc;

use crate::history;
use crate::spool::IdSpool;
use crate::tally::Tally;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("MongoDB read for `{partition}`: {source}")]
    Read {
        partition: String,
        source: mongodb::error::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("encoding `{partition}`: {message}")]
    Encode { partition: String, message: String },
    #[error("verification of `{key}` failed: {message}")]
    Verify { key: String, message: String },
    #[error("invalid export request: {0}")]
    Request(String),
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub kind: ExportJobType,
    /// First and last day (inclusive) for EVENT_DATA and DAILY_ANALYTICS.
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// ARCHIVE: events older than this many days.
    pub archive_after_days: u32,
    /// ARCHIVE: events stored less than this long ago are left for the next run (a
    /// writer may still be inserting events it received just before the run began).
    pub archive_settle: Duration,
    /// Run by the schedule's catch-up. Other runs (`export run`, backfills, the demo) are
    /// recorded as `manual` and never move the point catch-up resumes from.
    pub scheduled: bool,
    /// ARCHIVE: the export kinds scheduled to publish late events again (EVENT_DATA,
    /// DAILY_ANALYTICS). A day whose late events they have not read yet waits (at most
    /// [`LATE_WAIT`]): archived first, those events would never reach their partitions.
    pub late_readers: Vec<ExportJobType>,
    /// ARCHIVE: where `late_readers` publish ([`ObjectStore::url`] of `""`), when not this
    /// run's destination (a manual archive to `--dest`): their reads are looked for there.
    pub late_readers_at: Option<String>,
    /// A day published again because it received late events (`--late-days`, or a
    /// schedule's late days): recorded as such (`lateEvents`), so its run is told apart
    /// from one asked for.
    pub late: bool,
}

impl ExportRequest {
    /// A request for one day (or the snapshot day of USER_DATA).
    pub fn day(kind: ExportJobType, day: NaiveDate, archive_after_days: u32) -> Self {
        Self {
            kind,
            from: day,
            to: day,
            archive_after_days,
            archive_settle: DEFAULT_ARCHIVE_SETTLE,
            scheduled: false,
            late_readers: Vec::new(),
            late_readers_at: None,
            late: false,
        }
    }

    /// The same request, marked as run by the schedule.
    pub fn scheduled(mut self) -> Self {
        self.scheduled = true;
        self
    }
}

/// Default of [`ExportContext::late_days_per_run`].
pub const LATE_DAYS_PER_RUN: usize = 7;

/// See [`ExportRequest::archive_settle`]; well above the event writer's claim lease.
pub const DEFAULT_ARCHIVE_SETTLE: Duration = Duration::from_secs(5 * 60);

/// Live counters for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub rows_read: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    /// ARCHIVE: events deleted from MongoDB after their day was published.
    pub rows_deleted: AtomicU64,
    /// Records a transform plugin dropped under the skip-batch policy (not written).
    pub rows_skipped: AtomicU64,
    /// Documents that could not be rows of the table (kept in `dead_letters`).
    pub rows_rejected: AtomicU64,
    /// Records a transform plugin failed under the dead-letter policy (kept in
    /// `dead_letters`).
    pub rows_dead_lettered: AtomicU64,
    /// Values written as null, for they were of another type than their column's.
    pub values_nulled: AtomicU64,
    /// Values of another type than their column's written converted to it.
    pub values_converted: AtomicU64,
    /// Rows written without fields of theirs that no column holds.
    pub rows_with_fields_left_out: AtomicU64,
}

impl Progress {
    /// What of the rows written so far was not written as read.
    pub fn unfitting(&self) -> Unfitting {
        Unfitting {
            values_nulled: self.values_nulled.load(Relaxed),
            values_converted: self.values_converted.load(Relaxed),
            rows_with_fields_left_out: self.rows_with_fields_left_out.load(Relaxed),
        }
    }

    fn add_unfitting(&self, u: Unfitting) {
        self.values_nulled.fetch_add(u.values_nulled, Relaxed);
        self.values_converted.fetch_add(u.values_converted, Relaxed);
        self.rows_with_fields_left_out
            .fetch_add(u.rows_with_fields_left_out, Relaxed);
    }
}

impl Unfitting {
    /// What grew since `before`.
    pub fn since(self, before: Unfitting) -> Unfitting {
        Unfitting {
            values_nulled: self.values_nulled.saturating_sub(before.values_nulled),
            values_converted: self
                .values_converted
                .saturating_sub(before.values_converted),
            rows_with_fields_left_out: self
                .rows_with_fields_left_out
                .saturating_sub(before.rows_with_fields_left_out),
        }
    }

    fn add(&mut self, u: Unfitting) {
        self.values_nulled += u.values_nulled;
        self.values_converted += u.values_converted;
        self.rows_with_fields_left_out += u.rows_with_fields_left_out;
    }
}

/// Everything a run needs besides the request.
#[derive(Clone)]
pub struct ExportContext {
    pub store: Store,
    pub dest: ObjectStore,
    pub transforms: Vec<Arc<dyn Transform>>,
    pub part_options: PartWriterOptions,
    /// Documents per encoded batch.
    pub batch_rows: usize,
    /// A batch is also cut once its documents reach about this many bytes: documents
    /// other tools wrote may be up to 16 MiB each, and a column's text of more than
    /// 2 GiB cannot be encoded at all.
    pub batch_bytes: usize,
    pub progress: Arc<Progress>,
    /// Local folder for part files before upload, and for an archive's spooled eventIds.
    pub work_dir: PathBuf,
    /// ARCHIVE: events deleted (and ledger claims marked) per command.
    pub archive_delete_chunk: usize,
    /// [`catch_up`]: days published before that received late events, published again
    /// per run, oldest first; the rest wait for the next run.
    pub late_days_per_run: usize,
    /// The `[[schedules]]` entry running this export, recorded in its `export_jobs`
    /// documents (`schedule`), so two schedules of one kind are told apart.
    pub schedule: Option<String>,
    /// Tests: fail an ARCHIVE after it published, before it deleted anything (what a
    /// crash at that point leaves behind).
    pub fail_before_archive_delete: bool,
    /// Tests: fail publishing after this many part files were copied into place (what a
    /// storage error mid-publish leaves behind).
    pub fail_after_copies: Option<u64>,
    /// Tests: fail publishing right after the manifest was written (as when its answer is
    /// lost).
    pub fail_after_manifest: bool,
    /// How long parts a publish replaces are kept before they are removed (zero: removed
    /// at once), so queries already reading them finish.
    pub keep_replaced: Duration,
    /// Tests: another run takes the partition's publish lock once the parts are copied
    /// (what a publisher whose lease lapsed meets).
    pub lose_lock_after_copies: bool,
    /// Tests: stop publishing after this many part files were copied, as a process
    /// killed there stops: nothing undone, the publish lock left to lapse.
    pub die_after_copies: Option<u64>,
    /// Tests: stop publishing once the manifest is written, as a process killed there
    /// stops (the old parts still beside the new, no `_SUCCESS`).
    pub die_after_manifest: bool,
    /// Tests: the last step of a publish, putting `_SUCCESS` back, fails (a storage error
    /// outlasting the SDK's retries).
    pub fail_success_put: bool,
    /// Tests: an ARCHIVE's deletes leave out this many of the events it archived, as a
    /// delete acknowledged and then rolled back (a primary stepping down under `w: 1`)
    /// leaves them stored.
    pub archive_delete_misses: usize,
}

impl ExportContext {
    pub fn new(store: Store, dest: ObjectStore) -> Self {
        Self {
            store,
            dest,
            transforms: Vec::new(),
            part_options: PartWriterOptions::default(),
            batch_rows: 8192,
            batch_bytes: BATCH_BYTES,
            progress: Arc::new(Progress::default()),
            work_dir: std::env::temp_dir(),
            archive_delete_chunk: ARCHIVE_DELETE_CHUNK,
            late_days_per_run: LATE_DAYS_PER_RUN,
            schedule: None,
            fail_before_archive_delete: false,
            fail_after_copies: None,
            fail_after_manifest: false,
            keep_replaced: Duration::ZERO,
            lose_lock_after_copies: false,
            die_after_copies: None,
            die_after_manifest: false,
            fail_success_put: false,
            archive_delete_misses: 0,
        }
    }
}

/// One published partition.
#[derive(Debug, Clone)]
pub struct PartitionSummary {
    /// `TYPE/dt=YYYY-MM-DD`
    pub prefix: String,
    pub files: Vec<String>,
    pub rows: u64,
    /// The run read no rows where rows were published before: the published partition
    /// was kept as it was.
    pub kept: bool,
}

#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub job_id: String,
    pub kind: ExportJobType,
    pub partitions: Vec<PartitionSummary>,
    pub rows: u64,
    pub bytes: u64,
    /// ARCHIVE: documents deleted from MongoDB after verification.
    pub deleted: u64,
    /// Records a transform plugin dropped under the skip-batch policy (not written).
    pub skipped: u64,
    /// Documents that could not be rows of the table (kept in `dead_letters`).
    pub rejected: u64,
    /// Records a transform plugin failed under the dead-letter policy (kept in
    /// `dead_letters`).
    pub dead_lettered: u64,
    /// ARCHIVE: the days it left for a later run, each with why (`2026-08-20: ...`).
    pub deferred: Vec<String>,
    pub destination: String,
    pub elapsed: Duration,
}

/// What a run published, the events it deleted (ARCHIVE), and the days it left for a
/// later run (ARCHIVE), each with why.
type Executed = (Vec<PartitionSummary>, u64, Vec<String>);

/// A partition read and staged, not yet published.
struct Staged {
    prefix: String,
    table: &'static TableSpec,
    parts: Vec<(String, LocalPartInfo)>,
    rows_read: u64,
    /// ARCHIVE: the filter that selected the rows read.
    delete_filter: Option<Document>,
    /// ARCHIVE: the eventIds of exactly the rows read (and written, as ARCHIVE runs no
    /// transform), spooled to a file: what is deleted and marked archived in the ledger.
    archived_ids: Option<IdSpool>,
    /// EVENT_DATA, USER_DATA, DAILY_ANALYTICS: the database's time before the run began
    /// reading (see [`publish_now`]: a snapshot older than the published one is kept
    /// out).
    read_at: Option<DateTime>,
    /// What of the rows read is not in the files, for the manifest.
    dropped: Dropped,
    /// DAILY_ANALYTICS: the events its row counts (a day with none still has a row, of
    /// zeros), kept in the manifest (`sourceRows`): an empty rerun is told by it.
    source_rows: Option<u64>,
}

/// Rows read that are not in a partition's files (besides what export transforms
/// filtered out or fanned out, which is theirs to do): skipped by a plugin under
/// `skip-batch`, or kept in `dead_letters` (a plugin failed them under `dead-letter`, or
/// they could not be rows of the table).
#[derive(Debug, Clone, Copy, Default)]
struct Dropped {
    skipped: u64,
    dead_lettered: u64,
    /// Not dropped, but not written whole: values of another type than their column's,
    /// and events holding fields no column holds.
    unfitting: Unfitting,
}

/// What of the rows written was not written as read: values written as null or
/// converted to their column's type, and rows whose fields no column holds were left
/// out of. The log says each; the run's record and the manifest count them, for a
/// reader that checks its loads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unfitting {
    pub values_nulled: u64,
    pub values_converted: u64,
    pub rows_with_fields_left_out: u64,
}

#[derive(Debug, Clone)]
struct LocalPartInfo {
    index: usize,
    rows: u64,
    bytes: u64,
    sha256: String,
}

/// The events the daily analytics count: those of the window (`timestamp` within it) not
/// flagged as bot traffic (kept flagged under `tracking.bots = "keep"`: EVENT_DATA has
/// them, with `bot`, for whoever wants them).
pub fn counted_events(window: Document) -> Document {
    doc! {
        "timestamp": window,
        format!("metadata.{}", sluice_core::model::metadata_fields::BOT): { "$ne": true },
    }
}

/// An event's day (UTC, `YYYY-MM-DD`), as an aggregation expression.
pub fn event_day() -> Document {
    doc! { "$dateToString": { "format": "%Y-%m-%d", "date": "$timestamp" } }
}

/// The stages that count, per day, the distinct values of `field` among the events
/// `in_window` (a `$match` stage) selects: `{_id: day, n}`. Counted by grouping on the
/// values, not by collecting them with `$addToSet`, which is capped at 100 MB per group
/// and never spills to disk: a day with millions of sessions still aggregates (run with
/// `allowDiskUse`).
pub fn distinct_per_day(in_window: &Document, field: &str) -> Vec<Document> {
    vec![
        in_window.clone(),
        // An event without one (another writer's) is no visitor or session of its own.
        doc! { "$match": { field: { "$ne": Bson::Null } } },
        doc! { "$group": { "_id": { "day": event_day(), "v": format!("${field}") } } },
        doc! { "$group": { "_id": "$_id.day", "n": { "$sum": 1 } } },
    ]
}

/// Midnight UTC of a day, as a BSON date.
pub fn day_start(d: NaiveDate) -> DateTime {
    DateTime::from_millis(
        d.and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp_millis()),
    )
}

fn days(from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        out.push(d);
        match d.checked_add_days(Days::new(1)) {
            Some(next) => d = next,
            None => break,
        }
    }
    out
}

fn next_day(d: NaiveDate) -> NaiveDate {
    d.checked_add_days(Days::new(1)).unwrap_or(d)
}

/// Runs the daily windows missed since the last COMPLETED scheduled run of `kind` (or only
/// `until` when there is none), oldest first, one export per day, at most `max_windows`;
/// stops at the first failure so windows stay in order. Manual runs and backfills (any
/// window, even a later one) never move this point, so they cannot make the schedule skip
/// a day.
pub async fn catch_up(
    ctx: &ExportContext,
    kind: ExportJobType,
    until: NaiveDate,
    max_windows: usize,
    archive_after_days: u32,
) -> Result<Vec<ExportSummary>, ExportError> {
    let last = ctx
        .store
        .collection(c::EXPORT_JOBS)
        .find_one(doc! {
            "type": kind.as_str(), "status": "COMPLETED", "windowEnd": { "$ne": Bson::Null },
            // Runs recorded before runs were marked count as scheduled.
            history::MANUAL: { "$ne": true },
        })
        .sort(doc! { "windowEnd": -1 })
        .await
        .map_err(StoreError::mongo(c::EXPORT_JOBS, "find last window"))?
        .and_then(|d| {
            d.get_str("windowEnd")
                .ok()
                .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        });
    let mut windows = match last {
        Some(done) if done >= until => Vec::new(),
        Some(done) => days(next_day(done), until),
        None => vec![until],
    };
    if windows.len() > max_windows {
        // Bounded: the most recent windows, still in order; older gaps need a backfill.
        let kept = windows.split_off(windows.len() - max_windows);
        count_windows_not_exported(kind, "beyond_catch_up", windows.len() as u64);
        if let (Some(first), Some(last)) = (windows.first(), windows.last()) {
            tracing::error!(
                kind = %kind,
                from = %first,
                to = %last,
                days = windows.len(),
                "missed windows beyond the schedule's catch_up are not run; backfill them with `sluice export run {} --from {first} --to {last}` (days archived since are refused: their events are in their ARCHIVE partitions)",
                kind.as_str().to_ascii_lowercase().replace('_', "-")
            );
        }
        windows = kept;
    }
    let first = windows.first().copied().unwrap_or_else(|| next_day(until));
    let mut done = Vec::new();
    for d in windows {
        if is_archived(ctx, d).await? {
            // Its events were moved to ARCHIVE before this export ran (it was down longer
            // than `archive_after_days`): refused, it would stop every later window.
            count_windows_not_exported(kind, "archived_first", 1);
            tracing::error!(kind = %kind, day = %d, "a missed window was archived before it could be exported; its events are in its ARCHIVE partition");
            continue;
        }
        let request = ExportRequest::day(kind, d, archive_after_days).scheduled();
        done.push(run_export(ctx, &request).await?);
    }
    // Days published earlier that received events since (a client's buffered events, an
    // import of older data): published again, at most `late_days_per_run`, oldest first
    // (ARCHIVE waits for them), the rest by the next runs. One that fails is logged and
    // retried by the next run; it does not fail this run's windows.
    let late = publish_late_days(
        ctx,
        kind,
        |d| d < first,
        archive_after_days,
        Some(ctx.late_days_per_run),
        true,
    )
    .await?;
    count_windows_not_exported(
        kind,
        "late_events_not_republished",
        late.failed.len() as u64,
    );
    if let (Some(from), Some(to)) = (late.waiting.first(), late.waiting.last()) {
        count_windows_not_exported(kind, "late_days_beyond_per_run", late.waiting.len() as u64);
        tracing::warn!(
            kind = %kind,
            %from,
            %to,
            days = late.waiting.len(),
            per_run = ctx.late_days_per_run.max(1),
            "days that received late events wait for the next runs: a run publishes at most `late_days_per_run` of them again"
        );
    }
    done.extend(late.published);
    Ok(done)
}

/// What [`publish_late_days`] did.
#[derive(Debug, Default)]
pub struct LateDays {
    /// The days published again, oldest first.
    pub published: Vec<ExportSummary>,
    /// The days that failed to publish, with why; the next run tries them again.
    pub failed: Vec<(NaiveDate, String)>,
    /// The days left for later runs by the cap, oldest first.
    pub waiting: Vec<NaiveDate>,
}

/// Publishes again, oldest first, the days that received events after `kind` last read
/// them (a client's buffered events, an import of older data) and that `wanted` keeps,
/// noting each as read from the moment its run began. At most `per_run` (at least 1) when
/// given: a day that fails does not use up the cap (days failing every run would
/// otherwise hold back every other), but at most as many failures as the cap are tried.
/// `scheduled` records the runs as the schedule's (see [`ExportRequest::scheduled`]).
pub async fn publish_late_days(
    ctx: &ExportContext,
    kind: ExportJobType,
    wanted: impl Fn(NaiveDate) -> bool,
    archive_after_days: u32,
    per_run: Option<usize>,
    scheduled: bool,
) -> Result<LateDays, ExportError> {
    let late: Vec<NaiveDate> = late_days(ctx, kind, archive_after_days)
        .await?
        .into_iter()
        .filter(|d| wanted(*d))
        .collect();
    let per_run = per_run.map_or(usize::MAX, |n| n.max(1));
    let mut out = LateDays::default();
    let mut late = late.into_iter();
    for d in late.by_ref() {
        let mut request = ExportRequest::day(kind, d, archive_after_days);
        request.scheduled = scheduled;
        request.late = true;
        match run_export(ctx, &request).await {
            Ok(summary) => {
                tracing::info!(kind = %kind, day = %d, rows = summary.rows, "published again a day that received late events");
                out.published.push(summary);
            }
            Err(e) => {
                tracing::error!(kind = %kind, day = %d, error = %e, "could not publish again a day that received late events; the next run tries again");
                out.failed.push((d, e.to_string()));
            }
        }
        if out.published.len() == per_run || out.failed.len() == per_run {
            break;
        }
    }
    out.waiting = late.collect();
    Ok(out)
}

fn count_export_run(kind: ExportJobType, status: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_export_runs_total",
        "Export runs, by kind and outcome.",
        &[("kind", kind.as_str()), ("status", status)],
        n,
    );
}

/// The reasons of `sluice_export_windows_not_exported_total`.
const NOT_EXPORTED: [&str; 5] = [
    "beyond_catch_up",
    "archived_first",
    "late_events_not_republished",
    "late_days_beyond_per_run",
    "late_events_archived_first",
];

/// Creates the series a scheduled export of `kind` can count at 0, so that its first
/// failure is an increase an alert sees rather than a new series.
pub fn declare_metrics(kind: ExportJobType) {
    for status in ["COMPLETED", "FAILED"] {
        count_export_run(kind, status, 0);
    }
    for reason in NOT_EXPORTED {
        count_windows_not_exported(kind, reason, 0);
    }
}

/// `sluice_export_windows_not_exported_total{kind,reason}`: scheduled days a run left
/// without their data published (a backfill, or the next run, is needed), which the run's
/// own outcome does not show.
fn count_windows_not_exported(kind: ExportJobType, reason: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_export_windows_not_exported_total",
        "Scheduled export days a run left without their data published, by kind and reason (beyond_catch_up, archived_first, late_events_not_republished, late_days_beyond_per_run, late_events_archived_first); a day still missing at the next run is counted again, but for beyond_catch_up, counted by the run that skipped it (and the next, if that one completed none of its windows).",
        &[("kind", kind.as_str()), ("reason", reason)],
        n,
    );
}

/// The days that received events after `kind` last read them, oldest first (the days
/// [`publish_late_days`] would publish again). A day is published again until ARCHIVE
/// has taken it (then its mark is forgotten): old enough to be archived is not archived
/// yet, and its late events belong in EVENT_DATA meanwhile.
pub async fn late_days(
    ctx: &ExportContext,
    kind: ExportJobType,
    archive_after_days: u32,
) -> Result<Vec<NaiveDate>, ExportError> {
    // ARCHIVE takes the days before this one.
    let cutoff =
        ctx.store.now().to_chrono().date_naive() - Days::new(u64::from(archive_after_days));
    let late = ctx.store.collection(c::LATE_DAYS);
    let marks: Vec<Document> = late
        .find(doc! {})
        .await
        .map_err(StoreError::mongo(c::LATE_DAYS, "find late days"))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::LATE_DAYS, "find late days"))?;
    let mut out = Vec::new();
    for m in &marks {
        let Some(day) = m
            .get_str(common::ID)
            .ok()
            .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        else {
            continue;
        };
        if day < cutoff && is_archived(ctx, day).await? {
            late.delete_one(doc! { common::ID: day.to_string() })
                .await
                .map_err(StoreError::mongo(c::LATE_DAYS, "forget archived days"))?;
            continue;
        }
        let Ok(marked) = m.get_datetime("markedAt") else {
            continue;
        };
        let read = m
            .get_document("exported")
            .ok()
            .and_then(|e| read_here(ctx, kind, e));
        if read.is_none_or(|r| r < *marked) {
            out.push(day);
        }
    }
    out.sort();
    Ok(out)
}

/// Notes that `kind` read `day` from `reading` on (a run that began then published it):
/// late events marked before that are in what it published. [`run_export`] notes every
/// day it publishes.
pub async fn late_day_exported(
    ctx: &ExportContext,
    kind: ExportJobType,
    day: NaiveDate,
    reading: DateTime,
) {
    let noted = ctx
        .store
        .collection(c::LATE_DAYS)
        .update_one(
            doc! { common::ID: day.to_string() },
            doc! { "$max": { format!("exported.{}", read_key(ctx, kind)): reading } },
        )
        .await;
    if let Err(e) = noted {
        tracing::warn!(%day, error = %e, "could not note a late day as exported; it is published again next run");
    }
}

/// The field of a late day's `exported` that says when `kind` last read the day for this
/// run's destination: `EVENT_DATA@` and a hash of the destination's URL. Kept per
/// destination, as two deployments publishing the same database's days to two places
/// each need the late events.
fn read_key(ctx: &ExportContext, kind: ExportJobType) -> String {
    read_key_at(&ctx.dest.url(""), kind)
}

/// [`read_key`] for the destination at `url`.
fn read_key_at(url: &str, kind: ExportJobType) -> String {
    use sha2::{Digest, Sha256};
    let url = Sha256::digest(url.as_bytes());
    let hex: String = url.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{}@{hex}", kind.as_str())
}

/// When `kind` last read a late day for this run's destination, from the day's
/// `exported`.
fn read_here(ctx: &ExportContext, kind: ExportJobType, exported: &Document) -> Option<DateTime> {
    read_at(&ctx.dest.url(""), kind, exported)
}

/// [`read_here`] for the destination at `url`; a read noted before reads were kept per
/// destination (`EVENT_DATA` alone) stands for every destination.
fn read_at(url: &str, kind: ExportJobType, exported: &Document) -> Option<DateTime> {
    exported
        .get_datetime(read_key_at(url, kind))
        .or_else(|_| exported.get_datetime(kind.as_str()))
        .ok()
        .copied()
}

/// What a run's part folders and id spools in the work folder are named from.
const WORK_PREFIX: &str = "sluice-work-";

/// How old a run's leftovers in the work folder must be before a later run removes them:
/// far longer than any run, so a run going on in another process keeps its files.
const LEFTOVER_AGE: Duration = Duration::from_secs(24 * 3600);

/// The transform chain a `kind`'s rows go through: `export_transforms`, except for an
/// archive, which is a move (every event deleted must be in the files, so no transform
/// may drop, split or change records on the way).
fn export_transforms(ctx: &ExportContext, kind: ExportJobType) -> Vec<Arc<dyn Transform>> {
    if kind == ExportJobType::Archive {
        Vec::new()
    } else {
        ctx.transforms.clone()
    }
}

/// A day's staging folder, removed when dropped: also when the run is cancelled while it
/// stages (SIGTERM, a lost lease, a stopped run by hand), which would otherwise leave its
/// parts, up to a day's worth of Parquet, until a later run's sweep a day on.
struct WorkFolder(std::path::PathBuf);

impl WorkFolder {
    fn new(path: std::path::PathBuf) -> Self {
        crate::spool::hold(&path);
        Self(path)
    }
}

impl Drop for WorkFolder {
    fn drop(&mut self) {
        // Usually gone already (removed as the stage ends); a small folder either way.
        let _ = std::fs::remove_dir_all(&self.0);
        crate::spool::release(&self.0);
    }
}

/// Removes the part folders and id spools a process that died mid-run left in the work
/// folder (a run removes its own as it ends).
async fn sweep_leftovers(work_dir: &std::path::Path) {
    let Ok(mut entries) = tokio::fs::read_dir(work_dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(WORK_PREFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .await
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > LEFTOVER_AGE);
        if !old {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            tokio::fs::remove_dir_all(&path).await
        } else {
            tokio::fs::remove_file(&path).await
        };
        if removed.is_ok() {
            tracing::info!(path = %path.display(), "removed an earlier run's leftover work files");
        }
    }
}

pub async fn run_export(
    ctx: &ExportContext,
    request: &ExportRequest,
) -> Result<ExportSummary, ExportError> {
    if request.from > request.to {
        return Err(ExportError::Request(format!(
            "`from` ({}) is after `to` ({})",
            request.from, request.to
        )));
    }
    sweep_leftovers(&ctx.work_dir).await;
    let started = Instant::now();
    let window = match request.kind {
        ExportJobType::EventData | ExportJobType::DailyAnalytics => {
            Some((request.from.to_string(), request.to.to_string()))
        }
        _ => None,
    };
    let destination = ctx.dest.url(request.kind.as_str());
    remove_failed_staging(ctx).await;
    remove_retired_parts(ctx).await;
    repair_interrupted_publishes(ctx).await;
    let job_id = history::create(
        &ctx.store,
        history::NewJob {
            kind: request.kind,
            destination: &destination,
            root: &ctx.dest.url(""),
            window,
            manual: !request.scheduled,
            schedule: ctx.schedule.as_deref(),
            late: request.late,
        },
    )
    .await?;
    let _in_flight = history::InFlight::enter(&job_id);
    history::running(&ctx.store, &job_id).await?;
    tracing::info!(job_id, kind = %request.kind, "export started");
    let heartbeat = history::heartbeat(&ctx.store, &job_id);
    // The counters are shared by the runs of one context (catch-up runs several windows):
    // this run's figures are what they grew by.
    let (read_before, bytes_before, skipped_before, rejected_before, lettered_before) = (
        ctx.progress.rows_read.load(Relaxed),
        ctx.progress.bytes_uploaded.load(Relaxed),
        ctx.progress.rows_skipped.load(Relaxed),
        ctx.progress.rows_rejected.load(Relaxed),
        ctx.progress.rows_dead_lettered.load(Relaxed),
    );
    let unfitting_before = ctx.progress.unfitting();
    let bytes_now = || {
        ctx.progress
            .bytes_uploaded
            .load(Relaxed)
            .saturating_sub(bytes_before)
    };
    // Late events marked before this are in what the run reads.
    let reading = ctx.store.now();
    let outcome = execute(ctx, request, &job_id).await;
    heartbeat.end();
    // Set aside by this run, whatever its outcome: a failed run's rejected rows are in
    // `dead_letters` already.
    let set_aside = history::SetAside {
        skipped: ctx
            .progress
            .rows_skipped
            .load(Relaxed)
            .saturating_sub(skipped_before),
        rejected: ctx
            .progress
            .rows_rejected
            .load(Relaxed)
            .saturating_sub(rejected_before),
        dead_lettered: ctx
            .progress
            .rows_dead_lettered
            .load(Relaxed)
            .saturating_sub(lettered_before),
        unfitting: ctx.progress.unfitting().since(unfitting_before),
    };
    let history::SetAside {
        skipped,
        rejected,
        dead_lettered,
        ..
    } = set_aside;
    match outcome {
        Ok((partitions, deleted, deferred)) => {
            let rows = partitions.iter().map(|p| p.rows).sum();
            let files: u64 = partitions.iter().map(|p| p.files.len() as u64).sum();
            history::completed(
                &ctx.store,
                &job_id,
                rows,
                files,
                set_aside,
                &destination,
                &deferred,
            )
            .await?;
            tracing::info!(job_id, rows, files, skipped, rejected, "export completed");
            // Each day published (not kept: a kept partition holds an older read) has the
            // late events marked before `reading`: noted for this destination, so neither
            // the schedules nor ARCHIVE wait for another read of them, whoever ran this.
            if request.kind.by_day() {
                for p in partitions.iter().filter(|p| !p.kept) {
                    if let Some(day) = partition_day(&p.prefix) {
                        late_day_exported(ctx, request.kind, day, reading).await;
                    }
                }
            }
            let bytes = bytes_now();
            export_metrics(
                request.kind,
                "COMPLETED",
                rows,
                files,
                bytes,
                started.elapsed(),
            );
            Ok(ExportSummary {
                job_id,
                kind: request.kind,
                partitions,
                rows,
                bytes,
                deleted,
                skipped,
                rejected,
                dead_lettered,
                deferred,
                destination,
                elapsed: started.elapsed(),
            })
        }
        Err(err) => {
            let _ = remove_staging(ctx, &job_id).await;
            let read = ctx
                .progress
                .rows_read
                .load(Relaxed)
                .saturating_sub(read_before);
            tracing::error!(job_id, error = %err, "export failed");
            if let Err(e) =
                history::failed(&ctx.store, &job_id, read, set_aside, &err.to_string()).await
            {
                // It stays RUNNING until the check for interrupted runs marks it FAILED.
                tracing::error!(job_id, error = %e, "could not record the failed export");
            }
            export_metrics(request.kind, "FAILED", 0, 0, 0, started.elapsed());
            Err(err)
        }
    }
}

fn export_metrics(
    kind: ExportJobType,
    status: &str,
    rows: u64,
    files: u64,
    bytes: u64,
    elapsed: std::time::Duration,
) {
    use sluice_core::metrics::{count, observe_seconds};
    let k = [("kind", kind.as_str())];
    count_export_run(kind, status, 1);
    count(
        "sluice_export_rows_total",
        "Rows published by exports, by kind.",
        &k,
        rows,
    );
    count(
        "sluice_export_files_total",
        "Parquet files published, by kind.",
        &k,
        files,
    );
    count(
        "sluice_export_bytes_total",
        "Bytes uploaded by exports, by kind.",
        &k,
        bytes,
    );
    observe_seconds(
        "sluice_export_run_seconds",
        "Duration of export runs, by kind.",
        &k,
        elapsed.as_secs_f64(),
    );
}

/// Removes what failed runs left under `_staging/` (a run that lost its connection to the
/// store cannot clean up after itself). Best effort: a failure here only leaves garbage.
/// Records `stale` parts as retired until `keep_replaced` from now, and returns those to
/// remove now: none when they were recorded, all of them without a grace period or when
/// recording failed.
async fn retire(ctx: &ExportContext, stale: Vec<String>) -> Vec<String> {
    if ctx.keep_replaced.is_zero() || stale.is_empty() {
        return stale;
    }
    let due = ctx.store.now_plus(ctx.keep_replaced);
    match record_retired(ctx, &stale, due).await {
        Ok(()) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "could not record replaced parts for later removal; removing them now");
            stale
        }
    }
}

/// Removes `keys`, parts no manifest names. What cannot be removed now is recorded in
/// `retired_parts`, for the next export run to this destination, and the error returned.
async fn remove_unnamed(ctx: &ExportContext, keys: &[String]) -> Result<(), StorageError> {
    let Err(e) = ctx.dest.delete(keys).await else {
        return Ok(());
    };
    if let Err(r) = record_retired(ctx, keys, ctx.store.now()).await {
        tracing::warn!(error = %r, "could not record parts left behind for the next run");
    }
    Err(e)
}

/// Records `keys` in `retired_parts`, to be removed by a run after `due`.
async fn record_retired(
    ctx: &ExportContext,
    keys: &[String],
    due: DateTime,
) -> Result<(), mongodb::error::Error> {
    let dest = ctx.dest.url("");
    let docs: Vec<Document> = keys
        .iter()
        .map(|key| doc! { common::ID: ctx.dest.url(key), "dest": &dest, "key": key, "dueAt": due })
        .collect();
    match ctx
        .store
        .collection(c::RETIRED_PARTS)
        .insert_many(docs)
        .ordered(false)
        .await
    {
        Ok(_) => Ok(()),
        Err(e)
            if sluice_connectors::mongo::is_duplicate_key(&e)
                || sluice_connectors::mongo::duplicate_key_positions(&e).is_some() =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Removes the retired parts of this destination whose grace period has passed.
async fn remove_retired_parts(ctx: &ExportContext) {
    use futures_util::TryStreamExt;
    let retired = ctx.store.collection(c::RETIRED_PARTS);
    let due: Vec<Document> = match retired
        .find(doc! { "dest": ctx.dest.url(""), "dueAt": { "$lt": ctx.store.now() } })
        .limit(10_000)
        .await
    {
        Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the replaced parts due for removal");
            return;
        }
    };
    if due.is_empty() {
        return;
    }
    let keys: Vec<String> = due
        .iter()
        .filter_map(|d| d.get_str("key").ok().map(str::to_string))
        .collect();
    if let Err(e) = ctx.dest.delete(&keys).await {
        tracing::warn!(error = %e, "replaced parts not removed; the next run tries again");
        return;
    }
    let ids: Vec<&Bson> = due.iter().filter_map(|d| d.get(common::ID)).collect();
    let _ = retired
        .delete_many(doc! { common::ID: { "$in": ids } })
        .await;
    tracing::info!(
        parts = keys.len(),
        "replaced parts removed after their grace period"
    );
}

async fn remove_failed_staging(ctx: &ExportContext) {
    // Runs whose process died are FAILED first, so their staged files go too.
    if let Err(e) = history::fail_dead_runs(&ctx.store).await {
        tracing::warn!(error = %e, "could not check for interrupted export runs");
    }
    let Ok(left) = ctx.dest.list("_staging/").await else {
        return;
    };
    let mut by_job: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for o in left {
        if let Some(job) = o.key.split('/').nth(1) {
            by_job.entry(job.to_string()).or_default().push(o.key);
        }
    }
    for (job, keys) in by_job {
        // Of runs that ended: failed ones, and completed ones whose cleanup failed.
        let status = history::status(&ctx.store, &job).await;
        let ended = [
            sluice_core::model::ExportJobStatus::Failed,
            sluice_core::model::ExportJobStatus::Completed,
        ];
        if matches!(status, Ok(Some(s)) if ended.iter().any(|e| s == e.as_str())) {
            let _ = ctx.dest.delete(&keys).await;
        }
    }
}

/// Repairs the partitions of this destination whose publish was interrupted (its process
/// died mid-publish, or its undo failed): their leases lapsed with a note of the
/// partition. Best effort: a partition not repaired now keeps its note for the next run.
async fn repair_interrupted_publishes(ctx: &ExportContext) {
    use futures_util::TryStreamExt;
    let noted: Vec<Document> = match ctx
        .store
        .lease_collection(c::JOB_LOCKS)
        .find(doc! {
            format!("{PUBLISHING_NOTE}.dest"): ctx.dest.url(""),
            "expiresAt": { "$lt": ctx.store.now() },
        })
        .limit(1_000)
        .await
    {
        Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not look for interrupted publishes");
            return;
        }
    };
    let owner = format!("repair-{}", uuid::Uuid::new_v4().simple());
    for d in noted {
        let (Ok(id), Ok(prefix)) = (
            d.get_str(common::ID),
            d.get_document(PUBLISHING_NOTE)
                .and_then(|n| n.get_str("prefix")),
        ) else {
            continue;
        };
        // Taken like any publish's lease: a publish of the partition that holds it now
        // repairs it itself.
        let Ok(Ok(lock)) = Lock::try_take(&ctx.store, id, &owner).await else {
            continue;
        };
        match repair_partition(ctx, prefix).await {
            Ok(()) => {}
            Err(e) => {
                lock.keep_note();
                tracing::warn!(partition = %prefix, error = %e, "an interrupted publish's partition was not repaired; the next export run tries again");
            }
        }
        lock.release(&ctx.store).await;
    }
}

/// Makes a partition whose publish was interrupted whole again, under its publish lock:
/// the parquet files its manifest does not name (copies of the interrupted publish, or
/// parts it replaced and had not removed) are removed, or retired for
/// `keep_replaced_parts_minutes`; its `_SUCCESS` is put back when it has a manifest.
async fn repair_partition(ctx: &ExportContext, prefix: &str) -> Result<(), ExportError> {
    let dir = format!("{prefix}/");
    let success = format!("{dir}_SUCCESS");
    let manifest_key = format!("{dir}_manifest.json");
    let existing = ctx.dest.list(&dir).await?;
    let manifest: Option<serde_json::Value> = if existing.iter().any(|o| o.key == manifest_key) {
        let bytes = ctx.dest.get_bytes(&manifest_key).await?;
        // A manifest that cannot be read says nothing about which parts are published:
        // nothing is removed on its account.
        Some(
            serde_json::from_slice(&bytes).map_err(|e| ExportError::Verify {
                key: manifest_key.clone(),
                message: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let named: Option<Vec<String>> = manifest.as_ref().map(manifest_paths);
    // The publish may have stopped between the manifest and its symlink.
    put_symlink(ctx, prefix, manifest.as_ref()).await?;
    let unnamed: Vec<String> = existing
        .iter()
        .map(|o| o.key.clone())
        .filter(|k| {
            k.ends_with(".parquet")
                && !named
                    .iter()
                    .flatten()
                    .any(|n| k.strip_prefix(&dir) == Some(n.as_str()))
        })
        .collect();
    let removed = unnamed.len();
    let unnamed = retire(ctx, unnamed).await;
    remove_unnamed(ctx, &unnamed).await?;
    if named.is_some() && !existing.iter().any(|o| o.key == success) {
        ctx.dest.put_bytes(&success, Vec::new()).await?;
    }
    // The run whose parts the manifest names published the partition, though it never
    // recorded so: its record says it now.
    if let (Some(m), Some(paths)) = (manifest.as_ref(), named.as_ref()) {
        if let Some(job) = m["jobId"].as_str() {
            let files: Vec<String> = paths.iter().map(|p| format!("{dir}{p}")).collect();
            let rows = m["rows"].as_u64().unwrap_or(0);
            history::partition_repaired(&ctx.store, job, prefix, rows, &files).await?;
        }
    }
    tracing::warn!(
        partition = %prefix,
        parts_not_named = removed,
        "repaired a partition whose publish was interrupted: parts its manifest does not name were removed (or retired), and its `_SUCCESS` is back if it has a manifest"
    );
    Ok(())
}

/// Removes what the run `job_id` staged.
async fn remove_staging(ctx: &ExportContext, job_id: &str) -> Result<(), StorageError> {
    let staged: Vec<String> = ctx
        .dest
        .list(&staging_prefix(job_id))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    ctx.dest.delete(&staged).await
}

fn staging_prefix(job_id: &str) -> String {
    format!("_staging/{job_id}/")
}

async fn execute(
    ctx: &ExportContext,
    request: &ExportRequest,
    job_id: &str,
) -> Result<Executed, ExportError> {
    let kind = request.kind;
    // A destination that does not answer (wrong credentials, no bucket, nothing at the
    // endpoint) fails the run now, not after its whole read.
    // (Boxed: the SDK's request futures are large, and this one would sit in every run's.)
    Box::pin(ctx.dest.check()).await?;
    if kind.by_day() {
        refuse_archived_days(ctx, request).await?;
    }
    // Before any cursor opens: every event stored before this is in what the run reads.
    let read_at = ctx.store.now();
    let mut staged = Vec::new();
    match kind {
        ExportJobType::EventData => {
            for d in days(request.from, request.to) {
                let filter =
                    doc! { e::TIMESTAMP: { "$gte": day_start(d), "$lt": day_start(next_day(d)) } };
                let docs = event_cursor(ctx, filter.clone()).await?;
                staged.push(stage(ctx, job_id, kind, d, &EVENT_TABLE, docs, None).await?);
            }
        }
        ExportJobType::Archive => {
            // Refused before anything is taken or published: on an older server every
            // delete would fail after its day's files were written.
            if let Some(why) =
                sluice_connectors::mongo::archive_unsupported(ctx.store.max_wire_version().await?)
            {
                return Err(ExportError::Request(why));
            }
            // One archive at a time (two would both publish the same events), and first
            // finish what an interrupted archive published but did not delete.
            let lock = ArchiveLock::take(ctx, job_id).await?;
            if !ctx.transforms.is_empty() {
                // An archive is a move: every event deleted must be in the files as stored.
                tracing::info!(
                    job_id,
                    transforms = ctx.transforms.len(),
                    "ARCHIVE runs no export_transforms: events are archived as stored"
                );
            }
            let result = archive(ctx, request, job_id).await;
            lock.release(ctx).await;
            return result;
        }
        ExportJobType::UserData => {
            let today = ctx.store.now().to_chrono().date_naive();
            let docs = sorted_cursor(ctx, c::USERS, doc! {}, u::VISITOR_ID).await?;
            staged.push(stage(ctx, job_id, kind, today, &USER_TABLE, docs, None).await?);
        }
        ExportJobType::DailyAnalytics => {
            let rows = daily_rows(ctx, request.from, request.to).await?;
            for d in days(request.from, request.to) {
                let key = d.to_string();
                let row = rows
                    .iter()
                    .find(|r| r.get_str(pc::DATE) == Ok(key.as_str()))
                    .cloned()
                    .unwrap_or_else(|| {
                        doc! { pc::DATE: &key, pc::EVENTS: 0i64, pc::UNIQUE_USERS: 0i64,
                        pc::UNIQUE_SESSIONS: 0i64, pc::PAGE_VIEWS: 0i64, pc::TOP_PAGES: [],
                        pc::PURCHASES: 0i64, pc::REVENUE: [] }
                    });
                let events = row.get_i64(pc::EVENTS).map_or(0, |n| n.max(0) as u64);
                let docs = Box::pin(futures_util::stream::iter(vec![Ok(row)]));
                let mut day = stage(ctx, job_id, kind, d, &DAILY_TABLE, docs, None).await?;
                day.source_rows = Some(events);
                staged.push(day);
            }
        }
    }
    if kind.by_day() {
        // Again, now that the days are read: an archive that ran meanwhile may have
        // deleted events this run was reading, and it publishes its manifest before it
        // deletes anything, so a partial read always shows here.
        refuse_archived_days(ctx, request).await?;
    }
    for s in &mut staged {
        s.read_at = Some(read_at);
    }
    Ok((
        publish_all(ctx, job_id, kind, &staged).await?,
        0,
        Vec::new(),
    ))
}

/// EVENT_DATA and DAILY_ANALYTICS of a day that was archived would be computed from the
/// events that arrived after the archive (none, or a few late ones) and replace the good
/// partition with them: such a window is refused, naming the days and where their events
/// are.
async fn refuse_archived_days(
    ctx: &ExportContext,
    request: &ExportRequest,
) -> Result<(), ExportError> {
    let window = days(request.from, request.to);
    let recorded = history::archived_days_where(&ctx.store, &window).await?;
    let mut archived = Vec::new();
    let mut wheres = std::collections::BTreeSet::new();
    for d in window {
        let at: Vec<&String> = recorded
            .iter()
            .filter(|(day, _)| *day == d)
            .map(|(_, w)| w)
            .collect();
        if !at.is_empty() {
            wheres.extend(at.into_iter().cloned());
        } else if archive_manifest_here(ctx, d).await? {
            wheres.insert(ctx.dest.url(ExportJobType::Archive.as_str()));
        } else {
            continue;
        }
        archived.push(d.to_string());
    }
    if archived.is_empty() {
        return Ok(());
    }
    let what = if request.from == request.to {
        format!("the day {} was archived", request.from)
    } else {
        format!(
            "{} of the days {}..{} {} archived ({})",
            archived.len(),
            request.from,
            request.to,
            if archived.len() == 1 { "was" } else { "were" },
            archived.join(", ")
        )
    };
    Err(ExportError::Request(format!(
        "{what}: their events were moved to {} and deleted from MongoDB, so exporting them again ({}) would replace the published partitions with whatever arrived later; read the ARCHIVE partitions instead",
        wheres.into_iter().collect::<Vec<_>>().join(" and "),
        request.kind.as_str(),
    )))
}

/// Whether ARCHIVE has published `day`, or is archiving it (its events then live there,
/// not in MongoDB): by `export_jobs`, which names the day from before anything is
/// deleted, whatever destination it was archived to (an `export run archive --dest`, a
/// destination changed since), or by a manifest at this destination.
async fn is_archived(ctx: &ExportContext, day: NaiveDate) -> Result<bool, ExportError> {
    if !history::archived_days(&ctx.store, &[day]).await?.is_empty() {
        return Ok(true);
    }
    archive_manifest_here(ctx, day).await
}

/// Whether this destination holds an ARCHIVE manifest of `day`.
async fn archive_manifest_here(ctx: &ExportContext, day: NaiveDate) -> Result<bool, ExportError> {
    let manifest = format!(
        "{}/dt={day}/_manifest.json",
        ExportJobType::Archive.as_str()
    );
    Ok(ctx.dest.head(&manifest).await?.is_some())
}

/// Publishes every staged partition, then removes the run's staging area.
async fn publish_all(
    ctx: &ExportContext,
    job_id: &str,
    kind: ExportJobType,
    staged: &[Staged],
) -> Result<Vec<PartitionSummary>, ExportError> {
    let mut published = Vec::new();
    for s in staged {
        published.push(publish(ctx, job_id, kind, s).await?);
    }
    // Every partition is published: a staging area that cannot be removed now fails
    // nothing (a later run sweeps leftovers of runs that ended).
    if let Err(e) = remove_staging(ctx, job_id).await {
        tracing::warn!(job = job_id, error = %e, "published, but the run's staging area was not removed; a later run removes it");
    }
    Ok(published)
}

/// ARCHIVE, under the archive lock: completes (or undoes) what interrupted archives left,
/// then one day at a time, oldest first: stages the day's events older than the cutoff,
/// records what it is about to publish and delete, publishes, verifies, deletes. A day is
/// finished before the next one starts, so a run that fails part-way leaves every day
/// either archived and deleted, or pending for the next run to finish or undo: never
/// published twice.
async fn archive(
    ctx: &ExportContext,
    request: &ExportRequest,
    job_id: &str,
) -> Result<Executed, ExportError> {
    let kind = ExportJobType::Archive;
    let (mut deleted, stuck) = recover_archives(ctx, job_id).await?;
    let now = ctx.store.now().to_chrono();
    let today = now.date_naive();
    let cutoff = today
        .checked_sub_days(Days::new(u64::from(request.archive_after_days)))
        .unwrap_or(today);
    let created_before =
        DateTime::from_millis(now.timestamp_millis() - request.archive_settle.as_millis() as i64);
    let mut published = Vec::new();
    let mut deferred = Vec::new();
    for d in archive_days(ctx, cutoff).await? {
        if stuck.iter().any(|(day, _)| *day == d) {
            // Archived again, its events would sit in the partition twice (the old files
            // and the new): it waits until someone looks at it.
            continue;
        }
        // A day ARCHIVE took before is not waited for: EVENT_DATA and DAILY_ANALYTICS
        // refuse an archived day, so its late events go to its ARCHIVE partition only.
        let waiting = if is_archived(ctx, d).await? {
            None
        } else {
            late_unread(ctx, request, d).await?
        };
        if let Some(waiting) = waiting {
            tracing::warn!(day = %d, exports = ?waiting, "not archived yet: late events of the day are still to be published by these exports; the next archive run takes it");
            deferred.push(format!(
                "{d}: its late events are still to be published again by the {} export(s) that read the day (wait for their schedule's next run, `jobs run` it, or `export run KIND --late-days`)",
                waiting.join(", ")
            ));
            continue;
        }
        refuse_undated_events(ctx, d).await?;
        let filter = archive_filter(d, created_before);
        let docs = event_cursor(ctx, filter.clone()).await?;
        let s = stage(ctx, job_id, kind, d, &EVENT_TABLE, docs, Some(filter)).await?;
        if s.rows_read == 0 {
            // Every event of the day arrived within `archive_settle`: published now, the
            // partition would look complete with none of them, and the day would count as
            // archived (its exports refused) while MongoDB still holds them all.
            ctx.dest
                .delete(&s.parts.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
                .await?;
            tracing::info!(day = %d, "not archived yet: every event of the day arrived in the last minutes (archive_settle); the next archive run takes it");
            deferred.push(format!(
                "{d}: every event of it arrived in the last {} s (archive_settle)",
                request.archive_settle.as_secs()
            ));
            continue;
        }
        // Before publishing: what a crash from here on leaves for the next archive to
        // finish (files published: delete the events) or undo (remove the files).
        let files: Vec<Bson> = s
            .parts
            .iter()
            .map(|(_, info)| {
                Bson::Document(doc! {
                    "key": format!("{}/{}", s.prefix, part_name(job_id, info.index)),
                    "bytes": info.bytes as i64,
                    "sha256": &info.sha256,
                })
            })
            .collect();
        // A run whose archive lease lapsed (a process paused past it) while another took
        // over must not publish next to it: both copies of the day would land in the
        // partition. Checked before each day is made pending and published.
        ensure_archive_lock(ctx, job_id).await?;
        history::add_pending_delete(
            &ctx.store,
            job_id,
            doc! {
                "prefix": &s.prefix, "day": d.to_string(),
                "createdBefore": created_before, "rows": s.rows_read as i64, "files": files,
            },
        )
        .await?;
        let p = publish(ctx, job_id, kind, &s).await?;
        let staged: Vec<String> = s.parts.iter().map(|(k, _)| k.clone()).collect();
        ctx.dest.delete(&staged).await?;
        if ctx.fail_before_archive_delete {
            return Err(ExportError::Request(
                "stopped before deleting (test hook)".into(),
            ));
        }
        ensure_archive_lock(ctx, job_id).await?;
        let n = archive_delete(ctx, job_id, &s, &p).await?;
        // Recorded as published before it stops being pending, so the day is always
        // named by one of the two (the analytics API refuses such days).
        history::partition_published(&ctx.store, job_id, &p.prefix, p.rows, &p.files, p.kept)
            .await?;
        history::pending_deleted(&ctx.store, job_id, &s.prefix).await?;
        history::events_deleted(&ctx.store, job_id, n).await?;
        deleted += n;
        published.push(p);
    }
    if !stuck.is_empty() {
        let days: Vec<String> = stuck
            .iter()
            .map(|(d, why)| format!("{d} ({why})"))
            .collect();
        return Err(ExportError::Request(format!(
            "archived every other day, but left these days pending, nothing of them deleted: {}. \
             Check the partition's files against its `_manifest.json`; to archive such a day \
             afresh, remove its partition folder and the `pendingDeletes` entry of the \
             interrupted run in `export_jobs`",
            days.join("; ")
        )));
    }
    Ok((published, deleted, deferred))
}

/// The name of part `index` of run `job_id` in a partition: every run writes its own
/// names, so publishing never overwrites a file a reader may be reading, and a publish
/// that fails can be undone by removing its files.
fn part_name(job_id: &str, index: usize) -> String {
    format!("part-{job_id}-{index:05}.parquet")
}

/// How long ARCHIVE waits for the late events of a day to be published again by the
/// exports that read them; beyond it, those exports are taken as stopped or failing, and
/// the day is archived anyway.
pub const LATE_WAIT: Duration = Duration::from_secs(3 * 24 * 3600);

/// What keeps a day from being archived, each kind with how many events and the first:
/// the whole day is read, so one run names everything to fix.
#[derive(Default)]
struct Unarchivable {
    kinds: std::collections::HashMap<String, (u64, String)>,
    /// Events of kinds beyond those kept (a writer naming fields by id makes one per event).
    more: u64,
}

impl Unarchivable {
    const KEPT: usize = 1_000;

    fn note(&mut self, what: &str, n: u64, first: impl FnOnce() -> String) {
        let room = self.kinds.len() < Self::KEPT;
        match self.kinds.get_mut(what) {
            Some(entry) => entry.0 += n,
            None if room => {
                self.kinds.insert(what.to_string(), (n, first()));
            }
            None => self.more += n,
        }
    }

    fn is_empty(&self) -> bool {
        self.kinds.is_empty() && self.more == 0
    }

    /// Adds another stage's kinds (the first event of a kind both saw stays this one's).
    fn merge(&mut self, other: Unarchivable) {
        for (what, (n, first)) in other.kinds {
            self.note(&what, n, || first);
        }
        self.more += other.more;
    }

    /// The error, the most frequent kinds first.
    fn error(self, partition: &str) -> ExportError {
        let mut kinds: Vec<(String, (u64, String))> = self.kinds.into_iter().collect();
        kinds.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
        let mut said: Vec<String> = kinds
            .iter()
            .take(10)
            .map(|(what, (n, first))| format!("{n} event(s) with {what} (the first: {first})"))
            .collect();
        if kinds.len() > 10 {
            said.push(format!("and {} more kinds", kinds.len() - 10));
        }
        if self.more > 0 {
            said.push(format!(
                "and {} more event(s) of kinds not counted apart",
                self.more
            ));
        }
        ExportError::Encode {
            partition: partition.to_string(),
            message: format!(
                "{}; archiving them would lose what they hold, so nothing of the day was archived (export the day with EVENT_DATA and keep such fields elsewhere, move them into `properties`, convert the values to their columns' types, or remove them)",
                said.join("; ")
            ),
        }
    }
}

/// ARCHIVE: the kinds that read late days (the request's `late_readers`, and any by-day
/// kind that published `d` where they publish) that have not yet published the late events
/// marked for `d` there (the mark is newer than what they read), or `None` when none is
/// waited for.
async fn late_unread(
    ctx: &ExportContext,
    request: &ExportRequest,
    d: NaiveDate,
) -> Result<Option<Vec<&'static str>>, ExportError> {
    let mark = ctx
        .store
        .collection(c::LATE_DAYS)
        .find_one(doc! { common::ID: d.to_string() })
        .await
        .map_err(StoreError::mongo(c::LATE_DAYS, "read a late day"))?;
    let Some((mark, marked)) = mark.and_then(|m| {
        let at = *m.get_datetime("markedAt").ok()?;
        Some((m, at))
    }) else {
        return Ok(None);
    };
    // Where the readers publish: this run's destination, unless told otherwise.
    let at = request
        .late_readers_at
        .clone()
        .unwrap_or_else(|| ctx.dest.url(""));
    // Besides the scheduled kinds, any by-day kind that published the day there: exports
    // an orchestrator drives (`export run`) have no schedule to name them, and their
    // partition of the day lacks the late events just as well.
    let mut readers = request.late_readers.clone();
    for kind in [ExportJobType::EventData, ExportJobType::DailyAnalytics] {
        if !readers.contains(&kind) && published_day(ctx, kind, &at, d, marked).await? {
            readers.push(kind);
        }
    }
    let read = |k: &ExportJobType| {
        mark.get_document("exported")
            .ok()
            .and_then(|e| read_at(&at, *k, e))
    };
    let waiting: Vec<&ExportJobType> = readers
        .iter()
        .filter(|k| read(k).is_none_or(|r| r < marked))
        .collect();
    let waited = ctx.store.now().timestamp_millis() - marked.timestamp_millis();
    if waited > LATE_WAIT.as_millis() as i64 {
        // Taken as stopped or failing: the day is archived with late events they never
        // published (they are in its ARCHIVE partition only). Counted against them.
        for k in &waiting {
            count_windows_not_exported(**k, "late_events_archived_first", 1);
            tracing::error!(kind = %k, day = %d, "archived a day whose late events this export has not published again within 3 days (failing, or a backlog beyond its `late_days_per_run`); they are in the day's ARCHIVE partition only");
        }
        return Ok(None);
    }
    Ok((!waiting.is_empty()).then(|| waiting.iter().map(|k| k.as_str()).collect()))
}

/// Whether a run of `kind` published day `d` to the destination at `root` (a completed
/// run whose window holds the day, as `export_jobs` records it), and the kind still runs
/// there (a run, of any outcome, started within `LATE_WAIT` before the day's late mark
/// `marked`, or since).
async fn published_day(
    ctx: &ExportContext,
    kind: ExportJobType,
    root: &str,
    d: NaiveDate,
    marked: DateTime,
) -> Result<bool, ExportError> {
    let day = d.to_string();
    let find = |filter: Document| async move {
        ctx.store
            .collection(c::EXPORT_JOBS)
            .find_one(filter)
            .projection(doc! { "_id": 1 })
            .await
            .map(|found| found.is_some())
            .map_err(StoreError::mongo(
                c::EXPORT_JOBS,
                "find the runs that published a day",
            ))
    };
    let published = find(doc! {
        "type": kind.as_str(), "status": "COMPLETED", history::ROOT: root,
        "windowStart": { "$lte": &day }, "windowEnd": { "$gte": &day },
    })
    .await?;
    // And still runs there: a kind last run long ago (a one-off backfill) would otherwise
    // hold every late day it once published for `LATE_WAIT`, then be blamed for it. Any
    // run that started within `LATE_WAIT` of the mark counts, a failing one too: an
    // export failing is waited for, and blamed once the wait is over.
    let recent = DateTime::from_millis(marked.timestamp_millis() - LATE_WAIT.as_millis() as i64);
    Ok(published
        && find(doc! {
            "type": kind.as_str(), history::ROOT: root, "startTime": { "$gte": recent },
        })
        .await?)
}

/// Stops the archive at day `d` when some of its events have no date `createdAt`
/// (written by another tool): the archive filter, which leaves events a writer may still
/// be inserting by `createdAt`, would never select them, and the day would be published
/// without them, each run again, while they stayed in MongoDB where nothing exports them.
async fn refuse_undated_events(ctx: &ExportContext, d: NaiveDate) -> Result<(), ExportError> {
    let undated = doc! {
        e::TIMESTAMP: { "$gte": day_start(d), "$lt": day_start(next_day(d)) },
        common::CREATED_AT: { "$not": { "$type": "date" } },
    };
    let events = ctx.store.collection(c::EVENTS);
    let partition = format!("{}/dt={d}", ExportJobType::Archive.as_str());
    let read_err = |source| ExportError::Read {
        partition: partition.clone(),
        source,
    };
    let Some(example) = events
        .find_one(undated.clone())
        .projection(doc! { e::EVENT_ID: 1, common::ID: 1 })
        .await
        .map_err(read_err)?
    else {
        return Ok(());
    };
    let n = events.count_documents(undated).await.map_err(read_err)?;
    Err(ExportError::Encode {
        partition,
        message: format!(
            "{n} event(s) of the day have no date `createdAt` (for example eventId `{}`, _id {}): the archive leaves events still being written for its next run by their `createdAt`, so it would never take these; nothing of the day was archived (set their `createdAt` to a date, or remove them)",
            example.get_str(e::EVENT_ID).unwrap_or("?"),
            example.get(common::ID).cloned().unwrap_or(Bson::Null)
        ),
    })
}

fn archive_filter(d: NaiveDate, created_before: DateTime) -> Document {
    doc! {
        e::TIMESTAMP: { "$gte": day_start(d), "$lt": day_start(next_day(d)) },
        common::CREATED_AT: { "$lt": created_before },
    }
}

/// Finishes or undoes what interrupted ARCHIVE runs left. Each pending partition was
/// recorded before its publish began:
/// - if the partition's manifest lists all its files, the publish finished: the files are
///   verified and exactly the events the run's filter selected are deleted (a partition
///   whose files are gone or whose events no longer match what was published is left
///   pending and reported, never deleted blindly);
/// - otherwise the publish did not finish: the files it copied are removed and the
///   partition is left as it was; its events, still in MongoDB, are archived again.
///
/// Runs only under the archive lock, so no such run is still alive.
///
/// Returns how many events it deleted, and the days it could not settle (their files no
/// longer match what was published), which this run must not archive again.
async fn recover_archives(
    ctx: &ExportContext,
    job_id: &str,
) -> Result<(u64, Vec<(NaiveDate, String)>), ExportError> {
    let interrupted = history::interrupted_archives(&ctx.store, job_id).await?;
    // Under the lock no other archive is alive: one still RUNNING died.
    history::fail_other_archives(&ctx.store, job_id).await?;
    let destination = ctx.dest.url(ExportJobType::Archive.as_str());
    let mut deleted = 0;
    let mut stuck = Vec::new();
    for job in interrupted {
        let old = job.get_str(x::JOB_ID).unwrap_or_default().to_string();
        if job.get_str(x::DESTINATION).ok() != Some(destination.as_str()) {
            tracing::warn!(job = %old, "an interrupted archive to another destination is left pending");
            continue;
        }
        for p in job
            .get_array(history::PENDING_DELETES)
            .cloned()
            .unwrap_or_default()
        {
            let Bson::Document(p) = p else { continue };
            ensure_archive_lock(ctx, job_id).await?;
            match recover_partition(ctx, &old, &p).await? {
                Recovered::Deleted(n) => deleted += n,
                Recovered::Undone => {}
                Recovered::Stuck(day, why) => stuck.push((day, why)),
            }
        }
    }
    Ok((deleted, stuck))
}

/// What became of one pending partition of an interrupted archive.
enum Recovered {
    /// Its publish had finished: its events are now deleted.
    Deleted(u64),
    /// Its publish had not finished: undone, its events are archived again.
    Undone,
    /// Its files no longer match what was published: left pending, nothing deleted.
    Stuck(NaiveDate, String),
}

/// See [`recover_archives`]: one pending partition of the interrupted run `old`.
async fn recover_partition(
    ctx: &ExportContext,
    old: &str,
    p: &Document,
) -> Result<Recovered, ExportError> {
    let prefix = p.get_str("prefix").unwrap_or_default().to_string();
    let (Ok(day), Ok(before)) = (
        NaiveDate::parse_from_str(p.get_str("day").unwrap_or_default(), "%Y-%m-%d"),
        p.get_datetime("createdBefore"),
    ) else {
        return Ok(Recovered::Undone);
    };
    let files: Vec<(String, i64, Option<String>)> = p
        .get_array("files")
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| match f {
            Bson::Document(f) => Some((
                f.get_str("key").unwrap_or_default().to_string(),
                f.get_i64("bytes").unwrap_or(-1),
                f.get_str("sha256").ok().map(str::to_string),
            )),
            _ => None,
        })
        .collect();
    let dir = format!("{prefix}/");
    let manifest_key = format!("{dir}_manifest.json");
    let parsed: Option<serde_json::Value> = match ctx.dest.head(&manifest_key).await? {
        Some(_) => {
            let bytes = ctx.dest.get_bytes(&manifest_key).await?;
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(m) => Some(m),
                // Read as "not published", its files would be undone, although the run
                // may have deleted events already: the files may be their only copy.
                Err(e) => {
                    return Ok(Recovered::Stuck(
                        day,
                        format!("its manifest `{manifest_key}` does not parse ({e}); nothing undone or deleted"),
                    ))
                }
            }
        }
        None => None,
    };
    let listed: Vec<String> = parsed.as_ref().map(manifest_paths).unwrap_or_default();
    let filter = archive_filter(day, *before);
    let read = |source| ExportError::Read {
        partition: prefix.clone(),
        source,
    };
    let rows = p.get_i64("rows").unwrap_or(-1);
    let remaining = ctx
        .store
        .collection(c::EVENTS)
        .count_documents(filter.clone())
        .await
        .map_err(read)?;
    let published = files
        .iter()
        .all(|(key, ..)| listed.iter().any(|n| format!("{dir}{n}") == *key));
    if !published {
        // Fewer events than it read: it deleted some, so it had published, whatever the
        // manifest says now. Its files may be their only copy: not undone.
        if (remaining as i64) < rows {
            return Ok(Recovered::Stuck(
                day,
                format!("{remaining} events match where run {old} read {rows}, yet its manifest does not name its files; nothing undone or deleted"),
            ));
        }
        // The publish stopped before its manifest: undo it. The symlink first, as the
        // manifest says (a failed undo may have left it naming the copies).
        put_symlink(ctx, &prefix, parsed.as_ref()).await?;
        let copied: Vec<String> = files.iter().map(|(k, ..)| k.clone()).collect();
        ctx.dest.delete(&copied).await?;
        if !listed.is_empty() {
            ctx.dest
                .put_bytes(&format!("{dir}_SUCCESS"), Vec::new())
                .await?;
        }
        history::pending_deleted(&ctx.store, old, &prefix).await?;
        tracing::warn!(job = %old, partition = %prefix, "undid an interrupted archive's unfinished publish; its events are archived again");
        return Ok(Recovered::Undone);
    }
    // Checked by content where the run recorded it (runs of earlier versions recorded
    // sizes only).
    let mut intact = true;
    for (key, bytes, sha256) in &files {
        intact &= match sha256 {
            Some(sha256) => ctx
                .dest
                .sha256(key)
                .await?
                .is_some_and(|(size, found)| size as i64 == *bytes && found == *sha256),
            None => ctx
                .dest
                .head(key)
                .await?
                .is_some_and(|size| size as i64 == *bytes),
        };
        if !intact {
            break;
        }
    }
    // Fewer events than published: the run died part-way through deleting them.
    if !intact || remaining as i64 > rows {
        tracing::error!(job = %old, partition = %prefix, intact, published = rows, now = remaining,
            "an interrupted archive's partition no longer matches its files; left pending, nothing deleted");
        let why = if intact {
            format!("{remaining} events match where run {old} published {rows}")
        } else {
            format!("a file run {old} published is missing or changed")
        };
        return Ok(Recovered::Stuck(day, why));
    }
    // It may have died between its manifest and its symlink, or its `_SUCCESS`.
    put_symlink(ctx, &prefix, parsed.as_ref()).await?;
    ctx.dest
        .put_bytes(&format!("{dir}_SUCCESS"), Vec::new())
        .await?;
    // Chunk by chunk, the ids still matching: each chunk read is deleted before the
    // next is read, so a day of any size is never held whole.
    let mut deleted = 0;
    loop {
        let ids: Vec<String> = ctx
            .store
            .collection(c::EVENTS)
            .find(filter.clone())
            .projection(doc! { e::EVENT_ID: 1, common::ID: 0 })
            .limit(ctx.archive_delete_chunk.max(1) as i64)
            .await
            .map_err(read)?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(read)?
            .iter()
            .filter_map(|d| d.get_str(e::EVENT_ID).ok().map(str::to_string))
            .collect();
        if ids.is_empty() {
            break;
        }
        let now = delete_archived(ctx, &prefix, &filter, &ids).await?;
        deleted += now;
        if now == 0 {
            // Nothing of what matched could be deleted: stop rather than loop.
            break;
        }
    }
    // Whatever still matches (events read from a lagging secondary, events without a
    // string eventId) is left pending. What was deleted is recorded, and the files are
    // the only copy of it: the partition must stay.
    let left = ctx
        .store
        .collection(c::EVENTS)
        .count_documents(filter.clone())
        .await
        .map_err(read)?;
    if left > 0 {
        history::pending_events_deleted(&ctx.store, old, &prefix, deleted).await?;
        return Err(ExportError::Request(format!(
            "the deletion of interrupted run {old}'s archived day {day} stopped with {left} of its events still stored ({deleted} deleted now); its partition's files hold every one of them, so keep the partition. The next archive run tries again"
        )));
    }
    // The run's own files, as every partition lists them (from the root), not the
    // manifest's names (from the partition).
    let own: Vec<String> = files.iter().map(|(key, ..)| key.clone()).collect();
    history::partition_published_once(&ctx.store, old, &prefix, rows.max(0) as u64, &own).await?;
    history::pending_deleted(&ctx.store, old, &prefix).await?;
    // Every event the run read is gone: those deleted now, and those it deleted itself
    // before it stopped, less what it counted then.
    let counted = p.get_i64("deleted").unwrap_or(0).max(0) as u64;
    let before = (rows.max(0) as u64)
        .saturating_sub(remaining)
        .saturating_sub(counted);
    history::events_deleted(&ctx.store, old, before + deleted).await?;
    tracing::info!(job = %old, partition = %prefix, events = deleted, "completed the deletion of an interrupted archive");
    Ok(Recovered::Deleted(deleted))
}

/// Where a partition's symlink manifest goes: `KIND/_symlink_format_manifest/dt=DAY/manifest`,
/// one file URI a line, the layout Hive's `SymlinkTextInputFormat` reads (Athena, Trino,
/// Spark, Presto; Delta Lake writes the same). A table over it reads exactly the files
/// the partition's `_manifest.json` names, so it never counts a replaced part and a
/// new one together while a republish is under way, as a `*.parquet` glob may. Its
/// folder starts with `_`, so globs over the data skip it.
fn symlink_key(prefix: &str) -> Option<String> {
    let (kind, day) = prefix.split_once("/dt=")?;
    Some(format!("{kind}/_symlink_format_manifest/dt={day}/manifest"))
}

/// Writes the symlink manifest of `prefix` from its `_manifest.json` (or removes it when
/// the partition has none). Written right after `_manifest.json`, while the parts it
/// replaces are still there, so it never names a file already removed.
async fn put_symlink(
    ctx: &ExportContext,
    prefix: &str,
    manifest: Option<&serde_json::Value>,
) -> Result<(), StorageError> {
    let Some(key) = symlink_key(prefix) else {
        return Ok(());
    };
    match manifest {
        Some(m) => {
            let body: String = manifest_paths(m)
                .iter()
                .map(|name| format!("{}\n", ctx.dest.uri(&format!("{prefix}/{name}"))))
                .collect();
            ctx.dest.put_bytes(&key, body.into_bytes()).await
        }
        None => ctx.dest.delete(std::slice::from_ref(&key)).await,
    }
}

/// The file names a parsed manifest lists.
fn manifest_paths(manifest: &serde_json::Value) -> Vec<String> {
    manifest["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["path"].as_str().map(str::to_string))
        .collect()
}

/// A lease in `job_locks` (`_id` names what it guards), renewed while its holder lives;
/// a dead holder's lease lapses after `LOCK_LEASE`.
struct Lock {
    renew: tokio::task::JoinHandle<()>,
    id: String,
    owner: String,
    /// Released by lapsing instead of deleting, so its note stays for a repair.
    keep_note: std::sync::atomic::AtomicBool,
    /// Tests: the holder "died": nothing is released.
    abandoned: std::sync::atomic::AtomicBool,
}

const LOCK_LEASE: Duration = Duration::from_secs(60);

/// A publish lease's note of the partition being changed (see [`Lock::note_publishing`]).
const PUBLISHING_NOTE: &str = "publishing";

impl Lock {
    /// Takes the lock `id` for `owner` if it is free or lapsed; else answers its holder's
    /// record.
    async fn try_take(
        store: &Store,
        id: &str,
        owner: &str,
    ) -> Result<Result<Self, Document>, ExportError> {
        let locks = store.lease_collection(c::JOB_LOCKS);
        let failed = |source| ExportError::Read {
            partition: c::JOB_LOCKS.into(),
            source,
        };
        // The unique `_id` makes the race have one winner.
        let taken = locks
            .update_one(
                doc! { common::ID: id, "expiresAt": { "$lt": store.now() } },
                doc! { "$set": { "owner": owner, "expiresAt": store.now_plus(LOCK_LEASE) } },
            )
            .upsert(true)
            .await;
        match taken {
            Ok(_) => {}
            Err(e) if sluice_connectors::mongo::is_duplicate_key(&e) => {
                let holder = locks
                    .find_one(doc! { common::ID: id })
                    .await
                    .map_err(failed)?
                    .unwrap_or_default();
                return Ok(Err(holder));
            }
            Err(e) => return Err(failed(e)),
        }
        let (store, lock_id, holder) = (store.clone(), id.to_string(), owner.to_string());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_LEASE / 3).await;
                let _ = store
                    .lease_collection(c::JOB_LOCKS)
                    .update_one(
                        doc! { common::ID: &lock_id, "owner": &holder },
                        doc! { "$set": { "expiresAt": store.now_plus(LOCK_LEASE) } },
                    )
                    .await;
            }
        });
        Ok(Ok(Self {
            renew,
            id: id.to_string(),
            owner: owner.to_string(),
            keep_note: Default::default(),
            abandoned: Default::default(),
        }))
    }

    /// Notes on the lease the partition a publish is changing (`publishing: {dest,
    /// prefix}`): a lease that lapses with its note is an interrupted publish.
    async fn note_publishing(
        &self,
        store: &Store,
        dest: &str,
        prefix: &str,
    ) -> Result<(), ExportError> {
        let noted = store
            .lease_collection(c::JOB_LOCKS)
            .update_one(
                doc! { common::ID: &self.id, "owner": &self.owner },
                doc! { "$set": { PUBLISHING_NOTE: { "dest": dest, "prefix": prefix } } },
            )
            .await
            .map_err(|source| ExportError::Read {
                partition: c::JOB_LOCKS.into(),
                source,
            })?;
        if noted.matched_count == 0 {
            return Err(ExportError::Request(format!(
                "publishing `{prefix}` stopped: this run no longer holds the partition's publish lock"
            )));
        }
        Ok(())
    }

    /// Whether the lease carries a note of a publish that did not complete (taken over
    /// from a holder that died, or left by one whose undo failed).
    async fn noted(&self, store: &Store) -> Result<bool, ExportError> {
        store
            .lease_collection(c::JOB_LOCKS)
            .count_documents(doc! { common::ID: &self.id, PUBLISHING_NOTE: { "$exists": true } })
            .await
            .map(|n| n > 0)
            .map_err(|source| ExportError::Read {
                partition: c::JOB_LOCKS.into(),
                source,
            })
    }

    fn keep_note(&self) {
        self.keep_note
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn abandon(&self) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the lock again for this holder if it is still its own or has lapsed (the
    /// compare-and-set the lock is taken with), renewing its lease: checked before the
    /// steps of a publish that another holder's publish must not interleave with. False
    /// when another holder's lease holds it, or the store cannot tell.
    async fn reconfirm(&self, store: &Store) -> bool {
        store
            .lease_collection(c::JOB_LOCKS)
            .update_one(
                doc! {
                    common::ID: &self.id,
                    "$or": [ { "owner": &self.owner }, { "expiresAt": { "$lt": store.now() } } ],
                },
                doc! { "$set": { "owner": &self.owner, "expiresAt": store.now_plus(LOCK_LEASE) } },
            )
            .await
            .is_ok_and(|r| r.matched_count == 1)
    }

    async fn release(self, store: &Store) {
        self.renew.abort();
        if self.abandoned() {
            return;
        }
        let locks = store.lease_collection(c::JOB_LOCKS);
        let mine = doc! { common::ID: &self.id, "owner": &self.owner };
        let _ = if self.keep_note.load(std::sync::atomic::Ordering::Relaxed) {
            // Lapsed at once, its note kept: the next export run repairs what it guards.
            locks
                .update_one(mine, doc! { "$set": { "expiresAt": store.now() } })
                .await
                .map(|_| ())
        } else {
            locks.delete_one(mine).await.map(|_| ())
        };
    }
}

impl Drop for Lock {
    /// A holder dropped part-way (its process stopping) no longer renews the lease.
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// Keeps ARCHIVE to one run at a time across processes.
struct ArchiveLock(Lock);

impl ArchiveLock {
    async fn take(ctx: &ExportContext, job_id: &str) -> Result<Self, ExportError> {
        match Lock::try_take(&ctx.store, ExportJobType::Archive.as_str(), job_id).await? {
            Ok(lock) => Ok(Self(lock)),
            Err(holder) => Err(ExportError::Request(format!(
                "another ARCHIVE run ({}) is in progress until {}; archives run one at a time",
                holder.get_str("owner").unwrap_or("?"),
                holder
                    .get_datetime("expiresAt")
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ))),
        }
    }

    async fn release(self, ctx: &ExportContext) {
        self.0.release(&ctx.store).await;
    }
}

/// Fails unless `job_id` still holds the archive lock: checked before publishing a day
/// and before deleting events, so a run whose lease lapsed (its renewals failing while it worked) deletes nothing that
/// another archive, now holding the lock, may be undoing.
async fn ensure_archive_lock(ctx: &ExportContext, job_id: &str) -> Result<(), ExportError> {
    let held = ctx
        .store
        .lease_collection(c::JOB_LOCKS)
        .count_documents(doc! {
            common::ID: ExportJobType::Archive.as_str(),
            "owner": job_id,
            "expiresAt": { "$gt": ctx.store.now() },
        })
        .await
        .map_err(|source| ExportError::Read {
            partition: c::JOB_LOCKS.into(),
            source,
        })?;
    if held == 0 {
        return Err(ExportError::Request(
            "this archive lost its lock (its lease lapsed); it stops before publishing or deleting more, and the next archive finishes what it left".into(),
        ));
    }
    Ok(())
}

/// Hands back the archive lock if one of `owners` (export jobIds) holds it: for archives
/// stopped by a signal, so the next archive need not wait for the lease to lapse (an
/// archive that ends releases its own [`ArchiveLock`]).
pub async fn release_archive_lock(store: &Store, owners: &[String]) -> Result<u64, StoreError> {
    store
        .lease_collection(c::JOB_LOCKS)
        .delete_many(
            doc! { common::ID: ExportJobType::Archive.as_str(), "owner": { "$in": owners } },
        )
        .await
        .map(|r| r.deleted_count)
        .map_err(StoreError::mongo(c::JOB_LOCKS, "release the archive lock"))
}

type DocStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Document, ExportError>> + Send>>;

/// The events matching `filter`, in time order (see [`sorted_cursor`]).
async fn event_cursor(ctx: &ExportContext, filter: Document) -> Result<DocStream, ExportError> {
    sorted_cursor(ctx, c::EVENTS, filter, e::TIMESTAMP).await
}

/// The documents of `collection` matching `filter`, sorted on `field`. A cursor the server
/// closes (idle past its timeout, ten minutes on MongoDB, while a slow transform or upload
/// held the reader) is opened again from the last document's `field`, passing over the
/// documents of that value already read (by `_id`). Events sort on time alone, which the
/// time-series collection serves from its buckets, so events of one instant may come
/// back in another order; a unique sort key would make the server sort the day itself.
/// Documents stored meanwhile may be read by the new cursor, as the first could have.
async fn sorted_cursor(
    ctx: &ExportContext,
    collection: &'static str,
    filter: Document,
    field: &'static str,
) -> Result<DocStream, ExportError> {
    let read_err = move |source| ExportError::Read {
        partition: collection.into(),
        source,
    };
    let source = ctx.store.collection(collection);
    let open = move |filter: Document| {
        let source = source.clone();
        async move {
            source
                .find(filter)
                .sort(doc! { field: 1 })
                .batch_size(2000)
                .await
        }
    };
    let cursor = open(filter.clone()).await.map_err(read_err)?;
    let reading = SortedReading {
        cursor,
        filter,
        field,
        last: None,
        read_at_last: std::collections::HashSet::new(),
        resumable: true,
        reopened: 0,
    };
    Ok(Box::pin(futures_util::stream::try_unfold(
        reading,
        move |mut r| {
            let open = open.clone();
            async move {
                loop {
                    match r.cursor.try_next().await {
                        Ok(Some(d)) => {
                            r.reopened = 0;
                            if r.seen(&d) {
                                continue;
                            }
                            return Ok(Some((d, r)));
                        }
                        Ok(None) => return Ok(None),
                        Err(e)
                            if crate::import::cursor_lost(&e) && r.resumable && r.reopened < 3 =>
                        {
                            r.reopened += 1;
                            tracing::warn!(collection, "the export's cursor was closed by the server (idle too long while the run wrote); reading on from the last document read");
                            // From the last value on, in MongoDB's order across types:
                            // `$gte` alone compares within one type, and would pass over
                            // documents whose value is of a type sorting later.
                            let filter = match &r.last {
                                Some(v) => {
                                    doc! { "$and": [r.filter.clone(), crate::import::sorting_after(field, v, "$gte")] }
                                }
                                None => r.filter.clone(),
                            };
                            r.cursor = open(filter).await.map_err(read_err)?;
                        }
                        Err(e) => return Err(read_err(e)),
                    }
                }
            }
        },
    )))
}

/// An `_id` read at the last sort value: an ObjectId (what the server gives events) by its
/// twelve bytes, with no allocation (a day imported at one instant holds a key per event),
/// anything else by its BSON encoding.
#[derive(PartialEq, Eq, Hash)]
enum IdKey {
    ObjectId([u8; 12]),
    Other(Vec<u8>),
}

/// Where a sorted read is, to open it again.
struct SortedReading {
    cursor: mongodb::Cursor<Document>,
    filter: Document,
    field: &'static str,
    /// The sort value of the last document read, and the `_id`s of those read with it.
    last: Option<Bson>,
    read_at_last: std::collections::HashSet<IdKey>,
    /// False once a document was read without an `_id`, or whose sort value is neither a
    /// date nor a string (an event's `timestamp` always is a date, a user's `visitorId` a
    /// string): the value a read goes on from is one whose place in MongoDB's order across
    /// types is plain (not null or missing, not an array, whose place is its smallest
    /// element, not a number, whose types compare as one).
    resumable: bool,
    reopened: u32,
}

impl SortedReading {
    /// Whether `d` was read before the cursor was opened again; otherwise notes it read.
    fn seen(&mut self, d: &Document) -> bool {
        let value = d.get(self.field);
        let (Some(v @ (Bson::DateTime(_) | Bson::String(_))), Some(id)) =
            (value, d.get(common::ID))
        else {
            self.resumable = false;
            return false;
        };
        let key = match id {
            Bson::ObjectId(o) => IdKey::ObjectId(o.bytes()),
            other => IdKey::Other(bson::to_vec(&doc! { "": other.clone() }).unwrap_or_default()),
        };
        if self.last.as_ref() == Some(v) {
            !self.read_at_last.insert(key)
        } else {
            self.last = Some(v.clone());
            // Clearing costs the set's capacity, every time: one grown by a large tie
            // (a day imported at one instant) is let go instead.
            if self.read_at_last.capacity() > 1024 {
                self.read_at_last = std::collections::HashSet::new();
            } else {
                self.read_at_last.clear();
            }
            self.read_at_last.insert(key);
            false
        }
    }
}

/// Days holding events older than `cutoff` (exclusive), oldest first.
async fn archive_days(
    ctx: &ExportContext,
    cutoff: NaiveDate,
) -> Result<Vec<NaiveDate>, ExportError> {
    let read_err = |source| ExportError::Read {
        partition: "events".into(),
        source,
    };
    let found: Vec<Document> = ctx
        .store
        .collection(c::EVENTS)
        .aggregate(vec![
            doc! { "$match": { e::TIMESTAMP: { "$lt": day_start(cutoff) } } },
            doc! { "$group": { "_id": { "$dateToString": { "format": "%Y-%m-%d", "date": "$timestamp" } } } },
            doc! { "$sort": { "_id": 1 } },
        ])
        .await
        .map_err(read_err)?
        .try_collect()
        .await
        .map_err(read_err)?;
    Ok(found
        .iter()
        .filter_map(|d| d.get_str("_id").ok())
        .filter_map(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .collect())
}

/// The design document's daily-analytics query over the window, plus page views, the
/// top 10 pages and the purchases and revenue per currency of each day.
async fn daily_rows(
    ctx: &ExportContext,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<Document>, ExportError> {
    let read_err = |source| ExportError::Read {
        partition: "daily analytics".into(),
        source,
    };
    let window = doc! { "$gte": day_start(from), "$lt": day_start(next_day(to)) };
    let day = event_day();
    let events = ctx.store.collection(c::EVENTS);
    // Distinct values are counted by grouping on them (see `distinct_per_day`), on disk
    // if a group outgrows memory, so a page with millions of visitors still aggregates.
    let run = |pipeline: Vec<Document>| {
        let events = events.clone();
        async move {
            events
                .aggregate(pipeline)
                .allow_disk_use(true)
                .await
                .map_err(read_err)?
                .try_collect::<Vec<Document>>()
                .await
                .map_err(read_err)
        }
    };
    let in_window = doc! { "$match": counted_events(window.clone()) };
    let totals = run(vec![
        in_window.clone(),
        doc! { "$group": {
            "_id": day.clone(),
            "events": { "$sum": 1 },
            "pageViews": { "$sum": { "$cond": [ { "$eq": ["$eventType", EventType::PageView.as_str()] }, 1, 0 ] } },
        } },
        doc! { "$sort": { "_id": 1 } },
    ])
    .await?;
    let users = run(distinct_per_day(&in_window, e::USER_ID)).await?;
    let sessions = run(distinct_per_day(&in_window, e::SESSION_ID)).await?;
    let pages = run(vec![
        // A page view without a page counts in `pageViews`, but is no top page.
        doc! { "$match": {
            e::EVENT_TYPE: EventType::PageView.as_str(),
            e::PAGE_URL: { "$type": "string" },
            "$and": [counted_events(window)],
        } },
        doc! { "$group": {
            "_id": { "day": day, "pageUrl": "$pageUrl", "userId": "$userId" },
            "views": { "$sum": 1 },
        } },
        doc! { "$group": {
            "_id": { "day": "$_id.day", "pageUrl": "$_id.pageUrl" },
            "views": { "$sum": "$views" },
            "uniqueUsers": { "$sum": 1 },
        } },
        // The ten most viewed of each day (ties by URL), chosen by the server.
        doc! { "$group": {
            "_id": "$_id.day",
            "top": { "$topN": {
                "n": 10,
                "sortBy": { "views": -1, "_id.pageUrl": 1 },
                "output": { "pageUrl": "$_id.pageUrl", "views": "$views", "uniqueUsers": "$uniqueUsers" },
            } },
        } },
    ])
    .await?;
    let revenue = run(revenue_per_day(&in_window)).await?;
    let int = sluice_core::model::count_in;
    let by_day = |rows: &[Document]| -> std::collections::HashMap<String, i64> {
        rows.iter()
            .filter_map(|r| Some((r.get_str(common::ID).ok()?.to_string(), int(r, "n"))))
            .collect()
    };
    let (users, sessions) = (by_day(&users), by_day(&sessions));
    let tops: std::collections::HashMap<String, Vec<Bson>> = pages
        .iter()
        .filter_map(|p| {
            let date = p.get_str(common::ID).ok()?.to_string();
            let top = p
                .get_array("top")
                .ok()?
                .iter()
                .filter_map(Bson::as_document)
                .map(|t| {
                    Bson::Document(doc! {
                        pc::PAGE_URL: t.get("pageUrl").cloned().unwrap_or(Bson::Null),
                        pc::VIEWS: int(t, "views"),
                        pc::UNIQUE_USERS: int(t, "uniqueUsers"),
                    })
                })
                .collect();
            Some((date, top))
        })
        .collect();
    Ok(totals
        .iter()
        .map(|t| {
            let date = t.get_str(common::ID).unwrap_or_default().to_string();
            let (purchases, revenue) = day_revenue(&revenue, &date);
            doc! {
                pc::DATE: &date,
                pc::EVENTS: int(t, "events"),
                pc::UNIQUE_USERS: users.get(&date).copied().unwrap_or(0),
                pc::UNIQUE_SESSIONS: sessions.get(&date).copied().unwrap_or(0),
                pc::PAGE_VIEWS: int(t, "pageViews"),
                pc::TOP_PAGES: tops.get(&date).cloned().unwrap_or_default(),
                pc::PURCHASES: purchases,
                pc::REVENUE: revenue,
            }
        })
        .collect())
}

/// The purchases among the events the `$match` stage `in_window` selects (as
/// [`daily_rows`] counts them), per day and currency (`properties.currency` when it is a
/// string, else none), and their revenue: each `properties.amount` that is a number as a visitor's
/// total reads one (a double or an integer, not a decimal) within ±9e12, rounded to the
/// millionth half away from zero as that total rounds it, and summed exactly. A purchase
/// without such an amount counts in `purchases` and adds no revenue. Sorted by day and
/// currency.
pub fn revenue_per_day(in_window: &Document) -> Vec<Document> {
    let mut purchases = in_window.clone();
    if let Ok(filter) = purchases.get_document_mut("$match") {
        filter.insert(e::EVENT_TYPE, EventType::Purchase.as_str());
    }
    let amount = "$properties.amount";
    let priced = doc! { "$and": [
        { "$in": [{ "$type": amount }, ["double", "int", "long"]] },
        { "$gte": [amount, -9e12] },
        { "$lte": [amount, 9e12] },
    ] };
    // Rounded as Rust's `f64::round` does, exactly: the whole part, one more (away from
    // zero) when the fraction is at least a half. (Adding a half and truncating rounds
    // twice where the millionths pass 2^52.)
    let scaled = doc! { "$multiply": [amount, sluice_core::aggregate::REVENUE_SCALE] };
    let micros = doc! { "$toLong": { "$let": {
        "vars": { "x": scaled.clone(), "t": { "$trunc": [scaled, 0] } },
        "in": { "$add": ["$$t", { "$cond": [
            { "$gte": [{ "$abs": { "$subtract": ["$$x", "$$t"] } }, 0.5] },
            { "$cond": [{ "$gte": ["$$x", 0] }, 1, -1] },
            0,
        ] }] },
    } } };
    let currency = "$properties.currency";
    vec![
        purchases,
        doc! { "$group": {
            "_id": {
                "day": event_day(),
                "currency": { "$cond": [{ "$eq": [{ "$type": currency }, "string"] }, currency, Bson::Null] },
            },
            "purchases": { "$sum": 1 },
            "micros": { "$sum": { "$cond": [priced, micros, 0i64] } },
        } },
        doc! { "$sort": { "_id.day": 1, "_id.currency": 1 } },
    ]
}

/// The purchases of `date` among [`revenue_per_day`]'s rows, and its revenue entries.
pub fn day_revenue(rows: &[Document], date: &str) -> (i64, Vec<Bson>) {
    let int = sluice_core::model::count_in;
    let mut purchases = 0;
    let entries = rows
        .iter()
        .filter_map(|r| {
            let id = r.get_document(common::ID).ok()?;
            (id.get_str("day").ok()? == date).then(|| {
                purchases += int(r, "purchases");
                // Read as the integer it is (through a double, a sum past 2^53 would be
                // rounded); a sum past 64 bits is a double on the server: held at the
                // bound.
                let micros = r.get("micros").map_or(0, |m| {
                    sluice_core::model::int_of(m)
                        .or_else(|| sluice_core::model::number_of(m).map(|x| x as i64))
                        .unwrap_or(0)
                });
                Bson::Document(doc! {
                    pc::CURRENCY: id.get_str("currency").ok(),
                    pc::PURCHASES: int(r, "purchases"),
                    pc::REVENUE_MICROS: micros,
                })
            })
        })
        .collect();
    (purchases, entries)
}

/// The day of a partition's prefix (`TYPE/dt=YYYY-MM-DD`, as [`stage`] names it).
fn partition_day(prefix: &str) -> Option<NaiveDate> {
    let (_, day) = prefix.rsplit_once("/dt=")?;
    NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()
}

/// Reads one partition through the pipeline and stages its parts.
async fn stage(
    ctx: &ExportContext,
    job_id: &str,
    kind: ExportJobType,
    day: NaiveDate,
    table: &'static TableSpec,
    mut docs: DocStream,
    delete_filter: Option<Document>,
) -> Result<Staged, ExportError> {
    let prefix = format!("{}/dt={day}", kind.as_str());
    let work = ctx.work_dir.join(format!("{WORK_PREFIX}{job_id}-{day}"));
    // Created in this poll, with its guard (one local mkdir): `tokio::fs` would create it
    // on a blocking thread that finishes even when the run is cancelled meanwhile, leaving
    // a folder no guard removes.
    std::fs::create_dir_all(&work).map_err(|e| ExportError::Encode {
        partition: prefix.clone(),
        message: e.to_string(),
    })?;
    // Shared with the encoder: a cancelled stage leaves the encoder finishing the batch it
    // holds in the folder, and the folder goes when the last of them does.
    let work_folder = Arc::new(WorkFolder::new(work.clone()));
    let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Document>>(4);
    let (part_tx, mut part_rx) = mpsc::channel::<LocalPart>(2);
    // Dead letters are kept as they come, a chunk at a time: a plugin failing every event
    // of a large day must not hold them all in memory until the day is staged.
    let (letter_tx, mut letter_rx) = mpsc::channel::<Vec<DeadLetter>>(2);

    // An archive is a move: every event deleted must be in the files, so no transform may
    // drop, split or change records on the way.
    let archiving = delete_filter.is_some();
    let spool = if archiving {
        let path = ctx
            .work_dir
            .join(format!("{WORK_PREFIX}{job_id}-{day}.ids"));
        Some(IdSpool::create(path).map_err(|e| ExportError::Encode {
            partition: prefix.clone(),
            message: format!("cannot spool the archived eventIds: {e}"),
        })?)
    } else {
        None
    };
    // Set once something keeps the day from being archived (by the reader, or the encoder
    // for a value its column would not hold whole): from then on the encoder only checks
    // what it is sent, for the error to name everything in the way.
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let encoder = {
        let transforms = export_transforms(ctx, kind);
        let refused = refused.clone();
        let options = ctx.part_options.clone();
        let progress = ctx.progress.clone();
        let work = work.clone();
        let work_folder = work_folder.clone();
        let partition = prefix.clone();
        let mut spool = spool;
        type Encoded = (Vec<DeadLetter>, Option<IdSpool>, Dropped, Unarchivable);
        tokio::task::spawn_blocking(move || -> Result<Encoded, ExportError> {
            let _work_folder = work_folder;
            let enc = |message: String| ExportError::Encode {
                partition: partition.clone(),
                message,
            };
            let mut writer =
                PartWriter::new(sluice_connectors::parquet::schema_of(table), &work, options);
            let mut dead_letters = Vec::new();
            let mut dropped = Dropped::default();
            let mut warned_skipping = false;
            let mut warned_unfit = false;
            // Events holding a field no column holds (written by another tool), and the
            // first of them: an EVENT_DATA file leaves the field out, and says so once.
            // Here rather than in the reader, which is what an export waits on.
            let mut uncovered: (u64, Option<String>) = (0, None);
            let events_table = !archiving && table.name == EVENT_TABLE.name;
            let mut unarchivable = Unarchivable::default();
            while let Some(batch) = batch_rx.blocking_recv() {
                let applied = apply_chain(&transforms, batch)?;
                dropped.skipped += applied.skipped.len() as u64;
                dropped.dead_lettered += applied.dead_letters.len() as u64;
                progress
                    .rows_dead_lettered
                    .fetch_add(applied.dead_letters.len() as u64, Relaxed);
                dead_letters.extend(applied.dead_letters);
                if let Some(first) = applied.skipped.first() {
                    // Once per day's staging: the count is in the run's record.
                    if !warned_skipping {
                        tracing::warn!(partition = %partition, plugin = %first.transform, reason = %first.reason, "a plugin skipped records under the skip-batch policy; they are not written (counted in the run's rowsSkipped)");
                        warned_skipping = true;
                    }
                    progress
                        .rows_skipped
                        .fetch_add(applied.skipped.len() as u64, Relaxed);
                }
                if dead_letters.len() >= LETTERS_PER_WRITE
                    && letter_tx
                        .blocking_send(std::mem::take(&mut dead_letters))
                        .is_err()
                {
                    // keeping them failed; its error is reported
                    return Ok((Vec::new(), None, dropped, unarchivable));
                }
                let records = applied.records;
                // What an archive writes must hold every value whole: the events are
                // deleted once it is published.
                let exact = if archiving && !refused.load(std::sync::atomic::Ordering::Acquire) {
                    match sluice_connectors::parquet::encode_exact(table, &records) {
                        Ok(batch) => Some(batch),
                        Err(_) => {
                            refused.store(true, std::sync::atomic::Ordering::Release);
                            None
                        }
                    }
                } else {
                    None
                };
                if archiving && exact.is_none() {
                    // Nothing more is written: what in this batch is in the way is noted.
                    // (A clean batch costs one encoding; only a failing one is gone
                    // through a document and a column at a time.)
                    if let Err(err) = sluice_connectors::parquet::encode_exact(table, &records) {
                        let mut named = false;
                        for doc in &records {
                            let which = doc.get_str(e::EVENT_ID).unwrap_or("?");
                            for (what, value) in
                                sluice_connectors::parquet::inexact_values(table, doc)
                            {
                                named = true;
                                unarchivable.note(
                                    &format!("{what}, which its column would not hold whole"),
                                    1,
                                    || format!("event `{which}`: {value}"),
                                );
                            }
                        }
                        if !named {
                            // Not a value of one event (none failed alone): said as it is.
                            unarchivable.note(
                                &format!("a batch the encoder refused: {err}"),
                                records.len() as u64,
                                || "of the batch".to_string(),
                            );
                        }
                    }
                    continue;
                }
                // The rows to write, as the plugins left them (one a plugin dropped, or
                // rid of the field, loses nothing here).
                let checked: &[Document] = if events_table { &records } else { &[] };
                for doc in checked {
                    if let Some(field) = sluice_connectors::parquet::uncovered_field(table, doc) {
                        uncovered.0 += 1;
                        uncovered.1.get_or_insert_with(|| {
                            format!(
                                "event `{}` has `{field}`",
                                doc.get_str(e::EVENT_ID).unwrap_or("?")
                            )
                        });
                    }
                }
                if let Some(spool) = spool.as_mut() {
                    // The reader let through only events with a string eventId.
                    // With its time, so each delete looks only at the chunk's time range
                    // (`events` is time-series: there is no eventId index to go by).
                    for d in &records {
                        let Ok(id) = d.get_str(e::EVENT_ID) else {
                            continue;
                        };
                        let at = d
                            .get_datetime(e::TIMESTAMP)
                            .ok()
                            .map(|t| t.timestamp_millis());
                        spool
                            .push(id, at)
                            .map_err(|e| enc(format!("cannot spool the archived eventIds: {e}")))?;
                    }
                }
                let encoded = if let Some(batch) = exact {
                    batch
                } else {
                    let (encoded, unfit, odd) =
                        encode_or_set_aside(table, records).map_err(|e| enc(e.to_string()))?;
                    // Those set aside were not written, without their fields or at all.
                    if events_table {
                        uncovered.0 -= unfit
                            .iter()
                            .filter(|l| {
                                sluice_connectors::parquet::uncovered_field(table, &l.record)
                                    .is_some()
                            })
                            .count() as u64;
                    }
                    let odd = Unfitting {
                        values_nulled: odd.nulled,
                        values_converted: odd.converted,
                        rows_with_fields_left_out: 0,
                    };
                    dropped.unfitting.add(odd);
                    progress.add_unfitting(odd);
                    if let Some(first) = unfit.first() {
                        if !warned_unfit {
                            tracing::warn!(partition = %partition, reason = %first.reason, "documents that cannot be rows of the table were kept in dead_letters instead of exported (counted in the run's rowsRejected)");
                            warned_unfit = true;
                        }
                        progress
                            .rows_rejected
                            .fetch_add(unfit.len() as u64, Relaxed);
                        dropped.dead_lettered += unfit.len() as u64;
                        dead_letters.extend(unfit);
                    }
                    encoded
                };
                progress
                    .rows_written
                    .fetch_add(encoded.num_rows() as u64, Relaxed);
                if let Some(part) = writer.write(&encoded).map_err(|e| enc(e.to_string()))? {
                    if part_tx.blocking_send(part).is_err() {
                        // the uploader failed; its error is reported
                        return Ok((dead_letters, None, dropped, unarchivable));
                    }
                }
            }
            // A refused day uploads nothing more, its last part either.
            let refused_day = archiving && refused.load(std::sync::atomic::Ordering::Acquire);
            if !refused_day {
                if let Some(part) = writer.finish().map_err(|e| enc(e.to_string()))? {
                    let _ = part_tx.blocking_send(part);
                }
            }
            if let (n @ 1.., Some(example)) = uncovered {
                let left_out = Unfitting {
                    rows_with_fields_left_out: n,
                    ..Default::default()
                };
                dropped.unfitting.add(left_out);
                progress.add_unfitting(left_out);
                tracing::warn!(
                    partition = %partition,
                    events = n,
                    example = %example,
                    "events hold fields no column of `{}/v{}` holds; the files leave those fields out (ARCHIVE refuses such a day)",
                    table.name,
                    table.version
                );
            }
            if let Some(spool) = spool.as_mut() {
                spool
                    .finish()
                    .map_err(|e| enc(format!("cannot spool the archived eventIds: {e}")))?;
            }
            Ok((dead_letters, spool, dropped, unarchivable))
        })
    };

    let uploader = {
        let dest = ctx.dest.clone();
        let progress = ctx.progress.clone();
        let staging = format!("{}{prefix}", staging_prefix(job_id));
        async move {
            let mut parts = Vec::new();
            while let Some(part) = part_rx.recv().await {
                let key = format!("{staging}/part-{:05}.parquet", part.index);
                let result = dest.put_file(&key, &part.path).await;
                let _ = tokio::fs::remove_file(&part.path).await;
                result?;
                progress.bytes_uploaded.fetch_add(part.bytes, Relaxed);
                parts.push((
                    key,
                    LocalPartInfo {
                        index: part.index,
                        rows: part.rows,
                        bytes: part.bytes,
                        sha256: part.sha256,
                    },
                ));
            }
            Ok::<_, ExportError>(parts)
        }
    };

    let reader = async {
        let mut rows = 0u64;
        let mut buf = Vec::with_capacity(ctx.batch_rows);
        let mut buf_bytes = 0usize;
        let mut unarchivable = Unarchivable::default();
        while let Some(doc) = docs.try_next().await? {
            if archiving {
                // Deleted once archived: a field no column holds would be lost.
                let mut problems = Vec::new();
                let which = match doc.get_str(e::EVENT_ID) {
                    Ok(id) => format!("event `{id}`"),
                    Err(_) => {
                        problems.push("no string `eventId`".to_string());
                        format!("_id {}", doc.get(common::ID).cloned().unwrap_or(Bson::Null))
                    }
                };
                if let Some(field) = sluice_connectors::parquet::uncovered_field(table, &doc) {
                    problems.push(format!(
                        "`{field}`, which no column of `{}/v{}` holds",
                        table.name, table.version
                    ));
                }
                for what in &problems {
                    unarchivable.note(what, 1, || which.clone());
                }
                if !problems.is_empty() {
                    // Before the batch holding it is sent: the encoder writes nothing more
                    // and only checks the values of what it is sent.
                    refused.store(true, std::sync::atomic::Ordering::Release);
                }
                if doc.get_str(e::EVENT_ID).is_err() {
                    // Already named; its values are not checked.
                    continue;
                }
            }
            buf_bytes += approx_bytes(&doc);
            buf.push(doc);
            if buf.len() >= ctx.batch_rows || buf_bytes >= ctx.batch_bytes {
                buf_bytes = 0;
                rows += buf.len() as u64;
                ctx.progress.rows_read.fetch_add(buf.len() as u64, Relaxed);
                if batch_tx.send(std::mem::take(&mut buf)).await.is_err() {
                    // The encoder stopped; its error is reported.
                    return Ok((rows, unarchivable));
                }
                buf.reserve(ctx.batch_rows);
            }
        }
        if !buf.is_empty() {
            rows += buf.len() as u64;
            ctx.progress.rows_read.fetch_add(buf.len() as u64, Relaxed);
            let _ = batch_tx.send(buf).await;
        }
        drop(batch_tx);
        Ok::<_, ExportError>((rows, unarchivable))
    };

    let pipeline = format!("export:{}", kind.as_str());
    // (A rerun of the window keeps the same letters once: their ids come from their
    // content.)
    let keeper = async {
        while let Some(letters) = letter_rx.recv().await {
            if let Err(e) = ctx
                .store
                .keep_dead_letters(letters, &pipeline, Some(job_id))
                .await
            {
                // Closed, so the encoder's next send fails and it stops, rather than wait
                // for good on a receiver no one reads.
                letter_rx.close();
                return Err(e.into());
            }
        }
        Ok::<(), ExportError>(())
    };

    let (read, uploaded, kept) = tokio::join!(reader, uploader, keeper);
    let encoded = encoder.await.map_err(|e| ExportError::Encode {
        partition: prefix.clone(),
        message: e.to_string(),
    })?;
    let _ = tokio::fs::remove_dir_all(&work).await;
    // Report the first failure in pipeline order: reading, encoding, uploading.
    let (rows_read, mut unarchivable) = read?;
    kept?;
    let (dead_letters, archived_ids, dropped, types) = encoded?;
    // An upload that failed stopped the encoder early, so what it would name of a refused
    // day is partial: the upload's error comes first.
    let parts = uploaded?;
    unarchivable.merge(types);
    if !unarchivable.is_empty() {
        return Err(unarchivable.error(&prefix));
    }
    if archiving && archived_ids.as_ref().map(IdSpool::count) != Some(rows_read) {
        return Err(ExportError::Encode {
            partition: prefix,
            message: format!(
                "{rows_read} events were read but {} eventIds spooled; nothing was deleted",
                archived_ids.as_ref().map_or(0, IdSpool::count)
            ),
        });
    }
    // Every batch of this partition went through the chain and was staged: the last
    // letters are kept.
    ctx.store
        .keep_dead_letters(dead_letters, &pipeline, Some(job_id))
        .await?;
    // Rows were read and none was written, some because they failed (a plugin failing
    // them all under `dead-letter`, say one written for events in an export of users,
    // or skipping every batch under `skip-batch`): published, the partition would be
    // replaced by an empty one. The run fails instead; the partition stays as it was.
    // (Rows a plugin dropped on purpose, and none failed: the empty partition is meant.)
    let written: u64 = parts.iter().map(|(_, info)| info.rows).sum();
    if written == 0 && (dropped.dead_lettered > 0 || dropped.skipped > 0) {
        let failed = match (dropped.dead_lettered, dropped.skipped) {
            (d, 0) => format!("{d} failed and were kept in dead_letters"),
            (0, k) => format!("{k} were skipped with the batches a plugin failed (`skip-batch`)"),
            (d, k) => format!(
                "{d} failed and were kept in dead_letters, {k} were skipped with the batches a plugin failed (`skip-batch`)"
            ),
        };
        return Err(ExportError::Encode {
            partition: prefix,
            message: format!(
                "none of the {rows_read} rows read was written: {failed} (pipeline `{pipeline}`); nothing was published, the partition is left as it was"
            ),
        });
    }
    Ok(Staged {
        prefix,
        table,
        parts,
        rows_read,
        delete_filter,
        archived_ids,
        read_at: None,
        dropped,
        source_rows: None,
    })
}

/// Moves one staged partition into place (see the module docs for the order). If it fails
/// before the new manifest is written, the files it copied are removed and the partition's
/// `_SUCCESS` is put back: the partition stays as it was.
///
/// The publish runs in a task of its own: a run cancelled part-way (its scheduled run lost
/// its lease, or Ctrl-C / SIGTERM, which wait for publishes in flight, see
/// [`wait_for_publishes`]) still completes or undoes it, and never leaves a partition
/// without `_SUCCESS` holding files its manifest does not name.
async fn publish(
    ctx: &ExportContext,
    job_id: &str,
    kind: ExportJobType,
    s: &Staged,
) -> Result<PartitionSummary, ExportError> {
    let (ctx, job_id) = (ctx.clone(), job_id.to_string());
    let part = Publishable {
        prefix: s.prefix.clone(),
        table: s.table,
        parts: s.parts.clone(),
        read_at: s.read_at,
        rows_read: s.rows_read,
        dropped: s.dropped,
        source_rows: s.source_rows,
    };
    // One publish of a partition at a time, across runs and processes: two interleaved
    // publishes could each remove the other's files and leave a manifest naming files
    // that are gone.
    let lock_id = format!("publish:{}", ctx.dest.url(&s.prefix));
    let waiting = Instant::now();
    let lock = loop {
        match Lock::try_take(&ctx.store, &lock_id, &job_id).await? {
            Ok(lock) => break lock,
            Err(holder) if waiting.elapsed() < PUBLISH_WAIT => {
                tracing::info!(partition = %s.prefix, holder = holder.get_str("owner").unwrap_or("?"), "waiting for another run to finish publishing this partition");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(holder) => {
                return Err(ExportError::Request(format!(
                "partition `{}` was still being published by run {} after {} s; rerun the window",
                s.prefix,
                holder.get_str("owner").unwrap_or("?"),
                PUBLISH_WAIT.as_secs()
            )))
            }
        }
    };
    let publishing = PUBLISHING.enter();
    tokio::spawn(async move {
        let _publishing = publishing;
        // A lease taken over with the note of a publish that did not complete: that
        // partition is repaired first (this publish may keep the partition as it is).
        let repaired = match lock.noted(&ctx.store).await {
            Ok(true) => repair_partition(&ctx, &part.prefix).await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        let published = match repaired {
            Ok(()) => publish_now(&ctx, &job_id, kind, &part, &lock).await,
            Err(e) => {
                lock.keep_note();
                Err(e)
            }
        };
        lock.release(&ctx.store).await;
        let p = published?;
        // Recorded here, in the publish's own task: a run stopped meanwhile (its FAILED
        // record already written) still lists the partition it replaced. (ARCHIVE
        // records it once the day's events are deleted.)
        if kind != ExportJobType::Archive {
            history::partition_published(&ctx.store, &job_id, &p.prefix, p.rows, &p.files, p.kept)
                .await?;
        }
        Ok(p)
    })
    .await
    .map_err(|e| ExportError::Request(format!("publishing `{}` stopped: {e}", s.prefix)))?
}

/// Dead letters an export keeps per write (see [`stage`]).
const LETTERS_PER_WRITE: usize = 1_000;

/// See [`ExportContext::batch_bytes`]. With up to 5 batches between the reader and the
/// encoder, a run holds a few hundred MB at most, whatever the documents.
pub const BATCH_BYTES: usize = 64 << 20;

/// About what a document takes as BSON (its text columns take about as much), without
/// encoding it: strings and binaries by their length, other values a few bytes each.
pub(crate) fn approx_bytes(d: &Document) -> usize {
    5 + d
        .iter()
        .map(|(k, v)| k.len() + 2 + approx_value_bytes(v))
        .sum::<usize>()
}

fn approx_value_bytes(v: &Bson) -> usize {
    match v {
        Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => s.len() + 5,
        Bson::Document(d) => approx_bytes(d),
        Bson::Array(items) => {
            5 + items
                .iter()
                .map(|x| 4 + approx_value_bytes(x))
                .sum::<usize>()
        }
        Bson::Binary(b) => b.bytes.len() + 5,
        Bson::RegularExpression(r) => r.pattern.len() + r.options.len() + 2,
        _ => 8,
    }
}

/// The dead letters' `plugin` for documents an export could not make rows of.
pub const UNFIT_ROW: &str = "schema";

/// EVENT_DATA, USER_DATA, DAILY_ANALYTICS: encodes a batch. A document that cannot be a
/// row (a required column missing or unreadable, such as an event without `eventId`
/// or with a time out of range, written by another tool) is set aside as a dead letter
/// instead of failing the run: failing, it would stop every later scheduled day until
/// someone removed it. Each document is tried alone only once its batch has failed.
fn encode_or_set_aside(
    table: &'static TableSpec,
    records: Vec<Document>,
) -> Result<
    (
        RecordBatch,
        Vec<DeadLetter>,
        sluice_connectors::parquet::Unfitting,
    ),
    EncodeError,
> {
    match encode_counted(table, &records) {
        Ok((batch, odd)) => Ok((batch, Vec::new(), odd)),
        Err(EncodeError::Value { .. }) => {
            let mut fit = Vec::with_capacity(records.len());
            let mut unfit = Vec::new();
            for d in records {
                match fits(table, &d) {
                    Ok(()) => fit.push(d),
                    Err(e) => unfit.push(DeadLetter {
                        transform: UNFIT_ROW.into(),
                        reason: format!("not exported: {e}"),
                        record: d,
                    }),
                }
            }
            let (batch, odd) = encode_counted(table, &fit)?;
            Ok((batch, unfit, odd))
        }
        Err(e) => Err(e),
    }
}

/// How long a publish waits for another run's publish of the same partition.
const PUBLISH_WAIT: Duration = Duration::from_secs(10 * 60);

/// What [`publish`] moves into place.
struct Publishable {
    prefix: String,
    table: &'static TableSpec,
    parts: Vec<(String, LocalPartInfo)>,
    read_at: Option<DateTime>,
    rows_read: u64,
    dropped: Dropped,
    source_rows: Option<u64>,
}

/// Partitions being published by this process.
static PUBLISHING: std::sync::LazyLock<Arc<Tally>> = std::sync::LazyLock::new(Default::default);

/// Waits (at most `limit`) until no partition is being published; true if none is. A
/// process stopping calls it so that a publish its runs started completes or is undone
/// before the process exits.
pub async fn wait_for_publishes(limit: Duration) -> bool {
    PUBLISHING.wait_idle(limit).await
}

async fn publish_now(
    ctx: &ExportContext,
    job_id: &str,
    kind: ExportJobType,
    s: &Publishable,
    lock: &Lock,
) -> Result<PartitionSummary, ExportError> {
    let lost = || {
        ExportError::Request(format!(
            "publishing `{}` stopped: this run no longer holds the partition's publish lock (MongoDB did not renew it); the partition is left to the run that holds it",
            s.prefix
        ))
    };
    let dir = format!("{}/", s.prefix);
    let success = format!("{dir}_SUCCESS");
    let manifest_key = format!("{dir}_manifest.json");
    let existing = ctx.dest.list(&dir).await?;
    let had_success = existing.iter().any(|o| o.key == success);
    let additive = kind == ExportJobType::Archive;
    // The partition's manifest as it is, read once: what an empty rerun compares with, what
    // an archive adds to, and what is put back if this publish is undone (a manifest
    // written whose answer was lost would otherwise name removed files).
    let old_manifest = if existing.iter().any(|o| o.key == manifest_key) {
        Some(ctx.dest.get_bytes(&manifest_key).await?)
    } else {
        None
    };
    // Parsed once: what an empty rerun compares with, whose read time a rerun is
    // compared with, and what an archive adds to.
    let old_json = old_manifest
        .as_deref()
        .map(serde_json::from_slice::<serde_json::Value>);
    let published = old_json.as_ref().and_then(|r| r.as_ref().ok());
    let new_rows: u64 = s.parts.iter().map(|(_, i)| i.rows).sum();
    // A count of the published manifest an additive publish adds to (`or`, when it has
    // none: a manifest written before the count was kept).
    let earlier = |field: &str, or: &str| -> u64 {
        let Some(m) = published.filter(|_| additive) else {
            return 0;
        };
        m[field].as_u64().or_else(|| m[or].as_u64()).unwrap_or(0)
    };
    let keep = || {
        Ok(PartitionSummary {
            prefix: s.prefix.clone(),
            files: Vec::new(),
            rows: 0,
            kept: true,
        })
    };
    if !additive {
        // A rerun that finds nothing where rows were published (the day's events were
        // archived or deleted since, or the run reads another database) would empty the
        // partition a warehouse reads: it is kept. A DAILY_ANALYTICS day has a row
        // either way: its events are compared (a manifest from before they were kept
        // counts as holding some).
        let (read, old, what) = match s.source_rows {
            Some(events) => {
                let old = published.map(|m| m["sourceRows"].as_u64().unwrap_or(u64::MAX));
                (events, old.unwrap_or(0), "events")
            }
            // The rows read, before the transforms: a run whose filter drops every row
            // read publishes the empty partition it means to (a new bot or opt-out
            // filter takes effect on a day whatever it leaves).
            None => {
                let old = published.and_then(|m| m["rows"].as_u64()).unwrap_or(0);
                (s.rows_read, old, "rows")
            }
        };
        if read == 0 && old > 0 {
            let were = if old == u64::MAX {
                format!("{what} were")
            } else {
                format!("{old} were")
            };
            tracing::warn!(
                partition = %s.prefix,
                "this run read no {what} where {were} published (archived or deleted since, or another database?); the published partition is kept, delete it to replace it"
            );
            return keep();
        }
        // A run that began reading before the published one (a slow backfill overtaken
        // by the schedule's republish of a late day) would put an older snapshot over a
        // newer one, and the late events the newer one holds would be lost for good (the
        // day's mark says they were published): kept out.
        let published_read_at = published
            .and_then(|m| m["readAt"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        if let (Some(ours), Some(theirs)) = (s.read_at, published_read_at) {
            if theirs > ours.timestamp_millis() {
                tracing::warn!(
                    partition = %s.prefix,
                    "a run that began reading later has published this partition already; its newer snapshot is kept"
                );
                return keep();
            }
        }
    }
    let mut files: Vec<serde_json::Value> = Vec::new();
    if additive {
        match &old_json {
            Some(Err(e)) => {
                return Err(ExportError::Verify {
                    key: manifest_key.clone(),
                    message: e.to_string(),
                })
            }
            Some(Ok(old)) => files.extend(old["files"].as_array().cloned().unwrap_or_default()),
            None => {}
        }
    }
    // From here the partition is changed: the lease says what it guards, so that if
    // this process dies before the publish completes or is undone, the next export run to
    // this destination repairs the partition (see `repair_interrupted_publishes`).
    if !additive {
        lock.note_publishing(&ctx.store, &ctx.dest.url(""), &s.prefix)
            .await?;
    }
    // Past the note, a failure that leaves the partition without `_SUCCESS` keeps the
    // note, so the next run to this destination repairs it once the lease lapses
    // (dropped with the lease, a USER_DATA day nobody reruns stayed without it).
    let noted_failure = |e: StorageError| {
        if !additive {
            lock.keep_note();
        }
        ExportError::from(e)
    };
    ctx.dest
        .delete(std::slice::from_ref(&success))
        .await
        .map_err(noted_failure)?;
    let names: Vec<String> = s
        .parts
        .iter()
        .map(|(_, info)| part_name(job_id, info.index))
        .collect();
    let mut copied = Vec::new();
    let lock_lost = std::sync::atomic::AtomicBool::new(false);
    let placed = async {
        for ((staged_key, info), name) in s.parts.iter().zip(&names) {
            if ctx.die_after_copies == Some(copied.len() as u64) {
                lock.abandon();
                return Err(ExportError::Request(format!(
                    "publishing `{}` died after {} files (test hook)",
                    s.prefix,
                    copied.len()
                )));
            }
            if ctx.fail_after_copies == Some(copied.len() as u64) {
                return Err(ExportError::Request(format!(
                    "publishing `{}` stopped after {} files (test hook)",
                    s.prefix,
                    copied.len()
                )));
            }
            let key = format!("{dir}{name}");
            ctx.dest.copy(staged_key, &key).await?;
            copied.push(key);
            files.push(
                json!({ "path": name, "rows": info.rows, "bytes": info.bytes, "sha256": info.sha256 }),
            );
        }
        let rows: u64 = files.iter().filter_map(|f| f["rows"].as_u64()).sum();
        let mut manifest = json!({
            "type": kind.as_str(),
            "partition": s.prefix,
            "jobId": job_id,
            "createdAt": ctx.store.now().to_chrono().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "readAt": s.read_at.map(|t| t.to_chrono().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            "rows": rows,
            // What a reconciliation against MongoDB needs: rows read, and those not
            // written (export transforms may also filter or fan out rows). An archive
            // adds to the partition, so to its counts too (a manifest from before these
            // counts read all its rows).
            "rowsRead": s.rows_read + earlier("rowsRead", "rows"),
            "rowsSkipped": s.dropped.skipped + earlier("rowsSkipped", ""),
            "rowsDeadLettered": s.dropped.dead_lettered + earlier("rowsDeadLettered", ""),
            // What of the rows was not written as read (see `Unfitting`).
            "valuesNulled": s.dropped.unfitting.values_nulled + earlier("valuesNulled", ""),
            "valuesConverted": s.dropped.unfitting.values_converted + earlier("valuesConverted", ""),
            "rowsWithFieldsLeftOut": s.dropped.unfitting.rows_with_fields_left_out + earlier("rowsWithFieldsLeftOut", ""),
            "transforms": export_transforms(ctx, kind)
                .iter()
                .map(|t| t.name().to_string())
                .collect::<Vec<_>>(),
            "schema": schema_description(s.table),
            "files": files,
        });
        if let Some(events) = s.source_rows {
            manifest["sourceRows"] = json!(events);
        }
        // A day read before it had ended (today's, say) holds only its events so far:
        // `_SUCCESS` says the partition is whole as published, this says the day was not.
        // (Its last events still in a writer's queue when a run reads just after midnight
        // mark the day late as they are stored, and it is published again.)
        if matches!(kind, ExportJobType::EventData | ExportJobType::DailyAnalytics) {
            let ended = partition_day(&s.prefix)
                .and_then(|d| d.succ_opt())
                .zip(s.read_at)
                .map(|(next, read)| read >= day_start(next));
            if let Some(ended) = ended {
                manifest["dayEnded"] = json!(ended);
            }
        }
        let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        if ctx.lose_lock_after_copies {
            ctx.store
                .lease_collection(c::JOB_LOCKS)
                .update_one(
                    doc! { common::ID: &lock.id },
                    doc! { "$set": { "owner": "another-run" } },
                )
                .await
                .map_err(|source| ExportError::Read {
                    partition: c::JOB_LOCKS.into(),
                    source,
                })?;
        }
        if !lock.reconfirm(&ctx.store).await {
            lock_lost.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(lost());
        }
        ctx.dest.put_bytes(&manifest_key, body).await?;
        put_symlink(ctx, &s.prefix, Some(&manifest)).await?;
        if ctx.die_after_manifest {
            lock.abandon();
            return Err(ExportError::Request(format!(
                "publishing `{}` died after its manifest (test hook)",
                s.prefix
            )));
        }
        if ctx.fail_after_manifest {
            return Err(ExportError::Request(format!(
                "publishing `{}` stopped after its manifest (test hook)",
                s.prefix
            )));
        }
        Ok::<(), ExportError>(())
    }
    .await;
    if let Err(err) = placed {
        if lock.abandoned() {
            return Err(err);
        }
        if lock_lost.load(std::sync::atomic::Ordering::Relaxed) {
            // Another run may hold the partition now: remove only this run's own copies
            // and leave the manifest and `_SUCCESS` to it.
            if let Err(e) = remove_unnamed(ctx, &copied).await {
                tracing::warn!(partition = %s.prefix, error = %e, "copies of a publish that lost its lock not removed; the next run removes them");
            }
            return Err(err);
        }
        // Undo: the old manifest, put back as it was, describes the partition again.
        let undone = async {
            match &old_manifest {
                Some(bytes) => ctx.dest.put_bytes(&manifest_key, bytes.clone()).await?,
                None => ctx.dest.delete(std::slice::from_ref(&manifest_key)).await?,
            }
            // A manifest that does not parse names nothing to link: the symlink is
            // removed (it may name this publish's copies, removed next).
            match &old_json {
                Some(Ok(old)) => put_symlink(ctx, &s.prefix, Some(old)).await?,
                Some(Err(_)) | None => put_symlink(ctx, &s.prefix, None).await?,
            }
            // The old manifest is back and does not name them.
            remove_unnamed(ctx, &copied).await?;
            if had_success {
                ctx.dest.put_bytes(&success, Vec::new()).await?;
            }
            Ok::<(), StorageError>(())
        }
        .await;
        if let Err(e) = undone {
            lock.keep_note();
            tracing::error!(partition = %s.prefix, error = %e, "a failed publish could not be undone: the next export run to this destination repairs the partition (its parts no manifest names removed, its `_SUCCESS` put back)");
        }
        return Err(err);
    }
    // The manifest names the new files: what follows only completes the partition, and
    // is left to the run holding the lock if this one lost it meanwhile.
    if !lock.reconfirm(&ctx.store).await {
        return Err(lost());
    }
    if !additive {
        let stale: Vec<String> = existing
            .iter()
            .map(|o| o.key.clone())
            .filter(|k| k.ends_with(".parquet") && !copied.contains(k))
            .collect();
        // The manifest already names exactly the new files, which is what readers read:
        // an old part that cannot be removed now is recorded, and removed by the next
        // export run to this destination (readers globbing `*.parquet` would count it
        // meanwhile). With a grace period it is removed once that has passed.
        let stale = retire(ctx, stale).await;
        if let Err(e) = remove_unnamed(ctx, &stale).await {
            tracing::warn!(partition = %s.prefix, error = %e, "earlier parts not removed; the partition's manifest names only the new ones, and the next export run removes them");
        }
    }
    let put = if ctx.fail_success_put {
        Err(StorageError::Op {
            backend: "test",
            key: success.clone(),
            operation: "put",
            message: "failing as asked (test hook)".into(),
        })
    } else {
        ctx.dest.put_bytes(&success, Vec::new()).await
    };
    put.map_err(noted_failure)?;
    Ok(PartitionSummary {
        prefix: s.prefix.clone(),
        files: copied,
        rows: new_rows,
        kept: false,
    })
}

/// ARCHIVE: verify the published files, then delete exactly the documents read.
async fn archive_delete(
    ctx: &ExportContext,
    job_id: &str,
    s: &Staged,
    p: &PartitionSummary,
) -> Result<u64, ExportError> {
    let Some(filter) = &s.delete_filter else {
        return Ok(0);
    };
    // Read back whole and hashed: the events' only copy from here on is what the store
    // returns, so its content is checked, not only its size (an upload without checksums,
    // `checksums = false`, is checked nowhere else).
    for ((_, info), key) in s.parts.iter().zip(&p.files) {
        let found = ctx.dest.sha256(key).await?;
        if found.as_ref() != Some(&(info.bytes, info.sha256.clone())) {
            let found = match found {
                Some((bytes, sha256)) => format!("{bytes} bytes with sha256 {sha256}"),
                None => "no file".to_string(),
            };
            return Err(ExportError::Verify {
                key: key.clone(),
                message: format!(
                    "expected {} bytes with sha256 {}, found {found}; nothing deleted",
                    info.bytes, info.sha256
                ),
            });
        }
    }
    let Some(spool) = &s.archived_ids else {
        return Ok(0);
    };
    let deleted = delete_spooled(ctx, &s.prefix, filter, spool).await?;
    if deleted < s.rows_read {
        // Some of what was read is still stored (a delete acknowledged by a primary that
        // then stepped down, say) or was deleted by someone else meanwhile. Still stored,
        // the day must stay pending: marked done, the next archive would read those
        // events again into a second copy in the partition. Failing here keeps its
        // `pendingDeletes` entry, so the next run finishes the deletion.
        let left = ctx
            .store
            .collection(c::EVENTS)
            .count_documents(filter.clone())
            .await
            .map_err(|source| ExportError::Read {
                partition: s.prefix.clone(),
                source,
            })?;
        if left > 0 {
            history::pending_events_deleted(&ctx.store, job_id, &s.prefix, deleted).await?;
            return Err(ExportError::Request(format!(
                "the archive of {} deleted {deleted} of the {} events it read and published; {left} of them are still stored. The partition's files hold every one of them, so keep the partition: the next archive run finishes the deletion",
                s.prefix, s.rows_read
            )));
        }
        tracing::warn!(partition = %s.prefix, read = s.rows_read, deleted, "archive deleted fewer events than it read: the others were deleted meanwhile by something else");
    } else if deleted > s.rows_read {
        tracing::warn!(partition = %s.prefix, read = s.rows_read, deleted, "archive deleted more events than it read");
    }
    Ok(deleted)
}

/// Deletes the archived events whose ids `spool` holds (within `filter`), chunk by chunk,
/// and marks their ledger claims archived.
async fn delete_spooled(
    ctx: &ExportContext,
    prefix: &str,
    filter: &Document,
    spool: &IdSpool,
) -> Result<u64, ExportError> {
    let unreadable = |e: std::io::Error| ExportError::Encode {
        partition: prefix.to_string(),
        message: format!("cannot read the spooled eventIds back: {e}"),
    };
    let mut chunks = spool.chunks().map_err(unreadable)?;
    let chunk = ctx.archive_delete_chunk.max(1);
    let mut deleted = 0;
    loop {
        let (back, ids) = tokio::task::spawn_blocking(move || {
            let ids = chunks.next_chunk(chunk);
            (chunks, ids)
        })
        .await
        .map_err(|e| unreadable(std::io::Error::other(e.to_string())))?;
        chunks = back;
        let spooled = ids.map_err(unreadable)?;
        if spooled.is_empty() {
            return Ok(deleted);
        }
        // The chunk's time range narrows the delete (the reader sorts by time, so a chunk
        // is a short stretch of the day); any event without a time widens it to the day.
        let times: Option<Vec<i64>> = spooled.iter().map(|(at, _)| *at).collect();
        let within = times.and_then(|t| Some((*t.iter().min()?, *t.iter().max()?)));
        let mut ids: Vec<String> = spooled.into_iter().map(|(_, id)| id).collect();
        if deleted == 0 {
            ids.drain(..ctx.archive_delete_misses.min(ids.len()));
        }
        let mut chunk_filter = filter.clone();
        if let Some((first, last)) = within {
            chunk_filter = doc! { "$and": [
                chunk_filter,
                { e::TIMESTAMP: { "$gte": DateTime::from_millis(first), "$lte": DateTime::from_millis(last) } },
            ] };
        }
        let n = delete_archived(ctx, prefix, &chunk_filter, &ids).await?;
        ctx.progress.rows_deleted.fetch_add(n, Relaxed);
        deleted += n;
    }
}

/// Deletes the archived events `ids` (within `filter`) and marks their ledger claims
/// archived.
async fn delete_archived(
    ctx: &ExportContext,
    prefix: &str,
    filter: &Document,
    archived_ids: &[String],
) -> Result<u64, ExportError> {
    let failed = |source| ExportError::Read {
        partition: prefix.to_string(),
        source,
    };
    // By eventId, within the partition's filter: exactly the events written, never one
    // that arrived since.
    let mut deleted = 0;
    for ids in archived_ids.chunks(ctx.archive_delete_chunk.max(1)) {
        // Resends of archived events must stay duplicates, not be stored again. Only
        // these ids: a claim of the same day whose event was never stored stays open.
        // Marked before the delete: a run stopped between the two leaves ids marked whose
        // events are still stored (a resend is a duplicate either way, and the next
        // archive deletes them), never deleted events whose resend would be stored anew.
        mark_archived(ctx, prefix, ids).await?;
        let mut selected = filter.clone();
        selected.insert(e::EVENT_ID, doc! { "$in": ids });
        deleted += ctx
            .store
            .collection(c::EVENTS)
            .delete_many(selected)
            .write_concern(ctx.store.write_concern().clone())
            .await
            .map_err(failed)?
            .deleted_count;
    }
    Ok(deleted)
}

/// Marks the ledger claims of `ids` archived (making those missing): one `update`
/// command holding a statement per id (what a driver's bulk write of `updateOne`s sends),
/// each an `_id` point upsert.
///
/// Rejected: one `updateMany` over `{_id: {$in: ids}}`. Both are plain, documented
/// MongoDB writes, planned as `_id` index lookups; on the test server the single
/// statement took 2.05 s per 10,000 claims against 0.45 s for the statements, and
/// marking claims was most of an ARCHIVE's time. Not yet measured on MongoDB itself.
async fn mark_archived(
    ctx: &ExportContext,
    prefix: &str,
    ids: &[String],
) -> Result<(), ExportError> {
    // An event with no claim (written to `events` by another tool) gets one, archived:
    // without it, the event sent again (an import of the same data) would be stored anew
    // and archived twice. Its time is the day's start (the ledger's times serve pruning
    // archived claims by date).
    let mut made = doc! { l::CLAIMED_AT: ctx.store.now() };
    if let Some(day) = partition_day(prefix) {
        made.insert(l::TIMESTAMP, day_start(day));
    }
    let updates: Vec<Document> = ids
        .iter()
        .map(|id| {
            doc! {
                "q": { common::ID: id },
                "u": { "$set": { l::ARCHIVED: true }, "$setOnInsert": made.clone() },
                "upsert": true,
            }
        })
        .collect();
    let reply = ctx
        .store
        .unordered_updates(c::EVENT_IDS, updates)
        .await
        .map_err(|source| ExportError::Read {
            partition: prefix.to_string(),
            source,
        })?;
    match marking_problem(&reply, ids.len()) {
        Some(problem) => Err(ExportError::Request(format!(
            "marking the archived events of {prefix} in the dedupe ledger failed ({problem}); nothing of that chunk was deleted, and the next archive run finishes the day"
        ))),
        None => Ok(()),
    }
}

/// What in the reply to marking `statements` claims archived keeps their events from
/// being deleted. `run_command` turns neither a write concern error nor refused
/// statements into an error: nothing is deleted unless every claim was marked as
/// durably as asked.
fn marking_problem(reply: &Document, statements: usize) -> Option<String> {
    if let Some(wce) = sluice_connectors::mongo::write_concern_error(reply) {
        return Some(wce);
    }
    let refused = sluice_connectors::mongo::statement_errors(reply);
    refused.first().map(|e| {
        format!(
            "{} of {statements} refused, the first with error {}: {}",
            refused.len(),
            e.code,
            e.message
        )
    })
}

/// eventIds per delete command of an archive (well under the 16 MB command limit).
const ARCHIVE_DELETE_CHUNK: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_s_size_is_estimated_close_to_its_bson() {
        let docs = [
            doc! { "eventId": "e1", "userId": "u", "timestamp": DateTime::from_millis(0), "n": 1.5 },
            doc! { "properties": { "blob": "x".repeat(300_000), "tags": ["a", "b", "c"] } },
            doc! { "list": (0..1000).map(Bson::Int32).collect::<Vec<_>>(), "nested": { "a": { "b": { "c": "d" } } } },
        ];
        for d in docs {
            let actual = bson::to_vec(&d).unwrap().len() as f64;
            let estimate = approx_bytes(&d) as f64;
            assert!(
                (0.75..=1.5).contains(&(estimate / actual)),
                "{estimate} for {actual}: {d}"
            );
        }
    }

    #[test]
    fn claims_not_marked_as_asked_keep_their_events() {
        assert_eq!(
            marking_problem(&doc! { "ok": 1, "n": 3, "nModified": 3 }, 3),
            None
        );
        let wce = doc! { "ok": 1, "n": 3,
        "writeConcernError": { "code": 64, "errmsg": "waiting for replication timed out" } };
        assert_eq!(
            marking_problem(&wce, 3).as_deref(),
            Some("write concern not satisfied: waiting for replication timed out")
        );
        let refused = doc! { "ok": 1, "n": 1, "writeErrors": [
            { "index": 1, "code": 121, "errmsg": "Document failed validation" },
            { "index": 2, "code": 121, "errmsg": "Document failed validation" },
        ] };
        assert_eq!(
            marking_problem(&refused, 3).as_deref(),
            Some("2 of 3 refused, the first with error 121: Document failed validation")
        );
    }

    /// What `f` logs at WARN and above, as text.
    fn warnings_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = buffer.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn a_batch_with_an_unfit_document_warns_of_its_conversions_once() {
        let at = DateTime::from_millis(1_700_000_000_000);
        // Each good event has a number where the page's URL goes (converted to text);
        // one has no eventId, so the batch fails and its documents are tried alone.
        let mut docs: Vec<Document> = (0..20)
            .map(|i| {
                doc! { "eventId": format!("e{i}"), "userId": "u", "sessionId": "s",
                "eventType": "CLICK", "timestamp": at, "createdAt": at, "pageUrl": i,
                "metadata": { "bot": false } }
            })
            .collect();
        docs.push(
            doc! { "userId": "u", "sessionId": "s", "eventType": "CLICK",
            "timestamp": at, "createdAt": at, "metadata": { "bot": false } },
        );
        let mut out = None;
        let log = warnings_of(|| out = Some(encode_or_set_aside(&EVENT_TABLE, docs).unwrap()));
        let (batch, unfit, _) = out.unwrap();
        assert_eq!((batch.num_rows(), unfit.len()), (20, 1));
        let said = log.matches("were converted to it").count();
        assert_eq!(said, 1, "{log}");
        assert!(log.contains("count=20"), "{log}");
    }
}
