//! Collections and indexes: the design document's list plus the ones it leaves out.
//! `init` is idempotent: it compares what exists (listCollections, listIndexes) with what
//! is wanted and creates only what is missing.

use bson::{doc, Bson, Document};
use futures_util::TryStreamExt;
use mongodb::options::{IndexOptions, TimeseriesGranularity, TimeseriesOptions};
use mongodb::IndexModel;
use sluice_core::model::collections as c;
use sluice_core::model::{
    admin_user_fields as a, event_fields as e, event_id_fields as l, export_job_fields as x,
    import_run_fields as r, integration_fields as i, product_fields as p, session_fields as s,
    user_fields as u,
};

use super::{error_code, Store, StoreError};

/// One wanted index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSpec {
    pub collection: &'static str,
    pub name: &'static str,
    pub keys: Document,
    pub unique: bool,
    pub sparse: bool,
    /// A text index; servers that refuse text indexes get a warning, not a failure.
    pub text: bool,
    /// A TTL index (`expireAfterSeconds`): the server deletes a document this many
    /// seconds after the date in its (single) key field (a document without that date is
    /// kept).
    pub ttl: Option<u64>,
    /// A partial index: only documents matching this filter are indexed.
    pub partial: Option<Document>,
}

impl IndexSpec {
    fn new(collection: &'static str, name: &'static str, keys: Document) -> Self {
        Self {
            collection,
            name,
            keys,
            unique: false,
            sparse: false,
            text: false,
            ttl: None,
            partial: None,
        }
    }
    fn unique(mut self) -> Self {
        self.unique = true;
        self
    }
    fn sparse(mut self) -> Self {
        self.sparse = true;
        self
    }
    fn text(mut self) -> Self {
        self.text = true;
        self
    }
    fn ttl(mut self, after_seconds: u64) -> Self {
        self.ttl = Some(after_seconds);
        self
    }
    fn partial(mut self, filter: Document) -> Self {
        self.partial = Some(filter);
        self
    }
}

/// How long `scheduled_runs` keeps a fire or a run by hand once it has ended.
pub const SCHEDULED_RUNS_KEPT_DAYS: u64 = 90;

/// Every index Sluice wants, in creation order.
pub fn index_specs() -> Vec<IndexSpec> {
    vec![
        // users (design document)
        IndexSpec::new(c::USERS, "visitorId_unique", doc! { u::VISITOR_ID: 1 }).unique(),
        IndexSpec::new(c::USERS, "email_sparse", doc! { u::EMAIL: 1 }).sparse(),
        IndexSpec::new(
            c::USERS,
            "lastSeen_totalEvents",
            doc! { u::LAST_SEEN: 1, u::TOTAL_EVENTS: 1 },
        ),
        IndexSpec::new(c::USERS, "tags", doc! { u::TAGS: 1 }),
        IndexSpec::new(c::USERS, "segments", doc! { u::SEGMENTS: 1 }),
        IndexSpec::new(
            c::USERS,
            "users_text",
            doc! { u::EMAIL: "text", u::FIRST_NAME: "text", u::LAST_NAME: "text" },
        )
        .text(),
        // events (design document; `eventId` uniqueness is enforced by the ledger)
        IndexSpec::new(c::EVENTS, "eventId", doc! { e::EVENT_ID: 1 }),
        IndexSpec::new(
            c::EVENTS,
            "userId_timestamp",
            doc! { e::USER_ID: 1, e::TIMESTAMP: 1 },
        ),
        IndexSpec::new(
            c::EVENTS,
            "sessionId_timestamp",
            doc! { e::SESSION_ID: 1, e::TIMESTAMP: 1 },
        ),
        IndexSpec::new(
            c::EVENTS,
            "eventType_timestamp",
            doc! { e::EVENT_TYPE: 1, e::TIMESTAMP: 1 },
        ),
        IndexSpec::new(c::EVENTS, "timestamp", doc! { e::TIMESTAMP: 1 }),
        IndexSpec::new(
            c::EVENTS,
            "pageUrl_timestamp",
            doc! { e::PAGE_URL: 1, e::TIMESTAMP: 1 },
        ),
        // sessions (design document). The idle sweeper uses `status_startTime`: an index
        // on `endTime`, which changes with nearly every event, would cost every session
        // update an index write.
        IndexSpec::new(c::SESSIONS, "sessionId_unique", doc! { s::SESSION_ID: 1 }).unique(),
        IndexSpec::new(
            c::SESSIONS,
            "userId_startTime",
            doc! { s::USER_ID: 1, s::START_TIME: 1 },
        ),
        IndexSpec::new(
            c::SESSIONS,
            "status_startTime",
            doc! { s::STATUS: 1, s::START_TIME: 1 },
        ),
        IndexSpec::new(
            c::SESSIONS,
            "country_startTime",
            doc! { s::COUNTRY: 1, s::START_TIME: 1 },
        ),
        IndexSpec::new(
            c::SESSIONS,
            "device_startTime",
            doc! { s::DEVICE: 1, s::START_TIME: 1 },
        ),
        // the obvious ones the design document leaves out
        IndexSpec::new(c::ADMIN_USERS, "email_unique", doc! { a::EMAIL: 1 }).unique(),
        IndexSpec::new(c::INTEGRATION_CONFIGS, "name_unique", doc! { i::NAME: 1 }).unique(),
        IndexSpec::new(
            c::INTEGRATION_CONFIGS,
            "isActive_type",
            doc! { i::IS_ACTIVE: 1, i::TYPE: 1 },
        ),
        IndexSpec::new(c::EXPORT_JOBS, "jobId_unique", doc! { x::JOB_ID: 1 }).unique(),
        IndexSpec::new(
            c::EXPORT_JOBS,
            "type_startTime",
            doc! { x::TYPE: 1, x::START_TIME: -1 },
        ),
        IndexSpec::new(c::PRODUCTS, "productId_unique", doc! { p::PRODUCT_ID: 1 }).unique(),
        IndexSpec::new(c::PRODUCTS, "category", doc! { p::CATEGORY: 1 }),
        IndexSpec::new(c::IMPORT_RUNS, "runId_unique", doc! { r::RUN_ID: 1 }).unique(),
        IndexSpec::new(
            c::IMPORT_RUNS,
            "config_startTime",
            doc! { r::CONFIG: 1, r::START_TIME: -1 },
        ),
        // the dedupe ledger's archived claims by event time, for `db prune-ledger`; partial,
        // so a claim costs no write to it until ARCHIVE marks it (replaces `ts`, see
        // RETIRED_INDEXES)
        IndexSpec::new(
            c::EVENT_IDS,
            "archived_ts",
            doc! { l::ARCHIVED: 1, l::TIMESTAMP: 1 },
        )
        .partial(doc! { l::ARCHIVED: true }),
        // scheduled fires: a job's latest (jobs list, overlap check) and expired leases
        IndexSpec::new(
            c::SCHEDULED_RUNS,
            "job_scheduledFor",
            doc! { "job": 1, "scheduledFor": -1 },
        ),
        IndexSpec::new(
            c::SCHEDULED_RUNS,
            "status_expiresAt",
            doc! { "status": 1, "expiresAt": 1 },
        ),
        // ended fires and runs are kept for `SCHEDULED_RUNS_KEPT_DAYS` (every fire of an
        // every-minute job is half a million records a year); a RUNNING one has no end
        IndexSpec::new(c::SCHEDULED_RUNS, "endedAt_ttl", doc! { "endedAt": 1 })
            .ttl(SCHEDULED_RUNS_KEPT_DAYS * 24 * 3600),
        // dead letters by pipeline (`import:NAME`, `tracking`, ...), latest first
        IndexSpec::new(
            c::DEAD_LETTERS,
            "pipeline_createdAt",
            doc! { "pipeline": 1, "createdAt": -1 },
        ),
        // admin login tokens are deleted by the server once expired
        IndexSpec::new(c::ADMIN_TOKENS, "expiresAt_ttl", doc! { "expiresAt": 1 }).ttl(0),
    ]
}

/// Collections created as plain collections (events is created as time-series).
const PLAIN_COLLECTIONS: &[&str] = &[
    c::USERS,
    c::SESSIONS,
    c::ADMIN_USERS,
    c::INTEGRATION_CONFIGS,
    c::EXPORT_JOBS,
    c::PRODUCTS,
    c::EVENT_IDS,
    c::SCHEDULED_RUNS,
    c::JOB_LOCKS,
    c::ADMIN_TOKENS,
    c::IMPORT_RUNS,
    c::IMPORT_CHECKPOINTS,
    c::IDENTITIES,
    c::OAUTH_TOKENS,
    c::LATE_DAYS,
    c::RETIRED_PARTS,
    c::DEAD_LETTERS,
];

/// Indexes earlier versions created that `init` drops when it finds them with these keys
/// (under another name or with other keys, an index is someone else's and kept):
/// (collection, name, keys, why).
const RETIRED_INDEXES: &[(&str, &str, &str, &str)] = &[(
    c::EVENT_IDS,
    "ts",
    l::TIMESTAMP,
    "every claim paid an index write for it; replaced by the partial `archived_ts`",
)];

/// What happened to one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOutcome {
    Created,
    /// Present already (under this name).
    Exists(String),
    /// The server refused it (text indexes on some MongoDB-compatible servers).
    Skipped(String),
}

/// What `init` did, for the CLI and logs.
#[derive(Debug, Default)]
pub struct InitReport {
    pub created_collections: Vec<String>,
    /// Indexes of earlier versions dropped: (collection, name, why).
    pub dropped_indexes: Vec<(String, String, String)>,
    pub indexes: Vec<(String, String, IndexOutcome)>,
    pub warnings: Vec<String>,
}

impl InitReport {
    pub fn created_indexes(&self) -> usize {
        self.indexes
            .iter()
            .filter(|(_, _, o)| *o == IndexOutcome::Created)
            .count()
    }
}

/// The time-series options for `events`. `eventType` is the metaField (see README).
fn events_timeseries() -> TimeseriesOptions {
    TimeseriesOptions::builder()
        .time_field(e::TIMESTAMP.to_string())
        .meta_field(Some(e::EVENT_TYPE.to_string()))
        .granularity(Some(TimeseriesGranularity::Seconds))
        .build()
}

pub(super) async fn init(store: &Store) -> Result<InitReport, StoreError> {
    let db = store.db();
    let mut report = InitReport::default();
    let existing: Vec<Document> = db
        .list_collections()
        .await
        .map_err(StoreError::mongo("*", "listCollections"))?
        .try_collect::<Vec<_>>()
        .await
        .map_err(StoreError::mongo("*", "listCollections"))?
        .into_iter()
        .map(|spec| bson::to_document(&spec).unwrap_or_default())
        .collect();
    let kind_of = |name: &str| {
        existing
            .iter()
            .find(|d| d.get_str("name").ok() == Some(name))
            .and_then(|d| d.get_str("type").ok().map(str::to_string))
    };

    match kind_of(c::EVENTS).as_deref() {
        None => match db
            .create_collection(c::EVENTS)
            .timeseries(events_timeseries())
            .await
        {
            Ok(()) => report.created_collections.push(c::EVENTS.into()),
            // Another replica's init created it first: fine if it is time-series.
            Err(err) if error_code(&err) == Some(48) => {
                let kind = db
                    .list_collections()
                    .filter(doc! { "name": c::EVENTS })
                    .await
                    .map_err(StoreError::mongo(c::EVENTS, "listCollections"))?
                    .try_next()
                    .await
                    .map_err(StoreError::mongo(c::EVENTS, "listCollections"))?
                    .and_then(|spec| bson::to_document(&spec).ok())
                    .and_then(|d| d.get_str("type").ok().map(str::to_string));
                if kind.as_deref() != Some("timeseries") {
                    return Err(StoreError::NotTimeSeries {
                        collection: c::EVENTS.into(),
                    });
                }
            }
            Err(err) => {
                return Err(StoreError::mongo(
                    c::EVENTS,
                    "create time-series collection",
                )(err))
            }
        },
        Some("timeseries") => {
            // An `events` made by another tool (the design document names `metadata` as
            // its metaField) works, but not as the README describes; say so.
            let spec = existing
                .iter()
                .find(|d| d.get_str("name").ok() == Some(c::EVENTS));
            let ts = spec
                .and_then(|d| d.get_document("options").ok())
                .and_then(|o| o.get_document("timeseries").ok());
            let field = |k: &str| ts.and_then(|t| t.get_str(k).ok());
            if field("timeField") != Some(e::TIMESTAMP) || field("metaField") != Some(e::EVENT_TYPE)
            {
                report.warnings.push(format!(
                    "`{}` is a time-series collection with timeField `{}` and metaField `{}`; Sluice creates it with `{}` and `{}` (see README, \"Storage design\"): events are stored, but buckets and the automatic index are not the ones described",
                    c::EVENTS,
                    field("timeField").unwrap_or("?"),
                    field("metaField").unwrap_or("(none)"),
                    e::TIMESTAMP,
                    e::EVENT_TYPE,
                ));
            }
        }
        Some(_) => {
            return Err(StoreError::NotTimeSeries {
                collection: c::EVENTS.into(),
            })
        }
    }
    for name in PLAIN_COLLECTIONS {
        if kind_of(name).is_none() {
            match db.create_collection(*name).await {
                Ok(()) => report.created_collections.push((*name).into()),
                // NamespaceExists: another replica's init won the race; that is fine.
                Err(err) if error_code(&err) == Some(48) => {}
                Err(err) => return Err(StoreError::mongo(name, "create collection")(err)),
            }
        }
    }

    // Every conflict is said at once: an operator fixing them one `db init` at a time
    // would otherwise find the next only after the last was fixed.
    let mut conflicts = Vec::new();
    for spec in index_specs() {
        let outcome = match ensure_index(store, &spec).await {
            Err(e @ StoreError::IndexConflict { .. }) => {
                conflicts.push(e);
                continue;
            }
            other => other?,
        };
        if let IndexOutcome::Skipped(reason) = &outcome {
            report.warnings.push(format!(
                "index `{}` on `{}` not created: {reason}",
                spec.name, spec.collection
            ));
        }
        report
            .indexes
            .push((spec.collection.into(), spec.name.into(), outcome));
    }
    match conflicts.len() {
        0 => {}
        1 => return Err(conflicts.remove(0)),
        _ => return Err(StoreError::IndexConflicts(conflicts)),
    }
    if let Some(why) = super::archive_unsupported(store.max_wire_version().await?) {
        report.warnings.push(why);
    }
    // Only once their replacements exist.
    for (collection, name, key, why) in RETIRED_INDEXES {
        if drop_retired(store, collection, name, key).await? {
            report
                .dropped_indexes
                .push(((*collection).into(), (*name).into(), (*why).into()));
        }
    }
    Ok(report)
}

/// Drops the index `name` of `collection` if it is there on the single ascending key
/// `key`, as an earlier version created it; returns whether it was dropped.
async fn drop_retired(
    store: &Store,
    collection: &str,
    name: &str,
    key: &str,
) -> Result<bool, StoreError> {
    let coll = store.collection(collection);
    let found = coll
        .list_indexes()
        .await
        .map_err(StoreError::mongo(collection, "listIndexes"))?
        .try_collect::<Vec<_>>()
        .await
        .map_err(StoreError::mongo(collection, "listIndexes"))?
        .into_iter()
        .any(|m| {
            m.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name)
                && key_pattern(&m.keys) == key_pattern(&doc! { key: 1 })
                && m.options
                    .as_ref()
                    .is_none_or(|o| o.partial_filter_expression.is_none())
        });
    if !found {
        return Ok(false);
    }
    match coll.drop_index(name).await {
        Ok(()) => Ok(true),
        // IndexNotFound: another replica's init dropped it first.
        Err(err) if error_code(&err) == Some(27) => Ok(false),
        Err(err) => Err(StoreError::mongo(collection, "dropIndexes")(err)),
    }
}

/// The server's own message (code and text) and the error's labels, without the
/// driver's debug dump: a command's, a write's (or its write concern's), or an
/// `insert_many`'s or a bulk write's first (and how many more).
pub(crate) fn short_error(err: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    let said = |code: i32, name: Option<&str>, message: &str| match name {
        Some(name) if !name.is_empty() => format!("code {code} {name}: {message}"),
        _ => format!("code {code}: {message}"),
    };
    let concern = |w: &mongodb::error::WriteConcernError| {
        format!(
            "write concern not satisfied: {}",
            said(w.code, Some(&w.code_name), &w.message)
        )
    };
    let first_of = |mut writes: Vec<(i32, Option<&str>, &str)>| {
        writes.sort_by_key(|w| w.0);
        let more = writes.len().saturating_sub(1);
        writes.first().map(|&(code, name, message)| {
            let first = said(code, name, message);
            if more > 0 {
                format!("{first} (and {more} more write error(s))")
            } else {
                first
            }
        })
    };
    let short = match err.kind.as_ref() {
        ErrorKind::Command(c) => Some(said(c.code, Some(&c.code_name), &c.message)),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            Some(said(w.code, w.code_name.as_deref(), &w.message))
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(concern(w)),
        ErrorKind::InsertMany(i) => {
            let writes = first_of(
                i.write_errors
                    .iter()
                    .flatten()
                    .map(|w| (w.code, w.code_name.as_deref(), w.message.as_str()))
                    .collect(),
            );
            match (writes, i.write_concern_error.as_ref()) {
                (Some(first), Some(_)) => Some(format!("{first}, and a write concern error")),
                (Some(first), None) => Some(first),
                (None, Some(w)) => Some(concern(w)),
                (None, None) => None,
            }
        }
        ErrorKind::BulkWrite(b) => first_of(
            b.write_errors
                .values()
                .map(|w| (w.code, w.code_name.as_deref(), w.message.as_str()))
                .collect(),
        ),
        // The driver's text repeats each server's error with its debug fields.
        ErrorKind::ServerSelection { message, .. } => Some(without_debug_fields(message)),
        _ => None,
    };
    let Some(short) = short else {
        return err.to_string();
    };
    // Labels (TransientTransactionError, ...) say whether it is worth trying again.
    let mut labels: Vec<&str> = err.labels().iter().map(String::as_str).collect();
    labels.sort_unstable();
    if labels.is_empty() {
        short
    } else {
        format!("{short} [{}]", labels.join(", "))
    }
}

/// A driver's message without the debug fields it prints of a nested error (`Kind: `,
/// `labels: {..}`, `source: None`, `server response: None`), which say nothing to an
/// operator and make a refused connection a screenful.
fn without_debug_fields(message: &str) -> String {
    let mut out = message
        .replace("Kind: ", "")
        .replace(", source: None", "")
        .replace(", server response: None", "");
    while let Some(start) = out.find(", labels: {") {
        // The labels' braces hold no braces of their own.
        let Some(len) = out[start..].find('}') else {
            break;
        };
        out.replace_range(start..start + len + 1, "");
    }
    out
}

/// The options of an index as listIndexes shows them, reduced to what we compare:
/// unique, sparse, TTL seconds, partial filter.
fn option_flags(doc: &Document) -> (bool, bool, Option<u64>, Option<Document>) {
    let flag = |k: &str| matches!(doc.get(k), Some(Bson::Boolean(true)));
    let ttl = match doc.get("expireAfterSeconds") {
        Some(Bson::Int32(v)) => u64::try_from(*v).ok(),
        Some(Bson::Int64(v)) => u64::try_from(*v).ok(),
        Some(Bson::Double(v)) if *v >= 0.0 => Some(*v as u64),
        _ => None,
    };
    let partial = doc.get_document("partialFilterExpression").ok().cloned();
    (flag("unique"), flag("sparse"), ttl, partial)
}

fn wanted_flags(spec: &IndexSpec) -> (bool, bool, Option<u64>, Option<Document>) {
    (spec.unique, spec.sparse, spec.ttl, spec.partial.clone())
}

/// A key pattern as an ordered list (field, direction): the order of an index's keys
/// decides which queries it serves, and a direction written `1.0` (older shells) is the
/// same as `1`.
fn key_pattern(keys: &Document) -> Vec<(String, String)> {
    keys.iter()
        .map(|(field, dir)| {
            let dir = match dir {
                Bson::Int32(v) => (*v as f64).signum().to_string(),
                Bson::Int64(v) => (*v as f64).signum().to_string(),
                Bson::Double(v) => v.signum().to_string(),
                Bson::String(kind) => kind.clone(),
                other => other.to_string(),
            };
            (field.clone(), dir)
        })
        .collect()
}

fn is_text_index(doc: &Document) -> bool {
    doc.get_document("key")
        .map(|k| k.contains_key("_fts"))
        .unwrap_or(false)
}

async fn ensure_index(store: &Store, spec: &IndexSpec) -> Result<IndexOutcome, StoreError> {
    let coll = store.collection(spec.collection);
    let existing: Vec<Document> = coll
        .list_indexes()
        .await
        .map_err(StoreError::mongo(spec.collection, "listIndexes"))?
        .try_collect::<Vec<_>>()
        .await
        .map_err(StoreError::mongo(spec.collection, "listIndexes"))?
        .into_iter()
        .map(|m| {
            let mut d = bson::to_document(&m.options).unwrap_or_default();
            d.insert("key", m.keys);
            d
        })
        .collect();
    let same_keys = |d: &Document| {
        if spec.text {
            is_text_index(d)
        } else {
            d.get_document("key")
                .is_ok_and(|k| key_pattern(k) == key_pattern(&spec.keys))
        }
    };
    let conflict = |found: &Document| {
        let name = found.get_str("name").unwrap_or(spec.name);
        StoreError::IndexConflict {
            collection: spec.collection.into(),
            name: name.into(),
            existing: found.to_string(),
            ours: (name != spec.name).then(|| spec.name.to_string()),
        }
    };
    // Imports of earlier versions rebuilt a unique identity they were keyed by
    // (`products.productId_unique`) as partial over the documents having the key: the
    // same uniqueness for every document that has one, so it is kept as it is.
    let rebuilt_by_an_import = |found: &Document| {
        let (unique, sparse, ttl, partial) = option_flags(found);
        let key = spec.keys.keys().next().map(String::as_str).unwrap_or("");
        spec.unique
            && spec.partial.is_none()
            && spec.keys.len() == 1
            && (unique, sparse, ttl) == (true, spec.sparse, spec.ttl)
            && partial == Some(doc! { key: { "$exists": true } })
    };
    if let Some(found) = existing
        .iter()
        .find(|d| d.get_str("name").ok() == Some(spec.name))
    {
        if same_keys(found)
            && (option_flags(found) == wanted_flags(spec) || rebuilt_by_an_import(found))
        {
            return Ok(IndexOutcome::Exists(spec.name.into()));
        }
        return Err(conflict(found));
    }
    // The same keys under another name (for example the {meta, time} index MongoDB creates
    // for a time-series collection) serve the same queries: keep it. With other options
    // (say, not unique where ours is) the server would refuse ours: say which one is in
    // the way.
    if let Some(found) = existing.iter().find(|d| same_keys(d)) {
        if option_flags(found) == wanted_flags(spec) {
            return Ok(IndexOutcome::Exists(
                found.get_str("name").unwrap_or("?").to_string(),
            ));
        }
        return Err(conflict(found));
    }
    let options = IndexOptions::builder()
        .name(spec.name.to_string())
        .unique(spec.unique.then_some(true))
        .sparse(spec.sparse.then_some(true))
        .expire_after(spec.ttl.map(std::time::Duration::from_secs))
        .partial_filter_expression(spec.partial.clone())
        .build();
    let model = IndexModel::builder()
        .keys(spec.keys.clone())
        .options(options)
        .build();
    match coll.create_index(model).await {
        Ok(_) => Ok(IndexOutcome::Created),
        // CannotCreateIndex, CommandNotSupported: servers without text search. Any other
        // error (auth, network, a conflict) is not a refusal of the feature.
        Err(err) if spec.text && matches!(error_code(&err), Some(67 | 115)) => {
            Ok(IndexOutcome::Skipped(format!(
                "the server refused a text index ({}); user search by text is unavailable",
                short_error(&err)
            )))
        }
        // IndexOptionsConflict, IndexKeySpecsConflict: an index created meanwhile (by
        // another replica's init, or by hand) is in the way.
        Err(err) if matches!(error_code(&err), Some(85 | 86)) => Err(StoreError::IndexConflict {
            collection: spec.collection.into(),
            name: spec.name.into(),
            existing: short_error(&err),
            ours: None,
        }),
        Err(err) => Err(StoreError::mongo(spec.collection, "createIndexes")(err)),
    }
}
