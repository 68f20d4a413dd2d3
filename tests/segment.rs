//! The Segment-compatible API end to end: the real `@segment/analytics-node` SDK against
//! a running server (through a proxy that loses some answers, so the SDK retries), and
//! identity merging, session splitting, gzip and per-message errors over raw HTTP.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bson::{doc, Document};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use support::{start_server, TestDb};

const KEY: &str = "wk_segment_test";
const MIN: i64 = 60_000;

/// A server that takes the write key `KEY` only.
async fn keyed_server(db: &TestDb) -> sluice::server::ServerHandle {
    start_server(db, |raw| {
        raw.server.write_keys = vec![sluice_core::config::Secret::new(KEY)];
    })
    .await
}

async fn find(db: &TestDb, coll: &str, filter: Document) -> Vec<Document> {
    db.store
        .collection(coll)
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn user(db: &TestDb, visitor: &str) -> Document {
    find(db, "users", doc! { "visitorId": visitor })
        .await
        .pop()
        .unwrap_or_else(|| panic!("no user {visitor}"))
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn t0() -> i64 {
    // Three hours ago, on a whole minute.
    (chrono::Utc::now().timestamp_millis() - 3 * 3_600_000) / MIN * MIN
}

/// Forwards SDK requests to the server; the answer to every fourth request is replaced by
/// a 500 after the server stored the batch, as when a response is lost on the way back.
struct LossyProxy {
    target: String,
    client: reqwest::Client,
    requests: AtomicU64,
    lost: AtomicU64,
    retries: AtomicU64,
    duplicates_on_retry: AtomicU64,
}

async fn forward(
    State(p): State<Arc<LossyProxy>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let n = p.requests.fetch_add(1, SeqCst);
    let mut req = p.client.post(format!("{}/v1/batch", p.target)).body(body);
    for name in ["authorization", "content-type", "user-agent"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.as_bytes());
        }
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    if headers.contains_key("x-retry-count") {
        p.retries.fetch_add(1, SeqCst);
        let dups = answer["duplicates"].as_u64().unwrap_or(0);
        p.duplicates_on_retry.fetch_add(dups, SeqCst);
    }
    if n % 4 == 1 && status == 200 {
        p.lost.fetch_add(1, SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "lost".to_string());
    }
    (StatusCode::from_u16(status).unwrap(), answer.to_string())
}

async fn start_proxy(target: SocketAddr) -> (Arc<LossyProxy>, SocketAddr) {
    let proxy = Arc::new(LossyProxy {
        target: format!("http://{target}"),
        client: reqwest::Client::new(),
        requests: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        duplicates_on_retry: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .route("/v1/batch", axum::routing::post(forward))
        .with_state(proxy.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (proxy, addr)
}

fn call(method: &str, args: Value) -> Value {
    json!({ "method": method, "args": args })
}

/// Runs the plan through the real SDK; returns the SDK's error count.
fn run_sdk(host: &str, plan: &[Value]) -> u64 {
    let tools = std::env::var("SLUICE_NODE_TOOLS")
        .expect("SLUICE_NODE_TOOLS is not set: run the tests through `scripts/test.sh`");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // `require` resolves next to the script: place it beside node_modules.
    let script = std::path::Path::new(&tools).join(format!("segment-client-{tag}.cjs"));
    std::fs::write(&script, include_str!("fixtures/segment-client.cjs")).unwrap();
    let plan_file = std::env::temp_dir().join(format!("segment-plan-{tag}.json"));
    std::fs::write(&plan_file, serde_json::to_vec(plan).unwrap()).unwrap();
    let out = std::process::Command::new("node")
        .arg(&script)
        .args([host, KEY])
        .arg(&plan_file)
        .output()
        .expect("node runs");
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&plan_file);
    assert!(
        out.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "SDK output: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["errors"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_analytics_node_sdk_delivers_everything_once() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let (proxy, proxy_addr) = start_proxy(server.addr).await;
    let t0 = t0();
    let mut plan = vec![
        // An anonymous visitor browses, signs in, buys.
        call(
            "page",
            json!({ "anonymousId": "anon-1", "name": "Home", "timestamp": iso(t0),
            "properties": { "url": "https://shop.example/", "referrer": "https://search.example/?q=shoes" } }),
        ),
        call(
            "page",
            json!({ "anonymousId": "anon-1", "name": "Shoes", "timestamp": iso(t0 + MIN),
            "properties": { "url": "https://shop.example/shoes" } }),
        ),
        call(
            "identify",
            json!({ "userId": "user-1", "anonymousId": "anon-1", "timestamp": iso(t0 + 2 * MIN),
            "traits": { "email": "ada@example.com", "firstName": "Ada", "lastName": "Lovelace", "plan": "pro" } }),
        ),
        // Later events under either id count for the user...
        call(
            "page",
            json!({ "anonymousId": "anon-1", "name": "Cart", "timestamp": iso(t0 + 3 * MIN),
            "properties": { "url": "https://shop.example/cart" } }),
        ),
        call(
            "track",
            json!({ "userId": "user-1", "event": "Order Completed", "timestamp": iso(t0 + 4 * MIN),
            "properties": { "orderId": "o-1", "revenue": 42.5, "currency": "EUR" } }),
        ),
        call(
            "track",
            json!({ "userId": "user-1", "event": "Product Added", "timestamp": iso(t0 + 5 * MIN),
            "properties": { "sku": "s-1" } }),
        ),
        // ...an anonymous event from before sign-in, delivered late, stays anonymous.
        call(
            "page",
            json!({ "anonymousId": "anon-1", "name": "Landing", "timestamp": iso(t0 - 10_000),
            "properties": { "url": "https://shop.example/landing" } }),
        ),
        call(
            "screen",
            json!({ "userId": "user-4", "name": "Settings", "timestamp": iso(t0),
            "context": { "device": { "type": "ios", "model": "iPhone15,2" }, "os": { "name": "iOS", "version": "17.1" } } }),
        ),
        call(
            "group",
            json!({ "userId": "user-4", "groupId": "acme", "timestamp": iso(t0 + MIN),
            "traits": { "name": "Acme" } }),
        ),
    ];
    // A visitor whose events are an hour apart: two sessions.
    for m in [0, 10, 20, 70, 75] {
        plan.push(call(
            "track",
            json!({ "userId": "user-2", "event": "Video Played", "timestamp": iso(t0 + m * MIN) }),
        ));
    }
    // A few hundred more from many users.
    for i in 0..300 {
        let who = format!("bulk-{}", i % 20);
        let at = iso(t0 + (i / 20) * MIN);
        plan.push(if i % 3 == 0 {
            call("page", json!({ "userId": who, "timestamp": at, "properties": { "url": format!("https://shop.example/p/{i}") } }))
        } else {
            call("track", json!({ "userId": who, "event": "Product Viewed", "timestamp": at, "properties": { "i": i } }))
        });
    }
    let host = format!("http://{proxy_addr}");
    let errors = tokio::task::spawn_blocking({
        let plan = plan.clone();
        move || run_sdk(&host, &plan)
    })
    .await
    .unwrap();
    assert_eq!(errors, 0, "the SDK gave up on some messages");

    // The SDK retried the batches whose answers were lost, and the retries were deduplicated.
    let lost = proxy.lost.load(SeqCst);
    assert!(lost >= 1, "no answer was lost");
    assert!(proxy.retries.load(SeqCst) >= lost);
    assert!(proxy.duplicates_on_retry.load(SeqCst) > 0);

    // Every message stored exactly once.
    let events = find(&db, "events", doc! {}).await;
    assert_eq!(events.len(), plan.len());
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e.get_str("eventId").unwrap())
        .collect();
    assert_eq!(ids.len(), plan.len());

    // Identity: the user holds the traits and the events from sign-in on.
    let u1 = user(&db, "user-1").await;
    assert_eq!(u1.get_str("email").unwrap(), "ada@example.com");
    assert_eq!(u1.get_str("firstName").unwrap(), "Ada");
    assert_eq!(u1.get_str("lastName").unwrap(), "Lovelace");
    assert_eq!(
        u1.get_document("attributes")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "pro"
    );
    assert_eq!(u1.get_i64("totalEvents").unwrap(), 4, "{u1}");
    assert_eq!(u1.get_i64("totalPurchases").unwrap(), 1);
    assert_eq!(u1.get_f64("totalRevenue").unwrap(), 42.5);
    let anon = user(&db, "anon-1").await;
    assert_eq!(anon.get_i64("totalEvents").unwrap(), 3, "{anon}");
    let cart = find(
        &db,
        "events",
        doc! { "pageUrl": "https://shop.example/cart" },
    )
    .await;
    assert_eq!(cart[0].get_str("userId").unwrap(), "user-1");
    assert_eq!(
        cart[0]
            .get_document("metadata")
            .unwrap()
            .get_str("anonymousId")
            .unwrap(),
        "anon-1"
    );
    // An anonymous visitor's own event keeps the id too, so a reader tells anonymous
    // traffic from known users.
    let home = find(&db, "events", doc! { "userId": "anon-1" }).await;
    assert!(!home.is_empty());
    for e in &home {
        assert_eq!(
            e.get_document("metadata").unwrap().get_str("anonymousId"),
            Ok("anon-1"),
            "{e}"
        );
    }

    // Mapping.
    let purchase = find(&db, "events", doc! { "eventType": "PURCHASE" }).await;
    assert_eq!(purchase.len(), 1);
    let props = purchase[0].get_document("properties").unwrap();
    assert_eq!(props.get_f64("amount").unwrap(), 42.5);
    assert_eq!(props.get_str("eventName").unwrap(), "Order Completed");
    let home = find(&db, "events", doc! { "pageUrl": "https://shop.example/" }).await;
    assert_eq!(home[0].get_str("eventType").unwrap(), "PAGE_VIEW");
    assert_eq!(
        home[0].get_str("referrer").unwrap(),
        "https://search.example/?q=shoes"
    );
    // Clock-skew correction (receivedAt - (sentAt - timestamp)) adds the transit time.
    let skew = home[0]
        .get_datetime("timestamp")
        .unwrap()
        .timestamp_millis()
        - t0;
    assert!((0..5_000).contains(&skew), "{skew} ms");
    assert_eq!(
        find(&db, "events", doc! { "eventType": "ADD_TO_CART" })
            .await
            .len(),
        1
    );
    let screen = find(&db, "events", doc! { "eventType": "SCREEN_VIEW" }).await;
    let meta = screen[0].get_document("metadata").unwrap();
    assert_eq!(meta.get_str("os").unwrap(), "iOS");
    assert_eq!(meta.get_str("device").unwrap(), "mobile");

    // Sessions: split at the gap.
    let mut s2 = find(&db, "sessions", doc! { "userId": "user-2" }).await;
    s2.sort_by_key(|s| s.get_datetime("startTime").unwrap().timestamp_millis());
    let counts: Vec<i64> = s2.iter().map(|s| s.get_i64("events").unwrap()).collect();
    assert_eq!(counts, vec![3, 2]);
    let second = s2[1].get_datetime("startTime").unwrap().timestamp_millis();
    assert_eq!((second - t0) / MIN, 70);

    // Aggregates agree with the events, for every user.
    let mut per_user: HashMap<String, i64> = HashMap::new();
    let mut per_session: HashMap<String, i64> = HashMap::new();
    for e in &events {
        *per_user
            .entry(e.get_str("userId").unwrap().into())
            .or_default() += 1;
        *per_session
            .entry(e.get_str("sessionId").unwrap().into())
            .or_default() += 1;
    }
    for u in find(&db, "users", doc! {}).await {
        let v = u.get_str("visitorId").unwrap();
        assert_eq!(u.get_i64("totalEvents").unwrap(), per_user[v], "user {v}");
    }
    for s in find(&db, "sessions", doc! {}).await {
        let id = s.get_str("sessionId").unwrap();
        assert_eq!(
            s.get_i64("events").unwrap(),
            per_session[id],
            "session {id}"
        );
    }
    server.shutdown().await;
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .basic_auth(KEY, Some(""))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn identify_links_an_anonymous_visitor_from_its_time_on_in_any_delivery_order() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    // After sign-in, delivered first: the link does not exist yet, so it stays anonymous;
    // delivered after the identify, an anonymous event counts for the user.
    let requests = [
        (
            "/v1/page",
            json!({ "messageId": "p0", "anonymousId": "a", "timestamp": iso(t0) }),
        ),
        (
            "/v1/identify",
            json!({ "messageId": "i1", "userId": "u", "anonymousId": "a",
            "timestamp": iso(t0 + MIN), "traits": { "email": "old@example.com" } }),
        ),
        (
            "/v1/track",
            json!({ "messageId": "t2", "anonymousId": "a", "event": "Clicked",
            "timestamp": iso(t0 + 2 * MIN) }),
        ),
        // Pre-sign-in, delivered late: still the anonymous visitor's.
        (
            "/v1/page",
            json!({ "messageId": "p00", "anonymousId": "a", "timestamp": iso(t0 - MIN) }),
        ),
        // An older identify delivered late does not overwrite newer traits.
        (
            "/v1/identify",
            json!({ "messageId": "i0", "userId": "u", "timestamp": iso(t0 - 2 * MIN),
            "traits": { "email": "older@example.com", "firstName": "Grace" } }),
        ),
        // alias: links are followed in chains, so the anonymous id's later events count
        // for the final user...
        (
            "/v1/alias",
            json!({ "messageId": "al", "previousId": "u", "userId": "u-new",
            "timestamp": iso(t0 + 3 * MIN) }),
        ),
        (
            "/v1/page",
            json!({ "messageId": "p5", "anonymousId": "a", "timestamp": iso(t0 + 5 * MIN) }),
        ),
        // ...but a message with a userId always counts for that user: pairing someone
        // else's user id with your own does not capture their events.
        (
            "/v1/track",
            json!({ "messageId": "t4", "userId": "u", "event": "Clicked",
            "timestamp": iso(t0 + 4 * MIN) }),
        ),
        (
            "/v1/track",
            json!({ "messageId": "h1", "anonymousId": "u-new", "userId": "mallory",
            "event": "Clicked", "timestamp": iso(t0 + 6 * MIN) }),
        ),
        (
            "/v1/identify",
            json!({ "messageId": "h2", "userId": "u-new", "timestamp": iso(t0 + 7 * MIN),
            "traits": { "email": "new@example.com" } }),
        ),
    ];
    for (path, body) in &requests {
        let (status, answer) = post(&base, path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(answer["success"], true);
    }
    let owner = |id: &'static str| {
        let db = &db;
        async move {
            find(db, "events", doc! { "eventId": id }).await[0]
                .get_str("userId")
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(owner("p0").await, "a");
    assert_eq!(owner("p00").await, "a");
    assert_eq!(owner("i1").await, "u");
    assert_eq!(owner("t2").await, "u");
    assert_eq!(owner("p5").await, "u-new");
    assert_eq!(owner("t4").await, "u");
    assert_eq!(owner("h2").await, "u-new");
    let u = user(&db, "u").await;
    assert_eq!(u.get_str("email").unwrap(), "old@example.com");
    assert!(
        u.get_str("firstName").is_err(),
        "an older identify's traits: {u}"
    );
    assert_eq!(u.get_i64("totalEvents").unwrap(), 4, "i1, t2, i0, t4: {u}");
    let new = user(&db, "u-new").await;
    assert_eq!(new.get_i64("totalEvents").unwrap(), 3, "al, p5, h2: {new}");
    assert_eq!(new.get_str("email").unwrap(), "new@example.com");
    let mallory = user(&db, "mallory").await;
    assert_eq!(
        mallory.get_i64("totalEvents").unwrap(),
        1,
        "h1 only: {mallory}"
    );
    assert!(mallory.get_str("email").is_err(), "{mallory}");
    assert_eq!(user(&db, "a").await.get_i64("totalEvents").unwrap(), 2);
    let links = find(&db, "identities", doc! {}).await;
    let links: BTreeMap<&str, &str> = links
        .iter()
        .map(|l| (l.get_str("_id").unwrap(), l.get_str("visitorId").unwrap()))
        .collect();
    assert_eq!(
        links,
        BTreeMap::from([("a", "u"), ("u", "u-new"), ("u-new", "mallory")])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_that_is_not_stored_links_nobody() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![sluice_core::config::Secret::new(KEY)];
        raw.tracking.bots = "drop".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    let bot = json!({ "userAgent": "Googlebot/2.1 (+http://www.google.com/bot.html)" });
    // A crawler's identify, dropped, in the same batch as the anonymous visitor's next
    // page: the page stays the visitor's own, and no link is left for later requests.
    let (status, answer) = post(
        &base,
        "/v1/batch",
        &json!({ "batch": [
            { "type": "identify", "messageId": "i-bot", "userId": "victim",
              "anonymousId": "b", "timestamp": iso(t0), "context": bot },
            { "type": "page", "messageId": "p1", "anonymousId": "b",
              "timestamp": iso(t0 + MIN) },
        ] }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 1, "{answer}");
    assert_eq!(answer["dropped"], 1, "{answer}");
    let (status, answer) = post(
        &base,
        "/v1/page",
        &json!({ "messageId": "p2", "anonymousId": "b", "timestamp": iso(t0 + 2 * MIN) }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for id in ["p1", "p2"] {
        let e = &find(&db, "events", doc! { "eventId": id }).await[0];
        assert_eq!(e.get_str("userId").unwrap(), "b", "{e}");
    }
    assert!(find(&db, "identities", doc! {}).await.is_empty());
    assert!(find(&db, "users", doc! { "visitorId": "victim" })
        .await
        .is_empty());
    // The same identify from a browser is stored, and links from its time on.
    let (status, answer) = post(
        &base,
        "/v1/identify",
        &json!({ "messageId": "i-real", "userId": "u", "anonymousId": "b",
                 "timestamp": iso(t0 + 3 * MIN) }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, answer) = post(
        &base,
        "/v1/page",
        &json!({ "messageId": "p4", "anonymousId": "b", "timestamp": iso(t0 + 4 * MIN) }),
    )
    .await;
    assert_eq!(answer["stored"], 1, "{answer}");
    let p4 = &find(&db, "events", doc! { "eventId": "p4" }).await[0];
    assert_eq!(p4.get_str("userId").unwrap(), "u");
    assert_eq!(find(&db, "identities", doc! {}).await.len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_split_at_the_gap_whatever_the_delivery_order() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |raw| {
        raw.server.write_keys = vec![sluice_core::config::Secret::new(KEY)];
        raw.tracking.session_timeout_minutes = 30;
    })
    .await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    let minutes = [0, 12, 24, 36, 80, 100, 140];
    // Expected by the gap rule: [0..36], [80, 100], [140].
    // Deliver one message per request, latest first, then two replayed.
    for m in minutes.iter().rev() {
        let (status, a) = post(
            &base,
            "/v1/track",
            &json!({ "messageId": format!("m{m}"), "userId": "v", "event": "Tick",
                     "timestamp": iso(t0 + m * MIN) }),
        )
        .await;
        assert_eq!(status, 200, "{a}");
    }
    let (_, replay) = post(
        &base,
        "/v1/batch",
        &json!({ "batch": [
            { "type": "track", "messageId": "m12", "userId": "v", "event": "Tick", "timestamp": iso(t0 + 12 * MIN) },
            { "type": "track", "messageId": "m100", "userId": "v", "event": "Tick", "timestamp": iso(t0 + 100 * MIN) },
        ]}),
    )
    .await;
    assert_eq!(replay["duplicates"], 2, "{replay}");
    let mut sessions = find(&db, "sessions", doc! { "userId": "v" }).await;
    sessions.sort_by_key(|s| s.get_datetime("startTime").unwrap().timestamp_millis());
    let spans: Vec<(i64, i64, i64)> = sessions
        .iter()
        .map(|s| {
            (
                (s.get_datetime("startTime").unwrap().timestamp_millis() - t0) / MIN,
                (s.get_datetime("endTime").unwrap().timestamp_millis() - t0) / MIN,
                s.get_i64("events").unwrap(),
            )
        })
        .collect();
    assert_eq!(spans, vec![(0, 36, 4), (80, 100, 2), (140, 140, 1)]);
    assert_eq!(user(&db, "v").await.get_i64("totalSessions").unwrap(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn gzip_bodies_write_key_in_the_body_and_invalid_messages_reported() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let t0 = t0();
    let body = json!({
        "writeKey": KEY,
        "sentAt": iso(t0 + 5_000),
        "context": { "library": { "name": "test", "version": "1" } },
        "batch": [
            { "type": "track", "messageId": "g1", "userId": "v", "event": "Order Completed",
              "properties": { "total": 10 }, "originalTimestamp": iso(t0) },
            { "type": "track", "messageId": "g2", "userId": "v" },
            { "type": "launch", "messageId": "g3", "userId": "v" },
            { "type": "page", "messageId": "g4", "anonymousId": "x" },
        ],
    });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.to_string().as_bytes()).unwrap();
    let resp = client
        .post(format!("{base}/v1/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["stored"], 2, "{answer}");
    assert_eq!(answer["rejected"], 2);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[1]["status"], "rejected");
    assert_eq!(results[1]["field"], "event");
    assert_eq!(results[2]["field"], "type");
    // Each named by the messageId it was sent with.
    assert_eq!(
        (&results[1]["messageId"], &results[2]["messageId"]),
        (&json!("g2"), &json!("g3")),
        "{answer}"
    );
    // A body of two concatenated gzip members (RFC 1952) is read whole.
    let text = json!({ "writeKey": KEY, "batch": [
        { "type": "track", "messageId": "gm1", "userId": "v", "event": "Clicked" },
    ] })
    .to_string();
    let (head, tail) = text.split_at(text.len() / 2);
    let mut two = Vec::new();
    for part in [head, tail] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(part.as_bytes()).unwrap();
        two.extend(gz.finish().unwrap());
    }
    let resp = client
        .post(format!("{base}/v1/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(two)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["stored"], 1, "{answer}");
    let g1 = &find(&db, "events", doc! { "eventId": "g1" }).await[0];
    assert_eq!(g1.get_str("eventType").unwrap(), "PURCHASE");
    assert_eq!(
        g1.get_document("metadata")
            .unwrap()
            .get_document("context")
            .unwrap()
            .get_document("library")
            .unwrap()
            .get_str("name")
            .unwrap(),
        "test",
        "the batch context applies to its messages"
    );

    // Nothing but invalid messages: 400, and not `success`.
    let (status, all_bad) = post(
        &base,
        "/v1/batch",
        &json!({ "batch": [{ "type": "track", "userId": "v" }] }),
    )
    .await;
    assert_eq!(
        (status, &all_bad["success"]),
        (400, &json!(false)),
        "{all_bad}"
    );

    // A profile that refuses the traits: the identify is still stored and answered 200.
    db.store
        .collection("users")
        .insert_one(doc! { "visitorId": "odd", "attributes": "not a document" })
        .await
        .unwrap();
    let (status, answer) = post(
        &base,
        "/v1/identify",
        &json!({ "messageId": "odd-1", "userId": "odd", "traits": { "plan": "pro" } }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 1);
    assert_eq!(
        server
            .metrics
            .traits_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A profile trait that is not a string: the identify is stored, its other traits
    // applied, that one kept with the event only, and the answer says so.
    let (status, answer) = post(
        &base,
        "/v1/identify",
        &json!({ "messageId": "num-1", "userId": "numeric", "traits": { "email": 123, "plan": "pro" } }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "stored", "{answer}");
    let warning = answer["results"][0]["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("`traits.email` not a string"), "{answer}");
    let profile = user(&db, "numeric").await;
    assert!(!profile.contains_key("email"), "{profile}");
    assert_eq!(
        profile
            .get_document("attributes")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "pro",
        "{profile}"
    );
    let stored = find(&db, "events", doc! { "eventId": "num-1" }).await;
    assert_eq!(
        stored[0]
            .get_document("properties")
            .unwrap()
            .get("email")
            .and_then(sluice_core::model::number_of),
        Some(123.0),
        "{stored:?}"
    );
    // A revenue that cannot be read: the purchase is stored counting no revenue, the
    // property kept as sent, and the answer says so; counted once stored.
    let unread_count = || support::metric(&base, "sluice_purchase_amounts_unread_total");
    let before = unread_count().await;
    let order = json!({ "messageId": "ord-unread", "userId": "numeric", "event": "Order Completed",
                        "properties": { "revenue": "12,500" } });
    for expected in ["stored", "duplicate"] {
        let (status, answer) = post(&base, "/v1/track", &order).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["results"][0]["status"], expected, "{answer}");
        let warning = answer["results"][0]["warning"].as_str().unwrap_or_default();
        assert!(
            warning.starts_with("`properties.revenue` is not an amount Sluice reads"),
            "{answer}"
        );
    }
    assert_eq!(unread_count().await - before, 1.0);
    let stored = find(&db, "events", doc! { "eventId": "ord-unread" }).await;
    let props = stored[0].get_document("properties").unwrap();
    assert_eq!(props.get_str("revenue").unwrap(), "12,500", "{props}");
    assert!(
        !props.contains_key("amount") && !props.contains_key("amountUnread"),
        "{props}"
    );

    // The same in a batch asking a minimal answer: only that message is listed.
    let resp = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(KEY, Some(""))
        .header("prefer", "return=minimal")
        .json(&json!({ "batch": [
            { "type": "track", "messageId": "num-2", "userId": "numeric", "event": "Viewed" },
            { "type": "identify", "messageId": "num-3", "userId": "numeric", "traits": { "firstName": ["A"] } },
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["preference-applied"], "return=minimal");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["stored"], 2, "{answer}");
    let listed = answer["results"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{answer}");
    assert_eq!(listed[0]["index"], 1, "{answer}");
    assert!(
        listed[0]["warning"]
            .as_str()
            .unwrap()
            .contains("`traits.firstName`"),
        "{answer}"
    );

    // No key anywhere: 401. A bad single message: 400 naming the field. A gzip bomb: 413.
    let r = client
        .post(format!("{base}/v1/track"))
        .json(&json!({ "userId": "v", "event": "X" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (status, err) = post(&base, "/v1/track", &json!({ "userId": "v" })).await;
    assert_eq!(status, 400);
    assert!(
        err["message"].as_str().unwrap().contains("`event`"),
        "{err}"
    );
    assert_eq!(err["error"], "invalid_message", "{err}");
    // A member the spec does not define (a typo) is named, not silently lost; an SDK's
    // own `_`-prefixed ones are not.
    let (status, answer) = post(
        &base,
        "/v1/track",
        &json!({ "userId": "v", "event": "X", "properites": { "a": 1 }, "_metadata": {} }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["results"][0]["ignored"],
        json!(["properites"]),
        "{answer}"
    );
    let (status, err) = post(&base, "/v1/track", &json!(["not", "an", "object"])).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_message")),
        "{err}"
    );
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 4 * 1024 * 1024]).unwrap();
    let r = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(KEY, Some(""))
        .header("content-encoding", "gzip")
        .body(bomb.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    server.shutdown().await;
}

#[tokio::test]
async fn a_half_surrogate_pair_or_a_byte_that_is_not_utf8_costs_no_message() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    // As a browser's `JSON.stringify` writes a title cut in the middle of an emoji, and as
    // an app writing Latin-1 sends `é`: the batch's other message beside each.
    let mut body = format!(
        r#"{{"writeKey":"{KEY}","batch":[{{"type":"track","messageId":"u1","userId":"v-text","event":"Clicked","properties":{{"title":"Sale \ud83d"}},"timestamp":"{}"}},{{"type":"track","messageId":"u2","userId":"v-text","event":"Clicked","properties":{{"city":"Montr"#,
        iso(t0)
    )
    .into_bytes();
    body.push(0xe9);
    body.extend_from_slice(format!(r#"al"}},"timestamp":"{}"}}]}}"#, iso(t0 + 1_000)).as_bytes());
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/batch"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["stored"], 2, "{answer}");
    let stored = find(&db, "events", doc! { "userId": "v-text" }).await;
    let props = |id: &str| {
        stored
            .iter()
            .find(|e| e.get_str("eventId") == Ok(id))
            .unwrap()
            .get_document("properties")
            .unwrap()
            .clone()
    };
    assert_eq!(props("u1").get_str("title").unwrap(), "Sale \u{fffd}");
    assert_eq!(props("u2").get_str("city").unwrap(), "Montr\u{fffd}al");
    server.shutdown().await;
}

#[tokio::test]
async fn browser_sdk_paths_relayed_payloads_traits_and_categories() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let t0 = t0();
    // analytics-next posts text/plain JSON with the key in the body, one message to a
    // one-letter path, or a batch to `/v1/b`.
    let browser = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
    };
    let r = browser(
        "/v1/t",
        json!({ "writeKey": KEY, "type": "track", "event": "Clicked", "messageId": "b1",
                "anonymousId": "anon-b", "timestamp": iso(t0), "sentAt": iso(t0 + 100) }),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = browser(
        "/v1/b",
        json!({ "writeKey": KEY, "batch": [
            { "type": "page", "messageId": "b2", "anonymousId": "anon-b", "name": "Home",
              "category": "Landing", "timestamp": iso(t0 + 1_000) },
            { "type": "screen", "messageId": "b3", "anonymousId": "anon-b", "name": "Cart",
              "category": "Shop", "timestamp": iso(t0 + 2_000) },
            { "type": "track", "messageId": "b4", "anonymousId": "anon-b", "event": "Viewed",
              "context": { "traits": { "plan": "pro" } }, "timestamp": iso(t0 + 3_000) },
            { "type": "group", "messageId": "b5", "anonymousId": "anon-b", "groupId": "acme",
              "context": { "traits": { "email": "x@y.io" } }, "timestamp": iso(t0 + 4_000) },
        ] }),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["stored"], 4, "{answer}");
    let event = |id: &'static str| {
        let db = &db;
        async move {
            find(db, "events", doc! { "eventId": id })
                .await
                .pop()
                .unwrap()
        }
    };
    let props = |e: &Document| e.get_document("properties").unwrap().clone();
    assert_eq!(
        props(&event("b2").await).get_str("category").unwrap(),
        "Landing"
    );
    assert_eq!(
        props(&event("b3").await).get_str("category").unwrap(),
        "Shop"
    );
    // A track keeps the user's context traits; a group's traits are not the user's.
    let b4 = event("b4").await;
    let context = b4
        .get_document("metadata")
        .unwrap()
        .get_document("context")
        .unwrap();
    assert_eq!(
        context
            .get_document("traits")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "pro"
    );
    let b5 = props(&event("b5").await);
    assert!(
        b5.get_document("traits")
            .map_or(true, |t| !t.contains_key("email")),
        "{b5}"
    );

    // A payload relayed through Segment (it has `receivedAt`) keeps its corrected
    // `timestamp`, however old its `sentAt`.
    let day = chrono::DateTime::parse_from_rfc3339("2025-01-01T10:00:00.500Z")
        .unwrap()
        .timestamp_millis();
    let (status, answer) = post(
        &base,
        "/v1/import",
        &json!({ "batch": [{ "type": "track", "event": "Old", "messageId": "r1", "userId": "u-r",
            "originalTimestamp": "2025-01-01T10:00:00Z", "timestamp": "2025-01-01T10:00:00.500Z",
            "sentAt": "2025-01-01T10:00:01Z", "receivedAt": "2025-01-01T10:00:00.600Z" }] }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        event("r1")
            .await
            .get_datetime("timestamp")
            .unwrap()
            .timestamp_millis(),
        day
    );

    // A blank `X-Write-Key`, or a proxy's own basic credentials, leave the body key to
    // decide; a 429 tells the browser SDK when to come back.
    let r = client
        .post(format!("{base}/v1/t"))
        .header("x-write-key", "")
        .json(&json!({ "writeKey": KEY, "type": "track", "event": "E", "messageId": "k1", "userId": "u" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .post(format!("{base}/v1/t"))
        .basic_auth("proxy-user", Some("proxy-pass"))
        .json(&json!({ "writeKey": KEY, "type": "track", "event": "E", "messageId": "k2", "userId": "u" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .post(format!("{base}/v1/t"))
        .basic_auth("proxy-user", Some("proxy-pass"))
        .json(&json!({ "type": "track", "event": "E", "messageId": "k3", "userId": "u" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "a wrong key and no other is refused"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_link_counts_from_its_earliest_message_whichever_arrives_first() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    for (path, body) in [
        // Made at t0 + 10 min by a track carrying both ids...
        (
            "/v1/track",
            json!({ "messageId": "l1", "userId": "u", "anonymousId": "a", "event": "Clicked",
                    "timestamp": iso(t0 + 10 * MIN) }),
        ),
        // ...then the identify at t0 + 5 min arrives: the link counts from then on...
        (
            "/v1/identify",
            json!({ "messageId": "l2", "userId": "u", "anonymousId": "a",
                    "timestamp": iso(t0 + 5 * MIN) }),
        ),
        // ...so an anonymous event at t0 + 7 min is the user's.
        (
            "/v1/page",
            json!({ "messageId": "l3", "anonymousId": "a", "timestamp": iso(t0 + 7 * MIN) }),
        ),
    ] {
        let (status, answer) = post(&base, path, &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let l3 = &find(&db, "events", doc! { "eventId": "l3" }).await[0];
    assert_eq!(l3.get_str("userId").unwrap(), "u");
    let link = &find(&db, "identities", doc! { "_id": "a" }).await[0];
    assert_eq!(
        link.get_datetime("since").unwrap().timestamp_millis(),
        t0 + 5 * MIN
    );
    // The identify resent with a `sentAt` a minute later (its clock corrected back): a
    // duplicate, which moves the link nowhere.
    let resent = json!({ "messageId": "l2", "userId": "u", "anonymousId": "a",
                         "timestamp": iso(t0 + 5 * MIN),
                         "sentAt": iso(chrono::Utc::now().timestamp_millis() + MIN) });
    let (status, answer) = post(&base, "/v1/identify", &resent).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "duplicate", "{answer}");
    let link = &find(&db, "identities", doc! { "_id": "a" }).await[0];
    assert_eq!(
        link.get_datetime("since").unwrap().timestamp_millis(),
        t0 + 5 * MIN
    );
    server.shutdown().await;
}

/// Segment SDKs cut batches by bytes only: an app back online sends more than 500 small
/// messages at once, and a 413 would make it drop them all.
#[tokio::test]
async fn a_segment_batch_of_many_small_messages_is_taken_whole() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let screen = |i: usize| {
        json!({ "type": "screen", "messageId": format!("s{i}"), "anonymousId": "a1",
                "name": "Home", "timestamp": iso(t0() + i as i64) })
    };
    let batch: Vec<Value> = (0..1_200).map(screen).collect();
    let (s, body) = post(&base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!((s, &body["stored"]), (200, &json!(1_200)), "{body}");
    // Beyond half a writer's share of the queue (20,000 / 4 writers / 2), refused whole.
    let batch: Vec<Value> = (0..2_501)
        .map(|i| json!({ "type": "screen", "messageId": format!("t{i}"), "anonymousId": "a1" }))
        .collect();
    let (s, body) = post(&base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (413, Some("too_many_events")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 2500 messages"),
        "{body}"
    );
    assert_eq!(find(&db, "events", doc! {}).await.len(), 1_200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_context_counts_toward_each_message_s_size_limit() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let track = |id: &str, pad: usize| {
        json!({ "type": "track", "messageId": id, "userId": "u1", "event": "Played",
            "properties": { "pad": "x".repeat(pad) } })
    };
    // The per-event limit is 32 KB: a 20 KB shared context fits, and so does a small
    // message with it, but not a 20 KB message (fine alone) with it.
    let context = json!({ "library": { "name": "bulk" }, "blob": "c".repeat(20_000) });
    let (s, body) = post(
        &base,
        "/v1/batch",
        &json!({ "batch": [track("m1", 10), track("m2", 20_000)], "context": context }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["stored"], 1, "{body}");
    let rejected = &body["results"][1];
    assert!(
        rejected.to_string().contains("with the batch's `context`"),
        "{body}"
    );
    // A shared context beyond the limit by itself is refused whole.
    let (s, body) = post(
        &base,
        "/v1/batch",
        &json!({ "batch": [track("m3", 10)], "context": { "blob": "c".repeat(40_000) } }),
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_batch")),
        "{body}"
    );
    assert_eq!(find(&db, "events", doc! {}).await.len(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_batch_of_identifies_applies_every_profile_s_traits_in_time_order() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let t0 = t0();
    // A profile that refuses traits (`attributes` is not a document) among them.
    db.store
        .collection("users")
        .insert_one(doc! { "visitorId": "odd", "attributes": "not a document" })
        .await
        .unwrap();
    // 200 users, two identifies each, the newer one first in the batch: the older one's
    // trait the newer did not send is merged, and the newer one's values win.
    let mut batch = Vec::new();
    for n in 0..200 {
        let user = format!("u{n}");
        batch.push(
            json!({ "type": "identify", "messageId": format!("new-{n}"), "userId": user,
            "traits": { "plan": "pro", "seats": n }, "timestamp": iso(t0 + 2_000) }),
        );
        batch.push(json!({ "type": "identify", "messageId": format!("old-{n}"), "userId": user,
            "traits": { "plan": "free", "company": format!("c{n}"), "email": format!("{user}@x.io") },
            "timestamp": iso(t0 + 1_000) }));
    }
    batch.push(
        json!({ "type": "identify", "messageId": "odd-1", "userId": "odd",
        "traits": { "plan": "pro" }, "timestamp": iso(t0) }),
    );
    let (status, answer) = post(&base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 401, "{answer}");
    for n in [0, 57, 199] {
        let u = user(&db, &format!("u{n}")).await;
        let attributes = u.get_document("attributes").unwrap();
        assert_eq!(attributes.get_str("plan").unwrap(), "pro", "{u}");
        assert_eq!(
            attributes.get_str("company").unwrap(),
            format!("c{n}"),
            "{u}"
        );
        assert_eq!(
            attributes.get("seats").unwrap().to_string(),
            n.to_string(),
            "{u}"
        );
        assert_eq!(u.get_str("email").unwrap(), format!("u{n}@x.io"), "{u}");
        assert_eq!(
            u.get_datetime("traitsAt").unwrap().timestamp_millis(),
            t0 + 2_000
        );
    }
    let with_traits = find(&db, "users", doc! { "attributes.plan": "pro" }).await;
    assert_eq!(with_traits.len(), 200);
    // The refused profile is counted, and the others' traits were applied all the same.
    assert_eq!(
        server
            .metrics
            .traits_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A resend: every identify a duplicate, the traits applied again, nothing changed.
    let (status, again) = post(&base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["stored"], 0, "{again}");
    let u = user(&db, "u57").await;
    assert_eq!(
        u.get_document("attributes")
            .unwrap()
            .get_str("plan")
            .unwrap(),
        "pro"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn what_an_sdk_puts_in_the_context_never_costs_the_event() {
    let db = TestDb::initialized().await;
    let server = keyed_server(&db).await;
    let base = format!("http://{}", server.addr);
    let long = format!("https://shop.example/?gclid={}", "x".repeat(5_000));
    let (status, answer) = post(
        &base,
        "/v1/batch",
        &json!({ "context": { "library": { "name": "analytics-kotlin" } }, "batch": [
            { "type": "track", "messageId": "c1", "userId": "u", "event": "Order Completed",
              "properties": { "total": 12 },
              "context": {
                  "traits": { "$email": "u@x.io", "plan.tier": "pro" },
                  "ip": "203.0.113.7, 10.0.0.1",
                  "page": { "url": long.clone(), "referrer": long.clone() },
              } },
            { "type": "track", "messageId": "c2", "userId": "u", "event": "Viewed",
              "context": "not an object" },
        ] }),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 1, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[1]["status"], "rejected", "{answer}");
    assert_eq!(results[1]["field"], "context", "{answer}");
    let stored = &find(&db, "events", doc! { "eventId": "c1" }).await[0];
    let metadata = stored.get_document("metadata").unwrap();
    assert_eq!(metadata.get_str("ipAddress").unwrap(), "203.0.113.7");
    let context = metadata.get_document("context").unwrap();
    let traits = context.get_document("traits").unwrap();
    assert_eq!(
        traits.get_str("\u{FF04}email").unwrap(),
        "u@x.io",
        "{context}"
    );
    assert_eq!(traits.get_str("plan\u{FF0E}tier").unwrap(), "pro");
    assert_eq!(
        context
            .get_document("library")
            .unwrap()
            .get_str("name")
            .unwrap(),
        "analytics-kotlin"
    );
    // The URLs are cut where an event keeps them, and whole in the context.
    let page_url = stored.get_str("pageUrl").unwrap();
    assert!(page_url.len() <= 4096 && long.starts_with(page_url));
    assert_eq!(
        context
            .get_document("page")
            .unwrap()
            .get_str("url")
            .unwrap(),
        long
    );
    // A batch `context` that is not an object refuses the batch, as a message's does.
    let (status, err) = post(
        &base,
        "/v1/batch",
        &json!({ "context": 5, "batch": [
            { "type": "track", "messageId": "c3", "userId": "u", "event": "Viewed" },
        ] }),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("`context`"),
        "{err}"
    );
    server.shutdown().await;
}
