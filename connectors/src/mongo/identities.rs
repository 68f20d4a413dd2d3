//! Identity links of the Segment-compatible API and profile traits.
//!
//! `identities` holds one document per linked id: `_id` is an anonymous id (or an id
//! retired by `alias`), `visitorId` the known user it counts as, `since` the time of the
//! message that linked them: events of the id from that time on count for the user,
//! earlier ones stay with the id, whatever order they are delivered in. The first link of
//! an id wins (an insert, so concurrent requests and replicas agree through the unique
//! `_id`). Links are followed in chains (an anonymous id linked to a user who was later
//! aliased counts for the final user), at most [`MAX_HOPS`] deep, and a link that would
//! close a cycle is not made.
//!
//! Only anonymous ids are resolved through links: a message with a `userId` always counts
//! for that user. Write keys of browser SDKs are public, so anyone could otherwise send a
//! message pairing a victim's user id with their own and capture the victim's events.

use std::collections::HashMap;

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_core::model::{collections as c, common, identity_fields as i, user_fields as u};

use super::{Store, StoreError};

/// A linked id: the visitor it counts as, from `since` (epoch ms) on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub visitor: String,
    pub since_ms: i64,
}

/// Links followed at most this deep.
pub const MAX_HOPS: usize = 4;

/// What `id`, seen at `at_ms`, counts as: its links followed while each applies at that
/// time.
pub fn resolve(links: &HashMap<String, Link>, id: &str, at_ms: i64) -> String {
    let mut current = id;
    for _ in 0..MAX_HOPS {
        match links.get(current) {
            Some(l) if at_ms >= l.since_ms && l.visitor != id => current = &l.visitor,
            _ => break,
        }
    }
    current.to_string()
}

/// The links of `ids` and of the visitors they lead to, [`MAX_HOPS`] deep.
async fn chains(store: &Store, ids: &[&str]) -> Result<HashMap<String, Link>, StoreError> {
    let mut map = linked(store, ids).await?;
    for _ in 1..MAX_HOPS {
        let next: Vec<String> = map
            .values()
            .map(|l| l.visitor.clone())
            .filter(|v| !map.contains_key(v))
            .collect();
        if next.is_empty() {
            break;
        }
        let refs: Vec<&str> = next.iter().map(String::as_str).collect();
        let more = linked(store, &refs).await?;
        if more.is_empty() {
            break;
        }
        map.extend(more);
    }
    Ok(map)
}

/// Ids of `ids` that are linked, with their links.
pub async fn linked(store: &Store, ids: &[&str]) -> Result<HashMap<String, Link>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let docs: Vec<Document> = store
        .collection(c::IDENTITIES)
        .find(doc! { common::ID: { "$in": ids } })
        .await
        .map_err(StoreError::mongo(c::IDENTITIES, "find identity links"))?
        .try_collect()
        .await
        .map_err(StoreError::mongo(c::IDENTITIES, "find identity links"))?;
    Ok(docs
        .into_iter()
        .filter_map(|d| {
            Some((
                d.get_str(common::ID).ok()?.to_string(),
                Link {
                    visitor: d.get_str(i::VISITOR_ID).ok()?.to_string(),
                    since_ms: d.get_datetime(i::SINCE).ok()?.timestamp_millis(),
                },
            ))
        })
        .collect())
}

/// The links of every id in `ids` and in `links` as they stand now.
pub async fn current(
    store: &Store,
    ids: &[&str],
    links: &[(String, String, DateTime)],
) -> Result<HashMap<String, Link>, StoreError> {
    chains(store, &involved(ids, links)).await
}

/// `current` (from [`current`]) as it would stand once `links` were recorded (`from`
/// counts as `to` from the given time on), without recording anything: to resolve
/// visitors before knowing which messages are kept.
pub fn preview(
    current: &HashMap<String, Link>,
    links: &[(String, String, DateTime)],
) -> HashMap<String, Link> {
    let mut map = current.clone();
    plan(&mut map, links);
    map
}

/// Records `links` over `current` (read by [`current`] with the same `ids`, and links
/// that include these) and returns the links as they stand afterwards. An id already
/// linked keeps its link (to the same user, from the earliest time any message made it).
/// When another request linked one of these ids first, its link wins and the links are
/// read again.
pub async fn record(
    store: &Store,
    mut current: HashMap<String, Link>,
    ids: &[&str],
    links: &[(String, String, DateTime)],
) -> Result<HashMap<String, Link>, StoreError> {
    let planned = plan(&mut current, links);
    let map = current;
    for (from, to, since) in &planned.moved_back {
        // The same link, from an earlier message delivered later: it counts from the
        // earlier time, so the order messages arrive in does not matter.
        store
            .collection(c::IDENTITIES)
            .update_one(
                doc! { common::ID: from, i::VISITOR_ID: to, i::SINCE: { "$gt": *since } },
                doc! { "$set": { i::SINCE: *since } },
            )
            .write_concern(store.write_concern().clone())
            .await
            .map_err(StoreError::mongo(c::IDENTITIES, "move a link's start back"))?;
    }
    if planned.new.is_empty() {
        return Ok(map);
    }
    let now = DateTime::now();
    let new = planned.new.into_iter().map(|(from, to, since)| {
        doc! { common::ID: from, i::VISITOR_ID: to, i::SINCE: since, common::CREATED_AT: now }
    });
    let inserted = store
        .collection(c::IDENTITIES)
        .insert_many(new)
        .ordered(false)
        .write_concern(store.write_concern().clone())
        .await;
    match inserted {
        Ok(_) => Ok(map),
        // Another request linked some of these ids first: its links win; read them.
        Err(e) if super::duplicate_key_positions(&e).is_some() || super::is_duplicate_key(&e) => {
            chains(store, &involved(ids, links)).await
        }
        Err(e) => Err(StoreError::mongo(c::IDENTITIES, "insert identity links")(e)),
    }
}

fn involved<'a>(ids: &[&'a str], links: &'a [(String, String, DateTime)]) -> Vec<&'a str> {
    let mut all: Vec<&str> = ids.to_vec();
    for (from, to, _) in links {
        all.push(from);
        all.push(to);
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// What recording `links` over `map` writes: links made, and links whose start moves back.
struct Planned {
    new: Vec<(String, String, DateTime)>,
    moved_back: Vec<(String, String, DateTime)>,
}

/// Applies `links` to `map` as recording them would.
fn plan(map: &mut HashMap<String, Link>, links: &[(String, String, DateTime)]) -> Planned {
    let mut planned = Planned {
        new: Vec::new(),
        moved_back: Vec::new(),
    };
    // Earliest first, so within a request the earliest link of an id is the one made.
    let mut links: Vec<&(String, String, DateTime)> = links.iter().collect();
    links.sort_by_key(|(_, _, since)| *since);
    for (from, to, since) in links {
        if let Some(existing) = map.get_mut(from) {
            if existing.visitor == *to && since.timestamp_millis() < existing.since_ms {
                existing.since_ms = since.timestamp_millis();
                planned.moved_back.push((from.clone(), to.clone(), *since));
            }
            continue;
        }
        // A link back to `from` along `to`'s chain would close a cycle.
        let mut cursor = to.as_str();
        let mut cycle = cursor == from;
        for _ in 0..MAX_HOPS {
            match map.get(cursor) {
                Some(l) => cursor = &l.visitor,
                None => break,
            }
            cycle |= cursor == from;
        }
        if cycle {
            continue;
        }
        map.insert(
            from.clone(),
            Link {
                visitor: to.clone(),
                since_ms: since.timestamp_millis(),
            },
        );
        planned.new.push((from.clone(), to.clone(), *since));
    }
    planned
}

/// One `identify`'s traits for a visitor, as of the message's time.
#[derive(Debug, Clone)]
pub struct Traits {
    pub visitor: String,
    pub traits: Document,
    pub at: DateTime,
}

/// The `update` statement copying `t` to the user's profile: `email`, `firstName`,
/// `lastName` (also `first_name` / `last_name`) to their fields, every other trait to
/// `attributes.<name>`. Traits merge (a trait not sent is kept); a profile already holding
/// traits of a later `identify` is left alone, so out-of-order delivery keeps the newest.
/// `None` when there is no trait.
fn traits_statement(t: &Traits, now: DateTime) -> Option<Document> {
    let mut set = Document::new();
    // A profile field's trait that is not a string stays with its event only.
    let not_copied = sluice_core::segment::traits_not_copied(&t.traits);
    for (k, v) in &t.traits {
        if not_copied.contains(&k.as_str()) {
            continue;
        }
        let field = match sluice_core::segment::profile_field(k) {
            Some(f) => f.to_string(),
            None => format!("{}.{k}", u::ATTRIBUTES),
        };
        set.insert(field, v.clone());
    }
    if set.is_empty() {
        return None;
    }
    set.insert(u::TRAITS_AT, t.at);
    set.insert(common::UPDATED_AT, now);
    Some(doc! {
        "q": {
            u::VISITOR_ID: &t.visitor,
            "$or": [
                { u::TRAITS_AT: { "$exists": false } },
                { u::TRAITS_AT: { "$lte": t.at } },
            ],
        },
        "u": { "$set": set },
    })
}

/// Applies a request's traits in as few unordered `update` commands as the order allows:
/// each holds a visitor at most once, and a visitor's identifies go in time order, one
/// command after another (an older one first, so the traits only it sent are merged
/// before the newer one's guard is set). Usually one command for the whole request; one
/// `update_one` each took longer than a request may wait for a batch of identifies, and
/// every resend stopped at the same place.
///
/// Returns, for each of `all` in order, `Err` with the server's reason when the profile
/// refused its write (say, `attributes` is not a document); a failure of a command as a
/// whole (the store is down, or the write is not as durable as asked) is the error.
pub async fn apply_traits(
    store: &Store,
    all: &[Traits],
) -> Result<Vec<Result<(), String>>, StoreError> {
    let mut outcome = vec![Ok(()); all.len()];
    // Round k holds each visitor's k-th identify, by time.
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by(|&a, &b| {
        (all[a].visitor.as_str(), all[a].at).cmp(&(all[b].visitor.as_str(), all[b].at))
    });
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut previous: Option<&str> = None;
    let mut k = 0;
    for i in order {
        k = if previous == Some(all[i].visitor.as_str()) {
            k + 1
        } else {
            0
        };
        previous = Some(all[i].visitor.as_str());
        if rounds.len() <= k {
            rounds.push(Vec::new());
        }
        rounds[k].push(i);
    }
    let now = store.now();
    const STEP: &str = "apply identify traits";
    let not_durable = |message| StoreError::NotDurable {
        collection: c::USERS.into(),
        step: STEP,
        message,
    };
    for round in rounds {
        let (statements, of): (Vec<Document>, Vec<usize>) = round
            .into_iter()
            .filter_map(|i| traits_statement(&all[i], now).map(|s| (s, i)))
            .unzip();
        // Commands stay well under MongoDB's 16 MB (a request's traits are bounded by the
        // batch size limit, which an operator may raise).
        for group in super::command_groups(&statements, super::MAX_UPDATE_COMMAND_BYTES) {
            let reply = store
                .unordered_updates(c::USERS, statements[group.clone()].to_vec())
                .await
                .map_err(StoreError::mongo(c::USERS, STEP))?;
            if let Some(message) = super::write_concern_error(&reply) {
                return Err(not_durable(message));
            }
            for e in super::statement_errors(&reply) {
                let message = format!("write error {}: {}", e.code, e.message);
                // A primary stepping down mid-command: worth a resend, not a refusal.
                if super::transient_code(e.code) {
                    return Err(not_durable(message));
                }
                if let Some(&i) = of[group.clone()].get(e.index) {
                    outcome[i] = Err(message);
                }
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(from: &str, to: &str, since_ms: i64) -> (String, String, DateTime) {
        (from.into(), to.into(), DateTime::from_millis(since_ms))
    }

    #[test]
    fn a_link_that_would_close_a_cycle_is_not_made() {
        let mut map = HashMap::new();
        let planned = plan(&mut map, &[link("a", "b", 10), link("b", "a", 20)]);
        assert_eq!(planned.new, vec![link("a", "b", 10)]);
        assert_eq!(resolve(&map, "a", 30), "b");
        assert_eq!(resolve(&map, "b", 30), "b");
        // Longer: a -> b -> c, then c -> a is refused; c -> d is made.
        let planned = plan(
            &mut map,
            &[link("b", "c", 30), link("c", "a", 40), link("c", "d", 50)],
        );
        assert_eq!(planned.new, vec![link("b", "c", 30), link("c", "d", 50)]);
        assert_eq!(resolve(&map, "a", 60), "d");
        // A link of an id to itself is no link.
        let planned = plan(&mut map, &[link("e", "e", 60)]);
        assert!(planned.new.is_empty());
        assert_eq!(resolve(&map, "e", 70), "e");
    }

    #[test]
    fn chains_are_followed_at_most_max_hops_deep_and_only_from_each_links_time() {
        let mut map = HashMap::new();
        let chain: Vec<_> = (1..=6)
            .map(|i| link(&format!("a{i}"), &format!("a{}", i + 1), 100))
            .collect();
        plan(&mut map, &chain);
        assert_eq!(MAX_HOPS, 4);
        assert_eq!(resolve(&map, "a1", 200), "a5");
        assert_eq!(resolve(&map, "a3", 200), "a7");
        // Before a link's time the id counts for itself.
        assert_eq!(resolve(&map, "a1", 99), "a1");
        // The same link from an earlier message moves its start back; another target for
        // a linked id is not made (the first link wins).
        let planned = plan(&mut map, &[link("a1", "a2", 50), link("a1", "x", 10)]);
        assert_eq!(planned.moved_back, vec![link("a1", "a2", 50)]);
        assert!(planned.new.is_empty());
        // At 60 a1 counts as a2, but a2 only counts as a3 from 100 on.
        assert_eq!(resolve(&map, "a1", 60), "a2");
        assert_eq!(resolve(&map, "a1", 100), "a5");
    }
}
