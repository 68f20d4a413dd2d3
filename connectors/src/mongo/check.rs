//! `sluice db check`: recomputes every session and visitor aggregate from the stored
//! events and compares it with what `sessions` and `users` hold, and finds the ledger's
//! claims whose events `events` does not hold. It reads and never writes.
//!
//! The aggregates are folded with the writer's own rules ([`fold_session`],
//! [`fold_user`]), so the check finds what storage lost or changed (a crash of a server
//! that lost acknowledged writes, a hand edit, a restore of one collection without the
//! others), not a difference of rules.
//!
//! Each pass merges cursors sorted by one key: the documents, and every event (by
//! `sessionId`, then by `userId`; the ledger pass by `eventId`), so an event whose session
//! or visitor has no document is found as well as a document without events, and one
//! session or visitor is held at a time. On MongoDB's time-series `events` those sorts
//! are blocking sorts that spill to disk (`allowDiskUse`); the `events` cursor is opened
//! first, so the others do not sit idle through it.
//!
//! What it cannot see:
//! - sessions and visitors with events ARCHIVE has removed (before `archived_before`)
//!   are counted as skipped: their aggregates count events `events` no longer holds;
//! - a claim younger than the writer's lease belongs to a batch being written, whose
//!   aggregates are ahead of `events` until its insert ends. A session or visitor that
//!   differs is therefore looked at again after `settle` and reported only if it still
//!   differs (one receiving events in both looks can still be reported: run it again).

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_core::aggregate::{fold_session, fold_user, REVENUE_SCALE};
use sluice_core::model::{
    collections as c, common, event_fields as e, event_id_fields as l, session_fields as s,
    user_fields as u, Event, Session,
};

use super::{Store, StoreError};

/// What to check, and how.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Sessions and visitors with an event (or a document time) before this are skipped:
    /// ARCHIVE has deleted events before it from `events`.
    pub archived_before: Option<DateTime>,
    /// Claims taken more recently than this belong to a writer still at work.
    pub claim_lease: Duration,
    /// How long to wait before looking again at what differs.
    pub settle: Duration,
    /// Documents read per range (and events per ledger lookup).
    pub batch: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            archived_before: None,
            claim_lease: super::WriterOptions::default().claim_lease,
            settle: super::WriterOptions::default().claim_lease,
            batch: 1_000,
        }
    }
}

/// One field whose stored value is not the recomputed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub stored: String,
    pub recomputed: String,
}

/// A session or visitor whose document does not match its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The `sessionId` or `visitorId`.
    pub id: String,
    pub differences: Vec<Difference>,
}

/// A claim in the ledger, older than the lease, whose event `events` does not hold: its
/// event is counted in the aggregates but was never stored (its insert was lost, or the
/// client was answered 503 and never sent it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInDoubt {
    pub event_id: String,
    pub timestamp: Option<DateTime>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub claimed_at: Option<DateTime>,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Ledger claims read (those of archived events are not).
    pub claims: u64,
    pub in_doubt: Vec<ClaimInDoubt>,
    /// Events read by the sessions pass.
    pub events: u64,
    pub sessions: u64,
    pub visitors: u64,
    /// Sessions and visitors skipped because ARCHIVE removed some of their events.
    pub archived_sessions: u64,
    pub archived_visitors: u64,
    /// Sessions and visitors whose stored event count exceeds the recomputed one by
    /// exactly their claims in doubt.
    pub explained_sessions: u64,
    pub explained_visitors: u64,
    pub sessions_differ: Vec<Mismatch>,
    pub visitors_differ: Vec<Mismatch>,
    /// Events that could not be read as events (the first few, with why).
    pub unreadable_events: Vec<String>,
}

impl CheckReport {
    /// No session or visitor differs beyond what its claims in doubt explain.
    pub fn consistent(&self) -> bool {
        self.sessions_differ.is_empty()
            && self.visitors_differ.is_empty()
            && self.unreadable_events.is_empty()
    }
}

/// Where the check is, for progress lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Claims,
    Sessions,
    Visitors,
    /// Waiting before looking again at this many sessions and visitors.
    Settling,
}

/// The two aggregate collections, each keyed by one field that events carry too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Session,
    Visitor,
}

impl Subject {
    fn collection(self) -> &'static str {
        match self {
            Self::Session => c::SESSIONS,
            Self::Visitor => c::USERS,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Session => s::SESSION_ID,
            Self::Visitor => u::VISITOR_ID,
        }
    }

    fn event_key(self) -> &'static str {
        match self {
            Self::Session => e::SESSION_ID,
            Self::Visitor => e::USER_ID,
        }
    }
}

/// How one session or visitor came out.
enum Outcome {
    Matches,
    Archived,
    Explained,
    Differs(Vec<Difference>),
}

/// Claims in doubt per session and per visitor.
#[derive(Default)]
struct Doubts {
    sessions: HashMap<String, i64>,
    visitors: HashMap<String, i64>,
}

/// The fields of an event the folds read (its `properties` only for the amount, its
/// metadata without the SDK's context).
fn event_projection() -> Document {
    let mut p = Document::new();
    for f in [
        e::EVENT_ID,
        e::USER_ID,
        e::SESSION_ID,
        e::EVENT_TYPE,
        e::TIMESTAMP,
        e::PAGE_URL,
        common::CREATED_AT,
        common::UPDATED_AT,
    ] {
        p.insert(f, 1);
    }
    p.insert(format!("{}.{}", e::PROPERTIES, e::AMOUNT), 1);
    for m in [
        "device",
        "browser",
        "os",
        "country",
        "region",
        "city",
        "ipAddress",
        "userAgent",
    ] {
        p.insert(format!("{}.{m}", e::METADATA), 1);
    }
    p
}

/// A cursor sorted by one string field, read a group of equal keys at a time.
struct Sorted {
    cursor: mongodb::Cursor<Document>,
    key: &'static str,
    head: Option<Document>,
    collection: &'static str,
    /// The key of the last document read: a merge needs them in order.
    last: Option<String>,
}

impl Sorted {
    async fn open(
        store: &Store,
        collection: &'static str,
        filter: Document,
        projection: Option<Document>,
        key: &'static str,
        batch: usize,
    ) -> Result<Self, StoreError> {
        // The simple (binary) collation, whatever the collection's default: the merge
        // compares keys as Rust orders strings, byte by byte.
        let options = mongodb::options::FindOptions::builder()
            .sort(doc! { key: 1 })
            .collation(
                mongodb::options::Collation::builder()
                    .locale("simple")
                    .build(),
            )
            .projection(projection)
            .allow_disk_use(true)
            .batch_size(batch as u32)
            .build();
        let cursor = store
            .collection(collection)
            .find(filter)
            .with_options(options)
            .await
            .map_err(StoreError::mongo(collection, "read in key order"))?;
        Ok(Self {
            cursor,
            key,
            head: None,
            collection,
            last: None,
        })
    }

    /// The key of the next document (documents without a string key are passed over).
    async fn peek(&mut self) -> Result<Option<String>, StoreError> {
        loop {
            if let Some(d) = &self.head {
                if let Ok(k) = d.get_str(self.key) {
                    return Ok(Some(k.to_string()));
                }
                self.head = None;
            }
            match self
                .cursor
                .try_next()
                .await
                .map_err(StoreError::mongo(self.collection, "read in key order"))?
            {
                Some(d) => {
                    if let Ok(k) = d.get_str(self.key) {
                        // Out of order, the merge would report differences that are not.
                        if self.last.as_deref().is_some_and(|l| k < l) {
                            return Err(StoreError::Unexpected(format!(
                                "`{}` came back out of `{}` order (`{k}` after `{}`): the check cannot go on",
                                self.collection,
                                self.key,
                                self.last.as_deref().unwrap_or_default()
                            )));
                        }
                        self.last = Some(k.to_string());
                    }
                    self.head = Some(d);
                }
                None => return Ok(None),
            }
        }
    }

    /// The next document if its key is `key`.
    async fn next_of(&mut self, key: &str) -> Result<Option<Document>, StoreError> {
        if self.peek().await?.as_deref() == Some(key) {
            Ok(self.head.take())
        } else {
            Ok(None)
        }
    }

    /// How many documents in a row have `key` (the rest of them read and dropped).
    async fn count_of(&mut self, key: &str) -> Result<i64, StoreError> {
        let mut n = 0;
        while self.next_of(key).await?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

/// The smallest of the keys the cursors are at.
fn least(keys: &[Option<String>]) -> Option<String> {
    keys.iter().flatten().min().cloned()
}

/// The events of one key, folded as they are read.
#[derive(Default)]
struct Folded {
    session: Option<Session>,
    user: Option<sluice_core::model::User>,
    count: usize,
    earliest: Option<DateTime>,
}

/// Reads the events of `key` from `events` and folds them as sessions or as visitors.
async fn fold_events(
    events: &mut Sorted,
    subject: Subject,
    key: &str,
    now: DateTime,
    report: &mut CheckReport,
) -> Result<Folded, StoreError> {
    let mut folded = Folded::default();
    while let Some(mut raw) = events.next_of(key).await? {
        if subject == Subject::Session {
            report.events += 1;
        }
        // The folds do not read these; an event stored without them is still counted.
        for f in [common::CREATED_AT, common::UPDATED_AT] {
            raw.entry(f.to_string())
                .or_insert(Bson::DateTime(DateTime::from_millis(0)));
        }
        let id = raw.get_str(e::EVENT_ID).unwrap_or("?").to_string();
        let event = match bson::from_document::<Event>(raw) {
            Ok(event) => event,
            Err(err) => {
                if subject == Subject::Session && report.unreadable_events.len() < 20 {
                    report.unreadable_events.push(format!("event {id}: {err}"));
                }
                continue;
            }
        };
        folded.count += 1;
        folded.earliest = Some(
            folded
                .earliest
                .map_or(event.timestamp, |t| t.min(event.timestamp)),
        );
        match subject {
            Subject::Session => {
                folded.session = Some(fold_session(folded.session.take(), &[&event], now));
            }
            Subject::Visitor => {
                folded.user = Some(fold_user(folded.user.take(), key, &[&event], 0, now));
            }
        }
    }
    Ok(folded)
}

/// Checks every session and visitor; `progress` is called as each stage goes on.
pub async fn check(
    store: &Store,
    options: &CheckOptions,
    mut progress: impl FnMut(Stage, u64),
) -> Result<CheckReport, StoreError> {
    let mut report = CheckReport::default();
    let young = claims_in_doubt(store, options, &mut report, &mut progress).await?;
    let doubts = Doubts::from_claims(&report.in_doubt);
    let now = store.now();
    let mut differing: Vec<(Subject, Vec<String>)> = Vec::new();
    for subject in [Subject::Session, Subject::Visitor] {
        let keys = merge_pass(
            store,
            subject,
            doc! {},
            &doubts,
            options,
            now,
            &mut report,
            Some(&mut progress),
        )
        .await?;
        differing.push((subject, keys));
    }

    let waiting: usize = differing.iter().map(|(_, k)| k.len()).sum();
    if waiting == 0 && report.in_doubt.is_empty() && young.is_empty() {
        return Ok(report);
    }
    progress(Stage::Settling, waiting as u64);
    tokio::time::sleep(options.settle).await;
    // Claims in doubt a resend has completed meanwhile are not; claims that were too
    // young to tell, and still have no event, are.
    report.in_doubt.extend(young);
    recheck_in_doubt(store, &mut report).await?;
    let doubts = Doubts::from_claims(&report.in_doubt);
    let now = store.now();
    report.sessions_differ.clear();
    report.visitors_differ.clear();
    // Looked at again a chunk of keys at a time, documents and events read together (the
    // keys are in order already).
    for (subject, keys) in differing {
        for chunk in keys.chunks(options.batch.max(1)) {
            let mut again = CheckReport::default();
            merge_pass(
                store,
                subject,
                doc! { "$in": chunk },
                &doubts,
                options,
                now,
                &mut again,
                None::<&mut fn(Stage, u64)>,
            )
            .await?;
            report.explained_sessions += again.explained_sessions;
            report.explained_visitors += again.explained_visitors;
            report.sessions_differ.extend(again.sessions_differ);
            report.visitors_differ.extend(again.visitors_differ);
        }
    }
    Ok(report)
}

/// One merge of `subject`'s documents with the events of the same keys (and, for
/// visitors, the sessions they own), every key `keys` selects (`{}`: all of them); adds
/// to `report` and returns the keys that differ, in order.
#[allow(clippy::too_many_arguments)]
async fn merge_pass(
    store: &Store,
    subject: Subject,
    keys: Document,
    doubts: &Doubts,
    options: &CheckOptions,
    now: DateTime,
    report: &mut CheckReport,
    mut progress: Option<&mut impl FnMut(Stage, u64)>,
) -> Result<Vec<String>, StoreError> {
    let stage = match subject {
        Subject::Session => Stage::Sessions,
        Subject::Visitor => Stage::Visitors,
    };
    let open = |collection, projection, key: &'static str| {
        let filter = if keys.is_empty() {
            doc! {}
        } else {
            doc! { key: keys.clone() }
        };
        Sorted::open(store, collection, filter, projection, key, options.batch)
    };
    // `events` first: on a time-series collection its sort runs before its first batch
    // comes back, and a cursor opened before it would sit idle meanwhile (MongoDB closes
    // one idle for `cursorTimeoutMillis`, 10 minutes by default).
    let mut events = open(c::EVENTS, Some(event_projection()), subject.event_key()).await?;
    let mut docs = open(subject.collection(), None, subject.key()).await?;
    // A visitor's sessions, counted in the order of their owners.
    let mut owned = match subject {
        Subject::Visitor => {
            Some(open(c::SESSIONS, Some(doc! { s::USER_ID: 1 }), s::USER_ID).await?)
        }
        Subject::Session => None,
    };
    let mut differing = Vec::new();
    let mut seen: u64 = 0;
    loop {
        let mut heads = vec![docs.peek().await?, events.peek().await?];
        if let Some(o) = owned.as_mut() {
            heads.push(o.peek().await?);
        }
        let Some(key) = least(&heads) else { break };
        let doc = docs.next_of(&key).await?;
        // A second document of one key (no unique index held it off) is read over.
        while docs.next_of(&key).await?.is_some() {}
        let folded = fold_events(&mut events, subject, &key, now, report).await?;
        let sessions = match owned.as_mut() {
            Some(o) => o.count_of(&key).await?,
            None => 0,
        };
        let outcome = judge(
            subject,
            &key,
            doc.as_ref(),
            folded,
            sessions,
            doubts,
            options,
            now,
        );
        if tally(report, subject, key.clone(), outcome) {
            differing.push(key);
        }
        seen += 1;
        if let Some(p) = progress.as_mut() {
            if seen % options.batch.max(1) as u64 == 0 {
                p(stage, seen);
            }
        }
    }
    if let Some(p) = progress.as_mut() {
        p(stage, seen);
    }
    Ok(differing)
}

/// Counts one session or visitor's outcome in `report`; true when it differs.
fn tally(report: &mut CheckReport, subject: Subject, id: String, outcome: Outcome) -> bool {
    let (checked, archived, explained, differ) = match subject {
        Subject::Session => (
            &mut report.sessions,
            &mut report.archived_sessions,
            &mut report.explained_sessions,
            &mut report.sessions_differ,
        ),
        Subject::Visitor => (
            &mut report.visitors,
            &mut report.archived_visitors,
            &mut report.explained_visitors,
            &mut report.visitors_differ,
        ),
    };
    match outcome {
        Outcome::Archived => *archived += 1,
        Outcome::Matches => *checked += 1,
        Outcome::Explained => {
            *checked += 1;
            *explained += 1;
        }
        Outcome::Differs(differences) => {
            *checked += 1;
            differ.push(Mismatch { id, differences });
            return true;
        }
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn judge(
    subject: Subject,
    key: &str,
    doc: Option<&Document>,
    folded: Folded,
    sessions: i64,
    doubts: &Doubts,
    options: &CheckOptions,
    now: DateTime,
) -> Outcome {
    let doubt = doubts.of(subject, key);
    match subject {
        Subject::Session => session_outcome(doc, folded, doubt, options),
        Subject::Visitor => visitor_outcome(key, doc, folded, sessions, doubt, options, now),
    }
}

impl Doubts {
    fn of(&self, subject: Subject, id: &str) -> i64 {
        let map = match subject {
            Subject::Session => &self.sessions,
            Subject::Visitor => &self.visitors,
        };
        map.get(id).copied().unwrap_or(0)
    }

    fn from_claims(claims: &[ClaimInDoubt]) -> Self {
        let mut d = Doubts::default();
        for claim in claims {
            if let Some(sid) = &claim.session_id {
                *d.sessions.entry(sid.clone()).or_default() += 1;
            }
            if let Some(uid) = &claim.user_id {
                *d.visitors.entry(uid.clone()).or_default() += 1;
            }
        }
        d
    }
}

/// Reads the ledger's claims (not those of archived events) beside the events, both in
/// eventId order: keeps in `report` the claims older than the lease whose events `events`
/// does not hold, and returns the younger ones without their event (a batch being written,
/// or one that has just lost its insert: the settle tells).
async fn claims_in_doubt(
    store: &Store,
    options: &CheckOptions,
    report: &mut CheckReport,
    progress: &mut impl FnMut(Stage, u64),
) -> Result<Vec<ClaimInDoubt>, StoreError> {
    let leased = store.now().timestamp_millis() - options.claim_lease.as_millis() as i64;
    // `events` first, as in the other passes (its sort runs before its first batch).
    let mut events = Sorted::open(
        store,
        c::EVENTS,
        doc! {},
        Some(doc! { e::EVENT_ID: 1, common::ID: 0 }),
        e::EVENT_ID,
        options.batch,
    )
    .await?;
    let mut claims = Sorted::open(
        store,
        c::EVENT_IDS,
        doc! { l::ARCHIVED: { "$ne": true } },
        None,
        common::ID,
        options.batch,
    )
    .await?;
    let mut young = Vec::new();
    loop {
        let heads = [claims.peek().await?, events.peek().await?];
        let Some(key) = least(&heads) else { break };
        let stored = events.count_of(&key).await? > 0;
        while let Some(claim) = claims.next_of(&key).await? {
            report.claims += 1;
            if report.claims % options.batch.max(1) as u64 == 0 {
                progress(Stage::Claims, report.claims);
            }
            if stored {
                continue;
            }
            let claimed_at = claim.get_datetime(l::CLAIMED_AT).ok().copied();
            let found = ClaimInDoubt {
                event_id: key.clone(),
                timestamp: claim.get_datetime(l::TIMESTAMP).ok().copied(),
                user_id: claim.get_str(l::USER_ID).ok().map(str::to_string),
                session_id: claim.get_str(l::SESSION_ID).ok().map(str::to_string),
                claimed_at,
            };
            if claimed_at.is_some_and(|at| at.timestamp_millis() >= leased) {
                young.push(found);
            } else {
                report.in_doubt.push(found);
            }
        }
    }
    progress(Stage::Claims, report.claims);
    Ok(young)
}

/// The claims of `claims` whose eventId `events` does not hold.
async fn without_events(
    store: &Store,
    claims: Vec<ClaimInDoubt>,
) -> Result<Vec<ClaimInDoubt>, StoreError> {
    if claims.is_empty() {
        return Ok(claims);
    }
    // By id alone: a claim in doubt most likely has no event, which only a lookup by id
    // alone can say (one an earlier version took over may have it at another time).
    let found = super::ledger::events_held_by_id(
        store,
        claims.iter().map(|c| c.event_id.as_str()),
        "look up claimed events",
    )
    .await?;
    Ok(claims
        .iter()
        .filter(|c| !found.contains(c.event_id.as_str()))
        .cloned()
        .collect())
}

/// Keeps the claims in doubt whose events are still missing (a resend may have stored
/// some meanwhile).
async fn recheck_in_doubt(store: &Store, report: &mut CheckReport) -> Result<(), StoreError> {
    let claims = std::mem::take(&mut report.in_doubt);
    for chunk in claims.chunks(1_000) {
        let still = without_events(store, chunk.to_vec()).await?;
        report.in_doubt.extend(still);
    }
    Ok(())
}

fn time(t: DateTime) -> String {
    t.try_to_rfc3339_string()
        .unwrap_or_else(|_| t.timestamp_millis().to_string())
}

fn text(v: &Option<String>) -> String {
    match v {
        Some(t) => format!("{t:?}"),
        None => "(none)".to_string(),
    }
}

fn before(t: DateTime, options: &CheckOptions) -> bool {
    options.archived_before.is_some_and(|h| t < h)
}

/// Pushes a difference when `stored` and `recomputed` are not equal.
fn differ<T: PartialEq>(
    out: &mut Vec<Difference>,
    field: &'static str,
    stored: &T,
    recomputed: &T,
    show: impl Fn(&T) -> String,
) {
    if stored != recomputed {
        out.push(Difference {
            field,
            stored: show(stored),
            recomputed: show(recomputed),
        });
    }
}

/// The document of a session or visitor to compare, or its outcome when there is nothing
/// to compare: archived (an event, or the document's `since` time, before the archived
/// days) or no document for its events.
fn present<'d>(
    doc: Option<&'d Document>,
    folded: &Folded,
    since: &str,
    what: &str,
    options: &CheckOptions,
) -> Result<&'d Document, Outcome> {
    let since = doc.and_then(|d| d.get_datetime(since).ok().copied());
    if folded
        .earliest
        .into_iter()
        .chain(since)
        .any(|t| before(t, options))
    {
        return Err(Outcome::Archived);
    }
    doc.ok_or_else(|| {
        Outcome::Differs(vec![Difference {
            field: "document",
            stored: "(none)".into(),
            recomputed: format!("{what} of {} events", folded.count),
        }])
    })
}

fn session_outcome(
    doc: Option<&Document>,
    folded: Folded,
    doubt: i64,
    options: &CheckOptions,
) -> Outcome {
    let doc = match present(doc, &folded, s::START_TIME, "a session", options) {
        Ok(doc) => doc,
        Err(outcome) => return outcome,
    };
    // Read as the tracker reads it (another writer's shapes too).
    let stored: Session = match super::ingest::stored_session(doc.clone()) {
        super::ingest::Stored::Read { session, .. } => *session,
        super::ingest::Stored::Unreadable(err) => {
            return Outcome::Differs(vec![Difference {
                field: "document",
                stored: format!("unreadable ({err})"),
                recomputed: format!("a session of {} events", folded.count),
            }])
        }
    };
    let Some(want) = folded.session else {
        return if doubt > 0 && stored.events == doubt {
            Outcome::Explained
        } else {
            Outcome::Differs(vec![Difference {
                field: s::EVENTS,
                stored: stored.events.to_string(),
                recomputed: "0 (no event of this session is stored)".into(),
            }])
        };
    };
    let mut out = Vec::new();
    let n = |v: &i64| v.to_string();
    let t = |v: &DateTime| time(*v);
    differ(&mut out, s::USER_ID, &stored.user_id, &want.user_id, |v| {
        format!("{v:?}")
    });
    differ(&mut out, s::EVENTS, &stored.events, &want.events, n);
    differ(
        &mut out,
        s::PAGE_VIEWS,
        &stored.page_views,
        &want.page_views,
        n,
    );
    differ(
        &mut out,
        s::START_TIME,
        &stored.start_time,
        &want.start_time,
        t,
    );
    differ(&mut out, s::END_TIME, &stored.end_time, &want.end_time, t);
    differ(&mut out, s::DURATION, &stored.duration, &want.duration, n);
    for (field, a, b) in [
        (s::ENTRY_PAGE, &stored.entry_page, &want.entry_page),
        (s::EXIT_PAGE, &stored.exit_page, &want.exit_page),
        (s::DEVICE, &stored.device, &want.device),
        (s::BROWSER, &stored.browser, &want.browser),
        (s::OS, &stored.os, &want.os),
        (s::COUNTRY, &stored.country, &want.country),
        ("region", &stored.region, &want.region),
        ("city", &stored.city, &want.city),
    ] {
        differ(&mut out, field, a, b, text);
    }
    if out.is_empty() {
        Outcome::Matches
    } else if doubt > 0 && stored.events == want.events + doubt {
        Outcome::Explained
    } else {
        Outcome::Differs(out)
    }
}

fn visitor_outcome(
    id: &str,
    doc: Option<&Document>,
    folded: Folded,
    owned_sessions: i64,
    doubt: i64,
    options: &CheckOptions,
    now: DateTime,
) -> Outcome {
    let doc = match present(doc, &folded, u::FIRST_SEEN, "a profile", options) {
        Ok(doc) => doc,
        Err(outcome) => return outcome,
    };
    let first_seen = doc.get_datetime(u::FIRST_SEEN).ok().copied();
    let has_events = folded.user.is_some();
    let mut want = folded
        .user
        .unwrap_or_else(|| fold_user(None, id, &[], 0, now));
    want.total_sessions = owned_sessions;
    // Its totals as the writer reads them (a profile an import wrote holds none until
    // events count in it).
    let stored = super::ingest::user_aggregates(id, doc, false);
    let mut out = Vec::new();
    let n = |v: &i64| v.to_string();
    differ(
        &mut out,
        u::TOTAL_EVENTS,
        &stored.total_events,
        &want.total_events,
        n,
    );
    differ(
        &mut out,
        u::TOTAL_PURCHASES,
        &stored.total_purchases,
        &want.total_purchases,
        n,
    );
    differ(
        &mut out,
        u::TOTAL_REVENUE,
        &stored.total_revenue_micros,
        &want.total_revenue_micros,
        |v| format!("{}", *v as f64 / REVENUE_SCALE),
    );
    // Counted from the `sessions` documents naming the visitor (a session's events may
    // be archived), not from events: a stray session document shows here, said so.
    if stored.total_sessions != want.total_sessions {
        out.push(Difference {
            field: u::TOTAL_SESSIONS,
            stored: n(&stored.total_sessions),
            recomputed: format!(
                "{} (the `sessions` documents naming this visitor)",
                want.total_sessions
            ),
        });
    }
    if has_events {
        let t = |v: &Option<DateTime>| v.map(time).unwrap_or_else(|| "(none)".into());
        differ(
            &mut out,
            u::FIRST_SEEN,
            &first_seen,
            &Some(want.first_seen),
            t,
        );
        differ(
            &mut out,
            u::LAST_SEEN,
            &doc.get_datetime(u::LAST_SEEN).ok().copied(),
            &Some(want.last_seen),
            t,
        );
    }
    if out.is_empty() {
        Outcome::Matches
    } else if doubt > 0 && stored.total_events == want.total_events + doubt {
        Outcome::Explained
    } else {
        Outcome::Differs(out)
    }
}
