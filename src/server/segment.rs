//! The Segment-compatible HTTP Tracking API: `POST /v1/identify`, `/v1/track`, `/v1/page`,
//! `/v1/screen`, `/v1/group`, `/v1/alias` (one message each) and `/v1/batch` (also
//! `/v1/import`, its older name) with `{"batch": [...], "sentAt", "writeKey", "context"}`.
//!
//! The write key is the HTTP basic user (as the SDKs send it), `X-Write-Key`, or `writeKey`
//! in the body; bodies may be gzipped. Messages are mapped by
//! [`sluice_core::segment`], their visitors resolved through identity links, and stored by
//! the same pipeline as the native API, so dedupe, aggregates, enrichment, transforms and
//! back-pressure are the same. SDKs retry on 5xx and 429 and treat any 2xx as delivered: a
//! batch with some invalid messages is answered 200 with each rejected message listed
//! (index, field, reason) and counted in `/metrics`; a batch with only invalid messages,
//! or an invalid single message, is a 400 (not retried).

use std::collections::HashSet;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sluice_connectors::mongo::identities;
use sluice_core::segment::{parse_message, Kind, Message, Options};
use sluice_core::ValidationError;
use tracing::Instrument;

use super::tracking::{
    admit_after_body, admit_by_header, batch_item, batch_sent_at, check_batch_len_at, malformed,
    parse_batch, prepare, read_body, request_context, segment_batch_messages, write, BODY_KEY,
};
use super::{ApiError, AppState, InFlight};

fn options(state: &AppState) -> Options {
    Options {
        purchase_events: state.config.tracking.purchase_events.clone(),
    }
}

/// `{"batch": [...], "sentAt", "context", "writeKey"}`, the messages left raw until each
/// is checked; `batch` is looked at only once the request is admitted.
#[derive(Deserialize)]
struct SegmentBatch<'a> {
    #[serde(borrow, default)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<Value>,
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<Value>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_batch", message)
}

/// One message at a path naming its type.
pub async fn single(
    kind: Kind,
    state: AppState,
    peer: SocketAddr,
    held: Option<InFlight>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let by_header = admit_by_header(&state, &headers)?;
    let body = read_body(&headers, body, state.config.tracking.max_event_bytes)?;
    let value: Value = serde_json::from_slice(&body).map_err(malformed)?;
    let Value::Object(obj) = &value else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            "expected a JSON object",
        ));
    };
    let admitted = admit_after_body(&state, &headers, by_header, obj.get(BODY_KEY))?;
    let ctx = request_context(&state, peer, &headers, None, &admitted);
    let message = super::tracking::no_wide_integer(
        std::str::from_utf8(&body).unwrap_or_default(),
        &sluice_core::segment::READ,
    )
    .and_then(|()| parse_message(&value, Some(kind), &ctx, &options(&state)));
    let warnings = warnings(std::slice::from_ref(&message));
    let unread = amounts_unread(std::slice::from_ref(&message));
    let mut answer = store(&state, vec![message], held)
        .instrument(admitted.span())
        .await?;
    answer.note_ignored(vec![sluice_core::segment::unknown_members(&value)]);
    answer.note_warnings(warnings);
    answer.count_amounts_unread(&unread);
    answer.into_single_response("invalid_message")
}

pub async fn batch(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    held: Option<Extension<InFlight>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let by_header = admit_by_header(&state, &headers)?;
    let body = read_body(&headers, body, state.config.tracking.max_batch_bytes)?;
    let parsed: SegmentBatch = parse_batch(&body, "messages")?;
    let admitted = admit_after_body(&state, &headers, by_header, parsed.write_key.as_ref())?;
    let Some(items) = parsed.batch else {
        return Err(invalid("expected {\"batch\": [messages...]}"));
    };
    check_batch_len_at(
        segment_batch_messages(&state),
        items.len(),
        "messages (half a writer's share of the queue here: tracking.queue_capacity / tracking.writers / 2)",
    )?;
    let sent_at = batch_sent_at(parsed.sent_at.as_ref())?;
    // A batch-level `context` applies to every message (the message's own keys win).
    let context: Option<Value> = match parsed.context {
        Some(raw) => {
            // Copied into every message: an integer it holds beyond 64 bits would be
            // stored rounded in each.
            super::tracking::no_wide_integer(
                &format!("{{\"context\": {}}}", raw.get()),
                &sluice_core::tracking::ReadMembers {
                    read: |_| true,
                    ids: &["context.sessionId"],
                },
            )
            .map_err(|e| invalid(format!("the batch's `{}`: {}", e.field, e.reason)))?;
            Some(serde_json::from_str(raw.get()).map_err(malformed)?)
        }
        None => None,
    };
    let shared_context = match context.as_ref() {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => Some(c),
        Some(_) => return Err(invalid("the batch's `context` must be an object")),
    };
    // Copied into every message: each message with it must still fit the per-event limit
    // (a large shared context would otherwise store up to 500 copies of itself).
    let max = state.config.tracking.max_event_bytes;
    let shared_size = shared_context.map_or(0, |c| serde_json::to_vec(c).map_or(0, |v| v.len()));
    if shared_size > max {
        return Err(invalid(format!(
            "the batch's `context` is larger than {max} bytes (it is stored with every message)"
        )));
    }
    // The copies are counted with the request's bytes: 500 messages, each given a 30 KB
    // context, hold 15 MB however small the body.
    let held = super::hold_more(
        &state,
        held.map(|h| h.0),
        shared_size.saturating_mul(items.len()),
        "the copies of the batch's `context` in its messages",
    )?;
    let ctx = request_context(&state, peer, &headers, sent_at, &admitted);
    let options = options(&state);
    let mut ignored = Vec::with_capacity(items.len());
    let messages: Vec<Result<Message, ValidationError>> = items
        .iter()
        .map(|raw| {
            let item = batch_item(&state, raw, "message", &sluice_core::segment::READ);
            ignored.push(
                item.as_ref()
                    .map(sluice_core::segment::unknown_members)
                    .unwrap_or_default(),
            );
            let item = item?;
            match (shared_context, &item) {
                // A message's own `context` that is not an object is refused as such
                // (by `parse_message`), not replaced by the batch's.
                (Some(shared), Value::Object(m))
                    if matches!(
                        m.get("context"),
                        None | Some(Value::Null | Value::Object(_))
                    ) =>
                {
                    if raw.get().len() + shared_size > max {
                        return Err(ValidationError::new(
                            "message",
                            format!("larger than {max} bytes with the batch's `context`"),
                        ));
                    }
                    let mut m = m.clone();
                    let mut context = shared.clone();
                    if let Some(Value::Object(own)) = m.get("context") {
                        context.extend(own.clone());
                    }
                    m.insert("context".into(), Value::Object(context));
                    parse_message(&Value::Object(m), None, &ctx, &options)
                }
                _ => parse_message(&item, None, &ctx, &options),
            }
        })
        .collect();
    // The client's own id on a message refused before it was read (only those are read
    // again for it).
    let sent_ids = messages
        .iter()
        .zip(&items)
        .map(|(m, raw)| {
            m.as_ref()
                .err()
                .and_then(|_| super::tracking::sent_id(raw, "messageId"))
        })
        .collect();
    let warnings = warnings(&messages);
    let unread = amounts_unread(&messages);
    let mut answer = store(&state, messages, held)
        .instrument(admitted.span())
        .await?;
    answer.note_sent_ids(sent_ids, "messageId");
    answer.note_ignored(ignored);
    answer.note_batch_ignored(super::tracking::batch_members_not_read(
        &body,
        // (What Segment's own SDKs add to their batches: Go's `type` and `messageId`,
        // Java's `sequence`, node's `timestamp`.)
        &[
            "batch",
            "sentAt",
            "context",
            "integrations",
            BODY_KEY,
            "type",
            "messageId",
            "timestamp",
            "sequence",
            "options",
        ],
    ));
    answer.note_warnings(warnings);
    answer.count_amounts_unread(&unread);
    Ok(answer.into_batch_response(&headers))
}

/// Each message's warning, for the answer.
fn warnings(messages: &[Result<Message, ValidationError>]) -> Vec<Option<String>> {
    messages
        .iter()
        .map(|m| m.as_ref().ok().and_then(|m| m.warning.clone()))
        .collect()
}

/// Whether each message is a purchase whose amount could not be read.
fn amounts_unread(messages: &[Result<Message, ValidationError>]) -> Vec<bool> {
    messages
        .iter()
        .map(|m| m.as_ref().is_ok_and(|m| m.amount_unread))
        .collect()
}

/// Resolves visitors through identity links, stores the events, then copies `identify`
/// traits to the profiles of the users whose identify is stored.
///
/// Visitors are first resolved as if every message's link were recorded; the links of the
/// messages still kept after enrichment and the transforms (not a dropped bot, not a
/// rejected event) are then recorded, before the events are written, and a kept event whose
/// visitor that changes (a dropped message's link, or another request's link of the same
/// id recorded first) is resolved again.
async fn store(
    state: &AppState,
    mut messages: Vec<Result<Message, ValidationError>>,
    held: Option<InFlight>,
) -> Result<super::tracking::Answer, ApiError> {
    // The identity reads and writes answer within the write deadline too: a database
    // that accepts connections but does not answer gets the client a 503, not a hang.
    let deadline = std::time::Duration::from_secs(state.config.tracking.write_timeout_seconds);
    let late = || super::store_timeout(deadline, "identity links or profiles", false);
    let mut ids: HashSet<String> = HashSet::new();
    let mut links = Vec::new();
    for (index, m) in messages.iter().enumerate() {
        let Ok(m) = m else { continue };
        // Only anonymous-only messages are resolved; a request of user-id messages
        // without links costs no lookup.
        if m.user_id.is_none() {
            ids.extend(m.anonymous_id.clone());
        }
        if let Some((from, to)) = &m.link {
            links.push((
                index,
                m.event.event_id.clone(),
                (from.clone(), to.clone(), m.event.timestamp),
            ));
        }
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let every_link: Vec<_> = links.iter().map(|(_, _, l)| l.clone()).collect();
    let current = tokio::time::timeout(
        deadline,
        identities::current(&state.store, &ids, &every_link),
    )
    .await
    .map_err(|_| late())?
    .map_err(store_unavailable)?;
    let planned = identities::preview(&current, &every_link);
    // Per message: its anonymous id when it has no userId, its time, and the visitor it
    // was resolved to.
    let mut anonymous: Vec<Option<(String, i64, String)>> = Vec::with_capacity(messages.len());
    for m in messages.iter_mut() {
        let Ok(m) = m else {
            anonymous.push(None);
            continue;
        };
        let at = m.event.timestamp.timestamp_millis();
        // A userId always counts for itself; only anonymous ids follow links.
        let (visitor, anonymous_only) = match (&m.user_id, &m.anonymous_id) {
            (Some(u), _) => (u.clone(), None),
            (None, Some(a)) => {
                let v = identities::resolve(&planned, a, at);
                (v.clone(), Some((a.clone(), at, v)))
            }
            (None, None) => {
                anonymous.push(None);
                continue;
            }
        };
        m.event.user_id = visitor;
        anonymous.push(anonymous_only);
    }
    let traits: Vec<Option<(bson::Document, bson::DateTime)>> = messages
        .iter()
        .map(|m| {
            let m = m.as_ref().ok()?;
            let t = m.traits.as_ref().filter(|t| !t.is_empty())?;
            Some((t.clone(), m.event.timestamp))
        })
        .collect();
    let events = messages.into_iter().map(|m| m.map(|m| m.event)).collect();
    let mut prepared = prepare(state, events).await?;
    let kept_links: Vec<_> = links
        .into_iter()
        .filter(|(index, _, _)| prepared.kept(*index).is_some())
        .collect();
    // A message claimed before (a resend) recorded its link then: its time here may be
    // earlier (a later `sentAt` corrects it back), and must not move the link. Looked up
    // only for links that would move one back.
    let would_move: Vec<&str> = kept_links
        .iter()
        .filter(|(_, _, (from, to, since))| {
            current
                .get(from)
                .is_some_and(|l| l.visitor == *to && since.timestamp_millis() < l.since_ms)
        })
        .map(|(_, id, _)| id.as_str())
        .collect();
    let sent_before = if would_move.is_empty() {
        HashSet::new()
    } else {
        let claimed = sluice_connectors::mongo::ledger::claimed(
            &state.store,
            &would_move,
            "find the claims of resent links",
        );
        tokio::time::timeout(deadline, claimed)
            .await
            .map_err(|_| late())?
            .map_err(store_unavailable)?
    };
    let kept_links: Vec<_> = kept_links
        .into_iter()
        .filter(|(_, id, _)| !sent_before.contains(id))
        .map(|(_, _, l)| l)
        .collect();
    // `current` covers the kept links' ids: they are among every link's.
    let recorded = if every_link.is_empty() {
        planned
    } else {
        tokio::time::timeout(
            deadline,
            identities::record(&state.store, current, &ids, &kept_links),
        )
        .await
        .map_err(|_| late())?
        .map_err(store_unavailable)?
    };
    for (index, resolved) in anonymous.into_iter().enumerate() {
        let (Some((id, at, planned_visitor)), Some(j)) = (resolved, prepared.kept(index)) else {
            continue;
        };
        let visitor = identities::resolve(&recorded, &id, at);
        let event = &mut prepared.events[j];
        // Unless a transform set a visitor of its own.
        if visitor != planned_visitor && event.user_id == planned_visitor {
            event.metadata.anonymous_id = Some(id);
            event.user_id = visitor;
        }
    }
    let traits: Vec<Option<identities::Traits>> = traits
        .into_iter()
        .enumerate()
        .map(|(index, t)| {
            let (traits, at) = t?;
            let j = prepared.kept(index)?;
            Some(identities::Traits {
                visitor: prepared.events[j].user_id.clone(),
                traits,
                at,
            })
        })
        .collect();
    // The request's bytes stay counted until it is done (its traits are applied after
    // the write), not only until its events are written.
    let answer = write(state, prepared, held.clone()).await?;
    // A resend applies them again: each message has its `messageId` (SDKs send one), so
    // a 503 here stores nothing twice.
    apply_traits(state, &answer, traits).await?;
    Ok(answer)
}

/// Copies the traits of the identifies a request stored (or stored before: a resend
/// applies them again) to their visitors' profiles, within one write deadline for the
/// whole request: `traits` has one entry per event sent.
pub(super) async fn apply_traits(
    state: &AppState,
    answer: &super::tracking::Answer,
    traits: Vec<Option<identities::Traits>>,
) -> Result<(), ApiError> {
    let traits: Vec<identities::Traits> = traits
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| t.filter(|_| answer.written[i]))
        .collect();
    if traits.is_empty() {
        return Ok(());
    }
    let deadline = std::time::Duration::from_secs(state.config.tracking.write_timeout_seconds);
    let applied = tokio::time::timeout(deadline, identities::apply_traits(&state.store, &traits))
        .await
        .map_err(|_| super::store_timeout(deadline, "identity links or profiles", false))?;
    let applied = match applied {
        Ok(applied) => applied,
        // The events are stored. A store that is down is worth a resend (the identifies
        // are then duplicates and their traits are applied again).
        Err(e) if e.is_transient() => return Err(store_unavailable(e)),
        Err(e) => vec![Err(e.to_string()); traits.len()],
    };
    // A write refused would fail every resend: logged and counted.
    for (t, outcome) in traits.iter().zip(applied) {
        if let Err(e) = outcome {
            state
                .metrics
                .traits_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(visitor = ?t.visitor, error = ?e, "identify traits not applied");
        }
    }
    Ok(())
}

/// Identity links or profiles could not be read or written: 503, nothing acknowledged.
fn store_unavailable(e: sluice_connectors::StoreError) -> ApiError {
    tracing::error!(error = %e, "identity links or profiles unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "events could not be stored; nothing was acknowledged, retry shortly",
    )
    .retry(2)
}
