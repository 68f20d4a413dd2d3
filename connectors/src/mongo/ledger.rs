//! Upkeep of the `event_ids` dedupe ledger.
//!
//! The ledger keeps one claim per stored event, and keeps it after ARCHIVE has moved the
//! event to Parquet and deleted it from `events` (marked `archived`), so a resend of an
//! archived event is still recognised as a duplicate. Those archived claims are all that
//! grows without bound; [`prune_archived_claims`] removes the ones for events older than a
//! date, once replays that old no longer need deduplicating.

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_core::model::{collections as c, common, event_fields as e, event_id_fields as l};

use super::{Store, StoreError};

/// Claims deleted per round trip.
const CHUNK: usize = 10_000;

/// The archived claims of events older than `before` (served by the partial
/// `archived_ts` index).
fn archived_before(before: DateTime) -> Document {
    doc! { l::ARCHIVED: true, l::TIMESTAMP: { "$lt": before } }
}

/// Those of `ids` the ledger holds a claim of: events taken before (stored, or being
/// stored).
pub async fn claimed(
    store: &Store,
    ids: &[&str],
    step: &'static str,
) -> Result<std::collections::HashSet<String>, StoreError> {
    store
        .collection(c::EVENT_IDS)
        .find(doc! { common::ID: { "$in": ids } })
        .projection(doc! { common::ID: 1 })
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, step))?
        .try_filter_map(|d| async move { Ok(d.get_str(common::ID).ok().map(str::to_string)) })
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, step))
}

/// How many archived claims of events older than `before` there are.
pub async fn count_archived_claims(store: &Store, before: DateTime) -> Result<u64, StoreError> {
    store
        .collection(c::EVENT_IDS)
        .count_documents(archived_before(before))
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, "count archived claims"))
}

/// The timestamp of the latest event whose claim is marked archived, if any.
pub async fn latest_archived_claim(store: &Store) -> Result<Option<DateTime>, StoreError> {
    let step = "find the latest archived claim";
    let found = store
        .collection(c::EVENT_IDS)
        .find_one(doc! { l::ARCHIVED: true })
        .sort(doc! { l::ARCHIVED: -1, l::TIMESTAMP: -1 })
        .projection(doc! { l::TIMESTAMP: 1 })
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, step))?;
    Ok(found.and_then(|d| d.get_datetime(l::TIMESTAMP).ok().copied()))
}

/// What [`prune_archived_claims`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: u64,
    /// Claims marked archived whose events are still in `events` (an ARCHIVE stopped
    /// between marking and deleting them, or still running): kept.
    pub kept: u64,
}

/// Deletes the archived claims of events older than `before`, [`CHUNK`] at a time,
/// calling `progress` after each chunk; returns how many were deleted and kept. A claim
/// whose event is in `events` is never deleted, marked archived or not: without it a
/// resend of that event would be stored and counted twice.
pub async fn prune_archived_claims(
    store: &Store,
    before: DateTime,
    mut progress: impl FnMut(Pruned),
) -> Result<Pruned, StoreError> {
    let ledger = store.collection(c::EVENT_IDS);
    let mut cursor = ledger
        .find(archived_before(before))
        .projection(doc! { common::ID: 1 })
        .batch_size(CHUNK as u32)
        .await
        .map_err(StoreError::mongo(c::EVENT_IDS, "find archived claims"))?;
    let mut done = Pruned::default();
    let mut chunk: Vec<String> = Vec::with_capacity(CHUNK);
    loop {
        let next = cursor
            .try_next()
            .await
            .map_err(StoreError::mongo(c::EVENT_IDS, "find archived claims"))?;
        let end = next.is_none();
        if let Some(id) = next.as_ref().and_then(|d| d.get_str(common::ID).ok()) {
            chunk.push(id.to_string());
        }
        if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
            let ids = std::mem::take(&mut chunk);
            // By id alone: nearly every event of these claims is gone (archived), and a
            // claim is deleted only once its event surely is; a lookup near the claims'
            // times would only come first.
            let stored = events_held_by_id(
                store,
                ids.iter().map(String::as_str),
                "find events still stored",
            )
            .await?;
            let gone: Vec<&String> = ids.iter().filter(|id| !stored.contains(*id)).collect();
            done.kept += (ids.len() - gone.len()) as u64;
            if !gone.is_empty() {
                let mut filter = archived_before(before);
                filter.insert(common::ID, doc! { "$in": gone });
                done.deleted += ledger
                    .delete_many(filter)
                    .write_concern(store.write_concern().clone())
                    .await
                    .map_err(StoreError::mongo(c::EVENT_IDS, "delete archived claims"))?
                    .deleted_count;
            }
            progress(done);
        }
        if end {
            return Ok(done);
        }
    }
}

/// What [`claim_stored_events`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Events read from `events`.
    pub read: u64,
    /// Claims made.
    pub claimed: u64,
    /// Events claimed already (Sluice stored them, or an earlier run of this made them).
    pub already: u64,
    /// Events without an `eventId` (text) or a `timestamp` (a date): nothing to claim.
    pub skipped: u64,
}

/// Gives every event in `events` without a ledger claim one, as stored: for a database
/// another writer filled, whose events Sluice's deduplication would otherwise not know
/// (a resend of one would be stored and counted again). [`CHUNK`] claims at a time,
/// calling `progress` after each; claims already there are left as they are, so it can
/// be run again (after an interruption, or while the other writer still writes).
pub async fn claim_stored_events(
    store: &Store,
    mut progress: impl FnMut(Adopted),
) -> Result<Adopted, StoreError> {
    let mut cursor = store
        .collection(c::EVENTS)
        .find(doc! {})
        .projection(doc! { e::EVENT_ID: 1, e::TIMESTAMP: 1, e::USER_ID: 1, e::SESSION_ID: 1 })
        .batch_size(CHUNK as u32)
        .await
        .map_err(StoreError::mongo(c::EVENTS, "read events"))?;
    let mut done = Adopted::default();
    let mut chunk: Vec<Document> = Vec::with_capacity(CHUNK);
    loop {
        let next = cursor
            .try_next()
            .await
            .map_err(StoreError::mongo(c::EVENTS, "read events"))?;
        let end = next.is_none();
        if let Some(event) = next {
            done.read += 1;
            match (event.get_str(e::EVENT_ID), event.get_datetime(e::TIMESTAMP)) {
                (Ok(id), Ok(ts)) => {
                    let mut claim = doc! {
                        common::ID: id, l::TIMESTAMP: ts, l::CLAIMED_AT: store.now(),
                        l::STORED: true,
                    };
                    for (from, to) in [(e::USER_ID, l::USER_ID), (e::SESSION_ID, l::SESSION_ID)] {
                        if let Ok(v) = event.get_str(from) {
                            claim.insert(to, v);
                        }
                    }
                    chunk.push(claim);
                }
                _ => done.skipped += 1,
            }
        }
        if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
            let claims = std::mem::take(&mut chunk);
            let n = claims.len() as u64;
            let already = match store
                .collection(c::EVENT_IDS)
                .insert_many(claims)
                .ordered(false)
                .write_concern(store.write_concern().clone())
                .await
            {
                Ok(_) => 0,
                Err(err) => match super::duplicate_key_positions(&err) {
                    Some(positions) => positions.len() as u64,
                    None => return Err(StoreError::mongo(c::EVENT_IDS, "make claims")(err)),
                },
            };
            done.already += already;
            done.claimed += n - already;
            progress(done);
        }
        if end {
            return Ok(done);
        }
    }
}

/// The eventIds among `wanted` (each with the time its claim counted the event at, when
/// the claim says: `ts`) that `events` holds.
///
/// Looked up by id within those times, give or take `slack`. `events` is a time-series
/// collection, and an index on a measurement field such as `eventId` keeps each bucket's
/// least and greatest value: random ids span nearly every bucket, so an id alone reads
/// the whole collection (seen: 14-22 s for 31 ids at 127,000 events, under load, which
/// kept a client's resends unanswered). The time index narrows the lookup to the buckets
/// of the claimed times: ids whose times lie within an hour of each other are looked up
/// together, between the first and the last; an id whose claim has no time (a claim of
/// an earlier version) by its id alone.
pub async fn events_held(
    store: &Store,
    wanted: &[(&str, Option<DateTime>)],
    slack: std::time::Duration,
    step: &'static str,
) -> Result<std::collections::HashSet<String>, StoreError> {
    const APART: i64 = 3_600_000;
    let slack = slack.as_millis() as i64;
    let mut timed: Vec<(i64, &str)> = wanted
        .iter()
        .filter_map(|(id, t)| t.map(|t| (t.timestamp_millis(), *id)))
        .collect();
    timed.sort_unstable();
    let untimed: Vec<&str> = wanted
        .iter()
        .filter(|(_, t)| t.is_none())
        .map(|(id, _)| *id)
        .collect();
    let mut lookups: Vec<Document> = Vec::new();
    let mut group: Vec<&str> = Vec::new();
    let mut first = 0;
    for (n, (t, id)) in timed.iter().enumerate() {
        if n > 0 && t - timed[n - 1].0 > APART {
            lookups.push(within(&group, first, timed[n - 1].0, slack));
            group.clear();
        }
        if group.is_empty() {
            first = *t;
        }
        group.push(id);
    }
    if let Some((last, _)) = timed.last() {
        lookups.push(within(&group, first, *last, slack));
    }
    if !untimed.is_empty() {
        lookups.push(doc! { e::EVENT_ID: { "$in": untimed } });
    }
    let mut held = std::collections::HashSet::new();
    for filter in lookups {
        let found: Vec<Document> = store
            .collection(c::EVENTS)
            .find(filter)
            .projection(doc! { e::EVENT_ID: 1, common::ID: 0 })
            .await
            .map_err(StoreError::mongo(c::EVENTS, step))?
            .try_collect()
            .await
            .map_err(StoreError::mongo(c::EVENTS, step))?;
        held.extend(
            found
                .iter()
                .filter_map(|d| d.get_str(e::EVENT_ID).ok().map(str::to_string)),
        );
    }
    Ok(held)
}

/// [`events_held`] by id alone: for ids that are most likely missing, which only a
/// lookup by id alone can say.
pub async fn events_held_by_id<'a>(
    store: &Store,
    ids: impl IntoIterator<Item = &'a str>,
    step: &'static str,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let wanted: Vec<(&str, Option<DateTime>)> = ids.into_iter().map(|id| (id, None)).collect();
    events_held(store, &wanted, std::time::Duration::ZERO, step).await
}

/// The filter for `ids` whose times lie between `from` and `to` (ms), widened by `slack`.
fn within(ids: &[&str], from: i64, to: i64, slack: i64) -> Document {
    doc! {
        e::EVENT_ID: { "$in": ids },
        e::TIMESTAMP: {
            "$gte": DateTime::from_millis(from.saturating_sub(slack)),
            "$lte": DateTime::from_millis(to.saturating_add(slack)),
        },
    }
}
