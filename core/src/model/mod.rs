//! The platform's collections as typed documents, with the design document's field names
//! (camelCase) and enums. Every name that crosses into MongoDB is a constant here, so a
//! rename is one edit.

mod enums;
mod records;

pub use enums::*;
pub use records::*;

/// The start of `text` within `max` bytes, cut on a character boundary.
pub fn prefix_within(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether MongoDB stores `name` as one plain field: not empty, no `$` prefix (an
/// operator), no `.` (a path). Mapping targets, event property names and what import
/// plugins return are held to it.
pub fn is_plain_field_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('$') && !name.contains('.')
}

/// [`is_plain_field_name`] without a NUL either, which no BSON key can hold: what an
/// import writes of a plugin's output, and what Segment traits are kept as unescaped.
pub fn is_storable_field_name(name: &str) -> bool {
    is_plain_field_name(name) && !name.contains('\0')
}

/// The value at a dotted path (`meta.updatedAt`) through sub-documents, as MongoDB
/// reads a path in a filter or a sort (arrays are not walked into).
pub fn at_path<'a>(doc: &'a bson::Document, path: &str) -> Option<&'a bson::Bson> {
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?)?;
    for p in parts {
        current = current.as_document()?.get(p)?;
    }
    Some(current)
}

/// An integer stored as int32 or int64 (MongoDB keeps a count in whichever fits, and
/// `$sum`/`$inc` widen as they go); any other type is `None`.
pub fn int_of(v: &bson::Bson) -> Option<i64> {
    match v {
        bson::Bson::Int32(x) => Some(i64::from(*x)),
        bson::Bson::Int64(x) => Some(*x),
        _ => None,
    }
}

/// A number stored as a double, int32 or int64; any other type is `None`.
pub fn number_of(v: &bson::Bson) -> Option<f64> {
    match v {
        bson::Bson::Double(x) => Some(*x),
        _ => int_of(v).map(|x| x as f64),
    }
}

/// A number as writers other than Sluice store one: a double, an integer, a decimal, or
/// text holding one (`"120.50"`); `None` for anything else, or one not finite.
pub fn stored_number(v: &bson::Bson) -> Option<f64> {
    match v {
        bson::Bson::Decimal128(x) => x.to_string().parse().ok(),
        bson::Bson::String(s) => s.trim().parse().ok(),
        _ => number_of(v),
    }
    .filter(|x: &f64| x.is_finite())
}

/// A visitor's exact revenue in millionths as stored: `totalRevenueMicros` when it reads
/// as a number (an integer exactly, another rounded), else `totalRevenue` in millionths
/// (rounded as a purchase's amount is), else `None`. What the tracker goes on from and
/// USER_DATA exports, for profiles another writer stored too.
pub fn stored_revenue_micros(user: &bson::Document) -> Option<i64> {
    match user.get(user_fields::TOTAL_REVENUE_MICROS) {
        Some(v @ (bson::Bson::Int32(_) | bson::Bson::Int64(_))) => int_of(v),
        // An integer's text exactly (past 2^53 too); other numbers rounded, held at the
        // bounds.
        Some(bson::Bson::String(text)) if text.trim().parse::<i64>().is_ok() => {
            text.trim().parse().ok()
        }
        v => v.and_then(stored_number).map(|m| m.round() as i64),
    }
    .or_else(|| {
        user.get(user_fields::TOTAL_REVENUE)
            .and_then(stored_number)
            .map(crate::aggregate::revenue_micros)
    })
}

/// [`int_of`] of a document's field, `0` when it is missing or not an integer.
pub fn count_in(doc: &bson::Document, key: &str) -> i64 {
    doc.get(key).and_then(int_of).unwrap_or(0)
}

/// Collection names.
pub mod collections {
    pub const USERS: &str = "users";
    pub const EVENTS: &str = "events";
    pub const SESSIONS: &str = "sessions";
    pub const ADMIN_USERS: &str = "admin_users";
    pub const INTEGRATION_CONFIGS: &str = "integration_configs";
    pub const EXPORT_JOBS: &str = "export_jobs";
    pub const PRODUCTS: &str = "products";
    /// Dedupe ledger: one document per stored `eventId` (`_id` = eventId). Time-series
    /// collections cannot carry a unique index, so uniqueness of `eventId` lives here.
    pub const EVENT_IDS: &str = "event_ids";
    /// Import run history (the design document keeps history for exports only).
    pub const IMPORT_RUNS: &str = "import_runs";
    /// Progress of an import run in flight, so an interrupted run resumes where it stopped.
    pub const IMPORT_CHECKPOINTS: &str = "import_checkpoints";
    /// One document per scheduled fire of a job (`_id` = `job@instant`): the claim that
    /// makes each fire run once across replicas, its lease, and its outcome.
    pub const SCHEDULED_RUNS: &str = "scheduled_runs";
    /// Leases that keep a job kind to one run at a time across processes (`_id` = the
    /// kind, e.g. `ARCHIVE`).
    pub const JOB_LOCKS: &str = "job_locks";
    /// Admin API login tokens (stored hashed, expiring).
    pub const ADMIN_TOKENS: &str = "admin_tokens";
    /// Identity links of the Segment-compatible API: `_id` is an anonymous (or aliased)
    /// id, `visitorId` the known user it belongs to.
    pub const IDENTITIES: &str = "identities";
    /// Rotated OAuth refresh tokens, encrypted (`_id` = integration config name).
    pub const OAUTH_TOKENS: &str = "oauth_tokens";
    /// Records a transform plugin failed under the `dead-letter` policy, with the plugin,
    /// its reason and the pipeline (`tracking`, `import:NAME`, `export:TYPE`).
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// Days that received events after they may have been exported (`_id` = the day,
    /// `markedAt`; `exported.<TYPE>` = when an export of that type last read the day).
    pub const LATE_DAYS: &str = "late_days";
    /// Parts a publish replaced, kept for `[export] keep_replaced_parts_minutes` so
    /// queries already reading them finish (`_id` = the part's URL, `dest`, `key`,
    /// `dueAt`).
    pub const RETIRED_PARTS: &str = "retired_parts";

    /// Sluice's own collections, and the session aggregates: no import writes them and
    /// no EXPORT config reads them (a config applied through the admin API could
    /// otherwise mint login tokens or send password hashes out).
    pub const INTERNAL: [&str; 16] = [
        SESSIONS,
        ADMIN_USERS,
        ADMIN_TOKENS,
        INTEGRATION_CONFIGS,
        EXPORT_JOBS,
        EVENT_IDS,
        IMPORT_RUNS,
        IMPORT_CHECKPOINTS,
        SCHEDULED_RUNS,
        JOB_LOCKS,
        IDENTITIES,
        OAUTH_TOKENS,
        DEAD_LETTERS,
        LATE_DAYS,
        RETIRED_PARTS,
        "system.profile",
    ];
}

/// Field names shared by several collections.
pub mod common {
    pub const ID: &str = "_id";
    pub const CREATED_AT: &str = "createdAt";
    pub const UPDATED_AT: &str = "updatedAt";
}

pub mod user_fields {
    pub const VISITOR_ID: &str = "visitorId";
    pub const EMAIL: &str = "email";
    pub const FIRST_NAME: &str = "firstName";
    pub const LAST_NAME: &str = "lastName";
    pub const ATTRIBUTES: &str = "attributes";
    pub const FIRST_SEEN: &str = "firstSeen";
    pub const LAST_SEEN: &str = "lastSeen";
    pub const TOTAL_SESSIONS: &str = "totalSessions";
    pub const TOTAL_EVENTS: &str = "totalEvents";
    pub const TOTAL_PURCHASES: &str = "totalPurchases";
    pub const TOTAL_REVENUE: &str = "totalRevenue";
    /// Exact revenue in millionths, summed as an integer so the total does not depend on
    /// the order events arrive in; `totalRevenue` is derived from it.
    pub const TOTAL_REVENUE_MICROS: &str = "totalRevenueMicros";
    pub const TAGS: &str = "tags";
    pub const SEGMENTS: &str = "segments";
    /// Time of the `identify` whose traits the profile holds (a later one wins).
    pub const TRAITS_AT: &str = "traitsAt";
}

pub mod identity_fields {
    pub const VISITOR_ID: &str = "visitorId";
    /// Time of the message that made the link; the id's events from then on count for
    /// the visitor.
    pub const SINCE: &str = "since";
}

pub mod event_fields {
    pub const EVENT_ID: &str = "eventId";
    pub const USER_ID: &str = "userId";
    pub const SESSION_ID: &str = "sessionId";
    pub const EVENT_TYPE: &str = "eventType";
    pub const TIMESTAMP: &str = "timestamp";
    pub const PROPERTIES: &str = "properties";
    pub const METADATA: &str = "metadata";
    pub const PAGE_URL: &str = "pageUrl";
    pub const REFERRER: &str = "referrer";
    pub const DURATION: &str = "duration";
    /// `properties.amount` of a PURCHASE.
    pub const AMOUNT: &str = "amount";
    /// A PURCHASE's `amount` as sent, when it could not be read as one (kept, counting no
    /// revenue, rather than refusing the purchase).
    pub const AMOUNT_UNREAD: &str = "amountUnread";
    pub const CURRENCY: &str = "currency";
}

pub mod metadata_fields {
    pub const USER_AGENT: &str = "userAgent";
    pub const IP_ADDRESS: &str = "ipAddress";
    pub const DEVICE: &str = "device";
    pub const BROWSER: &str = "browser";
    pub const OS: &str = "os";
    pub const COUNTRY: &str = "country";
    pub const REGION: &str = "region";
    pub const CITY: &str = "city";
    pub const BOT: &str = "bot";
    pub const ANONYMOUS_ID: &str = "anonymousId";
    pub const CONTEXT: &str = "context";
    pub const CLIENT_TIMESTAMP: &str = "clientTimestamp";
    pub const SENT_AT: &str = "sentAt";
}

pub mod session_fields {
    pub const SESSION_ID: &str = "sessionId";
    pub const USER_ID: &str = "userId";
    pub const STATUS: &str = "status";
    pub const START_TIME: &str = "startTime";
    pub const END_TIME: &str = "endTime";
    pub const DURATION: &str = "duration";
    pub const PAGE_VIEWS: &str = "pageViews";
    pub const EVENTS: &str = "events";
    pub const ENTRY_PAGE: &str = "entryPage";
    pub const EXIT_PAGE: &str = "exitPage";
    pub const DEVICE: &str = "device";
    pub const BROWSER: &str = "browser";
    pub const OS: &str = "os";
    pub const COUNTRY: &str = "country";
}

pub mod event_id_fields {
    /// The event's own timestamp (lets the ledger be pruned together with archived events).
    pub const TIMESTAMP: &str = "ts";
    /// When the claim was taken; a claim whose event is missing from `events` and whose
    /// claim time is older than the lease may be completed by another writer.
    pub const CLAIMED_AT: &str = "at";
    /// The visitor and the session the event was counted in: a resend that completes an
    /// abandoned claim stores the event there, whatever it resolves to by then (an identity
    /// link or a gap session made in between).
    pub const USER_ID: &str = "u";
    pub const SESSION_ID: &str = "s";
    /// Set by ARCHIVE runs on claims whose events were archived and deleted: a resend of
    /// such an event is a duplicate, not an abandoned claim.
    pub const ARCHIVED: &str = "archived";
    /// Set once the claim's event is in `events`: a resend of it is a duplicate, known
    /// from the claim alone, without a lookup in `events` (a time-series collection,
    /// whose lookups by id read far more than the id's bucket).
    pub const STORED: &str = "stored";
}

pub mod admin_user_fields {
    pub const EMAIL: &str = "email";
    pub const ROLE: &str = "role";
    pub const IS_ACTIVE: &str = "isActive";
}

pub mod integration_fields {
    pub const NAME: &str = "name";
    pub const TYPE: &str = "type";
    pub const IS_ACTIVE: &str = "isActive";
    pub const LAST_SYNC: &str = "lastSync";
    /// The incremental cursor (largest `incremental.cursor_field` value imported, or the
    /// EXPORT watermark), advanced only after the sink committed.
    pub const SYNC_CURSOR: &str = "syncCursor";
    /// EXPORT: the `_id` of the last document pushed, breaking ties between documents
    /// with the same watermark value.
    pub const SYNC_CURSOR_ID: &str = "syncCursorId";
    /// IMPORT: the date cursor came from the API as epoch milliseconds, so it goes back
    /// to it as such (not as RFC 3339).
    pub const SYNC_CURSOR_EPOCH_MS: &str = "syncCursorEpochMs";
    /// The full config file as applied (secrets only as references).
    pub const SPEC: &str = "spec";
    /// When the config's schedule last took effect: set when it was created, or when its
    /// `schedule`, time zone or `isActive` changed (not by a no-op re-apply). The
    /// scheduler fires no instant before it as missed.
    pub const SCHEDULE_SINCE: &str = "scheduleSince";
}

pub mod import_run_fields {
    pub const RUN_ID: &str = "runId";
    pub const CONFIG: &str = "config";
    pub const STATUS: &str = "status";
    pub const START_TIME: &str = "startTime";
}

pub mod export_job_fields {
    pub const JOB_ID: &str = "jobId";
    pub const TYPE: &str = "type";
    pub const STATUS: &str = "status";
    pub const START_TIME: &str = "startTime";
    pub const END_TIME: &str = "endTime";
    pub const RECORDS_PROCESSED: &str = "recordsProcessed";
    pub const DESTINATION: &str = "destination";
    pub const ERROR: &str = "error";
    pub const FILES: &str = "files";
    pub const WINDOW_START: &str = "windowStart";
    pub const WINDOW_END: &str = "windowEnd";
    pub const CREATED_AT: &str = "createdAt";
}

pub mod product_fields {
    pub const PRODUCT_ID: &str = "productId";
    pub const CATEGORY: &str = "category";
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson};

    #[test]
    fn numbers_are_read_whatever_width_mongodb_stored() {
        assert_eq!(int_of(&Bson::Int32(-7)), Some(-7));
        assert_eq!(int_of(&Bson::Int64(1 << 40)), Some(1 << 40));
        assert_eq!(
            int_of(&Bson::Double(3.0)),
            None,
            "a double is not an integer"
        );
        assert_eq!(int_of(&Bson::String("3".into())), None);
        assert_eq!(number_of(&Bson::Double(2.5)), Some(2.5));
        assert_eq!(number_of(&Bson::Int32(2)), Some(2.0));
        assert_eq!(number_of(&Bson::Null), None);
        let d = doc! { "a": 5i32, "b": 6i64, "c": "x" };
        assert_eq!(
            [
                count_in(&d, "a"),
                count_in(&d, "b"),
                count_in(&d, "c"),
                count_in(&d, "z")
            ],
            [5, 6, 0, 0]
        );
    }
}
