//! Upkeep of the `event_ids` dedupe ledger.
//!
//! The ledger keeps one claim per stored event, and keeps it after ARCHIVE has moved the
//! event to Parquet and deleted it from `events` (marked `archived`), so a resend of an
//! archived event is still recognised as a duplicate. Those archived claims are all that
//! grows without bound; [`prune_archived_claims`] removes the ones for events older than a
//! date, once replays that old no longer need deduplicating.

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_core::model::{collections as c, common, event_id_fields as l};

use super::{Store, StoreError};

/// Claims deleted per round trip.
const CHUNK: i64 = 10_000;

/// The archived claims of events older than `before` (served by the partial
/// `archived_ts` index).
fn archived_before(before: DateTime) -> Document {
    doc! { l::ARCHIVED: true, l::TIMESTAMP: { "$lt": before } }
}

/// How many archived claims of events older than `before` there are.
pub async fn count_archived_claims(store: &Store, before: DateTime) -> Result<u64, StoreError> {
    store
        .collection(c::EVENT_IDS)
        .count_documents(archived_before(before))
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, "count archived claims"))
}

/// Deletes the archived claims of events older than `before`, [`CHUNK`] at a time,
/// calling `progress` with the running total after each chunk; returns how many were
/// deleted. Claims not marked archived (their events are still in `events`, or were never
/// stored) are never touched: without them a resend would be stored twice.
pub async fn prune_archived_claims(
    store: &Store,
    before: DateTime,
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let ledger = store.collection(c::EVENT_IDS);
    let mut deleted = 0;
    loop {
        let ids: Vec<bson::Bson> = ledger
            .find(archived_before(before))
            .projection(doc! { common::ID: 1 })
            .limit(CHUNK)
            .await
            .map_err(StoreError::mongo(c::EVENT_IDS, "find archived claims"))?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(StoreError::mongo(c::EVENT_IDS, "find archived claims"))?
            .into_iter()
            .filter_map(|d| d.get(common::ID).cloned())
            .collect();
        if ids.is_empty() {
            return Ok(deleted);
        }
        let mut filter = archived_before(before);
        filter.insert(common::ID, doc! { "$in": &ids });
        let n = ledger
            .delete_many(filter)
            .write_concern(store.write_concern().clone())
            .await
            .map_err(StoreError::mongo(c::EVENT_IDS, "delete archived claims"))?
            .deleted_count;
        deleted += n;
        progress(deleted);
        if (ids.len() as i64) < CHUNK {
            return Ok(deleted);
        }
    }
}
