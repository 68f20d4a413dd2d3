//! Upkeep of the `dead_letters` collection: what is kept, and deleting what is no longer
//! wanted. Letters never expire on their own (they are the only copy of what failed).

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_core::model::collections as c;

use super::{Store, StoreError};

/// The dead letters of one pipeline and plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct LetterGroup {
    pub pipeline: String,
    pub plugin: String,
    pub letters: u64,
    /// When the group's first letter was kept.
    pub first_seen: DateTime,
    /// When one of its records last failed (kept, or failed again by a later run).
    pub last_seen: DateTime,
}

/// The kept dead letters, grouped by pipeline and plugin, in that order.
pub async fn dead_letter_groups(store: &Store) -> Result<Vec<LetterGroup>, StoreError> {
    let step = "count dead letters";
    let pipeline = vec![
        doc! { "$group": {
            "_id": { "pipeline": "$pipeline", "plugin": "$plugin" },
            "letters": { "$sum": 1 },
            "first": { "$min": "$createdAt" },
            "last": { "$max": { "$ifNull": ["$lastSeenAt", "$createdAt"] } },
        } },
        doc! { "$sort": { "_id.pipeline": 1, "_id.plugin": 1 } },
    ];
    let groups: Vec<Document> = store
        .collection(c::DEAD_LETTERS)
        .aggregate(pipeline)
        .await
        .map_err(StoreError::mongo(c::DEAD_LETTERS, step))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::DEAD_LETTERS, step))?;
    Ok(groups
        .iter()
        .map(|g| {
            let key = g.get_document("_id").ok();
            let text = |k: &str| {
                key.and_then(|d| d.get_str(k).ok())
                    .unwrap_or("?")
                    .to_string()
            };
            let at = |k: &str| g.get_datetime(k).copied().unwrap_or(DateTime::MIN);
            LetterGroup {
                pipeline: text("pipeline"),
                plugin: text("plugin"),
                letters: g
                    .get("letters")
                    .and_then(sluice_core::model::int_of)
                    .unwrap_or(0) as u64,
                first_seen: at("first"),
                last_seen: at("last"),
            }
        })
        .collect())
}

/// Deletes (or, with `dry_run`, counts) the dead letters of `pipeline`: all of them, or
/// those last seen before `before` (kept before it and not failed again since).
pub async fn purge_dead_letters(
    store: &Store,
    pipeline: &str,
    before: Option<DateTime>,
    dry_run: bool,
) -> Result<u64, StoreError> {
    let mut filter = doc! { "pipeline": pipeline };
    if let Some(before) = before {
        filter.insert("createdAt", doc! { "$lt": before });
        filter.insert(
            "$or",
            vec![
                doc! { "lastSeenAt": { "$exists": false } },
                doc! { "lastSeenAt": { "$lt": before } },
            ],
        );
    }
    let letters = store.collection(c::DEAD_LETTERS);
    if dry_run {
        return letters
            .count_documents(filter)
            .await
            .map_err(StoreError::mongo(c::DEAD_LETTERS, "count dead letters"));
    }
    letters
        .delete_many(filter)
        .await
        .map(|r| r.deleted_count)
        .map_err(StoreError::mongo(c::DEAD_LETTERS, "delete dead letters"))
}
