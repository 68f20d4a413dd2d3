//! The MongoDB store against the real server: collections, indexes read back with
//! listIndexes, idempotent init, and the event writer's once-per-eventId guarantee.

mod support;

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use sluice_connectors::mongo::{EventWriter, IndexOutcome, WriteStatus, WriterOptions};
use sluice_core::model::{Event, EventMetadata, EventType};
use support::TestDb;

async fn indexes(db: &TestDb, coll: &str) -> Vec<Document> {
    db.store
        .collection(coll)
        .list_indexes()
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            let mut d = bson::to_document(&m.options).unwrap_or_default();
            d.insert("key", m.keys);
            d
        })
        .collect()
}

fn find_by_key<'a>(list: &'a [Document], key: &Document) -> Option<&'a Document> {
    list.iter()
        .find(|d| d.get_document("key").ok() == Some(key))
}

fn flag(d: &Document, k: &str) -> bool {
    d.get_bool(k).unwrap_or(false)
}

/// The design document's indexes plus the ones it leaves out, written out independently
/// of the implementation's table: (collection, keys, unique, sparse).
fn expected_indexes() -> Vec<(&'static str, Document, bool, bool)> {
    vec![
        ("users", doc! { "visitorId": 1 }, true, false),
        ("users", doc! { "email": 1 }, false, true),
        (
            "users",
            doc! { "lastSeen": 1, "totalEvents": 1 },
            false,
            false,
        ),
        ("users", doc! { "tags": 1 }, false, false),
        ("users", doc! { "segments": 1 }, false, false),
        ("events", doc! { "eventId": 1 }, false, false),
        ("events", doc! { "userId": 1, "timestamp": 1 }, false, false),
        (
            "events",
            doc! { "sessionId": 1, "timestamp": 1 },
            false,
            false,
        ),
        (
            "events",
            doc! { "eventType": 1, "timestamp": 1 },
            false,
            false,
        ),
        ("events", doc! { "timestamp": 1 }, false, false),
        (
            "events",
            doc! { "pageUrl": 1, "timestamp": 1 },
            false,
            false,
        ),
        ("sessions", doc! { "sessionId": 1 }, true, false),
        (
            "sessions",
            doc! { "userId": 1, "startTime": 1 },
            false,
            false,
        ),
        (
            "sessions",
            doc! { "status": 1, "startTime": 1 },
            false,
            false,
        ),
        (
            "sessions",
            doc! { "country": 1, "startTime": 1 },
            false,
            false,
        ),
        (
            "sessions",
            doc! { "device": 1, "startTime": 1 },
            false,
            false,
        ),
        ("admin_users", doc! { "email": 1 }, true, false),
        ("integration_configs", doc! { "name": 1 }, true, false),
        ("export_jobs", doc! { "jobId": 1 }, true, false),
        ("products", doc! { "productId": 1 }, true, false),
        (
            "scheduled_runs",
            doc! { "job": 1, "scheduledFor": -1 },
            false,
            false,
        ),
        (
            "scheduled_runs",
            doc! { "status": 1, "expiresAt": 1 },
            false,
            false,
        ),
        ("admin_tokens", doc! { "expiresAt": 1 }, false, false),
    ]
}

#[tokio::test]
async fn init_creates_every_index_with_its_keys_and_options() {
    let db = TestDb::initialized().await;
    for (coll, keys, unique, sparse) in expected_indexes() {
        let list = indexes(&db, coll).await;
        let found = find_by_key(&list, &keys)
            .unwrap_or_else(|| panic!("no index {keys} on {coll}; have {list:?}"));
        assert_eq!(flag(found, "unique"), unique, "unique of {keys} on {coll}");
        assert_eq!(flag(found, "sparse"), sparse, "sparse of {keys} on {coll}");
        // Key order matters for compound indexes: compare the ordered key list.
        let order: Vec<&String> = found.get_document("key").unwrap().keys().collect();
        let want: Vec<&String> = keys.keys().collect();
        assert_eq!(order, want, "key order on {coll}");
    }
}

#[tokio::test]
async fn events_is_a_time_series_collection_on_timestamp() {
    let db = TestDb::initialized().await;
    let spec = db
        .store
        .db()
        .run_command(doc! { "listCollections": 1, "filter": { "name": "events" } })
        .await
        .unwrap();
    let first = spec
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(first.get_str("type").unwrap(), "timeseries", "{first}");
    let ts = first
        .get_document("options")
        .unwrap()
        .get_document("timeseries")
        .unwrap();
    assert_eq!(ts.get_str("timeField").unwrap(), "timestamp");
    assert_eq!(ts.get_str("metaField").unwrap(), "eventType");
}

#[tokio::test]
async fn text_index_is_created_or_reported_as_skipped() {
    let db = TestDb::new().await;
    let report = db.store.init().await.unwrap();
    let (_, _, outcome) = report
        .indexes
        .iter()
        .find(|(c, n, _)| c == "users" && n == "users_text")
        .expect("text index is attempted");
    let list = indexes(&db, "users").await;
    let has_text = list.iter().any(|d| {
        d.get_document("key")
            .map(|k| k.contains_key("_fts"))
            .unwrap_or(false)
    });
    // Which outcome is right depends on the server: asked directly with the driver,
    // does it build text indexes (MongoDB, Atlas) or refuse them (the test server)?
    let probe = db
        .store
        .collection("text_probe")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "note": "text" })
                .build(),
        )
        .await;
    let supported = probe.is_ok();
    match outcome {
        IndexOutcome::Created | IndexOutcome::Exists(_) => {
            assert!(
                supported,
                "created where the server refuses them: {probe:?}"
            );
            assert!(has_text)
        }
        IndexOutcome::Skipped(reason) => {
            assert!(!supported, "skipped where the server builds them");
            assert!(!has_text);
            assert!(reason.contains("text"), "{reason}");
            assert!(
                report.warnings.iter().any(|w| w.contains("users_text")),
                "a refused text index must be warned about: {:?}",
                report.warnings
            );
        }
    }
}

#[tokio::test]
async fn expired_tokens_are_left_to_a_ttl_index_and_session_updates_touch_no_end_time_index() {
    let db = TestDb::initialized().await;
    let tokens = indexes(&db, "admin_tokens").await;
    let after = |index: &Document| match index.get("expireAfterSeconds") {
        Some(Bson::Int32(v)) => Some(i64::from(*v)),
        Some(Bson::Int64(v)) => Some(*v),
        Some(Bson::Double(v)) => Some(*v as i64),
        _ => None,
    };
    let ttl = find_by_key(&tokens, &doc! { "expiresAt": 1 }).unwrap();
    assert_eq!(after(ttl), Some(0), "{ttl}");
    // Ended fires and runs go after 90 days (a RUNNING one has no `endedAt`).
    let runs = indexes(&db, "scheduled_runs").await;
    let ended = find_by_key(&runs, &doc! { "endedAt": 1 }).unwrap();
    assert_eq!(after(ended), Some(90 * 24 * 3600), "{ended}");
    let sessions = indexes(&db, "sessions").await;
    assert!(
        sessions
            .iter()
            .all(|d| !d.get_document("key").unwrap().contains_key("endTime")),
        "{sessions:?}"
    );
}

#[tokio::test]
async fn replicas_initialising_a_fresh_database_at_once_both_succeed() {
    let db = TestDb::new().await;
    let (a, b) = tokio::join!(db.store.init(), db.store.init());
    a.unwrap();
    b.unwrap();
    assert_eq!(db.store.init().await.unwrap().created_indexes(), 0);
}

#[tokio::test]
async fn init_is_idempotent() {
    let db = TestDb::new().await;
    let first = db.store.init().await.unwrap();
    assert!(first.created_indexes() >= expected_indexes().len() - 1);
    let mut before = Vec::new();
    for c in [
        "users",
        "events",
        "sessions",
        "admin_users",
        "integration_configs",
        "export_jobs",
        "products",
        "event_ids",
    ] {
        before.push(indexes(&db, c).await);
    }
    let second = db.store.init().await.unwrap();
    assert_eq!(second.created_indexes(), 0, "{:?}", second.indexes);
    assert!(second.created_collections.is_empty());
    let mut after = Vec::new();
    for c in [
        "users",
        "events",
        "sessions",
        "admin_users",
        "integration_configs",
        "export_jobs",
        "products",
        "event_ids",
    ] {
        after.push(indexes(&db, c).await);
    }
    assert_eq!(before, after);
}

#[tokio::test]
async fn indexes_already_there_count_by_key_order_and_options() {
    use mongodb::options::IndexOptions;
    use mongodb::IndexModel;
    let create = |db: &TestDb, coll: &'static str, keys: Document, name: &str, unique: bool| {
        let model = IndexModel::builder()
            .keys(keys)
            .options(
                IndexOptions::builder()
                    .name(name.to_string())
                    .unique(unique.then_some(true))
                    .build(),
            )
            .build();
        let coll = db.store.collection(coll);
        async move { coll.create_index(model).await.unwrap() }
    };
    // The same fields in the other order serve other queries: ours is created beside it.
    // The same keys written as doubles (older shells), under another name, are ours.
    let db = TestDb::new().await;
    create(
        &db,
        "sessions",
        doc! { "startTime": 1, "userId": 1 },
        "mine",
        false,
    )
    .await;
    create(
        &db,
        "sessions",
        doc! { "status": 1.0, "startTime": 1.0 },
        "legacy",
        false,
    )
    .await;
    let report = db.store.init().await.unwrap();
    let outcome = |name: &str| {
        report
            .indexes
            .iter()
            .find(|(c, n, _)| c == "sessions" && n == name)
            .map(|(_, _, o)| o.clone())
            .unwrap()
    };
    assert_eq!(outcome("userId_startTime"), IndexOutcome::Created);
    assert_eq!(
        outcome("status_startTime"),
        IndexOutcome::Exists("legacy".into())
    );
    // Our keys under another name with other options: the server would refuse ours, and
    // init says which index is in the way.
    let db = TestDb::new().await;
    create(&db, "users", doc! { "visitorId": 1 }, "by_visitor", false).await;
    let err = db.store.init().await.unwrap_err().to_string();
    assert!(
        err.contains("`by_visitor`") && err.contains("`users`"),
        "{err}"
    );
}

#[tokio::test]
async fn events_made_as_the_design_document_suggests_are_used_with_a_warning() {
    let db = TestDb::new().await;
    db.store
        .db()
        .create_collection("events")
        .timeseries(
            mongodb::options::TimeseriesOptions::builder()
                .time_field("timestamp".to_string())
                .meta_field(Some("metadata".to_string()))
                .build(),
        )
        .await
        .unwrap();
    let report = db.store.init().await.unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("metaField `metadata`")),
        "{:?}",
        report.warnings
    );
    // Sluice's own collection draws no such warning.
    let db = TestDb::initialized().await;
    let again = db.store.init().await.unwrap();
    assert!(
        !again.warnings.iter().any(|w| w.contains("metaField")),
        "{:?}",
        again.warnings
    );
}

fn event(id: &str, user: &str, session: &str, t: EventType, ms: i64) -> Event {
    let now = DateTime::now();
    Event {
        id: None,
        event_id: id.into(),
        user_id: user.into(),
        session_id: session.into(),
        event_type: t,
        timestamp: DateTime::from_millis(ms),
        properties: if t == EventType::Purchase {
            doc! { "amount": 10.25, "currency": "EUR" }
        } else {
            doc! {}
        },
        metadata: EventMetadata::default(),
        page_url: Some(format!("/page/{id}")),
        referrer: None,
        duration: None,
        created_at: now,
        updated_at: now,
    }
}

/// The one document of `coll` matching `filter` (the test fails if there is none).
async fn one(db: &TestDb, coll: &str, filter: Document) -> Document {
    db.store
        .collection(coll)
        .find_one(filter)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("nothing in {coll}"))
}

async fn count(db: &TestDb, coll: &str, filter: Document) -> u64 {
    db.store
        .collection(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

/// No event, claim, session or user: a write that failed counted nothing.
async fn assert_nothing_stored(db: &TestDb) {
    for coll in ["events", "event_ids", "sessions", "users"] {
        assert_eq!(count(db, coll, doc! {}).await, 0, "{coll}");
    }
}

#[tokio::test]
async fn duplicate_event_id_is_stored_once() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let t0 = 1_700_000_000_000;
    let batch = vec![
        event("e1", "v1", "s1", EventType::PageView, t0),
        event("e2", "v1", "s1", EventType::Purchase, t0 + 1000),
        event("e1", "v1", "s1", EventType::PageView, t0), // same batch
    ];
    let status = writer.write(&batch).await.unwrap();
    assert_eq!(
        status,
        vec![
            WriteStatus::Stored,
            WriteStatus::Stored,
            WriteStatus::Duplicate
        ]
    );
    let again = writer.write(&batch).await.unwrap();
    assert_eq!(again, vec![WriteStatus::Duplicate; 3]);
    assert_eq!(count(&db, "events", doc! { "eventId": "e1" }).await, 1);
    assert_eq!(count(&db, "events", doc! {}).await, 2);

    let user = one(&db, "users", doc! { "visitorId": "v1" }).await;
    assert_eq!(user.get_i64("totalEvents").unwrap(), 2, "{user}");
    assert_eq!(user.get_i64("totalPurchases").unwrap(), 1);
    assert_eq!(user.get_f64("totalRevenue").unwrap(), 10.25);
    assert_eq!(user.get_i64("totalSessions").unwrap(), 1);
    let session = one(&db, "sessions", doc! { "sessionId": "s1" }).await;
    assert_eq!(session.get_i64("events").unwrap(), 2);
    assert_eq!(session.get_i64("duration").unwrap(), 1000);
    assert_eq!(session.get_str("status").unwrap(), "ACTIVE");
}

#[tokio::test]
async fn event_writes_wait_a_bounded_time_for_their_write_concern() {
    // Without `wtimeout`, a replica set that lost its majority would hold every event
    // write for the whole outage; with it, the write fails after a while and is answered
    // retry. This server is one node, so the wait itself cannot be shown: what the driver
    // sends is checked on the wire instead.
    let db = TestDb::initialized().await;
    let (uri, hold, held) = support::holding_mongo_proxy(b"wtimeout").await;
    let store = support::store_via(&uri, &db.name).await;
    assert_eq!(
        store.write_concern().w_timeout,
        Some(sluice_connectors::mongo::WRITE_CONCERN_TIMEOUT)
    );
    let writer = EventWriter::new(store, WriterOptions::default());
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let write = tokio::spawn(async move {
        let batch = vec![event(
            "w1",
            "v1",
            "s1",
            EventType::PageView,
            1_700_000_000_000,
        )];
        writer.write(&batch).await
    });
    let seen = held.clone();
    support::wait_until("an event write carrying wtimeout", || {
        let seen = seen.clone();
        async move { seen.load(std::sync::atomic::Ordering::SeqCst) > 0 }
    })
    .await;
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(write.await.unwrap().unwrap(), vec![WriteStatus::Stored]);
    assert_eq!(
        one(&db, "users", doc! { "visitorId": "v1" })
            .await
            .get_i64("totalEvents")
            .unwrap(),
        1
    );
    // So do writes that name no write concern (run records, checkpoints); through a
    // proxy of their own, which nothing of the event writer's reaches.
    let (uri, hold, held) = support::holding_mongo_proxy(b"wtimeout").await;
    let store = support::store_via(&uri, &db.name).await;
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let write = tokio::spawn(async move {
        store
            .collection("export_jobs")
            .insert_one(doc! { "jobId": "a-plain-write" })
            .await
    });
    support::wait_until("a plain insert carrying wtimeout", || {
        let seen = held.clone();
        async move { seen.load(std::sync::atomic::Ordering::SeqCst) > 0 }
    })
    .await;
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    write.await.unwrap().unwrap();
    // A wait the URI sets is kept.
    let sep = if uri.contains('?') { '&' } else { '?' };
    let store = support::store_via(&format!("{uri}{sep}wtimeoutMS=2500"), &db.name).await;
    assert_eq!(
        store.write_concern().w_timeout,
        Some(std::time::Duration::from_millis(2500))
    );
}

#[tokio::test]
async fn a_read_preference_in_the_uri_does_not_stop_writes() {
    // A URI asking for secondaries (as a deployment may, for its analytics): the writer's
    // transaction must still read from the primary, which is all a transaction may use.
    let db = TestDb::initialized().await;
    let uri = support::mongo_uri();
    let sep = if uri.contains('?') { '&' } else { '?' };
    let store = support::store_via(
        &format!("{uri}{sep}readPreference=secondaryPreferred"),
        &db.name,
    )
    .await;
    let writer = EventWriter::new(store, WriterOptions::default());
    let t0 = 1_700_000_000_000;
    let batch = vec![
        event("r1", "v1", "s1", EventType::PageView, t0),
        event("r2", "v1", "s1", EventType::Purchase, t0 + 1000),
    ];
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![WriteStatus::Stored; 2]
    );
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![WriteStatus::Duplicate; 2]
    );
    assert_eq!(count(&db, "events", doc! {}).await, 2);
}

/// An event writer whose `insert` of events (the command's first element: "insert":
/// "events") goes through [`support::severing_mongo_proxy`], without retryable writes;
/// with the proxy's flags.
async fn writer_severing_events_insert(
    db: &TestDb,
) -> (
    EventWriter,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let (uri, armed, severed, deliver) =
        support::severing_mongo_proxy(b"insert\x00\x07\x00\x00\x00events\x00").await;
    // One attempt per insert: the driver's own retry of a severed insert, delivered
    // later too, is deduplicated by MongoDB (same transaction number) but not by every
    // compatible server, and the tests need the one insert in flight.
    let sep = if uri.contains('?') { '&' } else { '?' };
    let uri = format!("{uri}{sep}retryWrites=false");
    let writer = EventWriter::new(
        support::store_via(&uri, &db.name).await,
        WriterOptions::default(),
    );
    (writer, armed, severed, deliver)
}

#[tokio::test]
async fn an_insert_whose_connection_broke_keeps_its_claims_for_their_lease() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (writer, armed, severed, deliver) = writer_severing_events_insert(&db).await;
    let elsewhere = EventWriter::new(db.store.clone(), WriterOptions::default());
    let batch = vec![event(
        "k1",
        "v1",
        "s1",
        EventType::PageView,
        1_700_000_000_000,
    )];
    // The claims commit; the events' insert loses its connection, unanswered.
    armed.store(true, Ordering::SeqCst);
    assert!(writer.write(&batch).await.is_err());
    assert!(severed.load(Ordering::SeqCst) >= 1);
    armed.store(false, Ordering::SeqCst);
    // A resend at once (to another replica) must not take the claim over and insert the
    // event while the first insert may still land.
    // It is held until the claim's lease ends.
    let held = elsewhere.write(&batch).await.unwrap();
    assert!(
        matches!(held[..], [WriteStatus::Held { seconds }] if (1..=30).contains(&seconds)),
        "{held:?}"
    );
    // It lands.
    deliver.store(true, Ordering::SeqCst);
    support::wait_until("the held insert lands", || async {
        count(&db, "events", doc! { "eventId": "k1" }).await > 0
    })
    .await;
    // A resend now finds the event stored: a duplicate, and still one copy.
    assert_eq!(
        elsewhere.write(&batch).await.unwrap(),
        vec![WriteStatus::Duplicate]
    );
    assert_eq!(count(&db, "events", doc! { "eventId": "k1" }).await, 1);
    let user = one(&db, "users", doc! { "visitorId": "v1" }).await;
    assert_eq!(user.get_i64("totalEvents").unwrap(), 1, "{user}");
}

#[tokio::test]
async fn a_claim_taken_over_stores_its_event_as_it_was_counted() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (crashing, armed, _, _) = writer_severing_events_insert(&db).await;
    // The writer that completes abandoned claims: a short lease, so the test need not
    // wait out 30 s.
    let resender = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            claim_lease: std::time::Duration::from_millis(300),
            ..Default::default()
        },
    );
    let t0 = 1_700_000_000_000;
    let counted = event("c1", "v1", "s1", EventType::PageView, t0);
    // Claimed and counted, never inserted (the insert's connection broke, never delivered).
    armed.store(true, Ordering::SeqCst);
    assert!(crashing.write(&[counted]).await.is_err());
    // The resend's clock-skew correction gives it a slightly other time, and by now it
    // resolves to another visitor (an identify linked its anonymous id) and another gap
    // session.
    let resent = event("c1", "v2", "s2", EventType::PageView, t0 + 7);
    support::wait_until("the abandoned claim is taken over", || async {
        resender.write(std::slice::from_ref(&resent)).await.unwrap() == [WriteStatus::Stored]
    })
    .await;
    let stored = one(&db, "events", doc! { "eventId": "c1" }).await;
    assert_eq!(
        stored.get_datetime("timestamp").unwrap().timestamp_millis(),
        t0
    );
    assert_eq!(stored.get_str("userId").unwrap(), "v1", "{stored}");
    assert_eq!(stored.get_str("sessionId").unwrap(), "s1", "{stored}");
    let session = one(&db, "sessions", doc! { "sessionId": "s1" }).await;
    assert_eq!(
        session.get_datetime("endTime").unwrap().timestamp_millis(),
        t0
    );
    assert_eq!(session.get_i64("events").unwrap(), 1);
    let user = one(&db, "users", doc! { "visitorId": "v1" }).await;
    assert_eq!(user.get_i64("totalEvents").unwrap(), 1, "{user}");
    for (coll, filter) in [
        ("sessions", doc! { "sessionId": "s2" }),
        ("users", doc! { "visitorId": "v2" }),
    ] {
        assert_eq!(count(&db, coll, filter).await, 0, "{coll}");
    }
}

#[tokio::test]
async fn an_event_without_a_session_joins_one_its_batch_opens_as_one_stored_before() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let t0 = 1_700_000_000_000;
    // A visitor's app names its session; a server-side event a minute later names none.
    let named = |id: &str, visitor: &str| {
        let session = format!("app-{visitor}");
        event(id, visitor, &session, EventType::PageView, t0)
    };
    let unnamed = |id: &str, visitor: &str| event(id, visitor, "", EventType::Click, t0 + 60_000);
    // In one batch, and (another visitor) in two: the same session either way.
    writer
        .write(&[named("a1", "va"), unnamed("a2", "va")])
        .await
        .unwrap();
    writer.write(&[named("b1", "vb")]).await.unwrap();
    writer.write(&[unnamed("b2", "vb")]).await.unwrap();
    for (id, session) in [("a2", "app-va"), ("b2", "app-vb")] {
        let e = one(&db, "events", doc! { "eventId": id }).await;
        assert_eq!(e.get_str("sessionId").unwrap(), session, "{id}: {e}");
    }
}

#[tokio::test]
async fn an_event_the_server_could_not_store_fails_its_write_before_anything_is_counted() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let t0 = 1_700_000_000_000;
    // What the endpoint refuses, but an import or a transform could still hand over.
    let mut bad = event("bad", "v1", "s1", EventType::Click, t0 + 1);
    bad.properties = doc! { "a\u{0}b": 1 };
    let batch = vec![event("good", "v1", "s1", EventType::PageView, t0), bad];
    let err = writer.write(&batch).await.unwrap_err().to_string();
    assert!(err.contains("`bad`"), "{err}");
    assert_nothing_stored(&db).await;
    // The good event alone is written, as a whole document.
    assert_eq!(
        writer.write(&batch[..1]).await.unwrap(),
        vec![WriteStatus::Stored]
    );
    let stored = one(&db, "events", doc! { "eventId": "good" }).await;
    assert_eq!(stored.get_str("userId").unwrap(), "v1");
    assert_eq!(
        stored.get_datetime("timestamp").unwrap().timestamp_millis(),
        t0
    );
    assert!(stored.get_object_id("_id").is_ok());
}

#[tokio::test]
async fn an_event_over_the_time_series_limit_fails_its_write_before_anything_is_counted() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    // 4.5 MB: MongoDB refuses a time-series measurement over 4 MB (the test server takes
    // it), and would do so only at the insert, after the aggregates had counted it.
    let mut big = event("big", "v1", "s1", EventType::Click, 1_700_000_000_000);
    big.properties = doc! { "blob": "b".repeat(4_500_000) };
    let err = writer.write(&[big]).await.unwrap_err().to_string();
    assert!(err.contains("`big`") && err.contains("4000000"), "{err}");
    assert_nothing_stored(&db).await;
}

#[tokio::test]
async fn session_updates_past_one_command_s_size_go_in_several_within_the_write() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let t0 = 1_700_000_000_000;
    // 1,100 sessions with 4 KiB entry and exit pages: their update statements (whole
    // sessions) pass the 8 MiB a command carries, so the write sends two. (MongoDB
    // refuses a command over 16 MiB; the test server does not, so this shows the split
    // commands write every session right, and the split itself is unit-tested.)
    let page = |i: usize, n: usize| format!("/p/{i}/{n}/{}", "x".repeat(4000));
    let batch = |n: usize| -> Vec<Event> {
        (0..1100)
            .map(|i| {
                let mut e = event(
                    &format!("e{i}-{n}"),
                    &format!("v{i}"),
                    &format!("s{i}"),
                    EventType::PageView,
                    t0 + n as i64 * 1000,
                );
                e.page_url = Some(page(i, n));
                e
            })
            .collect()
    };
    // Stored first (sessions inserted), then updated, in one write of 1,100 statements.
    for n in 0..2 {
        let status = writer.write(&batch(n)).await.unwrap();
        assert!(status.iter().all(|s| *s == WriteStatus::Stored));
    }
    assert_eq!(count(&db, "events", doc! {}).await, 2200);
    for i in [0, 549, 1099] {
        let session = one(&db, "sessions", doc! { "sessionId": format!("s{i}") }).await;
        assert_eq!(session.get_i64("events").unwrap(), 2, "{i}");
        assert_eq!(session.get_str("entryPage").unwrap(), page(i, 0));
        assert_eq!(session.get_str("exitPage").unwrap(), page(i, 1));
    }
}

#[tokio::test]
async fn abandoned_claim_is_completed_without_counting_twice() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            // Long enough that every write inserts (it must commit within half of it),
            // however loaded the machine; the claim's lapse is simulated below.
            claim_lease: std::time::Duration::from_secs(30),
            ..Default::default()
        },
    );
    let batch = vec![
        event("a1", "v9", "s9", EventType::PageView, 1_700_000_000_000),
        event("a2", "v9", "s9", EventType::Click, 1_700_000_001_000),
    ];
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![WriteStatus::Stored, WriteStatus::Stored]
    );
    // Simulate a crash after the claim transaction and before the events insert.
    db.store
        .collection("events")
        .delete_many(doc! { "eventId": "a2" })
        .await
        .unwrap();

    // A resend inside the lease is told to retry: the claim may still be in flight. (A
    // crash before the insert leaves the claim without its note that the event is
    // stored.)
    let fresh_claim = doc! { "_id": "a2" };
    db.store
        .collection("event_ids")
        .update_one(
            fresh_claim,
            doc! { "$set": { "at": DateTime::now() }, "$unset": { "stored": "" } },
        )
        .await
        .unwrap();
    let status = writer.write(&batch).await.unwrap();
    // A claim that young is most likely its write landing now: back in a second.
    assert_eq!(
        status,
        vec![WriteStatus::Duplicate, WriteStatus::Held { seconds: 1 }]
    );
    // Ten seconds old, its write may have died: held for what is left of the lease (30 s),
    // after which it can be taken over.
    db.store
        .collection("event_ids")
        .update_one(
            doc! { "_id": "a2" },
            doc! { "$set": { "at": DateTime::from_millis(DateTime::now().timestamp_millis() - 10_000) } },
        )
        .await
        .unwrap();
    let status = writer.write(&batch).await.unwrap();
    assert!(
        matches!(status[..], [WriteStatus::Duplicate, WriteStatus::Held { seconds }] if (19..=20).contains(&seconds)),
        "{status:?}"
    );

    // Once the claim's lease has lapsed, the resend takes it over and stores the event.
    db.store
        .collection("event_ids")
        .update_one(
            doc! { "_id": "a2" },
            doc! { "$set": { "at": DateTime::from_millis(DateTime::now().timestamp_millis() - 31_000) } },
        )
        .await
        .unwrap();
    let status = writer.write(&batch).await.unwrap();
    assert_eq!(status, vec![WriteStatus::Duplicate, WriteStatus::Stored]);
    assert_eq!(count(&db, "events", doc! { "eventId": "a2" }).await, 1);
    let user = one(&db, "users", doc! { "visitorId": "v9" }).await;
    assert_eq!(
        user.get_i64("totalEvents").unwrap(),
        2,
        "aggregates must not be applied twice"
    );
}

/// A stored event's claim says so: a resend is answered `duplicate` from the ledger,
/// without looking the event up in `events` (a time-series collection, where that lookup
/// reads far more than the event's bucket: resends then went unanswered under load). A
/// claim of an earlier version, without the note, is looked up once and then noted.
#[tokio::test]
async fn a_resend_of_stored_events_is_answered_from_the_ledger() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let batch = vec![
        event("r1", "v5", "s5", EventType::PageView, 1_700_000_000_000),
        event("r2", "v5", "s5", EventType::Click, 1_700_000_001_000),
    ];
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![WriteStatus::Stored, WriteStatus::Stored]
    );
    let noted = || async {
        let mut ids: Vec<String> = db
            .store
            .collection("event_ids")
            .find(doc! { "stored": true })
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .map(|d| d.get_str("_id").unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(noted().await, ["r1", "r2"]);
    // The events removed from `events` by hand: the claims alone answer the resend (a
    // lookup would have found them missing, and the young claims told it to retry).
    db.store
        .collection("events")
        .delete_many(doc! {})
        .await
        .unwrap();
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![WriteStatus::Duplicate, WriteStatus::Duplicate]
    );
    assert_eq!(
        count(&db, "events", doc! {}).await,
        0,
        "nothing inserted again"
    );

    // A claim without the note (an earlier version's) whose event is stored: found by a
    // lookup, answered duplicate, and noted for the next resend.
    let again = vec![event("r3", "v5", "s5", EventType::Click, 1_700_000_002_000)];
    writer.write(&again).await.unwrap();
    db.store
        .collection("event_ids")
        .update_one(doc! { "_id": "r3" }, doc! { "$unset": { "stored": "" } })
        .await
        .unwrap();
    assert_eq!(noted().await, ["r1", "r2"]);
    assert_eq!(
        writer.write(&again).await.unwrap(),
        vec![WriteStatus::Duplicate]
    );
    assert_eq!(noted().await, ["r1", "r2", "r3"]);
    assert_eq!(count(&db, "events", doc! { "eventId": "r3" }).await, 1);

    // A claim an earlier version took over: no note, its event stored at the resend's
    // time, ten minutes from the claim's, and the claim past its lease. Looked up near
    // the claim's time only, the event would seem missing and be stored a second time.
    let moved = vec![event("r4", "v5", "s5", EventType::Click, 1_700_000_003_000)];
    writer.write(&moved).await.unwrap();
    db.store
        .collection("event_ids")
        .update_one(
            doc! { "_id": "r4" },
            doc! {
                "$unset": { "stored": "" },
                "$set": {
                    "ts": DateTime::from_millis(1_700_000_003_000 - 600_000),
                    "at": DateTime::from_millis(DateTime::now().timestamp_millis() - 31_000),
                },
            },
        )
        .await
        .unwrap();
    assert_eq!(
        writer.write(&moved).await.unwrap(),
        vec![WriteStatus::Duplicate]
    );
    assert_eq!(count(&db, "events", doc! { "eventId": "r4" }).await, 1);
    let user = one(&db, "users", doc! { "visitorId": "v5" }).await;
    assert_eq!(user.get_i64("totalEvents").unwrap(), 4);
}

#[tokio::test]
async fn claims_too_old_to_insert_safely_are_handed_back_not_inserted() {
    let db = TestDb::initialized().await;
    // A lease so short that every claim is past half of it by the time it commits, as
    // after a long failover: a resend elsewhere could take the claims over, so this
    // writer inserts nothing and answers Retry.
    let slow = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            claim_lease: std::time::Duration::from_micros(1),
            ..Default::default()
        },
    );
    // The third is a copy of the first (a resend coalesced with its original): it must be
    // sent again too, not acknowledged as a duplicate of an event that was not stored.
    let batch = vec![
        event("s1", "v7", "s7", EventType::PageView, 1_700_000_000_000),
        event("s2", "v7", "s7", EventType::Click, 1_700_000_001_000),
        event("s1", "v7", "s7", EventType::PageView, 1_700_000_000_000),
    ];
    assert_eq!(
        slow.write(&batch).await.unwrap(),
        vec![WriteStatus::Retry; 3]
    );
    assert_eq!(count(&db, "events", doc! {}).await, 0);
    // The resend completes them at once (the claims were handed back) and counts them once.
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    assert_eq!(
        writer.write(&batch).await.unwrap(),
        vec![
            WriteStatus::Stored,
            WriteStatus::Stored,
            WriteStatus::Duplicate
        ]
    );
    assert_eq!(count(&db, "events", doc! {}).await, 2);
    let user = one(&db, "users", doc! { "visitorId": "v7" }).await;
    assert_eq!(user.get_i64("totalEvents").unwrap(), 2);
}

#[tokio::test]
async fn idle_sessions_expire() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let old = DateTime::now().timestamp_millis() - 3_600_000;
    let recent = DateTime::now().timestamp_millis() - 1000;
    writer
        .write(&[
            event("x1", "u1", "old", EventType::PageView, old),
            event("x2", "u2", "new", EventType::PageView, recent),
            // Started before the cutoff, still active: must stay ACTIVE.
            event("x3", "u3", "long", EventType::PageView, old),
            event("x4", "u3", "long", EventType::PageView, recent),
        ])
        .await
        .unwrap();
    let n = sluice_connectors::mongo::expire_idle_sessions(
        &db.store,
        std::time::Duration::from_secs(1800),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        count(
            &db,
            "sessions",
            doc! { "status": "EXPIRED", "sessionId": "old" }
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "sessions",
            doc! { "status": "ACTIVE", "sessionId": { "$in": ["new", "long"] } }
        )
        .await,
        2
    );
}

#[tokio::test]
async fn the_ledger_index_covers_only_archived_claims_and_replaces_the_old_ts_index() {
    use mongodb::options::IndexOptions;
    use mongodb::IndexModel;
    let db = TestDb::new().await;
    let ledger = db.store.collection("event_ids");
    // What earlier versions created: every claim paid a write to it.
    let named = |keys: Document, name: &str| {
        IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_string()).build())
            .build()
    };
    ledger
        .create_index(named(doc! { "ts": 1 }, "ts"))
        .await
        .unwrap();
    let first = db.store.init().await.unwrap();
    assert_eq!(
        first
            .dropped_indexes
            .iter()
            .map(|(c, n, _)| (c.as_str(), n.as_str()))
            .collect::<Vec<_>>(),
        vec![("event_ids", "ts")]
    );
    let list = indexes(&db, "event_ids").await;
    assert!(
        !list.iter().any(|d| d.get_str("name") == Ok("ts")),
        "{list:?}"
    );
    let ours = find_by_key(&list, &doc! { "archived": 1, "ts": 1 })
        .unwrap_or_else(|| panic!("no archived_ts index: {list:?}"));
    assert_eq!(
        ours.get_document("partialFilterExpression").unwrap(),
        &doc! { "archived": true },
        "{ours}"
    );
    // Read back as the server stores it, the partial index counts as ours: nothing more
    // to do the second time.
    let second = db.store.init().await.unwrap();
    assert!(second.dropped_indexes.is_empty());
    assert_eq!(second.created_indexes(), 0, "{:?}", second.indexes);

    // An index someone else named `ts`, on other keys, is theirs: kept.
    let db = TestDb::new().await;
    db.store
        .collection("event_ids")
        .create_index(named(doc! { "at": 1 }, "ts"))
        .await
        .unwrap();
    let report = db.store.init().await.unwrap();
    assert!(report.dropped_indexes.is_empty());
    let list = indexes(&db, "event_ids").await;
    assert!(
        list.iter().any(|d| d.get_str("name") == Ok("ts")),
        "{list:?}"
    );
}

mod check {
    use super::*;
    use sluice_connectors::mongo::check::{self, CheckOptions, CheckReport};
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    fn options(batch: usize, settle: Duration) -> CheckOptions {
        CheckOptions {
            batch,
            settle,
            ..CheckOptions::default()
        }
    }

    async fn run(db: &TestDb, options: &CheckOptions) -> CheckReport {
        check::check(&db.store, options, |_, _| {}).await.unwrap()
    }

    /// Twelve sessions of three visitors, with purchases and a session whose visitor
    /// logs in part-way, written through the event writer.
    async fn traffic(db: &TestDb) -> Vec<Event> {
        let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
        let mut events = Vec::new();
        for s in 0..12 {
            let visitor = format!("v{}", s % 3);
            let session = format!("s{s:02}");
            for i in 0..5 {
                let kind = match i {
                    4 => EventType::Purchase,
                    1 => EventType::Click,
                    _ => EventType::PageView,
                };
                let mut e = event(
                    &format!("e{s:02}-{i}"),
                    &visitor,
                    &session,
                    kind,
                    T0 + s * 3_600_000 + i * 1_000,
                );
                if s == 7 && i >= 3 {
                    e.user_id = "known-7".into();
                }
                events.push(e);
            }
        }
        // Out of order, in several writes.
        events.reverse();
        for chunk in events.chunks(17) {
            let status = writer.write(chunk).await.unwrap();
            assert!(status.iter().all(|s| *s == WriteStatus::Stored));
        }
        events
    }

    async fn age_claims(db: &TestDb) {
        db.store
            .collection("event_ids")
            .update_many(
                doc! {},
                doc! { "$set": { "at": DateTime::from_millis(T0) } },
            )
            .await
            .unwrap();
    }

    fn fields(found: &[check::Mismatch], id: &str) -> Vec<&'static str> {
        found
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("{id} not reported in {found:?}"))
            .differences
            .iter()
            .map(|d| d.field)
            .collect()
    }

    #[tokio::test]
    async fn a_session_another_writer_stored_in_its_own_shapes_is_read_as_the_tracker_reads_it() {
        let db = TestDb::initialized().await;
        traffic(&db).await;
        age_claims(&db).await;
        // Counts as text and doubles, a time as text, no createdAt, a status of its own:
        // the same session to the tracker, so no difference.
        let sessions = db.store.collection("sessions");
        let stored = sessions
            .find_one(doc! { "sessionId": "s03" })
            .await
            .unwrap()
            .unwrap();
        let start = stored
            .get_datetime("startTime")
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap();
        sessions
            .update_one(
                doc! { "sessionId": "s03" },
                doc! {
                    "$set": { "events": "5", "pageViews": 3.0, "startTime": start, "status": "CLOSED" },
                    "$unset": { "createdAt": "" },
                },
            )
            .await
            .unwrap();
        let report = run(&db, &options(100, Duration::ZERO)).await;
        assert!(report.consistent(), "{report:?}");
        // One whose count is no number is unreadable to both, and said so.
        sessions
            .update_one(
                doc! { "sessionId": "s03" },
                doc! { "$set": { "events": "many" } },
            )
            .await
            .unwrap();
        let report = run(&db, &options(100, Duration::ZERO)).await;
        assert_eq!(fields(&report.sessions_differ, "s03"), ["document"]);
    }

    #[tokio::test]
    async fn finds_what_storage_lost_or_changed_and_nothing_else() {
        let db = TestDb::initialized().await;
        let events = traffic(&db).await;
        age_claims(&db).await;
        // Ranges of 5 documents: the passes go over several ranges.
        let opts = options(5, Duration::ZERO);
        let clean = run(&db, &opts).await;
        assert!(clean.consistent(), "{clean:?}");
        assert_eq!(
            (clean.sessions, clean.visitors, clean.events, clean.claims),
            (12, 4, 60, 60)
        );
        assert!(clean.in_doubt.is_empty());

        let events_coll = db.store.collection("events");
        // 1. An event whose insert was lost after its claim counted it.
        events_coll
            .delete_many(doc! { "eventId": "e03-2" })
            .await
            .unwrap();
        // 2. A hand edit of a session.
        db.store
            .collection("sessions")
            .update_one(
                doc! { "sessionId": "s05" },
                doc! { "$set": { "exitPage": "/elsewhere" } },
            )
            .await
            .unwrap();
        // 3. A profile lost.
        db.store
            .collection("users")
            .delete_one(doc! { "visitorId": "known-7" })
            .await
            .unwrap();
        // 4. A revenue total off by one cent.
        db.store
            .collection("users")
            .update_one(
                doc! { "visitorId": "v2" },
                doc! { "$inc": { "totalRevenueMicros": 10_000_i64 } },
            )
            .await
            .unwrap();
        // 5. An event stored without its claim or aggregates, in a session of its own.
        let mut stray = events[0].clone();
        stray.event_id = "stray".into();
        stray.session_id = "s99".into();
        stray.user_id = "v1".into();
        events_coll
            .insert_one(bson::to_document(&stray).unwrap())
            .await
            .unwrap();

        let found = run(&db, &opts).await;
        assert!(!found.consistent());
        let doubt: Vec<&str> = found.in_doubt.iter().map(|c| c.event_id.as_str()).collect();
        assert_eq!(doubt, ["e03-2"]);
        assert_eq!(found.in_doubt[0].session_id.as_deref(), Some("s03"));
        assert_eq!(found.in_doubt[0].user_id.as_deref(), Some("v0"));
        // The lost insert explains its session and visitor: neither is listed.
        assert_eq!((found.explained_sessions, found.explained_visitors), (1, 1));
        let sessions: Vec<&str> = found
            .sessions_differ
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(sessions, ["s05", "s99"]);
        assert_eq!(fields(&found.sessions_differ, "s05"), ["exitPage"]);
        let s05 = &found.sessions_differ[0].differences[0];
        assert_eq!(s05.stored, "\"/elsewhere\"");
        assert_eq!(s05.recomputed, "\"/page/e05-4\"");
        assert_eq!(fields(&found.sessions_differ, "s99"), ["document"]);
        let visitors: Vec<&str> = found
            .visitors_differ
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(visitors, ["known-7", "v1", "v2"]);
        assert_eq!(fields(&found.visitors_differ, "known-7"), ["document"]);
        // v1 owns the stray event (a purchase, later than its others) without counting
        // it; its session has no document, so v1 owns no more sessions than it counts.
        assert_eq!(
            fields(&found.visitors_differ, "v1"),
            ["totalEvents", "totalPurchases", "totalRevenue", "lastSeen"]
        );
        assert_eq!(fields(&found.visitors_differ, "v2"), ["totalRevenue"]);
        assert_eq!(found.visitors_differ[2].differences[0].stored, "41.01");
        assert_eq!(found.visitors_differ[2].differences[0].recomputed, "41");
    }

    #[tokio::test]
    async fn looks_again_before_reporting_and_skips_what_was_archived() {
        let db = TestDb::initialized().await;
        traffic(&db).await;
        age_claims(&db).await;
        let sessions = db.store.collection("sessions");
        // Aggregates ahead of `events` for a moment, as while a batch is being written,
        // and for good.
        for sid in ["s01", "s02"] {
            sessions
                .update_one(doc! { "sessionId": sid }, doc! { "$inc": { "events": 1 } })
                .await
                .unwrap();
        }
        let healing = {
            let sessions = sessions.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                sessions
                    .update_one(
                        doc! { "sessionId": "s01" },
                        doc! { "$inc": { "events": -1 } },
                    )
                    .await
                    .unwrap();
            })
        };
        // An insert lost a moment ago: its claim is younger than the lease when the
        // ledger is read, and told apart after the settle.
        db.store
            .collection("events")
            .delete_many(doc! { "eventId": "e09-1" })
            .await
            .unwrap();
        db.store
            .collection("event_ids")
            .update_one(
                doc! { "_id": "e09-1" },
                doc! { "$set": { "at": DateTime::now() } },
            )
            .await
            .unwrap();
        let mut settling = Vec::new();
        let found = check::check(
            &db.store,
            &options(1_000, Duration::from_secs(2)),
            |stage, n| {
                if stage == check::Stage::Settling {
                    settling.push(n);
                }
            },
        )
        .await
        .unwrap();
        healing.await.unwrap();
        // Looked at again: s01 and s02, which the first look found ahead of `events` (the
        // heal comes after it), and s09 and v0, which miss the lost event.
        assert_eq!(settling, [4], "{found:?}");
        let ids: Vec<&str> = found
            .sessions_differ
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        assert_eq!(ids, ["s02"], "the write that ended is not reported");
        assert_eq!(found.sessions_differ[0].differences[0].stored, "6");
        let doubt: Vec<&str> = found.in_doubt.iter().map(|c| c.event_id.as_str()).collect();
        assert_eq!(doubt, ["e09-1"], "the young claim is in doubt once settled");
        assert!(found.visitors_differ.is_empty(), "{found:?}");
        assert_eq!((found.explained_sessions, found.explained_visitors), (1, 1));

        // With every event before the 4th session archived, sessions s00..s03 and the
        // visitors seen then are skipped, whatever their documents say.
        let archived = CheckOptions {
            archived_before: Some(DateTime::from_millis(T0 + 3 * 3_600_000 + 500)),
            ..options(1_000, Duration::ZERO)
        };
        let found = run(&db, &archived).await;
        assert_eq!(found.archived_sessions, 4);
        assert_eq!(found.sessions, 8);
        assert_eq!((found.archived_visitors, found.visitors), (3, 1));
        assert!(found.consistent(), "{found:?}");
    }
}

/// A letter kept again (the same record failed by the same plugin, in a later run) is
/// not stored twice, and says the latest reason, keeping the first run's id.
#[tokio::test]
async fn a_dead_letter_kept_again_says_the_latest_reason() {
    use sluice_core::transform::DeadLetter;
    let db = TestDb::initialized().await;
    let letter = |reason: &str| DeadLetter {
        transform: "hostile".into(),
        reason: reason.into(),
        record: doc! { "sku": "s1", "price": 3 },
    };
    let keep = |reason: &str, run: &'static str| {
        db.store
            .keep_dead_letters(vec![letter(reason)], "import:shop", Some(run))
    };
    assert_eq!(keep("trapped: panicked", "run-1").await.unwrap(), 1);
    let again = keep("malformed output: not JSON", "run-2").await.unwrap();
    assert_eq!(again, 0, "kept once");
    let letters = db.store.collection("dead_letters");
    assert_eq!(letters.count_documents(doc! {}).await.unwrap(), 1);
    let l = letters.find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(l.get_str("reason").unwrap(), "malformed output: not JSON");
    assert_eq!(l.get_str("runId").unwrap(), "run-1");
    assert_eq!(l.get_str("lastRunId").unwrap(), "run-2");
    assert!(l.get_datetime("lastSeenAt").is_ok());
}

/// A write concern the deployment cannot meet (`w: 2` on one node) is said in the
/// server's words, without the driver's dump of the raw reply.
#[tokio::test]
async fn a_write_concern_error_is_said_in_the_server_s_words() {
    let db = TestDb::initialized().await;
    let store = sluice_connectors::Store::connect_uri(
        &support::mongo_uri(),
        &db.name,
        &sluice_core::config::WriteConcernLevel::Nodes(2),
    )
    .await
    .unwrap();
    // Refused for its write concern, the insert is still applied on the primary: the
    // session is there for the sweep to match.
    store
        .collection("sessions")
        .insert_one(
            doc! { "sessionId": "wc", "status": "ACTIVE", "startTime": DateTime::from_millis(0), "endTime": DateTime::from_millis(0) },
        )
        .await
        .ok();
    let err =
        sluice_connectors::mongo::expire_idle_sessions(&store, std::time::Duration::from_secs(60))
            .await
            .expect_err("no second node acknowledges the write");
    // As the command line says it: the error with its whole chain of causes.
    let err = format!("{:#}", anyhow::Error::from(err));
    assert!(err.contains("write concern not satisfied"), "{err}");
    assert!(
        !err.contains("RawDocument") && !err.contains("Kind:"),
        "{err}"
    );
}

#[tokio::test]
async fn an_index_of_sluice_s_name_with_other_keys_is_reported_with_the_way_out() {
    let db = TestDb::new().await;
    // Another application's index, under the name Sluice gives its own.
    db.store
        .db()
        .run_command(doc! {
            "createIndexes": "products",
            "indexes": [{ "key": { "sku": 1 }, "name": "productId_unique" }],
        })
        .await
        .unwrap();
    let err = db.store.init().await.unwrap_err().to_string();
    assert!(
        err.starts_with("index `productId_unique` on `products` exists with other keys or options")
            && err.contains("db.products.dropIndex(\"productId_unique\")")
            && !err.contains("rename ours"),
        "{err}"
    );
    // Two in the way: one `db init` names both.
    let db = TestDb::new().await;
    for (collection, name) in [
        ("products", "productId_unique"),
        ("sessions", "sessionId_unique"),
    ] {
        db.store
            .db()
            .run_command(doc! {
                "createIndexes": collection,
                "indexes": [{ "key": { "other": 1 }, "name": name }],
            })
            .await
            .unwrap();
    }
    let err = db.store.init().await.unwrap_err().to_string();
    assert!(
        err.starts_with("2 indexes are in the way of Sluice's own:")
            && err.contains("db.products.dropIndex(\"productId_unique\")")
            && err.contains("db.sessions.dropIndex(\"sessionId_unique\")"),
        "{err}"
    );
    // Sluice's keys under another name with other options (an index another writer made,
    // not unique): said as such, not as a name Sluice needs.
    let db = TestDb::new().await;
    db.store
        .db()
        .run_command(doc! {
            "createIndexes": "sessions",
            "indexes": [{ "key": { "sessionId": 1 }, "name": "sessionId_1" }],
        })
        .await
        .unwrap();
    let err = db.store.init().await.unwrap_err().to_string();
    assert!(
        err.starts_with("index `sessionId_1` on `sessions` has the keys of Sluice's `sessionId_unique` but other options")
            && err.contains("db.sessions.dropIndex(\"sessionId_1\")")
            && !err.contains("needs that name"),
        "{err}"
    );
}
