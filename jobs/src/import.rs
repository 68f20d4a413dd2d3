//! Integration runs: IMPORT (pull pages, map, transform, upsert) and EXPORT (read a
//! collection, map, push batches).
//!
//! An import checkpoints after every page whose records the sink has committed, in
//! `import_checkpoints`; an interrupted run resumes from the last checkpoint (upserts by
//! key make a re-fetched page harmless), so nothing is lost or duplicated. `lastSync` and
//! the incremental cursor advance only when the whole run has committed. Records that fail
//! mapping are counted and sampled with their reason in the run's history, never dropped
//! silently.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bson::{doc, Bson, DateTime, Document};
use serde_json::Value;
use sluice_connectors::http::{HttpClient, HttpError, HttpStats, PageState};
use sluice_connectors::mongo::{
    command_groups, encoded_len, EventWriter, WriteStatus, WriterOptions, MAX_UPDATE_COMMAND_BYTES,
};
use sluice_connectors::{Store, StoreError};
use sluice_core::integration::{map_record, map_record_noting, validate, Connector, Paging};
use sluice_core::model::{
    collections as c, common, import_run_fields as r, integration_fields as f, Event,
    EventMetadata, IntegrationType,
};
use sluice_core::tracking::{parse_event, RequestContext};
use sluice_core::transform::{apply_chain, Applied, Transform, TransformError};
use sluice_core::ConfigError;

use crate::configs;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no integration config named `{0}` (apply it with `sluice configs apply DIR`)")]
    Unknown(String),
    #[error("integration `{name}` is {actual}, not {expected}")]
    WrongType {
        name: String,
        actual: IntegrationType,
        expected: IntegrationType,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("unknown transform `{0}` in the config's chain")]
    UnknownTransform(String),
    /// `transient`: MongoDB did not answer (a dropped connection, an election), so the
    /// same write may pass later.
    #[error("writing to `{collection}` failed: {message}")]
    Sink {
        collection: String,
        message: String,
        transient: bool,
    },
    /// Stopped from outside before it could record its end (a second Ctrl-C).
    #[error("{0}")]
    Stopped(String),
    /// Another process resumed this run while this one was stopped past its lease (a
    /// paused VM, a laptop asleep): that process records the run's end.
    #[error("run `{0}` was taken over while this process was stopped past its lease (another process resumed it, or started a new run of the config, or it was reset): the pages this one read are stored; its checkpoint, cursor and end are left to the run that holds the config now")]
    TakenOver(String),
}

/// Live counters for a progress display.
#[derive(Debug, Default)]
pub struct ImportProgress {
    pub pages: AtomicU64,
    pub records: AtomicU64,
    pub upserted: AtomicU64,
    pub failed: AtomicU64,
    /// Set to stop after the page being written (a signal to the CLI): the run ends
    /// INTERRUPTED at its last checkpoint, and the next run resumes there.
    pub stop: std::sync::atomic::AtomicBool,
    /// A wait before a retry under way (a `Retry-After`, a backoff).
    pub waits: Arc<sluice_connectors::http::RetryWait>,
    /// The run is a push (an EXPORT config): `pages` counts the requests sent, `records`
    /// the records they carried, `failed` the documents that failed mapping.
    pub pushing: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Default)]
pub struct ImportOptions {
    /// Fetch and map, print samples and counts, write nothing.
    pub dry_run: bool,
    /// Transforms available by name to the config's chain.
    pub transforms: Vec<Arc<dyn Transform>>,
    pub progress: Arc<ImportProgress>,
    /// Stop after this many pages (tests use it to simulate an interruption).
    pub stop_after_pages: Option<u64>,
    /// `[security] token_key`: encrypts rotated OAuth refresh tokens (required by configs
    /// using the refresh-token grant).
    pub token_key: Option<sluice_core::config::Secret>,
    /// Values for `${env:NAME}` references, looked up before the environment (for callers
    /// that hold a secret in memory, like the demo).
    pub secrets: std::collections::BTreeMap<String, String>,
    /// `[tracking]`: an IMPORT into `events` validates records as the tracking API
    /// does (`max_future_seconds`) and assigns sessions by its inactivity gap.
    pub tracking: sluice_core::config::TrackingSection,
}

/// One mapping failure kept for the run history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejected {
    pub reason: String,
    pub record: Value,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportSummary {
    /// Records that failed mapping or validation, or that MongoDB refused, not yet
    /// stored in `dead_letters`.
    #[serde(skip)]
    rejected: Vec<sluice_core::transform::DeadLetter>,
    /// How many of this run's rejected records were kept as dead letters.
    #[serde(skip)]
    rejected_kept: u64,
    pub run_id: String,
    /// This process's attempt at the run: a resumed run keeps its run id, so the run's
    /// record names the attempt that holds it, and only that attempt records its end.
    #[serde(skip)]
    attempt: String,
    pub name: String,
    pub resumed: bool,
    pub completed: bool,
    pub pages: u64,
    pub fetched: u64,
    pub inserted: u64,
    pub updated: u64,
    /// Records already stored and left as they were (an IMPORT into `events`: an event
    /// is stored once per eventId and never changed).
    pub unchanged: u64,
    /// Records not stored: failed mapping or validation, or refused by MongoDB.
    pub failed: u64,
    pub samples: Vec<Rejected>,
    /// Dry run: some mapped records.
    pub preview: Vec<Value>,
    pub stopped_early: Option<String>,
    /// Things that did not stop the run but need a look (each said once).
    pub warnings: Vec<String>,
    /// Records transform plugins failed under the dead-letter policy (in `dead_letters`).
    pub dead_letters: u64,
    /// Records transform plugins dropped under the skip-batch policy: not stored, and
    /// the cursor moves past them (unless `incremental.hold_on_failures`).
    pub skipped: u64,
    /// Records the run gave the plugin chain (before an interruption too: the checkpoint
    /// keeps them), and the records it returned (fewer when a plugin filters records
    /// out or fails some; more when it fans out).
    #[serde(skip)]
    pub plugin_in: u64,
    #[serde(skip)]
    pub plugin_out: u64,
    /// Records the plugins failed under the dead-letter policy (in `dead_letters`).
    #[serde(skip)]
    pub plugin_dead_letters: u64,
    /// Kinds of upsert key seen: 1 strings, 2 numbers.
    #[serde(skip)]
    key_kinds: u8,
    /// The API sends the (date) cursor field as epoch milliseconds.
    #[serde(skip)]
    cursor_epoch_ms: bool,
    /// Records this run mapped (before an interruption too: the checkpoint keeps them),
    /// and in how many of them each field of the mapping (in order) found a value: a
    /// field found in none is most likely a wrong path.
    #[serde(skip)]
    mapped_records: u64,
    #[serde(skip)]
    field_hits: Vec<u64>,
    /// Keys this run stored records for, to tell one that comes twice.
    #[serde(skip)]
    repeated: RepeatedKeys,
    pub http: HttpStats,
    pub elapsed_ms: u64,
}

/// The keys of the records a run (this process's part of it) wrote, to tell a key that
/// comes twice: an API listing an item twice, or records shifting between pages of a
/// list that changes while it is read (which also skips others). Only hashes are kept,
/// of at most [`MAX_TRACKED_KEYS`] keys.
#[derive(Debug, Clone, Default)]
struct RepeatedKeys {
    /// Key hash to record hash.
    seen: std::collections::HashMap<u64, u64>,
    /// Records whose key came before with the same values.
    same: u64,
    /// Records whose key came before with other values.
    differing: u64,
    /// The first key that came again with the same values, and with others, as JSON.
    first_same: Option<String>,
    first_differing: Option<String>,
    /// More keys came than are remembered.
    full: bool,
}

/// Feeds a value to `h` without writing it out (a record is hashed for every record an
/// import reads): its type, then its content. Integers of either width hash alike, as
/// MongoDB matches them alike; a type not listed is hashed as its extended JSON.
fn hash_bson(value: &Bson, h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    match value {
        Bson::String(s) => (1u8, s).hash(h),
        Bson::Int32(i) => (2u8, i64::from(*i)).hash(h),
        Bson::Int64(i) => (2u8, *i).hash(h),
        Bson::Double(f) => (3u8, f.to_bits()).hash(h),
        Bson::Boolean(b) => (4u8, *b).hash(h),
        Bson::Null => 5u8.hash(h),
        Bson::DateTime(t) => (6u8, t.timestamp_millis()).hash(h),
        Bson::Document(d) => {
            7u8.hash(h);
            hash_document(d, h);
        }
        Bson::Array(items) => {
            (8u8, items.len()).hash(h);
            for item in items {
                hash_bson(item, h);
            }
        }
        other => (9u8, other.clone().into_relaxed_extjson().to_string()).hash(h),
    }
}

fn hash_document(d: &Document, h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    d.len().hash(h);
    for (k, v) in d {
        k.hash(h);
        hash_bson(v, h);
    }
}

/// Keys a run remembers to tell repeated ones (about 20 MB of hashes).
const MAX_TRACKED_KEYS: usize = 1_000_000;

impl RepeatedKeys {
    fn note(&mut self, key: &Bson, record: &Document) {
        use std::hash::Hasher;
        let (mut kh, mut vh) = (
            std::collections::hash_map::DefaultHasher::new(),
            std::collections::hash_map::DefaultHasher::new(),
        );
        hash_bson(key, &mut kh);
        hash_document(record, &mut vh);
        let (k, v) = (kh.finish(), vh.finish());
        let before = match self.seen.get(&k) {
            Some(before) => *before,
            None => {
                if self.seen.len() < MAX_TRACKED_KEYS {
                    self.seen.insert(k, v);
                } else {
                    self.full = true;
                }
                return;
            }
        };
        let first = if before == v {
            self.same += 1;
            &mut self.first_same
        } else {
            self.differing += 1;
            self.seen.insert(k, v);
            &mut self.first_differing
        };
        if first.is_none() {
            *first = Some(key.clone().into_relaxed_extjson().to_string());
        }
    }
}

/// Warns of the keys that came more than once in a run: with other values, only one of
/// them is stored (and, for a keyed upsert, a record that flips between two values moves
/// `updatedAt` on every run); with the same values under page or offset paging, records
/// are shifting between pages, and a removal would make the run skip one unseen.
fn warn_repeated_keys(summary: &mut ImportSummary, connector: &Connector) {
    let r = &summary.repeated;
    let of = if r.full {
        format!(" (of the first {MAX_TRACKED_KEYS} keys, the ones remembered)")
    } else {
        String::new()
    };
    let key = &connector.key;
    // A transform plugin that returned more records than it was given may have made the
    // repeats itself.
    let fanned = if summary.plugin_out > summary.plugin_in {
        format!(
            " (or the transform plugins made them: they returned {} records for {})",
            summary.plugin_out, summary.plugin_in
        )
    } else {
        String::new()
    };
    let mut warnings = Vec::new();
    if r.differing > 0 {
        let kept = if connector.collection == c::EVENTS {
            "the first one is stored (an event is never changed)".to_string()
        } else {
            "the last one read is stored, and a document that gets both on every run has its `updatedAt` moved on every run (a push watermarked on it sends it again)".to_string()
        };
        warnings.push(format!(
            "{} had the `{key}` of an earlier record of this run with other values{of} (the first: {}): {kept}; check that `{key}` identifies one item of the API{fanned}",
            sluice_core::counted(r.differing, "record"),
            r.first_differing.clone().unwrap_or_default(),
        ));
    }
    let shifting = matches!(
        connector.paging,
        Paging::Page { .. } | Paging::Offset { .. }
    );
    if r.same > 0 && shifting {
        warnings.push(format!(
            "{} came twice in this run with the same values{of} (the first: `{key}` = {}){fanned}: with page or offset paging, items added to or removed from the list while the run reads it shift the others between pages (an addition makes the run read one twice, as here; a removal makes it skip one, unseen); cursor paging, or an `[incremental]` cursor the API sorts by, does not",
            sluice_core::counted(r.same, "record"),
            r.first_same.clone().unwrap_or_default(),
        ));
    }
    for w in warnings {
        warn_once(summary, &connector.name, w);
    }
}

/// Records failed by mapping or validation kept in `dead_letters`, per run (beyond
/// that they are only counted).
const MAX_REJECTED_LETTERS: u64 = 10_000;
/// The JSON of a sampled failing record kept in the run's record, at most.
const MAX_SAMPLE_BYTES: usize = 16 * 1024;
/// Fields of a big record shown in its sample.
const SAMPLE_FIELDS: usize = 64;
const MAX_SAMPLES: usize = 20;

fn chain_for(
    connector: &Connector,
    available: &[Arc<dyn Transform>],
) -> Result<Vec<Arc<dyn Transform>>, ImportError> {
    connector
        .transforms
        .iter()
        .map(|name| {
            available
                .iter()
                .find(|t| t.name() == name)
                .cloned()
                .ok_or_else(|| ImportError::UnknownTransform(name.clone()))
        })
        .collect()
}

async fn load_connector(
    store: &Store,
    name: &str,
    expected: IntegrationType,
    options: &ImportOptions,
) -> Result<(Connector, Document), ImportError> {
    let (file, stored) = configs::load(store, name)
        .await?
        .ok_or_else(|| ImportError::Unknown(name.to_string()))?;
    let connector = validate(&format!("integration `{name}`"), &file, &|k| {
        options
            .secrets
            .get(k)
            .cloned()
            .or_else(|| std::env::var(k).ok())
    })?;
    if connector.kind != expected {
        return Err(ImportError::WrongType {
            name: name.to_string(),
            actual: connector.kind,
            expected,
        });
    }
    Ok((connector, stored))
}

/// A cursor value as it is sent in a query parameter.
pub fn cursor_text(v: &Bson) -> String {
    match v {
        Bson::String(s) => s.clone(),
        Bson::DateTime(d) => d.try_to_rfc3339_string().unwrap_or_default(),
        Bson::Int32(x) => x.to_string(),
        Bson::Int64(x) => x.to_string(),
        Bson::Double(x) => x.to_string(),
        other => other.to_string(),
    }
}

/// `a > b` for cursor values of the same kind; numbers of any BSON number type compare
/// by value (an `any` cursor may come as 5 one page and 5.5 or 2^40 the next).
fn greater(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::String(x), Bson::String(y)) => x > y,
        (Bson::DateTime(x), Bson::DateTime(y)) => x > y,
        _ => match (sluice_core::model::int_of(a), sluice_core::model::int_of(b)) {
            (Some(x), Some(y)) => x > y,
            _ => match (
                sluice_core::model::number_of(a),
                sluice_core::model::number_of(b),
            ) {
                (Some(x), Some(y)) => x > y,
                _ => false,
            },
        },
    }
}

/// The config's HTTP client. Refresh-token configs keep the tokens their provider rotates,
/// encrypted, in `oauth_tokens` ([`crate::tokens`]).
async fn http_client(
    store: &Store,
    name: &str,
    connector: &Arc<Connector>,
    options: &ImportOptions,
) -> Result<HttpClient, ImportError> {
    let http = HttpClient::new(connector.clone())
        .await?
        .with_retry_waits(options.progress.waits.clone());
    let sluice_core::integration::Auth::OAuth {
        refresh_token: Some(configured),
        token_url,
        client_id,
        ..
    } = &connector.auth
    else {
        return Ok(http);
    };
    let Some(key) = &options.token_key else {
        return Err(ImportError::Config(ConfigError::Invalid {
            origin: format!("integration `{name}`"),
            field: "auth.refresh_token".into(),
            expected: "`[security] token_key` (or SLUICE_TOKEN_KEY) to be set: providers may rotate refresh tokens, and the new one is stored encrypted before it is used".into(),
        }));
    };
    let vault = crate::tokens::MongoTokenVault::new(
        store.clone(),
        name,
        key.expose(),
        configured.expose(),
        token_url,
        client_id,
    );
    Ok(http.with_vault(Arc::new(vault)))
}

/// The HTTP requests one run of `config` made.
fn http_metrics(config: &str, h: &HttpStats) {
    let help = "HTTP requests of imports and pushes, by config and kind.";
    for (kind, n) in [
        ("request", h.requests),
        ("retry", h.retries),
        ("token_refresh", h.token_refreshes),
    ] {
        let labels = [("config", config), ("kind", kind)];
        sluice_core::metrics::count("sluice_http_requests_total", help, &labels, n);
    }
    count_http_failures(config, &h.failed);
}

/// `sluice_http_failures_total{config,class}`: attempts of a connector's requests that
/// failed, by class (network, server_error, rate_limited, refused, malformed).
fn count_http_failures(config: &str, failed: &sluice_connectors::http::HttpFailures) {
    for (class, n) in failed.by_class() {
        sluice_core::metrics::count(
            "sluice_http_failures_total",
            "Failed attempts of imports' and pushes' HTTP requests, by config and class (network: no complete answer; server_error: 5xx; rate_limited: 429; refused: other non-success; malformed: not JSON).",
            &[("config", config), ("class", class)],
            n,
        );
    }
}

fn count_import_run(config: &str, status: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_import_runs_total",
        "Import runs, by config and outcome.",
        &[("config", config), ("status", status)],
        n,
    );
}

/// Creates the series a scheduled import of `config` can count at 0, so that its first
/// failure is an increase an alert sees rather than a new series.
pub fn declare_metrics(config: &str) {
    for status in ["COMPLETED", "INTERRUPTED", "FAILED"] {
        count_import_run(config, status, 0);
    }
    count_http_failures(config, &Default::default());
}

/// This run's share of a summary (a resumed run's summary starts from the checkpoint).
fn import_metrics(before: &ImportSummary, after: &ImportSummary, status: &str, secs: f64) {
    use sluice_core::metrics::{count, observe_seconds};
    let config = [("config", after.name.as_str())];
    let records =
        "Import records, by config and stage (fetched, upserted, unchanged: already stored so, failed mapping, skipped by a plugin).";
    for (stage, n) in [
        ("fetched", after.fetched - before.fetched),
        (
            "upserted",
            (after.inserted + after.updated) - (before.inserted + before.updated),
        ),
        ("unchanged", after.unchanged - before.unchanged),
        ("failed", after.failed - before.failed),
        ("skipped", after.skipped - before.skipped),
    ] {
        let labels = [config[0], ("stage", stage)];
        count("sluice_import_records_total", records, &labels, n);
    }
    http_metrics(&after.name, &after.http);
    count_import_run(&after.name, status, 1);
    observe_seconds(
        "sluice_import_run_seconds",
        "Duration of import runs, by config.",
        &config,
        secs,
    );
}

/// What [`reset_import`] dropped.
#[derive(Debug, Default)]
pub struct ResetReport {
    /// The interrupted run whose checkpoint was dropped, and the pages it had committed.
    pub checkpoint: Option<(String, u64)>,
    /// The incremental cursor (or EXPORT watermark) cleared, with `--cursor`.
    pub cursor: Option<Bson>,
}

/// `sluice import reset NAME`: drops the config's checkpoint, so the next run starts from
/// its last committed cursor instead of resuming an interrupted run, and with `cursor`
/// also clears that cursor (an EXPORT config's watermark), so the next run reads (or
/// sends) everything again. Upserts by key make reading again safe. Refused while a run
/// of the config (its scheduler job `job`) holds its lease.
pub async fn reset_import(
    store: &Store,
    name: &str,
    job: &str,
    cursor: bool,
) -> Result<ResetReport, ImportError> {
    if configs::load(store, name).await?.is_none() {
        return Err(ImportError::Unknown(name.to_string()));
    }
    // Held as a run of its own, so no run of the config starts in between and writes
    // the checkpoint (or the cursor) back.
    let run = crate::schedule::start_manual_run(store, job, "import reset").await?;
    let result = reset_held(store, name, cursor).await;
    let line = match &result {
        Ok(r) => Ok(format!(
            "reset: checkpoint {}, cursor {}",
            if r.checkpoint.is_some() {
                "dropped"
            } else {
                "none"
            },
            if r.cursor.is_some() {
                "cleared"
            } else {
                "kept"
            }
        )),
        Err(e) => Err(e.to_string()),
    };
    crate::schedule::end_manual_run(store, &run, &line).await?;
    result
}

async fn reset_held(store: &Store, name: &str, cursor: bool) -> Result<ResetReport, ImportError> {
    let mut report = ResetReport::default();
    // A process paused past its lease must not write back what this drops.
    supersede_attempts(store, name).await?;
    let dropped = store
        .collection(c::IMPORT_CHECKPOINTS)
        .find_one_and_delete(doc! { common::ID: name })
        .await
        .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "drop checkpoint"))?;
    report.checkpoint = dropped.filter(|cp| !claim_only(cp)).map(|cp| {
        (
            cp.get_str("runId").unwrap_or("?").to_string(),
            cp.get_i64("pages").unwrap_or(0) as u64,
        )
    });
    if cursor {
        let before = store
            .collection(c::INTEGRATION_CONFIGS)
            .find_one_and_update(
                doc! { f::NAME: name },
                doc! { "$unset": {
                    f::SYNC_CURSOR: "", f::SYNC_CURSOR_ID: "", f::SYNC_CURSOR_EPOCH_MS: "",
                } },
            )
            .await
            .map_err(StoreError::mongo(
                c::INTEGRATION_CONFIGS,
                "clear the cursor",
            ))?;
        // An EXPORT config's position may be a null watermark with an `_id`.
        report.cursor = before.and_then(|d| {
            let value = d.get(f::SYNC_CURSOR).filter(|b| **b != Bson::Null);
            let id = d.get(f::SYNC_CURSOR_ID).filter(|b| **b != Bson::Null);
            value.or(id).cloned()
        });
    }
    Ok(report)
}

/// The id of a new run of config `name`: its name and the start time.
fn new_run_id(name: &str) -> String {
    format!("{name}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f"))
}

/// Runs an IMPORT config.
pub async fn run_import(
    store: &Store,
    name: &str,
    options: &ImportOptions,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let prepared = async {
        let (connector, stored) =
            load_connector(store, name, IntegrationType::Import, options).await?;
        let chain = chain_for(&connector, &options.transforms)?;
        let connector = Arc::new(connector);
        let http = http_client(store, name, &connector, options).await?;
        Ok::<_, ImportError>((connector, stored, chain, http))
    }
    .await;
    let (connector, stored, chain, http) = match prepared {
        Ok(prepared) => prepared,
        // A stored config that cannot run (a secret unset, a plugin missing, an endpoint
        // that does not resolve or is refused) is recorded FAILED like any run, so
        // `import_runs` and `/metrics` show it; one that is not stored is no run, nor is
        // an EXPORT config (its callers push it instead).
        Err(e)
            if !options.dry_run
                && !matches!(e, ImportError::Unknown(_) | ImportError::WrongType { .. }) =>
        {
            let summary = ImportSummary {
                name: name.to_string(),
                run_id: new_run_id(name),
                ..Default::default()
            };
            import_metrics(
                &summary,
                &summary,
                "FAILED",
                started.elapsed().as_secs_f64(),
            );
            record_failed_run(store, &summary, &format!("the run could not start: {e}")).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let checkpoints = store.collection(c::IMPORT_CHECKPOINTS);
    let mut summary = ImportSummary {
        name: name.to_string(),
        ..Default::default()
    };

    // Resume an interrupted run, or start from the last committed cursor.
    let checkpoint = if options.dry_run {
        None
    } else {
        checkpoints
            .find_one(doc! { common::ID: name })
            .await
            .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "read checkpoint"))?
            // A claim a run made before saving any page is no place to resume from.
            .filter(|cp| !claim_only(cp))
    };
    // A checkpoint belongs to the config it was taken with: after `configs apply` changed
    // the config (a fixed endpoint, a new mapping), its saved next page may be wrong, so
    // the run starts over (upserts by key make that safe).
    let fingerprint = spec_fingerprint(&stored);
    // Where the saved run was to go on; one that cannot be read (written by another
    // version, or by hand) is no place to resume from.
    let saved_state =
        |cp: &Document| serde_json::from_str::<PageState>(cp.get_str("state").unwrap_or("")).ok();
    let start_over = checkpoint.as_ref().and_then(|cp| {
        if saved_state(cp).is_none() {
            Some("its interrupted run's saved place cannot be read")
        } else if cp.get_str("spec").is_ok_and(|f| f != fingerprint) {
            Some("the config changed since its interrupted run")
        } else {
            None
        }
    });
    let checkpoint = match start_over {
        Some(why) => {
            warn_once(
                &mut summary,
                name,
                format!("{why}; started over instead of resuming"),
            );
            checkpoints
                .delete_one(doc! { common::ID: name })
                .await
                .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "clear checkpoint"))?;
            None
        }
        None => checkpoint,
    };
    let mut max_cursor: Option<Bson> = None;
    let mut state = match &checkpoint {
        Some(cp) => {
            summary.resumed = true;
            summary.run_id = cp.get_str("runId").unwrap_or_default().to_string();
            summary.pages = cp.get_i64("pages").unwrap_or(0) as u64;
            summary.fetched = cp.get_i64("fetched").unwrap_or(0) as u64;
            summary.inserted = cp.get_i64("inserted").unwrap_or(0) as u64;
            summary.updated = cp.get_i64("updated").unwrap_or(0) as u64;
            summary.unchanged = cp.get_i64("unchanged").unwrap_or(0) as u64;
            summary.failed = cp.get_i64("failed").unwrap_or(0) as u64;
            summary.skipped = cp.get_i64("skipped").unwrap_or(0) as u64;
            summary.dead_letters = cp.get_i64("deadLetters").unwrap_or(0) as u64;
            // Checkpoints of earlier versions did not say: as if every failure was kept.
            summary.rejected_kept = cp
                .get_i64("rejectedKept")
                .map_or(summary.failed, |n| n as u64);
            max_cursor = cp.get("maxCursor").cloned().filter(|b| *b != Bson::Null);
            summary.cursor_epoch_ms = cp.get_bool("cursorEpochMs").unwrap_or(false);
            summary.stopped_early = cp.get_str("stoppedEarly").ok().map(str::to_string);
            // What the pages before the interruption found, so a field they found is not
            // warned of as found in none (checkpoints of earlier versions did not say).
            summary.mapped_records = cp.get_i64("mappedRecords").unwrap_or(0) as u64;
            summary.plugin_in = cp.get_i64("pluginIn").unwrap_or(0) as u64;
            summary.plugin_out = cp.get_i64("pluginOut").unwrap_or(0) as u64;
            summary.plugin_dead_letters = cp.get_i64("pluginDeadLetters").unwrap_or(0) as u64;
            summary.field_hits = cp
                .get_array("fieldHits")
                .map(|hits| {
                    hits.iter()
                        .map(|h| h.as_i64().unwrap_or(0) as u64)
                        .collect()
                })
                .unwrap_or_default();
            // Progress counts the run's pages, not this process's share of them.
            let p = &options.progress;
            p.pages.store(summary.pages, Relaxed);
            p.records.store(summary.fetched, Relaxed);
            // As the sinks count it: events stored; records written by key, unchanged too.
            let upserted = if connector.collection == c::EVENTS {
                summary.inserted
            } else {
                summary.inserted + summary.updated + summary.unchanged
            };
            p.upserted.store(upserted, Relaxed);
            p.failed.store(summary.failed, Relaxed);
            saved_state(cp).unwrap_or(PageState::Done)
        }
        None => {
            summary.run_id = new_run_id(name);
            let mut extra = Vec::new();
            if let (Some(inc), Some(cursor)) = (&connector.incremental, stored.get(f::SYNC_CURSOR))
            {
                if *cursor != Bson::Null {
                    // A cursor in the future (a record dated ahead, a wrong `unit` since
                    // fixed) never moves back on its own: every run would read nothing.
                    let ahead = options
                        .tracking
                        .max_future_seconds
                        .max(86_400)
                        .unsigned_abs();
                    if let Bson::DateTime(d) = cursor {
                        if *d > store.now_plus(std::time::Duration::from_secs(ahead)) {
                            let at = d.try_to_rfc3339_string().unwrap_or_default();
                            warn_once(
                                &mut summary,
                                name,
                                format!("the stored cursor is in the future ({at}); runs read nothing newer than it: if it is wrong, drop it with `sluice import reset {name} --cursor`"),
                            );
                        }
                    }
                    let cursor = match cursor {
                        Bson::DateTime(d) if inc.lookback_seconds > 0 => {
                            let back = i64::try_from(inc.lookback_seconds)
                                .unwrap_or(i64::MAX)
                                .saturating_mul(1000);
                            Bson::DateTime(bson::DateTime::from_millis(
                                d.timestamp_millis().saturating_sub(back),
                            ))
                        }
                        other => other.clone(),
                    };
                    // A date goes back in the form the API sent it in: epoch seconds or
                    // milliseconds when it came as a number.
                    let field = connector.cursor_mapping();
                    let seconds = field.is_some_and(|f| {
                        f.epoch_unit == sluice_core::integration::EpochUnit::Seconds
                    });
                    let format = field.and_then(|f| f.date_format.as_deref());
                    let text = match (&cursor, format) {
                        (Bson::DateTime(d), _)
                            if stored.get_bool(f::SYNC_CURSOR_EPOCH_MS) == Ok(true) =>
                        {
                            let ms = d.timestamp_millis();
                            if seconds { ms.div_euclid(1000) } else { ms }.to_string()
                        }
                        (Bson::DateTime(d), Some(format)) => {
                            sluice_core::integration::format_date(*d, format)
                        }
                        (other, _) => cursor_text(other),
                    };
                    extra.push((inc.param.clone(), text));
                }
            }
            http.first_state(extra)
        }
    };
    if !options.dry_run {
        close_orphaned_runs(store, name).await?;
        // No earlier attempt holds a run of the config any more, whichever run this is
        // (a resume, or a new run under a new id): one woken past its lease stops.
        supersede_attempts(store, name).await?;
        summary.attempt = bson::oid::ObjectId::new().to_hex();
        live_attempts().insert(live_key(store, name), summary.attempt.clone());
        record_run(store, &summary, "RUNNING", None).await?;
        // The checkpoint is this attempt's from now on: a resumed run's, or a claim in
        // its place for a new run; a process that held the config before can no longer
        // save over it (its save finds another attempt's, and stops).
        let claimed = if summary.resumed {
            checkpoints
                .update_one(
                    doc! { common::ID: name },
                    doc! { "$set": { "attempt": &summary.attempt } },
                )
                .await
        } else {
            checkpoints
                .replace_one(
                    doc! { common::ID: name },
                    doc! {
                        "runId": &summary.run_id, "attempt": &summary.attempt, CLAIM_ONLY: true,
                        common::UPDATED_AT: store.now(),
                    },
                )
                .upsert(true)
                .await
        };
        claimed.map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "claim checkpoint"))?;
    }
    let before = summary.clone();
    let pages_at_start = summary.pages;
    let outcome = import_pages(
        store,
        &connector,
        &http,
        &chain,
        options,
        &mut state,
        &mut summary,
        &mut max_cursor,
        &fingerprint,
    )
    .await;
    summary.http = http.stats.lock().map(|s| s.clone()).unwrap_or_default();
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    if outcome.is_ok() {
        warn_unmatched_fields(&mut summary, &connector);
    }
    if connector.kind == sluice_core::model::IntegrationType::Import {
        warn_repeated_keys(&mut summary, &connector);
    }
    if options.dry_run {
        return outcome.map(|()| summary);
    }
    // Counted with the outcome the run is recorded with (a run whose finishing step
    // fails is FAILED, not COMPLETED).
    let counted = |summary: &ImportSummary, status: &str| {
        import_metrics(&before, summary, status, started.elapsed().as_secs_f64())
    };
    // A process stopped past its lease (a paused VM, a laptop asleep) may wake to find
    // its run resumed by another: the end, the cursor and the checkpoint are then that
    // process's to write.
    if outcome.is_ok() && !holds_run(store, &summary).await? {
        counted(&summary, "INTERRUPTED");
        return Err(taken_over(&summary));
    }
    match outcome {
        Ok(()) if state == PageState::Done => {
            // The sink has committed every page: now the cursor may advance.
            let mut set = doc! { f::LAST_SYNC: store.now() };
            // A run cut short by a loop guard did not read everything: unless the API
            // serves records in cursor order, records it did not reach may lie below the
            // largest cursor it saw, so the cursor stays.
            let cut_short = summary.stopped_early.is_some()
                && connector.incremental.as_ref().is_some_and(|i| !i.sorted);
            // Records that failed mapping (or writing) may lie below the largest cursor:
            // past it, they would never be fetched again, even once the mapping is fixed.
            // Past the cap on dead letters a run keeps, failures are only counted: moving
            // past them would lose them, so the cursor holds whatever the setting.
            // So may records a plugin failed (kept in `dead_letters`, or skipped under
            // `skip-batch`): `hold_on_failures` holds for them too.
            let unkept = summary.failed.saturating_sub(summary.rejected_kept);
            let plugin_failed = summary.plugin_dead_letters + summary.skipped;
            let hold_on_failures = connector
                .incremental
                .as_ref()
                .is_some_and(|i| i.hold_on_failures);
            let holding = (summary.failed > 0 && unkept > 0)
                || (summary.failed + plugin_failed > 0 && hold_on_failures);
            // Never backwards: a run reading only records below the cursor (a lookback
            // window, a record gone at the source) leaves it where it was.
            let behind = |m: &Bson| {
                stored
                    .get(f::SYNC_CURSOR)
                    .is_some_and(|old| greater(old, m))
            };
            if let (Some(m), false, false) = (
                max_cursor.as_ref().filter(|m| !behind(m)),
                cut_short,
                holding,
            ) {
                set.insert(f::SYNC_CURSOR, m.clone());
                set.insert(f::SYNC_CURSOR_EPOCH_MS, summary.cursor_epoch_ms);
            }
            if summary.failed + plugin_failed > 0 && !cut_short && max_cursor.is_some() {
                let failed = summary.failed;
                // What failed, in words: mapping and MongoDB's refusals, then the plugins'.
                let mut what = Vec::new();
                if failed > 0 {
                    what.push(format!(
                        "{failed} record(s) failed mapping or were refused by MongoDB"
                    ));
                }
                if summary.plugin_dead_letters > 0 {
                    what.push(format!(
                        "a plugin failed {} record(s) (`dead-letter`)",
                        summary.plugin_dead_letters
                    ));
                }
                if summary.skipped > 0 {
                    what.push(format!(
                        "a plugin's failures skipped {} record(s) (`skip-batch`)",
                        summary.skipped
                    ));
                }
                let what = what.join(" and ");
                let warning = if unkept > 0 {
                    format!("the incremental cursor was not advanced because {failed} record(s) failed mapping or were refused by MongoDB, more than the {MAX_REJECTED_LETTERS} a run keeps in `dead_letters`: the next run reads the same window again (fix the mapping, or look at the samples)")
                } else if holding {
                    format!("the incremental cursor was not advanced because {what} (`incremental.hold_on_failures`): the next run reads the same window again")
                } else {
                    let kept = if summary.skipped > 0 && failed + summary.plugin_dead_letters == 0 {
                        "they are not stored anywhere".to_string()
                    } else {
                        format!(
                            "those failed are kept in `dead_letters` (pipeline `import:{name}`)"
                        )
                    };
                    format!("the incremental cursor moved past records that failed ({what}); {kept}; set `incremental.hold_on_failures = true` to read them again until they are stored")
                };
                warn_once(&mut summary, name, warning);
            }
            if cut_short && max_cursor.is_some() {
                // What to do depends on why: only a run cut at `max_pages` wants more pages.
                let why = summary.stopped_early.clone().unwrap_or_default();
                let remedy = if why.starts_with("stopped at `max_pages`") {
                    "raise `max_pages`, or set `incremental.sorted = true` if the API returns records in cursor order"
                } else {
                    "the next run reads the same window again; set `incremental.sorted = true` if the API returns records in cursor order"
                };
                warn_once(
                    &mut summary,
                    name,
                    format!("the incremental cursor was not advanced because the run stopped early ({why}); {remedy}"),
                );
            }
            let finished = async {
                store
                    .collection(c::INTEGRATION_CONFIGS)
                    .update_one(doc! { f::NAME: name }, doc! { "$set": set })
                    .await
                    .map_err(StoreError::mongo(
                        c::INTEGRATION_CONFIGS,
                        "advance lastSync",
                    ))?;
                checkpoints
                    .delete_one(own_checkpoint(name, &summary.attempt))
                    .await
                    .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "clear checkpoint"))
                    .map(|_| ())
            }
            .await;
            if let Err(e) = finished {
                // Everything is stored; the next run resumes at the checkpoint (past
                // the last page) and finishes this step.
                let message = format!("every page was stored, but finishing the run failed: {e}; the next run finishes it");
                counted(&summary, "FAILED");
                record_failed_run(store, &summary, &message).await;
                return Err(e.into());
            }
            summary.completed = true;
            if let Err(e) = record_run(store, &summary, "COMPLETED", None).await {
                // Left RUNNING: the next run records it INTERRUPTED, and a scheduled run
                // is recorded FAILED with this error.
                counted(&summary, "FAILED");
                return Err(e.into());
            }
            counted(&summary, "COMPLETED");
            Ok(summary)
        }
        Ok(()) => {
            counted(&summary, "INTERRUPTED");
            record_run(store, &summary, "INTERRUPTED", None).await?;
            Ok(summary)
        }
        // The run is another process's now: its record is that process's to write.
        Err(e @ ImportError::TakenOver(_)) => {
            counted(&summary, "INTERRUPTED");
            Err(e)
        }
        Err(e) => {
            counted(&summary, "FAILED");
            let mut message = e.to_string();
            // A resumed run whose saved next page the API refuses outright (an expired
            // cursor, scroll id or signed next-page URL) would fail the same way on every
            // run: the checkpoint is dropped, and the next run starts over (upserts by key
            // make reading again safe).
            // (Or names a page off the endpoint's origin: a checkpoint saved by an earlier
            // version, which did not check the next page before saving it.)
            let refused = matches!(
                &e,
                ImportError::Http(sluice_connectors::http::HttpError::Status { status, .. })
                    if matches!(status, 400 | 404 | 410 | 422)
            ) || matches!(
                &e,
                ImportError::Http(sluice_connectors::http::HttpError::OffOrigin { .. })
            );
            if summary.resumed && summary.pages == pages_at_start && refused {
                let dropped = store
                    .collection(c::IMPORT_CHECKPOINTS)
                    .delete_one(own_checkpoint(name, &summary.attempt))
                    .await;
                if dropped.is_ok_and(|d| d.deleted_count == 1) {
                    message.push_str("; the API refused the saved next page of the interrupted run, so its checkpoint was dropped: the next run starts over");
                    tracing::warn!(config = name, "{message}");
                }
            }
            record_failed_run(store, &summary, &message).await;
            Err(e)
        }
    }
}

/// Records a run FAILED on the way out of it: the run's own error is what is returned;
/// a failure to record it is logged (the next run of the config closes the record it
/// left RUNNING, as INTERRUPTED).
async fn record_failed_run(store: &Store, summary: &ImportSummary, message: &str) {
    if let Err(e) = record_run(store, summary, "FAILED", Some(message)).await {
        tracing::error!(config = %summary.name, run = %summary.run_id, error = %e, failure = message, "could not record the failed run");
    }
}

#[allow(clippy::too_many_arguments)]
async fn import_pages(
    store: &Store,
    connector: &Connector,
    http: &HttpClient,
    chain: &[Arc<dyn Transform>],
    options: &ImportOptions,
    state: &mut PageState,
    summary: &mut ImportSummary,
    max_cursor: &mut Option<Bson>,
    fingerprint: &str,
) -> Result<(), ImportError> {
    // The previous page's digest and record count (its body is not kept: a page can be
    // large).
    let mut previous: Option<(u64, usize)> = None;
    // Whether a page of this run had the records' place (`source.records` matched).
    let mut place_seen = false;
    // Requests made this run: an API naming a page it already served (a cursor that
    // comes back) would otherwise loop until `max_pages`.
    // Kept as a 128-bit digest of each request: URLs with long cursors, over many
    // pages, would otherwise hold megabytes.
    let mut requested = std::collections::HashSet::new();
    let request_key = |s: &PageState| match s {
        PageState::Fetch { url, query, .. } => {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(format!("{url}?{query:?}").as_bytes());
            Some(u128::from_le_bytes(
                digest[..16].try_into().unwrap_or_default(),
            ))
        }
        PageState::Done => None,
    };
    requested.extend(request_key(state));
    let mut pages_this_run = 0u64;
    // (`events` needs no key index: the event writer's ledger makes eventIds unique.)
    let mut mode = if !options.dry_run
        && connector.collection != c::EVENTS
        && ensure_key_index(store, connector).await
    {
        SinkMode::InsertFirst
    } else {
        SinkMode::UpsertOnly
    };
    let sink_mode = &mut mode;
    // The next page is fetched while this one is mapped and written, so the API and
    // MongoDB work at the same time; the checkpoint still advances page by page, only
    // after the sink committed.
    let mut fetched = http.fetch(state).await?;
    while let Some(mut page) = fetched.take() {
        if previous == Some((page.digest, page.records().len())) && !page.records().is_empty() {
            summary.stopped_early = Some(format!(
                "page {} repeated the previous page; stopped (loop guard){}",
                summary.pages + 1,
                url_cursor_hint(connector, state)
            ));
            *state = PageState::Done;
            break;
        }
        let mut next = http.next_state(state, &page);
        if next == PageState::Done {
            // Stopped by a total below what was read: the pages after it were not, so the
            // run counts as cut short (an incremental cursor is not moved past them).
            if let Some(why) = http.total_below_read(state, &page) {
                summary.stopped_early = Some(format!(
                    "page {}: {why}; the pages after it were not read",
                    summary.pages + 1
                ));
            }
        }
        // Pagination has read what it needs from the body: free it before the next page
        // arrives.
        page.release_body();
        if let PageState::Fetch { page: n, .. } = &next {
            if *n >= connector.max_pages {
                summary.stopped_early =
                    Some(format!("stopped at `max_pages` ({})", connector.max_pages));
                next = PageState::Done;
            }
        }
        if let Some(key) = request_key(&next) {
            if !requested.insert(key) {
                summary.stopped_early = Some(format!(
                    "page {} named a page already fetched in this run; stopped (loop guard){}",
                    summary.pages + 1,
                    url_cursor_hint(connector, &next)
                ));
                next = PageState::Done;
            }
        }
        // A next page the run would refuse (off the endpoint's origin) fails the run before
        // this page is written: a checkpoint naming it would fail every later run the
        // same way, even once the API names the right page; the checkpoint stays at this
        // page, and the next run reads it again.
        http.check_origin(&next)?;
        if let Some(miss) = &page.records_missing {
            warn_once(
                summary,
                &connector.name,
                format!("page {}: {miss}", summary.pages + 1),
            );
            // After pages that had the records' place, a page without it that ends the
            // paging is more likely an error answered with 200 than the end: the run
            // counts as cut short, so an incremental cursor (unless `sorted`) is not
            // moved past the pages not read. One that names a next page is read on. When
            // no page had it (a records path that matches nothing), the warning says so.
            if place_seen && summary.stopped_early.is_none() && next == PageState::Done {
                summary.stopped_early = Some(format!(
                    "page {} came without the records' place (an error answered with 200?); the pages after it were not read",
                    summary.pages + 1
                ));
            }
        }
        place_seen |= page.records_missing.is_none();
        summary.pages += 1;
        summary.fetched += page.records().len() as u64;
        options.progress.pages.fetch_add(1, Relaxed);
        options
            .progress
            .records
            .fetch_add(page.records().len() as u64, Relaxed);
        pages_this_run += 1;
        let stop_here = (options
            .stop_after_pages
            .is_some_and(|n| pages_this_run >= n)
            || options.progress.stop.load(Relaxed))
            && next != PageState::Done;
        let prefetch = async {
            if stop_here {
                Ok(None)
            } else {
                http.fetch(&next).await
            }
        };
        let write = write_page(
            store,
            connector,
            chain,
            options,
            &page,
            &next,
            summary,
            max_cursor,
            sink_mode,
            fingerprint,
        );
        let (prefetched, written) = tokio::join!(prefetch, write);
        written?;
        previous = Some((page.digest, page.records().len()));
        *state = next;
        if stop_here {
            break;
        }
        fetched = prefetched?;
    }
    Ok(())
}

/// For a loop guard's message: a `cursor` that is a URL (Django REST's `next`), sent as a
/// parameter, gets the first page back; say which paging type follows it.
fn url_cursor_hint(connector: &Connector, state: &PageState) -> &'static str {
    let url = |v: &str| {
        let v = v.trim_start().to_ascii_lowercase();
        v.starts_with("http://") || v.starts_with("https://")
    };
    match (&connector.paging, state) {
        (Paging::Cursor { param, .. }, PageState::Fetch { query, .. })
            if query.iter().any(|(k, v)| k == param && url(v)) =>
        {
            "; the cursor is a URL: set `type = \"next_url\"` (with `next_path`) to follow it"
        }
        _ => "",
    }
}

/// Warns of each mapped field (without a `default`) that found no value in any record
/// this run mapped (at least [`UNMATCHED_AFTER`]): a typo in its path (`$.variant` for
/// `$.variants`) otherwise leaves the field out of every document, silently.
fn warn_unmatched_fields(summary: &mut ImportSummary, connector: &Connector) {
    // A few records may all lack an optional field; ten are enough to suspect its path.
    if summary.mapped_records < UNMATCHED_AFTER {
        return;
    }
    let unmatched: Vec<String> = connector
        .fields
        .iter()
        .zip(&summary.field_hits)
        .filter(|(f, hits)| **hits == 0 && f.default.is_none())
        .map(|(f, _)| format!("`{}` (`{}`)", f.target, f.path))
        .collect();
    if !unmatched.is_empty() {
        let warning = format!(
            "{} found no value (or only null) in any of the {} records mapped; check the path against a record (`import run {} --dry-run` shows some)",
            unmatched.join(", "),
            summary.mapped_records,
            connector.name
        );
        warn_once(summary, &connector.name, warning);
    }
}

/// Records mapped in a run before a field found in none of them is warned of.
const UNMATCHED_AFTER: u64 = 10;

/// Adds a warning to the run unless one with the same text after its `page N: ` prefix
/// is there already.
fn warn_once(summary: &mut ImportSummary, config: &str, warning: String) {
    let tail = |w: &str| w.split_once(": ").map_or(w, |(_, t)| t).to_string();
    if summary.warnings.iter().any(|w| tail(w) == tail(&warning)) {
        return;
    }
    tracing::warn!(config, "{warning}");
    summary.warnings.push(warning);
}

/// Records a plugin dropped under skip-batch: counted, and each plugin that dropped some
/// named once in the run's warnings with its first reason (the operator chose to lose
/// them, but must be able to see that it happens).
fn note_skipped(
    summary: &mut ImportSummary,
    config: &str,
    skipped: &[sluice_core::transform::DeadLetter],
) {
    summary.skipped += skipped.len() as u64;
    for s in skipped {
        let said = format!("plugin `{}` skipped records", s.transform);
        if summary.warnings.iter().any(|w| w.starts_with(&said)) {
            continue;
        }
        let warning = format!(
            "{said} under the skip-batch policy (the first: {}); they are not stored (`skipped` counts them; an incremental cursor moves past them unless `incremental.hold_on_failures`)",
            s.reason
        );
        tracing::warn!(config, "{warning}");
        summary.warnings.push(warning);
    }
}

fn reject(summary: &mut ImportSummary, options: &ImportOptions, reason: String, record: &Value) {
    reject_at(summary, options, "mapping", reason, record)
}

/// A record that cannot be stored: counted, sampled and kept whole as a dead letter under
/// `stage` (`mapping`, or `write` for a document MongoDB refused).
fn reject_at(
    summary: &mut ImportSummary,
    options: &ImportOptions,
    stage: &str,
    reason: String,
    record: &Value,
) {
    summary.failed += 1;
    options.progress.failed.fetch_add(1, Relaxed);
    // Kept whole, so nothing fetched is lost (the samples hold only the first few).
    if summary.rejected_kept < MAX_REJECTED_LETTERS {
        summary.rejected_kept += 1;
        let record = match bson::to_bson(record) {
            Ok(Bson::Document(d)) => d,
            Ok(other) => doc! { "value": other },
            Err(_) => doc! { "value": record.to_string() },
        };
        summary.rejected.push(sluice_core::transform::DeadLetter {
            transform: stage.into(),
            reason: reason.clone(),
            record,
        });
    }
    if summary.samples.len() < MAX_SAMPLES {
        // Samples go into the run's record (`import_runs`): a big record is shown by
        // its start, so the run can still be recorded.
        let cut = |text: String, limit: usize| {
            Value::String(format!(
                "{}... ({} bytes)",
                sluice_core::model::prefix_within(&text, limit),
                text.len()
            ))
        };
        let text = record.to_string();
        let record = match record {
            _ if text.len() <= MAX_SAMPLE_BYTES => record.clone(),
            // Small fields (the key among them) whole, big ones by their start; of a
            // record with more than 64 fields, the 64 smallest (a key is small wherever it
            // stands), in their order, and how many were left out.
            Value::Object(fields) => {
                let sized: Vec<(usize, String)> =
                    fields.values().map(|v| v.to_string()).enumerate().collect();
                let mut order: Vec<usize> = (0..sized.len()).collect();
                order.sort_by_key(|&i| sized[i].1.len());
                let mut kept: Vec<usize> = order.into_iter().take(SAMPLE_FIELDS).collect();
                kept.sort_unstable();
                let mut sample: serde_json::Map<String, Value> = kept
                    .into_iter()
                    .map(|i| {
                        let (k, v) = fields.iter().nth(i).expect("an index of the record");
                        let text = &sized[i].1;
                        let v = if text.len() > MAX_SAMPLE_BYTES / SAMPLE_FIELDS {
                            cut(text.clone(), MAX_SAMPLE_BYTES / SAMPLE_FIELDS)
                        } else {
                            v.clone()
                        };
                        (k.clone(), v)
                    })
                    .collect();
                if fields.len() > SAMPLE_FIELDS {
                    sample.insert(
                        "_omittedFields".into(),
                        Value::from(fields.len() - SAMPLE_FIELDS),
                    );
                }
                Value::Object(sample)
            }
            _ => cut(text, MAX_SAMPLE_BYTES),
        };
        summary.samples.push(Rejected { reason, record });
    }
}

/// How the sink writes a batch: inserts first while most records are new (an insert is
/// several times cheaper than an upsert, and a first import is all new records), upserts
/// once most records exist. Decided from the previous batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkMode {
    InsertFirst,
    Upsert,
    /// No unique index on the key: inserting could duplicate keys.
    UpsertOnly,
}

/// Maps one page, runs the transform chain, writes it and saves the checkpoint that
/// points at `next`.
#[allow(clippy::too_many_arguments)]
async fn write_page(
    store: &Store,
    connector: &Connector,
    chain: &[Arc<dyn Transform>],
    options: &ImportOptions,
    page: &sluice_connectors::http::Page,
    next: &PageState,
    summary: &mut ImportSummary,
    max_cursor: &mut Option<Bson>,
    sink_mode: &mut SinkMode,
    fingerprint: &str,
) -> Result<(), ImportError> {
    let mut mapped = Vec::with_capacity(page.records().len());
    let mut several = Vec::new();
    if summary.field_hits.len() != connector.fields.len() {
        // A first page, or a checkpoint that did not say: counted from here.
        summary.field_hits = vec![0; connector.fields.len()];
        summary.mapped_records = 0;
    }
    if !connector.records.trim_end().ends_with("[*]")
        && page.records().first().is_some_and(Value::is_array)
    {
        warn_once(
            summary,
            &connector.name,
            format!(
                "page {}: records path `{}` selected a list as one record; to take its items as records, end it with `[*]` in `source.records`",
                summary.pages,
                connector.records
            ),
        );
    }
    for record in page.records() {
        match map_record_noting(&connector.fields, record, &mut several) {
            Ok(d) if d.get(&connector.key).is_some_and(usable_key) => {
                summary.mapped_records += 1;
                for (hits, field) in summary.field_hits.iter_mut().zip(&connector.fields) {
                    if field.default.is_none() && d.contains_key(&field.target) {
                        *hits += 1;
                    }
                }
                mapped.push(d)
            }
            Ok(_) => reject(
                summary,
                options,
                format!("the upsert key `{}` is missing or empty, not a single value (an object or a list), or a number too big to be exact (send such ids as strings and map them with `type = \"string\"`)", connector.key),
                record,
            ),
            Err(reason) => reject(summary, options, reason, record),
        }
    }
    // Each field that did, not only the first.
    for several in several {
        warn_once(
            summary,
            &connector.name,
            format!(
                "page {} ({} values in a record): {several}",
                summary.pages, several.matches
            ),
        );
    }
    // Each date field is looked at in every record until it has been warned about once.
    for field in &connector.fields {
        let warned = |s: &ImportSummary| {
            let mapping = format!("[mapping.{}]", field.target);
            s.warnings
                .iter()
                .any(|w| w.contains("epoch milliseconds") && w.contains(&mapping))
        };
        if field.kind != sluice_core::integration::FieldType::Date
            || field.unit_given
            || warned(summary)
        {
            continue;
        }
        // A unit is the API's, the same for every record: a few of each page show it,
        // without a second lookup of every record's date for the life of the config.
        if let Some(warning) = page
            .records()
            .iter()
            .take(16)
            .find_map(|r| sluice_core::integration::suspect_epoch_seconds(field, r))
        {
            warn_once(summary, &connector.name, warning);
        }
    }
    let given = mapped.len() as u64;
    let applied = apply_off_runtime(chain, mapped).await?;
    if !chain.is_empty() {
        summary.plugin_in += given;
        summary.plugin_out += applied.records.len() as u64;
        summary.plugin_dead_letters += applied.dead_letters.len() as u64;
    }
    let mut letters = applied.dead_letters;
    note_skipped(summary, &connector.name, &applied.skipped);
    // What a plugin returns is held to the mapping's rules again: a record whose key it
    // dropped would be upserted with `{key: null}`, over any document lacking the key.
    let mapped: Vec<Document> = if chain.is_empty() {
        applied.records
    } else {
        let mut kept = Vec::with_capacity(applied.records.len());
        for d in applied.records {
            match plugin_output_problem(connector, &d) {
                None => kept.push(d),
                Some(reason) => reject(summary, options, reason, &mapped_json(&d)),
            }
        }
        kept
    };
    for d in &mapped {
        if let Some(key) = d.get(&connector.key) {
            summary.repeated.note(key, d);
        }
        summary.key_kinds |= match d.get(&connector.key) {
            Some(Bson::String(_)) => 1,
            Some(Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_)) => 2,
            _ => 0,
        };
    }
    if summary.key_kinds == 3 {
        let key = &connector.key;
        warn_once(
            summary,
            &connector.name,
            format!(
                "the upsert key `{key}` came both as numbers and as strings; MongoDB keeps 1 and \"1\" as different keys, so one record can be stored twice: declare `type = \"string\"` (or `\"integer\"`) in `[mapping.{key}]`"
            ),
        );
    }
    if let Some(inc) = &connector.incremental {
        // How the API writes the cursor: a date mapped from epoch milliseconds is sent
        // back as epoch milliseconds.
        if let Some(field) = connector.cursor_mapping() {
            summary.cursor_epoch_ms |= page
                .records()
                .first()
                .is_some_and(|r| sluice_core::integration::sent_as_epoch(field, r));
        }
        for d in &mapped {
            if let Some(v) = d.get(&inc.cursor_field) {
                if max_cursor.as_ref().is_none_or(|m| greater(v, m)) {
                    *max_cursor = Some(v.clone());
                }
            }
        }
    }
    // An import into `events` stores tracking events: validated, deduplicated by
    // eventId, folded into sessions and users.
    let events = if connector.collection == c::EVENTS {
        let received_at_ms = store.now().timestamp_millis();
        let max_future_ms = options.tracking.max_future_seconds.saturating_mul(1000);
        let mut events = Vec::with_capacity(mapped.len());
        for d in &mapped {
            let bytes = encoded_len(d);
            if bytes > MAX_STORED_EVENT_BYTES {
                let reason = format!(
                    "an event of {bytes} bytes, over the 4 MB MongoDB allows a time-series measurement"
                );
                reject(summary, options, reason, &mapped_json(d));
                continue;
            }
            match as_event(d, received_at_ms, max_future_ms) {
                Ok(e) => events.push(e),
                Err(reason) => reject(summary, options, reason, &mapped_json(d)),
            }
        }
        Some(events)
    } else {
        None
    };
    if options.dry_run {
        let shown: Vec<Document> = match &events {
            Some(events) => events
                .iter()
                .filter_map(|e| {
                    let mut d = bson::to_document(e).ok()?;
                    if e.session_id.is_empty() {
                        // Assigned by the inactivity gap when written.
                        d.remove(sluice_core::model::event_fields::SESSION_ID);
                    }
                    Some(d)
                })
                .collect(),
            None => mapped,
        };
        for d in shown
            .into_iter()
            .take(5usize.saturating_sub(summary.preview.len()))
        {
            summary
                .preview
                .push(Bson::Document(d).into_relaxed_extjson());
        }
    } else {
        if let Some(events) = events {
            for chunk in events.chunks(connector.batch_size) {
                let (stored, unchanged) =
                    write_events(store, &connector.name, options, chunk).await?;
                summary.inserted += stored;
                summary.unchanged += unchanged;
                options.progress.upserted.fetch_add(stored, Relaxed);
            }
        } else {
            for chunk in mapped.chunks(connector.batch_size) {
                let sunk = sink_retrying(store, connector, chunk, sink_mode).await?;
                summary.inserted += sunk.inserted;
                summary.updated += sunk.updated;
                summary.unchanged += sunk.unchanged;
                options
                    .progress
                    .upserted
                    .fetch_add(sunk.inserted + sunk.updated + sunk.unchanged, Relaxed);
                // A document MongoDB refuses for good (a duplicate on another unique
                // index, a changed `_id`, over 16 MiB) fails alone: failing the page
                // would fail every later run on it too.
                for (i, reason) in sunk.refused {
                    let reason = format!("MongoDB refused the write: {reason}");
                    reject_at(summary, options, "write", reason, &mapped_json(&chunk[i]));
                }
            }
        }
        // What plugins failed, and what failed mapping or validation, is kept before the
        // checkpoint moves past the page (a page redone keeps its letters once).
        letters.append(&mut summary.rejected);
        summary.dead_letters += store
            .keep_dead_letters(
                letters,
                &format!("import:{}", connector.name),
                Some(&summary.run_id),
            )
            .await?;
        // The page is committed: remember where the next one starts, over this attempt's
        // own checkpoint (claimed as the run started). Found no more, the config was
        // taken while this process was paused past its lease (another run claimed the
        // checkpoint, or finished and dropped it, or a reset did): this one stops.
        let saved = store
            .collection(c::IMPORT_CHECKPOINTS)
            .replace_one(
                own_checkpoint(&connector.name, &summary.attempt),
                doc! {
                    "runId": &summary.run_id,
                    "attempt": &summary.attempt,
                    "spec": fingerprint,
                    "state": serde_json::to_string(next).unwrap_or_default(),
                    "pages": summary.pages as i64,
                    "fetched": summary.fetched as i64,
                    "inserted": summary.inserted as i64,
                    "updated": summary.updated as i64,
                    "unchanged": summary.unchanged as i64,
                    "failed": summary.failed as i64,
                    "skipped": summary.skipped as i64,
                    "deadLetters": summary.dead_letters as i64,
                    "rejectedKept": summary.rejected_kept as i64,
                    "maxCursor": max_cursor.clone().unwrap_or(Bson::Null),
                    "cursorEpochMs": summary.cursor_epoch_ms,
                    // A resumed run must still know it was cut short (it keeps the cursor).
                    "stoppedEarly": summary.stopped_early.clone(),
                    "mappedRecords": summary.mapped_records as i64,
                    "pluginIn": summary.plugin_in as i64,
                    "pluginOut": summary.plugin_out as i64,
                    "pluginDeadLetters": summary.plugin_dead_letters as i64,
                    "fieldHits": summary.field_hits.iter().map(|&h| h as i64).collect::<Vec<_>>(),
                    common::UPDATED_AT: store.now(),
                },
            )
            .await
            .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "save checkpoint"))?;
        if saved.matched_count == 0 {
            return Err(taken_over(summary));
        }
    }
    Ok(())
}

/// A mapped record as the tracking API's event: the event's own fields at the top, every
/// other mapped field in `properties`. It is checked as the tracking endpoint checks a
/// client's event; its properties keep their mapped BSON types (a `date` stays a date).
fn as_event(mapped: &Document, received_at_ms: i64, max_future_ms: i64) -> Result<Event, String> {
    use sluice_core::model::event_fields as e;
    const OWN: [&str; 8] = [
        e::EVENT_ID,
        e::USER_ID,
        e::SESSION_ID,
        e::EVENT_TYPE,
        e::TIMESTAMP,
        e::PAGE_URL,
        e::REFERRER,
        e::DURATION,
    ];
    let mut top = serde_json::Map::new();
    let mut properties = Document::new();
    for (k, v) in mapped {
        if k == e::PROPERTIES {
            match v {
                Bson::Document(d) => properties.extend(d.clone()),
                Bson::Null => {}
                other => {
                    return Err(format!(
                        "field `properties`: expected an object, got {}",
                        plain_json(other)
                    ))
                }
            }
        } else if OWN.contains(&k.as_str()) {
            let value = match v {
                // Epoch milliseconds: the tracking API's other time form, exact.
                Bson::DateTime(t) => Value::from(t.timestamp_millis()),
                other => plain_json(other),
            };
            top.insert(k.clone(), value);
        } else {
            properties.insert(k.clone(), v.clone());
        }
    }
    top.insert(
        e::PROPERTIES.to_string(),
        plain_json(&Bson::Document(properties.clone())),
    );
    let ctx = RequestContext {
        received_at_ms,
        max_future_ms,
        ..Default::default()
    };
    let mut event = parse_event(&Value::Object(top), &ctx, EventMetadata::default())
        .map_err(|e| e.to_string())?;
    // An amount the tracking API would set aside (so as not to lose a client's purchase)
    // is a mapping failure here: the record is kept in `dead_letters`, and the run says so.
    if event.properties.contains_key(e::AMOUNT_UNREAD) && !properties.contains_key(e::AMOUNT_UNREAD)
    {
        let mut sent = event.properties.clone();
        if let Some(amount) = sent.remove(e::AMOUNT_UNREAD) {
            sent.insert(e::AMOUNT, amount);
        }
        return Err(
            sluice_core::tracking::read_amount(event.event_type, &mut sent)
                .err()
                .map_or_else(
                    || "properties.amount: cannot be read".to_string(),
                    |e| e.to_string(),
                ),
        );
    }
    // The mapped types stay, but not where the check read a value as the tracking API
    // stores it: a purchase's amount written as text (`"19.99"`, `"USD 5.00"`) is the
    // number it names, with the currency its text names. Kept as text, it would count as
    // no revenue.
    if event.event_type == sluice_core::model::EventType::Purchase {
        for field in [e::AMOUNT, e::CURRENCY] {
            if let Some(read) = event.properties.get(field) {
                properties.insert(field, read.clone());
            }
        }
    }
    event.properties = properties;
    Ok(event)
}

/// JSON for checking a mapped value: dates as RFC 3339 strings, everything else as
/// relaxed extended JSON.
fn plain_json(v: &Bson) -> Value {
    match v {
        Bson::DateTime(t) => Value::String(
            t.try_to_rfc3339_string()
                .unwrap_or_else(|_| t.timestamp_millis().to_string()),
        ),
        Bson::Document(d) => {
            Value::Object(d.iter().map(|(k, v)| (k.clone(), plain_json(v))).collect())
        }
        Bson::Array(a) => Value::Array(a.iter().map(plain_json).collect()),
        other => other.clone().into_relaxed_extjson(),
    }
}

/// Why a record a transform plugin returned cannot be written to `connector`'s
/// collection: its upsert key is missing or empty, or a top-level field name is one a
/// mapping could not have written (empty, `$`-prefixed, dotted, with a NUL, `_id` unless
/// mapped, or a field Sluice sets itself).
fn plugin_output_problem(connector: &Connector, d: &Document) -> Option<String> {
    if connector.collection != c::EVENTS && !d.get(&connector.key).is_some_and(usable_key) {
        return Some(format!(
            "a transform plugin left the upsert key `{}` missing, empty or not a single value",
            connector.key
        ));
    }
    let mapped = |name: &str| connector.fields.iter().any(|f| f.target == name);
    d.keys()
        .find(|k| {
            !sluice_core::model::is_storable_field_name(k)
                || (k.as_str() == common::ID && !mapped(common::ID))
                || sluice_core::integration::IMPORT_RESERVED_FIELDS.contains(&k.as_str())
        })
        .map(|k| {
            format!(
                "a transform plugin returned the field name {k:?}, which an import cannot write (no `$`, `.`, NUL, `_id` unless mapped, nor {})",
                sluice_core::integration::IMPORT_RESERVED_FIELDS
                    .map(|f| format!("`{f}`"))
                    .join(", ")
            )
        })
}

fn mapped_json(d: &Document) -> Value {
    Bson::Document(d.clone()).into_relaxed_extjson()
}

/// Writes one chunk of imported events through the event writer; returns (stored,
/// already stored). An event another writer is storing at this moment is sent again
/// until that writer's claim is decided; a write MongoDB did not answer is made again
/// with [`Patience`] (the writer is idempotent by eventId: what the first attempt stored
/// is then a duplicate, and a claim it left without its event is completed once its
/// lease has passed).
async fn write_events(
    store: &Store,
    config: &str,
    options: &ImportOptions,
    events: &[Event],
) -> Result<(u64, u64), ImportError> {
    let writer_options = WriterOptions {
        session_gap: std::time::Duration::from_secs(
            options.tracking.session_timeout_minutes.saturating_mul(60),
        ),
        ..WriterOptions::default()
    };
    let patient = writer_options.claim_lease * 2;
    let mut give_up = Instant::now() + patient;
    let writer = EventWriter::new(store.clone(), writer_options);
    let (mut stored, mut unchanged) = (0, 0);
    let mut pending = events.to_vec();
    let mut patience = Patience::new();
    loop {
        let statuses = match writer.write(&pending).await {
            Ok(statuses) => statuses,
            Err(e) if e.is_transient() && patience.wait(config, &e.to_string()).await => {
                // A broken attempt may leave its own claims in their lease: the events
                // are answered retry until it passes, counted from now.
                give_up = Instant::now() + patient;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut again = Vec::new();
        for (event, status) in pending.into_iter().zip(statuses) {
            match status {
                WriteStatus::Stored => stored += 1,
                WriteStatus::Duplicate => unchanged += 1,
                WriteStatus::Retry | WriteStatus::Held { .. } => again.push(event),
            }
        }
        if again.is_empty() {
            return Ok((stored, unchanged));
        }
        if Instant::now() > give_up {
            return Err(ImportError::Sink {
                collection: c::EVENTS.into(),
                message: format!(
                    "{} event(s) (first eventId `{}`) stayed claimed by another writer for longer than its lease",
                    again.len(),
                    again[0].event_id
                ),
                transient: false,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        pending = again;
    }
}

/// Identifies a stored config's settings (its `spec`), to tell whether a checkpoint was
/// taken with them.
fn spec_fingerprint(stored: &Document) -> String {
    use sha2::{Digest, Sha256};
    let spec = stored.get(f::SPEC).cloned().unwrap_or(Bson::Null);
    format!(
        "{:x}",
        Sha256::digest(spec.into_relaxed_extjson().to_string().as_bytes())
    )
}

/// An upsert key that can identify a document: a scalar (a string, number, boolean,
/// date, ObjectId), not an empty or blank string, not a whole double beyond 2^53 (an id
/// the JSON reader rounded, beyond 2^64, or one past a double's exact integers: two such
/// ids could become one document). Not a document, array or regular expression: the key
/// is the upsert's filter, where `{"$gt": ""}` sent by the API would be a query operator
/// matching (and overwriting) another record, an array would match any document holding
/// one of its values, and a regular expression every key it matches.
fn usable_key(k: &Bson) -> bool {
    const TWO_TO_53: f64 = 9_007_199_254_740_992.0;
    match k {
        Bson::String(s) => !s.trim().is_empty(),
        Bson::Double(f) => f.is_finite() && !(f.fract() == 0.0 && f.abs() > TWO_TO_53),
        Bson::Int32(_)
        | Bson::Int64(_)
        | Bson::Decimal128(_)
        | Bson::Boolean(_)
        | Bson::DateTime(_)
        | Bson::ObjectId(_) => true,
        _ => false,
    }
}

/// Makes sure the target has a unique index on the upsert key: without one, every upsert
/// scans the collection and two concurrent upserts of a new key can both insert. Returns
/// whether the key is unique-indexed (an index with another name counts); if the index
/// cannot be built (for example, the collection already holds duplicate keys) the run
/// goes on with upserts only, and says why.
async fn ensure_key_index(store: &Store, connector: &Connector) -> bool {
    use futures_util::TryStreamExt;
    if connector.key == common::ID {
        return true; // `_id` is always unique
    }
    let coll = store.collection(&connector.collection);
    let wanted = doc! { &connector.key: 1 };
    let name = format!("{}_unique", connector.key);
    if let Ok(cursor) = coll.list_indexes().await {
        if let Ok(indexes) = cursor.try_collect::<Vec<_>>().await {
            // Unique over every document with the key. A narrower partial index (say
            // `{active: true}`) refuses no insert outside its filter: inserting first
            // would then add a duplicate per key on every run.
            let every_keyed = doc! { &connector.key: { "$exists": true } };
            let unique = |m: &mongodb::IndexModel| {
                m.keys == wanted
                    && m.options.as_ref().is_some_and(|o| {
                        o.unique == Some(true)
                            && o.partial_filter_expression
                                .as_ref()
                                .is_none_or(|f| *f == every_keyed)
                    })
            };
            // Earlier versions built their key index over every document: rebuilt
            // partial, it stops refusing other writers' documents that lack the key. The
            // schema's own identities (`products.productId_unique`, `users.visitorId_unique`)
            // are over every document by design, and `init` checks them as such: kept.
            let schema_identity = sluice_connectors::mongo::index_specs()
                .iter()
                .any(|s| s.collection == connector.collection && s.name == name);
            let outdated = indexes.iter().find(|m| {
                !schema_identity
                    && unique(m)
                    && m.options.as_ref().is_some_and(|o| {
                        o.name.as_deref() == Some(name.as_str())
                            && o.partial_filter_expression.is_none()
                    })
            });
            if outdated.is_some() && coll.drop_index(&name).await.is_ok() {
                tracing::info!(collection = %connector.collection, index = %name, "rebuilding the key index as partial (documents without the key are not indexed)");
            } else if indexes.iter().any(unique) {
                return true;
            }
        }
    }
    let model = mongodb::IndexModel::builder()
        .keys(wanted)
        .options(
            mongodb::options::IndexOptions::builder()
                .unique(true)
                // Only documents that have the key: other writers' documents without it
                // (tracked users, say, for a key of `crmId`) must not collide as nulls.
                .partial_filter_expression(doc! { &connector.key: { "$exists": true } })
                .name(name)
                .build(),
        )
        .build();
    match coll.create_index(model).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(
                collection = %connector.collection, key = %connector.key, error = %e,
                "no unique index on the upsert key; upserting without one (slower, and concurrent runs may duplicate new keys)"
            );
            false
        }
    }
}

/// What a batch write did.
#[derive(Debug, Default)]
struct Sunk {
    inserted: u64,
    updated: u64,
    /// Matched a stored document that already held exactly these values: not changed,
    /// its `updatedAt` kept.
    unchanged: u64,
    /// Positions in the batch of the records MongoDB refused for good, with its reason.
    refused: Vec<(usize, String)>,
}

/// Write errors about the document itself: MongoDB refuses the same statement whenever it
/// is sent, so running the page again cannot help. BadValue, TypeMismatch,
/// DollarPrefixedFieldName, InvalidDBRef, EmptyFieldName, DottedFieldName, ImmutableField
/// (a changed `_id`), DocumentValidationFailure (a collection validator),
/// BSONObjectTooLarge, geo keys that cannot be extracted, KeyTooLong (before 4.2), and a
/// document grown over 16 MiB by the update. Any other write error may pass later (a
/// stepdown, a write conflict, a full disk): it fails the run, which resumes at the page.
const REFUSED_FOR_GOOD: &[i32] = &[2, 14, 52, 55, 56, 57, 66, 121, 10334, 16755, 17280, 17419];

/// How long a batch's write is tried again while MongoDB does not answer (a dropped
/// connection, an election, a restart), before the run fails on it.
const SINK_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// The pauses between attempts of a batch's write while MongoDB does not answer: 1 s,
/// doubling up to 10 s, within [`SINK_RETRY`].
struct Patience {
    deadline: Instant,
    pause: std::time::Duration,
}

impl Patience {
    fn new() -> Self {
        Self {
            deadline: Instant::now() + SINK_RETRY,
            pause: std::time::Duration::from_secs(1),
        }
    }

    /// Logs `error` and waits before the next attempt; false (and no wait) when that
    /// attempt would start past the deadline.
    async fn wait(&mut self, config: &str, error: &str) -> bool {
        if Instant::now() + self.pause >= self.deadline {
            return false;
        }
        tracing::warn!(config = %config, error = %error, retry_in_seconds = self.pause.as_secs(), "MongoDB did not take a batch of the import; trying again");
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(std::time::Duration::from_secs(10));
        true
    }
}

/// [`sink`], tried again with [`Patience`] while MongoDB does not answer: the upserts by
/// key make a write repeated after a partial one harmless (what the first attempt stored
/// is then counted unchanged or updated, not inserted). A write MongoDB refused is not
/// tried again.
async fn sink_retrying(
    store: &Store,
    connector: &Connector,
    docs: &[Document],
    mode: &mut SinkMode,
) -> Result<Sunk, ImportError> {
    let mut patience = Patience::new();
    loop {
        let mut tried = *mode;
        match sink(store, connector, docs, &mut tried).await {
            Ok(sunk) => {
                *mode = tried;
                return Ok(sunk);
            }
            Err(ImportError::Sink {
                transient: true,
                message,
                ..
            }) if patience.wait(&connector.name, &message).await => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes one batch by key and adapts `mode`.
///
/// Insert-first: `insert_many` (unordered) of the complete documents, then the records
/// it refused (mostly by the unique key index: they exist) go through the upsert. The
/// result is the same document either way: the mapped fields, `updatedAt`, `source` and,
/// for a new document, `createdAt`.
async fn sink(
    store: &Store,
    connector: &Connector,
    docs: &[Document],
    mode: &mut SinkMode,
) -> Result<Sunk, ImportError> {
    // A document MongoDB could never store is refused alone before the write: sent, it
    // fails the driver's whole `insert_many`, or the server's whole `update` command.
    let too_big: Vec<(usize, String)> = docs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let bytes = encoded_len(d);
            (bytes > MAX_STORED_DOCUMENT_BYTES).then(|| {
                (
                    i,
                    format!("a document of {bytes} bytes, over MongoDB's 16 MiB limit"),
                )
            })
        })
        .collect();
    if too_big.is_empty() {
        return sink_sized(store, connector, docs, mode).await;
    }
    let kept: Vec<usize> = (0..docs.len())
        .filter(|i| !too_big.iter().any(|(j, _)| j == i))
        .collect();
    let fitting: Vec<Document> = kept.iter().map(|&i| docs[i].clone()).collect();
    let mut sunk = sink_sized(store, connector, &fitting, mode).await?;
    for (i, _) in &mut sunk.refused {
        *i = kept[*i];
    }
    sunk.refused.extend(too_big);
    sunk.refused.sort_unstable_by_key(|(i, _)| *i);
    Ok(sunk)
}

/// A mapped document this big is refused: with `updatedAt`, `createdAt` and `source`
/// added it would pass MongoDB's 16 MiB (16,777,216 bytes) limit.
const MAX_STORED_DOCUMENT_BYTES: usize = 16 * 1024 * 1024 - 4 * 1024;

/// A mapped event this big is refused: with the fields the writer adds it would pass
/// [`sluice_connectors::mongo::MAX_EVENT_DOCUMENT_BYTES`], the time-series limit.
const MAX_STORED_EVENT_BYTES: usize = sluice_connectors::mongo::MAX_EVENT_DOCUMENT_BYTES - 4 * 1024;

/// [`sink`] of documents that each fit.
async fn sink_sized(
    store: &Store,
    connector: &Connector,
    docs: &[Document],
    mode: &mut SinkMode,
) -> Result<Sunk, ImportError> {
    if docs.is_empty() {
        return Ok(Sunk::default());
    }
    if *mode != SinkMode::InsertFirst {
        let sunk = upsert(store, connector, docs).await?;
        if *mode == SinkMode::Upsert
            && sunk.inserted * 2 > sunk.inserted + sunk.updated + sunk.unchanged
        {
            *mode = SinkMode::InsertFirst;
        }
        return Ok(sunk);
    }
    let now = store.now();
    let full: Vec<Document> = docs
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.insert(common::UPDATED_AT, now);
            d.insert("source", &connector.name);
            d.insert(common::CREATED_AT, now);
            d
        })
        .collect();
    let result = store
        .collection(&connector.collection)
        .insert_many(full)
        .ordered(false)
        .write_concern(store.write_concern().clone())
        .await;
    let failed: Vec<usize> = match result {
        Ok(_) => Vec::new(),
        Err(e) => sluice_connectors::mongo::failed_insert_positions(&e).ok_or_else(|| {
            ImportError::Sink {
                collection: connector.collection.clone(),
                message: e.to_string(),
                transient: sluice_connectors::mongo::is_transient(&e),
            }
        })?,
    };
    let inserted = (docs.len() - failed.len()) as u64;
    if failed.is_empty() {
        return Ok(Sunk {
            inserted,
            ..Sunk::default()
        });
    }
    let rest: Vec<Document> = failed.iter().map(|&i| docs[i].clone()).collect();
    let mut sunk = upsert(store, connector, &rest).await?;
    for (i, _) in &mut sunk.refused {
        *i = failed[*i];
    }
    if failed.len() * 2 > docs.len() {
        *mode = SinkMode::Upsert;
    }
    sunk.inserted += inserted;
    Ok(sunk)
}

/// Bulk unordered upserts by key. A statement refused for a duplicate key is sent once
/// more: another writer may have inserted the same key between its match and its insert
/// (MongoDB retries that itself since 4.2, not every server does), and then it updates.
/// Refused again, the duplicate is on another unique index: the record cannot be stored
/// as it is.
async fn upsert(
    store: &Store,
    connector: &Connector,
    docs: &[Document],
) -> Result<Sunk, ImportError> {
    let now = store.now();
    let statements: Vec<Document> = docs
        .iter()
        .map(|d| keyed_statement(connector, d, now))
        .collect();
    let mut sunk = Sunk::default();
    // Grouped by the statements' size (a statement is several times its record's), and
    // at most MongoDB's `maxWriteBatchSize` statements a command.
    let groups = command_groups(&statements, MAX_UPDATE_COMMAND_BYTES)
        .into_iter()
        .flat_map(|g| {
            (g.start..g.end)
                .step_by(MAX_WRITE_BATCH)
                .map(move |s| s..(s + MAX_WRITE_BATCH).min(g.end))
        });
    for group in groups {
        let start = group.start;
        let part = upsert_group(store, connector, &statements[group]).await?;
        sunk.inserted += part.inserted;
        sunk.updated += part.updated;
        sunk.unchanged += part.unchanged;
        sunk.refused
            .extend(part.refused.into_iter().map(|(i, why)| (start + i, why)));
    }
    Ok(sunk)
}

/// MongoDB's `maxWriteBatchSize`: statements in one write command.
const MAX_WRITE_BATCH: usize = 100_000;

/// [`upsert`] of statements that fit one command.
async fn upsert_group(
    store: &Store,
    connector: &Connector,
    statements: &[Document],
) -> Result<Sunk, ImportError> {
    let first = upsert_once(store, connector, statements).await?;
    let mut sunk = Sunk {
        inserted: first.inserted,
        updated: first.updated,
        unchanged: first.unchanged,
        refused: Vec::new(),
    };
    let mut again = Vec::new();
    for e in first.errors {
        if e.code == sluice_connectors::mongo::DUPLICATE_KEY {
            again.push(e.index);
        } else if REFUSED_FOR_GOOD.contains(&e.code) {
            sunk.refused.push((e.index, e.message));
        } else {
            return Err(write_error(connector, e.code, &e.message));
        }
    }
    if !again.is_empty() {
        let rest: Vec<Document> = again.iter().map(|&i| statements[i].clone()).collect();
        let second = upsert_once(store, connector, &rest).await?;
        sunk.inserted += second.inserted;
        sunk.updated += second.updated;
        sunk.unchanged += second.unchanged;
        for e in second.errors {
            let code = e.code;
            if code == sluice_connectors::mongo::DUPLICATE_KEY || REFUSED_FOR_GOOD.contains(&code) {
                sunk.refused.push((again[e.index], e.message));
            } else {
                return Err(write_error(connector, code, &e.message));
            }
        }
    }
    sunk.refused.sort_unstable_by_key(|(i, _)| *i);
    Ok(sunk)
}

fn write_error(connector: &Connector, code: i32, message: &str) -> ImportError {
    ImportError::Sink {
        collection: connector.collection.clone(),
        message: format!("write error {code}: {message}"),
        transient: false,
    }
}

/// One `update` command's outcome.
struct Upserted {
    inserted: u64,
    updated: u64,
    unchanged: u64,
    /// The statements refused.
    errors: Vec<sluice_connectors::mongo::StatementError>,
}

/// One `update` command carrying an unordered upsert by key for each of `docs`.
async fn upsert_once(
    store: &Store,
    connector: &Connector,
    statements: &[Document],
) -> Result<Upserted, ImportError> {
    if statements.is_empty() {
        return Ok(Upserted {
            inserted: 0,
            updated: 0,
            unchanged: 0,
            errors: Vec::new(),
        });
    }
    let reply = store
        .unordered_updates(&connector.collection, statements.to_vec())
        .await
        .map_err(|e| ImportError::Sink {
            collection: connector.collection.clone(),
            message: e.to_string(),
            transient: sluice_connectors::mongo::is_transient(&e),
        })?;
    // Written, but not as durably as asked: the page is not committed, and the run
    // fails (the next one redoes the page; upserts by key make that harmless).
    if let Some(message) = sluice_connectors::mongo::write_concern_error(&reply) {
        return Err(ImportError::Sink {
            collection: connector.collection.clone(),
            message,
            transient: false,
        });
    }
    let errors = sluice_connectors::mongo::statement_errors(&reply);
    if let Some(e) = errors.iter().find(|e| e.index >= statements.len()) {
        return Err(ImportError::Sink {
            collection: connector.collection.clone(),
            message: format!(
                "write error {} for statement {} of {}: {}",
                e.code,
                e.index,
                statements.len(),
                e.message
            ),
            transient: false,
        });
    }
    let n = reply
        .get_i32("n")
        .map(i64::from)
        .or_else(|_| reply.get_i64("n"))
        .unwrap_or(0) as u64;
    let inserted = reply
        .get_array("upserted")
        .map(|a| a.len() as u64)
        .unwrap_or(0);
    let modified = reply
        .get_i32("nModified")
        .map(i64::from)
        .or_else(|_| reply.get_i64("nModified"))
        .map_or(n.saturating_sub(inserted), |m| m as u64);
    Ok(Upserted {
        inserted,
        updated: modified,
        unchanged: n.saturating_sub(inserted + modified),
        errors,
    })
}

/// The upsert by key of mapped record `d`: one statement of an `update` command.
fn keyed_statement(connector: &Connector, d: &Document, now: DateTime) -> Document {
    // `on_missing = "unset"`: a value the record no longer has is removed.
    let unset: Vec<&str> = connector
        .fields
        .iter()
        .filter(|f| f.unset_missing && !d.contains_key(&f.target))
        .map(|f| f.target.as_str())
        .collect();
    doc! {
        "q": { &connector.key: d.get(&connector.key).cloned().unwrap_or(Bson::Null) },
        "u": keyed_update(d, &connector.name, &unset, now),
        "upsert": true,
    }
}

/// Above this size (as BSON) a record is written with plain update operators, which
/// move `updatedAt` even when nothing changed: the comparing pipeline carries each value
/// twice, and would pass MongoDB's 16 MiB limit on one statement.
const COMPARED_UPDATE_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The update writing mapped record `d` over the document of its key: its fields and
/// `source` set, the `unset` fields removed, `createdAt` set on insert. `updatedAt` moves
/// to `now` only when that changes something, so a re-run of an unchanged API leaves its
/// documents as they were (a push watermarked on `updatedAt` does not send them again,
/// and the run counts them unchanged rather than updated). An update pipeline (MongoDB
/// 4.2+) compares the stored values with the new ones; values go in as `$literal`, so
/// a string such as `$5` is not read as a field path.
fn keyed_update(d: &Document, source: &str, unset: &[&str], now: DateTime) -> Bson {
    let mut set = d.clone();
    set.insert("source", source);
    if encoded_len(d) > COMPARED_UPDATE_MAX_BYTES {
        set.insert(common::UPDATED_AT, now);
        let mut update = doc! { "$set": set, "$setOnInsert": { common::CREATED_AT: now } };
        if !unset.is_empty() {
            let fields: Document = unset
                .iter()
                .map(|f| (f.to_string(), Bson::String(String::new())))
                .collect();
            update.insert("$unset", fields);
        }
        return Bson::Document(update);
    }
    let updated_at = format!("${}", common::UPDATED_AT);
    let mut same = vec![Bson::Document(
        doc! { "$ne": [{ "$type": &updated_at }, "missing"] },
    )];
    let mut values = Document::new();
    for (k, v) in set {
        same.push(Bson::Document(
            doc! { "$eq": [format!("${k}"), { "$literal": v.clone() }] },
        ));
        values.insert(k, doc! { "$literal": v });
    }
    for f in unset {
        same.push(Bson::Document(
            doc! { "$eq": [{ "$type": format!("${f}") }, "missing"] },
        ));
    }
    let mut stages = vec![
        Bson::Document(doc! { "$set": {
            common::UPDATED_AT: { "$cond": [{ "$and": same }, &updated_at, now] },
            common::CREATED_AT: { "$ifNull": [format!("${}", common::CREATED_AT), now] },
        } }),
        Bson::Document(doc! { "$set": values }),
    ];
    if !unset.is_empty() {
        stages.push(Bson::Document(doc! { "$unset": unset.to_vec() }));
    }
    Bson::Array(stages)
}

/// The failures a run keeps listed (`failures`, the latest); `failureCount` counts all.
const FAILURES_KEPT: i64 = 20;

/// The update operators noting `failure` in a run: listed among its latest
/// [`FAILURES_KEPT`], and counted.
fn failure_noted(failure: Document) -> Document {
    doc! {
        "$push": { "failures": { "$each": [failure], "$slice": -FAILURES_KEPT } },
        "$inc": { "failureCount": 1i64 },
    }
}

/// Closes the runs of `name` still recorded RUNNING when a new run of it starts (under
/// the job's lease, so none of them is live): their process stopped without recording
/// it (`kill -9`, a crash), or they were dropped when their scheduled run lost its lease.
/// Each is marked INTERRUPTED with that reason in `failures`; the one the checkpoint
/// belongs to is then resumed under its run id.
async fn close_orphaned_runs(store: &Store, name: &str) -> Result<(), StoreError> {
    let why = "stopped without recording its end: its process stopped, or it lost its lease to another replica";
    let closed = interrupt_running(store, name, doc! {}, why, "close orphaned runs").await?;
    if closed > 0 {
        tracing::warn!(config = name, runs = closed, "{why}; recorded INTERRUPTED");
    }
    Ok(())
}

/// Records INTERRUPTED, with `why` as its error and in `failures`, each run of `name`
/// still RUNNING that `also` selects; how many.
async fn interrupt_running(
    store: &Store,
    name: &str,
    also: Document,
    why: &str,
    step: &'static str,
) -> Result<u64, StoreError> {
    let now = store.now();
    let mut filter = doc! { r::CONFIG: name, r::STATUS: "RUNNING" };
    filter.extend(also);
    let mut update = doc! {
        "$set": { r::STATUS: "INTERRUPTED", "endTime": now, "error": why, common::UPDATED_AT: now },
    };
    update.extend(failure_noted(doc! { "at": now, "error": why }));
    Ok(store
        .collection(c::IMPORT_RUNS)
        .update_many(filter, update)
        .await
        .map_err(StoreError::mongo(c::IMPORT_RUNS, step))?
        .modified_count)
}

/// Closes the runs of `name` still recorded RUNNING that were last written before
/// `lapsed_at`, when the scheduler recorded FAILED the run whose lease lapsed then (its
/// process died, or was given up): INTERRUPTED, with `why` in `failures`. A run started
/// since (or resumed, under the same run id) has written after it, and is left alone.
/// Without this, the run stayed RUNNING in `import_runs` until the config's next run.
pub async fn close_lapsed_runs(
    store: &Store,
    name: &str,
    lapsed_at: DateTime,
    why: &str,
) -> Result<u64, StoreError> {
    let closed = interrupt_running(
        store,
        name,
        doc! { common::UPDATED_AT: { "$lt": lapsed_at } },
        why,
        "close lapsed runs",
    )
    .await?;
    if closed > 0 {
        tracing::warn!(
            config = name,
            runs = closed,
            "{why}; its import run recorded INTERRUPTED"
        );
    }
    Ok(closed)
}

/// This process's latest attempt at each config's import run, named as the run starts.
/// Kept after the run records its end (its record is then no longer RUNNING, so nothing
/// is marked by it).
fn live_attempts() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, String>> {
    static LIVE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        std::sync::LazyLock::new(Default::default);
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A config's key in [`live_attempts`]: by database too, as a process (a test's) may
/// run configs of one name in several.
fn live_key(store: &Store, name: &str) -> String {
    format!("{}\0{name}", store.db().name())
}

/// Marks the RUNNING runs of `configs` that this process's attempts hold INTERRUPTED,
/// with the progress of their last checkpoint: for a process that stops while imports
/// are in flight (their tasks are dropped, so they record nothing themselves). The next
/// run resumes from the checkpoint under the same run id. A run another process has
/// resumed meanwhile (under the same run id) is that process's, and left RUNNING; so is
/// a config this process started no run of.
pub async fn mark_interrupted(store: &Store, configs: &[String]) -> Result<u64, StoreError> {
    let mut marked = 0;
    for name in configs {
        let Some(attempt) = live_attempts().get(&live_key(store, name)).cloned() else {
            continue;
        };
        let checkpoint = store
            .collection(c::IMPORT_CHECKPOINTS)
            .find_one(own_checkpoint(name, &attempt))
            .await
            .map_err(StoreError::mongo(c::IMPORT_CHECKPOINTS, "read checkpoint"))?;
        let now = store.now();
        let mut set = doc! {
            r::STATUS: "INTERRUPTED", "endTime": now, common::UPDATED_AT: now,
            "error": "the process stopped mid-run; the next run resumes from the last checkpoint",
        };
        let mut filter = doc! { r::CONFIG: name, r::STATUS: "RUNNING", "attempt": &attempt };
        if let Some(cp) = &checkpoint {
            for k in [
                "pages",
                "fetched",
                "inserted",
                "updated",
                "unchanged",
                "skipped",
                "deadLetters",
            ] {
                if let Ok(n) = cp.get_i64(k) {
                    set.insert(k, n);
                }
            }
            if let Ok(failed) = cp.get_i64("failed") {
                set.insert("failedMappings", failed);
            }
            if let Ok(run) = cp.get_str("runId") {
                filter.insert(r::RUN_ID, run);
            }
        }
        marked += store
            .collection(c::IMPORT_RUNS)
            .update_many(filter, doc! { "$set": set })
            .await
            .map_err(StoreError::mongo(c::IMPORT_RUNS, "mark interrupted"))?
            .modified_count;
    }
    Ok(marked)
}

/// The checkpoint of `name` if it is attempt `attempt`'s (claimed as its run started):
/// what an attempt may save over or delete.
fn own_checkpoint(name: &str, attempt: &str) -> Document {
    doc! { common::ID: name, "attempt": attempt }
}

/// A checkpoint that only claims the config for a new run's attempt (no page saved yet).
const CLAIM_ONLY: &str = "claimOnly";

/// Whether `checkpoint` is a claim only: no place to resume from, nor to report dropped.
fn claim_only(checkpoint: &Document) -> bool {
    checkpoint.get_bool(CLAIM_ONLY).unwrap_or(false)
}

/// Said when this process finds its run's config taken while it was paused past its
/// lease: the error it stops with.
fn taken_over(summary: &ImportSummary) -> ImportError {
    tracing::warn!(config = %summary.name, run = %summary.run_id, "run taken over while this process was stopped past its lease; its checkpoint, cursor and end are left to the run that holds the config now");
    ImportError::TakenOver(summary.run_id.clone())
}

/// What an attempt no process may hold any more is named.
const SUPERSEDED: &str = "superseded";

/// Takes every run of `name` from the attempt that held it: a process paused past its
/// lease then finds, when it wakes, that it holds no run (see [`holds_run`]), and stops
/// before it writes a checkpoint, a cursor or a run's end.
async fn supersede_attempts(store: &Store, name: &str) -> Result<(), StoreError> {
    store
        .collection(c::IMPORT_RUNS)
        .update_many(
            doc! { r::CONFIG: name, "attempt": { "$exists": true, "$ne": SUPERSEDED } },
            doc! { "$set": { "attempt": SUPERSEDED } },
        )
        .await
        .map_err(StoreError::mongo(
            c::IMPORT_RUNS,
            "supersede earlier attempts",
        ))?;
    Ok(())
}

/// Whether this process's attempt still holds its run: no other process has started a
/// run of the config since (a sweeper closing it INTERRUPTED leaves it held, and its end
/// is still ours).
async fn holds_run(store: &Store, s: &ImportSummary) -> Result<bool, StoreError> {
    Ok(store
        .collection(c::IMPORT_RUNS)
        .count_documents(doc! { r::RUN_ID: &s.run_id, "attempt": &s.attempt })
        .await
        .map_err(StoreError::mongo(c::IMPORT_RUNS, "check the run is held"))?
        > 0)
}

/// Records the run's state. Its start (and a run that could not start) creates the record
/// and names this attempt in it; later writes change it only while this attempt holds it,
/// so a process woken past its lease cannot overwrite the run another process resumed.
async fn record_run(
    store: &Store,
    s: &ImportSummary,
    status: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let now = store.now();
    let claims = status == "RUNNING" || s.attempt.is_empty();
    let samples = bson::to_bson(&s.samples).unwrap_or(Bson::Array(Vec::new()));
    let mut update = doc! {
                "$set": {
                    r::CONFIG: &s.name, r::STATUS: status, "pages": s.pages as i64,
                    "fetched": s.fetched as i64, "inserted": s.inserted as i64,
                    "updated": s.updated as i64, "unchanged": s.unchanged as i64,
                    "failedMappings": s.failed as i64,
                    "deadLetters": s.dead_letters as i64,
                    "skipped": s.skipped as i64,
                    "samples": samples, "error": error, "resumed": s.resumed,
                    "stoppedEarly": s.stopped_early.clone(),
                    "endTime": if status == "RUNNING" { Bson::Null } else { Bson::DateTime(now) },
                    common::UPDATED_AT: now,
                },
                // A resumed run keeps the warnings of its earlier attempts.
                "$addToSet": { "warnings": { "$each": &s.warnings } },
                "$setOnInsert": { r::START_TIME: now, common::CREATED_AT: now },
    };
    if status == "FAILED" {
        // A resumed run reuses the run id; its earlier failures stay on record, the last
        // `FAILURES_KEPT` of them, all counted: a config failing at the same page on
        // every fire for months must not grow its run past MongoDB's 16 MB.
        update.extend(failure_noted(
            doc! { "at": now, "error": error, "pages": s.pages as i64 },
        ));
    }
    let mut filter = doc! { r::RUN_ID: &s.run_id };
    if claims {
        if let (false, Ok(set)) = (s.attempt.is_empty(), update.get_document_mut("$set")) {
            set.insert("attempt", &s.attempt);
        }
    } else {
        filter.insert("attempt", &s.attempt);
    }
    let written = store
        .collection(c::IMPORT_RUNS)
        .update_one(filter, update)
        .upsert(claims)
        .await
        .map_err(StoreError::mongo(c::IMPORT_RUNS, "record run"))?;
    if written.matched_count == 0 && !claims {
        tracing::warn!(config = %s.name, run = %s.run_id, status, "run not recorded: another process resumed it while this one was stopped past its lease");
    }
    Ok(())
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PushSummary {
    pub name: String,
    pub read: u64,
    pub sent: u64,
    pub requests: u64,
    pub failed: u64,
    pub samples: Vec<Rejected>,
    /// Records transform plugins failed under the dead-letter policy (in `dead_letters`).
    pub dead_letters: u64,
    /// Of those, what the plugins failed in this run, whether or not an earlier run kept
    /// the same letters already.
    #[serde(skip)]
    pub plugin_failed: u64,
    /// Records transform plugins dropped under the skip-batch policy: not sent, and the
    /// position moves past them.
    pub skipped: u64,
    /// Documents the filter selects whose date watermark is newer than `settle_seconds`:
    /// not read this run, sent by a later one (counted up to [`SETTLING_COUNTED`]).
    pub settling: u64,
}

/// A push run in one line (`sluice import run`, and a scheduled run's result).
pub fn push_line(s: &PushSummary) -> String {
    let mut line = format!(
        "{} read, {} sent in {}, {} failed mapping, {} skipped by a plugin",
        s.read,
        s.sent,
        sluice_core::counted(s.requests, "request"),
        s.failed,
        s.skipped
    );
    if s.plugin_failed > 0 {
        line.push_str(&format!(
            ", {} failed by a plugin (in dead_letters)",
            s.plugin_failed
        ));
    }
    if s.settling > 0 {
        let more = if s.settling >= SETTLING_COUNTED {
            "+"
        } else {
            ""
        };
        line.push_str(&format!(
            "; {}{more} newer than `settle_seconds` wait for a later run",
            s.settling
        ));
    }
    line
}

/// A push's result, as a scheduled run records it: failed when it read documents and
/// sent none, every one failing mapping or a plugin (as an import that stores none).
pub fn push_outcome(s: &PushSummary) -> Result<String, String> {
    let line = push_line(s);
    if s.failed + s.plugin_failed > 0 && s.sent + s.skipped == 0 {
        return Err(format!(
            "{line}: every document failed (mapping or a plugin) and none was sent; the reasons are in `dead_letters`"
        ));
    }
    Ok(line)
}

/// The most documents counted in [`PushSummary::settling`].
pub const SETTLING_COUNTED: u64 = 100_000;

/// Whether `e` says the server closed the cursor being read (`CursorNotFound`, after ten
/// idle minutes, or `CursorKilled`).
pub(crate) fn cursor_lost(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 43 || c.code == 237)
}

/// Documents whose `path` sorts after `value` (`op` `$gt`, or `$gte` to take ties), in
/// MongoDB's sort order across types: `$gt` alone matches only values of `value`'s type
/// (type bracketing), so a read resumed from a position would pass over later documents
/// whose value is of a type sorting after it (an ObjectId `_id` after numeric ones, a
/// date watermark after strings), which one sorted read takes in order.
pub(crate) fn sorting_after(path: &str, value: &Bson, op: &str) -> Document {
    let later = types_sorting_after(value);
    let same_type = doc! { path: { op: value.clone() } };
    if later.is_empty() {
        return same_type;
    }
    doc! { "$or": [same_type, { path: { "$type": later } }] }
}

/// The `$type` aliases of the types MongoDB sorts after `value`'s, in its comparison
/// order (MinKey, null, numbers, strings, objects, arrays, binary, ObjectId, booleans,
/// dates, timestamps, regular expressions, MaxKey).
fn types_sorting_after(value: &Bson) -> Vec<&'static str> {
    const ORDER: [&[&str]; 12] = [
        &["null", "undefined"],
        &["int", "long", "double", "decimal"],
        &["symbol", "string"],
        &["object"],
        &["array"],
        &["binData"],
        &["objectId"],
        &["bool"],
        &["date"],
        &["timestamp"],
        &["regex"],
        &["maxKey"],
    ];
    let rank = match value {
        Bson::MinKey => return ORDER.concat(),
        Bson::Null | Bson::Undefined => 0,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 1,
        Bson::Symbol(_) | Bson::String(_) => 2,
        Bson::Document(_) => 3,
        Bson::Array(_) => 4,
        Bson::Binary(_) => 5,
        Bson::ObjectId(_) => 6,
        Bson::Boolean(_) => 7,
        Bson::DateTime(_) => 8,
        Bson::Timestamp(_) => 9,
        Bson::RegularExpression(_) => 10,
        Bson::MaxKey => 11,
        // JavaScript and the like: no place in the order to go on from.
        _ => return Vec::new(),
    };
    ORDER[rank + 1..].concat()
}

/// Where a pushed batch lies in the (watermark, `_id`) order: its first and last
/// documents as read, in canonical extended JSON.
fn batch_span(batch: &[Document], watermark: Option<&str>) -> String {
    let at = |d: Option<&Document>| {
        let d = d.cloned().unwrap_or_default();
        let value = watermark.map(|w| {
            sluice_core::model::at_path(&d, w)
                .cloned()
                .unwrap_or(Bson::Null)
        });
        let id = d.get(common::ID).cloned().unwrap_or(Bson::Null);
        Bson::Array(vec![value.unwrap_or(Bson::Null), id])
            .into_canonical_extjson()
            .to_string()
    };
    format!("{}\n{}", at(batch.first()), at(batch.last()))
}

/// An EXPORT batch's `Idempotency-Key`: the SHA-256, in hex, of the config's name, the
/// batch's place in the read order and its body. A retry, or a later run sending the same
/// batch again after a lost answer, carries the same key; a later batch that happens to
/// have the same body (a document back to an earlier state, under a newer watermark) or
/// another config's batch does not, so a receiver that drops repeated keys keeps it.
fn idempotency_key(config: &str, span: &str, body: &Value) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [config, "\0", span, "\0", &body.to_string()] {
        hash.update(part.as_bytes());
    }
    format!("{:x}", hash.finalize())
}

/// How often a push saves its position while it runs.
const POSITION_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Stores an EXPORT's position: the watermark value and `_id` of the last document handled.
async fn advance_watermark(
    store: &Store,
    name: &str,
    high: Option<(Bson, Bson)>,
) -> Result<(), ImportError> {
    let Some((value, id)) = high else {
        return Ok(());
    };
    store
        .collection(c::INTEGRATION_CONFIGS)
        .update_one(
            doc! { f::NAME: name },
            doc! { "$set": { f::SYNC_CURSOR: value, f::SYNC_CURSOR_ID: id } },
        )
        .await
        .map_err(StoreError::mongo(
            c::INTEGRATION_CONFIGS,
            "advance watermark",
        ))?;
    Ok(())
}

/// `filter` narrowed by `more` (just `more` when `filter` selects everything).
fn and_filter(filter: Document, more: Document) -> Document {
    if filter.is_empty() {
        more
    } else {
        doc! { "$and": [filter, more] }
    }
}

/// Runs an EXPORT config: documents above the watermark, mapped, pushed in batches; the
/// position moves past each batch the endpoint accepted, and is saved at most once a
/// second and as the run ends.
pub async fn run_push(
    store: &Store,
    name: &str,
    options: &ImportOptions,
) -> Result<PushSummary, ImportError> {
    use futures_util::TryStreamExt;
    let (connector, stored) = load_connector(store, name, IntegrationType::Export, options).await?;
    let chain = chain_for(&connector, &options.transforms)?;
    options.progress.pushing.store(true, Relaxed);
    let push = connector
        .push
        .clone()
        .ok_or_else(|| ImportError::Unknown(name.to_string()))?;
    let connector = Arc::new(connector);
    let http = http_client(store, name, &connector, options).await?;
    let mut filter: Document = match &push.filter {
        // Validated when the config was applied; refused here too rather than widened.
        Some(f) => sluice_core::integration::push_filter(f).map_err(|expected| {
            ImportError::Config(ConfigError::Invalid {
                origin: format!("integration `{name}`"),
                field: "push.filter".into(),
                expected,
            })
        })?,
        None => Document::new(),
    };
    let watermark = push.watermark_field.clone();
    // Documents are read in (watermark, _id) order and the position after an accepted
    // batch is both values: documents sharing a watermark value on both sides of a batch
    // boundary are neither skipped nor sent twice.
    // Documents without the watermark field (or with `null`) sort first, as null; a
    // position among them is (null, _id).
    // Where the read goes on from: the saved (watermark, `_id`) at first, then the last
    // document of each batch read. Without a watermark every run reads everything, in
    // `_id` order, and only the batches within a run move on by `_id`.
    let mut position: Option<(Bson, Option<Bson>)> = watermark.as_ref().map(|_| {
        (
            stored.get(f::SYNC_CURSOR).cloned().unwrap_or(Bson::Null),
            stored
                .get(f::SYNC_CURSOR_ID)
                .filter(|b| **b != Bson::Null)
                .cloned(),
        )
    });
    let after = |position: &Option<(Bson, Option<Bson>)>| -> Option<Document> {
        let (cursor, id) = position.clone()?;
        Some(match (&watermark, cursor, id) {
            (Some(w), Bson::Null, Some(id)) => doc! { "$or": [
                { "$and": [{ w: Bson::Null }, sorting_after(common::ID, &id, "$gt")] },
                { w: { "$ne": Bson::Null } },
            ] },
            (Some(_), Bson::Null, None) => return None,
            (Some(w), cursor, Some(id)) => doc! { "$or": [
                sorting_after(w, &cursor, "$gt"),
                { "$and": [{ w: cursor }, sorting_after(common::ID, &id, "$gt")] },
            ] },
            // A position stored without its `_id` (by an earlier version): ties with it
            // are sent again rather than skipped.
            (Some(w), cursor, None) => sorting_after(w, &cursor, "$gte"),
            (None, _, Some(id)) => sorting_after(common::ID, &id, "$gt"),
            (None, _, None) => return None,
        })
    };
    // A date watermark is stamped before its write commits: one stamped earlier than a
    // document already sent, but committed after it, would fall behind the position and
    // never be sent. Only dates older than the settle time are read (other watermark
    // types are read as they are); the rest wait for the next run.
    let mut settling_filter = None;
    if let (Some(w), true) = (&watermark, push.settle_seconds > 0) {
        let settled = DateTime::from_millis(
            store.now().timestamp_millis() - (push.settle_seconds as i64).saturating_mul(1000),
        );
        settling_filter = Some(and_filter(filter.clone(), doc! { w: { "$gte": settled } }));
        let settled = doc! { "$or": [
            { w: { "$lt": settled } },
            { w: { "$not": { "$type": "date" } } },
        ] };
        filter = and_filter(filter, settled);
    }
    let source = store.collection(&push.collection);
    let sort = match &watermark {
        Some(w) => doc! { w: 1, common::ID: 1 },
        None => doc! { common::ID: 1 },
    };
    let mut summary = PushSummary {
        name: name.to_string(),
        ..Default::default()
    };
    // One sorted read. A cursor idle for ten minutes (slow pushes: a rate limit, retries,
    // an API's `Retry-After`) is closed by the server: it is opened again from the last
    // batch handled (the position, in MongoDB's sort order across types), and the batch
    // being read is read again whole.
    let read_err = || StoreError::mongo(&push.collection, "read for push");
    let open = |position: &Option<(Bson, Option<Bson>)>| {
        let query = match after(position) {
            Some(after) => and_filter(filter.clone(), after),
            None => filter.clone(),
        };
        source.find(query).sort(sort.clone())
    };
    // The position after the last batch accepted, saved at most once a second (and
    // whenever the run ends, failing or not): a save after every batch cost nearly half
    // the push's time. A process killed in between sends up to a second of batches again,
    // with the same `Idempotency-Key`s (the same batches, from the same position).
    let mut unsaved: Option<(Bson, Bson)> = None;
    let mut saved_at = Instant::now();
    let pushed: Result<bool, ImportError> = async {
    let mut cursor = open(&position).await.map_err(read_err())?;
    let mut reopened = 0;
    let mut stopped = false;
    let max_bytes = (push.max_batch_mb as usize) << 20;
    loop {
        // Asked to stop (a signal to `import run`): the position is saved as the run
        // ends, so the next run goes on from here.
        if options.progress.stop.load(Relaxed) {
            stopped = true;
            break;
        }
        let mut batch: Vec<Document> = Vec::with_capacity(push.batch_size.min(1024));
        let mut batch_bytes = 0;
        while batch.len() < push.batch_size && batch_bytes < max_bytes {
            match cursor.try_next().await {
                Ok(Some(d)) => {
                    reopened = 0;
                    batch_bytes += crate::export::approx_bytes(&d);
                    batch.push(d);
                }
                Ok(None) => break,
                Err(e) if cursor_lost(&e) && reopened < 3 => {
                    reopened += 1;
                    tracing::warn!(config = name, "the push's cursor was closed by the server (idle too long); reading on from the last batch sent");
                    batch.clear();
                    batch_bytes = 0;
                    cursor = open(&position).await.map_err(read_err())?;
                }
                Err(e) => return Err(read_err()(e).into()),
            }
        }
        summary.read += batch.len() as u64;
        if batch.is_empty() {
            break;
        }
        // The position after this batch: its last document as read (in watermark order),
        // whatever the transforms make of it. A dotted watermark (`meta.updatedAt`) is a
        // path, as the read's sort takes it. Without an `_id` (a view projecting it out)
        // there is no place to go on from: the same batch would be read again for ever.
        if batch.last().is_some_and(|d| !d.contains_key(common::ID)) {
            return Err(ImportError::Config(ConfigError::Invalid {
                origin: format!("integration `{name}`"),
                field: "push.collection".into(),
                expected: format!(
                    "documents with an `_id` (`{}` returned one without: a view projecting it out?)",
                    push.collection
                ),
            }));
        }
        if let Some(last) = batch.last() {
            let value = watermark
                .as_ref()
                .and_then(|w| sluice_core::model::at_path(last, w).cloned())
                .unwrap_or(Bson::Null);
            position = Some((value, last.get(common::ID).cloned()));
        }
        let high = match (&watermark, &position) {
            (Some(_), Some((value, Some(id)))) => Some((value.clone(), id.clone())),
            _ => None,
        };
        let span = batch_span(&batch, watermark.as_deref());
        let applied = apply_off_runtime(&chain, std::mem::take(&mut batch)).await?;
        if let Some(first) = applied.skipped.first() {
            if summary.skipped == 0 {
                tracing::warn!(config = name, plugin = %first.transform, reason = %first.reason, "a plugin skipped records under the skip-batch policy; they are not sent and the position moves past them");
            }
            summary.skipped += applied.skipped.len() as u64;
        }
        let docs = applied.records;
        summary.plugin_failed += applied.dead_letters.len() as u64;
        summary.dead_letters += store
            .keep_dead_letters(applied.dead_letters, &format!("push:{name}"), None)
            .await?;
        let mut records = Vec::with_capacity(docs.len());
        // Documents that fail mapping are not sent, and the position moves past them:
        // they are kept in `dead_letters` (plugin `mapping`) so nothing goes unnoticed.
        let mut unmapped = Vec::new();
        for d in &docs {
            let json = Bson::Document(d.clone()).into_relaxed_extjson();
            if connector.fields.is_empty() {
                records.push(json);
                continue;
            }
            match map_record(&connector.fields, &json) {
                Ok(m) => records.push(Bson::Document(m).into_relaxed_extjson()),
                Err(reason) => {
                    summary.failed += 1;
                    options.progress.failed.fetch_add(1, Relaxed);
                    unmapped.push(sluice_core::transform::DeadLetter {
                        transform: "mapping".into(),
                        reason: reason.clone(),
                        record: d.clone(),
                    });
                    if summary.samples.len() < MAX_SAMPLES {
                        summary.samples.push(Rejected {
                            reason,
                            record: json,
                        });
                    }
                }
            }
        }
        summary.dead_letters += store
            .keep_dead_letters(unmapped, &format!("push:{name}"), None)
            .await?;
        if !records.is_empty() {
            let body = if push.wrap.is_empty() {
                Value::Array(records.clone())
            } else {
                serde_json::json!({ push.wrap.clone(): records })
            };
            let key = idempotency_key(name, &span, &body);
            http.push(connector.method, &connector.endpoint.text, &body, &key)
                .await
                .map_err(|e| match e {
                    // The receiver's size limit: the way out is on this side.
                    HttpError::Status {
                        url,
                        status: 413,
                        body,
                    } => HttpError::Status {
                        url,
                        status: 413,
                        body: format!(
                            "{body} (a batch of {} records was too large for the receiver: lower `push.batch_size` or `push.max_batch_mb`)",
                            records.len()
                        ),
                    },
                    other => other,
                })?;
            summary.sent += records.len() as u64;
            summary.requests += 1;
            options.progress.pages.fetch_add(1, Relaxed);
            options
                .progress
                .records
                .fetch_add(records.len() as u64, Relaxed);
        }
        // The batch was handled (accepted, or nothing of it left to send): move past it.
        unsaved = high.or(unsaved.take());
        if saved_at.elapsed() >= POSITION_SAVE_EVERY {
            // Kept until the save succeeds: a failed save is tried again as the run ends.
            advance_watermark(store, name, unsaved.clone()).await?;
            unsaved = None;
            saved_at = Instant::now();
        }
    }
    Ok(stopped)
    }
    .await;
    // However the run ends: the batches accepted so far are not sent again.
    let saved = advance_watermark(store, name, unsaved.take()).await;
    let stopped = match (pushed, saved) {
        (Err(e), Err(lost)) => {
            tracing::error!(config = name, error = %lost, "could not save the push's position: the next run sends the last second's batches again (same Idempotency-Keys)");
            return Err(e);
        }
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        (Ok(stopped), Ok(())) => stopped,
    };
    if let (false, Some(settling)) = (stopped, settling_filter) {
        // Said, so a run that sends nothing because everything is still settling does not
        // read as a run that found nothing.
        match source
            .count_documents(settling)
            .limit(SETTLING_COUNTED)
            .await
        {
            Ok(n) => summary.settling = n,
            Err(e) => {
                tracing::warn!(config = name, error = %e, "could not count the documents waiting out settle_seconds")
            }
        }
    }
    if !stopped {
        store
            .collection(c::INTEGRATION_CONFIGS)
            .update_one(
                doc! { f::NAME: name },
                doc! { "$set": { f::LAST_SYNC: store.now() } },
            )
            .await
            .map_err(StoreError::mongo(
                c::INTEGRATION_CONFIGS,
                "advance lastSync",
            ))?;
    }
    let labels = [("config", name)];
    if let Ok(h) = http.stats.lock() {
        http_metrics(name, &h);
    }
    let help =
        "Records pushed by EXPORT configs, by config and stage (read, sent, failed mapping, skipped by a plugin).";
    for (stage, n) in [
        ("read", summary.read),
        ("sent", summary.sent),
        ("failed", summary.failed),
        ("skipped", summary.skipped),
    ] {
        let l = [labels[0], ("stage", stage)];
        sluice_core::metrics::count("sluice_push_records_total", help, &l, n);
    }
    Ok(summary)
}

/// Runs `batch` through `chain` on a blocking thread: a plugin call may take up to its
/// deadline (more while a failing batch is narrowed down), which would stall every task
/// of an async worker thread, the tracking endpoint's included.
async fn apply_off_runtime(
    chain: &[Arc<dyn Transform>],
    batch: Vec<Document>,
) -> Result<Applied, TransformError> {
    if chain.is_empty() {
        return Ok(Applied::untouched(batch));
    }
    let chain = chain.to_vec();
    tokio::task::spawn_blocking(move || apply_chain(&chain, batch))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_imported_purchase_amount_written_as_text_is_stored_as_its_number() {
        let at = bson::DateTime::from_millis(1_700_000_000_000);
        let mapped = |amount: Bson| {
            doc! { "eventId": "e1", "userId": "v1", "eventType": "PURCHASE",
            "timestamp": at, "amount": amount, "settledAt": at }
        };
        let now = 1_700_000_100_000;
        for (text, number, currency) in [
            ("19.99", 19.99, None),
            ("USD 5.00", 5.0, Some("USD")),
            ("$1,299.00", 1299.0, None),
        ] {
            let e = as_event(&mapped(Bson::String(text.into())), now, 0).unwrap();
            assert_eq!(e.properties.get_f64("amount").unwrap(), number, "{text}");
            assert_eq!(e.properties.get_str("currency").ok(), currency, "{text}");
            assert_eq!(sluice_core::model::amount_of(&e.properties), Some(number));
            // Other mapped values keep their types.
            assert_eq!(e.properties.get_datetime("settledAt").unwrap(), &at);
        }
        // What the tracking API would set aside is a mapping failure here.
        for bad in [
            Bson::String("1,299".into()),
            Bson::Int32(-5),
            Bson::Double(1e300),
        ] {
            let err = as_event(&mapped(bad.clone()), now, 0).unwrap_err();
            assert!(err.contains("properties.amount"), "{bad}: {err}");
        }
        // A number stays as mapped; another event type's text amount is its own business.
        let e = as_event(&mapped(Bson::Int32(7)), now, 0).unwrap();
        assert_eq!(e.properties.get_i32("amount").unwrap(), 7);
        let mut click = mapped(Bson::String("19.99".into()));
        click.insert("eventType", "CLICK");
        let e = as_event(&click, now, 0).unwrap();
        assert_eq!(e.properties.get_str("amount").unwrap(), "19.99");
    }

    #[test]
    fn a_sample_of_a_wide_record_keeps_its_small_fields_wherever_they_stand() {
        let mut record = serde_json::Map::new();
        for i in 0..100 {
            record.insert(format!("f{i:03}"), Value::String("x".repeat(500)));
            if i == 90 {
                record.insert("sku".into(), Value::String("SKU-42".into()));
            }
        }
        let mut summary = ImportSummary::default();
        reject(
            &mut summary,
            &ImportOptions::default(),
            "no".into(),
            &Value::Object(record),
        );
        let sample = summary.samples[0].record.as_object().unwrap();
        assert_eq!(sample["sku"], "SKU-42", "{sample:?}");
        assert_eq!(sample["_omittedFields"], 101 - SAMPLE_FIELDS);
        assert_eq!(sample.len(), SAMPLE_FIELDS + 1);
        // In the record's order (equal sizes: the first ones).
        let names: Vec<&str> = sample.keys().map(String::as_str).collect();
        let mut expected: Vec<String> =
            (0..SAMPLE_FIELDS - 1).map(|i| format!("f{i:03}")).collect();
        expected.extend(["sku".to_string(), "_omittedFields".to_string()]);
        assert_eq!(names, expected);
        assert!(serde_json::to_string(sample).unwrap().len() < 2 * MAX_SAMPLE_BYTES);
        // The dead letter keeps the record whole.
        assert_eq!(summary.rejected[0].record.len(), 101);
    }

    #[test]
    fn cursor_numbers_compare_by_value_whatever_their_bson_type() {
        assert!(greater(&Bson::Int32(7), &Bson::Int64(5)));
        assert!(greater(&Bson::Int64(1 << 40), &Bson::Int32(i32::MAX)));
        assert!(greater(&Bson::Double(5.5), &Bson::Int64(5)));
        assert!(!greater(&Bson::Int64(5), &Bson::Double(5.5)));
        assert!(
            greater(&Bson::Int64(i64::MAX), &Bson::Int64(i64::MAX - 1)),
            "exact"
        );
        assert!(
            !greater(&Bson::String("9".into()), &Bson::Int64(1)),
            "kinds apart"
        );
    }

    #[test]
    fn empty_and_blank_keys_are_not_upserted() {
        for bad in [
            Bson::Null,
            Bson::String(String::new()),
            Bson::String("  ".into()),
            // 123456789012345678901234 as the JSON reader holds it: rounded.
            Bson::Double(1.2345678901234568e23),
            Bson::Double(f64::NAN),
            // The filter would read them as an operator, any of the values, a pattern.
            Bson::Document(bson::doc! { "$gt": "" }),
            Bson::Document(bson::doc! { "id": 1 }),
            Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]),
            Bson::RegularExpression(bson::Regex {
                pattern: ".*".into(),
                options: String::new(),
            }),
        ] {
            assert!(!usable_key(&bad), "{bad:?}");
        }
        for good in [
            Bson::String("0".into()),
            Bson::Int64(0),
            Bson::Boolean(false),
            Bson::Double(2.5),
            Bson::Double(9_007_199_254_740_992.0),
        ] {
            assert!(usable_key(&good), "{good:?}");
        }
    }
}
