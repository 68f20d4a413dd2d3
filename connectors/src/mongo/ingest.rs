//! The event writer: stores each `eventId` once in the time-series `events` collection and
//! folds newly stored events into `sessions` and `users`.
//!
//! A batch is written in two steps:
//! 1. one transaction claims the batch's new `eventId`s in the `event_ids` ledger (its
//!    `_id` is the eventId, so uniqueness is the server's) and updates the session and user
//!    aggregates of exactly those events. A claim therefore exists if and only if its
//!    event's aggregates were applied.
//! 2. the claimed events are inserted into `events` (MongoDB does not allow writes to
//!    time-series collections inside transactions).
//!
//! A crash between the two leaves claims whose events are missing. The client was never
//! acknowledged, so it sends the events again; the writer then finds the claim, sees the
//! event missing and, once the claim's lease has expired, takes the claim over (an atomic
//! compare-and-set on the claim time) and inserts the event without touching aggregates.
//! A claim younger than the lease belongs to a writer still at work: its events are
//! answered [`WriteStatus::Retry`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document, RawDocumentBuf};
use futures_util::TryStreamExt;
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{Acknowledgment, WriteConcern};
use mongodb::ClientSession;
use sluice_core::aggregate::{fold_session, fold_user};
use sluice_core::model::{
    collections as c, common, event_id_fields as l, session_fields as s, user_fields as u, Event,
    Session, User,
};
use sluice_core::sessionize::{self, Span};

use super::{Store, StoreError, DUPLICATE_KEY};

/// Seconds the writer spends in each phase of a batch, labelled by [`WRITE_PHASES`].
pub const WRITE_PHASE_SECONDS: &str = "sluice_event_write_phase_seconds";

/// The phases of a batch write, in order: `sessions` (attributing events without a
/// sessionId), then inside the claim transaction `ledger` (reading and claiming eventIds),
/// `read_aggregates` (the sessions and users the new events touch), `write_sessions`,
/// `write_users`, `commit` (every transaction attempt counts, retries included),
/// `retry_backoff` (waiting before a retried transaction), `insert_events`, and last
/// `note_stored` (noting on the claims that their events are stored).
pub const WRITE_PHASES: [&str; 9] = [
    "sessions",
    "ledger",
    "read_aggregates",
    "write_sessions",
    "write_users",
    "commit",
    "retry_backoff",
    "insert_events",
    "note_stored",
];

fn observe_phase(phase: &str, started: Instant) {
    sluice_core::metrics::observe_seconds(
        WRITE_PHASE_SECONDS,
        "Seconds the event writer spends per batch, by phase.",
        &[("phase", phase)],
        started.elapsed().as_secs_f64(),
    );
}

/// A claim younger than this (milliseconds) is most likely its write landing now: an
/// event it holds is sent again after a second, not after the rest of the lease.
const YOUNG_CLAIM_MS: i64 = 2_000;

/// The fate of one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStatus {
    /// Stored now (aggregates updated).
    Stored,
    /// Already stored earlier (or earlier in the same batch): nothing changed.
    Duplicate,
    /// Another writer is storing this eventId right now; send it again shortly.
    Retry,
    /// Claimed by a writer that may still be storing it (or died doing so), whose lease
    /// on it ends in about `seconds`: sent again after that, it is stored, or answered a
    /// duplicate; sent sooner, it is held again.
    Held { seconds: u32 },
}

impl WriteStatus {
    /// Not stored by this write: to be sent again ([`Self::Retry`], [`Self::Held`]).
    pub fn is_retry(self) -> bool {
        matches!(self, Self::Retry | Self::Held { .. })
    }
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// How long a claim belongs to the writer that took it. Must exceed the time a batch
    /// insert can take, so a slow writer is never overtaken.
    pub claim_lease: Duration,
    /// Attempts for a transaction that hits a transient error (write conflict, failover).
    pub max_transaction_attempts: u32,
    /// Events without a `sessionId` more than this apart (per visitor) are in different
    /// sessions ([`sluice_core::sessionize`]).
    pub session_gap: Duration,
    /// How far ahead a mark of a day that received late events reaches (`markedAt` in
    /// the future): events of the day stored until then need no mark of their own, so a
    /// day whose events keep arriving costs a mark per half of this, not one per batch.
    /// An export reading the day before `markedAt` publishes it once more later.
    pub late_mark_ahead: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            claim_lease: Duration::from_secs(30),
            max_transaction_attempts: 20,
            session_gap: Duration::from_secs(30 * 60),
            late_mark_ahead: Duration::from_secs(60),
        }
    }
}

/// Writes batches of events. Cheap to clone; safe to use from many tasks at once.
#[derive(Clone, Debug)]
pub struct EventWriter {
    store: Store,
    options: WriterOptions,
    /// Days this writer marked late, and until when the mark covers them (shared by its
    /// clones), so a day whose events keep arriving costs one mark a minute, not one a
    /// batch.
    late_marks: std::sync::Arc<std::sync::Mutex<HashMap<chrono::NaiveDate, Instant>>>,
    /// When one of its claim transactions was last run again for a write conflict
    /// (shared by its clones).
    last_conflict: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

/// What the claiming transaction decided.
struct Claimed {
    /// Indices of events claimed (and aggregated) now.
    new: Vec<usize>,
    /// Indices of events whose id was claimed before, with when each was claimed and
    /// what it was counted as.
    earlier: Vec<(usize, DateTime, Counted)>,
    /// Indices of events whose claim says they were stored, or archived since: duplicates.
    settled: Vec<usize>,
    /// Stored sessions that could not be read, left as they were (id, new events, why):
    /// said once the transaction commits, not at each of its attempts.
    unread_sessions: Vec<(String, usize, String)>,
}

/// What a claim says its event was counted as (claims of older versions hold the time
/// only, or nothing).
#[derive(Debug, Clone, Default)]
struct Counted {
    timestamp: Option<DateTime>,
    user_id: Option<String>,
    session_id: Option<String>,
}

impl Counted {
    fn of(claim: &Document) -> Self {
        Self {
            timestamp: claim.get_datetime(l::TIMESTAMP).ok().copied(),
            user_id: claim.get_str(l::USER_ID).ok().map(str::to_string),
            session_id: claim.get_str(l::SESSION_ID).ok().map(str::to_string),
        }
    }

    /// `event` as it was counted, if a resend of it differs.
    fn restore(&self, event: &Event) -> Option<Event> {
        let differs =
            |counted: &Option<String>, now: &str| counted.as_deref().is_some_and(|c| c != now);
        if self.timestamp.is_none_or(|t| t == event.timestamp)
            && !differs(&self.user_id, &event.user_id)
            && !differs(&self.session_id, &event.session_id)
        {
            return None;
        }
        let mut restored = event.clone();
        if let Some(t) = self.timestamp {
            restored.timestamp = t;
        }
        if let Some(u) = &self.user_id {
            restored.user_id = u.clone();
        }
        if let Some(s) = &self.session_id {
            restored.session_id = s.clone();
        }
        Some(restored)
    }
}

impl EventWriter {
    pub fn new(store: Store, options: WriterOptions) -> Self {
        Self {
            store,
            options,
            late_marks: Default::default(),
            last_conflict: Default::default(),
        }
    }

    /// Whether one of its claim transactions was run again for a write conflict within
    /// the last `window`: what a tracking answer says when its write took too long, since
    /// conflicts that last come from a transaction holding the same sessions or users (one
    /// a stopped replica left open holds them until MongoDB aborts it).
    pub fn met_conflicts_within(&self, window: Duration) -> bool {
        self.last_conflict
            .lock()
            .map(|last| last.is_some_and(|at| at.elapsed() <= window))
            .unwrap_or(false)
    }

    /// Writes `events`; the result has one status per input, in order.
    ///
    /// Errors mean nothing of the batch may be acknowledged; sending the same batch again
    /// is always safe (idempotent by `eventId`).
    pub async fn write(&self, events: &[Event]) -> Result<Vec<WriteStatus>, StoreError> {
        if events.iter().any(|e| e.session_id.is_empty()) {
            let mut events = events.to_vec();
            let started = Instant::now();
            self.assign_sessions(&mut events).await?;
            observe_phase("sessions", started);
            return self.write_sessioned(&events).await;
        }
        self.write_sessioned(events).await
    }

    /// Gives events without a `sessionId` one by the inactivity-gap rule, against the
    /// visitors' sessions already stored. A visitor's events are only ever written by one
    /// writer lane, so the lookup and the write that follows do not race in one process.
    pub async fn assign_sessions(&self, events: &mut [Event]) -> Result<(), StoreError> {
        let gap_ms = self.options.session_gap.as_millis() as i64;
        let mut by_visitor: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            if e.session_id.is_empty() {
                by_visitor.entry(e.user_id.clone()).or_default().push(i);
            }
        }
        if by_visitor.is_empty() {
            return Ok(());
        }
        let times = || {
            by_visitor
                .values()
                .flatten()
                .map(|&i| events[i].timestamp.timestamp_millis())
        };
        let (lo, hi) = (times().min().unwrap_or(0), times().max().unwrap_or(0));
        let visitors: Vec<&str> = by_visitor.keys().map(String::as_str).collect();
        let found: Vec<Document> = self
            .store
            .collection(c::SESSIONS)
            .find(doc! {
                s::USER_ID: { "$in": &visitors },
                s::START_TIME: { "$lte": DateTime::from_millis(hi + gap_ms) },
                s::END_TIME: { "$gte": DateTime::from_millis(lo - gap_ms) },
            })
            .projection(doc! { s::SESSION_ID: 1, s::USER_ID: 1, s::START_TIME: 1, s::END_TIME: 1 })
            .await
            .map_err(StoreError::mongo(
                c::SESSIONS,
                "find sessions to attribute events",
            ))?
            .try_collect()
            .await
            .map_err(StoreError::mongo(
                c::SESSIONS,
                "find sessions to attribute events",
            ))?;
        let mut spans: HashMap<String, Vec<Span>> = HashMap::new();
        for d in found {
            let (Ok(id), Ok(user), Ok(start), Ok(end)) = (
                d.get_str(s::SESSION_ID),
                d.get_str(s::USER_ID),
                d.get_datetime(s::START_TIME),
                d.get_datetime(s::END_TIME),
            ) else {
                continue;
            };
            spans.entry(user.to_string()).or_default().push(Span {
                session_id: id.to_string(),
                start_ms: start.timestamp_millis(),
                end_ms: end.timestamp_millis(),
            });
        }
        // Sessions this batch itself opens or extends (events with a session id) count as
        // stored ones do: the same events attribute alike whether they come in one batch
        // or two.
        for e in events.iter() {
            if e.session_id.is_empty() || !by_visitor.contains_key(&e.user_id) {
                continue;
            }
            let t = e.timestamp.timestamp_millis();
            let known = spans.entry(e.user_id.clone()).or_default();
            match known.iter_mut().find(|s| s.session_id == e.session_id) {
                Some(span) => {
                    span.start_ms = span.start_ms.min(t);
                    span.end_ms = span.end_ms.max(t);
                }
                None => known.push(Span {
                    session_id: e.session_id.clone(),
                    start_ms: t,
                    end_ms: t,
                }),
            }
        }
        for (visitor, indices) in by_visitor {
            let times: Vec<i64> = indices
                .iter()
                .map(|&i| events[i].timestamp.timestamp_millis())
                .collect();
            let known = spans.entry(visitor.clone()).or_default();
            let ids = sessionize::assign(&visitor, &times, known, gap_ms);
            for (i, id) in indices.into_iter().zip(ids) {
                events[i].session_id = id;
            }
        }
        Ok(())
    }

    async fn write_sessioned(&self, events: &[Event]) -> Result<Vec<WriteStatus>, StoreError> {
        let mut status = self.write_unique(events).await?;
        // A later copy of an eventId (two coalesced requests carrying one event: an SDK's
        // resend racing its original) is a duplicate of the first, unless the first must
        // be sent again: then so must the copy, or the event would be acknowledged
        // without being stored.
        let mut first: HashMap<&str, usize> = HashMap::new();
        for i in 0..events.len() {
            match first.entry(events[i].event_id.as_str()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    if status[*o.get()].is_retry() {
                        status[i] = status[*o.get()];
                    }
                }
            }
        }
        Ok(status)
    }

    /// [`Self::write_sessioned`] for the first copy of each eventId; later copies are
    /// answered `Duplicate` here.
    async fn write_unique(&self, events: &[Event]) -> Result<Vec<WriteStatus>, StoreError> {
        let mut status = vec![WriteStatus::Duplicate; events.len()];
        let mut seen = HashSet::new();
        let unique: Vec<usize> = (0..events.len())
            .filter(|&i| seen.insert(events[i].event_id.as_str()))
            .collect();
        if unique.is_empty() {
            return Ok(status);
        }
        // Encoded before anything is claimed: an event the server could not store fails
        // the write here, before its aggregates are applied.
        let mut encoded: HashMap<usize, RawDocumentBuf> = HashMap::with_capacity(unique.len());
        for &i in &unique {
            encoded.insert(i, encode_event(&events[i])?);
        }
        let now = self.store.now();
        let claim_started = Instant::now();
        let claimed = self.claim_and_aggregate(events, &unique, now).await?;
        // Late days are marked before their events are inserted, so a crash between the
        // two writes cannot leave stored events that no export will republish. Failing to
        // mark fails the write: the client resends and nothing stored goes unexported.
        // (Events whose claims are taken over are marked where that happens.)
        if let Err(err) = self.mark_late_days(events, &claimed.new).await {
            self.hand_back_claims(events, &claimed.new, now).await;
            return Err(err);
        }

        // The claims count from `now`: past half their lease (a slow or retried
        // transaction, a failover), a resend elsewhere may soon take them over and insert
        // the events itself. Inserting them here as well could store them twice, so they
        // are handed back instead and answered Retry: the resend completes them at once.
        if !claimed.new.is_empty() && claim_started.elapsed() > self.options.claim_lease / 2 {
            tracing::warn!(
                events = claimed.new.len(),
                seconds = claim_started.elapsed().as_secs_f64(),
                "claims taken too long ago to insert their events safely; handed back for a resend"
            );
            self.hand_back_claims(events, &claimed.new, now).await;
            for &i in &claimed.new {
                status[i] = WriteStatus::Retry;
            }
        } else if !claimed.new.is_empty() {
            let started = Instant::now();
            let docs: Vec<RawDocumentBuf> = claimed
                .new
                .iter()
                .filter_map(|i| encoded.remove(i))
                .collect();
            let inserted = self
                .store
                .collection(c::EVENTS)
                .clone_with_type::<RawDocumentBuf>()
                .insert_many(docs)
                .ordered(false)
                .write_concern(self.store.write_concern().clone())
                .await;
            if let Err(err) = inserted {
                // Handed back, a claim is taken over by the next resend, which inserts
                // its event if it finds it missing. An insert that may still land (its
                // connection broke) keeps its claims for their lease instead: a resend
                // taking them over at once could store the events a second time.
                if super::outcome_unknown(&err) {
                    tracing::warn!(events = claimed.new.len(), error = %err, "the events' insert may still be applied; their claims are kept for their lease, and resends are answered retry until it has passed");
                } else {
                    self.hand_back_claims(events, &claimed.new, now).await;
                }
                return Err(StoreError::mongo(c::EVENTS, "insert events")(err));
            }
            observe_phase("insert_events", started);
            for &i in &claimed.new {
                status[i] = WriteStatus::Stored;
            }
            self.mark_stored(events, &claimed.new).await;
        }
        // A mark covers the events stored until `late_mark_ahead / 2` after it was
        // written; an insert that took longer than that is marked again now (before the
        // claims taken over, whose failure would skip it).
        let stored: Vec<usize> = (0..events.len())
            .filter(|&i| status[i] == WriteStatus::Stored)
            .collect();
        if let Err(e) = self.mark_late_days(events, &stored).await {
            tracing::warn!(error = %e, "could not mark again a day that received late events after a slow insert");
        }
        for &i in &claimed.settled {
            status[i] = WriteStatus::Duplicate;
        }
        if !claimed.earlier.is_empty() {
            self.resolve_earlier(events, &claimed.earlier, &mut encoded, &mut status)
                .await?;
        }
        Ok(status)
    }

    /// Notes on the claims of `which` that their events are in `events`, so a resend is
    /// answered `duplicate` from its claim (without it, a resend looks the events up in
    /// `events`, which on a time-series collection reads far more than their buckets).
    /// A note that fails to be written is no error: a resend then looks the event up.
    async fn mark_stored(&self, events: &[Event], which: &[usize]) {
        if which.is_empty() {
            return;
        }
        let started = Instant::now();
        let ids: Vec<&str> = which.iter().map(|&i| events[i].event_id.as_str()).collect();
        let noted = self
            .store
            .collection(c::EVENT_IDS)
            .update_many(
                doc! { common::ID: { "$in": ids } },
                doc! { "$set": { l::STORED: true } },
            )
            // Only a shortcut: a note a failover rolls back costs a lookup, nothing more.
            .write_concern(WriteConcern::builder().w(Acknowledgment::Nodes(1)).build())
            .await;
        if let Err(e) = noted {
            tracing::debug!(error = %e, "could not note claims as stored; a resend looks the events up");
        }
        observe_phase("note_stored", started);
    }

    /// Hands back claims this writer took at `claimed_at` (as claimed long ago), so a
    /// resend completes them at once instead of waiting out the lease. A claim another
    /// writer has taken over since is left alone.
    async fn hand_back_claims(&self, events: &[Event], claimed: &[usize], claimed_at: DateTime) {
        if claimed.is_empty() {
            return;
        }
        let ids: Vec<&str> = claimed
            .iter()
            .map(|&i| events[i].event_id.as_str())
            .collect();
        let _ = self
            .store
            .collection(c::EVENT_IDS)
            .update_many(
                doc! { common::ID: { "$in": ids }, l::CLAIMED_AT: claimed_at },
                doc! { "$set": { l::CLAIMED_AT: DateTime::from_millis(0) } },
            )
            .await;
    }

    /// Records the days before today (UTC) of the given events: their EVENT_DATA and
    /// DAILY_ANALYTICS partitions may have been published without them, and the scheduled
    /// exports publish such days again. A mark reaches `late_mark_ahead` into the future
    /// (`markedAt`), so the events stored until then need no mark of their own: an export
    /// reading the day before `markedAt` publishes it again later. This writer remembers
    /// its marks for half that time.
    async fn mark_late_days(&self, events: &[Event], which: &[usize]) -> Result<(), StoreError> {
        let today = self.store.now().to_chrono().date_naive();
        let days: std::collections::BTreeSet<chrono::NaiveDate> = which
            .iter()
            .map(|&i| events[i].timestamp.to_chrono().date_naive())
            .filter(|d| *d < today)
            .collect();
        let due: Vec<chrono::NaiveDate> = {
            let mut marks = self.late_marks.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            marks.retain(|_, until| *until > now);
            days.into_iter()
                .filter(|d| !marks.contains_key(d))
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let written = Instant::now();
        let ahead = self.store.now_plus(self.options.late_mark_ahead);
        let ids: Vec<String> = due.iter().map(|d| d.to_string()).collect();
        let marks = self.store.collection(c::LATE_DAYS);
        for id in &ids {
            marks
                .update_one(
                    doc! { common::ID: id },
                    doc! { "$max": { "markedAt": ahead } },
                )
                .upsert(true)
                .await
                .map_err(StoreError::mongo(
                    c::LATE_DAYS,
                    "mark a day that received late events",
                ))?;
        }
        // Held a little short of `ahead`: from before the write, for half the reach.
        let until = written + self.options.late_mark_ahead / 2;
        let mut held = self.late_marks.lock().unwrap_or_else(|p| p.into_inner());
        for day in due {
            held.insert(day, until);
        }
        Ok(())
    }

    /// Step 1, retried as a whole on transient transaction errors.
    async fn claim_and_aggregate(
        &self,
        events: &[Event],
        unique: &[usize],
        now: DateTime,
    ) -> Result<Claimed, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut session = self
                .store
                .client()
                .start_session()
                .await
                .map_err(StoreError::mongo(c::EVENT_IDS, "start session"))?;
            session
                .start_transaction()
                .write_concern(self.store.write_concern().clone())
                .await
                .map_err(StoreError::mongo(c::EVENT_IDS, "start transaction"))?;
            let outcome = match self
                .transaction_body(&mut session, events, unique, now)
                .await
            {
                Ok(claimed) => {
                    let started = Instant::now();
                    let committed = commit(&mut session).await;
                    observe_phase("commit", started);
                    committed.map(|()| claimed).map_err(TxnError::from)
                }
                Err(err) => Err(err),
            };
            match outcome {
                Ok(claimed) => {
                    if !claimed.unread_sessions.is_empty() {
                        count_sessions_unread(claimed.unread_sessions.len() as u64);
                    }
                    for (id, events, why) in &claimed.unread_sessions {
                        tracing::warn!(
                            session = %id,
                            events,
                            "a stored session cannot be read ({why}); it is left as it is, its new events stored without it"
                        );
                    }
                    return Ok(claimed);
                }
                Err(err)
                    if is_transient(&err) && attempt < self.options.max_transaction_attempts =>
                {
                    let _ = session.abort_transaction().await;
                    if is_write_conflict(&err) {
                        if let Ok(mut last) = self.last_conflict.lock() {
                            *last = Some(Instant::now());
                        }
                    }
                    // Write conflicts between writers touching the same session or user:
                    // back off a little, with jitter, and redo the whole transaction.
                    let base = 5u64 << attempt.min(6);
                    let jitter = rand::random_range(base..2 * base);
                    let started = Instant::now();
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    observe_phase("retry_backoff", started);
                }
                Err(err) => {
                    let _ = session.abort_transaction().await;
                    return Err(StoreError::Transaction {
                        attempts: attempt,
                        transient: is_transient(&err),
                        message: err.to_string(),
                    });
                }
            }
        }
    }

    async fn transaction_body(
        &self,
        session: &mut ClientSession,
        events: &[Event],
        unique: &[usize],
        now: DateTime,
    ) -> Result<Claimed, TxnError> {
        let started = Instant::now();
        let ledger = self.store.collection(c::EVENT_IDS);
        let ids: Vec<&str> = unique
            .iter()
            .map(|&i| events[i].event_id.as_str())
            .collect();
        let mut cursor = ledger
            .find(doc! { common::ID: { "$in": &ids } })
            .session(&mut *session)
            .await?;
        let mut claimed_at: HashMap<String, Option<(DateTime, Counted)>> = HashMap::new();
        while let Some(d) = cursor.next(&mut *session).await.transpose()? {
            if let (Ok(id), Ok(at)) = (d.get_str(common::ID), d.get_datetime(l::CLAIMED_AT)) {
                let settled = d.get_bool(l::ARCHIVED).unwrap_or(false)
                    || d.get_bool(l::STORED).unwrap_or(false);
                claimed_at.insert(id.to_string(), (!settled).then(|| (*at, Counted::of(&d))));
            }
        }
        let mut claimed = Claimed {
            new: Vec::new(),
            earlier: Vec::new(),
            settled: Vec::new(),
            unread_sessions: Vec::new(),
        };
        // `unique` names each eventId once: its claim is taken out, not copied.
        for &i in unique {
            match claimed_at.remove(&events[i].event_id) {
                Some(Some((at, counted))) => claimed.earlier.push((i, at, counted)),
                Some(None) => claimed.settled.push(i),
                None => claimed.new.push(i),
            }
        }
        if claimed.new.is_empty() {
            observe_phase("ledger", started);
            return Ok(claimed);
        }
        let claims: Vec<Document> = claimed
            .new
            .iter()
            .map(|&i| {
                doc! {
                    common::ID: &events[i].event_id,
                    l::TIMESTAMP: events[i].timestamp,
                    l::CLAIMED_AT: now,
                    l::USER_ID: &events[i].user_id,
                    l::SESSION_ID: &events[i].session_id,
                }
            })
            .collect();
        ledger.insert_many(claims).session(&mut *session).await?;
        observe_phase("ledger", started);

        let started = Instant::now();
        let new_events: Vec<&Event> = claimed.new.iter().map(|&i| &events[i]).collect();
        let (session_writes, new_sessions, unread) =
            self.session_writes(session, &new_events, now).await?;
        claimed.unread_sessions = unread;
        let user_writes = self
            .user_writes(session, &new_events, &new_sessions, now)
            .await?;
        observe_phase("read_aggregates", started);
        let started = Instant::now();
        session_writes
            .apply(&self.store, c::SESSIONS, session)
            .await?;
        observe_phase("write_sessions", started);
        let started = Instant::now();
        user_writes.apply(&self.store, c::USERS, session).await?;
        observe_phase("write_users", started);
        Ok(claimed)
    }

    /// Folds `new_events` into their sessions; also returns how many sessions each
    /// visitor gained.
    async fn session_writes(
        &self,
        session: &mut ClientSession,
        new_events: &[&Event],
        now: DateTime,
    ) -> Result<(Writes, HashMap<String, i64>, Vec<(String, usize, String)>), TxnError> {
        let sessions = self.store.db().collection::<RawDocumentBuf>(c::SESSIONS);
        let mut by_session: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in new_events {
            by_session.entry(e.session_id.as_str()).or_default().push(e);
        }
        let keys: Vec<&str> = by_session.keys().copied().collect();
        let mut cursor = sessions
            .find(doc! { s::SESSION_ID: { "$in": &keys } })
            .session(&mut *session)
            .await?;
        let mut existing: HashMap<String, (Bson, Stored)> = HashMap::new();
        while let Some(found) = cursor.next(&mut *session).await.transpose()? {
            let Ok(id) = found.get_str(s::SESSION_ID) else {
                continue;
            };
            // Its `_id` as stored (another writer's may be text): what the update finds
            // it by.
            let stored = match found
                .get(common::ID)
                .ok()
                .flatten()
                .and_then(|k| Bson::try_from(k.to_raw_bson()).ok())
            {
                Some(key) => (key, stored_session_raw(&found)),
                // Not taken for a new session: inserting one would meet this one's
                // sessionId and refuse the batch.
                None => (
                    Bson::Null,
                    Stored::Unreadable("its _id cannot be read".into()),
                ),
            };
            existing.insert(id.to_string(), stored);
        }
        let mut writes = Writes::default();
        let mut new_sessions: HashMap<String, i64> = HashMap::new();
        let mut unread = Vec::new();
        for (id, evs) in by_session {
            let (key, stored) = match existing.remove(id) {
                Some((key, stored)) => (Some(key), Some(stored)),
                None => (None, None),
            };
            let (before, status_unread, foreign) = match stored {
                None => (None, false, false),
                Some(Stored::Read {
                    session,
                    status_unread,
                    foreign,
                }) => (Some(*session), status_unread, foreign),
                // Left as it is: its events are stored and counted in their visitor's
                // totals; failing the batch would refuse every event sent with them.
                Some(Stored::Unreadable(why)) => {
                    unread.push((id.to_string(), evs.len(), why));
                    continue;
                }
            };
            let owner_before = before.as_ref().map(|b| b.user_id.clone());
            let mut folded = fold_session(before, &evs, now);
            folded.id = None;
            // An earlier event of another visitor makes the session theirs: the count
            // moves from the old owner to the new one.
            if owner_before.as_deref() != Some(folded.user_id.as_str()) {
                *new_sessions.entry(folded.user_id.clone()).or_default() += 1;
                if let Some(old) = owner_before {
                    *new_sessions.entry(old).or_default() -= 1;
                }
            }
            let mut document = bson::to_document(&folded)?;
            // A status Sluice does not know is kept, unless the session went on.
            if status_unread && folded.status != sluice_core::model::SessionStatus::Active {
                document.remove(s::STATUS);
            }
            match key {
                // A session as Sluice writes one is replaced whole (the cheapest update).
                Some(key) if !foreign && !status_unread => writes
                    .updates
                    .push(doc! { "q": { common::ID: key }, "u": document }),
                // Set, not replaced: fields other writers keep in a session stay.
                Some(key) => {
                    let unset: Document = Session::optional_fields()
                        .filter(|f| !document.contains_key(*f))
                        .map(|f| (f.to_string(), Bson::String(String::new())))
                        .collect();
                    let mut update = doc! { "$set": document };
                    if !unset.is_empty() {
                        update.insert("$unset", unset);
                    }
                    writes
                        .updates
                        .push(doc! { "q": { common::ID: key }, "u": update });
                }
                None => writes.inserts.push(document),
            }
        }
        Ok((writes, new_sessions, unread))
    }

    /// Folds `new_events` into their visitors. Existing profiles get only their aggregate
    /// fields set, so profile fields written by imports or identify calls are left alone.
    async fn user_writes(
        &self,
        session: &mut ClientSession,
        new_events: &[&Event],
        new_sessions: &HashMap<String, i64>,
        now: DateTime,
    ) -> Result<Writes, TxnError> {
        let users = self.store.collection(c::USERS);
        let mut by_user: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in new_events {
            by_user.entry(e.user_id.as_str()).or_default().push(e);
        }
        // A visitor who lost a session to an earlier event may have no event here.
        for (visitor, delta) in new_sessions {
            if *delta != 0 {
                by_user.entry(visitor.as_str()).or_default();
            }
        }
        let keys: Vec<&str> = by_user.keys().copied().collect();
        let mut cursor = users
            .find(doc! { u::VISITOR_ID: { "$in": &keys } })
            .projection(doc! {
                common::ID: 1, u::VISITOR_ID: 1, u::FIRST_SEEN: 1, u::LAST_SEEN: 1,
                u::TOTAL_SESSIONS: 1, u::TOTAL_EVENTS: 1, u::TOTAL_PURCHASES: 1,
                u::TOTAL_REVENUE: 1, u::TOTAL_REVENUE_MICROS: 1,
            })
            .session(&mut *session)
            .await?;
        let mut existing: HashMap<String, (Bson, User)> = HashMap::new();
        while let Some(d) = cursor.next(&mut *session).await.transpose()? {
            if let (Ok(v), Some(id)) = (d.get_str(u::VISITOR_ID), d.get(common::ID)) {
                existing.insert(v.to_string(), (id.clone(), user_aggregates(v, &d, true)));
            }
        }
        let mut writes = Writes::default();
        for (visitor, evs) in by_user {
            let added = new_sessions.get(visitor).copied().unwrap_or(0);
            let (key, before) = match existing.remove(visitor) {
                Some((id, user)) => (Some(id), Some(user)),
                // Only an owner who already has a profile can lose a session.
                None if evs.is_empty() => continue,
                None => (None, None),
            };
            let folded = fold_user(before, visitor, &evs, added, now);
            match key {
                Some(id) => writes.updates.push(doc! {
                    "q": { common::ID: id },
                    "u": { "$set": {
                        u::FIRST_SEEN: folded.first_seen,
                        u::LAST_SEEN: folded.last_seen,
                        u::TOTAL_SESSIONS: folded.total_sessions,
                        u::TOTAL_EVENTS: folded.total_events,
                        u::TOTAL_PURCHASES: folded.total_purchases,
                        u::TOTAL_REVENUE: folded.total_revenue,
                        u::TOTAL_REVENUE_MICROS: folded.total_revenue_micros,
                        common::UPDATED_AT: now,
                    } },
                }),
                None => writes.inserts.push(bson::to_document(&folded)?),
            }
        }
        Ok(writes)
    }

    /// Step 3: events whose id was claimed before this batch.
    async fn resolve_earlier(
        &self,
        events: &[Event],
        earlier: &[(usize, DateTime, Counted)],
        encoded: &mut HashMap<usize, RawDocumentBuf>,
        status: &mut [WriteStatus],
    ) -> Result<(), StoreError> {
        // Looked up at the times the claims counted the events at: by id alone, the
        // lookup reads every bucket of the time-series collection.
        let wanted: Vec<(&str, Option<DateTime>)> = earlier
            .iter()
            .map(|(i, _, counted)| (events[*i].event_id.as_str(), counted.timestamp))
            .collect();
        let mut present: HashSet<String> = super::ledger::events_held(
            &self.store,
            &wanted,
            Duration::from_secs(60),
            "find earlier events",
        )
        .await?;
        let lease_ms = self.options.claim_lease.as_millis() as i64;
        // A claim about to be taken over is looked up by id alone first: one an earlier
        // version took over may have its event stored at the resend's time, not the
        // claim's. (Claims to take over are rare: a writer died between claim and insert.)
        let now = self.store.now().timestamp_millis();
        let to_take: Vec<&str> = earlier
            .iter()
            .map(|(i, at, _)| (events[*i].event_id.as_str(), at))
            .filter(|(id, at)| !present.contains(*id) && now - at.timestamp_millis() >= lease_ms)
            .map(|(id, _)| id)
            .collect();
        if !to_take.is_empty() {
            present.extend(
                super::ledger::events_held_by_id(&self.store, to_take, "find earlier events")
                    .await?,
            );
        }
        for (i, at, counted) in earlier {
            let (i, at) = (*i, *at);
            let event = &events[i];
            if present.contains(&event.event_id) {
                status[i] = WriteStatus::Duplicate;
                continue;
            }
            // Judged and taken at the time of the take-over, not of the batch: the claim
            // this writer then holds is a whole lease young.
            let now = self.store.now();
            let age_ms = now.timestamp_millis() - at.timestamp_millis();
            if age_ms < lease_ms {
                // A young claim's write is most likely landing now (a client that timed
                // out and resent at once): back in a second. An older one's may have
                // died: back once the lease ends, when it can be taken over.
                let wait_ms = if age_ms < YOUNG_CLAIM_MS {
                    1_000
                } else {
                    lease_ms - age_ms
                };
                let seconds = u32::try_from((wait_ms + 999) / 1000).unwrap_or(u32::MAX);
                status[i] = WriteStatus::Held { seconds };
                continue;
            }
            // An abandoned claim: its aggregates were applied, its event never stored.
            let taken = self
                .store
                .collection(c::EVENT_IDS)
                .update_one(
                    doc! { common::ID: &event.event_id, l::CLAIMED_AT: at },
                    doc! { "$set": { l::CLAIMED_AT: now } },
                )
                .await
                .map_err(StoreError::mongo(c::EVENT_IDS, "take over claim"))?;
            if taken.modified_count == 0 {
                status[i] = WriteStatus::Retry;
                continue;
            }
            let taken_at = Instant::now();
            // The event is stored as its aggregates counted it: a resend's time may differ
            // (its clock-skew correction is redone on arrival), and so may its visitor and
            // gap session (an identity link or a session made in between).
            let restored = counted.restore(event);
            let event = match &restored {
                Some(restored) => {
                    encoded.remove(&i);
                    restored
                }
                None => event,
            };
            if let Err(err) = self.mark_late_days(std::slice::from_ref(event), &[0]).await {
                self.hand_back_claims(events, &[i], now).await;
                return Err(err);
            }
            // As for new claims: one that aged past half its lease (a slow mark) is not
            // inserted here, since a resend may be taking it over.
            if taken_at.elapsed() > self.options.claim_lease / 2 {
                self.hand_back_claims(events, &[i], now).await;
                status[i] = WriteStatus::Retry;
                continue;
            }
            self.store
                .collection(c::EVENTS)
                .clone_with_type::<RawDocumentBuf>()
                .insert_one(match encoded.remove(&i) {
                    Some(doc) => doc,
                    None => encode_event(event)?,
                })
                .write_concern(self.store.write_concern().clone())
                .await
                .map_err(StoreError::mongo(c::EVENTS, "complete abandoned claim"))?;
            status[i] = WriteStatus::Stored;
        }
        // Claims whose events were found, or just stored, say so from now on: a later
        // resend needs no lookup (claims of earlier versions, and of writes whose note
        // failed, get theirs here).
        let settled: Vec<usize> = earlier
            .iter()
            .map(|&(i, _, _)| i)
            .filter(|&i| matches!(status[i], WriteStatus::Duplicate | WriteStatus::Stored))
            .collect();
        self.mark_stored(events, &settled).await;
        Ok(())
    }
}

/// Write conflict: another transaction changed the same document.
const WRITE_CONFLICT: i32 = 112;

/// An error inside the claim transaction.
#[derive(Debug)]
enum TxnError {
    Mongo(mongodb::error::Error),
    /// A per-statement error reported in an `update` command's `writeErrors`.
    Statement {
        code: i32,
        message: String,
    },
    Encode(String),
}

impl From<mongodb::error::Error> for TxnError {
    fn from(e: mongodb::error::Error) -> Self {
        TxnError::Mongo(e)
    }
}

impl From<bson::ser::Error> for TxnError {
    fn from(e: bson::ser::Error) -> Self {
        TxnError::Encode(e.to_string())
    }
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnError::Mongo(e) => write!(f, "{}", super::schema::short_error(e)),
            TxnError::Statement { code, message } => write!(f, "write error {code}: {message}"),
            TxnError::Encode(m) => write!(f, "cannot encode: {m}"),
        }
    }
}

/// Whether the whole transaction may simply be run again: the driver's label, a write
/// conflict that some servers report per write instead of as a labelled error, or a
/// duplicate key from a concurrent writer that inserted the same document first (the
/// next attempt reads it and updates it instead).
fn is_transient(err: &TxnError) -> bool {
    let retryable = |code: i32| code == WRITE_CONFLICT || code == DUPLICATE_KEY;
    match err {
        TxnError::Mongo(err) => {
            err.contains_label(TRANSIENT_TRANSACTION_ERROR) || any_code(err, retryable)
        }
        TxnError::Statement { code, .. } => retryable(*code),
        TxnError::Encode(_) => false,
    }
}

/// Whether `err` is a write conflict: the command's, or one of its writes' (an
/// `insertMany` of the ledger's claims reports it per document).
fn is_write_conflict(err: &TxnError) -> bool {
    match err {
        TxnError::Mongo(e) => any_code(e, |code| code == WRITE_CONFLICT),
        TxnError::Statement { code, .. } => *code == WRITE_CONFLICT,
        TxnError::Encode(_) => false,
    }
}

/// Whether a code `err` carries passes `wanted`: the command's, a write's, or any of a
/// bulk write's.
fn any_code(err: &mongodb::error::Error, wanted: impl Fn(i32) -> bool) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match err.kind.as_ref() {
        ErrorKind::Command(c) => wanted(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => wanted(w.code),
        ErrorKind::BulkWrite(b) => b.write_errors.values().any(|w| wanted(w.code)),
        ErrorKind::InsertMany(i) => i.write_errors.iter().flatten().any(|w| wanted(w.code)),
        _ => false,
    }
}

/// The inserts and updates of one collection inside the claim transaction.
#[derive(Default)]
struct Writes {
    inserts: Vec<Document>,
    /// `update` command statements (`{q, u}`), all by `_id`.
    updates: Vec<Document>,
}

impl Writes {
    async fn apply(
        self,
        store: &Store,
        collection: &str,
        session: &mut ClientSession,
    ) -> Result<(), TxnError> {
        if !self.inserts.is_empty() {
            store
                .collection(collection)
                .insert_many(self.inserts)
                .session(&mut *session)
                .await?;
        }
        // One `update` command carries the statements (one round trip, and unlike the
        // newer `bulkWrite` command it exists on every MongoDB version), several when they
        // would pass the size a command may have (session statements hold page URLs of up
        // to 4 KiB each, and `write_batch_size` has no ceiling).
        let mut updates = self.updates;
        for group in super::command_groups(&updates, super::MAX_UPDATE_COMMAND_BYTES) {
            // Groups are consecutive: each takes the statements at the front.
            let statements: Vec<Document> = updates.drain(..group.len()).collect();
            let reply = store
                .db()
                .run_command(doc! { "update": collection, "updates": statements, "ordered": true })
                .session(&mut *session)
                .await?;
            if let Some(first) = super::statement_errors(&reply).into_iter().next() {
                return Err(TxnError::Statement {
                    code: first.code,
                    message: first.message,
                });
            }
        }
        Ok(())
    }
}

async fn commit(session: &mut ClientSession) -> Result<(), mongodb::error::Error> {
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Err(err) if err.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && tries < 5 => {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// The document stored for `ev` (without `_id`: the server's is used), encoded straight to
/// BSON bytes.
fn encode_event(ev: &Event) -> Result<RawDocumentBuf, StoreError> {
    let encoded = if ev.id.is_some() {
        bson::to_raw_document_buf(&Event {
            id: None,
            ..ev.clone()
        })
    } else {
        bson::to_raw_document_buf(ev)
    };
    let encoded = encoded.map_err(|err| StoreError::Encode {
        collection: c::EVENTS.into(),
        message: format!("event `{}`: {err}", ev.event_id),
    })?;
    // Every path checks its events' size before they reach the writer; one that did not
    // fails here, before its aggregates are applied, not at the insert after them.
    if encoded.as_bytes().len() > super::MAX_EVENT_DOCUMENT_BYTES {
        return Err(StoreError::Encode {
            collection: c::EVENTS.into(),
            message: format!(
                "event `{}` is {} bytes as stored, over the {} MongoDB allows a time-series measurement",
                ev.event_id,
                encoded.as_bytes().len(),
                super::MAX_EVENT_DOCUMENT_BYTES
            ),
        });
    }
    Ok(encoded)
}

/// A session document as stored, read for folding.
pub(super) enum Stored {
    Read {
        session: Box<Session>,
        /// Its `status` was none Sluice knows (another writer's `CLOSED`): folded as
        /// ENDED, and kept as stored unless the session goes on.
        status_unread: bool,
        /// It holds fields Sluice does not write (another writer's): they must stay.
        foreign: bool,
    },
    /// Not a session even leniently read (no start time): why.
    Unreadable(String),
}

/// A stored session as read from the server: the common case (a session Sluice wrote)
/// straight from its bytes, another writer's through [`stored_session`].
fn stored_session_raw(raw: &RawDocumentBuf) -> Stored {
    let foreign = raw
        .iter()
        .any(|field| field.map_or(true, |(k, _)| !Session::is_field(k)));
    if let Ok(session) = bson::from_slice::<Session>(raw.as_bytes()) {
        return Stored::Read {
            session: Box::new(session),
            status_unread: false,
            foreign,
        };
    }
    match raw.to_document() {
        Ok(doc) => stored_session(doc),
        Err(e) => Stored::Unreadable(e.to_string()),
    }
}

/// A stored session, read leniently when another writer stored it otherwise than Sluice
/// does: counts as doubles, decimals or text (whole numbers), times as text (RFC 3339, or
/// `YYYY-MM-DD HH:MM:SS` as UTC) or epoch milliseconds, a numeric visitor id, a missing
/// `createdAt`, `endTime` (from `duration`) or `duration`, text fields holding other
/// values (as their JSON text, so nothing of them is lost), an unknown status, an `_id`
/// of any type. A start time, an event count or a page view count that is missing or
/// does not read as one leaves it unreadable: guessed, the session would go on with
/// wrong numbers.
pub(super) fn stored_session(doc: Document) -> Stored {
    let foreign = doc.keys().any(|k| !Session::is_field(k));
    let mut d = doc;
    // Found and updated by its `_id` as stored; not read.
    d.remove(common::ID);
    if let Ok(session) = bson::from_document::<Session>(d.clone()) {
        return Stored::Read {
            session: Box::new(session),
            status_unread: false,
            foreign,
        };
    }
    // Epoch numbers only as milliseconds from 1973 on: an earlier one is more likely
    // seconds, which read as milliseconds would put the session in January 1970.
    const MIN_EPOCH_MS: f64 = 1e11;
    let date = |v: Option<&Bson>| match v? {
        Bson::DateTime(t) => Some(*t),
        Bson::String(text) => {
            let text = text.trim();
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp_millis())
                .or_else(|_| {
                    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                        .or_else(|_| {
                            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                        })
                        .map(|t| t.and_utc().timestamp_millis())
                })
                .ok()
                .map(DateTime::from_millis)
        }
        v @ (Bson::Int64(_) | Bson::Double(_)) => sluice_core::model::number_of(v)
            .filter(|ms| ms.is_finite() && ms.abs() >= MIN_EPOCH_MS)
            .map(|ms| DateTime::from_millis(ms.floor() as i64)),
        _ => None,
    };
    // A whole number, as a count is.
    let whole = |v: Option<&Bson>| match v? {
        v @ (Bson::Int32(_) | Bson::Int64(_)) => sluice_core::model::int_of(v),
        v => sluice_core::model::stored_number(v)
            .filter(|n| n.fract() == 0.0 && n.abs() < 9.0e15)
            .map(|n| n as i64),
    };
    let Some(start) = date(d.get(s::START_TIME)) else {
        return Stored::Unreadable("its startTime is missing or not a time".into());
    };
    let duration = whole(d.get(s::DURATION)).filter(|ms| *ms >= 0);
    let end = match d.get(s::END_TIME) {
        None | Some(Bson::Null) => DateTime::from_millis(
            start
                .timestamp_millis()
                .saturating_add(duration.unwrap_or(0)),
        ),
        v => match date(v) {
            Some(end) => end.max(start),
            None => return Stored::Unreadable("its endTime is not a time".into()),
        },
    };
    let created = date(d.get(common::CREATED_AT)).unwrap_or(start);
    let updated = date(d.get(common::UPDATED_AT)).unwrap_or(end);
    d.insert(s::START_TIME, start);
    d.insert(s::END_TIME, end);
    d.insert(common::CREATED_AT, created);
    d.insert(common::UPDATED_AT, updated);
    d.insert(
        s::DURATION,
        end.timestamp_millis() - start.timestamp_millis(),
    );
    for k in [s::PAGE_VIEWS, s::EVENTS] {
        match whole(d.get(k)).filter(|n| *n >= 0) {
            Some(n) => d.insert(k, n),
            None => return Stored::Unreadable(format!("its {k} is missing or not a whole number")),
        };
    }
    // A numeric visitor id as the tracker writes one sent as a number.
    let id_text = match d.get(s::USER_ID) {
        Some(v @ (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_))) => {
            Some(match v.clone().into_relaxed_extjson() {
                serde_json::Value::Number(n) => sluice_core::tracking::number_id(&n),
                other => other.to_string(),
            })
        }
        _ => None,
    };
    if let Some(text) = id_text {
        d.insert(s::USER_ID, text);
    }
    // Text fields holding other values (`browser: {name, version}`): as their JSON text,
    // which the update writes back, so nothing of them is lost.
    for k in Session::TEXT_FIELDS {
        if let Some(v) = d
            .get(k)
            .filter(|v| !matches!(v, Bson::Null | Bson::String(_)))
        {
            let text = v.clone().into_relaxed_extjson().to_string();
            d.insert(k, text);
        }
    }
    let status_unread = d.get_str(s::STATUS).map_or(true, |t| {
        sluice_core::model::SessionStatus::parse(t).is_err()
    });
    if status_unread {
        d.insert(s::STATUS, sluice_core::model::SessionStatus::Ended.as_str());
    }
    let read = bson::from_document::<Session>(d.clone()).or_else(|_| {
        // Keys of Sluice's own that do not read (another shape) are made again.
        for k in Session::KEY_FIELDS {
            d.remove(k);
        }
        bson::from_document::<Session>(d)
    });
    match read {
        Ok(session) => Stored::Read {
            session: Box::new(session),
            status_unread,
            foreign,
        },
        Err(e) => Stored::Unreadable(e.to_string()),
    }
}

/// `sluice_sessions_unread_total`.
pub fn count_sessions_unread(n: u64) {
    sluice_core::metrics::count(
        "sluice_sessions_unread_total",
        "Stored sessions that could not be read, even leniently (another writer's document without a start time), left as they were while their new events were stored.",
        &[],
        n,
    );
}

/// Reads the aggregate fields of a stored user, tolerating profiles created by imports
/// (which may lack them) and totals other writers stored as decimals or text. The
/// aggregate check reads them the same way. With `say_unreadable`, a total that is not a
/// number (counted as 0 by the fold about to replace it) is logged with its value.
pub(super) fn user_aggregates(visitor: &str, d: &Document, say_unreadable: bool) -> User {
    // A total as another writer (or a hand edit) stored it: a double, a decimal, text.
    let number = |k: &str| match d.get(k) {
        None | Some(Bson::Null) => Some(0.0),
        Some(v) => {
            let n = sluice_core::model::stored_number(v);
            if n.is_none() && say_unreadable {
                // Counted from zero from now on: the value it held is said here.
                tracing::warn!(
                    visitor,
                    field = k,
                    value = %v.clone().into_relaxed_extjson(),
                    "a visitor's total is not a number Sluice can read; it is counted from 0 from now on"
                );
            }
            n
        }
    };
    // Integers exactly; a fraction (a hand-edited profile) truncated rather than as none.
    let int = |k: &str| match d.get(k) {
        Some(v @ (Bson::Int32(_) | Bson::Int64(_))) => sluice_core::model::int_of(v).unwrap_or(0),
        _ => number(k).map_or(0, |n| n as i64),
    };
    // An exact total that does not read is said, also when the other one stands in.
    number(u::TOTAL_REVENUE_MICROS);
    let micros = sluice_core::model::stored_revenue_micros(d).unwrap_or_else(|| {
        number(u::TOTAL_REVENUE);
        0
    });
    User {
        id: None,
        visitor_id: visitor.to_string(),
        email: None,
        first_name: None,
        last_name: None,
        attributes: Document::new(),
        first_seen: d
            .get_datetime(u::FIRST_SEEN)
            .copied()
            .unwrap_or(DateTime::MAX),
        last_seen: d
            .get_datetime(u::LAST_SEEN)
            .copied()
            .unwrap_or(DateTime::MIN),
        total_sessions: int(u::TOTAL_SESSIONS),
        total_events: int(u::TOTAL_EVENTS),
        total_purchases: int(u::TOTAL_PURCHASES),
        total_revenue: 0.0,
        total_revenue_micros: micros,
        tags: Vec::new(),
        segments: Vec::new(),
        created_at: DateTime::MIN,
        updated_at: DateTime::MIN,
    }
}
