//! The exported tables. Timestamps are microseconds since the epoch, UTC; flexible
//! sub-documents (`properties`, `attributes`) are JSON strings (MongoDB relaxed extended
//! JSON), which every warehouse can query with its JSON functions.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use sluice_core::model::{event_fields as e, metadata_fields as m, user_fields as u};

/// Parquet column names that are not MongoDB field names.
pub mod columns {
    pub const DATE: &str = "date";
    pub const EVENTS: &str = "events";
    pub const UNIQUE_USERS: &str = "uniqueUsers";
    pub const UNIQUE_SESSIONS: &str = "uniqueSessions";
    pub const PAGE_VIEWS: &str = "pageViews";
    pub const TOP_PAGES: &str = "topPages";
    pub const PAGE_URL: &str = "pageUrl";
    pub const VIEWS: &str = "views";
    pub const BOT: &str = "bot";
    pub const PURCHASES: &str = "purchases";
    pub const REVENUE: &str = "revenue";
    pub const CURRENCY: &str = "currency";
    pub const REVENUE_MICROS: &str = "revenueMicros";
}

/// How a column's values are taken from a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColKind {
    Str,
    /// Any value, as a JSON string.
    Json,
    /// A BSON date, as microseconds UTC.
    TimestampMicros,
    Int64,
    Float64,
    Bool,
    StrList,
    /// A `YYYY-MM-DD` string, as a Parquet DATE.
    Date,
    /// An array of `{pageUrl, views, uniqueUsers}`, as a list of structs.
    TopPages,
    /// A PURCHASE event's number at the path, as a double; null on other events, and
    /// where it is no number. A typed copy of a value the row holds whole elsewhere (in
    /// `properties`), so nothing it leaves null is lost or counted as unfitting.
    PurchaseNumber,
    /// A PURCHASE event's string at the path; null as for [`ColKind::PurchaseNumber`].
    PurchaseStr,
    /// An array of `{currency, purchases, revenue, revenueMicros}`, as a list of structs.
    Revenue,
    /// A visitor's exact revenue: the integer at the path, else (a profile another writer
    /// stored, with only `totalRevenue`) that number in millionths, rounded as the fold
    /// rounds amounts. A derived value, so none is counted as unfitting.
    RevenueMicros,
}

/// One column: its name in the file, the dotted path it is read from, its kind.
#[derive(Debug, Clone, Copy)]
pub struct ColumnSpec {
    pub name: &'static str,
    pub path: &'static str,
    pub kind: ColKind,
    pub nullable: bool,
}

const fn col(name: &'static str, path: &'static str, kind: ColKind, nullable: bool) -> ColumnSpec {
    ColumnSpec {
        name,
        path,
        kind,
        nullable,
    }
}

/// A named, versioned table.
#[derive(Debug, Clone, Copy)]
pub struct TableSpec {
    pub name: &'static str,
    pub version: u32,
    pub columns: &'static [ColumnSpec],
}

use ColKind::*;

/// Every field an event document has (but MongoDB's `_id`) is a column: ARCHIVE deletes
/// what it wrote, so a field without a column would be lost (see [`uncovered_field`]).
/// v2 added `anonymousId`, `context` and `updatedAt`; v3 `amount` and `currency`, a
/// PURCHASE's `properties.amount` and `properties.currency` typed (also in `properties`);
/// v4 `clientTimestamp` and `sentAt`, the client's own times of an event `sentAt` corrected.
pub const EVENT_TABLE: TableSpec = TableSpec {
    name: "events",
    version: 4,
    columns: &[
        col(e::EVENT_ID, e::EVENT_ID, Str, false),
        col(e::USER_ID, e::USER_ID, Str, false),
        col(e::SESSION_ID, e::SESSION_ID, Str, false),
        col(e::EVENT_TYPE, e::EVENT_TYPE, Str, false),
        col(e::TIMESTAMP, e::TIMESTAMP, TimestampMicros, false),
        col(e::PROPERTIES, e::PROPERTIES, Json, true),
        col(e::PAGE_URL, e::PAGE_URL, Str, true),
        col(e::REFERRER, e::REFERRER, Str, true),
        col(e::DURATION, e::DURATION, Int64, true),
        col(m::USER_AGENT, "metadata.userAgent", Str, true),
        col(m::IP_ADDRESS, "metadata.ipAddress", Str, true),
        col(m::DEVICE, "metadata.device", Str, true),
        col(m::BROWSER, "metadata.browser", Str, true),
        col(m::OS, "metadata.os", Str, true),
        col(m::COUNTRY, "metadata.country", Str, true),
        col(m::REGION, "metadata.region", Str, true),
        col(m::CITY, "metadata.city", Str, true),
        col(columns::BOT, "metadata.bot", Bool, false),
        col("createdAt", "createdAt", TimestampMicros, true),
        col(m::ANONYMOUS_ID, "metadata.anonymousId", Str, true),
        col(m::CONTEXT, "metadata.context", Json, true),
        col("updatedAt", "updatedAt", TimestampMicros, true),
        col(e::AMOUNT, "properties.amount", PurchaseNumber, true),
        col(e::CURRENCY, "properties.currency", PurchaseStr, true),
        col(
            m::CLIENT_TIMESTAMP,
            "metadata.clientTimestamp",
            TimestampMicros,
            true,
        ),
        col(m::SENT_AT, "metadata.sentAt", TimestampMicros, true),
    ],
};

/// The first field of `doc` (a dotted path) that no column of `table` reads, if any,
/// MongoDB's `_id` aside: a field a column reads as a whole (a JSON column) covers
/// everything below it.
pub fn uncovered_field(table: &TableSpec, doc: &bson::Document) -> Option<String> {
    // What follows `prefix.key` in a column's path ("" when it is exactly that), if it
    // starts so: compared in place, as this runs for every document an export reads.
    fn after<'a>(path: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
        let rest = match prefix {
            "" => path,
            _ => path.strip_prefix(prefix)?.strip_prefix('.')?,
        };
        rest.strip_prefix(key)
            .filter(|r| r.is_empty() || r.starts_with('.'))
    }
    fn walk(table: &TableSpec, doc: &bson::Document, prefix: &str) -> Option<String> {
        for (key, value) in doc {
            if prefix.is_empty() && key == "_id" {
                continue;
            }
            // Whether a column reads it whole, and else `prefix.key` (taken from a column's
            // path) when columns read fields inside it.
            let mut whole = false;
            let mut below = None;
            for c in table.columns {
                match after(c.path, prefix, key) {
                    Some("") => whole = true,
                    Some(rest) => below = Some(&c.path[..c.path.len() - rest.len()]),
                    None => {}
                }
            }
            // A column reads it, or there is nothing to lose.
            if whole || matches!(value, bson::Bson::Null) {
                continue;
            }
            match (value, below) {
                (bson::Bson::Document(sub), Some(path)) => {
                    if let Some(found) = walk(table, sub, path) {
                        return Some(found);
                    }
                }
                _ if prefix.is_empty() => return Some(key.clone()),
                _ => return Some(format!("{prefix}.{key}")),
            }
        }
        None
    }
    walk(table, doc, "")
}

/// v2 added `totalRevenueMicros`, the exact total (`totalRevenue` is a double).
pub const USER_TABLE: TableSpec = TableSpec {
    name: "users",
    version: 2,
    columns: &[
        col(u::VISITOR_ID, u::VISITOR_ID, Str, false),
        col(u::EMAIL, u::EMAIL, Str, true),
        col(u::FIRST_NAME, u::FIRST_NAME, Str, true),
        col(u::LAST_NAME, u::LAST_NAME, Str, true),
        col(u::ATTRIBUTES, u::ATTRIBUTES, Json, true),
        col(u::FIRST_SEEN, u::FIRST_SEEN, TimestampMicros, true),
        col(u::LAST_SEEN, u::LAST_SEEN, TimestampMicros, true),
        col(u::TOTAL_SESSIONS, u::TOTAL_SESSIONS, Int64, true),
        col(u::TOTAL_EVENTS, u::TOTAL_EVENTS, Int64, true),
        col(u::TOTAL_PURCHASES, u::TOTAL_PURCHASES, Int64, true),
        col(u::TOTAL_REVENUE, u::TOTAL_REVENUE, Float64, true),
        col(u::TAGS, u::TAGS, StrList, true),
        col(u::SEGMENTS, u::SEGMENTS, StrList, true),
        col("createdAt", "createdAt", TimestampMicros, true),
        col("updatedAt", "updatedAt", TimestampMicros, true),
        col(
            u::TOTAL_REVENUE_MICROS,
            u::TOTAL_REVENUE_MICROS,
            RevenueMicros,
            true,
        ),
    ],
};

/// v2 added `purchases` and `revenue` (per currency).
pub const DAILY_TABLE: TableSpec = TableSpec {
    name: "daily_analytics",
    version: 2,
    columns: &[
        col(columns::DATE, columns::DATE, Date, false),
        col(columns::EVENTS, columns::EVENTS, Int64, false),
        col(columns::UNIQUE_USERS, columns::UNIQUE_USERS, Int64, false),
        col(
            columns::UNIQUE_SESSIONS,
            columns::UNIQUE_SESSIONS,
            Int64,
            false,
        ),
        col(columns::PAGE_VIEWS, columns::PAGE_VIEWS, Int64, false),
        col(columns::TOP_PAGES, columns::TOP_PAGES, TopPages, false),
        // Nullable: rows a plugin builds itself (from before v2) may not have them.
        col(columns::PURCHASES, columns::PURCHASES, Int64, true),
        col(columns::REVENUE, columns::REVENUE, Revenue, true),
    ],
};

pub(crate) fn top_page_fields() -> Fields {
    Fields::from(vec![
        Field::new(columns::PAGE_URL, DataType::Utf8, true),
        Field::new(columns::VIEWS, DataType::Int64, false),
        Field::new(columns::UNIQUE_USERS, DataType::Int64, false),
    ])
}

pub(crate) fn revenue_fields() -> Fields {
    Fields::from(vec![
        Field::new(columns::CURRENCY, DataType::Utf8, true),
        Field::new(columns::PURCHASES, DataType::Int64, false),
        Field::new(columns::REVENUE, DataType::Float64, false),
        Field::new(columns::REVENUE_MICROS, DataType::Int64, false),
    ])
}

pub(crate) fn arrow_type(kind: ColKind) -> DataType {
    match kind {
        Str | Json | PurchaseStr => DataType::Utf8,
        TimestampMicros => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Int64 | RevenueMicros => DataType::Int64,
        Float64 | PurchaseNumber => DataType::Float64,
        Bool => DataType::Boolean,
        StrList => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        Date => DataType::Date32,
        TopPages => DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(top_page_fields()),
            false,
        ))),
        Revenue => DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(revenue_fields()),
            false,
        ))),
    }
}

/// The Arrow schema of a table, with its name and version in the metadata.
pub fn schema_of(table: &TableSpec) -> SchemaRef {
    let fields: Vec<Field> = table
        .columns
        .iter()
        .map(|c| {
            let field = Field::new(c.name, arrow_type(c.kind), c.nullable);
            if c.kind == Json {
                // Arrow's canonical JSON extension, written as Parquet's JSON logical type:
                // DuckDB reads the column as JSON, BigQuery loads it into a JSON column, and
                // readers that do not know the annotation read the string (it is UTF-8).
                field.with_extension_type(arrow_schema::extension::Json::default())
            } else {
                field
            }
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = [(
        "sluice.table".to_string(),
        format!("{}/v{}", table.name, table.version),
    )]
    .into_iter()
    .collect();
    Arc::new(Schema::new_with_metadata(fields, meta))
}

pub fn event_schema() -> SchemaRef {
    schema_of(&EVENT_TABLE)
}

pub fn user_schema() -> SchemaRef {
    schema_of(&USER_TABLE)
}

pub fn daily_schema() -> SchemaRef {
    schema_of(&DAILY_TABLE)
}

/// The schema as it goes into `_manifest.json`.
pub fn schema_description(table: &TableSpec) -> serde_json::Value {
    serde_json::json!({
        "name": table.name,
        "version": table.version,
        "columns": table.columns.iter().map(|c| serde_json::json!({
            "name": c.name,
            "type": type_name(c.kind),
            "nullable": c.nullable,
        })).collect::<Vec<_>>(),
    })
}

/// A column's type as the manifest names it: a fixed vocabulary, close to SQL DDL, that
/// does not change with the Arrow library's way of printing types.
pub fn type_name(kind: ColKind) -> &'static str {
    match kind {
        Str | PurchaseStr => "string",
        Json => "json",
        TimestampMicros => "timestamp_us_utc",
        Int64 | RevenueMicros => "int64",
        Float64 | PurchaseNumber => "double",
        Bool => "boolean",
        StrList => "list<string>",
        Date => "date",
        TopPages => "list<struct<pageUrl:string,views:int64,uniqueUsers:int64>>",
        Revenue => {
            "list<struct<currency:string,purchases:int64,revenue:double,revenueMicros:int64>>"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn the_manifests_type_names_follow_the_arrow_types() {
        fn name_of(t: &DataType) -> String {
            match t {
                DataType::Utf8 => "string".into(),
                DataType::Int64 => "int64".into(),
                DataType::Float64 => "double".into(),
                DataType::Boolean => "boolean".into(),
                DataType::Date32 => "date".into(),
                DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) if &**tz == "UTC" => {
                    "timestamp_us_utc".into()
                }
                DataType::List(item) => format!("list<{}>", name_of(item.data_type())),
                DataType::Struct(fields) => format!(
                    "struct<{}>",
                    fields
                        .iter()
                        .map(|f| format!("{}:{}", f.name(), name_of(f.data_type())))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => panic!("no name for {other}"),
            }
        }
        let every = [
            Str,
            Json,
            TimestampMicros,
            Int64,
            Float64,
            Bool,
            StrList,
            Date,
            TopPages,
            PurchaseNumber,
            PurchaseStr,
            Revenue,
            RevenueMicros,
        ];
        for kind in every {
            // No wildcard: a new kind does not compile until this test names it.
            let expected = match kind {
                // A string column holding JSON: named for what it holds.
                Json => "json".to_string(),
                Str | TimestampMicros | Int64 | Float64 | Bool | StrList | Date | TopPages
                | PurchaseNumber | PurchaseStr | Revenue | RevenueMicros => {
                    name_of(&arrow_type(kind))
                }
            };
            assert_eq!(type_name(kind), expected, "{kind:?}");
        }
    }

    #[test]
    fn every_field_of_an_event_is_covered_and_a_foreign_one_is_named() {
        let full = doc! {
            "_id": bson::oid::ObjectId::new(), "eventId": "e", "userId": "u", "sessionId": "s",
            "eventType": "CLICK", "timestamp": bson::DateTime::now(),
            "properties": { "any": { "nested": [1, 2] } }, "pageUrl": "/", "referrer": null,
            "duration": 5_i64, "createdAt": bson::DateTime::now(), "updatedAt": bson::DateTime::now(),
            "metadata": {
                "userAgent": "ua", "ipAddress": "1.2.3.4", "device": "mobile", "browser": "b",
                "os": "o", "country": "FR", "region": "IDF", "city": "Paris", "bot": false,
                "anonymousId": "a", "context": { "page": { "path": "/" } },
            },
        };
        assert_eq!(uncovered_field(&EVENT_TABLE, &full), None);
        let mut extra = full.clone();
        extra.insert("legacy", 1);
        assert_eq!(
            uncovered_field(&EVENT_TABLE, &extra).as_deref(),
            Some("legacy")
        );
        let mut nested = full.clone();
        nested
            .get_document_mut("metadata")
            .unwrap()
            .insert("score", 1);
        assert_eq!(
            uncovered_field(&EVENT_TABLE, &nested).as_deref(),
            Some("metadata.score")
        );
        // A null loses nothing; a scalar where columns read inside it does.
        let mut flat = full.clone();
        flat.insert("metadata", bson::Bson::Null);
        assert_eq!(uncovered_field(&EVENT_TABLE, &flat), None);
        flat.insert("metadata", "text");
        assert_eq!(
            uncovered_field(&EVENT_TABLE, &flat).as_deref(),
            Some("metadata")
        );
    }
}
