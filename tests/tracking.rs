//! The tracking endpoint end to end: a real server on a real socket, writing to the real
//! MongoDB-compatible server.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};

use bson::{doc, Bson, Document};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use sluice::demo::Traffic;
use support::{start_server, TestDb};

async fn all(db: &TestDb, coll: &str, sort: Document) -> Vec<Document> {
    db.store
        .collection(coll)
        .find(doc! {})
        .projection(doc! { "_id": 0 })
        .sort(sort)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn replaying_a_batch_leaves_events_sessions_and_users_identical() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let mut traffic = Traffic::new(7);
    let events = traffic.visitors(30, now_ms(), 3_600_000);
    let batch = json!({ "batch": &events[..events.len().min(500)] });

    let (status, first) = post(&base, "/v1/events/batch", &batch).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["stored"].as_u64().unwrap() > 50);
    let snapshot = (
        all(&db, "events", doc! { "eventId": 1 }).await,
        all(&db, "sessions", doc! { "sessionId": 1 }).await,
        all(&db, "users", doc! { "visitorId": 1 }).await,
    );
    let (status, second) = post(&base, "/v1/events/batch", &batch).await;
    assert_eq!(status, 200);
    assert_eq!(second["stored"], 0, "{second}");
    assert_eq!(second["duplicates"], first["stored"]);
    let after = (
        all(&db, "events", doc! { "eventId": 1 }).await,
        all(&db, "sessions", doc! { "sessionId": 1 }).await,
        all(&db, "users", doc! { "visitorId": 1 }).await,
    );
    assert_eq!(
        snapshot, after,
        "a replay must change nothing, not even updatedAt"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_resent_batch_without_event_ids_is_stored_once_when_its_events_carry_timestamps() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let mut traffic = Traffic::new(11);
    let mut events = traffic.visitors(10, now_ms() - 60_000, 30_000);
    events.truncate(100);
    for e in &mut events {
        e.as_object_mut().unwrap().remove("eventId");
        assert!(e.get("timestamp").is_some());
    }
    let untimed = json!({ "userId": "u-untimed", "sessionId": "s-untimed", "eventType": "CLICK" });
    let body = |sent_at: i64, events: &[Value]| {
        let mut batch = events.to_vec();
        batch.push(untimed.clone());
        json!({ "sentAt": sent_at, "batch": batch })
    };
    let sent_at = now_ms();
    let (status, first) = post(&base, "/v1/events/batch", &body(sent_at, &events)).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["stored"], 101, "{first}");
    // The batch's `sentAt` corrected each timed event: the client's own times are kept in
    // its metadata (the untimed one, timed on arrival, has neither).
    for stored in all(&db, "events", doc! { "userId": 1 }).await {
        let metadata = stored.get_document("metadata").unwrap();
        if stored.get_str("userId").unwrap() == "u-untimed" {
            assert!(!metadata.contains_key("sentAt"), "{stored}");
            assert!(!metadata.contains_key("clientTimestamp"), "{stored}");
            continue;
        }
        let sent = events
            .iter()
            .find(|e| {
                e["userId"].as_str() == stored.get_str("userId").ok()
                    && e["timestamp"].as_i64()
                        == metadata
                            .get_datetime("clientTimestamp")
                            .ok()
                            .map(|t| t.timestamp_millis())
            })
            .map(|_| sent_at);
        assert_eq!(
            metadata
                .get_datetime("sentAt")
                .ok()
                .map(|t| t.timestamp_millis()),
            sent,
            "{stored}"
        );
    }
    let users = all(&db, "users", doc! { "visitorId": 1 }).await;
    // The client did not hear the answer and resends later, in another order.
    events.reverse();
    let (status, second) = post(&base, "/v1/events/batch", &body(now_ms() + 5_000, &events)).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["duplicates"], 100, "{second}");
    // The event without a timestamp is timed on arrival: sent twice, it happened twice.
    assert_eq!(second["stored"], 1, "{second}");
    let count = |filter: Document| {
        let events = db.store.collection("events");
        async move { events.count_documents(filter).await.unwrap() }
    };
    assert_eq!(count(doc! {}).await, 102);
    assert_eq!(count(doc! { "userId": "u-untimed" }).await, 2);
    let after: Vec<Document> = all(&db, "users", doc! { "visitorId": 1 })
        .await
        .into_iter()
        .filter(|u| u.get_str("visitorId") != Ok("u-untimed"))
        .collect();
    let before: Vec<Document> = users
        .into_iter()
        .filter(|u| u.get_str("visitorId") != Ok("u-untimed"))
        .collect();
    assert_eq!(before, after, "the resend changed no visitor's totals");
    server.shutdown().await;
}

fn millis(d: &Document, k: &str) -> i64 {
    d.get_datetime(k).unwrap().timestamp_millis()
}

fn int(d: &Document, k: &str) -> i64 {
    match d.get(k) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        other => panic!("{k} is {other:?} in {d}"),
    }
}

fn text(d: &Document, k: &str) -> Option<String> {
    d.get_str(k).ok().map(str::to_string)
}

#[tokio::test]
async fn aggregates_equal_a_recomputation_after_ten_thousand_shuffled_events() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let mut traffic = Traffic::new(42);
    let mut events = Vec::new();
    while events.len() < 10_000 {
        events.extend(traffic.visitors(100, now_ms(), 24 * 3_600_000));
    }
    events.truncate(10_000);
    // A tenth of the sessions change visitor part-way (an anonymous visitor logs in): the
    // session stays its earliest event's visitor's, whatever the arrival order.
    let mut position: HashMap<String, usize> = HashMap::new();
    for e in events.iter_mut() {
        let sid = e["sessionId"].as_str().unwrap().to_string();
        let n = position.entry(sid.clone()).or_default();
        *n += 1;
        if *n > 2 && sid.bytes().map(usize::from).sum::<usize>() % 10 == 0 {
            let known = format!("known-{}", e["userId"].as_str().unwrap());
            e["userId"] = json!(known);
        }
    }
    // Duplicates: 10% of the events are delivered twice, in other batches.
    let dups: Vec<Value> = events.iter().step_by(10).cloned().collect();
    events.extend(dups);
    traffic.shuffle(&mut events);

    let chunks: Vec<Vec<Value>> = events.chunks(500).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for group in chunks.chunks(chunks.len().div_ceil(4)) {
        let group = group.to_vec();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0;
            for chunk in group {
                let (status, body) =
                    post(&base, "/v1/events/batch", &json!({ "batch": chunk })).await;
                assert_eq!(status, 200, "{body}");
                stored += body["stored"].as_u64().unwrap();
            }
            stored
        }));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await.unwrap();
    }
    assert_eq!(stored, 10_000, "each distinct event stored exactly once");
    server.shutdown().await;

    let stored_events = all(&db, "events", doc! { "eventId": 1 }).await;
    assert_eq!(stored_events.len(), 10_000);
    let distinct: HashSet<String> = stored_events
        .iter()
        .map(|e| text(e, "eventId").unwrap())
        .collect();
    assert_eq!(distinct.len(), 10_000);

    // Recompute every session from the stored events, independently of the writer.
    let mut by_session: BTreeMap<String, Vec<&Document>> = BTreeMap::new();
    for e in &stored_events {
        by_session
            .entry(text(e, "sessionId").unwrap())
            .or_default()
            .push(e);
    }
    let sessions = all(&db, "sessions", doc! { "sessionId": 1 }).await;
    assert_eq!(sessions.len(), by_session.len());
    for s in &sessions {
        let mut evs = by_session[&text(s, "sessionId").unwrap()].clone();
        evs.sort_by_key(|e| (millis(e, "timestamp"), text(e, "eventId")));
        let first = evs[0];
        let last = evs[evs.len() - 1];
        let sid = text(s, "sessionId").unwrap();
        assert_eq!(int(s, "events"), evs.len() as i64, "{sid}");
        let pv = evs
            .iter()
            .filter(|e| e.get_str("eventType") == Ok("PAGE_VIEW"))
            .count();
        assert_eq!(int(s, "pageViews"), pv as i64, "{sid}");
        assert_eq!(millis(s, "startTime"), millis(first, "timestamp"), "{sid}");
        assert_eq!(millis(s, "endTime"), millis(last, "timestamp"), "{sid}");
        assert_eq!(
            int(s, "duration"),
            millis(last, "timestamp") - millis(first, "timestamp")
        );
        let pages: Vec<&&Document> = evs
            .iter()
            .filter(|e| e.get_str("pageUrl").is_ok())
            .collect();
        assert_eq!(text(s, "entryPage"), text(pages[0], "pageUrl"), "{sid}");
        assert_eq!(
            text(s, "exitPage"),
            text(pages[pages.len() - 1], "pageUrl"),
            "{sid}"
        );
        let meta = first.get_document("metadata").unwrap();
        assert_eq!(text(s, "device"), text(meta, "device"), "{sid}");
        assert_eq!(text(s, "browser"), text(meta, "browser"), "{sid}");
        assert_eq!(text(s, "userId"), text(first, "userId"));
    }

    // A session counts for the visitor of its earliest event.
    let mut owned: HashMap<String, i64> = HashMap::new();
    for evs in by_session.values() {
        let first = evs
            .iter()
            .min_by_key(|e| (millis(e, "timestamp"), text(e, "eventId")))
            .unwrap();
        *owned.entry(text(first, "userId").unwrap()).or_default() += 1;
    }
    assert!(
        stored_events
            .iter()
            .any(|e| text(e, "userId").unwrap().starts_with("known-")),
        "some sessions changed visitor"
    );

    // And every user.
    let mut by_user: BTreeMap<String, Vec<&Document>> = BTreeMap::new();
    for e in &stored_events {
        by_user
            .entry(text(e, "userId").unwrap())
            .or_default()
            .push(e);
    }
    let users = all(&db, "users", doc! { "visitorId": 1 }).await;
    assert_eq!(users.len(), by_user.len());
    for u in &users {
        let vid = text(u, "visitorId").unwrap();
        let evs = &by_user[&vid];
        assert_eq!(int(u, "totalEvents"), evs.len() as i64, "{vid}");
        let purchases: Vec<f64> = evs
            .iter()
            .filter(|e| e.get_str("eventType") == Ok("PURCHASE"))
            .map(|e| {
                e.get_document("properties")
                    .unwrap()
                    .get_f64("amount")
                    .unwrap()
            })
            .collect();
        assert_eq!(int(u, "totalPurchases"), purchases.len() as i64, "{vid}");
        let cents: i64 = purchases.iter().map(|a| (a * 100.0).round() as i64).sum();
        assert_eq!(
            (u.get_f64("totalRevenue").unwrap() * 100.0).round() as i64,
            cents,
            "{vid}"
        );
        assert_eq!(
            int(u, "totalSessions"),
            owned.get(&vid).copied().unwrap_or(0),
            "{vid}"
        );
        let min = evs.iter().map(|e| millis(e, "timestamp")).min().unwrap();
        let max = evs.iter().map(|e| millis(e, "timestamp")).max().unwrap();
        assert_eq!(
            (millis(u, "firstSeen"), millis(u, "lastSeen")),
            (min, max),
            "{vid}"
        );
    }
}

#[tokio::test]
async fn integers_beyond_64_bits_are_refused_where_read_never_stored_rounded() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    // Written as text: a JSON value in the test would round them as the server did.
    let send = |path: &'static str, body: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let resp = client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let event = |id: &str, rest: &str| {
        format!(
            r#"{{"eventId": "{id}", "userId": "wide", "sessionId": "w", "eventType": "CLICK", {rest}}}"#
        )
    };
    let (status, answer) = send(
        "/v1/events",
        event(
            "w-1",
            r#""properties": {"n": {"deep": 18446744073709551616}}"#,
        ),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let said = answer.to_string();
    assert!(
        said.contains("properties.n.deep")
            && said.contains("`18446744073709551616` is an integer beyond the 64-bit range"),
        "{answer}"
    );
    // An id is stored as its text: exact up to 2^64 - 1 (a 64-bit hash, say).
    let (status, answer) = send(
        "/v1/events",
        r#"{"eventId": "w-0", "userId": 18446744073709551615, "sessionId": "w", "eventType": "CLICK"}"#.into(),
    )
    .await;
    assert_eq!(
        (status, &answer["results"][0]["status"]),
        (200, &json!("stored")),
        "{answer}"
    );
    let batch = format!(
        r#"{{"batch": [{}, {}, {}, {}]}}"#,
        event("w-2", r#""properties": {"l": [1, 36893488147419103232]}"#),
        event("w-3", r#""properties": {"neg": -9223372036854775809}"#),
        event(
            "w-4",
            r#""properties": {"ok": 9223372036854775807, "f": 1e30}"#
        ),
        // A member Sluice does not read is only listed as ignored.
        event("w-5", r#""extra": 99999999999999999999999"#),
    );
    let (status, answer) = send("/v1/events/batch", batch).await;
    assert_eq!(status, 200, "{answer}");
    let statuses: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["rejected", "rejected", "stored", "stored"],
        "{answer}"
    );
    assert_eq!(answer["results"][0]["field"], "properties.l", "{answer}");
    assert_eq!(answer["results"][1]["field"], "properties.neg", "{answer}");
    assert_eq!(
        answer["results"][3]["ignored"],
        json!(["extra"]),
        "{answer}"
    );
    // Segment messages likewise.
    let (status, answer) = send(
        "/v1/track",
        r#"{"messageId": "w-6", "userId": "wide", "event": "Tapped", "properties": {"id": 100000000000000000000}}"#.into(),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("properties.id"), "{answer}");
    // A batch's own context is copied into each message: refused with the batch.
    let (status, answer) = send(
        "/v1/batch",
        r#"{"batch": [{"messageId": "w-7", "userId": "wide", "type": "track", "event": "Tapped"}], "context": {"device": {"n": 1180591620717411303424}}}"#.into(),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]),
        (400, &json!("invalid_batch")),
        "{answer}"
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("`context.device.n`"),
        "{answer}"
    );
    // Members Sluice does not store are left alone.
    let (status, answer) = send(
        "/v1/track",
        r#"{"messageId": "w-8", "userId": "wide", "event": "Tapped", "integrations": {"X": {"id": 100000000000000000000}}}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let stored: Vec<String> = all(&db, "events", doc! { "eventId": 1 })
        .await
        .iter()
        .map(|e| e.get_str("eventId").unwrap().to_string())
        .collect();
    assert_eq!(stored, ["w-0", "w-4", "w-5", "w-8"]);
    let wide_id = all(&db, "events", doc! { "eventId": 1 }).await;
    assert_eq!(wide_id[0].get_str("userId"), Ok("18446744073709551615"));
    server.shutdown().await;
}

#[tokio::test]
async fn each_bad_input_class_gets_its_own_4xx() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.tracking.max_batch_events = 5;
        raw.tracking.max_batch_bytes = 8 * 1024;
        raw.tracking.max_event_bytes = 2 * 1024;
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let good =
        json!({ "userId": "v1", "sessionId": "s1", "eventType": "PAGE_VIEW", "pageUrl": "/" });

    let raw_post = |path: &str, body: String| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let expect = |resp: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(resp.status().as_u16(), status);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], code, "{body}");
        body
    };

    // Malformed JSON.
    let r = raw_post("/v1/events", "{\"userId\": ".into())
        .await
        .unwrap();
    expect(r, 400, "malformed_json").await;
    let r = raw_post("/v1/events/batch", "{\"batch\": [1,".into())
        .await
        .unwrap();
    expect(r, 400, "malformed_json").await;
    // Valid JSON nested deeper than the parser reads: said as such.
    let deep = format!(
        r#"{{"userId": "v", "eventType": "CLICK", "properties": {}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let r = raw_post("/v1/events", deep.clone()).await.unwrap();
    let body = expect(r, 400, "malformed_json").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("the body is nested more than 127 levels deep"),
        "{body}"
    );
    let r = raw_post("/v1/events/batch", format!(r#"{{"batch": [{deep}]}}"#))
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(
        body["results"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("nested more than 127 levels deep"),
        "{body}"
    );
    // A trailing slash: the way out is said.
    let r = raw_post("/v1/events/", good.to_string()).await.unwrap();
    let body = expect(r, 404, "not_found").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("ends with a slash (the endpoints end without one: `/v1/events`)"),
        "{body}"
    );
    // Wrong shape / wrong types.
    let r = raw_post("/v1/events/batch", "{\"events\": []}".into())
        .await
        .unwrap();
    expect(r, 400, "invalid_batch").await;
    // A bare array of events is not a batch (serde would read it as the batch's fields).
    for body in [
        "[{\"userId\": \"a\", \"eventType\": \"PAGE_VIEW\"}]",
        " [[{\"userId\": \"a\", \"eventType\": \"PAGE_VIEW\"}], 5]",
    ] {
        let r = raw_post("/v1/events/batch", body.into()).await.unwrap();
        expect(r, 400, "invalid_batch").await;
    }
    let (s, body) = post(
        &base,
        "/v1/events",
        &json!({ "userId": { "id": 12 }, "sessionId": "s", "eventType": "CLICK" }),
    )
    .await;
    assert_eq!((s, body["error"].as_str()), (400, Some("invalid_event")));
    assert!(
        body["message"].as_str().unwrap().contains("`userId`"),
        "{body}"
    );
    // Unknown event type.
    let (s, body) = post(
        &base,
        "/v1/events",
        &json!({ "userId": "v", "sessionId": "s", "eventType": "TELEPORT" }),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        body["message"].as_str().unwrap().contains("TELEPORT"),
        "{body}"
    );
    // A timestamp far in the future.
    let (s, body) = post(&base, "/v1/events", &json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": now_ms() + 86_400_000 })).await;
    assert_eq!(s, 400);
    assert!(
        body["message"].as_str().unwrap().contains("future"),
        "{body}"
    );
    // A property name BSON cannot hold (a NUL): refused alone, its batch's other events
    // stored (not a failed write for everything the writer lane holds).
    let nul = json!({ "userId": "v9", "sessionId": "s9", "eventType": "CLICK", "properties": { "a\u{0}b": 1 } });
    let (s, body) = post(&base, "/v1/events", &nul).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_event")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("NUL"), "{body}");
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [good.clone(), nul] }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (body["stored"].as_u64(), body["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{body}"
    );
    // Oversize bodies: one event, a batch, and too many events.
    let big = json!({ "eventId": "big-1", "userId": "v", "sessionId": "s", "eventType": "CLICK", "properties": { "blob": "x".repeat(3000) } });
    let r = raw_post("/v1/events", big.to_string()).await.unwrap();
    expect(r, 413, "payload_too_large").await;
    let r = raw_post(
        "/v1/events/batch",
        json!({ "batch": [big, big, big] }).to_string(),
    )
    .await
    .unwrap();
    expect(r, 413, "payload_too_large").await;
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": vec![good.clone(); 6] }),
    )
    .await;
    assert_eq!((s, body["error"].as_str()), (413, Some("too_many_events")));
    // A body in an encoding the endpoint does not read.
    let r = client
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "br")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    expect(r, 415, "unsupported_encoding").await;
    // One whose name is not ASCII is not read as "no encoding" either.
    let r = client
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/json")
        .header(
            "content-encoding",
            reqwest::header::HeaderValue::from_bytes(b"gzip\xe9").unwrap(),
        )
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    expect(r, 415, "unsupported_encoding").await;

    // A body that begins with a byte order mark is read as the JSON after it.
    let r = raw_post(
        "/v1/events",
        format!(
            "\u{feff}{}",
            json!({ "eventId": "bom-1", "userId": "v1", "sessionId": "s1", "eventType": "CLICK" })
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // A batch with some bad events stores the good ones and names the bad ones.
    let mixed = json!({ "batch": [
        good,
        { "eventId": "bad-type", "userId": "v1", "sessionId": "s1", "eventType": "NOPE" },
        { "userId": "v1", "sessionId": "s1", "eventType": "CLICK", "duration": -4 },
        big,
        { "userId": "v1", "sessionId": "s1", "eventType": "CLICK", "pageURL": "/typo",
          "context": { "ip": "203.0.113.9", "locale": "fr-FR" } },
    ], "context": { "locale": "fr-FR" }, "_sdk": 1 });
    let (s, body) = post(&base, "/v1/events/batch", &mixed).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        (body["stored"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(3))
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[1]["status"], "rejected");
    assert_eq!(results[1]["field"], "eventType");
    // A rejected event is named by the id it was sent with, when it had one.
    assert_eq!(results[1]["eventId"], "bad-type", "{body}");
    assert_eq!(results[2]["field"], "duration");
    assert!(results[2].get("eventId").is_none(), "{body}");
    assert!(results[3]["reason"]
        .as_str()
        .unwrap()
        .contains("larger than"));
    // Too large to be read as an event, it is still named by its id.
    assert_eq!(results[3]["eventId"], "big-1", "{body}");
    assert_eq!(results[4]["status"], "stored");
    // A member Sluice does not read (here a typo of `pageUrl`) is named, not silently lost.
    // So is a `context` member other than `ip` and `userAgent`, of an event's or of the
    // batch's own (beside the results).
    assert_eq!(
        results[4]["ignored"],
        json!(["pageURL", "context.locale"]),
        "{body}"
    );
    assert!(results[0].get("ignored").is_none());
    assert_eq!(body["ignored"], json!(["context.locale"]), "{body}");
    // All bad: 400 with the per-event reasons.
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [{ "eventType": "CLICK" }] }),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["results"][0]["field"], "userId");
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        4,
        "the good events of the NUL batch, the BOM body and the mixed batch"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn write_keys_and_the_rate_limit_are_enforced() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![sluice_core::config::Secret::new("wk_test_12345")];
        raw.server.rate_limit_per_key = 3;
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let ev = json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK" });
    let r = client
        .post(format!("{base}/v1/events"))
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client
        .post(format!("{base}/v1/events"))
        .header("x-write-key", "wrong")
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let send = |body: Value| {
        client
            .post(format!("{base}/v1/events"))
            .basic_auth("wk_test_12345", Some(""))
            .json(&body)
            .send()
    };
    // The burst (3) passes. The third carries a proxy's own `X-Write-Key` too, which
    // does not hide the valid basic user.
    for _ in 0..2 {
        assert_eq!(send(ev.clone()).await.unwrap().status().as_u16(), 200);
    }
    let r = client
        .post(format!("{base}/v1/events"))
        .header("x-write-key", "proxy-token")
        .basic_auth("wk_test_12345", Some(""))
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Then ten at once, with bodies refused only after the limit is checked (no
    // database work, so they arrive together whatever the machine's load): the bucket
    // has refilled by at most 3 a second since, so some are refused.
    let answers =
        futures_util::future::join_all((0..10).map(|_| send(json!({ "eventType": 1 })))).await;
    let mut codes = Vec::new();
    for r in answers {
        let r = r.unwrap();
        if r.status().as_u16() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        codes.push(r.status().as_u16());
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| [400, 429].contains(c)), "{codes:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_per_client_counts_each_address_apart_and_an_ipv6_64_as_one() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.rate_limit_per_client = 1;
        raw.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    // Bodies refused only after the limit is checked (no database work), ten at once: the
    // bucket refills by one a second, so most are refused.
    let burst = |from: Vec<&'static str>, path: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let answers = futures_util::future::join_all(from.into_iter().map(|ip| {
                let request = if path.starts_with("/v1/") {
                    client
                        .post(format!("{base}{path}"))
                        .json(&json!({ "eventType": 1 }))
                } else {
                    client.get(format!("{base}{path}"))
                };
                request.header("x-forwarded-for", ip).send()
            }))
            .await;
            let mut codes = Vec::new();
            for r in answers {
                let r = r.unwrap();
                let code = r.status().as_u16();
                if code == 429 {
                    assert_eq!(r.headers()["retry-after"], "1");
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error"], "rate_limited");
                    assert!(
                        body["message"].as_str().unwrap().contains("address"),
                        "{body}"
                    );
                }
                codes.push(code);
            }
            codes
        }
    };
    let codes = burst(vec!["203.0.113.5"; 10], "/v1/events").await;
    assert!(
        codes.iter().filter(|c| **c == 429).count() >= 5,
        "{codes:?}"
    );
    assert!(codes.iter().all(|c| [400, 429].contains(c)), "{codes:?}");
    // Another address has its own allowance, on any tracking endpoint.
    let codes = burst(vec!["203.0.113.6"], "/v1/t").await;
    assert_eq!(codes, vec![400]);
    // Addresses of one IPv6 /64 share one.
    let codes = burst(
        vec![
            "2001:db8:1:2::1",
            "2001:db8:1:2::2",
            "2001:db8:1:2::3",
            "2001:db8:1:2::4",
        ],
        "/v1/batch",
    )
    .await;
    assert!(
        codes.iter().filter(|c| **c == 429).count() >= 2,
        "{codes:?}"
    );
    // Health checks and metrics are not tracking endpoints.
    let codes = burst(vec!["203.0.113.5"; 5], "/healthz").await;
    assert_eq!(codes, vec![200; 5]);
    let missing = client.get(format!("{base}/v1/nope")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_requests_rate_limited_total{limit=\"client\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 7, "{metrics}");
    assert!(
        metrics.contains("sluice_requests_rate_limited_total{limit=\"write_key\"} 0"),
        "{metrics}"
    );
    // Every answer is counted by route pattern and status, the limiter's 429s included.
    assert!(codes_of(&metrics, "/v1/events", 429) >= 5, "{metrics}");
    assert!(codes_of(&metrics, "/v1/batch", 429) >= 2, "{metrics}");
    assert_eq!(codes_of(&metrics, "/healthz", 200), 5, "{metrics}");
    assert_eq!(codes_of(&metrics, "unmatched", 404), 1, "{metrics}");
    server.shutdown().await;
}

/// How many answers `/metrics` text counts for `route` with `status`.
fn codes_of(metrics: &str, route: &str, status: u16) -> u64 {
    let prefix = format!("sluice_http_responses_total{{route=\"{route}\",status=\"{status}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.parse().unwrap())
}

/// A server on `db` whose store is reached through a proxy the test can freeze (set the
/// flag: MongoDB stops answering); the server, its base URL and the flag.
async fn freezable_server(
    db: &TestDb,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> (
    sluice::server::ServerHandle,
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let (uri, frozen) = support::freezable_mongo_proxy().await;
    let store = support::store_via(&uri, &db.name).await;
    let config = support::test_config(&db.name, adjust);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sluice::server::start(config, store, listener, false)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    (server, base, frozen)
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (server, base, frozen) = freezable_server(&db, |raw| {
        raw.tracking.queue_capacity = 10;
        raw.tracking.max_batch_events = 10;
        raw.tracking.writers = 1;
    })
    .await;
    let batch = |from: usize, n: usize| {
        let events: Vec<Value> = (from..from + n)
            .map(|i| json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK", "eventId": format!("q{i}") }))
            .collect();
        json!({ "batch": events })
    };
    // A full batch waits on a store that stopped answering and holds the whole queue.
    frozen.store(true, Ordering::SeqCst);
    let holding = tokio::spawn({
        let (base, body) = (base.clone(), batch(0, 10));
        async move { post(&base, "/v1/events/batch", &body).await }
    });
    let metrics = format!("{base}/metrics");
    support::wait_until("the batch fills the queue", || async {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == "sluice_ingest_queue_events 10")
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .json(&batch(10, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&wait), "{wait}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "overloaded", "{body}");
    frozen.store(false, Ordering::SeqCst);
    let (status, answer) = holding.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        10,
        "the refused request stored nothing"
    );
    server.shutdown().await;
}

/// The `sluice_http_in_flight_bytes` gauge.
async fn in_flight_bytes(base: &str) -> u64 {
    support::metric(base, "sluice_http_in_flight_bytes").await as u64
}

#[tokio::test]
async fn an_event_whose_claim_another_write_holds_is_answered_when_to_come_back() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let event = json!({ "eventId": "held-1", "userId": "v-held", "sessionId": "s-held", "eventType": "CLICK" });
    let (status, body) = post(&base, "/v1/events", &event).await;
    assert_eq!(status, 200, "{body}");
    // What a write that claimed the event 10 s ago and has not inserted it leaves (it may
    // still, or its process died): a claim in its lease, and no event.
    db.store
        .collection("event_ids")
        .update_one(
            doc! { "_id": "held-1" },
            doc! { "$set": { "at": bson::DateTime::from_millis(now_ms() - 10_000) }, "$unset": { "stored": "" } },
        )
        .await
        .unwrap();
    db.store
        .collection("events")
        .delete_many(doc! { "eventId": "held-1" })
        .await
        .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .json(&json!({ "batch": [event] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    // Not before the claim's lease (30 s) ends: sent sooner, it would be held again.
    let after: u32 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&after), "{after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "retry", "{body}");
    assert_eq!(body["results"][0]["retryAfter"], after, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn bodies_sent_to_other_routes_cannot_take_the_tracking_endpoint_s_room() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    let (server, base, _frozen) = freezable_server(&db, |raw| {
        raw.tracking.max_in_flight_mb = 1;
    })
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    // Bodies that stall half sent, with no credential: to no route, declaring 2 MB, to a
    // tracking path with the wrong method, and to the admin API.
    let stall = |method: &'static str, path: &'static str, declared: usize, sent: usize| {
        let addr = addr.clone();
        async move {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.write_all(&vec![b' '; sent]).await.unwrap();
            conn
        }
    };
    let unrouted = stall("POST", "/no-such-path", 2_000_000, 1_040_000).await;
    // A probe, which takes no body.
    let probe = stall("POST", "/metrics", 250_000, 240_000).await;
    // A tracking path asked with the wrong method.
    let wrong_method = stall("PUT", "/v1/batch", 500_000, 400_000).await;
    // To the admin API: without a token, refused before the body is read; to sign in, at
    // most 16 KiB is read.
    let unsigned = stall("POST", "/v1/admin/configs", 250_000, 240_000).await;
    let login = stall("POST", "/v1/admin/login", 250_000, 240_000).await;
    let mut admin = Vec::new();
    for _ in 0..5 {
        admin.push(stall("POST", "/v1/admin/login", 15_000, 14_000).await);
    }
    // Answered at once, their bodies unread (or read no further than the limit).
    for (mut conn, status) in [
        (unrouted, "404"),
        (probe, "405"),
        (wrong_method, "405"),
        (unsigned, "401"),
        (login, "413"),
    ] {
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("answered without its body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // The admin bodies are held apart: the tracking endpoint's bytes stay free.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(in_flight_bytes(&base).await, 0);
    let event = json!({ "userId": "v-room", "sessionId": "s-room", "eventType": "CLICK", "eventId": "room-1" });
    let (status, body) = post(&base, "/v1/events", &event).await;
    assert_eq!(status, 200, "{body}");
    drop(admin);
    server.shutdown().await;
}

#[tokio::test]
async fn request_bytes_held_are_bounded_until_their_events_are_written() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    // 1 MiB in flight; a batch body is at most 100,000 bytes.
    let (server, base, frozen) = freezable_server(&db, |raw| {
        raw.tracking.max_batch_bytes = 100_000;
        raw.tracking.max_in_flight_mb = 1;
        raw.tracking.write_timeout_seconds = 1;
    })
    .await;
    // Ten events of about 9.6 KB each.
    let batch = |n: usize| {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({ "userId": format!("v{n}-{i}"), "sessionId": format!("s{n}"), "eventType": "CLICK", "eventId": format!("big{n}-{i}"), "properties": { "pad": "x".repeat(9_600) } }))
            .collect();
        json!({ "batch": events })
    };
    // The bytes `post` sends for `body` (reqwest encodes JSON with serde_json).
    let size = |body: &Value| serde_json::to_vec(body).unwrap().len();
    let send = |body: Value| {
        let base = base.clone();
        async move { post(&base, "/v1/events/batch", &body).await }
    };
    // Ten batches wait on a store that stopped answering: each is answered 503 after the
    // write timeout, and its bytes stay counted while its events are still queued.
    frozen.store(true, Ordering::SeqCst);
    let bodies: Vec<Value> = (0..10).map(batch).collect();
    let held: usize = bodies.iter().map(size).sum();
    assert!(
        held < 1 << 20 && held + size(&bodies[0]) > 1 << 20,
        "{held}"
    );
    let answers = futures_util::future::join_all(bodies.into_iter().map(send)).await;
    for (status, body) in &answers {
        assert_eq!(
            (*status, body["error"].as_str()),
            (503, Some("store_timeout")),
            "{body}"
        );
    }
    assert_eq!(in_flight_bytes(&base).await, held as u64);
    // An eleventh would pass the bound: refused before it is queued, and counted.
    let (status, body) = send(batch(10)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "overloaded", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_in_flight_mb"),
        "{body}"
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nsluice_requests_in_flight_full_total 1\n"),
        "{metrics}"
    );
    assert_eq!(
        in_flight_bytes(&base).await,
        held as u64,
        "the refused one holds nothing"
    );
    // Once the store answers, the queued events are written and their bytes given back.
    frozen.store(false, Ordering::SeqCst);
    until_no_bytes_held(&base).await;
    let (status, body) = send(batch(10)).await;
    assert_eq!(status, 200, "{body}");
    let events = db.store.collection("events");
    assert_eq!(
        events
            .count_documents(doc! { "eventId": { "$regex": "^big10-" } })
            .await
            .unwrap(),
        10
    );
    // The timed-out requests' events were written, or dropped unwritten where the writer
    // found nobody waiting for them: never more.
    assert!(events.count_documents(doc! {}).await.unwrap() <= 110);
    assert_eq!(in_flight_bytes(&base).await, 0);
    // A compressed body holds what was sent and room for its decompressed copy (the
    // route's limit).
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&serde_json::to_vec(&batch(11)).unwrap())
        .unwrap();
    let gz = gz.finish().unwrap();
    frozen.store(true, Ordering::SeqCst);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let held = gz.len() as u64 + 100_000;
    assert_eq!(in_flight_bytes(&base).await, held);
    // A body over its route's limit is refused, and what it sent is given back.
    let (status, body) = send(json!({ "batch": [], "pad": "x".repeat(100_000) })).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    assert_eq!(in_flight_bytes(&base).await, held);
    // The Segment routes count their bodies the same way.
    let message = json!({ "batch": [{ "type": "track", "event": "Clicked", "userId": "seg", "messageId": "seg-1" }] });
    let (status, _) = post(&base, "/v1/batch", &message).await;
    assert_eq!(status, 503);
    assert_eq!(in_flight_bytes(&base).await, held + size(&message) as u64);
    frozen.store(false, Ordering::SeqCst);
    until_no_bytes_held(&base).await;
    // A Segment batch's `context` is copied into each of its messages: the copies are
    // counted with its body, and refused when they alone pass the bound.
    let segment = |context: &Value, n: usize| {
        let batch: Vec<Value> = (0..n)
            .map(|i| json!({ "type": "track", "event": "Clicked", "userId": format!("ctx{i}"), "messageId": format!("ctx-{n}-{i}") }))
            .collect();
        json!({ "batch": batch, "context": context })
    };
    let context = json!({ "library": { "name": "x".repeat(20_000) } });
    let (status, body) = post(&base, "/v1/batch", &segment(&context, 60)).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("copies of the batch's `context`"),
        "{body}"
    );
    frozen.store(true, Ordering::SeqCst);
    let sent = segment(&context, 20);
    let (status, _) = post(&base, "/v1/batch", &sent).await;
    assert_eq!(status, 503);
    let copies = 20 * size(&context);
    assert_eq!(in_flight_bytes(&base).await, (size(&sent) + copies) as u64);
    frozen.store(false, Ordering::SeqCst);
    until_no_bytes_held(&base).await;
    server.shutdown().await;
}

/// Waits until `sluice_http_in_flight_bytes` is back at 0 (30 s at most).
async fn until_no_bytes_held(base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while in_flight_bytes(base).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "bytes never given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn enrichment_fills_metadata_and_bots_can_be_dropped() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.trusted_proxies = vec!["127.0.0.1".into()];
        raw.tracking.bots = "drop".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/v1/events"))
        .header("user-agent", sluice::demo::USER_AGENTS[2])
        .header("x-forwarded-for", "203.0.113.9")
        .json(&json!({ "eventId": "m1", "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW", "pageUrl": "/" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let e = db
        .store
        .collection("events")
        .find_one(doc! { "eventId": "m1" })
        .await
        .unwrap()
        .unwrap();
    let m = e.get_document("metadata").unwrap();
    assert_eq!(m.get_str("ipAddress").unwrap(), "203.0.113.9");
    assert_eq!(m.get_str("device").unwrap(), "mobile");
    assert_eq!(m.get_str("os").unwrap(), "iOS");
    let s = db
        .store
        .collection("sessions")
        .find_one(doc! { "sessionId": "s" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.get_str("device").unwrap(), "mobile");

    let (status, body) = post(
        &base,
        "/v1/events",
        &json!({ "eventId": "crawl-1", "userId": "crawler", "sessionId": "c", "eventType": "PAGE_VIEW", "context": { "userAgent": sluice::demo::BOT_AGENT } }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["dropped"], 1, "{body}");
    // Named by its eventId, as in a batch's answer.
    assert_eq!(body["results"][0]["eventId"], "crawl-1", "{body}");
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! { "userId": "crawler" })
            .await
            .unwrap(),
        0
    );
    server.shutdown().await;
}

/// A PURCHASE without `properties.amount` is stored, and its result says it counts no
/// revenue (naming a `revenue` it had, which is Segment's name, not read here).
#[tokio::test]
async fn a_purchase_without_an_amount_is_stored_with_a_warning() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let purchase = |id: &str, properties: Value| {
        json!({ "eventId": id, "userId": "buyer", "sessionId": "s", "eventType": "PURCHASE",
                "properties": properties })
    };
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            purchase("p1", json!({ "revenue": 19.99 })),
            purchase("p2", json!({ "amount": 5 })),
            purchase("p3", json!({})),
        ] }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["stored"], 3, "{body}");
    let results = body["results"].as_array().unwrap();
    assert!(
        results[0]["warning"]
            .as_str()
            .unwrap()
            .contains("`properties.revenue` is not read"),
        "{body}"
    );
    assert!(results[1].get("warning").is_none(), "{body}");
    assert!(
        results[2]["warning"]
            .as_str()
            .unwrap()
            .contains("counts no revenue"),
        "{body}"
    );

    // An over-long URL is stored cut at 4,096 bytes, and the answer says so, on both
    // routes; a numeric visitor id is its text.
    let long = format!("https://shop.example/search?q={}", "x".repeat(5_000));
    let (s, body) = post(
        &base,
        "/v1/events",
        &json!({ "eventId": "long-1", "userId": 1234, "sessionId": "s", "eventType": "PAGE_VIEW",
                 "pageUrl": long }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["results"][0]["warning"], "`pageUrl` is longer than 4096 bytes: stored cut there",
        "{body}"
    );
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            { "eventId": "long-2", "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
              "referrer": long, "properties": {} },
        ] }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let w = body["results"][0]["warning"].as_str().unwrap();
    assert!(
        w.contains("counts no revenue; `referrer` is longer than"),
        "{body}"
    );
    let stored = db
        .store
        .collection("events")
        .find_one(doc! { "eventId": "long-1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_str("userId").unwrap(), "1234");
    assert_eq!(stored.get_str("pageUrl").unwrap(), &long[..4096]);
    server.shutdown().await;
}

/// A native IDENTIFY's properties are the visitor's traits, copied to the profile as a
/// Segment identify's are.
/// A database another writer filled as the design document describes: its sessions keep
/// their pages, device, place and fields of its own when events join them, and its
/// visitors' totals go on from what they held, whatever number type they were stored in.
#[tokio::test]
async fn sessions_and_totals_another_writer_stored_are_continued_not_replaced() {
    let db = TestDb::initialized().await;
    let t0 = now_ms() - 3_600_000;
    let at = bson::DateTime::from_millis;
    db.store
        .collection("sessions")
        .insert_one(doc! {
            "sessionId": "legacy-s", "userId": "legacy-v", "status": "ENDED",
            "startTime": at(t0), "endTime": at(t0 + 60_000), "duration": 60_000_i64,
            "pageViews": 2_i64, "events": 3_i64, "entryPage": "/", "exitPage": "/blog",
            "device": "mobile", "browser": "Safari", "os": "iOS", "country": "FR",
            "region": "Ile-de-France", "city": "Paris",
            "createdAt": at(t0), "updatedAt": at(t0 + 60_000),
            "landingCampaign": "winter-sale",
        })
        .await
        .unwrap();
    // Stored otherwise than Sluice stores one: read leniently. And one that is no
    // session at all (no times): left as it is, its events stored all the same.
    let start_text = chrono::DateTime::from_timestamp_millis(t0)
        .unwrap()
        .to_rfc3339();
    db.store
        .collection("sessions")
        .insert_many([
            doc! { "sessionId": "odd-s", "userId": "legacy-v", "status": "CLOSED",
            "startTime": &start_text, "endTime": at(t0 + 60_000),
            "pageViews": 2.0, "events": "3", "device": 7 },
            doc! { "sessionId": "broken-s", "userId": "legacy-v", "status": "ACTIVE" },
            // A time as text without a zone (UTC), and a count that is no number.
            doc! { "sessionId": "naive-s", "userId": "legacy-v", "status": "ENDED",
            "startTime": chrono::DateTime::from_timestamp_millis(t0).unwrap()
                .format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            "endTime": at(t0 + 60_000), "pageViews": 1, "events": 1 },
            doc! { "sessionId": "many-s", "userId": "legacy-v", "status": "ENDED",
            "startTime": at(t0), "endTime": at(t0 + 60_000),
            "pageViews": 1, "events": "many" },
            // Its own kind of `_id`, no endTime but a duration, an object for a text field.
            doc! { "_id": "legacy-text-id", "sessionId": "textid-s", "userId": "legacy-v",
            "status": "ENDED", "startTime": at(t0), "duration": 60_000,
            "pageViews": 1, "events": 1, "browser": { "name": "Safari", "major": 17 } },
            // Epoch milliseconds as a double with a fraction (`time.time() * 1000`).
            doc! { "sessionId": "frac-s", "userId": "legacy-v", "status": "ENDED",
            "startTime": t0 as f64 + 0.456, "endTime": at(t0 + 60_000),
            "pageViews": 1, "events": 1 },
            // Epoch seconds, which read as milliseconds would be January 1970.
            doc! { "sessionId": "seconds-s", "userId": "legacy-v", "status": "ENDED",
            "startTime": t0 / 1000, "pageViews": 1, "events": 1 },
        ])
        .await
        .unwrap();
    let decimal: bson::Decimal128 = "99.99".parse().unwrap();
    db.store
        .collection("users")
        .insert_many([
            doc! { "visitorId": "legacy-v", "firstSeen": at(t0), "lastSeen": at(t0 + 60_000),
            "totalSessions": 1_i64, "totalEvents": 3_i64, "totalPurchases": 1_i64,
            "totalRevenue": "120.50", "loyaltyTier": "gold" },
            doc! { "visitorId": "decimal-v", "totalSessions": 4.0, "totalEvents": "12",
            "totalPurchases": 2_i32, "totalRevenue": decimal },
        ])
        .await
        .unwrap();
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let unread_before = sluice_core::metrics::value("sluice_sessions_unread_total", &[]);
    let event = |id: &str, visitor: &str, session: &str, ts: i64, kind: &str, page: &str| {
        json!({ "eventId": id, "userId": visitor, "sessionId": session, "eventType": kind,
                "timestamp": ts, "pageUrl": page, "properties": { "amount": 10, "currency": "EUR" } })
    };
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            // Inside the stored session's span, and after its end.
            event("e-in", "legacy-v", "legacy-s", t0 + 30_000, "PAGE_VIEW", "/inside"),
            event("e-after", "legacy-v", "legacy-s", t0 + 120_000, "PURCHASE", "/checkout"),
            event("e-dec", "decimal-v", "new-s", t0, "PURCHASE", "/checkout"),
            event("e-odd", "legacy-v", "odd-s", t0 + 30_000, "PAGE_VIEW", "/odd"),
            event("e-broken", "legacy-v", "broken-s", t0 + 30_000, "PAGE_VIEW", "/b"),
            event("e-naive", "legacy-v", "naive-s", t0 + 30_000, "PAGE_VIEW", "/n"),
            event("e-many", "legacy-v", "many-s", t0 + 30_000, "PAGE_VIEW", "/m"),
            event("e-textid", "legacy-v", "textid-s", t0 + 30_000, "CLICK", "/t"),
            event("e-seconds", "legacy-v", "seconds-s", t0 + 30_000, "CLICK", "/s"),
            event("e-frac", "legacy-v", "frac-s", t0 + 30_000, "CLICK", "/f"),
        ] }),
    )
    .await;
    assert_eq!((s, body["stored"].as_u64()), (200, Some(10)), "{body}");
    let session = |id: &'static str| {
        let sessions = db.store.collection("sessions");
        async move {
            sessions
                .find_one(doc! { "sessionId": id })
                .await
                .unwrap()
                .unwrap()
        }
    };
    let naive = session("naive-s").await;
    assert_eq!(millis(&naive, "startTime"), t0, "{naive}");
    assert_eq!(int(&naive, "events"), 2);
    // Guessed, its count would go on wrong: left as it was.
    let many = session("many-s").await;
    assert_eq!(many.get_str("events"), Ok("many"), "{many}");
    let text_id = session("textid-s").await;
    assert_eq!(text_id.get_str("_id"), Ok("legacy-text-id"), "{text_id}");
    assert_eq!(
        int(&text_id, "events"),
        2,
        "found by its own _id: {text_id}"
    );
    assert_eq!(
        millis(&text_id, "endTime"),
        t0 + 60_000,
        "from its duration"
    );
    assert_eq!(text_id.get_str("status"), Ok("ENDED"), "inside its span");
    assert!(
        text_id.get_str("browser").unwrap().contains("Safari"),
        "kept, as text: {text_id}"
    );
    let frac = session("frac-s").await;
    assert_eq!(
        (millis(&frac, "startTime"), int(&frac, "events")),
        (t0, 2),
        "{frac}"
    );
    let seconds = session("seconds-s").await;
    assert_eq!(int(&seconds, "events"), 1, "left as it was: {seconds}");
    // Each counted once (no other test leaves a session unread).
    assert_eq!(
        sluice_core::metrics::value("sluice_sessions_unread_total", &[]) - unread_before,
        3.0
    );
    let odd = db
        .store
        .collection("sessions")
        .find_one(doc! { "sessionId": "odd-s" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (int(&odd, "events"), int(&odd, "pageViews")),
        (4, 3),
        "{odd}"
    );
    assert_eq!(odd.get_str("status"), Ok("CLOSED"), "{odd}");
    assert_eq!(millis(&odd, "startTime"), t0);
    assert_eq!(odd.get_str("device"), Ok("7"));
    let broken = db
        .store
        .collection("sessions")
        .find_one(doc! { "sessionId": "broken-s" })
        .await
        .unwrap()
        .unwrap();
    assert!(!broken.contains_key("events"), "left as it was: {broken}");
    let session = db
        .store
        .collection("sessions")
        .find_one(doc! { "sessionId": "legacy-s" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        session.get_str("landingCampaign"),
        Ok("winter-sale"),
        "{session}"
    );
    assert_eq!(session.get_str("entryPage"), Ok("/"), "{session}");
    assert_eq!(session.get_str("exitPage"), Ok("/checkout"), "{session}");
    for (k, v) in [
        ("device", "mobile"),
        ("browser", "Safari"),
        ("country", "FR"),
        ("city", "Paris"),
    ] {
        assert_eq!(session.get_str(k), Ok(v), "{k}: {session}");
    }
    assert_eq!(
        (int(&session, "events"), int(&session, "pageViews")),
        (5, 3)
    );
    assert_eq!(millis(&session, "startTime"), t0);
    assert_eq!(millis(&session, "endTime"), t0 + 120_000);
    // It went on past its end: active again, as an expired one would be.
    assert_eq!(session.get_str("status"), Ok("ACTIVE"));

    let user = |visitor: &'static str| {
        let users = db.store.collection("users");
        async move {
            users
                .find_one(doc! { "visitorId": visitor })
                .await
                .unwrap()
                .unwrap()
        }
    };
    let legacy = user("legacy-v").await;
    assert_eq!(int(&legacy, "totalRevenueMicros"), 130_500_000, "{legacy}");
    assert_eq!(legacy.get_f64("totalRevenue"), Ok(130.5));
    assert_eq!(
        (int(&legacy, "totalEvents"), int(&legacy, "totalPurchases")),
        (12, 2)
    );
    assert_eq!(
        int(&legacy, "totalSessions"),
        1,
        "the session was theirs already"
    );
    assert_eq!(legacy.get_str("loyaltyTier"), Ok("gold"));
    assert_eq!(millis(&legacy, "firstSeen"), t0);
    let decimal = user("decimal-v").await;
    assert_eq!(
        int(&decimal, "totalRevenueMicros"),
        109_990_000,
        "{decimal}"
    );
    assert_eq!(
        (
            int(&decimal, "totalSessions"),
            int(&decimal, "totalEvents"),
            int(&decimal, "totalPurchases")
        ),
        (5, 13, 3)
    );
    server.shutdown().await;
}

/// Events another writer stored have no dedupe claims until `db claim-events` gives them
/// some: a resend of one (an SDK retrying across the switch-over) is then a duplicate,
/// counted nowhere again.
#[tokio::test]
async fn events_another_writer_stored_are_duplicates_once_claimed() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let t0 = now_ms() - 600_000;
    // One event Sluice stores itself (claimed already).
    let mine = json!({ "eventId": "mine", "userId": "old-v", "sessionId": "old-s",
                       "eventType": "CLICK", "timestamp": t0 + 1_000 });
    assert_eq!(post(&base, "/v1/events", &mine).await.0, 200);
    let at = bson::DateTime::from_millis;
    db.store
        .collection("events")
        .insert_many([
            doc! { "eventId": "legacy-1", "userId": "old-v", "sessionId": "old-s",
            "eventType": "PAGE_VIEW", "timestamp": at(t0), "pageUrl": "/" },
            doc! { "eventId": "legacy-2", "userId": "old-v", "sessionId": "old-s",
            "eventType": "CLICK", "timestamp": at(t0 + 500) },
            // No eventId as text: nothing to claim.
            doc! { "eventId": 7, "userId": "old-v", "sessionId": "old-s",
            "eventType": "CLICK", "timestamp": at(t0 + 600) },
        ])
        .await
        .unwrap();
    let resend = json!({ "eventId": "legacy-1", "userId": "old-v", "sessionId": "old-s",
                         "eventType": "PAGE_VIEW", "timestamp": t0, "pageUrl": "/" });
    let mut progress = Vec::new();
    let done =
        sluice_connectors::mongo::ledger::claim_stored_events(&db.store, |p| progress.push(p))
            .await
            .unwrap();
    assert_eq!(
        (done.read, done.claimed, done.already, done.skipped),
        (4, 2, 1, 1),
        "{done:?}"
    );
    assert_eq!(progress.last(), Some(&done));
    let user_before = all(&db, "users", doc! {}).await;
    let (s, body) = post(&base, "/v1/events", &resend).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "duplicate", "{body}");
    assert_eq!(all(&db, "users", doc! {}).await, user_before);
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! { "eventId": "legacy-1" })
            .await
            .unwrap(),
        1
    );
    // Again: nothing new to claim.
    let again = sluice_connectors::mongo::ledger::claim_stored_events(&db.store, |_| {})
        .await
        .unwrap();
    assert_eq!((again.claimed, again.already), (0, 3));
    server.shutdown().await;
}

/// A native batch's own `context` says where each of its events came from, as an event's
/// own does (which stands where both say).
#[tokio::test]
async fn a_batch_s_context_stands_for_its_events_own() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .header("user-agent", "Requesting/2.0")
        .json(&json!({ "batch": [
            { "eventId": "b-1", "userId": "v", "sessionId": "s", "eventType": "CLICK" },
            { "eventId": "b-2", "userId": "v", "sessionId": "s", "eventType": "CLICK",
              "context": { "ip": "198.51.100.7" } },
        ], "context": { "ip": "203.0.113.9", "userAgent": "Backend/2.1" } }))
        .send()
        .await
        .unwrap();
    let (s, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
    assert_eq!((s, body["stored"].as_u64()), (200, Some(2)), "{body}");
    assert!(body.get("ignored").is_none(), "{body}");
    let stored = all(&db, "events", doc! { "eventId": 1 }).await;
    let meta = |i: usize, k: &str| {
        stored[i]
            .get_document("metadata")
            .unwrap()
            .get_str(k)
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert_eq!(
        (meta(0, "ipAddress"), meta(0, "userAgent")),
        ("203.0.113.9".to_string(), "Backend/2.1".to_string())
    );
    assert_eq!(
        (meta(1, "ipAddress"), meta(1, "userAgent")),
        ("198.51.100.7".to_string(), "Backend/2.1".to_string())
    );
    // What of it cannot be read is not applied and is named; the events are stored.
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            { "eventId": "b-3", "userId": "v", "sessionId": "s", "eventType": "CLICK" },
        ], "context": { "ip": 5, "userAgent": "Backend/2.2" } }),
    )
    .await;
    assert_eq!((s, body["stored"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(body["ignored"], json!(["context.ip"]), "{body}");
    let (s, body) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            { "eventId": "b-4", "userId": "v", "sessionId": "s", "eventType": "CLICK" },
        ], "context": "203.0.113.9" }),
    )
    .await;
    assert_eq!((s, body["stored"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(body["ignored"], json!(["context"]), "{body}");
    let stored = all(&db, "events", doc! { "eventId": 1 }).await;
    assert_eq!(
        stored[2]
            .get_document("metadata")
            .unwrap()
            .get_str("userAgent"),
        Ok("Backend/2.2")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_native_identify_updates_the_profile() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let (s, body) = post(
        &base,
        "/v1/events",
        &json!({ "eventId": "id-1", "userId": "nat", "sessionId": "s", "eventType": "IDENTIFY",
                 "properties": { "email": "n@example.com", "firstName": "Nat", "plan": "pro" } }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let user = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "nat" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.get_str("email").unwrap(), "n@example.com", "{user}");
    assert_eq!(user.get_str("firstName").unwrap(), "Nat");
    assert_eq!(
        user.get_document("attributes")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "pro"
    );
    assert_eq!(int(&user, "totalEvents"), 1);
    // A later identify whose email is not a string: stored, its other traits applied,
    // that one left out of the profile, and the answer says so.
    let (s, body) = post(
        &base,
        "/v1/events",
        &json!({ "eventId": "id-2", "userId": "nat", "sessionId": "s", "eventType": "IDENTIFY",
                 "properties": { "email": 5, "plan": "team" } }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "stored", "{body}");
    let warning = body["results"][0]["warning"].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("`properties.email` not a string"),
        "{body}"
    );
    let user = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "nat" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.get_str("email").unwrap(), "n@example.com", "{user}");
    assert_eq!(
        user.get_document("attributes")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "team"
    );
    server.shutdown().await;
}

/// `navigator.sendBeacon` sets no headers (and sends `text/plain`): the write key comes
/// in the body.
#[tokio::test]
async fn a_beacon_sends_its_write_key_in_the_body() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![sluice_core::config::Secret::new("wk_test_12345")];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let beacon = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "text/plain;charset=UTF-8")
            .body(body.to_string())
            .send()
    };
    let ev =
        |id: &str| json!({ "eventId": id, "userId": "v", "sessionId": "s", "eventType": "CLICK" });
    let mut one = ev("b1");
    one["writeKey"] = json!("wk_test_12345");
    let r = beacon("/v1/events", one).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["results"][0]["status"], "stored", "{answer}");
    assert!(
        answer["results"][0].get("ignored").is_none(),
        "the key is no unknown field: {answer}"
    );
    let r = beacon(
        "/v1/events/batch",
        json!({ "writeKey": "wk_test_12345", "batch": [ev("b2"), ev("b3")] }),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A wrong key in the body, or none, is refused as in a header.
    let mut wrong = ev("b4");
    wrong["writeKey"] = json!("wk_wrong_0000");
    assert_eq!(
        beacon("/v1/events", wrong).await.unwrap().status().as_u16(),
        401
    );
    assert_eq!(
        beacon("/v1/events/batch", json!({ "batch": [ev("b5")] }))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn health_readiness_metrics_and_cors() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.cors_origins = vec![
            "https://shop.example:443".into(),
            "https://*.shop.example".into(),
        ]
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    post(
        &base,
        "/v1/events",
        &json!({ "eventId": "h1", "userId": "v", "sessionId": "s", "eventType": "CLICK" }),
    )
    .await;
    post(
        &base,
        "/v1/events",
        &json!({ "eventId": "h1", "userId": "v", "sessionId": "s", "eventType": "CLICK" }),
    )
    .await;
    post(
        &base,
        "/v1/events",
        &json!({ "userId": "v", "sessionId": "s", "eventType": "BAD" }),
    )
    .await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "sluice_events_accepted_total 1",
        "sluice_events_deduplicated_total 1",
        "sluice_events_rejected_total{reason=\"invalid\"} 1",
        "sluice_event_write_seconds_count 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing `{line}` in\n{metrics}"
        );
    }
    // The database runs on this host: its clock and ours agree to well within a second.
    let offset: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_clock_offset_seconds "))
        .unwrap_or_else(|| panic!("no clock offset in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(offset.abs() < 1.0, "{offset}");
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/events"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-write-key,content-encoding,sentry-trace,baggage,traceparent",
            )
            .send()
    };
    let ok = preflight("https://shop.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let allowed = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("content-encoding") && allowed.contains("x-write-key"),
        "browsers may send gzipped bodies with a write key: {allowed}"
    );
    // And the headers tracing tools add to every fetch of the page.
    assert!(
        ["sentry-trace", "baggage", "traceparent"]
            .iter()
            .all(|h| allowed.contains(h)),
        "{allowed}"
    );
    // A subdomain under `https://*.shop.example`.
    let sub = preflight("https://www.shop.example").await.unwrap();
    assert_eq!(
        sub.headers()["access-control-allow-origin"],
        "https://www.shop.example"
    );
    for origin in [
        "https://evil.example",
        "https://evilshop.example",
        "http://www.shop.example",
    ] {
        let other = preflight(origin).await.unwrap();
        assert!(
            other.headers().get("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
    // A browser SDK may read when to come back from a cross-origin answer.
    let answer = client
        .post(format!("{base}/v1/events"))
        .header("origin", "https://shop.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    let exposed = answer.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("retry-after") && exposed.contains("x-ratelimit-reset"),
        "{exposed}"
    );
    // And a dashboard the analytics API's notes on a journey.
    assert!(
        exposed.contains("x-sluice-archived-through")
            && exposed.contains("x-sluice-journey-truncated"),
        "{exposed}"
    );
    // A wrong method gets the same JSON error shape as every other refusal.
    let wrong = client
        .get(format!("{base}/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 405);
    assert!(wrong.headers().get("allow").is_some());
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed", "{body}");
    // A purchase amount that would overflow the visitor's revenue total (it used to take a
    // writer lane down), or that cannot be read, counts no revenue: the purchase is
    // stored with the amount kept as sent, and the answer says so.
    let unread_count = || support::metric(&base, "sluice_purchase_amounts_unread_total");
    let unread_before = unread_count().await;
    for (i, amount) in [json!(1e300), json!("ten"), json!(-5)]
        .into_iter()
        .enumerate()
    {
        let resp = client
            .post(format!("{base}/v1/events"))
            .json(
                &json!({ "userId": "rich", "sessionId": "r", "eventType": "PURCHASE",
                "eventId": format!("rich-{i}"), "properties": { "amount": amount.clone() } }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["results"][0]["status"], "stored", "{body}");
        assert!(
            body.to_string()
                .contains("kept as `properties.amountUnread`"),
            "{body}"
        );
        let stored = db
            .store
            .collection("events")
            .find_one(doc! { "eventId": format!("rich-{i}") })
            .await
            .unwrap()
            .unwrap();
        let props = stored.get_document("properties").unwrap();
        assert!(!props.contains_key("amount"), "{stored}");
        assert_eq!(
            props
                .get("amountUnread")
                .cloned()
                .map(bson::Bson::into_relaxed_extjson),
            Some(amount)
        );
    }
    // Counted once stored: a resend answered `duplicate` is not counted again.
    let (status, body) = post(
        &base,
        "/v1/events",
        &json!({ "userId": "rich", "sessionId": "r", "eventType": "PURCHASE",
                 "eventId": "rich-0", "properties": { "amount": 1e300 } }),
    )
    .await;
    assert_eq!(
        (status, &body["results"][0]["status"]),
        (200, &json!("duplicate"))
    );
    assert_eq!(unread_count().await - unread_before, 3.0);
    // A client's own `amountUnread` without an amount: no amount was unreadable, the
    // purchase merely has none.
    let (status, body) = post(
        &base,
        "/v1/events",
        &json!({ "userId": "rich", "sessionId": "r", "eventType": "PURCHASE",
                 "eventId": "rich-own", "properties": { "amountUnread": "see notes" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let warning = body["results"][0]["warning"].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("a PURCHASE without `properties.amount` counts no revenue"),
        "{body}"
    );
    assert_eq!(
        unread_count().await - unread_before,
        3.0,
        "not an amount unread"
    );
    let rich = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "rich" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sluice_core::model::count_in(&rich, "totalPurchases"),
        4,
        "{rich}"
    );
    assert_eq!(
        sluice_core::model::number_of(rich.get("totalRevenue").unwrap()),
        Some(0.0),
        "{rich}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_stores_everything_it_acknowledged() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let mut traffic = Traffic::new(3);
    let events = traffic.visitors(200, now_ms(), 3_600_000);
    let mut requests = Vec::new();
    for chunk in events.chunks(100) {
        let body = json!({ "batch": chunk });
        let ids: Vec<String> = body["batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["eventId"]
                    .as_str()
                    .expect("Traffic sends eventIds")
                    .to_string()
            })
            .collect();
        let url = format!("{base}/v1/events/batch");
        requests.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .ok()?;
            (resp.status() == 200).then_some(())?;
            resp.json::<Value>().await.ok().map(|body| (ids, body))
        }));
    }
    // Stop as soon as the first batch is written: the others are in flight.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server
        .metrics
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no batch was written");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    server.shutdown().await;
    // Requests cut before they reached a handler fail at the client (and are resent by
    // it); every event acknowledged as stored must be in MongoDB once the server has
    // stopped, each by its own eventId (a count could hide a lost one behind an event
    // stored but never acknowledged).
    let mut acknowledged = Vec::new();
    for r in requests {
        if let Some((ids, body)) = r.await.unwrap() {
            for result in body["results"].as_array().unwrap() {
                if result["status"] == "stored" {
                    acknowledged.push(ids[result["index"].as_u64().unwrap() as usize].clone());
                }
            }
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "some requests must have been answered before the stop"
    );
    let stored: HashSet<String> = db
        .store
        .collection("events")
        .distinct("eventId", doc! {})
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
}

/// Writes a small MaxMind-format city database with the real `mmdb-writer` package.
fn geoip_database() -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("sluice-geo-{}.mmdb", uuid::Uuid::new_v4().simple()));
    let script = r#"
import sys
from mmdb_writer import MMDBWriter
from netaddr import IPSet
w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type='GeoIP2-City',
               languages=['en'], description='sluice test')
w.insert_network(IPSet(['81.250.0.0/16']), {
    'country': {'iso_code': 'FR', 'names': {'en': 'France'}},
    'subdivisions': [{'iso_code': 'ARA', 'names': {'en': 'Auvergne-Rhone-Alpes'}}],
    'city': {'names': {'en': 'Lyon'}}})
w.insert_network(IPSet(['2001:db8:beef::/48']), {
    'country': {'iso_code': 'JP', 'names': {'en': 'Japan'}},
    'subdivisions': [{'iso_code': '13'}]})
w.to_db_file(sys.argv[1])
"#;
    support::run_python(script, [&path]);
    path
}

#[tokio::test]
async fn geoip_fills_country_region_and_city() {
    let db = TestDb::initialized().await;
    let mmdb = geoip_database();
    let path = mmdb.display().to_string();
    let server = start_server(&db, |raw| {
        raw.tracking.geoip_database = Some(path.clone());
    })
    .await;
    let base = format!("http://{}", server.addr);
    let event = |id: &str, ip: &str| {
        json!({ "eventId": id, "userId": format!("geo-{id}"), "sessionId": format!("s-{id}"),
                "eventType": "PAGE_VIEW", "context": { "ip": ip } })
    };
    let (status, answer) = post(
        &base,
        "/v1/events/batch",
        &json!({ "batch": [
            event("lyon", "81.250.7.9"),
            event("tokyo", "2001:db8:beef::1"),
            event("nowhere", "192.0.2.1"),
        ] }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let place = |id: &'static str| {
        let db = &db;
        async move {
            let e = db
                .store
                .collection("events")
                .find_one(doc! { "eventId": id })
                .await
                .unwrap()
                .unwrap();
            let m = e.get_document("metadata").unwrap().clone();
            let get = |k: &str| m.get_str(k).ok().map(str::to_string);
            (get("country"), get("region"), get("city"))
        }
    };
    assert_eq!(
        place("lyon").await,
        (
            Some("FR".into()),
            Some("Auvergne-Rhone-Alpes".into()),
            Some("Lyon".into())
        )
    );
    assert_eq!(
        place("tokyo").await,
        (Some("JP".into()), Some("13".into()), None)
    );
    assert_eq!(place("nowhere").await, (None, None, None));
    let session = db
        .store
        .collection("sessions")
        .find_one(doc! { "sessionId": "s-lyon" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.get_str("country").unwrap(), "FR");
    server.shutdown().await;

    // A database that cannot be read stops the server from starting, with its path.
    let config = support::test_config(&db.name, |raw| {
        raw.tracking.geoip_database = Some("/nonexistent/GeoLite2-City.mmdb".into());
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = sluice::server::start(config, db.store.clone(), listener, false)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("GeoLite2-City.mmdb") && err.contains("geoip_database"),
        "{err}"
    );
    std::fs::remove_file(mmdb).unwrap();
}

#[tokio::test]
async fn a_store_that_stops_answering_gets_a_503_not_a_hung_request() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (server, base, frozen) =
        freezable_server(&db, |raw| raw.tracking.write_timeout_seconds = 1).await;
    // A client that gives up long after the server's deadline: a hung request fails it.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(8))
        .build()
        .unwrap();
    let event = |id: &str| {
        json!({ "eventId": id, "userId": "v1", "sessionId": "s1", "eventType": "PAGE_VIEW",
                "timestamp": now_ms(), "pageUrl": "/a" })
    };
    let ok = client
        .post(format!("{base}/v1/events"))
        .json(&event("before"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);

    frozen.store(true, Ordering::SeqCst);
    let stuck = client
        .post(format!("{base}/v1/events"))
        .json(&event("during"))
        .send()
        .await
        .expect("answered, not hung");
    assert_eq!(stuck.status().as_u16(), 503);
    assert_eq!(stuck.headers()["retry-after"], "5");
    let body: Value = stuck.json().await.unwrap();
    assert_eq!(body["error"], "store_timeout", "{body}");
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("answered, not hung");
    assert_eq!(ready.status().as_u16(), 503);

    // The store answers again: the client resends, and the event is stored once.
    frozen.store(false, Ordering::SeqCst);
    let resent = client
        .post(format!("{base}/v1/events"))
        .json(&event("during"))
        .send()
        .await
        .unwrap();
    assert_eq!(resent.status().as_u16(), 200);
    // Stopped while the store hangs again, the server does not wait for it for ever.
    frozen.store(true, Ordering::SeqCst);
    let stuck = client
        .post(format!("{base}/v1/events"))
        .json(&event("at-shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(stuck.status().as_u16(), 503);
    tokio::time::timeout(std::time::Duration::from_secs(20), server.shutdown())
        .await
        .expect("the shutdown ends within its drain deadline");
    frozen.store(false, Ordering::SeqCst);
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! { "eventId": "during" })
        .await
        .unwrap();
    assert_eq!(stored, 1);
    let user = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "v1" })
        .await
        .unwrap()
        .unwrap();
    // `at-shutdown` was answered 503: whether its write landed or not, the client resends it.
    assert!((2..=3).contains(&int(&user, "totalEvents")), "{user}");
}

/// Over HTTP: a write MongoDB fails is answered 503 `store_unavailable`; a resend while
/// that insert may still land (its connection broke, unanswered) is answered 503 with the
/// event's result `retry`, not stored beside it; once it has landed, `duplicate`.
#[tokio::test]
async fn a_failed_write_and_an_insert_in_doubt_are_503s_that_store_nothing_twice() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (uri, armed, severed, deliver) =
        support::severing_mongo_proxy(b"insert\x00\x07\x00\x00\x00events\x00").await;
    // One attempt per insert (the driver's retry, delivered later too, is deduplicated
    // by MongoDB but not by every compatible server).
    let sep = if uri.contains('?') { '&' } else { '?' };
    let store = support::store_via(&format!("{uri}{sep}retryWrites=false"), &db.name).await;
    let config = support::test_config(&db.name, |_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sluice::server::start(config, store, listener, false)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let event = json!({ "eventId": "doubt-1", "userId": "v1", "sessionId": "s1",
                        "eventType": "PAGE_VIEW", "timestamp": now_ms(), "pageUrl": "/a" });
    let send = || {
        client
            .post(format!("{base}/v1/events/batch"))
            .json(&json!({ "batch": [event] }))
            .send()
    };
    armed.store(true, Ordering::SeqCst);
    let failed = send().await.unwrap();
    assert_eq!(failed.status().as_u16(), 503);
    assert_eq!(failed.headers()["retry-after"], "2");
    let body: Value = failed.json().await.unwrap();
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(severed.load(Ordering::SeqCst) >= 1);
    // MongoDB still answers its ping, but this replica's writes fail: not ready.
    let ready = || async {
        let resp = client.get(format!("{base}/readyz")).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    };
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("writes_failing"), "{body}");
    armed.store(false, Ordering::SeqCst);
    // The resend, at once: the first insert is still in flight (held by the proxy).
    let doubt = send().await.unwrap();
    assert_eq!(doubt.status().as_u16(), 503);
    // The claim is young: its write is most likely landing now.
    assert_eq!(doubt.headers()["retry-after"], "1");
    let body: Value = doubt.json().await.unwrap();
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["results"][0]["status"], "retry", "{body}");
    assert_eq!(body["stored"], 0, "{body}");
    // That write succeeded (its event is to be sent again, but the store took it): ready.
    let (status, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    // The held insert lands; the next resend finds the event stored.
    deliver.store(true, Ordering::SeqCst);
    let events = db.store.collection("events");
    support::wait_until("the held insert lands", || async {
        events
            .count_documents(doc! { "eventId": "doubt-1" })
            .await
            .unwrap()
            > 0
    })
    .await;
    let resent = send().await.unwrap();
    assert_eq!(resent.status().as_u16(), 200);
    let body: Value = resent.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "duplicate", "{body}");
    assert_eq!(
        events
            .count_documents(doc! { "eventId": "doubt-1" })
            .await
            .unwrap(),
        1
    );
    let user = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "v1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(int(&user, "totalEvents"), 1, "{user}");
    server.shutdown().await;
}

/// Requests wait up to `wait` for room; no writer counts as stuck.
fn admit(wait: std::time::Duration) -> sluice::server::Admission {
    sluice::server::Admission {
        wait,
        stuck_after: std::time::Duration::from_secs(3600),
    }
}

/// A batcher of `capacity` events over `writers` lanes (requests let in as `admission`
/// says), writing through a proxy whose store stops answering while the returned flag
/// is set.
async fn freezable_batcher(
    db: &TestDb,
    capacity: usize,
    writers: usize,
    admission: sluice::server::Admission,
) -> (
    sluice::server::Batcher,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    let (uri, frozen, held) = support::freezable_mongo_proxy_counting().await;
    let store = support::store_via(&uri, &db.name).await;
    let writer = EventWriter::new(store, WriterOptions::default());
    let (batcher, _writers) = sluice::server::Batcher::start(
        writer,
        capacity,
        500,
        writers,
        admission,
        std::sync::Arc::new(sluice::server::Metrics::default()),
    );
    (batcher, frozen, held)
}

/// `n` clicks of `visitor`, with eventIds `VISITOR-0`, `VISITOR-1`, ...
fn events(visitor: &str, n: usize) -> Vec<sluice_core::model::Event> {
    (0..n)
        .map(|i| click(&format!("{visitor}-{i}"), visitor))
        .collect()
}

/// A click of `visitor` (in session `s-VISITOR`), parsed as the endpoint parses it.
fn click(event_id: &str, visitor: &str) -> sluice_core::model::Event {
    let ctx = sluice_core::tracking::RequestContext {
        received_at_ms: now_ms(),
        batch_sent_at_ms: None,
        user_agent: None,
        ip: None,
        max_future_ms: 60_000,
        ..Default::default()
    };
    sluice_core::tracking::parse_event(
        &json!({ "eventId": event_id, "userId": visitor, "sessionId": format!("s-{visitor}"),
                 "eventType": "CLICK", "timestamp": now_ms() }),
        &ctx,
        Default::default(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_request_nobody_waits_for_any_more_is_not_written() {
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let db = TestDb::initialized().await;
    let (batcher, frozen, held) = freezable_batcher(&db, 1_000, 1, admit(Duration::ZERO)).await;
    let event = |id: &str| click(id, "v1");
    // The first request's write hangs on the store; the second queues behind it, and its
    // handler gives up (a client that hung up, or the endpoint's write deadline).
    frozen.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let (b, e) = (batcher.clone(), event("first"));
        async move { b.submit(vec![e], None).await }
    });
    // The writer has taken it (its write is held at the store): the next one queues.
    support::wait_until("the first write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        batcher.submit(vec![event("abandoned")], None),
    )
    .await;
    assert!(gave_up.is_err());
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().unwrap(), vec![WriteStatus::Stored]);
    assert_eq!(
        batcher.submit(vec![event("next")], None).await.unwrap(),
        vec![WriteStatus::Stored]
    );
    let stored: Vec<String> = all(&db, "events", doc! { "eventId": 1 })
        .await
        .iter()
        .map(|e| e.get_str("eventId").unwrap().to_string())
        .collect();
    assert_eq!(stored, ["first", "next"]);
}

#[tokio::test]
async fn a_closed_queue_refuses_new_requests_and_still_writes_what_it_holds() {
    use sluice::server::SubmitError;
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (batcher, frozen, held) =
        freezable_batcher(&db, 1_000, 1, admit(std::time::Duration::ZERO)).await;
    // One write held at the store, one request queued behind it.
    frozen.store(true, Ordering::SeqCst);
    let submit = |id: &'static str| {
        let b = batcher.clone();
        tokio::spawn(async move { b.submit(vec![click(id, "v1")], None).await })
    };
    let writing = submit("writing");
    support::wait_until("the first write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    let queued = submit("queued");
    support::wait_until("the second request is queued", || async {
        batcher.depth() == 2
    })
    .await;
    // The shutdown closes the queue: a request arriving now is refused (the endpoint
    // answers it 503 `shutting_down`), and nothing of it is written.
    batcher.close();
    let late = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        batcher.submit(vec![click("late", "v1")], None),
    )
    .await;
    assert!(
        matches!(late, Ok(Err(SubmitError::Closed))),
        "queued behind the held write instead of refused"
    );
    // What was queued before is still written, and acknowledged.
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(writing.await.unwrap().unwrap(), vec![WriteStatus::Stored]);
    assert_eq!(queued.await.unwrap().unwrap(), vec![WriteStatus::Stored]);
    let stored: Vec<String> = all(&db, "events", doc! { "eventId": 1 })
        .await
        .iter()
        .map(|e| e.get_str("eventId").unwrap().to_string())
        .collect();
    assert_eq!(stored, ["queued", "writing"]);
}

#[tokio::test]
async fn a_client_trickling_its_body_does_not_hold_the_shutdown_up() {
    use tokio::io::AsyncWriteExt;
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| raw.tracking.write_timeout_seconds = 1).await;
    // A request whose body never finishes arriving.
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"eventId\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(40), server.shutdown())
        .await
        .expect("the shutdown ends after its grace period");
    // The grace period is the write deadline and ten seconds more.
    assert!(started.elapsed() >= std::time::Duration::from_secs(10));
    drop(slow);
}

#[tokio::test]
async fn a_slow_writer_lane_fills_its_share_of_the_queue_not_the_whole_queue() {
    use sluice::server::SubmitError;
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let db = TestDb::initialized().await;
    // Two lanes of 10 events each.
    let (batcher, frozen, held) = freezable_batcher(&db, 20, 2, admit(Duration::ZERO)).await;
    let hot = "hot-visitor";
    let other = (0..100)
        .map(|i| format!("v{i}"))
        .find(|v| batcher.lane(v) != batcher.lane(hot))
        .unwrap();
    let events = |visitor: &str, from: usize, n: usize| -> Vec<_> {
        (from..from + n)
            .map(|i| click(&format!("{visitor}-{i}"), visitor))
            .collect()
    };
    // The hot visitor's lane is stuck on the store with its share full.
    frozen.store(true, Ordering::SeqCst);
    let stuck = tokio::spawn({
        let (b, e) = (batcher.clone(), events(hot, 0, 10));
        async move { b.submit(e, None).await }
    });
    support::wait_until("the hot lane's write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(matches!(
        batcher.submit(events(hot, 10, 1), None).await,
        Err(SubmitError::Full)
    ));
    // Another lane still takes events: queued (waiting on the store), not refused.
    let queued = tokio::spawn({
        let (b, e) = (batcher.clone(), events(&other, 0, 5));
        async move { b.submit(e, None).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "refused at once: {:?}", queued.await);
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(stuck.await.unwrap().unwrap(), vec![WriteStatus::Stored; 10]);
    assert_eq!(queued.await.unwrap().unwrap(), vec![WriteStatus::Stored; 5]);
}

/// A request that does not fit waits for room, and the requests after it wait behind it:
/// a large batch (an app back online) is let in as the writer drains instead of being
/// refused each time small requests took the room first.
#[tokio::test]
async fn a_large_request_waits_for_room_and_small_ones_do_not_pass_it() {
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let db = TestDb::initialized().await;
    let (batcher, frozen, held) =
        freezable_batcher(&db, 10, 1, admit(Duration::from_secs(30))).await;
    let submit = |e: Vec<_>| {
        let b = batcher.clone();
        tokio::spawn(async move { b.submit(e, None).await })
    };
    // Six of the ten places are held by a write the store does not answer.
    frozen.store(true, Ordering::SeqCst);
    let writing = submit(events("a", 6));
    support::wait_until("the first write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    // Eight do not fit in the four left: the request waits (it was refused at once).
    let large = submit(events("b", 8));
    support::wait_until("the large request waits", || async {
        batcher.waiting() == 1
    })
    .await;
    // One would fit in the four left, but it came after the large one: it waits too.
    let small = submit(events("c", 1));
    support::wait_until("the small request waits behind it", || async {
        batcher.waiting() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!large.is_finished() && !small.is_finished());
    assert_eq!(
        batcher.depth(),
        10,
        "the room left is set aside for the large one"
    );
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(
        writing.await.unwrap().unwrap(),
        vec![WriteStatus::Stored; 6]
    );
    assert_eq!(large.await.unwrap().unwrap(), vec![WriteStatus::Stored; 8]);
    assert_eq!(small.await.unwrap().unwrap(), vec![WriteStatus::Stored; 1]);
    assert_eq!(batcher.waiting(), 0);
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        15
    );
}

/// Past `queue_wait` a request that found no room is refused, and gives back the room
/// it had set aside.
#[tokio::test]
async fn a_request_waiting_for_room_past_its_wait_is_refused() {
    use sluice::server::SubmitError;
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let db = TestDb::initialized().await;
    let (batcher, frozen, held) =
        freezable_batcher(&db, 10, 1, admit(Duration::from_millis(300))).await;
    frozen.store(true, Ordering::SeqCst);
    let writing = tokio::spawn({
        let (b, e) = (batcher.clone(), events("a", 6));
        async move { b.submit(e, None).await }
    });
    support::wait_until("the first write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    let started = Instant::now();
    assert!(matches!(
        batcher.submit(events("b", 8), None).await,
        Err(SubmitError::Full)
    ));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "refused before its wait"
    );
    assert_eq!(batcher.waiting(), 0);
    assert_eq!(
        batcher.depth(),
        6,
        "the room it had set aside is free again"
    );
    // The four places left take a request that fits, at once.
    let small = tokio::spawn({
        let (b, e) = (batcher.clone(), events("c", 4));
        async move { b.submit(e, None).await }
    });
    support::wait_until("the small request is queued", || async {
        batcher.depth() == 10
    })
    .await;
    assert_eq!(batcher.waiting(), 0);
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(
        writing.await.unwrap().unwrap(),
        vec![WriteStatus::Stored; 6]
    );
    assert_eq!(small.await.unwrap().unwrap(), vec![WriteStatus::Stored; 4]);
}

/// A request waiting on a stuck lane holds no room in the others (their writers would
/// sit idle), and a shutdown refuses the waiting requests at once.
#[tokio::test]
async fn a_request_waiting_on_a_stuck_lane_holds_nothing_elsewhere() {
    use sluice::server::SubmitError;
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let db = TestDb::initialized().await;
    // Two lanes of 10 events each; the stuck one is the later lane.
    let (batcher, frozen, held) =
        freezable_batcher(&db, 20, 2, admit(Duration::from_secs(30))).await;
    let visitor = |lane: usize, skip: usize| {
        (0..200)
            .map(|i| format!("v{i}"))
            .filter(|v| batcher.lane(v) == lane)
            .nth(skip)
            .unwrap()
    };
    let (hot, other) = (visitor(1, 0), visitor(0, 0));
    let events = |visitor: &str, from: usize, n: usize| -> Vec<_> {
        (from..from + n)
            .map(|i| click(&format!("{visitor}-{i}"), visitor))
            .collect()
    };
    let submit = |e: Vec<_>| {
        let b = batcher.clone();
        tokio::spawn(async move { b.submit(e, None).await })
    };
    frozen.store(true, Ordering::SeqCst);
    let stuck = submit(events(&hot, 0, 10));
    support::wait_until("the stuck lane's write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    // Five events of each lane: it waits on the stuck lane.
    let mut both = events(&other, 0, 5);
    both.extend(events(&hot, 10, 5));
    let spanning = submit(both);
    support::wait_until("the request waits", || async { batcher.waiting() == 1 }).await;
    // The other lane still has its whole share: ten events are queued at once.
    let whole = submit(events(&visitor(0, 1), 0, 10));
    support::wait_until("the other lane's share is queued", || async {
        batcher.depth() == 20
    })
    .await;
    assert_eq!(
        batcher.waiting(),
        1,
        "the other lane's request did not wait"
    );
    // A shutdown refuses what waits, at once.
    let waiting = submit(events(&visitor(1, 2), 0, 2));
    support::wait_until("two requests wait", || async { batcher.waiting() == 2 }).await;
    batcher.close();
    let closed = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(
        matches!(closed, Ok(Ok(Err(SubmitError::Closed)))),
        "{closed:?}"
    );
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(stuck.await.unwrap().unwrap(), vec![WriteStatus::Stored; 10]);
    assert_eq!(whole.await.unwrap().unwrap(), vec![WriteStatus::Stored; 10]);
    // The spanning request was refused by the shutdown too, or let in before it.
    let spanning = spanning.await.unwrap();
    assert!(
        matches!(spanning, Err(SubmitError::Closed)) || spanning.is_ok(),
        "{spanning:?}"
    );
}

/// A writer that has taken or finished no write for `stuck_after` while its share is
/// full is stuck: its requests are refused at once, not after their wait, so they do not
/// pile up holding connections and in-flight bytes.
#[tokio::test]
async fn requests_for_a_stuck_writer_are_refused_at_once() {
    use sluice::server::{Admission, SubmitError};
    use sluice_connectors::mongo::WriteStatus;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let db = TestDb::initialized().await;
    let admission = Admission {
        wait: Duration::from_secs(30),
        stuck_after: Duration::from_millis(500),
    };
    let (batcher, frozen, held) = freezable_batcher(&db, 10, 1, admission).await;
    frozen.store(true, Ordering::SeqCst);
    let writing = tokio::spawn({
        let (b, e) = (batcher.clone(), events("a", 10));
        async move { b.submit(e, None).await }
    });
    support::wait_until("the write reaches the store", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Well within its 30 s wait.
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        batcher.submit(events("b", 1), None),
    )
    .await;
    assert!(matches!(refused, Ok(Err(SubmitError::Full))), "{refused:?}");
    assert_eq!(batcher.waiting(), 0);
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(
        writing.await.unwrap().unwrap(),
        vec![WriteStatus::Stored; 10]
    );
    // Writing again, it is not stuck: a request waits for room and gets in.
    assert_eq!(
        batcher.submit(events("c", 10), None).await.unwrap(),
        vec![WriteStatus::Stored; 10]
    );
}

/// With `server_write_keys` set, a browser's (public) key cannot say where its events came
/// from: `context.ip`, `context.userAgent` and Segment's `context.location` are ignored
/// for the request's own (the Segment ones kept in `metadata.context` as sent); a
/// server-side source's key can, on behalf of its users.
#[tokio::test]
async fn only_server_side_keys_may_say_where_an_event_came_from() {
    use sluice_core::config::Secret;
    const BROWSER: &str = "wk_browser_1234";
    const SERVER: &str = "wk_server_5678";
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![Secret::new(BROWSER)];
        raw.server.server_write_keys = vec![Secret::new(SERVER)];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let claimed = json!({ "ip": "198.51.100.7", "userAgent": "Claimed/1.0" });
    for (key, id) in [(BROWSER, "from-browser"), (SERVER, "from-server")] {
        let r = client
            .post(format!("{base}/v1/events"))
            .header("x-write-key", key)
            .header("user-agent", "Requesting/2.0")
            .json(&json!({ "eventId": id, "userId": "v", "sessionId": "s",
                           "eventType": "CLICK", "context": claimed }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
        // A native batch saying it in its own context.
        let r = client
            .post(format!("{base}/v1/events/batch"))
            .header("x-write-key", key)
            .header("user-agent", "Requesting/2.0")
            .json(
                &json!({ "batch": [ { "eventId": format!("batch-{id}"), "userId": "v",
                           "sessionId": "s", "eventType": "CLICK" } ], "context": claimed }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
        // Segment, with the key in the body and a claimed location.
        let r = client
            .post(format!("{base}/v1/batch"))
            .json(&json!({ "writeKey": key, "batch": [
                { "type": "track", "messageId": format!("seg-{id}"), "userId": "v",
                  "event": "Clicked",
                  "context": { "ip": "198.51.100.7", "userAgent": "Claimed/1.0",
                               "location": { "country": "Atlantis" } } } ] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }
    let metadata = |id: &'static str| {
        let events = db.store.collection("events");
        async move {
            events
                .find_one(doc! { "eventId": id })
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{id} stored"))
                .get_document("metadata")
                .unwrap()
                .clone()
        }
    };
    for id in ["from-browser", "batch-from-browser", "seg-from-browser"] {
        let m = metadata(id).await;
        assert_eq!(m.get_str("ipAddress").unwrap(), "127.0.0.1", "{id}: {m}");
        assert!(m.get_str("country").is_err(), "{id}: {m}");
        if id != "seg-from-browser" {
            assert_eq!(m.get_str("userAgent").unwrap(), "Requesting/2.0", "{m}");
        } else {
            // reqwest's own user agent is none; the claim is kept, unused.
            assert_ne!(m.get_str("userAgent").ok(), Some("Claimed/1.0"), "{m}");
            let sent = m.get_document("context").unwrap();
            assert_eq!(sent.get_str("ip").unwrap(), "198.51.100.7", "{m}");
            assert_eq!(
                sent.get_document("location")
                    .unwrap()
                    .get_str("country")
                    .unwrap(),
                "Atlantis"
            );
        }
    }
    for id in ["from-server", "batch-from-server", "seg-from-server"] {
        let m = metadata(id).await;
        assert_eq!(m.get_str("ipAddress").unwrap(), "198.51.100.7", "{id}: {m}");
        assert_eq!(m.get_str("userAgent").unwrap(), "Claimed/1.0", "{id}: {m}");
    }
    assert_eq!(
        metadata("seg-from-server")
            .await
            .get_str("country")
            .unwrap(),
        "Atlantis"
    );
    // A key that is neither is refused, whichever list is set.
    let r = client
        .post(format!("{base}/v1/events"))
        .header("x-write-key", "wk_other_0000")
        .json(&json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    server.shutdown().await;

    // Server keys alone: a browser without a key is turned away (config check warns).
    let server = start_server(&db, |raw| {
        raw.server.server_write_keys = vec![Secret::new(SERVER)];
    })
    .await;
    let base = format!("http://{}", server.addr);
    for (key, status) in [(None, 401), (Some(SERVER), 200)] {
        let mut req = client
            .post(format!("{base}/v1/events"))
            .json(&json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK" }));
        if let Some(k) = key {
            req = req.header("x-write-key", k);
        }
        assert_eq!(
            req.send().await.unwrap().status().as_u16(),
            status,
            "{key:?}"
        );
    }
    server.shutdown().await;
}

/// What is logged about a request's events names the write key that sent them (which
/// source sends invalid events), by its place in the config, never the key itself: on
/// the native API and the Segment one.
#[tokio::test]
async fn logs_name_the_write_key_by_its_place_not_its_value() {
    use sluice_core::config::Secret;
    const FIRST: &str = "wk_first_1234";
    const SECOND: &str = "wk_second_5678";
    const SERVER: &str = "wk_server_9012";
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![Secret::new(FIRST), Secret::new(SECOND)];
        raw.server.server_write_keys = vec![Secret::new(SERVER)];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    // Rejections are logged once a second at most, process-wide, so another test's may
    // take a second's turn: send until ours is logged.
    let mut seen = (false, false);
    for _ in 0..50 {
        if !seen.0 {
            let r = client
                .post(format!("{base}/v1/events/batch"))
                .header("x-write-key", SECOND)
                .json(&json!({ "batch": [{ "userId": "v", "eventType": "NOT_A_TYPE" },
                                         { "userId": "v", "sessionId": "s", "eventType": "CLICK" }] }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        if !seen.1 {
            let r = client
                .post(format!("{base}/v1/batch"))
                .json(&json!({ "writeKey": SERVER,
                               "batch": [{ "type": "track", "userId": "u", "event": "Bad",
                                           "timestamp": "not a time" },
                                         { "type": "track", "userId": "u", "event": "Good" }] }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        let text = logged.text();
        let rejected = |key: &str| {
            text.lines()
                .any(|l| l.contains("event rejected") && l.contains(&format!("write_key={key}")))
        };
        seen = (rejected("write_keys[1]"), rejected("server_write_keys[0]"));
        if seen == (true, true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    drop(guard);
    let text = logged.text();
    assert_eq!(seen, (true, true), "{text}");
    for key in [FIRST, SECOND, SERVER] {
        assert!(!text.contains(key), "a key was logged: {text}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn headers_trickled_in_or_an_idle_connection_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| raw.server.header_timeout_seconds = 1).await;
    // Half a request's headers, then nothing.
    let mut trickling = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    trickling
        .write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-")
        .await
        .unwrap();
    // A connection that never sends anything.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    for conn in [&mut trickling, &mut idle] {
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_to_end(&mut rest),
        )
        .await
        .expect("the server closes the connection")
        .ok();
    }
    // A whole request is still answered, and a kept-alive connection serves a second.
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let r = client
            .get(format!("http://{}/healthz", server.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| raw.server.max_connections = 2).await;
    let first = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Both taken by the server before the third arrives.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(700),
        third.read_to_end(&mut answer),
    )
    .await;
    assert!(waited.is_err(), "answered while two connections were open");
    drop(first);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        third.read_to_end(&mut answer),
    )
    .await
    .expect("answered once a connection closed")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("sluice_http_connections_open 2"),
        "{answer}"
    );
    drop(second);
    server.shutdown().await;
}

#[tokio::test]
async fn a_body_trickled_in_past_the_deadline_is_answered_408_and_its_connection_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| raw.server.body_timeout_seconds = 1).await;
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"userId\":",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    // The server answers, then closes: read to the end (bounded, should it not close).
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("the server closes the connection")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );

    // A body beyond any route's limit is refused before a route reads it.
    let huge = "x".repeat(3 * 1024 * 1024);
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/events/batch", server.addr))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large", "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_ops_address_answers_probes_while_the_public_one_is_full_and_turns_unready_on_shutdown()
{
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    // Writes (they carry a `wtimeout`) can be held; the readiness ping passes.
    let (uri, hold, held) = support::holding_mongo_proxy(b"wtimeout").await;
    let store = support::store_via(&uri, &db.name).await;
    let config = support::test_config(&db.name, |raw| {
        raw.server.max_connections = 1;
        raw.server.ops_listen = "127.0.0.1:0".into();
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sluice::server::start(config, store, listener, false)
        .await
        .unwrap();
    let ops = format!(
        "http://{}",
        server.ops_addr.expect("the ops address is served")
    );
    let base = format!("http://{}", server.addr);
    // One client holds the public listener's only connection.
    let _held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    support::wait_until("the held connection is counted", || async {
        let text = reqwest::get(format!("{ops}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines().any(|l| l == "sluice_http_connections_open 1")
    })
    .await;
    let quick = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(
        quick.get(format!("{base}/healthz")).send().await.is_err(),
        "the public listener is full"
    );
    // Longer than `/readyz` gives MongoDB (2 s); no answer at all counts as 0.
    let probe = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let status = |path: &'static str| {
        let (probe, ops) = (probe.clone(), ops.clone());
        async move {
            probe
                .get(format!("{ops}{path}"))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16())
        }
    };
    assert_eq!(status("/healthz").await, 200);
    assert_eq!(status("/readyz").await, 200);
    assert_eq!(status("/v1/events").await, 404, "no client endpoint there");
    drop(_held);
    // The metrics are served on the ops address only, once there is one. (A connection
    // not kept: it would hold the public listener's only place.)
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let public_metrics = once
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(public_metrics, 404);
    assert_eq!(status("/metrics").await, 200);
    // A request whose write is held keeps the shutdown draining: meanwhile the replica
    // says it is not ready (MongoDB answers its ping), on the ops address that still
    // answers.
    assert_eq!(status("/readyz").await, 200);
    hold.store(true, Ordering::SeqCst);
    let pending = tokio::spawn({
        let base = base.clone();
        async move {
            post(
                &base,
                "/v1/events",
                &json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK" }),
            )
            .await
        }
    });
    support::wait_until("the event's write is held", || async {
        held.load(Ordering::SeqCst) > 0
    })
    .await;
    // A scraper's keep-alive connection to the ops address, idle between scrapes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut scraper = tokio::net::TcpStream::connect(server.ops_addr.unwrap())
        .await
        .unwrap();
    scraper
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: ops\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = scraper.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let stopping = tokio::spawn(server.shutdown());
    support::wait_until("readiness turns 503 while draining", || async {
        status("/readyz").await == 503
    })
    .await;
    hold.store(false, Ordering::SeqCst);
    let _ = pending.await;
    stopping.await.unwrap();
    // The ops listener is gone with the server, and so is its idle connection.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), scraper.read(&mut buf))
        .await
        .expect("the ops listener's open connection was left open after the shutdown");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

/// A transaction left open on a session (as one a stopped replica leaves until MongoDB
/// aborts it) makes the writer's transactions meet write conflicts: the answer says so,
/// rather than that MongoDB did not answer, and the resend after it ends is stored.
#[tokio::test]
async fn a_write_held_by_another_transaction_says_so() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| raw.tracking.write_timeout_seconds = 2).await;
    let base = format!("http://{}", server.addr);
    let event = |id: &str| json!({ "eventId": id, "userId": "held-v", "sessionId": "held-s", "eventType": "CLICK" });
    let (s, body) = post(&base, "/v1/events", &event("h1")).await;
    assert_eq!(s, 200, "{body}");
    let client = db.store.client().clone();
    let mut other = client.start_session().await.unwrap();
    other.start_transaction().await.unwrap();
    db.store
        .collection("sessions")
        .update_one(
            doc! { "sessionId": "held-s" },
            doc! { "$set": { "heldBy": "another transaction" } },
        )
        .session(&mut other)
        .await
        .unwrap();
    let (s, body) = post(&base, "/v1/events", &event("h2")).await;
    assert_eq!(s, 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("MongoDB answered write conflicts on the sessions or profiles"),
        "{body}"
    );
    assert!(!message.contains("did not answer"), "{body}");
    other.abort_transaction().await.unwrap();
    support::wait_until("the resend is stored once the transaction ends", || async {
        let (s, body) = post(&base, "/v1/events", &event("h2")).await;
        s == 200 && body["results"][0]["status"] != "retry"
    })
    .await;
    let stored = db
        .store
        .collection("events")
        .count_documents(doc! { "eventId": "h2" })
        .await
        .unwrap();
    assert_eq!(stored, 1);
    // A claim in the ledger held the same way (an insert of the same eventId, not yet
    // committed): the conflict comes back per document of the claims' insert, and is
    // said as one too.
    let mut other = client.start_session().await.unwrap();
    other.start_transaction().await.unwrap();
    db.store
        .collection("event_ids")
        .insert_one(doc! { "_id": "h3", "at": bson::DateTime::now() })
        .session(&mut other)
        .await
        .unwrap();
    let (s, body) = post(&base, "/v1/events", &event("h3")).await;
    other.abort_transaction().await.unwrap();
    assert_eq!(s, 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("MongoDB answered write conflicts"),
        "{body}"
    );
    server.shutdown().await;
}

/// Counters that first count a failure exist at 0 from the start (an alert's `increase`
/// sees the first failure), and the process metrics are there.
#[tokio::test]
async fn metrics_of_failures_exist_at_zero_from_the_start_with_the_process_metrics() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let text = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "sluice_dead_letters_total{pipeline=\"tracking\"}",
        "sluice_dead_letters_total{pipeline=\"import\"}",
        "sluice_events_timestamp_clamped_total",
        "sluice_user_revenue_saturated_total",
        "sluice_background_errors_total{task=\"session_sweeper\"}",
        "sluice_background_errors_total{task=\"job_gauges\"}",
        "sluice_events_rejected_total{reason=\"transform_error\"}",
        "sluice_events_rejected_total{reason=\"transform_busy\"}",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{series} "))),
            "{series} missing:\n{text}"
        );
    }
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert!(value("process_resident_memory_bytes") > 1e6);
    // The limits the usage gauges fill up to, from the config.
    assert_eq!(value("sluice_ingest_queue_capacity_events"), 20_000.0);
    assert_eq!(value("sluice_ingest_queue_waiting_requests"), 0.0);
    assert_eq!(
        value("sluice_http_in_flight_max_bytes"),
        64.0 * 1024.0 * 1024.0
    );
    assert_eq!(value("sluice_http_connections_max"), 10_000.0);
    assert!(value("process_open_fds") >= 3.0);
    let started = value("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(started > now - 3_600.0 && started <= now, "{started}");
    assert!(text.contains("sluice_build_info{version=\""), "{text}");
    server.shutdown().await;
}

/// `Prefer: return=minimal` keeps a batch's counts and lists only the results that say
/// more than `stored` or `duplicate`, each with its index.
#[tokio::test]
async fn a_minimal_batch_answer_lists_only_results_that_say_more_than_stored() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let batch = json!({ "batch": [
        { "eventId": "min-1", "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW", "pageUrl": "/a" },
        { "eventId": "min-1", "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW", "pageUrl": "/a" },
        { "eventId": "min-2", "userId": "v", "sessionId": "s", "eventType": "NOT_A_TYPE" },
        { "eventId": "min-3", "userId": "v", "sessionId": "s", "eventType": "PURCHASE" },
        { "eventId": "min-4", "userId": "v", "sessionId": "s", "eventType": "CLICK", "colour": "red" },
    ]});
    let send = |prefer: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(format!("{base}/v1/events/batch"))
            .json(&batch);
        if let Some(p) = prefer {
            req = req.header("prefer", p);
        }
        req.send()
    };
    let full = send(None).await.unwrap();
    assert!(full.headers().get("preference-applied").is_none());
    let full: Value = full.json().await.unwrap();
    assert_eq!(full["results"].as_array().unwrap().len(), 5, "{full}");
    for prefer in ["return=minimal", "respond-async, RETURN = \"Minimal\"; x=1"] {
        let resp = send(Some(prefer)).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["preference-applied"], "return=minimal");
        let vary: Vec<&str> = resp
            .headers()
            .get_all("vary")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert!(vary.iter().any(|v| v.contains("prefer")), "{vary:?}");
        let body: Value = resp.json().await.unwrap();
        // Everything was sent before: the counts are the resend's.
        assert_eq!(
            (&body["stored"], &body["duplicates"], &body["rejected"]),
            (&json!(0), &json!(4), &json!(1)),
            "{body}"
        );
        let listed: Vec<(i64, &str)> = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["index"].as_i64().unwrap(), r["status"].as_str().unwrap()))
            .collect();
        // The rejected event, the purchase with a warning, the event with a member ignored.
        assert_eq!(
            listed,
            vec![(2, "rejected"), (3, "duplicate"), (4, "duplicate")],
            "{body}"
        );
        assert!(body["results"][1]["warning"].is_string(), "{body}");
        assert_eq!(body["results"][2]["ignored"], json!(["colour"]), "{body}");
    }
    // Another preference is not this one.
    let resp = send(Some("return=representation")).await.unwrap();
    assert!(resp.headers().get("preference-applied").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["results"].as_array().unwrap().len(), 5, "{body}");
    server.shutdown().await;
}

/// A write that does not end (a write concern waited on) makes the replica unready once a
/// request gave up on it, although MongoDB answers its ping; it is ready again once a
/// write succeeds.
#[tokio::test]
async fn a_replica_whose_writes_do_not_end_is_not_ready() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    // Writes (they carry a `wtimeout`) can be held; the readiness ping passes.
    let (uri, hold, held) = support::holding_mongo_proxy(b"wtimeout").await;
    let store = support::store_via(&uri, &db.name).await;
    let config = support::test_config(&db.name, |raw| {
        raw.tracking.write_timeout_seconds = 1;
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sluice::server::start(config, store, listener, false)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let ready = || async {
        let resp = reqwest::get(format!("{base}/readyz")).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    hold.store(true, Ordering::SeqCst);
    let event =
        json!({ "eventId": "slow-1", "userId": "v", "sessionId": "s", "eventType": "CLICK" });
    let (status, body) = post(&base, "/v1/events", &event).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("store_timeout")),
        "{body}"
    );
    assert!(held.load(Ordering::SeqCst) > 0);
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("writes_failing"), "{body}");
    // The held write ends; the resend is answered, and the replica is ready again.
    hold.store(false, Ordering::SeqCst);
    support::wait_until("the resend is answered", || async {
        let (status, body) = post(&base, "/v1/events", &event).await;
        status == 200 && body["results"][0]["status"] == "duplicate"
    })
    .await;
    assert_eq!(ready().await.0, 200);
    server.shutdown().await;
}

/// `tracking.max_in_flight_per_client_mb`: one client address trickling large bodies
/// holds its share of the in-flight bytes, not the whole; its further requests are
/// answered 429, other addresses are served, and its share comes back with its
/// connections.
#[tokio::test]
async fn one_client_address_holds_at_most_its_share_of_the_bytes_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.tracking.max_in_flight_mb = 16;
        raw.tracking.max_in_flight_per_client_mb = 2;
        raw.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let addr = server.addr.to_string();
    // Bodies of 400,000 bytes stalled after 349,523, from one address behind the proxy.
    let stall = |client: &'static str| {
        let addr = addr.clone();
        async move {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!(
                "POST /v1/events/batch HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {client}\r\ncontent-type: application/json\r\ncontent-length: 400000\r\n\r\n"
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.write_all(&vec![b' '; 349_523]).await.unwrap();
            conn
        }
    };
    // Six fit in 2 MiB, with 14 bytes to spare; the seventh does not.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(stall("203.0.113.5").await);
    }
    support::wait_until("the six bodies are read", || async {
        in_flight_bytes(&base).await == 6 * 349_523
    })
    .await;
    let mut seventh = stall("203.0.113.5").await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        seventh.read(&mut answer),
    )
    .await
    .expect("answered before its body is whole")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("max_in_flight_per_client_mb"), "{answer}");
    let send = |client: &'static str, id: &'static str| {
        let base = base.clone();
        async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/events"))
                .header("x-forwarded-for", client)
                .json(&json!({ "userId": "v-share", "sessionId": "s-share", "eventType": "CLICK", "eventId": id }))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    // That address is turned away; another is served.
    let (status, body) = send("203.0.113.5", "share-1").await;
    assert_eq!(status, 429, "{body}");
    let (status, body) = send("203.0.113.9", "share-2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        support::metric(
            &base,
            "sluice_requests_rate_limited_total{limit=\"client_bytes\"}"
        )
        .await,
        2.0
    );
    // Its connections closed, its share is free again.
    drop(held);
    support::wait_until("the address's share is given back", || async {
        send("203.0.113.5", "share-3").await.0 == 200
    })
    .await;
    // What a small body asks for beyond itself counts too: a Segment batch's `context`,
    // copied into each of its messages (30,000 bytes x 20 here), with 349,537 bytes of
    // the share left...
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(stall("203.0.113.5").await);
    }
    support::wait_until("the five bodies are read", || async {
        in_flight_bytes(&base).await == 5 * 349_523
    })
    .await;
    let segment = |messages: usize| {
        let base = base.clone();
        async move {
            let batch: Vec<Value> = (0..messages)
                .map(|i| json!({ "type": "track", "userId": "v-ctx", "event": "E", "messageId": format!("ctx-{messages}-{i}") }))
                .collect();
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/batch"))
                .header("x-forwarded-for", "203.0.113.5")
                .json(&json!({ "batch": batch, "context": { "pad": "x".repeat(30_000) } }))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (status, body) = segment(20).await;
    assert_eq!(status, 429, "{body}");
    // ...while a request its address holds nothing beside may go beyond the share
    // (2,400,000 bytes of copies here): a batch answered 413 would be dropped.
    drop(held);
    support::wait_until("the address's share is given back", || async {
        in_flight_bytes(&base).await == 0
    })
    .await;
    let (status, body) = segment(80).await;
    assert_eq!(status, 200, "{body}");
    // Up to a quarter of the whole bound (4 MiB here): past it, never from one address.
    let (status, body) = segment(150).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("more than one client address may hold"),
        "{body}"
    );
    server.shutdown().await;
}

/// Events left queued after their request was answered (a store that stopped answering)
/// hold the whole bound's bytes, not their client's share: its resends are answered as
/// the store's failure, not as the client's fault.
#[tokio::test]
async fn events_queued_after_their_answer_do_not_hold_their_client_s_share() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    let (server, base, frozen) = freezable_server(&db, |raw| {
        raw.tracking.max_batch_bytes = 1_000_000;
        raw.tracking.max_in_flight_mb = 8;
        raw.tracking.max_in_flight_per_client_mb = 2;
        raw.tracking.write_timeout_seconds = 1;
        raw.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    // Batches of about 900 KB from one address: two fit in its 2 MiB share, three do not.
    let batch = |n: usize| {
        let events: Vec<Value> = (0..30)
            .map(|i| json!({ "userId": format!("q{n}-{i}"), "sessionId": format!("q{n}"), "eventType": "CLICK", "eventId": format!("queued{n}-{i}"), "properties": { "pad": "x".repeat(29_000) } }))
            .collect();
        json!({ "batch": events })
    };
    let send = |n: usize| {
        let base = base.clone();
        async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/events/batch"))
                .header("x-forwarded-for", "198.51.100.7")
                .json(&batch(n))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    frozen.store(true, Ordering::SeqCst);
    for n in 0..3 {
        let (status, body) = send(n).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("store_timeout")),
            "batch {n}: {body}"
        );
    }
    // Their events are still queued, holding their bytes of the whole bound.
    assert!(in_flight_bytes(&base).await > 2 * 870_000);
    frozen.store(false, Ordering::SeqCst);
    server.shutdown().await;
}
