//! Session upkeep: sessions idle for longer than the timeout are marked EXPIRED.

use bson::{doc, DateTime};
use sluice_core::model::{collections as c, common, session_fields as s, SessionStatus};

use super::{Store, StoreError};

/// Marks ACTIVE sessions whose last event is older than `idle` as EXPIRED; returns how
/// many changed.
pub async fn expire_idle_sessions(
    store: &Store,
    idle: std::time::Duration,
) -> Result<u64, StoreError> {
    let now = store.now();
    let cutoff = DateTime::from_millis(now.timestamp_millis() - idle.as_millis() as i64);
    let result = store
        .collection(c::SESSIONS)
        .update_many(
            // `startTime <= endTime`, so the startTime bound changes nothing but lets the
            // design document's `{status, startTime}` index narrow the scan to sessions
            // that started before the cutoff (no index on `endTime`, see `db init`).
            doc! {
                s::STATUS: SessionStatus::Active.as_str(),
                s::START_TIME: { "$lt": cutoff },
                s::END_TIME: { "$lt": cutoff },
            },
            doc! { "$set": { s::STATUS: SessionStatus::Expired.as_str(), common::UPDATED_AT: now } },
        )
        .await
        .map_err(StoreError::mongo(c::SESSIONS, "expire idle sessions"))?;
    Ok(result.modified_count)
}
