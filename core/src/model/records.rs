//! Typed documents of each collection. Optional fields are omitted when absent, so stored
//! documents carry only what is known (the `email` index is sparse for that reason).

use bson::oid::ObjectId;
use bson::{DateTime, Document};
use serde::{Deserialize, Serialize};

use super::{
    AuthType, EventType, ExportJobStatus, ExportJobType, HttpMethod, IntegrationType, Role,
    SessionStatus,
};

/// `users`: a visitor profile with aggregates over its stored events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub visitor_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default)]
    pub attributes: Document,
    pub first_seen: DateTime,
    pub last_seen: DateTime,
    pub total_sessions: i64,
    pub total_events: i64,
    pub total_purchases: i64,
    pub total_revenue: f64,
    #[serde(default)]
    pub total_revenue_micros: i64,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub segments: Vec<String>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// `events.metadata`: what the tracking endpoint learns from the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Set when the user agent looks like a crawler and bots are kept-and-flagged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bot: bool,
    /// The SDK's anonymous id when the event was attributed to a known user (Segment API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// The rest of an SDK's `context` (page, device, os, location, app, library, ...),
    /// kept as sent (Segment API).
    #[serde(default, skip_serializing_if = "Document::is_empty")]
    pub context: Document,
    /// The event's time by the client's clock, as sent, when `sentAt` corrected it
    /// (`timestamp` is the corrected time): what the correction started from.
    /// (Read leniently: another writer's `metadata.sentAt` as text is none, not an event
    /// that cannot be read.)
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "date_or_none"
    )]
    pub client_timestamp: Option<DateTime>,
    /// When the client sent the event, by that same clock (the event's or its batch's
    /// `sentAt`), kept beside `client_timestamp`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "date_or_none"
    )]
    pub sent_at: Option<DateTime>,
}

/// A date, or none for any other value.
fn date_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<DateTime>, D::Error> {
    Ok(match bson::Bson::deserialize(d)? {
        bson::Bson::DateTime(t) => Some(t),
        _ => None,
    })
}

/// `events`: one tracked event. Stored in a time-series collection (`timestamp` is the
/// time field); `eventId` is unique through the `event_ids` ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub event_id: String,
    pub user_id: String,
    pub session_id: String,
    pub event_type: EventType,
    pub timestamp: DateTime,
    #[serde(default)]
    pub properties: Document,
    #[serde(default)]
    pub metadata: EventMetadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    /// Time spent, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

impl Event {
    /// The purchase amount of a PURCHASE event (`properties.amount`), if it is a number.
    pub fn purchase_amount(&self) -> Option<f64> {
        if self.event_type != EventType::Purchase {
            return None;
        }
        amount_of(&self.properties)
    }
}

/// `properties.amount` as a number, if it is one (double, int32 or int64).
pub fn amount_of(properties: &bson::Document) -> Option<f64> {
    super::number_of(properties.get(super::event_fields::AMOUNT)?)
}

/// `sessions`: aggregates over the stored events of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub session_id: String,
    pub user_id: String,
    pub status: SessionStatus,
    pub start_time: DateTime,
    pub end_time: DateTime,
    /// `endTime - startTime`, in milliseconds.
    pub duration: i64,
    pub page_views: i64,
    pub events: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Ordering keys that make the aggregates independent of arrival order: the earliest
    /// event (device, browser, ... come from it), the earliest and latest page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_event: Option<EventKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_event: Option<EventKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_event: Option<EventKey>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

impl Session {
    /// The fields its document always has (`_id` aside).
    pub const REQUIRED_FIELDS: [&'static str; 10] = [
        "sessionId",
        "userId",
        "status",
        "startTime",
        "endTime",
        "duration",
        "pageViews",
        "events",
        "createdAt",
        "updatedAt",
    ];

    /// Whether `name` is a field of a session document as Sluice writes one.
    pub fn is_field(name: &str) -> bool {
        name == "_id"
            || Self::REQUIRED_FIELDS.contains(&name)
            || Self::optional_fields().any(|f| f == name)
    }

    /// The text fields its document leaves out when they are `None`.
    pub const TEXT_FIELDS: [&'static str; 10] = [
        "entryPage",
        "exitPage",
        "device",
        "browser",
        "os",
        "country",
        "region",
        "city",
        "ipAddress",
        "userAgent",
    ];

    /// Its ordering keys (see [`crate::aggregate`]), left out when `None`.
    pub const KEY_FIELDS: [&'static str; 3] = ["firstEvent", "entryEvent", "exitEvent"];

    /// The fields its document leaves out when they are `None`: what a write that sets
    /// the others unsets, so that fields other writers keep in a session stay.
    pub fn optional_fields() -> impl Iterator<Item = &'static str> {
        Self::TEXT_FIELDS.into_iter().chain(Self::KEY_FIELDS)
    }
}

/// A total order on events: by timestamp, then by `eventId` for ties.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventKey {
    pub timestamp: DateTime,
    pub event_id: String,
}

/// `admin_users`: people who use the admin and analytics API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminUser {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub email: String,
    /// bcrypt hash, never the password.
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    pub role: Role,
    pub is_active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_login: Option<DateTime>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// `integration_configs`: the design document's fields; connector-specific settings
/// (pagination, selectors, ...) live in `options`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationConfig {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: IntegrationType,
    pub endpoint: String,
    pub method: HttpMethod,
    #[serde(default)]
    pub headers: Document,
    pub auth_type: AuthType,
    /// Secret values are stored as `${env:NAME}` references, never in clear.
    #[serde(default)]
    pub auth_config: Document,
    #[serde(default)]
    pub mapping: Document,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub is_active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<DateTime>,
    #[serde(default)]
    pub options: Document,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// `export_jobs`: the history of export runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportJob {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: ExportJobType,
    pub status: ExportJobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<DateTime>,
    pub records_processed: i64,
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The data window exported (first and last day, `YYYY-MM-DD`), when the type has one;
    /// the scheduler catches up missed windows from the last completed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<String>,
    /// Files published by the run.
    #[serde(default)]
    pub files: i64,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// `products`: the catalogue that imports fill (the design document's data flow names the
/// collection without a schema). `productId` is the source system's id and is unique.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    #[serde(rename = "_id", skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub product_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_stock: Option<bool>,
    #[serde(default)]
    pub attributes: Document,
    /// The integration config that last wrote this product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_time_another_writer_stored_as_text_reads_as_none() {
        let at = DateTime::from_millis(1_700_000_000_000);
        let m: EventMetadata = bson::from_document(bson::doc! {
            "device": "mobile", "sentAt": "2026-01-01T00:00:00Z", "clientTimestamp": 12,
        })
        .unwrap();
        assert_eq!((m.sent_at, m.client_timestamp), (None, None));
        assert_eq!(m.device.as_deref(), Some("mobile"));
        let m: EventMetadata =
            bson::from_document(bson::doc! { "sentAt": at, "clientTimestamp": at }).unwrap();
        assert_eq!((m.sent_at, m.client_timestamp), (Some(at), Some(at)));
    }

    #[test]
    fn event_serializes_with_the_design_documents_field_names() {
        let now = DateTime::from_millis(1_700_000_000_000);
        let e = Event {
            id: None,
            event_id: "e1".into(),
            user_id: "v1".into(),
            session_id: "s1".into(),
            event_type: EventType::Purchase,
            timestamp: now,
            properties: bson::doc! { "amount": 12.5, "currency": "EUR" },
            metadata: EventMetadata::default(),
            page_url: Some("/checkout".into()),
            referrer: None,
            duration: None,
            created_at: now,
            updated_at: now,
        };
        let doc = bson::to_document(&e).unwrap();
        for key in [
            "eventId",
            "userId",
            "sessionId",
            "eventType",
            "timestamp",
            "pageUrl",
        ] {
            assert!(doc.contains_key(key), "missing {key} in {doc}");
        }
        assert!(!doc.contains_key("_id") && !doc.contains_key("referrer"));
        assert_eq!(doc.get_str("eventType").unwrap(), "PURCHASE");
        assert_eq!(e.purchase_amount(), Some(12.5));
        let back: Event = bson::from_document(doc).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn a_sessions_optional_fields_are_those_left_out_when_none() {
        let now = DateTime::from_millis(0);
        let key = Some(EventKey {
            timestamp: now,
            event_id: "e".into(),
        });
        let some = Some("x".to_string());
        let full = Session {
            id: None,
            session_id: "s".into(),
            user_id: "v".into(),
            status: SessionStatus::Active,
            start_time: now,
            end_time: now,
            duration: 0,
            page_views: 0,
            events: 0,
            entry_page: some.clone(),
            exit_page: some.clone(),
            device: some.clone(),
            browser: some.clone(),
            os: some.clone(),
            country: some.clone(),
            region: some.clone(),
            city: some.clone(),
            ip_address: some.clone(),
            user_agent: some,
            first_event: key.clone(),
            entry_event: key.clone(),
            exit_event: key,
            created_at: now,
            updated_at: now,
        };
        let bare = Session {
            entry_page: None,
            exit_page: None,
            device: None,
            browser: None,
            os: None,
            country: None,
            region: None,
            city: None,
            ip_address: None,
            user_agent: None,
            first_event: None,
            entry_event: None,
            exit_event: None,
            ..full.clone()
        };
        let (full, bare) = (
            bson::to_document(&full).unwrap(),
            bson::to_document(&bare).unwrap(),
        );
        let mut left_out: Vec<&str> = full
            .keys()
            .map(String::as_str)
            .filter(|k| !bare.contains_key(*k))
            .collect();
        let mut listed: Vec<&str> = Session::optional_fields().collect();
        left_out.sort_unstable();
        listed.sort_unstable();
        assert_eq!(left_out, listed);
        let mut always: Vec<&str> = bare.keys().map(String::as_str).collect();
        let mut required = Session::REQUIRED_FIELDS.to_vec();
        always.sort_unstable();
        required.sort_unstable();
        assert_eq!(always, required);
    }
}
