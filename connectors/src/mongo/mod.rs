//! The MongoDB store: one [`Store`] per process, sharing the driver's connection pool.

pub mod check;
mod clock;
pub mod identities;
mod ingest;
pub mod ledger;
mod letters;
mod schema;
mod sessions;

pub use clock::ServerClock;
pub use ingest::{
    count_sessions_unread, EventWriter, WriteStatus, WriterOptions, WRITE_PHASES,
    WRITE_PHASE_SECONDS,
};
pub use letters::{dead_letter_groups, purge_dead_letters, LetterGroup};
pub use schema::{index_specs, IndexOutcome, IndexSpec, InitReport, SCHEDULED_RUNS_KEPT_DAYS};
pub use sessions::expire_idle_sessions;

use bson::Bson;
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Database};
use sluice_core::config::{Config, WriteConcernLevel};

/// Duplicate key: the server's code for an insert that a unique index refused.
pub const DUPLICATE_KEY: i32 = 11000;

/// How long a write waits for the nodes its write concern names (`wtimeout`) before it
/// fails with a write concern error. Without it, a replica set that has lost its majority
/// (a PSA set with the secondary down) holds every write, and the connection carrying
/// it, for as long as the outage lasts. The write stays applied on the primary (a
/// failover may still roll it back), so it fails like any write whose outcome is unknown
/// and is made again: events are answered retry and a resend finds what was stored,
/// imports upsert by key, a transaction's commit is retried.
pub const WRITE_CONCERN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// [`WRITE_CONCERN_TIMEOUT`] for claims and leases, which cannot wait that long: a lease
/// is renewed every third of its length (20 s by default).
pub const LEASE_WRITE_CONCERN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The server's error code of a command or single-write failure, if it has one.
pub fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::ErrorKind;
    match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// Whether a write was applied by the primary but not acknowledged by the write concern
/// in time (`wtimeout`): it may still be there, so what it wrote must be read back.
pub fn is_write_concern_error(err: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(
        err.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteConcernError(_))
    ) || matches!(err.kind.as_ref(), ErrorKind::InsertMany(e) if e.write_concern_error.is_some())
}

/// Whether an insert failed because a unique index already holds the key.
pub fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    error_code(err) == Some(DUPLICATE_KEY)
}

/// A majority write concern, journaled, for writes that must survive a failover whatever
/// `mongodb.write_concern` says (claims, leases, admin role changes). A majority that
/// cannot be reached (a degraded replica set) fails the write after
/// [`LEASE_WRITE_CONCERN_TIMEOUT`] rather than blocking it for ever.
pub fn majority_write_concern() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(LEASE_WRITE_CONCERN_TIMEOUT)
        .build()
}

impl StoreError {
    /// Whether trying again later may succeed: the server was unreachable, a primary was
    /// being elected, or the driver labelled the error retryable; not a write the server
    /// refused.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect(e) | StoreError::Mongo { error: e, .. } => is_transient(e),
            // A transaction that spent its attempts on conflicts or failovers may pass
            // later; one MongoDB refused outright will not.
            StoreError::Transaction { transient, .. } => *transient,
            StoreError::NotDurable { .. } => true,
            _ => false,
        }
    }
}

/// Whether trying a driver call again later may succeed (see [`StoreError::is_transient`]).
pub fn is_transient(source: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        source.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::ConnectionPoolCleared { .. }
    ) || matches!(source.kind.as_ref(), ErrorKind::Command(c) if transient_code(c.code))
        || source.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || source.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
}

/// Whether a server error code says the write may succeed if sent again: the codes the
/// retryable-writes specification retries (a primary stepping down or shutting down, a
/// network failure between servers). A raw command (`run_command`) is never retried by
/// the driver nor labelled retryable, so its callers check the code themselves.
pub fn transient_code(code: i32) -> bool {
    matches!(
        code,
        6 | 7 | 89 | 91 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436
    )
}

/// Whether a write that failed this way may still be applied by the server: the
/// connection broke or no server could be reached while it was under way (the driver's
/// own retry included), so the server may have it, or be applying it now. Not an answer
/// from the server (a refusal, a write concern error), which says what was written.
pub fn outcome_unknown(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        err.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::ConnectionPoolCleared { .. }
    )
}

/// The statements an unordered `insert_many` refused, when that is all that failed (no
/// write concern error, nothing else).
fn refused_inserts(err: &mongodb::error::Error) -> Option<&[mongodb::error::IndexedWriteError]> {
    match err.kind.as_ref() {
        mongodb::error::ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => {
            m.write_errors.as_deref()
        }
        _ => None,
    }
}

/// For an unordered `insert_many` that failed only because unique indexes refused some
/// documents: the positions of those documents. `None` for any other failure.
pub fn duplicate_key_positions(err: &mongodb::error::Error) -> Option<Vec<usize>> {
    let errors = refused_inserts(err)?;
    errors
        .iter()
        .all(|e| e.code == DUPLICATE_KEY)
        .then(|| errors.iter().map(|e| e.index).collect())
}

/// For an unordered `insert_many` whose failure is only statements refused: the
/// positions of the refused documents, whatever the reason. `None` for any other failure.
pub fn failed_insert_positions(err: &mongodb::error::Error) -> Option<Vec<usize>> {
    refused_inserts(err)
        .filter(|errors| !errors.is_empty())
        .map(|errors| errors.iter().map(|e| e.index).collect())
}

/// What an index in the way of Sluice's says: whose name or keys it has, and what to do.
fn index_conflict_text(collection: &str, name: &str, existing: &str, ours: Option<&str>) -> String {
    let drop = format!("`db.{collection}.dropIndex(\"{name}\")` in mongosh");
    match ours {
        None => format!("index `{name}` on `{collection}` exists with other keys or options ({existing}): Sluice needs that name for its own index; drop it ({drop}, and `sluice db init` creates Sluice's), or, if another application needs it, recreate it there under another name first"),
        Some(ours) => format!("index `{name}` on `{collection}` has the keys of Sluice's `{ours}` but other options ({existing}); MongoDB refuses a second index on the same keys with other options, so Sluice's cannot be made: drop it ({drop}), and `sluice db init` creates `{ours}`, which serves the same queries"),
    }
}

/// A statement a write command (`update`, `insert`, `delete`) refused, from its reply's
/// `writeErrors`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementError {
    /// The statement's position in the command.
    pub index: usize,
    pub code: i32,
    pub message: String,
}

/// The `writeErrors` of a write command's reply (run with `run_command`, which does not
/// turn them into an error), in order.
pub fn statement_errors(reply: &bson::Document) -> Vec<StatementError> {
    let Ok(errors) = reply.get_array("writeErrors") else {
        return Vec::new();
    };
    errors
        .iter()
        .filter_map(bson::Bson::as_document)
        .map(|e| {
            let number = |k: &str| {
                e.get_i32(k)
                    .map(i64::from)
                    .or_else(|_| e.get_i64(k))
                    .unwrap_or(-1)
            };
            StatementError {
                index: usize::try_from(number("index")).unwrap_or(usize::MAX),
                code: i32::try_from(number("code")).unwrap_or(-1),
                message: e.get_str("errmsg").unwrap_or("?").to_string(),
            }
        })
        .collect()
}

/// The `writeConcernError` of a write command's reply (run with `run_command`, which
/// does not turn it into an error): the writes were applied, but not as durably as asked.
pub fn write_concern_error(reply: &bson::Document) -> Option<String> {
    reply.get_document("writeConcernError").ok().map(|wce| {
        format!(
            "write concern not satisfied: {}",
            wce.get_str("errmsg").unwrap_or("?")
        )
    })
}

/// Statements of one `update` command, in encoded bytes: a command over 16 MiB is
/// refused whole (drivers split their own bulk writes; a command sent as it is, as
/// [`Store::unordered_updates`] does, is not).
pub const MAX_UPDATE_COMMAND_BYTES: usize = 8 * 1024 * 1024;

/// The wire version of MongoDB 7.0 (`hello.maxWireVersion`). From 5.1 to 6.3 a delete on
/// a time-series collection may match its metaField only; ARCHIVE deletes events by their
/// time, creation time and eventId, so it needs 7.0.
pub const WIRE_VERSION_7_0: i32 = 21;

/// Why ARCHIVE cannot run on a server speaking at most `wire_version`, if it cannot.
pub fn archive_unsupported(wire_version: i32) -> Option<String> {
    (wire_version < WIRE_VERSION_7_0).then(|| {
        format!(
            "ARCHIVE deletes archived events from the time-series `events` collection by their time and eventId, which MongoDB allows from 7.0 (wire version {WIRE_VERSION_7_0}); this server reports wire version {wire_version}. Upgrade the server, or leave ARCHIVE unscheduled"
        )
    })
}

/// The largest event document stored: MongoDB refuses time-series measurements over 4 MB
/// (whatever the server accepts, an event near it is no tracking event).
pub const MAX_EVENT_DOCUMENT_BYTES: usize = 4_000_000;

/// `d`'s size as BSON (`usize::MAX` if it cannot be encoded).
pub fn encoded_len(d: &bson::Document) -> usize {
    bson::to_vec(d).map_or(usize::MAX, |v| v.len())
}

/// `docs` in consecutive groups of at most `cap` encoded bytes (a document bigger than
/// that alone), one command each.
pub fn command_groups(docs: &[bson::Document], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, d) in docs.iter().enumerate() {
        let len = encoded_len(d);
        if i > start && bytes.saturating_add(len) > cap {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(len);
    }
    if start < docs.len() {
        groups.push(start..docs.len());
    }
    groups
}

/// Errors from the MongoDB store, with the collection or step they happened in.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Said as [`schema::short_error`] says it, the driver's error kept out of the chain
    /// (as for [`StoreError::Mongo`]).
    #[error("cannot connect to MongoDB: {}", schema::short_error(.0))]
    Connect(mongodb::error::Error),
    /// Said in the server's words ([`schema::short_error`]); the driver's error is kept
    /// out of the error chain, whose display would dump the raw reply after it.
    #[error("MongoDB `{collection}`: {step}: {}", schema::short_error(error))]
    Mongo {
        collection: String,
        step: &'static str,
        error: mongodb::error::Error,
    },
    #[error("{}", index_conflict_text(collection, name, existing, ours.as_deref()))]
    IndexConflict {
        collection: String,
        name: String,
        existing: String,
        /// Sluice's index on the same keys, when the one in the way has another name (the
        /// server refuses two indexes on one key pattern with different options); `None`
        /// when it has Sluice's name.
        ours: Option<String>,
    },
    /// More than one [`StoreError::IndexConflict`]: each is said, so one `db init` shows
    /// everything in the way.
    #[error("{} indexes are in the way of Sluice's own:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    IndexConflicts(Vec<StoreError>),
    #[error("`{collection}` exists but is not a time-series collection; events need one (see docs/operations.md, \"Adopting an existing database\", for moving its events into one)")]
    NotTimeSeries { collection: String },
    #[error("the claim transaction (ledger, sessions, users) failed after {attempts} attempt(s): {message}")]
    Transaction {
        attempts: u32,
        message: String,
        /// Its last error was one worth trying again (write conflicts, a failover)
        /// rather than a refusal.
        transient: bool,
    },
    #[error("cannot encode a document for `{collection}`: {message}")]
    Encode { collection: String, message: String },
    /// A job is already running under a live lease.
    #[error("{0}")]
    Busy(String),
    /// The server answered in a way a reader cannot go on from (keys out of the order
    /// asked for).
    #[error("{0}")]
    Unexpected(String),
    /// The store did not answer within the time a step may take (its retries included).
    #[error("could not {step}: MongoDB did not answer within {seconds} s")]
    TimedOut { step: &'static str, seconds: u64 },
    /// A write command applied, but not as durably as asked (its `writeConcernError`):
    /// worth doing again once the replica set has caught up.
    #[error("MongoDB `{collection}`: {step}: {message}")]
    NotDurable {
        collection: String,
        step: &'static str,
        message: String,
    },
}

impl StoreError {
    pub fn mongo<'a>(
        collection: &'a str,
        step: &'static str,
    ) -> impl FnOnce(mongodb::error::Error) -> StoreError + 'a {
        move |error| StoreError::Mongo {
            collection: collection.to_string(),
            step,
            error,
        }
    }
}

fn count_dead_letters(pipeline: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_dead_letters_total",
        "Records newly kept in `dead_letters`, by kind of pipeline: failed by a transform plugin under the dead-letter policy, by mapping or validation, or refused by MongoDB.",
        &[("pipeline", pipeline)],
        n,
    );
}

/// Creates the series of `sluice_dead_letters_total` at 0 for every kind of pipeline, so
/// that a pipeline's first dead letter is an increase an alert sees.
pub fn declare_dead_letter_metrics() {
    for pipeline in ["import", "push", "export", "tracking"] {
        count_dead_letters(pipeline, 0);
    }
}

/// A handle on Sluice's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    db: Database,
    write_concern: WriteConcern,
    clock: std::sync::Arc<ServerClock>,
}

/// What is kept of a record of `bytes` too big for a dead letter: its fields, each value
/// over [`DEAD_LETTER_EXCERPT_BYTES`] replaced by the start of its JSON, within four times
/// that in all. The room goes to the smallest fields first, so the small ones (the
/// record's key among them) stay whole wherever they stand; fields that do not fit are
/// counted and named (the first 100) under `_truncated`, with the record's size.
fn excerpt(record: bson::Document, bytes: usize) -> bson::Document {
    let fields: Vec<(String, Bson, String)> = record
        .into_iter()
        .map(|(k, v)| {
            let json = v.clone().into_relaxed_extjson().to_string();
            (k, v, json)
        })
        .collect();
    let cost =
        |(k, _, json): &(String, Bson, String)| json.len().min(DEAD_LETTER_EXCERPT_BYTES) + k.len();
    let mut by_size: Vec<usize> = (0..fields.len()).collect();
    by_size.sort_by_key(|&i| cost(&fields[i]));
    let mut keep = vec![false; fields.len()];
    let mut room = DEAD_LETTER_EXCERPT_BYTES * 4;
    for i in by_size {
        let Some(left) = room.checked_sub(cost(&fields[i])) else {
            break;
        };
        room = left;
        keep[i] = true;
    }
    let start =
        |text: &str, limit: usize| sluice_core::model::prefix_within(text, limit).to_string();
    let mut kept = bson::Document::new();
    let (mut dropped, mut named) = (0i64, Vec::new());
    for ((k, v, json), keep) in fields.into_iter().zip(keep) {
        if !keep {
            dropped += 1;
            if named.len() < 100 {
                named.push(Bson::String(start(&k, 200)));
            }
            continue;
        }
        let v = if json.len() > DEAD_LETTER_EXCERPT_BYTES {
            Bson::String(format!(
                "{}... ({} bytes)",
                start(&json, DEAD_LETTER_EXCERPT_BYTES),
                json.len()
            ))
        } else {
            v
        };
        kept.insert(k, v);
    }
    let mut truncated = bson::doc! { "bytes": bytes as i64 };
    if dropped > 0 {
        truncated.insert("droppedFields", dropped);
        truncated.insert("dropped", named);
    }
    let mut out = bson::doc! { "_truncated": truncated };
    out.extend(kept);
    out
}

/// A dead letter's record over this many bytes (encoded) is kept as an excerpt.
pub const MAX_DEAD_LETTER_RECORD_BYTES: usize = 8 * 1024 * 1024;
/// The bytes of JSON kept of each of its values.
const DEAD_LETTER_EXCERPT_BYTES: usize = 64 * 1024;

impl Store {
    /// Connects and checks the server answers (so a wrong URI fails here, clearly).
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        Self::connect_uri(
            config.mongodb_uri.expose(),
            &config.database,
            &config.write_concern,
        )
        .await
    }

    /// Connects with `write_concern` as the default of every write, waiting at most
    /// [`WRITE_CONCERN_TIMEOUT`] (or the URI's `wtimeoutMS`) for the nodes it names.
    pub async fn connect_uri(
        uri: &str,
        database: &str,
        write_concern: &WriteConcernLevel,
    ) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(StoreError::Connect)?;
        options.app_name.get_or_insert_with(|| "sluice".to_string());
        // Sluice reads what it has just written (claims, sessions, checkpoints, late-day
        // marks) and writes in transactions, which may only read from the primary: a
        // `readPreference` in the URI would make every event write fail, or read stale
        // state from a lagging secondary. Everything reads from the primary; only the
        // analytics API chooses secondaries, per query.
        let primary = mongodb::options::SelectionCriteria::ReadPreference(
            mongodb::options::ReadPreference::Primary,
        );
        if let Some(asked) = options.selection_criteria.replace(primary) {
            if !matches!(
                asked,
                mongodb::options::SelectionCriteria::ReadPreference(
                    mongodb::options::ReadPreference::Primary
                )
            ) {
                tracing::warn!(
                    "the MongoDB URI's readPreference is not used: Sluice reads from the primary (transactions and read-after-write need it); the analytics API reads from secondaries where there are any"
                );
            }
        }
        options
            .server_selection_timeout
            .get_or_insert(std::time::Duration::from_secs(10));
        // `mongodb.write_concern` is every write's default (run records, checkpoints,
        // imports, not only events), with a bounded wait; a `w` in the URI gives way to
        // it, a `wtimeoutMS` in the URI is kept.
        let w = match write_concern {
            WriteConcernLevel::Majority => Acknowledgment::Majority,
            WriteConcernLevel::Nodes(n) => Acknowledgment::Nodes(*n),
        };
        let asked = options.write_concern.take();
        if asked
            .as_ref()
            .is_some_and(|a| a.w.is_some() && a.w.as_ref() != Some(&w))
        {
            tracing::warn!(
                "the MongoDB URI's `w` is not used: writes are acknowledged as `mongodb.write_concern` says (claims and leases by a majority)"
            );
        }
        let write_concern = WriteConcern::builder()
            .w(w)
            .journal(true)
            .w_timeout(
                asked
                    .and_then(|a| a.w_timeout)
                    .unwrap_or(WRITE_CONCERN_TIMEOUT),
            )
            .build();
        options.write_concern = Some(write_concern.clone());
        let client = Client::with_options(options).map_err(StoreError::Connect)?;
        let db = client.database(database);
        // The clock's first reading doubles as the check that the server answers.
        let clock = ServerClock::read(db.clone())
            .await
            .map_err(StoreError::Connect)?;
        Ok(Self {
            client,
            db,
            write_concern,
            clock,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The database's time now: what leases, claims and run records are timed by, so
    /// that replicas whose own clocks disagree still agree on them (see [`ServerClock`]).
    pub fn now(&self) -> bson::DateTime {
        self.clock.now()
    }

    /// The database's time `ahead` from now.
    pub fn now_plus(&self, ahead: std::time::Duration) -> bson::DateTime {
        bson::DateTime::from_millis(self.now().timestamp_millis() + ahead.as_millis() as i64)
    }

    pub fn write_concern(&self) -> &WriteConcern {
        &self.write_concern
    }

    /// Runs `updates` (`{q, u, upsert?}` statements) as one unordered `update` command on
    /// `collection`, at the store's write concern, as a driver's bulk write sends them;
    /// the reply. `run_command` turns neither refused statements nor a write concern
    /// error into an error: see [`statement_errors`] and [`write_concern_error`].
    pub async fn unordered_updates(
        &self,
        collection: &str,
        updates: Vec<bson::Document>,
    ) -> mongodb::error::Result<bson::Document> {
        self.db
            .run_command(bson::doc! {
                "update": collection,
                "updates": updates,
                "ordered": false,
                "writeConcern": bson::to_document(&self.write_concern).unwrap_or_default(),
            })
            .await
    }

    pub fn collection(&self, name: &str) -> mongodb::Collection<bson::Document> {
        self.db.collection(name)
    }

    /// A collection of claims and leases (`scheduled_runs`, `job_locks`): its writes are
    /// acknowledged by a majority, whatever `mongodb.write_concern` says, since a claim a
    /// failover rolls back would let two replicas run the same job.
    pub fn lease_collection(&self, name: &str) -> mongodb::Collection<bson::Document> {
        self.db.collection_with_options(
            name,
            mongodb::options::CollectionOptions::builder()
                .write_concern(majority_write_concern())
                // Claims are checked by reading them back: a lagging secondary would miss
                // the other replica's claim (the client reads from the primary already;
                // said here too, since it is what claims rest on).
                .selection_criteria(mongodb::options::SelectionCriteria::ReadPreference(
                    mongodb::options::ReadPreference::Primary,
                ))
                .build(),
        )
    }

    /// Creates every collection and index (idempotent). See [`schema`].
    pub async fn init(&self) -> Result<InitReport, StoreError> {
        schema::init(self).await
    }

    /// Stores `letters` in `dead_letters`, tagged with the pipeline and run they came
    /// from; returns how many were new. A letter's `_id` is derived from its pipeline,
    /// plugin and record (an event's `eventId`, any other record's content), so a rerun of
    /// the same input (an import page redone after a failed write, an export rerun, a
    /// resent tracking batch) keeps it once.
    /// A record over [`MAX_DEAD_LETTER_RECORD_BYTES`] keeps only the start of its JSON.
    pub async fn keep_dead_letters(
        &self,
        letters: Vec<sluice_core::transform::DeadLetter>,
        pipeline: &str,
        run_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        use sha2::Digest;
        if letters.is_empty() {
            return Ok(0);
        }
        let now = bson::DateTime::now();
        let mut docs = Vec::with_capacity(letters.len());
        // Each letter's id and reason, to bring one kept already up to date.
        let mut said: Vec<(String, String)> = Vec::with_capacity(letters.len());
        for l in letters {
            let mut hash = sha2::Sha256::new();
            for part in [pipeline.as_bytes(), b"\0", l.transform.as_bytes(), b"\0"] {
                hash.update(part);
            }
            // An event is itself by its id (a resent one carries new arrival times);
            // any other record by its content.
            match l.record.get_str(sluice_core::model::event_fields::EVENT_ID) {
                Ok(id) => hash.update(id.as_bytes()),
                Err(_) => hash.update(bson::to_vec(&l.record).map_err(|e| StoreError::Encode {
                    collection: sluice_core::model::collections::DEAD_LETTERS.into(),
                    message: e.to_string(),
                })?),
            }
            let id = format!("{:x}", hash.finalize());
            // A record too big to store (the reason it was refused, perhaps) is kept as
            // the start of its JSON, so the letter itself is not refused with its batch.
            let bytes = bson::to_vec(&l.record).map_or(usize::MAX, |v| v.len());
            let record = if bytes > MAX_DEAD_LETTER_RECORD_BYTES {
                excerpt(l.record, bytes)
            } else {
                l.record
            };
            said.push((id[..32].to_string(), l.reason.clone()));
            docs.push(bson::doc! {
                "_id": &id[..32], "pipeline": pipeline, "runId": run_id, "plugin": l.transform,
                "reason": l.reason, "record": record, "createdAt": now,
            });
        }
        let total = docs.len() as u64;
        let kept_before = match self
            .collection(sluice_core::model::collections::DEAD_LETTERS)
            .insert_many(docs)
            .ordered(false)
            .await
        {
            Ok(_) => 0,
            // Kept already, by an earlier run of the same input: not counted again.
            Err(e) => match duplicate_key_positions(&e) {
                Some(positions) => {
                    self.refresh_dead_letters(&said, &positions, run_id, now)
                        .await;
                    positions.len() as u64
                }
                None => {
                    return Err(StoreError::mongo(
                        sluice_core::model::collections::DEAD_LETTERS,
                        "store dead letters",
                    )(e))
                }
            },
        };
        let n = total - kept_before;
        if n > 0 {
            tracing::warn!(
                pipeline,
                records = n,
                "records kept in dead_letters (failed by a transform plugin, mapping, validation or the write)"
            );
        }
        // By the kind of pipeline (`import`, `push`, `export`, `tracking`): its config is
        // in the log line above and in each dead letter.
        count_dead_letters(pipeline.split(':').next().unwrap_or(pipeline), n);
        Ok(n)
    }

    /// Letters kept already (at `positions` of `said`): their `reason` becomes this
    /// run's (a plugin fixed in part fails the record otherwise), with `lastRunId` and
    /// `lastSeenAt`; `runId` and `createdAt` stay the first run's. One `update` command
    /// per few hundred letters, unordered. It says, and fails nothing: the letters are
    /// kept either way, only their reason may be an older run's.
    async fn refresh_dead_letters(
        &self,
        said: &[(String, String)],
        positions: &[usize],
        run_id: Option<&str>,
        now: bson::DateTime,
    ) {
        /// Statements per command, and the reason text each may carry: a command stays far
        /// below MongoDB's 16 MiB however long the reasons.
        const PER_COMMAND: usize = 500;
        const REASON_CHARS: usize = 4_096;
        let statements: Vec<bson::Document> = positions
            .iter()
            .filter_map(|&i| said.get(i))
            .map(|(id, reason)| {
                let reason: String = reason.chars().take(REASON_CHARS).collect();
                bson::doc! {
                    "q": { "_id": id },
                    "u": { "$set": { "reason": reason, "lastRunId": run_id, "lastSeenAt": now } },
                }
            })
            .collect();
        for chunk in statements.chunks(PER_COMMAND) {
            let refreshed = self
                .db
                .run_command(bson::doc! {
                    "update": sluice_core::model::collections::DEAD_LETTERS,
                    "updates": chunk.to_vec(),
                    "ordered": false,
                })
                .await;
            if let Err(e) = refreshed {
                tracing::warn!(error = %schema::short_error(&e), letters = chunk.len(), "could not bring dead letters kept already up to date; they keep an earlier run's reason");
                return;
            }
        }
    }

    /// The newest wire protocol version the server speaks (`hello.maxWireVersion`):
    /// [`WIRE_VERSION_7_0`] and above is MongoDB 7.0 or later.
    pub async fn max_wire_version(&self) -> Result<i32, StoreError> {
        let reply = self
            .db
            .run_command(bson::doc! { "hello": 1 })
            .await
            .map_err(StoreError::Connect)?;
        let wire = sluice_core::model::count_in(&reply, "maxWireVersion");
        Ok(i32::try_from(wire).unwrap_or(i32::MAX))
    }

    /// Pings the server (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(bson::doc! { "ping": 1 })
            .await
            .map(|_| ())
            .map_err(StoreError::Connect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_needs_mongodb_7() {
        // 17: MongoDB 6.0, 21: 7.0, 25: 8.0.
        let refused = archive_unsupported(17).unwrap();
        assert!(
            refused.contains("7.0") && refused.contains("wire version 17"),
            "{refused}"
        );
        assert!(
            archive_unsupported(0).is_some(),
            "a server reporting no version"
        );
        assert_eq!(archive_unsupported(21), None);
        assert_eq!(archive_unsupported(25), None);
    }

    #[test]
    fn upserts_are_grouped_under_the_command_cap_in_order() {
        let doc_of = |n: usize| bson::doc! { "b": "x".repeat(n) };
        let docs: Vec<bson::Document> = [100, 100, 100, 500, 50, 50, 2_000, 10]
            .into_iter()
            .map(doc_of)
            .collect();
        let cap = 400;
        let groups = command_groups(&docs, cap);
        // Every document once, in order; each group under the cap unless it is one
        // document bigger than the cap.
        let flat: Vec<usize> = groups.iter().cloned().flatten().collect();
        assert_eq!(flat, (0..docs.len()).collect::<Vec<_>>());
        for g in &groups {
            let bytes: usize = docs[g.clone()].iter().map(encoded_len).sum();
            assert!(bytes <= cap || g.len() == 1, "{g:?}: {bytes}");
        }
        assert_eq!(groups, [0..3, 3..4, 4..6, 6..7, 7..8]);
        assert!(command_groups(&[], cap).is_empty());
    }

    #[test]
    fn an_excerpt_keeps_small_fields_wherever_they_stand_and_names_what_it_drops() {
        // Eight values of 100 KB before the key: an excerpt that kept fields in order
        // would run out of room before reaching it.
        let mut record = bson::Document::new();
        for i in 0..8 {
            record.insert(format!("blob{i}"), "x".repeat(100_000));
        }
        record.insert("id", "rec-42");
        record.insert("small", 7);
        let bytes = bson::to_vec(&record).unwrap().len();
        let kept = excerpt(record, bytes);
        assert_eq!(kept.get_str("id"), Ok("rec-42"));
        assert_eq!(kept.get_i32("small"), Ok(7));
        let truncated = kept.get_document("_truncated").unwrap();
        assert_eq!(truncated.get_i64("bytes"), Ok(bytes as i64));
        // 256 KiB of room holds three 64 KiB starts besides the small fields.
        let cut: Vec<&str> = (0..8)
            .filter_map(|i| kept.get_str(format!("blob{i}")).ok())
            .collect();
        assert_eq!(cut.len(), 3, "{:?}", kept.keys().collect::<Vec<_>>());
        assert!(cut.iter().all(|v| v.ends_with("... (100002 bytes)")));
        assert_eq!(truncated.get_i64("droppedFields"), Ok(5));
        assert_eq!(truncated.get_array("dropped").unwrap().len(), 5);
        assert!(bson::to_vec(&kept).unwrap().len() < 300 * 1024);
    }
}
