//! Imports and EXPORT configs against real HTTP servers on loopback: json-server behind
//! tokens from a real oidc-provider, and in-test servers for the faults a real server
//! cannot easily produce (429, 500 bursts, malformed JSON, slow answers, expiring tokens).

mod support;

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bson::{doc, Bson};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use sluice_core::integration::parse_file;
use sluice_jobs::configs;
use sluice_jobs::import::{run_import, run_push, ImportError, ImportOptions};
use support::TestDb;

/// json-server + oidc-provider in one node process (tests/fixtures/api-server.mjs).
struct ApiServer {
    child: std::process::Child,
    oauth: u16,
    api: u16,
    dir: std::path::PathBuf,
    script: std::path::PathBuf,
}

impl ApiServer {
    fn start(products: &[Value], secret: &str, token_ttl: u64) -> Self {
        let tools = std::env::var("SLUICE_NODE_TOOLS")
            .expect("SLUICE_NODE_TOOLS is not set: run the tests through `scripts/test.sh`");
        let dir =
            std::env::temp_dir().join(format!("sluice-api-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("db.json");
        std::fs::write(&db, json!({ "products": products }).to_string()).unwrap();
        // ESM resolves imports next to the script: place it beside node_modules.
        let script = std::path::Path::new(&tools)
            .join(format!("api-server-{}.mjs", uuid::Uuid::new_v4().simple()));
        std::fs::write(&script, include_str!("fixtures/api-server.mjs")).unwrap();
        let mut child = std::process::Command::new("node")
            .arg(&script)
            .arg(&db)
            .args([secret.to_string(), token_ttl.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("node");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let ports: Vec<u16> = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("api server did not start: {line:?}"))
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        let [oauth, api] = ports[..] else {
            panic!("api server did not start: {line:?}")
        };
        Self {
            child,
            oauth,
            api,
            dir,
            script,
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.script);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn products(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            json!({
                "id": i, "title": format!("Product {i}"),
                "price": { "amount": format!("{}.{:02}", i, i % 100), "currency": "EUR" },
                "stock": { "available": i % 3 != 0 },
                "updated": format!("2026-11-{:02}T10:00:00Z", 1 + i % 20),
            })
        })
        .collect()
}

const MAPPING: &str = r#"
[target]
collection = "products"
key = "productId"
batch_size = 40

[mapping.productId]
path = "$.id"
type = "string"
required = true
[mapping.name]
path = "$.title"
type = "string"
required = true
[mapping.price]
path = "$.price.amount"
type = "number"
[mapping.currency]
path = "$.price.currency"
[mapping.inStock]
path = "$.stock.available"
type = "bool"
[mapping.sourceUpdatedAt]
path = "$.updated"
type = "date"
"#;

/// Run options holding values for `${env:NAME}` references (instead of setting
/// process-wide variables, which is unsound while other test threads run).
fn with_secrets(pairs: &[(&str, &str)]) -> ImportOptions {
    ImportOptions {
        secrets: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

async fn apply(db: &TestDb, text: &str) -> String {
    let file = parse_file("test.toml", text).unwrap();
    configs::apply(&db.store, &file).await.unwrap();
    file.name
}

fn oauth_config(name: &str, api: &ApiServer, secret_var: &str, pagination: &str) -> String {
    format!(
        r#"
name = "{name}"
type = "IMPORT"
endpoint = "http://127.0.0.1:{api}/products"
allow_private_network = true

[auth]
type = "OAUTH"
token_url = "http://127.0.0.1:{oauth}/token"
client_id = "sluice"
client_secret = "${{env:{secret_var}}}"

[source]
records = "$[*]"
[source.pagination]
{pagination}
{MAPPING}"#,
        api = api.api,
        oauth = api.oauth
    )
}

async fn count(db: &TestDb, coll: &str) -> u64 {
    db.store
        .collection(coll)
        .count_documents(doc! {})
        .await
        .unwrap()
}

#[tokio::test]
async fn paginated_json_server_behind_oauth2_is_imported_once() {
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_A", "right-secret")]);
    let db = TestDb::initialized().await;
    let api = ApiServer::start(&products(250), "right-secret", 600);
    // Link-header paging: the first URL sets the page size, `Link: rel="next"` the rest.
    let link = oauth_config(
        "shop-link",
        &api,
        "IMPORT_TEST_SECRET_A",
        "type = \"link_header\"\n",
    )
    .replace("/products\"", "/products?_page=1&_limit=25\"");
    apply(&db, &link).await;
    // json-server pages with ?_page&_limit; the first request sets them, Link does the rest.
    let text = oauth_config("shop-pages", &api, "IMPORT_TEST_SECRET_A",
        "type = \"page\"\npage_param = \"_page\"\nsize_param = \"_limit\"\nsize = 30\ntotal_header = \"X-Total-Count\"\n");
    let paged = apply(&db, &text).await;

    let first = run_import(&db.store, &paged, &opts).await.unwrap();
    assert!(first.completed);
    assert_eq!(
        (first.fetched, first.inserted, first.updated),
        (250, 250, 0)
    );
    assert_eq!(first.pages, 9, "250 records in pages of 30");
    assert_eq!(first.http.token_refreshes, 1, "one token for the whole run");
    assert_eq!(count(&db, "products").await, 250);
    let p = db
        .store
        .collection("products")
        .find_one(doc! { "productId": "42" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.get_str("name").unwrap(), "Product 42");
    assert_eq!(p.get_f64("price").unwrap(), 42.42);
    assert!(!p.get_bool("inStock").unwrap());
    assert_eq!(
        p.get_datetime("sourceUpdatedAt")
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap(),
        "2026-11-03T10:00:00Z",
        "product 42's `updated`, as a date"
    );
    assert_eq!(p.get_str("source").unwrap(), "shop-pages");

    // The Link-header config over the same data: same documents, updated not duplicated.
    let linked = run_import(&db.store, "shop-link", &opts).await.unwrap();
    assert_eq!(
        (linked.fetched, linked.inserted, linked.updated),
        (250, 0, 250)
    );
    assert_eq!(
        linked.pages, 10,
        "25 records a page, following Link headers"
    );
    assert_eq!(count(&db, "products").await, 250);
    let cfg = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": "shop-pages" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        cfg.get_datetime("lastSync").is_ok(),
        "lastSync advances after a completed run"
    );
    assert_eq!(cfg.get_str("authType").unwrap(), "OAUTH");
    assert_eq!(
        cfg.get_document("authConfig")
            .unwrap()
            .get_str("client_secret")
            .unwrap(),
        "${env:IMPORT_TEST_SECRET_A}",
        "only the reference is stored"
    );
    let runs = count(&db, "import_runs").await;
    assert_eq!(runs, 2);
    // The schema's own unique index on productId is kept as `init` made it (rebuilt
    // partial, every later `init`, so every restart, refused it as a conflict).
    db.store
        .init()
        .await
        .expect("init after imports keyed by productId");
    let index = db
        .store
        .collection("products")
        .list_index_names()
        .await
        .unwrap();
    assert!(index.contains(&"productId_unique".to_string()), "{index:?}");
    // A deployment whose import already rebuilt it partial (earlier versions) still starts.
    let products = db.store.collection("products");
    products.drop_index("productId_unique").await.unwrap();
    products
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "productId": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .name("productId_unique".to_string())
                        .partial_filter_expression(doc! { "productId": { "$exists": true } })
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    db.store
        .init()
        .await
        .expect("init with the index an earlier import rebuilt");
}

#[tokio::test]
async fn a_wrong_client_secret_fails_with_a_clear_error() {
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_B", "wrong-secret")]);
    let db = TestDb::initialized().await;
    let api = ApiServer::start(&products(5), "right-secret", 600);
    let name = apply(
        &db,
        &oauth_config(
            "shop-bad",
            &api,
            "IMPORT_TEST_SECRET_B",
            "type = \"none\"\n",
        ),
    )
    .await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("OAuth token request") && err.contains("invalid_client"),
        "{err}"
    );
    assert_eq!(count(&db, "products").await, 0);
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "shop-bad" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("status").unwrap(), "FAILED");
    assert!(run.get_str("error").unwrap().contains("invalid_client"));
}

#[tokio::test]
async fn an_interrupted_import_resumes_without_loss_or_duplicates() {
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_C", "right-secret")]);
    let db = TestDb::initialized().await;
    let api = ApiServer::start(&products(100), "right-secret", 600);
    let name = apply(
        &db,
        &oauth_config(
            "shop-resume",
            &api,
            "IMPORT_TEST_SECRET_C",
            "type = \"page\"\npage_param = \"_page\"\nsize_param = \"_limit\"\nsize = 10\n",
        ),
    )
    .await;
    let stop = ImportOptions {
        stop_after_pages: Some(3),
        ..opts.clone()
    };
    let partial = run_import(&db.store, &name, &stop).await.unwrap();
    assert!(!partial.completed);
    assert_eq!(count(&db, "products").await, 30);
    let cfg = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": &name })
        .await
        .unwrap()
        .unwrap();
    assert!(
        cfg.get("lastSync").is_none_or(|v| *v == bson::Bson::Null),
        "lastSync must not move before the run completes"
    );
    let rest = run_import(&db.store, &name, &opts).await.unwrap();
    assert!(rest.resumed && rest.completed);
    // 10 full pages, then the empty page that ends a listing without a total.
    assert_eq!(rest.pages, 11, "pages of both halves");
    assert_eq!(rest.fetched, 100);
    assert_eq!(
        rest.inserted, 100,
        "each record inserted once across the two runs"
    );
    assert_eq!(count(&db, "products").await, 100);
    assert_eq!(count(&db, "import_checkpoints").await, 0);
}

#[tokio::test]
async fn a_config_changed_after_an_interruption_starts_over_instead_of_resuming() {
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_F", "right-secret")]);
    let db = TestDb::initialized().await;
    let api = ApiServer::start(&products(100), "right-secret", 600);
    let config = |size: u32| {
        oauth_config(
            "shop-changed",
            &api,
            "IMPORT_TEST_SECRET_F",
            &format!(
                "type = \"page\"\npage_param = \"_page\"\nsize_param = \"_limit\"\nsize = {size}\n"
            ),
        )
    };
    let name = apply(&db, &config(10)).await;
    let stop = ImportOptions {
        stop_after_pages: Some(3),
        ..opts.clone()
    };
    assert!(!run_import(&db.store, &name, &stop).await.unwrap().completed);
    // Re-applying the same config keeps the checkpoint; a changed one discards it.
    apply(&db, &config(10)).await;
    assert_eq!(count(&db, "import_checkpoints").await, 1);
    apply(&db, &config(25)).await;
    let rest = run_import(&db.store, &name, &opts).await.unwrap();
    assert!(!rest.resumed && rest.completed);
    assert_eq!(
        rest.fetched, 100,
        "every record read with the new page size"
    );
    assert_eq!(count(&db, "products").await, 100);
    assert_eq!(count(&db, "import_checkpoints").await, 0);
}

/// In-test API: behaviour chosen per test through `Fault`.
#[derive(Clone)]
struct FaultApi {
    fault: Fault,
    hits: Arc<AtomicU64>,
    tokens: Arc<AtomicU64>,
    issued: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    pushed: Arc<Mutex<Vec<Value>>>,
    /// The `Idempotency-Key` of each pushed body.
    push_keys: Arc<Mutex<Vec<String>>>,
    seen_queries: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    RateLimitedOnce,
    ServerErrors(u64),
    Malformed,
    Slow,
    ExpiringTokens,
    /// Every page names cursor 10 as the next one, with a body that changes each time.
    CursorLoop,
    /// The token endpoint answers its first request 503.
    TokenDownOnce,
    /// The token endpoint answers its first request 429 with an OAuth-shaped error body
    /// and `Retry-After: 1`.
    TokenBusyOnce,
    /// The token endpoint answers every request 503 with `Retry-After: 3600`.
    TokenBusyForAnHour,
    /// Every page is refused 429 with `Retry-After: 3600`.
    RateLimitedForAnHour,
    /// Every page is refused with this status (429 or 503) and `Retry-After: 60`.
    RefusedForAMinute(u16),
    /// The first page is refused 503 with `Retry-After: 1`.
    UnavailableOnce,
    /// Tokens live an hour, but the first one issued is refused (revoked) with 401.
    FirstTokenRevoked,
    /// Tokens say they live `u64::MAX` seconds.
    EndlessTokens,
    /// The token endpoint answers 200 with 2 MiB of JSON.
    HugeTokenAnswer,
    /// The second push is answered after 2.5 s.
    SlowSecondPush,
    /// Every push is answered after 300 ms.
    SlowPushes,
}

async fn token(State(s): State<FaultApi>) -> Response {
    if s.fault == Fault::TokenDownOnce && s.hits.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "provider restarting").into_response();
    }
    if s.fault == Fault::TokenBusyOnce && s.hits.fetch_add(1, Ordering::SeqCst) == 0 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({ "error": "too_many_requests", "error_description": "slow down" })),
        )
            .into_response();
    }
    if s.fault == Fault::HugeTokenAnswer {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let padding = "x".repeat(2 << 20);
        return Json(json!({ "access_token": "t", "token_type": "bearer", "padding": padding }))
            .into_response();
    }
    if s.fault == Fault::TokenBusyForAnHour {
        s.hits.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "3600")],
            Json(json!({ "error": "temporarily_unavailable" })),
        )
            .into_response();
    }
    let n = s.tokens.fetch_add(1, Ordering::SeqCst);
    let t = format!("tok-{n}");
    s.issued
        .lock()
        .unwrap()
        .push((t.clone(), std::time::Instant::now()));
    let expires_in = match s.fault {
        Fault::FirstTokenRevoked => 3600,
        Fault::EndlessTokens => u64::MAX,
        _ => 1,
    };
    Json(json!({ "access_token": t, "token_type": "bearer", "expires_in": expires_in }))
        .into_response()
}

async fn items(
    State(s): State<FaultApi>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let hit = s.hits.fetch_add(1, Ordering::SeqCst);
    s.seen_queries.lock().unwrap().push(
        q.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&"),
    );
    match s.fault {
        Fault::RateLimitedOnce if hit == 0 => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response()
        }
        Fault::ServerErrors(n) if hit < n => {
            return (StatusCode::BAD_GATEWAY, "upstream hiccup").into_response()
        }
        Fault::FirstTokenRevoked
            if headers.get("authorization").and_then(|v| v.to_str().ok())
                == Some("Bearer tok-0") =>
        {
            return (StatusCode::UNAUTHORIZED, "revoked").into_response()
        }
        Fault::RefusedForAMinute(status) => {
            return (
                StatusCode::from_u16(status).unwrap(),
                [("retry-after", "60")],
                "come back in a minute",
            )
                .into_response()
        }
        Fault::RateLimitedForAnHour => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "3600")],
                "come back later",
            )
                .into_response()
        }
        Fault::UnavailableOnce if hit == 0 => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "maintenance",
            )
                .into_response()
        }
        Fault::Malformed => {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"data\": [1, 2",
            )
                .into_response()
        }
        Fault::Slow => tokio::time::sleep(Duration::from_secs(3)).await,
        Fault::ExpiringTokens => {
            // Tokens live one second; each page takes 0.4 s to serve.
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let ok = s.issued.lock().unwrap().iter().any(|(t, at)| {
                auth == format!("Bearer {t}") && at.elapsed() < Duration::from_secs(1)
            });
            if !ok {
                return (StatusCode::UNAUTHORIZED, "expired").into_response();
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        _ => {}
    }
    let cursor: u64 = q
        .iter()
        .find(|(k, _)| k == "cursor")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let data: Vec<Value> = (cursor..(cursor + 10).min(45)).map(|i| json!({ "id": i, "title": format!("t{i}"), "updated": format!("2026-11-{:02}T00:00:00Z", 1 + i % 28) })).collect();
    if s.fault == Fault::CursorLoop {
        return Json(json!({ "data": data, "next": "10", "servedAt": hit })).into_response();
    }
    let next = if cursor + 10 < 45 {
        json!((cursor + 10).to_string())
    } else {
        Value::Null
    };
    Json(json!({ "data": data, "next": next })).into_response()
}

async fn receive(
    State(s): State<FaultApi>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let key = headers.get("idempotency-key").map(|k| k.to_str().unwrap());
    s.push_keys
        .lock()
        .unwrap()
        .push(key.unwrap_or("").to_string());
    s.pushed.lock().unwrap().push(body);
    if s.fault == Fault::SlowSecondPush && s.pushed.lock().unwrap().len() == 2 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    if s.fault == Fault::SlowPushes {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    StatusCode::OK
}

async fn fault_api(fault: Fault) -> (String, FaultApi) {
    let state = FaultApi {
        fault,
        hits: Default::default(),
        tokens: Default::default(),
        issued: Default::default(),
        pushed: Default::default(),
        push_keys: Default::default(),
        seen_queries: Default::default(),
    };
    let app = Router::new()
        .route("/token", post(token))
        .route("/items", get(items))
        .route("/inbox", post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn cursor_config(name: &str, base: &str, extra_source: &str, auth: &str) -> String {
    format!(
        r#"
name = "{name}"
type = "IMPORT"
endpoint = "{base}/items"
allow_private_network = true
{auth}
[source]
records = "$.data[*]"
timeout_seconds = 10
{extra_source}
[source.pagination]
type = "cursor"
cursor_path = "$.next"
[source.retry]
max_attempts = 4
initial_backoff_ms = 20
max_backoff_ms = 100

[target]
collection = "things"
key = "thingId"
[mapping.thingId]
path = "$.id"
type = "string"
required = true
[mapping.title]
path = "$.title"
[mapping.updated]
path = "$.updated"
type = "date"
[incremental]
cursor_field = "updated"
param = "since"
"#
    )
}

#[tokio::test]
async fn an_import_whose_finishing_step_failed_is_recorded_failed_and_finished_by_the_next_run() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("unfinished", &base, "", "")).await;
    // Every page is stored, but the update advancing `lastSync` and the cursor (an
    // `update` on `integration_configs`, the run's only one) never reaches the server:
    // its connection breaks, and so does the driver's retry of it.
    let (uri, armed, severed, _) =
        support::severing_mongo_proxy(b"update\0\x14\0\0\0integration_configs\0").await;
    let proxied = support::store_via(&uri, &db.name).await;
    armed.store(true, Ordering::SeqCst);
    let err = run_import(&proxied, &name, &ImportOptions::default())
        .await
        .unwrap_err();
    assert!(severed.load(Ordering::SeqCst) >= 1);
    assert!(err.to_string().contains("advance lastSync"), "{err}");
    assert_eq!(count(&db, "things").await, 45);
    let config = || async {
        db.store
            .collection("integration_configs")
            .find_one(doc! { "name": &name })
            .await
            .unwrap()
            .unwrap()
    };
    let cfg = config().await;
    assert!(
        !cfg.contains_key("lastSync") && !cfg.contains_key("syncCursor"),
        "{cfg}"
    );
    let runs = || async {
        db.store
            .collection("import_runs")
            .find(doc! { "config": &name })
            .sort(doc! { "startedAt": 1 })
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    };
    let first = runs().await;
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].get_str("status").unwrap(),
        "FAILED",
        "{}",
        first[0]
    );
    assert!(
        first[0]
            .to_string()
            .contains("every page was stored, but finishing the run failed"),
        "{}",
        first[0]
    );
    // Counted as it is recorded.
    let runs_counted = |status: &str| {
        sluice_core::metrics::value(
            "sluice_import_runs_total",
            &[("config", "unfinished"), ("status", status)],
        )
    };
    assert_eq!(
        (runs_counted("FAILED"), runs_counted("COMPLETED")),
        (1.0, 0.0)
    );
    // Failing the same way at every fire, the run keeps its latest 20 failures listed and
    // counts them all.
    for _ in 0..21 {
        run_import(&proxied, &name, &ImportOptions::default())
            .await
            .unwrap_err();
    }

    // The next run finishes it: the cursor and `lastSync` advance, nothing is stored twice.
    armed.store(false, Ordering::SeqCst);
    let s = run_import(&proxied, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    assert_eq!(count(&db, "things").await, 45);
    let cfg = config().await;
    assert!(cfg.contains_key("lastSync"), "{cfg}");
    assert!(cfg.contains_key("syncCursor"), "{cfg}");
    // The same run, resumed and completed, with the failure kept in its history.
    let all = runs().await;
    assert_eq!(all.len(), 1, "{all:?}");
    let run = &all[0];
    assert_eq!(run.get_str("status").unwrap(), "COMPLETED", "{run}");
    assert!(run.get_bool("resumed").unwrap(), "{run}");
    let failures = run.get_array("failures").unwrap();
    assert_eq!(failures.len(), 20, "{run}");
    assert_eq!(run.get_i64("failureCount").unwrap(), 22, "{run}");
    assert!(
        failures[0].to_string().contains("finishing the run failed"),
        "{run}"
    );
    // It read no page again: the checkpoint was past the last one.
    assert_eq!(api.hits.load(Ordering::SeqCst), 5);
    assert_eq!(
        (runs_counted("FAILED"), runs_counted("COMPLETED")),
        (22.0, 1.0)
    );
}

#[tokio::test]
async fn a_config_that_cannot_start_is_recorded_as_a_failed_run() {
    let db = TestDb::initialized().await;
    // A host no resolver knows (`.invalid` is reserved for that).
    let name = apply(
        &db,
        &cursor_config("unreachable", "http://no-such-host.invalid", "", ""),
    )
    .await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    let runs: Vec<_> = db
        .store
        .collection("import_runs")
        .find(doc! { "config": &name })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].get_str("status").unwrap(), "FAILED", "{}", runs[0]);
    let recorded = runs[0].get_str("error").unwrap();
    assert!(
        recorded.starts_with("the run could not start: "),
        "{recorded}"
    );
    assert!(recorded.contains(&err), "{recorded} / {err}");
    assert_eq!(
        sluice_core::metrics::value(
            "sluice_import_runs_total",
            &[("config", "unreachable"), ("status", "FAILED")],
        ),
        1.0
    );
    // A dry run records nothing, and neither does a config that is not stored.
    let dry = ImportOptions {
        dry_run: true,
        ..Default::default()
    };
    assert!(run_import(&db.store, &name, &dry).await.is_err());
    assert!(
        run_import(&db.store, "not-stored", &ImportOptions::default())
            .await
            .is_err()
    );
    let all = db
        .store
        .collection("import_runs")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(all, 1);
}

#[tokio::test]
async fn retries_honour_retry_after_and_ride_out_5xx_bursts() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::RateLimitedOnce).await;
    let name = apply(&db, &cursor_config("limited", &base, "", "")).await;
    let started = std::time::Instant::now();
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 must be waited"
    );
    assert_eq!((s.fetched, s.http.retries), (45, 1));
    assert_eq!(api.hits.load(Ordering::SeqCst), 6);
    assert_eq!(
        (s.http.failed.rate_limited, s.http.failed.server_error),
        (1, 0)
    );

    let db = TestDb::initialized().await;
    let (base, _) = fault_api(Fault::ServerErrors(3)).await;
    let name = apply(&db, &cursor_config("bursty", &base, "", "")).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.http.retries), (45, 3));
    assert_eq!((s.http.failed.server_error, s.http.failed.network), (3, 0));
    assert_eq!(count(&db, "things").await, 45);
    // The run gave the target a unique index on its key (upserts by key need one).
    let indexes: Vec<mongodb::IndexModel> = db
        .store
        .collection("things")
        .list_indexes()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        indexes.iter().any(|m| m.keys == doc! { "thingId": 1 }
            && m.options.as_ref().and_then(|o| o.unique) == Some(true)),
        "{indexes:?}"
    );

    // The run's counts reach /metrics.
    let server = support::start_server(&db, |_| {}).await;
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "sluice_import_records_total{config=\"bursty\",stage=\"fetched\"} 45",
        "sluice_import_records_total{config=\"bursty\",stage=\"upserted\"} 45",
        "sluice_import_records_total{config=\"bursty\",stage=\"unchanged\"} 0",
        "sluice_import_records_total{config=\"bursty\",stage=\"failed\"} 0",
        "sluice_http_requests_total{config=\"bursty\",kind=\"retry\"} 3",
        "sluice_http_failures_total{config=\"bursty\",class=\"server_error\"} 3",
        "sluice_http_failures_total{config=\"bursty\",class=\"malformed\"} 0",
        "sluice_import_runs_total{config=\"bursty\",status=\"COMPLETED\"} 1",
        "sluice_import_run_seconds_count{config=\"bursty\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_long_retry_after_fails_at_once_and_a_503_retry_after_is_waited() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::RateLimitedForAnHour).await;
    let name = apply(&db, &cursor_config("hour", &base, "", "")).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("asked to wait 3600 s"), "{err}");
    assert_eq!(api.hits.load(Ordering::SeqCst), 1, "no attempt spent early");

    let (base, api) = fault_api(Fault::UnavailableOnce).await;
    let name = apply(&db, &cursor_config("maintenance", &base, "", "")).await;
    let started = std::time::Instant::now();
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 on a 503 must be waited (backoff alone is at most 100 ms here)"
    );
    assert_eq!((s.fetched, s.http.retries), (45, 1));
    assert_eq!(api.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn the_last_attempt_is_not_followed_by_a_wait() {
    let db = TestDb::initialized().await;
    for status in [429, 503] {
        let (base, api) = fault_api(Fault::RefusedForAMinute(status)).await;
        let config = cursor_config(&format!("last-{status}"), &base, "", "")
            .replace("max_attempts = 4", "max_attempts = 1");
        let name = apply(&db, &config).await;
        // Waiting the minute asked for after the only attempt would outlast the bound,
        // which is a third of it.
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            run_import(&db.store, &name, &ImportOptions::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("{status}: the run waited after its last attempt"))
        .unwrap_err()
        .to_string();
        assert!(err.contains(&status.to_string()), "{err}");
        assert_eq!(api.hits.load(Ordering::SeqCst), 1, "{status}: one attempt");
    }
}

#[tokio::test]
async fn a_token_endpoint_that_fails_once_is_retried_and_a_401_refreshes_even_with_one_attempt() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::TokenDownOnce).await;
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_E", "whatever")]);
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let name = apply(&db, &cursor_config("provider-blip", &base, "", &auth)).await;
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert!(s.http.retries >= 1, "{:?}", s.http);
    assert!(api.tokens.load(Ordering::SeqCst) >= 1);

    // An error body in OAuth's shape whose code RFC 6749 does not define (a 429 here) is
    // the endpoint being busy, not the credentials being wrong: retried too, not before
    // its `Retry-After`.
    let (base, _) = fault_api(Fault::TokenBusyOnce).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let name = apply(&db, &cursor_config("provider-busy", &base, "", &auth)).await;
    let started = std::time::Instant::now();
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert!(s.http.retries >= 1, "{:?}", s.http);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "the token endpoint's Retry-After: 1 must be waited (backoff alone is at most 100 ms here)"
    );
    // One that asks for longer than a run waits fails the run at once.
    let (base, api) = fault_api(Fault::TokenBusyForAnHour).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let name = apply(&db, &cursor_config("provider-away", &base, "", &auth)).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("asked to wait 3600 s"), "{err}");
    assert_eq!(api.hits.load(Ordering::SeqCst), 1, "no attempt spent early");

    // An answer longer than 1 MiB is not read whole: the run fails saying so.
    let (base, api) = fault_api(Fault::HugeTokenAnswer).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let name = apply(&db, &cursor_config("provider-verbose", &base, "", &auth)).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("answer is longer than 1024 KiB"), "{err}");
    assert!(api.hits.load(Ordering::SeqCst) >= 1);

    // A token URL that is not one (404) is not asked again: the run fails naming the
    // status and the setting.
    let asked = Arc::new(AtomicU64::new(0));
    let counted = asked.clone();
    let addr = serve(Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (StatusCode::NOT_FOUND, "no such page")
        }
    }))
    .await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"http://{addr}/oauth/tokn\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let name = apply(&db, &cursor_config("provider-typo", &base, "", &auth)).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("answered 404 Not Found (check `token_url`)"),
        "{err}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1, "not retried");

    // A token endpoint failing with an HTML error page: the error names its status, not
    // only what oauth2 made of the body.
    let addr = serve(Router::new().fallback(|| async {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/html")],
            "<html>oops</html>",
        )
    }))
    .await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"http://{addr}/oauth/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let config = cursor_config("provider-down", &base, "", &auth)
        .replace("max_attempts = 4", "max_attempts = 2");
    let name = apply(&db, &config).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the token endpoint answered 500 Internal Server Error: "),
        "{err}"
    );

    // A token revoked before it expires gets a 401; with a single attempt, the refresh
    // still happens, on an attempt of its own.
    let (base, api) = fault_api(Fault::FirstTokenRevoked).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let config =
        cursor_config("one-shot", &base, "", &auth).replace("max_attempts = 4", "max_attempts = 1");
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert_eq!(
        api.tokens.load(Ordering::SeqCst),
        2,
        "one refresh after the 401"
    );
}

#[tokio::test]
async fn malformed_json_and_slow_answers_fail_the_run_clearly() {
    let db = TestDb::initialized().await;
    let (base, _) = fault_api(Fault::Malformed).await;
    let name = apply(&db, &cursor_config("garbled", &base, "", "")).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("malformed JSON"), "{err}");
    assert!(err.contains("(the last of 4 attempts)"), "{err}");
    // A JSON answer cut short is not quoted (it holds the API's records)...
    assert!(!err.contains("begins"), "{err}");
    // ...what came instead of JSON is, with its type.
    let addr = serve(Router::new().route(
        "/login",
        get(|| async {
            (
                [("content-type", "text/html")],
                "<!DOCTYPE html><title>Sign in</title>",
            )
        }),
    ))
    .await;
    let config = things_config("html", &format!("http://{addr}/login"), "type = \"none\"")
        + "[source.retry]\nmax_attempts = 1\n";
    let name = apply(&db, &config).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the answer (text/html) begins `<!DOCTYPE html><title>Sign in</title>`"),
        "{err}"
    );

    let (base, _) = fault_api(Fault::Slow).await;
    // A short timeout only here: elsewhere a loopback answer stalled by a loaded machine
    // must not add a retry to the counts the tests assert.
    let sluggish = cursor_config("sluggish", &base, "", "")
        .replace("timeout_seconds = 10", "timeout_seconds = 1");
    let name = apply(&db, &sluggish).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed after 4 attempts") && err.contains("within `timeout_seconds` (1 s)"),
        "{err}"
    );
    assert_eq!(count(&db, "things").await, 0);
}

#[tokio::test]
async fn a_token_expiring_mid_run_is_refreshed() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::ExpiringTokens).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_D}}\"\n");
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_D", "whatever")]);
    let name = apply(&db, &cursor_config("expiring", &base, "", &auth)).await;
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert!(
        s.http.token_refreshes >= 3,
        "5 pages of 0.4 s with 1 s tokens: {:?}",
        s.http
    );
    assert_eq!(api.tokens.load(Ordering::SeqCst), s.http.token_refreshes);
}

#[tokio::test]
async fn a_token_living_forever_is_used_for_the_run_and_a_page_over_the_cap_fails_it() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::EndlessTokens).await;
    let auth = format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_SECRET_E}}\"\n");
    let opts = with_secrets(&[("IMPORT_TEST_SECRET_E", "whatever")]);
    let name = apply(&db, &cursor_config("endless", &base, "", &auth)).await;
    // An `expires_in` past what the clock holds panicked the run.
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert_eq!(api.tokens.load(Ordering::SeqCst), 1);
    // A page over `max_page_mb` fails the run, naming the setting.
    let url = serve_page("/big", vec![json!({ "id": "x".repeat(1024) }); 1100]).await;
    let config = things_config("capped-page", &url, "type = \"none\"")
        .replace("[source]", "[source]\nmax_page_mb = 1");
    let name = apply(&db, &config).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_page_mb") && err.contains("1 MiB"),
        "{err}"
    );
}

#[tokio::test]
async fn mapping_failures_are_counted_and_sampled_and_the_cursor_is_incremental() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let mut text = cursor_config("strict", &base, "", "");
    text = text.replace(
        "[mapping.title]\npath = \"$.title\"",
        "[mapping.title]\npath = \"$.title\"\ntype = \"integer\"",
    );
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed), (45, 45), "`t0` is not an integer");
    assert!(
        s.samples[0].reason.contains("`title`") && s.samples[0].reason.contains("integer"),
        "{:?}",
        s.samples[0]
    );
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "strict" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_i64("failedMappings").unwrap(), 45);
    assert!(!run.get_array("samples").unwrap().is_empty());

    let name = apply(&db, &cursor_config("strict", &base, "", "")).await;
    run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    let queries = api.seen_queries.lock().unwrap().clone();
    let last = queries.last().unwrap();
    assert!(
        last.contains("since=2026-11-28T00:00:00"),
        "the next run starts from the cursor: {queries:?}"
    );
}

#[tokio::test]
async fn dry_run_writes_nothing_and_private_addresses_are_refused() {
    let db = TestDb::initialized().await;
    let (base, _) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("preview", &base, "", "")).await;
    let s = run_import(
        &db.store,
        &name,
        &ImportOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(s.fetched, 45);
    assert_eq!(s.preview.len(), 5);
    assert_eq!(count(&db, "things").await, 0);
    assert_eq!(count(&db, "import_runs").await, 0);

    let guarded =
        cursor_config("guarded", &base, "", "").replace("allow_private_network = true", "");
    let name = apply(&db, &guarded).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("loopback") && err.contains("allow_private_network"),
        "{err}"
    );
    // A name is refused without the error saying where it points (USER accounts read run
    // errors; an ADMIN's configs could otherwise map internal names to addresses).
    let named = guarded
        .replace("127.0.0.1", "localhost")
        .replace("guarded", "named");
    let name = apply(&db, &named).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("loopback"), "{err}");
    assert!(!err.contains("127.0.0.1") && !err.contains("::1"), "{err}");
}

/// The pages served, and whether the API is fixed.
type LinkedState = (Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicBool>);

/// Link-header pages: the first names the second relatively; the second names a third
/// on another origin (`localhost` instead of the vetted `127.0.0.1`), until the flag is
/// set (the API fixed), then relatively.
async fn linked(
    State((hits, fixed)): State<LinkedState>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let page = q
        .iter()
        .find(|(k, _)| k == "p")
        .map_or("1", |(_, v)| v.as_str())
        .to_string();
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    hits.lock().unwrap().push(format!("{host} p={page}"));
    let port = host.rsplit(':').next().unwrap_or("").to_string();
    let (ids, next) = match page.as_str() {
        "1" => (0..3, "</linked?p=2>; rel=\"next\"".to_string()),
        "2" if fixed.load(Ordering::SeqCst) => (3..6, "</linked?p=3>; rel=\"next\"".to_string()),
        "2" => (
            3..6,
            format!("<http://localhost:{port}/linked?p=3>; rel=\"next\""),
        ),
        _ => (6..9, String::new()),
    };
    let data: Vec<Value> = ids
        .map(|i| json!({ "id": i, "title": format!("t{i}") }))
        .collect();
    ([("link", next)], Json(json!({ "data": data }))).into_response()
}

/// Serves `app` on a loopback port for one test.
async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Serves `{"data": records}` as JSON at `path`, the same page on every request; returns
/// the page's URL.
async fn serve_page(path: &str, records: Vec<Value>) -> String {
    let page = json!({ "data": records }).to_string();
    let addr = serve(Router::new().route(
        path,
        get(move || {
            let page = page.clone();
            async move { ([("content-type", "application/json")], page) }
        }),
    ))
    .await;
    format!("http://{addr}{path}")
}

/// An IMPORT of `{"data": [{"id": ...}]}` pages into `things`, keyed by id.
fn things_config(name: &str, endpoint: &str, pagination: &str) -> String {
    format!(
        r#"
name = "{name}"
type = "IMPORT"
endpoint = "{endpoint}"
allow_private_network = true
[source]
records = "$.data[*]"
[source.pagination]
{pagination}
[target]
collection = "things"
key = "thingId"
[mapping.thingId]
path = "$.id"
type = "string"
required = true
"#
    )
}

/// 25 records by `page` and `limit`, reading the first value of each parameter given
/// twice, as many frameworks do.
async fn first_value(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let first = |name: &str| -> Option<u64> {
        q.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    let (page, limit) = (first("page").unwrap_or(1), first("limit").unwrap_or(10));
    let data: Vec<Value> = ((page - 1) * limit..(page * limit).min(25))
        .map(|i| json!({ "id": i }))
        .collect();
    Json(json!({ "data": data }))
}

#[tokio::test]
async fn a_page_size_in_the_endpoint_is_replaced_by_the_configured_one_not_sent_beside_it() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/first", get(first_value))).await;
    // An endpoint copied from the API's docs with its own `limit`: sent beside Sluice's,
    // the API took 5, shorter than `size`, and the run stopped after one page.
    let text = things_config(
        "first-value",
        &format!("http://{addr}/first?limit=5"),
        "type = \"page\"\nsize = 10",
    );
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed, "{s:?}");
    assert_eq!(s.fetched, 25, "{s:?}");
    assert_eq!(count(&db, "things").await, 25);
}

/// Pages of at most 5 records whatever the client asks, with the total and whether more
/// follow in the body.
async fn capped(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let page: u64 = q
        .iter()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1);
    let from = (page - 1) * 5;
    let data: Vec<Value> = (from..(from + 5).min(12))
        .map(|i| json!({ "id": i }))
        .collect();
    Json(json!({ "data": data, "total": 12, "pages": 3, "more": from + 5 < 12 }))
}

/// One page of records, gzip-compressed.
async fn gzipped() -> Response {
    use std::io::Write;
    let body = json!({ "data": [{ "id": 1 }, { "id": 2 }] }).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    (
        [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        gz.finish().unwrap(),
    )
        .into_response()
}

#[tokio::test]
async fn gzip_compressed_answers_are_read() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/gz", get(gzipped))).await;
    let config = things_config("gz", &format!("http://{addr}/gz"), "type = \"none\"");
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(s.fetched, 2);
    assert_eq!(count(&db, "things").await, 2);
}

/// 25 records by `page` and `limit`; only those of the first page have a `sku`.
async fn sku_on_page_one(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let get = |name: &str| -> Option<u64> {
        q.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    let (page, limit) = (get("page").unwrap_or(1), get("limit").unwrap_or(10));
    let data: Vec<Value> = ((page - 1) * limit..(page * limit).min(25))
        .map(|i| match page {
            1 => json!({ "id": i, "sku": format!("SKU-{i}") }),
            _ => json!({ "id": i }),
        })
        .collect();
    Json(json!({ "data": data }))
}

/// A resumed run counts what the pages before the interruption found: a field only they
/// had is no path that finds nothing.
#[tokio::test]
async fn a_resumed_run_remembers_which_fields_its_first_pages_found() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/skus", get(sku_on_page_one))).await;
    let config = things_config(
        "skus",
        &format!("http://{addr}/skus"),
        "type = \"page\"\nsize = 10",
    ) + "[mapping.sku]\npath = \"$.sku\"\n";
    let name = apply(&db, &config).await;
    let first = run_import(
        &db.store,
        &name,
        &ImportOptions {
            stop_after_pages: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!first.completed);
    let resumed = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(resumed.completed && resumed.resumed, "{resumed:?}");
    assert_eq!(resumed.fetched, 25);
    assert!(
        !resumed
            .warnings
            .iter()
            .any(|w| w.contains("found no value")),
        "{:?}",
        resumed.warnings
    );
    // The same source without the first page's skus is warned of, over all 25 records.
    db.store
        .collection("things")
        .delete_many(doc! {})
        .await
        .unwrap();
    let config = config
        .replace("$.sku", "$.skew")
        .replace("\"skus\"", "\"skews\"");
    let name = apply(&db, &config).await;
    run_import(
        &db.store,
        &name,
        &ImportOptions {
            stop_after_pages: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let resumed = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        resumed
            .warnings
            .iter()
            .any(|w| w.contains("`sku` (`$.skew`)") && w.contains("25 records")),
        "{:?}",
        resumed.warnings
    );
}

#[tokio::test]
async fn a_mapping_path_that_finds_nothing_and_a_records_path_without_its_items_are_warned_of() {
    let db = TestDb::initialized().await;
    let data: Vec<Value> = (0..12)
        .map(|i| json!({ "id": i, "variants": [{ "price": 9.5 }], "note": null }))
        .collect();
    let url = serve_page("/typo", data).await;
    let config = things_config("typo", &url, "type = \"none\"")
        + "[mapping.price]\npath = \"$.variant[0].price\"\ntype = \"number\"\n\
           [mapping.sold]\npath = \"$.variants[0].price\"\ntype = \"number\"\n\
           [mapping.flag]\npath = \"$.flag\"\ndefault = false\n";
    let name = apply(&db, &config).await;
    for dry_run in [true, false] {
        let s = run_import(
            &db.store,
            &name,
            &ImportOptions {
                dry_run,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let warned: Vec<&String> = s
            .warnings
            .iter()
            .filter(|w| w.contains("found no value"))
            .collect();
        assert_eq!(warned.len(), 1, "{:?}", s.warnings);
        // The wrong path only: not the right one, nor one with a default.
        assert!(
            warned[0].contains("`price` (`$.variant[0].price`)")
                && warned[0].contains("12 records")
                && !warned[0].contains("`sold`")
                && !warned[0].contains("`flag`"),
            "{}",
            warned[0]
        );
    }

    // `$.data` without `[*]`: the whole list is one record.
    let text = config.replace("records = \"$.data[*]\"", "records = \"$.data\"");
    let name = apply(&db, &text.replace("name = \"typo\"", "name = \"whole\"")).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("selected a list as one record") && w.contains("`[*]`")),
        "{:?}",
        s.warnings
    );
}

#[tokio::test]
async fn big_documents_are_written_in_commands_that_fit_and_one_too_big_fails_alone() {
    let db = TestDb::initialized().await;
    // 450 records of 40 KB (18 MB: more than one command may carry) and one of 17 MiB
    // (more than MongoDB stores).
    let mut data: Vec<Value> = (0..450)
        .map(|i| json!({ "id": i, "body": "x".repeat(40_000) }))
        .collect();
    data.push(json!({ "id": "huge", "body": "y".repeat(17 * 1024 * 1024) }));
    let url = serve_page("/big", data).await;
    // One page of 35 MB: over the default `max_page_mb`.
    let config = things_config("big", &url, "type = \"none\"")
        .replace("[source]", "[source]\nmax_page_mb = 64")
        + "[mapping.body]\npath = \"$.body\"\ntype = \"string\"\n";
    let name = apply(&db, &config).await;
    let first = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(first.completed);
    assert_eq!((first.inserted, first.failed), (450, 1));
    // Its sample (stored in `import_runs`) keeps the key whole and the body's start.
    assert_eq!(first.samples[0].record["thingId"], "huge");
    assert!(first.samples[0].record["body"].as_str().unwrap().len() < 1_000);
    // Run again, every record exists: all go through the upserts, sent in commands that
    // fit (MongoDB refuses a command over 16 MiB whole, which failed every run on the
    // page; the test server accepts one, so the grouping is unit-tested too). Nothing
    // changed, so nothing is updated.
    let second = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(second.completed);
    assert_eq!(
        (second.updated, second.unchanged, second.failed),
        (0, 450, 1)
    );
    assert_eq!(count(&db, "things").await, 450);
    // The refused record is kept as the start of its JSON, once.
    let letters: Vec<bson::Document> = db
        .store
        .collection("dead_letters")
        .find(doc! { "pipeline": "import:big" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let record = letters[0].get_document("record").unwrap();
    assert_eq!(record.get_str("thingId"), Ok("huge"), "the key stays whole");
    assert!(record.get_str("body").unwrap().ends_with(" bytes)"));
    assert!(record.get_document("_truncated").is_ok());
    assert!(letters[0].get_str("reason").unwrap().contains("16 MiB"));
}

#[tokio::test]
async fn failures_beyond_what_a_run_keeps_hold_the_cursor() {
    let db = TestDb::initialized().await;
    // 10,005 records whose `n` is no integer, and one that maps.
    let mut data: Vec<Value> = (0..10_005)
        .map(|i| json!({ "id": i, "n": "many", "updated": "2026-11-28T00:00:00Z" }))
        .collect();
    data.push(json!({ "id": "ok", "n": 1, "updated": "2026-11-29T00:00:00Z" }));
    let url = serve_page("/many", data).await;
    let config = things_config("many", &url, "type = \"none\"")
        + "[mapping.n]\npath = \"$.n\"\ntype = \"integer\"\n[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\n";
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    assert_eq!((s.inserted, s.failed), (1, 10_005));
    let kept = db
        .store
        .collection("dead_letters")
        .count_documents(doc! { "pipeline": "import:many" })
        .await
        .unwrap();
    assert_eq!(kept, 10_000);
    // Five are neither stored nor kept: moving past them would lose them for good.
    assert_eq!(sync_cursor(&db, "many").await, None);
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("not advanced") && w.contains("10000")),
        "{:?}",
        s.warnings
    );
}

#[tokio::test]
async fn an_api_capping_its_page_size_is_read_to_its_total() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/capped", get(capped))).await;
    let config = things_config(
        "capped",
        &format!("http://{addr}/capped"),
        "type = \"page\"\nsize = 10\ntotal_path = \"$.total\"",
    );
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (s.fetched, s.pages),
        (12, 3),
        "5 + 5 + 2, though 10 were asked for"
    );
    assert_eq!(count(&db, "things").await, 12);
    // Without a total, `has_more: true` on a short page says it is not the last.
    let db = TestDb::initialized().await;
    let config = things_config(
        "capped-more",
        &format!("http://{addr}/capped"),
        "type = \"page\"\nsize = 10\nhas_more_path = \"$.more\"",
    );
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.pages), (12, 3));
    // A total that counts pages is below the records of the first full page: the run
    // says so and counts as cut short, rather than passing for complete.
    let db = TestDb::initialized().await;
    let config = things_config(
        "capped-pages",
        &format!("http://{addr}/capped"),
        "type = \"page\"\nsize = 5\ntotal_path = \"$.pages\"",
    );
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.pages), (5, 1));
    let why = s.stopped_early.unwrap_or_default();
    assert!(
        why.contains("`total_path` ($.pages) says 3 records, fewer than the 5")
            && why.contains("counts pages"),
        "{why}"
    );
}

#[tokio::test]
async fn link_pages_resolve_relative_urls_and_never_leave_the_vetted_origin() {
    let db = TestDb::initialized().await;
    let hits: Arc<Mutex<Vec<String>>> = Default::default();
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = serve(
        Router::new()
            .route("/linked", get(linked))
            .with_state((hits.clone(), fixed.clone())),
    )
    .await;
    let config = things_config(
        "linked",
        &format!("http://{addr}/linked"),
        "type = \"link_header\"\n[source.retry]\nmax_attempts = 1",
    );
    let name = apply(&db, &config).await;
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only fetched from the endpoint's own origin"),
        "{err}"
    );
    let served = hits.lock().unwrap().clone();
    assert_eq!(
        served.len(),
        2,
        "the relative page 2 was followed, page 3 never: {served:?}"
    );
    assert!(served[1].ends_with("p=2"), "{served:?}");
    // The page naming the refused one was not written: the checkpoint stays at it, not
    // at a page every later run would refuse.
    assert_eq!(count(&db, "things").await, 3);
    // A checkpoint naming such a page (saved by an earlier version) fails its run once
    // and is dropped, rather than failing every run.
    let checkpoints = db.store.collection("import_checkpoints");
    let saved = checkpoints
        .find_one(doc! { "_id": &name })
        .await
        .unwrap()
        .unwrap();
    let state = saved
        .get_str("state")
        .unwrap()
        .replace("127.0.0.1", "localhost");
    assert!(state.contains("localhost"), "{state}");
    checkpoints
        .update_one(doc! { "_id": &name }, doc! { "$set": { "state": state } })
        .await
        .unwrap();
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("endpoint's own origin"), "{err}");
    assert_eq!(
        checkpoints.count_documents(doc! {}).await.unwrap(),
        0,
        "the checkpoint was dropped"
    );
    hits.lock().unwrap().clear();
    // Once the API names the right page, the next run reads page 2 again and goes on.
    fixed.store(true, Ordering::SeqCst);
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed && !s.resumed, "{s:?}");
    assert_eq!(count(&db, "things").await, 9);
    let served = hits.lock().unwrap().clone();
    assert!(
        served[1].ends_with("p=2") && served[2].ends_with("p=3") && served.len() == 3,
        "{served:?}"
    );
}

#[tokio::test]
async fn a_stop_request_ends_the_run_interrupted_at_its_checkpoint() {
    let db = TestDb::initialized().await;
    let (base, _) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("stoppable", &base, "", "")).await;
    // What Ctrl-C / SIGTERM do to `sluice import run`.
    let options = ImportOptions::default();
    options.progress.stop.store(true, Ordering::SeqCst);
    let first = run_import(&db.store, &name, &options).await.unwrap();
    assert!(!first.completed);
    assert_eq!(first.pages, 1);
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "runId": &first.run_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_str("status").unwrap(), "INTERRUPTED");
    let rest = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(rest.resumed && rest.completed);
    assert_eq!(rest.fetched, 45);
}

#[tokio::test]
async fn a_run_resumed_by_another_process_while_this_one_was_stopped_is_left_to_it() {
    let db = TestDb::initialized().await;
    // As it serves the third page, the API takes the run over: what another replica
    // resuming it does while this process is paused past its lease (a VM paused, a
    // laptop asleep).
    let runs = db.store.collection("import_runs");
    let checkpoints = db.store.collection("import_checkpoints");
    // `resumed`: the other process resumes the run; else it starts a new one (the config
    // changed, so it drops the checkpoint and starts over), which supersedes every
    // earlier attempt.
    let api = move |resumed: bool| {
        let (runs, checkpoints) = (runs.clone(), checkpoints.clone());
        move |Query(q): Query<Vec<(String, String)>>| {
            let (runs, checkpoints) = (runs.clone(), checkpoints.clone());
            async move {
                let cursor: u64 = q
                    .iter()
                    .find(|(k, _)| k == "cursor")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                if cursor == 20 && resumed {
                    runs.update_many(
                        doc! { "config": "paused" },
                        doc! { "$set": { "status": "RUNNING", "attempt": "another process" } },
                    )
                    .await
                    .unwrap();
                    // The other process's own progress, which must stay as it wrote it.
                    checkpoints
                    .update_one(
                        doc! { "_id": "paused" },
                        doc! { "$set": { "takenOverBy": "another process", "attempt": "another process" } },
                    )
                    .await
                    .unwrap();
                }
                if cursor == 20 && !resumed {
                    runs.update_many(
                        doc! { "config": "restarted" },
                        doc! { "$set": { "attempt": "superseded" } },
                    )
                    .await
                    .unwrap();
                    // Its claim on the config, in place of the checkpoint it started over
                    // from.
                    checkpoints
                        .replace_one(
                            doc! { "_id": "restarted" },
                            doc! { "runId": "restarted-new", "attempt": "another process", "claimOnly": true },
                        )
                        .await
                        .unwrap();
                }
                let data: Vec<Value> = (cursor..(cursor + 10).min(45))
                    .map(|i| json!({ "id": i, "title": format!("t{i}") }))
                    .collect();
                let next = (cursor + 10 < 45).then(|| (cursor + 10).to_string());
                Json(json!({ "data": data, "next": next }))
            }
        }
    };
    let addr = serve(
        Router::new()
            .route("/items", get(api(true)))
            .route("/fresh/items", get(api(false))),
    )
    .await;
    // A run of config `name` from `base`, which the API takes over: its error.
    let taken_over = |name: &'static str, base: String| {
        let db = &db;
        async move {
            let name = apply(db, &cursor_config(name, &base, "", "")).await;
            let err = run_import(&db.store, &name, &ImportOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, ImportError::TakenOver(_)), "{err}");
            (name, err)
        }
    };
    let (name, err) = taken_over("paused", format!("http://{addr}")).await;
    assert!(err
        .to_string()
        .contains("left to the run that holds the config now"));
    // It stopped at the page it was writing (stored: upserts make reading it again
    // safe), before saving its place; the run's end, the checkpoint and the cursor are
    // the other process's.
    let stored = db
        .store
        .collection("things")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert!(stored < 45, "{stored}");
    // The run's record is the other process's: running, under its attempt.
    let still_the_others = || async {
        let run = db
            .store
            .collection("import_runs")
            .find_one(doc! { "config": &name })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.get_str("status").unwrap(), "RUNNING", "{run:?}");
        assert_eq!(run.get_str("attempt").unwrap(), "another process");
    };
    still_the_others().await;
    let checkpoint = db
        .store
        .collection("import_checkpoints")
        .find_one(doc! { "_id": &name })
        .await
        .unwrap();
    let checkpoint = checkpoint.expect("the checkpoint the other process resumes from is kept");
    // (The next page is fetched while one is written: the takeover may come while the
    // second page or the third is written. Either way the checkpoint is one page behind.)
    assert_eq!(
        (
            checkpoint.get_str("takenOverBy"),
            checkpoint.get_i64("pages").map(|p| p as u64 * 10 + 10)
        ),
        (Ok("another process"), Ok(stored)),
        "{checkpoint}"
    );
    let config = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": &name })
        .await
        .unwrap()
        .unwrap();
    assert!(config.get("lastSync").is_none(), "{config:?}");
    // Stopped by a signal now, this process marks no run INTERRUPTED: the run (under the
    // same run id) is the other process's.
    assert_eq!(
        sluice_jobs::import::mark_interrupted(&db.store, std::slice::from_ref(&name))
            .await
            .unwrap(),
        0
    );
    still_the_others().await;

    // A new run started meanwhile (not a resume): this process stops too, and writes
    // nothing over the new run's claim.
    let (restarted, _) = taken_over("restarted", format!("http://{addr}/fresh")).await;
    let left = db
        .store
        .collection("import_checkpoints")
        .find_one(doc! { "_id": &restarted })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left.get_str("runId"), Ok("restarted-new"), "{left}");
}

#[tokio::test]
async fn a_cursor_that_comes_back_stops_the_run_instead_of_looping() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::CursorLoop).await;
    let name = apply(&db, &cursor_config("looping", &base, "", "")).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    assert_eq!(s.pages, 2, "the first page, then cursor 10 once");
    assert_eq!(api.hits.load(Ordering::SeqCst), 2);
    assert!(
        s.stopped_early
            .as_deref()
            .is_some_and(|n| n.contains("already fetched")),
        "{:?}",
        s.stopped_early
    );
}

/// A filtered stream: cursor pages, one empty mid-way, and a caught-up last page naming
/// itself as the next.
async fn sparse(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let cursor = q
        .iter()
        .find(|(k, _)| k == "cursor")
        .map_or("", |(_, v)| v.as_str());
    let (ids, next): (Vec<u32>, &str) = match cursor {
        "" => (vec![1, 2], "a"),
        "a" => (vec![], "b"),
        "b" => (vec![3, 4], "c"),
        _ => (vec![], "c"),
    };
    let data: Vec<Value> = ids.into_iter().map(|i| json!({ "id": i })).collect();
    Json(json!({ "data": data, "next": next }))
}

#[tokio::test]
async fn an_empty_cursor_page_naming_a_next_one_is_followed() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/sparse", get(sparse))).await;
    let config = things_config(
        "sparse",
        &format!("http://{addr}/sparse"),
        "type = \"cursor\"\ncursor_path = \"$.next\"\ncursor_param = \"cursor\"",
    );
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    // Records after the empty page were lost before: the run ended there.
    assert_eq!((s.fetched, s.pages), (4, 4));
    assert_eq!(
        s.stopped_early, None,
        "a caught-up feed ends the run cleanly"
    );
    assert_eq!(count(&db, "things").await, 4);
}

/// An API that echoes the request's headers in its error body: the run's error (kept in
/// `import_runs`, shown to USER accounts) holds no credential as it went on the wire: a
/// Basic `Authorization`, a bearer token the run was issued, a header from `${env:}`.
#[tokio::test]
async fn an_api_echoing_the_request_headers_gets_no_credential_stored() {
    let db = TestDb::initialized().await;
    let echo = |headers: HeaderMap| async move {
        let seen: Vec<String> = ["authorization", "x-custom-auth"]
            .iter()
            .filter_map(|h| {
                headers
                    .get(*h)
                    .map(|v| format!("{h}: {}", v.to_str().unwrap()))
            })
            .collect();
        (
            StatusCode::UNAUTHORIZED,
            format!("denied; you sent {}", seen.join(", ")),
        )
    };
    let token = || async {
        Json(
            json!({ "access_token": "at-secret-access-123", "token_type": "bearer", "expires_in": 3600 }),
        )
    };
    let addr = serve(
        Router::new()
            .route("/echo", get(echo))
            .route("/token", post(token)),
    )
    .await;
    let base = things_config(
        "echo-basic",
        &format!("http://{addr}/echo"),
        "type = \"none\"",
    );
    let basic = base.replace(
        "[source]",
        "headers = { X-Custom-Auth = \"${env:IMPORT_TEST_CUSTOM}\" }\n[auth]\ntype = \"BASIC\"\nusername = \"svc-user\"\npassword = \"${env:IMPORT_TEST_BASIC_PW}\"\n[source]",
    );
    let oauth = things_config("echo-oauth", &format!("http://{addr}/echo"), "type = \"none\"").replace(
        "[source]",
        &format!("[auth]\ntype = \"OAUTH\"\ntoken_url = \"http://{addr}/token\"\nclient_id = \"cid\"\nclient_secret = \"${{env:IMPORT_TEST_CLIENT_SECRET}}\"\n[source]"),
    );
    let opts = with_secrets(&[
        ("IMPORT_TEST_CUSTOM", "HeaderSecret555"),
        ("IMPORT_TEST_BASIC_PW", "BasicPassw0rdSecret"),
        ("IMPORT_TEST_CLIENT_SECRET", "ClientSecretValue99"),
    ]);
    use base64::Engine;
    let encoded = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let leaks = [
        "HeaderSecret555".to_string(),
        "BasicPassw0rdSecret".to_string(),
        encoded("svc-user:BasicPassw0rdSecret"),
        "at-secret-access-123".to_string(),
        encoded("cid:ClientSecretValue99"),
    ];
    for (config, name) in [(basic, "echo-basic"), (oauth, "echo-oauth")] {
        apply(&db, &config).await;
        let err = run_import(&db.store, name, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("you sent authorization: "),
            "the API echoed: {err}"
        );
        let run = db
            .store
            .collection("import_runs")
            .find_one(doc! { "config": name })
            .await
            .unwrap()
            .unwrap()
            .to_string();
        for leak in &leaks {
            assert!(
                !err.contains(leak.as_str()) && !run.contains(leak.as_str()),
                "{leak} in {err} / {run}"
            );
        }
    }
}

#[tokio::test]
async fn an_api_echoing_a_wrong_key_does_not_get_it_stored() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route(
        "/echo",
        get(|headers: HeaderMap| async move {
            let key = headers["x-api-key"].to_str().unwrap().to_string();
            (StatusCode::UNAUTHORIZED, format!("invalid api key: {key}"))
        }),
    ))
    .await;
    let config = things_config("echo", &format!("http://{addr}/echo"), "type = \"none\"").replace(
        "[source]",
        "[auth]\ntype = \"API_KEY\"\nkey = \"${env:IMPORT_TEST_KEY_R}\"\n[source]",
    );
    let name = apply(&db, &config).await;
    let opts = with_secrets(&[("IMPORT_TEST_KEY_R", "sk-live-0123456789")]);
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("401") && err.contains("invalid api key: <redacted>"),
        "{err}"
    );
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": "echo" })
        .await
        .unwrap()
        .unwrap();
    assert!(!run.to_string().contains("sk-live"), "{run}");
}

#[tokio::test]
async fn a_key_echoed_encoded_or_kept_by_a_redirect_is_not_stored() {
    let db = TestDb::initialized().await;
    // The key goes in the query, `%`-encoded; one API echoes the query as it came and as a
    // JSON string with its slashes escaped, another redirects keeping it.
    let addr = serve(
        Router::new()
            .route(
                "/echo",
                get(|uri: axum::http::Uri| async move {
                    let query = uri.query().unwrap_or("").to_string();
                    let key = query.trim_start_matches("api_key=").to_string();
                    let decoded: String = url_decoded(&key);
                    let json = serde_json::to_string(&decoded).unwrap().replace('/', "\\/");
                    (
                        StatusCode::NOT_FOUND,
                        format!("no such page: /echo?{query}; key {json}"),
                    )
                }),
            )
            // An HTML error page, quoting the key as Go's html/template does.
            .route(
                "/html",
                get(|uri: axum::http::Uri| async move {
                    let query = uri.query().unwrap_or("").to_string();
                    let key = url_decoded(query.trim_start_matches("api_key="));
                    (
                        StatusCode::NOT_FOUND,
                        format!(
                            "<p>no page for key <b>{}</b></p>",
                            key.replace('+', "&#43;")
                        ),
                    )
                }),
            )
            .route(
                "/moved",
                get(|uri: axum::http::Uri| async move {
                    let to = format!("https://api.example/v2/items?{}", uri.query().unwrap_or(""));
                    (StatusCode::MOVED_PERMANENTLY, [("location", to)], "")
                }),
            )
            // Names its next page with the key in it, a page that is gone.
            .route(
                "/paged",
                get(|uri: axum::http::Uri| async move {
                    let query = uri.query().unwrap_or("").replace("api_key=", "token=");
                    Json(json!({ "data": [{ "id": "1" }], "next": format!("/gone?{query}") }))
                }),
            )
            .route("/gone", get(|| async { StatusCode::NOT_FOUND })),
    )
    .await;
    let secret = "sk_live/SECRET+123==";
    for (name, path) in [
        ("echo-encoded", "echo"),
        ("echo-html", "html"),
        ("moved", "moved"),
        ("next-page", "paged"),
    ] {
        let paging = if path == "paged" {
            "type = \"next_url\""
        } else {
            "type = \"none\""
        };
        let config = things_config(name, &format!("http://{addr}/{path}"), paging).replace(
                "[source]",
                "[auth]\ntype = \"API_KEY\"\nkey = \"${env:IMPORT_TEST_KEY_Q}\"\nquery = \"api_key\"\n[source]",
            );
        let name = apply(&db, &config).await;
        let opts = with_secrets(&[("IMPORT_TEST_KEY_Q", secret)]);
        let err = run_import(&db.store, &name, &opts)
            .await
            .unwrap_err()
            .to_string();
        let run = db
            .store
            .collection("import_runs")
            .find_one(doc! { "config": &name })
            .await
            .unwrap()
            .unwrap()
            .to_string();
        for shown in [&err, &run] {
            assert!(
                !shown.contains("SECRET"),
                "{name}: the key is shown: {shown}"
            );
        }
        if path == "moved" {
            assert!(
                err.contains("a redirect to `https://api.example/v2/items`"),
                "{err}"
            );
        } else {
            assert!(err.contains("404") && err.contains("<redacted>"), "{err}");
        }
    }
}

/// `text` with its `%`-escapes (and `+` as a space) decoded.
fn url_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn a_push_batch_is_cut_at_max_batch_mb() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let users = db.store.collection("users");
    for i in 0..12 {
        users
            .insert_one(doc! { "visitorId": format!("v{i:02}"), "notes": "n".repeat(300_000), "updatedAt": bson::DateTime::from_millis(1_000 + i) })
            .await
            .unwrap();
    }
    let text = format!(
        r#"
name = "bulky"
type = "EXPORT"
endpoint = "{base}/inbox"
allow_private_network = true
[push]
collection = "users"
watermark_field = "updatedAt"
batch_size = 100
max_batch_mb = 1
wrap = "contacts"
"#
    );
    let name = apply(&db, &text).await;
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    // 300 KB each: the fourth document of a batch takes it past 1 MiB.
    assert_eq!((s.read, s.sent, s.requests), (12, 12, 3));
    let pushed = api.pushed.lock().unwrap().clone();
    let sizes: Vec<usize> = pushed
        .iter()
        .map(|b| b["contacts"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [4, 4, 4]);
    assert_eq!(pushed[2]["contacts"][3]["visitorId"], "v11");
    // Larger batches than the receiver takes (2 MB here): refused with 413, and the
    // error names the settings that make them smaller.
    let name = apply(
        &db,
        &text
            .replace("name = \"bulky\"", "name = \"bulkier\"")
            .replace("max_batch_mb = 1", "max_batch_mb = 8"),
    )
    .await;
    let err = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("answered 413")
            && err.contains("a batch of 12 records")
            && err.contains("lower `push.batch_size` or `push.max_batch_mb`"),
        "{err}"
    );
}

#[tokio::test]
async fn export_configs_push_new_documents_in_batches() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let users = db.store.collection("users");
    for i in 0..25 {
        users
            .insert_one(doc! { "visitorId": format!("v{i}"), "email": format!("u{i}@example.com"), "totalPurchases": i % 3, "updatedAt": bson::DateTime::from_millis(1_000 + i) })
            .await
            .unwrap();
    }
    let text = format!(
        r#"
name = "crm-sync"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "users"
filter = '{{"totalPurchases": {{"$gt": 0}}}}'
watermark_field = "updatedAt"
batch_size = 5
wrap = "contacts"
[mapping.id]
path = "$.visitorId"
required = true
[mapping.email]
path = "$.email"
"#
    );
    let name = apply(&db, &text).await;
    // The CLI and the scheduler ask for an import first and push on `WrongType`: that
    // asking is no failed import run.
    assert!(matches!(
        run_import(&db.store, &name, &ImportOptions::default()).await,
        Err(ImportError::WrongType { .. })
    ));
    let import_runs = db.store.collection("import_runs");
    assert_eq!(import_runs.count_documents(doc! {}).await.unwrap(), 0);
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.read, s.sent, s.requests), (16, 16, 4));
    let pushed = api.pushed.lock().unwrap().clone();
    assert_eq!(pushed.len(), 4);
    assert_eq!(
        pushed[0]["contacts"][0],
        json!({ "id": "v1", "email": "u1@example.com" })
    );
    // Nothing new: the watermark moved past everything sent.
    let again = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(again.sent, 0);
    // A document stamped just now waits out `settle_seconds` (60): a write stamped
    // before it but committed after it must not fall behind the position. One stamped
    // two minutes ago is sent.
    let now = db.store.now().timestamp_millis();
    for (id, at) in [("fresh", now), ("settled", now - 120_000)] {
        users
            .insert_one(doc! { "visitorId": id, "email": format!("{id}@example.com"), "totalPurchases": 1, "updatedAt": bson::DateTime::from_millis(at) })
            .await
            .unwrap();
    }
    let third = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(third.sent, 1);
    // The one left is said to be settling, not passed over in silence.
    assert_eq!((again.settling, third.settling), (0, 1));
    assert!(
        sluice_jobs::import::push_line(&third)
            .ends_with("; 1 newer than `settle_seconds` wait for a later run"),
        "{}",
        sluice_jobs::import::push_line(&third)
    );
    let last = api.pushed.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last["contacts"][0]["id"], "settled", "{last}");
    // Touched again with nothing changed that is sent: the same body, but a later batch
    // with a key of its own, so a receiver dropping repeated keys keeps it.
    users
        .update_one(
            doc! { "visitorId": "settled" },
            doc! { "$set": { "updatedAt": bson::DateTime::from_millis(now - 110_000) } },
        )
        .await
        .unwrap();
    let fourth = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(fourth.sent, 1);
    let pushed = api.pushed.lock().unwrap().clone();
    let keys = api.push_keys.lock().unwrap().clone();
    assert_eq!(pushed[pushed.len() - 1], pushed[pushed.len() - 2]);
    assert_ne!(keys[keys.len() - 1], keys[keys.len() - 2], "{keys:?}");
}

#[tokio::test]
async fn a_push_whose_cursor_the_server_closed_reads_on_from_the_last_batch_sent() {
    // A server of the test's own, closing cursors idle for a second (MongoDB's default is
    // ten minutes): the push waits 2.5 s on its second batch's answer, by which time the
    // server has closed the cursor the rest of the documents are read from.
    let server = support::OwnMongo::start().await;
    server.set_parameter("cursorTimeoutMillis", 1_000).await;
    let store = support::store_via(&server.uri, "cursor_reaped").await;
    store.init().await.unwrap();
    let docs: Vec<_> = (0..300)
        .map(|k| doc! { "k": k, "updatedAt": bson::DateTime::from_millis(1_000 + k / 2) })
        .collect();
    store
        .collection("reaped_src")
        .insert_many(docs)
        .await
        .unwrap();
    let (base, api) = fault_api(Fault::SlowSecondPush).await;
    let text = format!(
        r#"
name = "reaped-push"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "reaped_src"
watermark_field = "updatedAt"
batch_size = 10
wrap = "items"
[mapping.k]
path = "$.k"
"#
    );
    let file = parse_file("reaped.toml", &text).unwrap();
    configs::apply(&store, &file).await.unwrap();
    let name = file.name;
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    let s = run_push(&store, &name, &ImportOptions::default())
        .await
        .unwrap();
    drop(guard);
    assert!(
        logged.text().contains("cursor was closed by the server"),
        "the server did not close the cursor, so the test proves nothing: {}",
        logged.text()
    );
    // Every document sent once, in order, in full batches: the batch being read when the
    // cursor was found closed is read again whole from the last batch sent.
    assert_eq!((s.read, s.sent, s.requests), (300, 300, 30));
    let pushed = api.pushed.lock().unwrap().clone();
    let sent: Vec<i64> = pushed
        .iter()
        .flat_map(|b| b["items"].as_array().unwrap().clone())
        .map(|i| i["k"].as_i64().unwrap())
        .collect();
    assert_eq!(sent, (0..300).collect::<Vec<i64>>());
}

/// An EXPORT config `name` pushing twelve documents (`k` 0 to 11, `updatedAt` 1,000 ms
/// plus `k`) one a batch to an endpoint answering each after 300 ms; the config's name
/// and the endpoint.
async fn slow_push(db: &TestDb, name: &str) -> (String, FaultApi) {
    let (base, api) = fault_api(Fault::SlowPushes).await;
    let docs: Vec<_> = (0..12)
        .map(|k| doc! { "k": k, "updatedAt": bson::DateTime::from_millis(1_000 + k) })
        .collect();
    db.store
        .collection("push_src")
        .insert_many(docs)
        .await
        .unwrap();
    let text = format!(
        r#"
name = "{name}"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "push_src"
watermark_field = "updatedAt"
batch_size = 1
[mapping.k]
path = "$.k"
"#
    );
    (apply(db, &text).await, api)
}

#[tokio::test]
async fn a_long_push_saves_its_position_while_it_runs_not_after_every_batch() {
    let db = TestDb::initialized().await;
    let (name, api) = slow_push(&db, "slow-push").await;
    let running = tokio::spawn({
        let (store, name) = (db.store.clone(), name.clone());
        async move { run_push(&store, &name, &ImportOptions::default()).await }
    });
    // Twelve batches of 300 ms each: a position is saved within the run, a second or so
    // after it began, not only at its end.
    let saved = || async {
        db.store
            .collection("integration_configs")
            .find_one(doc! { "name": "slow-push" })
            .await
            .unwrap()
            .unwrap()
            .get_datetime("syncCursor")
            .ok()
            .map(|d| d.timestamp_millis())
    };
    // Watched while it runs (each batch takes at least 300 ms, so a position saved after
    // every batch would be seen at each of the twelve).
    let started = std::time::Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut mid_run = None;
    while !running.is_finished() {
        if let Some(at) = saved().await {
            seen.insert(at);
            mid_run.get_or_insert(at);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let mid = mid_run.expect("a position saved mid-run");
    assert!(mid < 1_011, "saved before the last batch: {mid}");
    // At most once a second: no more positions than seconds the run took (and one
    // more), whatever the machine's speed, and fewer than the batches.
    assert!(
        (seen.len() as f64) <= took.as_secs_f64().ceil() + 1.0 && seen.len() < 12,
        "{} positions saved in {took:?}: {seen:?}",
        seen.len()
    );
    let s = running.await.unwrap().unwrap();
    assert_eq!(api.pushed.lock().unwrap().len(), 12);
    assert_eq!((s.sent, s.requests), (12, 12));
    assert_eq!(
        saved().await,
        Some(1_011),
        "the last position is saved as the run ends"
    );
}

/// A position save failing mid-run fails the run, and the position of every batch the
/// endpoint accepted is still saved as the run ends: the next run sends only the rest.
#[tokio::test]
async fn a_push_whose_position_save_failed_mid_run_keeps_the_position_for_its_end() {
    let db = TestDb::initialized().await;
    let (name, api) = slow_push(&db, "unsaved-push").await;
    // The run's first update of `integration_configs` (the first position save, a second
    // in) and the driver's retry of it break; the next one passes.
    let (uri, armed, severed, _) =
        support::severing_mongo_proxy_at_most(b"update\0\x14\0\0\0integration_configs\0", 2).await;
    let proxied = support::store_via(&uri, &db.name).await;
    armed.store(true, Ordering::SeqCst);
    let err = run_push(&proxied, &name, &ImportOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("advance watermark"), "{err}");
    assert_eq!(severed.load(Ordering::SeqCst), 2);
    let sent: Vec<i64> = api
        .pushed
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().clone())
        .map(|r| r["k"].as_i64().unwrap())
        .collect();
    assert!(
        !sent.is_empty() && sent.len() < 12,
        "the run stopped at the failed save: {sent:?}"
    );
    let cfg = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": &name })
        .await
        .unwrap()
        .unwrap();
    let last = *sent.last().unwrap();
    assert_eq!(
        cfg.get_datetime("syncCursor").unwrap().timestamp_millis(),
        1_000 + last,
        "the position of the last batch accepted: {cfg}"
    );
    // The next run sends the rest, nothing twice.
    let again = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(again.sent as usize, 12 - sent.len());
    let all: Vec<i64> = api
        .pushed
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().clone())
        .map(|r| r["k"].as_i64().unwrap())
        .collect();
    assert_eq!(all, (0..12).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_push_watermark_may_be_a_dotted_path() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let src = db.store.collection("nested_src");
    for k in 0..7 {
        src.insert_one(
            doc! { "k": k, "meta": { "updatedAt": bson::DateTime::from_millis(1_000 + k) } },
        )
        .await
        .unwrap();
    }
    let text = format!(
        r#"
name = "nested-push"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "nested_src"
watermark_field = "meta.updatedAt"
batch_size = 3
wrap = "items"
[mapping.k]
path = "$.k"
"#
    );
    let name = apply(&db, &text).await;
    let first = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((first.read, first.sent), (7, 7));
    let cfg = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": &name })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cfg.get_datetime("syncCursor").unwrap().timestamp_millis(),
        1_006,
        "{cfg}"
    );
    // The position is after the last document sent: nothing is sent again.
    let again = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((again.read, again.sent), (0, 0));
    src.insert_one(doc! { "k": 7, "meta": { "updatedAt": bson::DateTime::from_millis(2_000) } })
        .await
        .unwrap();
    let third = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((third.read, third.sent), (1, 1));
    let pushed = api.pushed.lock().unwrap().clone();
    assert_eq!(pushed.last().unwrap()["items"], json!([{ "k": 7 }]));
}

#[tokio::test]
async fn a_push_without_a_watermark_sends_each_document_once_a_run_in_batches() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let src = db.store.collection("plain_src");
    // `_id`s of three types, which MongoDB sorts numbers, then strings, then ObjectIds:
    // each batch is read from the last `_id` sent, and `$gt` alone only matches `_id`s of
    // that one's type.
    let ids = [
        Bson::Int32(10),
        Bson::Int64(20),
        Bson::Double(30.5),
        Bson::String("a".into()),
        Bson::String("b".into()),
        Bson::ObjectId(bson::oid::ObjectId::new()),
        Bson::ObjectId(bson::oid::ObjectId::new()),
    ];
    for (k, id) in ids.into_iter().enumerate() {
        src.insert_one(doc! { "_id": id, "k": k as i32 })
            .await
            .unwrap();
    }
    let text = format!(
        r#"
name = "plain-push"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "plain_src"
batch_size = 3
wrap = "items"
[mapping.k]
path = "$.k"
"#
    );
    let name = apply(&db, &text).await;
    // Asked to stop (Ctrl-C on `import run`) before a batch: nothing more is read or
    // sent, and the run is not recorded as a completed sync.
    let stopping = ImportOptions::default();
    stopping.progress.stop.store(true, Ordering::SeqCst);
    let s = run_push(&db.store, &name, &stopping).await.unwrap();
    assert_eq!((s.read, s.sent), (0, 0));
    let cfg = db
        .store
        .collection("integration_configs")
        .find_one(doc! { "name": &name })
        .await
        .unwrap()
        .unwrap();
    assert!(
        cfg.get("lastSync").is_none_or(|v| *v == Bson::Null),
        "{cfg}"
    );
    for run in 1..=2 {
        let s = run_push(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!((s.read, s.sent, s.requests), (7, 7, 3), "run {run}");
    }
    let pushed = api.pushed.lock().unwrap().clone();
    let ks: Vec<i64> = pushed
        .iter()
        .flat_map(|b| b["items"].as_array().unwrap().clone())
        .map(|i| i["k"].as_i64().unwrap())
        .collect();
    let once: Vec<i64> = (0..7).collect();
    assert_eq!(
        ks,
        [once.clone(), once].concat(),
        "in `_id` order, each once a run"
    );
    // With a watermark of mixed types (numbers, then strings; dates later): the next run
    // reads on from a string, and `$gt` alone only matches strings after it, not the
    // dates MongoDB sorts after every string.
    let marked = db.store.collection("marked_src");
    let marks = [
        Bson::Int32(1),
        Bson::Int32(2),
        Bson::String("x".into()),
        Bson::String("y".into()),
    ];
    for (k, m) in marks.into_iter().enumerate() {
        marked
            .insert_one(doc! { "k": 100 + k as i32, "seen": m })
            .await
            .unwrap();
    }
    let text = text
        .replace("plain-push", "marked-push")
        .replace(
            "collection = \"plain_src\"\nbatch_size = 3",
            "collection = \"marked_src\"\nwatermark_field = \"seen\"\nbatch_size = 2\nsettle_seconds = 0",
        );
    assert!(text.contains("marked_src"));
    let name = apply(&db, &text).await;
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.read, s.sent, s.requests), (4, 4, 2), "{s:?}");
    marked
        .insert_one(doc! { "k": 200, "seen": bson::DateTime::from_millis(1_000) })
        .await
        .unwrap();
    let next = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((next.read, next.sent), (1, 1), "{next:?}");
    let again = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(again.sent, 0);
}

#[tokio::test]
async fn pushes_resume_between_documents_that_share_a_watermark_and_accept_any_2xx_body() {
    let db = TestDb::initialized().await;
    let src = db.store.collection("pushsrc");
    // Four documents share one watermark value, across the batch boundary.
    for k in 0..6 {
        let at = if k < 4 { 5_000 } else { 6_000 };
        src.insert_one(doc! { "k": k, "updatedAt": bson::DateTime::from_millis(at) })
            .await
            .unwrap();
    }
    #[derive(Clone, Default)]
    struct Inbox {
        accepted: Arc<Mutex<Vec<Value>>>,
        requests: Arc<AtomicU64>,
        fail_second: Arc<std::sync::atomic::AtomicBool>,
        keys: Arc<Mutex<Vec<String>>>,
    }
    async fn receive(
        State(inbox): State<Inbox>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        let key = headers.get("idempotency-key").map(|k| k.to_str().unwrap());
        inbox
            .keys
            .lock()
            .unwrap()
            .push(key.unwrap_or("").to_string());
        let n = inbox.requests.fetch_add(1, Ordering::SeqCst);
        if n == 1 && inbox.fail_second.load(Ordering::SeqCst) {
            return (StatusCode::BAD_REQUEST, "no").into_response();
        }
        inbox.accepted.lock().unwrap().push(body);
        // A receiver that answers plain text, as many do.
        (StatusCode::OK, "OK").into_response()
    }
    let inbox = Inbox::default();
    inbox.fail_second.store(true, Ordering::SeqCst);
    let addr = serve(
        Router::new()
            .route("/inbox", post(receive))
            .with_state(inbox.clone()),
    )
    .await;
    let text = format!(
        r#"
name = "tied-push"
type = "EXPORT"
endpoint = "http://{addr}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "pushsrc"
watermark_field = "updatedAt"
batch_size = 2
"#
    );
    let name = apply(&db, &text).await;
    assert!(
        run_push(&db.store, &name, &ImportOptions::default())
            .await
            .is_err(),
        "the second batch was refused"
    );
    inbox.fail_second.store(false, Ordering::SeqCst);
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(s.sent, 4, "k2-k5: the rest, nothing twice");
    let mut keys: Vec<i64> = inbox
        .accepted
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().clone())
        .map(|d| d["k"].as_i64().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, vec![0, 1, 2, 3, 4, 5], "every document exactly once");
    // The `OK` answers were acceptances: 1 + 1 refused + 2 requests, no retries.
    assert_eq!(inbox.requests.load(Ordering::SeqCst), 4);
    // The batch refused, sent again by the next run, carries the same key: a receiver
    // that had stored it before failing its answer can drop the repeat. Other batches
    // carry other keys.
    let keys = inbox.keys.lock().unwrap().clone();
    assert_eq!(keys[1], keys[2], "{keys:?}");
    assert_eq!(keys[1].len(), 64, "{keys:?}");
    let distinct: std::collections::HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), 3, "{keys:?}");
}

/// A provider that rotates refresh tokens: each refresh-token grant spends the token it
/// was given and answers a new one with a one-second access token.
#[derive(Clone, Default)]
struct RotatingProvider {
    refresh: Arc<Mutex<String>>,
    issued: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    grants: Arc<AtomicU64>,
    /// Milliseconds the answer takes after the token was rotated.
    answer_after_ms: Arc<AtomicU64>,
    /// The `scope` of each grant ("" when none was sent).
    scopes: Arc<Mutex<Vec<String>>>,
    /// The refresh token each grant presented.
    presented: Arc<Mutex<Vec<String>>>,
    /// 1: answers as some providers do (`expires_in` as a string, no `token_type`, JSON
    /// served as `text/plain`); 2: an answer with the new refresh token but no access
    /// token (unreadable).
    sloppy: Arc<AtomicU64>,
}

async fn rotating_token(
    State(p): State<RotatingProvider>,
    axum::Form(form): axum::Form<std::collections::HashMap<String, String>>,
) -> Response {
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    p.presented.lock().unwrap().push(presented.clone());
    p.scopes
        .lock()
        .unwrap()
        .push(form.get("scope").cloned().unwrap_or_default());
    let answer = {
        let mut current = p.refresh.lock().unwrap();
        if form.get("grant_type").map(String::as_str) != Some("refresh_token")
            || presented != *current
        {
            None
        } else {
            let n = p.grants.fetch_add(1, Ordering::SeqCst) + 1;
            *current = format!("rt-{n}-{}", uuid::Uuid::new_v4().simple());
            let access = format!("at-{n}");
            p.issued
                .lock()
                .unwrap()
                .push((access.clone(), std::time::Instant::now()));
            Some(json!({
                "access_token": access, "token_type": "bearer", "expires_in": 1,
                "refresh_token": *current,
            }))
        }
    };
    let Some(answer) = answer else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    };
    let wait = p.answer_after_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut answer = answer;
    match p.sloppy.load(Ordering::SeqCst) {
        0 => Json(answer).into_response(),
        sloppy => {
            let fields = answer.as_object_mut().unwrap();
            fields.remove("token_type");
            fields.insert("expires_in".into(), json!("1"));
            if sloppy == 2 {
                fields.remove("access_token");
            }
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain")],
                answer.to_string(),
            )
                .into_response()
        }
    }
}

async fn rotating_items(
    State(p): State<RotatingProvider>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = p
        .issued
        .lock()
        .unwrap()
        .iter()
        .any(|(t, at)| auth == format!("Bearer {t}") && at.elapsed() < Duration::from_secs(1));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "expired").into_response();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cursor: u64 = q
        .iter()
        .find(|(k, _)| k == "cursor")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let data: Vec<Value> = (cursor..(cursor + 10).min(45))
        .map(|i| json!({ "id": i, "title": format!("t{i}"), "updated": "2026-11-01T00:00:00Z" }))
        .collect();
    let next = if cursor + 10 < 45 {
        json!((cursor + 10).to_string())
    } else {
        Value::Null
    };
    Json(json!({ "data": data, "next": next })).into_response()
}

/// A [`RotatingProvider`] whose chain starts at `rt-initial`, serving its token endpoint
/// and items; the provider and the base URL.
async fn serve_rotating() -> (RotatingProvider, String) {
    let provider = RotatingProvider::default();
    *provider.refresh.lock().unwrap() = "rt-initial".into();
    let app = Router::new()
        .route("/token", post(rotating_token))
        .route("/items", get(rotating_items))
        .with_state(provider.clone());
    (provider, format!("http://{}", serve(app).await))
}

#[tokio::test]
async fn a_rotated_refresh_token_is_kept_from_an_answer_that_bends_or_breaks_the_rfc() {
    let db = TestDb::initialized().await;
    let (provider, base) = serve_rotating().await;
    let auth = format!(
        "[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_CLIENT_SECRET}}\"\nrefresh_token = \"${{env:IMPORT_TEST_REFRESH}}\"\n"
    );
    let name = apply(&db, &cursor_config("sloppy", &base, "", &auth)).await;
    let options = ImportOptions {
        token_key: Some(sluice_core::config::Secret::new(
            "a-long-token-key-for-tests",
        )),
        ..with_secrets(&[
            ("IMPORT_TEST_REFRESH", "rt-initial"),
            ("IMPORT_TEST_CLIENT_SECRET", "s3cret"),
        ])
    };
    // `expires_in` as a string, no `token_type`, `text/plain`: read all the same.
    provider.sloppy.store(1, Ordering::SeqCst);
    let s = run_import(&db.store, &name, &options).await.unwrap();
    assert_eq!(s.fetched, 45);
    assert!(s.http.refresh_rotations >= 2, "{:?}", s.http);
    // An answer that cannot be read at all still spent the old token: its new one is
    // kept, so the chain goes on once the provider answers properly again.
    provider.sloppy.store(2, Ordering::SeqCst);
    let err = run_import(&db.store, &name, &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("new refresh token, which was saved"), "{err}");
    provider.sloppy.store(0, Ordering::SeqCst);
    let s = run_import(&db.store, &name, &options).await.unwrap();
    assert_eq!(s.fetched, 45);
}

/// A config re-applied with another token URL (an ADMIN of the API pointing it at a host
/// of their own) does not send the saved, rotated refresh token there: the chain is bound
/// to the token URL and client id it was kept for.
#[tokio::test]
async fn a_saved_refresh_token_is_not_sent_to_another_token_url() {
    let db = TestDb::initialized().await;
    let (provider, base) = serve_rotating().await;
    let auth = |token_url: &str| {
        format!(
            "[auth]\ntype = \"OAUTH\"\ntoken_url = \"{token_url}\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_CLIENT_SECRET}}\"\nrefresh_token = \"${{env:IMPORT_TEST_REFRESH}}\"\n"
        )
    };
    let name = apply(
        &db,
        &cursor_config("bound", &base, "", &auth(&format!("{base}/token"))),
    )
    .await;
    let options = ImportOptions {
        token_key: Some(sluice_core::config::Secret::new(
            "a-long-token-key-for-tests",
        )),
        ..with_secrets(&[
            ("IMPORT_TEST_REFRESH", "rt-initial"),
            ("IMPORT_TEST_CLIENT_SECRET", "s3cret"),
        ])
    };
    let s = run_import(&db.store, &name, &options).await.unwrap();
    assert_eq!(s.fetched, 45);
    let live = provider.refresh.lock().unwrap().clone();
    assert_ne!(live, "rt-initial", "rotated and saved");
    // The same config, its token URL now another host's.
    let (elsewhere, other) = serve_rotating().await;
    apply(
        &db,
        &cursor_config("bound", &base, "", &auth(&format!("{other}/token"))),
    )
    .await;
    let _ = run_import(&db.store, &name, &options).await;
    let presented = elsewhere.presented.lock().unwrap().clone();
    assert!(
        !presented.is_empty(),
        "the other host was asked for a token"
    );
    assert!(
        !presented.contains(&live),
        "the live refresh token went to another token URL: {presented:?}"
    );
    assert!(
        presented
            .iter()
            .all(|t| t == "rt-initial" || t.starts_with("rt-1-")),
        "{presented:?}"
    );
}

#[tokio::test]
async fn rotated_refresh_tokens_are_saved_encrypted_before_use() {
    let db = TestDb::initialized().await;
    let (provider, base) = serve_rotating().await;
    let auth = format!(
        "[auth]\ntype = \"OAUTH\"\ntoken_url = \"{base}/token\"\nclient_id = \"c\"\nclient_secret = \"${{env:IMPORT_TEST_CLIENT_SECRET}}\"\nrefresh_token = \"${{env:IMPORT_TEST_REFRESH}}\"\nscopes = [\"items.read\", \"offline_access\"]\n"
    );
    let name = apply(&db, &cursor_config("rotating", &base, "", &auth)).await;
    // The configured refresh token (the operator's), and the run's token key.
    fn with_token(refresh: &str, key: Option<&str>) -> ImportOptions {
        ImportOptions {
            token_key: key.map(sluice_core::config::Secret::new),
            ..with_secrets(&[
                ("IMPORT_TEST_REFRESH", refresh),
                ("IMPORT_TEST_CLIENT_SECRET", "s3cret"),
            ])
        }
    }
    let key = |k: &str| with_token("rt-initial", Some(k));

    // Without a key to store rotated tokens with, the run refuses to start.
    let err = run_import(&db.store, &name, &with_token("rt-initial", None))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("token_key"), "{err}");
    assert_eq!(provider.grants.load(Ordering::SeqCst), 0, "nothing spent");

    let first = run_import(&db.store, &name, &key("a-long-token-key-for-tests"))
        .await
        .unwrap();
    assert_eq!(first.fetched, 45);
    assert!(first.http.refresh_rotations >= 2, "{:?}", first.http);
    // The configured scopes go with every refresh-token grant (some providers want them).
    let scopes = provider.scopes.lock().unwrap().clone();
    assert!(
        !scopes.is_empty() && scopes.iter().all(|s| s == "items.read offline_access"),
        "{scopes:?}"
    );
    let latest = provider.refresh.lock().unwrap().clone();
    let saved = db
        .store
        .collection("oauth_tokens")
        .find_one(doc! { "_id": "rotating" })
        .await
        .unwrap()
        .expect("the rotated token is saved");
    assert!(
        !saved.to_string().contains(&latest) && !saved.to_string().contains("rt-"),
        "stored encrypted: {saved}"
    );

    // The configured token is spent; a new run continues the chain from the vault.
    let second = run_import(&db.store, &name, &key("a-long-token-key-for-tests"))
        .await
        .unwrap();
    assert_eq!(second.fetched, 45);

    // A different key cannot read it: a clear error, nothing spent.
    let spent = provider.grants.load(Ordering::SeqCst);
    let err = run_import(&db.store, &name, &key("another-key-entirely-123"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not decrypt"), "{err}");
    assert_eq!(provider.grants.load(Ordering::SeqCst), spent);

    // A run stopped while the provider answers a rotation (its lease lost, a shutdown):
    // the provider has spent the old token, and the new one is still saved, so the next
    // run goes on.
    provider.answer_after_ms.store(2_000, Ordering::SeqCst);
    let before = provider.grants.load(Ordering::SeqCst);
    let vault = || async {
        db.store
            .collection("oauth_tokens")
            .find_one(doc! { "_id": "rotating" })
            .await
            .unwrap()
    };
    let saved_before = vault().await;
    let run = {
        let store = db.store.clone();
        let name = name.clone();
        tokio::spawn(
            async move { run_import(&store, &name, &key("a-long-token-key-for-tests")).await },
        )
    };
    // Stopped once the provider has rotated (it answers 2 s later).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while provider.grants.load(Ordering::SeqCst) == before {
        assert!(std::time::Instant::now() < deadline, "no rotation came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.abort();
    assert!(
        run.await.unwrap_err().is_cancelled(),
        "stopped mid-exchange"
    );
    assert_eq!(
        provider.grants.load(Ordering::SeqCst),
        before + 1,
        "a rotation"
    );
    // The exchange finishes on its own and saves the new token.
    while vault().await == saved_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated token was not saved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    provider.answer_after_ms.store(0, Ordering::SeqCst);
    let after_stop = run_import(&db.store, &name, &key("a-long-token-key-for-tests"))
        .await
        .unwrap();
    assert_eq!(after_stop.fetched, 45);

    // The operator re-authorizes: a new configured token replaces the saved chain.
    *provider.refresh.lock().unwrap() = "rt-reauthorized".into();
    let reauthorized = with_token("rt-reauthorized", Some("a-long-token-key-for-tests"));
    let third = run_import(&db.store, &name, &reauthorized).await.unwrap();
    assert_eq!(third.fetched, 45);
}

#[tokio::test]
async fn a_records_path_into_nothing_warns_instead_of_passing_for_an_empty_api() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let text = cursor_config("misread", &base, "", "").replace("$.data[*]", "$.items[*]");
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    assert_eq!(s.fetched, 0);
    // No page had the place: a wrong path, not a run cut short at its last page.
    assert!(s.stopped_early.is_none(), "{:?}", s.stopped_early);
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(
        s.warnings[0].contains("no `$.items`") && s.warnings[0].contains("data, next"),
        "{:?}",
        s.warnings
    );
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "runId": &s.run_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_array("warnings").unwrap().len(), 1, "{run}");

    // After a page with the place, a last page without it is taken as an error answered
    // with 200: the run is cut short there.
    let addr = serve(Router::new().route(
        "/flaky",
        get(|Query(q): Query<Vec<(String, String)>>| async move {
            if q.iter().any(|(k, _)| k == "cursor") {
                Json(json!({ "message": "rate limited" }))
            } else {
                Json(json!({ "data": [{ "id": "a", "title": "A" }], "next": "p2" }))
            }
        }),
    ))
    .await;
    let text =
        cursor_config("flaky", &format!("http://{addr}"), "", "").replace("/items\"", "/flaky\"");
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.pages, s.fetched), (2, 1));
    assert!(
        s.stopped_early
            .as_deref()
            .is_some_and(|w| w.contains("page 2 came without the records' place")),
        "{:?}",
        s.stopped_early
    );

    // An API answering an empty list is an empty page, not a wrong path.
    let addr =
        serve(Router::new().route("/empty", get(|| async { Json(json!({"data": []})) }))).await;
    let name = apply(
        &db,
        &things_config("empty", &format!("http://{addr}/empty"), "type = \"none\""),
    )
    .await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed && s.warnings.is_empty(), "{:?}", s.warnings);
}

async fn sync_cursor(db: &TestDb, name: &str) -> Option<bson::Bson> {
    db.store
        .collection("integration_configs")
        .find_one(doc! { "name": name })
        .await
        .unwrap()
        .unwrap()
        .get("syncCursor")
        .cloned()
        .filter(|c| *c != bson::Bson::Null)
}

#[tokio::test]
async fn a_run_cut_short_by_max_pages_keeps_the_cursor_unless_the_api_is_sorted() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let capped = cursor_config("capped-pages", &base, "", "").replace(
        "cursor_path = \"$.next\"",
        "cursor_path = \"$.next\"\nmax_pages = 2",
    );
    let name = apply(&db, &capped).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        s.completed && s.stopped_early.is_some(),
        "{:?}",
        s.stopped_early
    );
    assert_eq!(s.fetched, 20, "two pages of ten");
    assert_eq!(count(&db, "things").await, 20, "what was read is stored");
    assert_eq!(
        sync_cursor(&db, &name).await,
        None,
        "45 records, 20 read: no cursor"
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("not advanced") && w.contains("raise `max_pages`")),
        "{:?}",
        s.warnings
    );

    // Everything read in exactly `max_pages` pages is not a run cut short.
    let exact = cursor_config("exact-pages", &base, "", "").replace(
        "cursor_path = \"$.next\"",
        "cursor_path = \"$.next\"\nmax_pages = 5",
    );
    let name = apply(&db, &exact).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.pages, s.fetched), (5, 45));
    assert!(s.stopped_early.is_none(), "{:?}", s.stopped_early);
    assert!(
        sync_cursor(&db, &name).await.is_some(),
        "the cursor advanced"
    );

    // Declared sorted by the cursor: everything below the largest value was read.
    let sorted = capped.replace("param = \"since\"", "param = \"since\"\nsorted = true");
    let name = apply(&db, &sorted).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed && s.warnings.is_empty(), "{:?}", s.warnings);
    let cursor = sync_cursor(&db, &name).await.expect("the cursor advanced");
    assert_eq!(
        cursor
            .as_datetime()
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap(),
        "2026-11-20T00:00:00Z",
        "ids 0-19: the largest `updated` is day 20"
    );
}

#[tokio::test]
async fn a_run_resumed_after_being_cut_short_still_keeps_the_cursor() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let capped = cursor_config("capped-resume", &base, "", "").replace(
        "cursor_path = \"$.next\"",
        "cursor_path = \"$.next\"\nmax_pages = 2",
    );
    let name = apply(&db, &capped).await;
    let one = ImportOptions {
        stop_after_pages: Some(1),
        ..Default::default()
    };
    assert!(!run_import(&db.store, &name, &one).await.unwrap().completed);
    // What a process killed after the last page's checkpoint leaves: a checkpoint that
    // is done, and says the run was cut short by `max_pages`.
    let done = db
        .store
        .collection("import_checkpoints")
        .update_one(
            doc! { "_id": &name },
            doc! { "$set": {
                "state": serde_json::to_string(&sluice_connectors::http::PageState::Done).unwrap(),
                "stoppedEarly": "stopped at `max_pages` (2)",
            } },
        )
        .await
        .unwrap();
    assert_eq!(done.modified_count, 1);
    let resumed = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(resumed.resumed && resumed.completed);
    assert!(
        resumed.stopped_early.is_some(),
        "restored from the checkpoint"
    );
    assert_eq!(
        sync_cursor(&db, &name).await,
        None,
        "a run cut short keeps the cursor, resumed or not"
    );
}

#[tokio::test]
async fn a_date_cursor_sent_as_epoch_milliseconds_goes_back_as_epoch_milliseconds() {
    let db = TestDb::initialized().await;
    type Queries = Arc<Mutex<Vec<Vec<(String, String)>>>>;
    let seen: Queries = Default::default();
    let log = seen.clone();
    let api = move |Query(q): Query<Vec<(String, String)>>| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(q);
            Json(json!({ "data": [
                { "id": 1, "updated": 1_700_000_000_000i64 },
                { "id": 2, "updated": 1_700_000_123_456i64 },
            ] }))
        }
    };
    let addr = serve(Router::new().route("/epoch", get(api))).await;
    let text = things_config("epoch", &format!("http://{addr}/epoch"), "type = \"none\"")
        + "[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\n";
    let name = apply(&db, &text).await;
    for _ in 0..2 {
        run_import(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap();
    }
    let queries = seen.lock().unwrap().clone();
    assert_eq!(queries.len(), 2);
    assert!(queries[0].iter().all(|(k, _)| k != "since"), "{queries:?}");
    assert!(
        queries[1].contains(&("since".into(), "1700000123456".into())),
        "the API's own form, not RFC 3339: {queries:?}"
    );
}

#[tokio::test]
async fn upsert_keys_that_mix_numbers_and_strings_are_warned_about() {
    let db = TestDb::initialized().await;
    let mixed = || async { Json(json!({"data": [{"id": 1}, {"id": "1"}, {"id": 2}]})) };
    let addr = serve(Router::new().route("/mixed", get(mixed))).await;
    let text = things_config("mixed", &format!("http://{addr}/mixed"), "type = \"none\"")
        .replace("type = \"string\"\n", "");
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(
        count(&db, "things").await,
        3,
        "1 and \"1\" are different keys"
    );
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(
        s.warnings[0].contains("both as numbers and as strings")
            && s.warnings[0].contains("[mapping.thingId]"),
        "{:?}",
        s.warnings
    );

    // Declared a string, the same answer is one key per value.
    db.store.collection("things").drop().await.unwrap();
    let name = apply(
        &db,
        &things_config("mixed", &format!("http://{addr}/mixed"), "type = \"none\""),
    )
    .await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(count(&db, "things").await, 2);
}

/// An IMPORT config `name` over the fault API at `base`, whose records go through the
/// `hostile` plugin in `mode` under `policy`; with the options that load the plugin.
async fn through_hostile(
    db: &TestDb,
    base: &str,
    name: &str,
    mode: &str,
    policy: sluice_plugins::FailurePolicy,
) -> (String, ImportOptions) {
    let host = sluice_plugins::PluginHost::new(false).unwrap();
    let plugin = host
        .load(
            &support::plugin_dir(),
            "hostile",
            json!({ "mode": mode }),
            &sluice_plugins::Grants::default(),
            None,
        )
        .unwrap()
        .with_policy(policy);
    let text = cursor_config(name, base, "", "").replace(
        "type = \"IMPORT\"",
        "type = \"IMPORT\"\ntransforms = [\"hostile\"]",
    );
    let name = apply(db, &text).await;
    let options = ImportOptions {
        transforms: vec![std::sync::Arc::new(plugin)],
        ..Default::default()
    };
    (name, options)
}

#[tokio::test]
async fn plugin_output_an_import_cannot_write_is_rejected_not_upserted_over_other_documents() {
    let db = TestDb::initialized().await;
    // A document another writer stored without the key: an upsert filtered on a missing
    // key (`{thingId: null}`) would match it.
    db.store
        .collection("things")
        .insert_one(bson::doc! { "visitor": "v1" })
        .await
        .unwrap();
    let (base, _api) = fault_api(Fault::None).await;
    let (name, options) = through_hostile(
        &db,
        &base,
        "vandalised",
        "vandal",
        sluice_plugins::FailurePolicy::FailRun,
    )
    .await;
    let s = run_import(&db.store, &name, &options).await.unwrap();
    assert_eq!(
        (s.fetched, s.inserted, s.failed),
        (45, 40, 5),
        "{:?}",
        s.samples
    );
    let things = db.store.collection("things");
    let other = things
        .find_one(bson::doc! { "visitor": "v1" })
        .await
        .unwrap()
        .unwrap();
    assert!(other.get("title").is_none(), "overwritten: {other}");
    for field in ["$where", "a.b", "createdAt"] {
        let reasons: Vec<&str> = s.samples.iter().map(|r| r.reason.as_str()).collect();
        assert!(
            reasons.iter().any(|r| r.contains(&format!("{field:?}"))),
            "{field}: {reasons:?}"
        );
    }
    let letters = db
        .store
        .collection("dead_letters")
        .count_documents(bson::doc! { "pipeline": format!("import:{name}") })
        .await
        .unwrap();
    assert_eq!(letters, 5);
}

#[tokio::test]
async fn records_a_plugin_skips_are_counted_and_warned_about() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let (name, options) = through_hostile(
        &db,
        &base,
        "skipping",
        "panic",
        sluice_plugins::FailurePolicy::SkipBatch,
    )
    .await;
    let s = run_import(&db.store, &name, &options).await.unwrap();
    // Every batch traps, so every record is skipped: none is stored, none is counted as
    // failed, and the run says so instead of reading as an import of nothing.
    assert_eq!((s.fetched, s.inserted, s.failed, s.skipped), (45, 0, 0, 45));
    // The run's line accounts for the records the plugin took.
    let line = sluice::engine::import_line(&s);
    assert!(
        line.contains("; plugins: 45 in, 0 out (45 skipped)"),
        "{line}"
    );
    let warned: Vec<&String> = s
        .warnings
        .iter()
        .filter(|w| w.contains("plugin `hostile` skipped records"))
        .collect();
    assert_eq!(warned.len(), 1, "{:?}", s.warnings);
    assert!(warned[0].contains("trapped"), "{}", warned[0]);
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "runId": &s.run_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_i64("skipped").unwrap(), 45, "{run}");
    assert_eq!(count(&db, "things").await, 0);
}

#[tokio::test]
async fn a_checkpoint_whose_place_cannot_be_read_is_started_over_not_resumed_from_scratch() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("garbled", &base, "", "")).await;
    db.store
        .collection("import_checkpoints")
        .insert_one(
            doc! { "_id": &name, "runId": "garbled-old", "state": "{not a place", "pages": 3_i64 },
        )
        .await
        .unwrap();
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    // A new run (its own id and counts, the incremental cursor sent as for any new run),
    // not the old one "resumed" from the first page with the old counts.
    assert!(s.completed && !s.resumed, "{s:?}");
    assert_ne!(s.run_id, "garbled-old");
    assert_eq!((s.pages, s.fetched), (5, 45));
    assert!(
        s.warnings.iter().any(|w| w.contains("cannot be read")),
        "{:?}",
        s.warnings
    );
}

#[tokio::test]
async fn a_run_left_recorded_running_is_closed_by_the_next_run_of_its_config() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("orphans", &base, "", "")).await;
    // As a run dropped when its scheduled run lost its lease leaves it (and one of
    // another config, which is not this run's business).
    let runs = db.store.collection("import_runs");
    for (config, id) in [("orphans", "orphans-lost"), ("other", "other-live")] {
        runs.insert_one(doc! { "config": config, "runId": id, "status": "RUNNING" })
            .await
            .unwrap();
    }
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed);
    let status = |id: &str| {
        let runs = runs.clone();
        let id = id.to_string();
        async move { runs.find_one(doc! { "runId": &id }).await.unwrap().unwrap() }
    };
    let lost = status("orphans-lost").await;
    assert_eq!(lost.get_str("status").unwrap(), "INTERRUPTED", "{lost}");
    let failures = lost.get_array("failures").unwrap();
    assert!(
        failures[0]
            .as_document()
            .unwrap()
            .get_str("error")
            .unwrap()
            .contains("lost its lease"),
        "{lost}"
    );
    assert_eq!(
        status("other-live").await.get_str("status").unwrap(),
        "RUNNING"
    );
    assert_eq!(
        status(&s.run_id).await.get_str("status").unwrap(),
        "COMPLETED"
    );
}

#[tokio::test]
async fn a_resumed_run_counts_the_records_plugins_set_aside_before_it_stopped() {
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    for (name, policy) in [
        ("skip-resume", sluice_plugins::FailurePolicy::SkipBatch),
        ("letter-resume", sluice_plugins::FailurePolicy::DeadLetter),
    ] {
        let (name, options) = through_hostile(&db, &base, name, "panic", policy).await;
        let first = ImportOptions {
            stop_after_pages: Some(1),
            ..options.clone()
        };
        let partial = run_import(&db.store, &name, &first).await.unwrap();
        assert!(!partial.completed, "{partial:?}");
        let set_aside = partial.skipped + partial.dead_letters;
        assert!(set_aside > 0 && set_aside < 45, "{partial:?}");
        let rest = run_import(&db.store, &name, &options).await.unwrap();
        assert!(rest.resumed && rest.completed, "{rest:?}");
        // Every record traps: each is set aside once, counted across both attempts.
        let expected: (u64, u64) = match policy {
            sluice_plugins::FailurePolicy::SkipBatch => (45, 0),
            _ => (0, 45),
        };
        assert_eq!((rest.skipped, rest.dead_letters), expected, "{name}");
        // Counted across both attempts, as the records set aside are.
        let line = sluice::engine::import_line(&rest);
        let said = match policy {
            sluice_plugins::FailurePolicy::SkipBatch => "; plugins: 45 in, 0 out (45 skipped)",
            _ => "; plugins: 45 in, 0 out (45 in dead_letters)",
        };
        assert!(line.contains(said), "{line}");
        let run = db
            .store
            .collection("import_runs")
            .find_one(doc! { "runId": &rest.run_id })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                run.get_i64("skipped").unwrap() as u64,
                run.get_i64("deadLetters").unwrap() as u64
            ),
            expected,
            "{run}"
        );
        let warned = run
            .get_array("warnings")
            .unwrap()
            .iter()
            .filter(|w| w.as_str().unwrap_or("").contains("skipped records"))
            .count();
        assert!(warned <= 1, "the skip warning once: {run}");
    }
    assert_eq!(count(&db, "things").await, 0);
}

#[tokio::test]
async fn a_plugin_that_prints_runs_inside_an_import() {
    // Imports call their transforms from async code; a plugin's print (a blocking WASI
    // call) must not take the runtime down.
    let db = TestDb::initialized().await;
    let (base, _api) = fault_api(Fault::None).await;
    let (name, options) = through_hostile(
        &db,
        &base,
        "printed",
        "print-and-tag",
        sluice_plugins::FailurePolicy::FailRun,
    )
    .await;
    let s = run_import(&db.store, &name, &options).await.unwrap();
    assert_eq!((s.fetched, s.inserted), (45, 45));
    // What was stored went through the plugin.
    let tagged = db
        .store
        .collection("things")
        .count_documents(doc! { "printed": true })
        .await
        .unwrap();
    assert_eq!(tagged, 45);
}

/// Point-of-sale records for an IMPORT into `events`: customer c1 buys twice 5 minutes
/// apart and again two hours later, c2 twice; one record repeats a sale id and one has a
/// kind that is no event type. Yesterday's (UTC).
fn sales_page() -> Value {
    let day = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let sale = |id: &str, customer: &str, time: &str, kind: &str, total: f64| {
        json!({
            "sale_id": id, "customer": customer, "kind": kind, "total": total,
            "sold_at": format!("{day}T{time}Z"), "settled_at": format!("{day}T23:00:00Z"),
            "register": "till-3",
        })
    };
    json!({ "sales": [
        sale("s1", "c1", "10:00:00", "PURCHASE", 20.0),
        sale("s2", "c1", "10:05:00", "PURCHASE", 5.5),
        sale("s3", "c1", "12:00:00", "PURCHASE", 10.0),
        sale("s4", "c2", "10:00:00", "PURCHASE", 1.0),
        sale("s5", "c2", "10:10:00", "PAGE_VIEW", 0.0),
        sale("s1", "c1", "10:00:00", "PURCHASE", 20.0),
        sale("s6", "c2", "10:20:00", "REFUND", 3.0),
    ]})
}

/// Serves `page` at `/sales` on loopback; returns its URL.
async fn serve_sales(page: Value) -> String {
    let addr = serve(Router::new().route("/sales", get(move || async move { Json(page) }))).await;
    format!("http://{addr}/sales")
}

/// A counter stored as int32 or int64.
fn int(d: &bson::Document, k: &str) -> i64 {
    match d.get(k) {
        Some(bson::Bson::Int32(n)) => i64::from(*n),
        Some(bson::Bson::Int64(n)) => *n,
        other => panic!("`{k}` is {other:?} in {d}"),
    }
}

fn sales_config(name: &str, endpoint: &str, key: &str) -> String {
    format!(
        r#"
name = "{name}"
type = "IMPORT"
endpoint = "{endpoint}"
allow_private_network = true
[source]
records = "$.sales[*]"
[target]
collection = "events"
key = "{key}"
[mapping.eventId]
path = "$.sale_id"
type = "string"
required = true
[mapping.userId]
path = "$.customer"
type = "string"
required = true
[mapping.eventType]
path = "$.kind"
[mapping.timestamp]
path = "$.sold_at"
type = "date"
required = true
[mapping.amount]
path = "$.total"
type = "number"
[mapping.settledAt]
path = "$.settled_at"
type = "date"
[mapping.register]
path = "$.register"
"#
    )
}

#[tokio::test]
async fn an_import_into_events_stores_each_event_once_and_keeps_sessions_and_users_right() {
    let db = TestDb::initialized().await;
    let endpoint = serve_sales(sales_page()).await;

    // The key of an import into events is eventId, and the fields every event has are mapped.
    let wrong_key = parse_file("t.toml", &sales_config("pos", &endpoint, "saleId")).unwrap();
    let err = sluice_core::integration::validate("t.toml", &wrong_key, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target.key") && err.contains("eventId"),
        "{err}"
    );
    let no_time = sales_config("pos", &endpoint, "eventId").replace(
        "[mapping.timestamp]\npath = \"$.sold_at\"\ntype = \"date\"\nrequired = true\n",
        "",
    );
    let err = sluice_core::integration::validate(
        "t.toml",
        &parse_file("t.toml", &no_time).unwrap(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mapping.timestamp"), "{err}");

    let name = apply(&db, &sales_config("pos", &endpoint, "eventId")).await;
    let first = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(first.completed);
    assert_eq!(first.fetched, 7);
    assert_eq!(first.inserted, 5, "{first:?}");
    assert_eq!(first.unchanged, 1, "the repeated sale id is stored once");
    assert_eq!(first.failed, 1, "REFUND is no event type");
    assert!(
        first.samples[0].reason.contains("eventType"),
        "{:?}",
        first.samples
    );
    assert_eq!(count(&db, "events").await, 5);

    let s1 = db
        .store
        .collection("events")
        .find_one(doc! { "eventId": "s1" })
        .await
        .unwrap()
        .unwrap();
    let props = s1.get_document("properties").unwrap();
    assert_eq!(props.get_f64("amount").unwrap(), 20.0);
    assert_eq!(props.get_str("register").unwrap(), "till-3");
    assert!(
        props.get_datetime("settledAt").is_ok(),
        "a mapped date stays a date: {props}"
    );

    // Sessions by the inactivity gap: c1's sale two hours later opens a second session.
    let sessions = |user: &'static str| {
        let store = db.store.clone();
        async move {
            store
                .collection("sessions")
                .find(doc! { "userId": user })
                .sort(doc! { "startTime": 1 })
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        }
    };
    let c1 = sessions("c1").await;
    assert_eq!(c1.len(), 2, "{c1:?}");
    assert_eq!(int(&c1[0], "events"), 2);
    assert_eq!(int(&c1[1], "events"), 1);
    assert_eq!(sessions("c2").await.len(), 1);
    let user = |id: &'static str| {
        let store = db.store.clone();
        async move {
            let mut u = store
                .collection("users")
                .find_one(doc! { "visitorId": id })
                .await
                .unwrap()
                .unwrap();
            u.remove("updatedAt");
            u
        }
    };
    let c1_user = user("c1").await;
    assert_eq!(int(&c1_user, "totalSessions"), 2, "{c1_user}");
    assert_eq!(int(&c1_user, "totalPurchases"), 3);
    assert_eq!(c1_user.get_f64("totalRevenue").unwrap(), 35.5);
    let c2_user = user("c2").await;
    assert_eq!(int(&c2_user, "totalEvents"), 2);
    assert_eq!(int(&c2_user, "totalPurchases"), 1);

    // A second run reads the same sales: nothing changes.
    let second = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((second.inserted, second.unchanged), (0, 6), "{second:?}");
    assert_eq!(count(&db, "events").await, 5);
    assert_eq!(user("c1").await, c1_user);
    assert_eq!(sessions("c1").await.len(), 2);
    let run = db
        .store
        .collection("import_runs")
        .find_one(doc! { "runId": &second.run_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_i64("unchanged").unwrap(), 6, "{run}");
}

#[tokio::test]
async fn an_imported_event_over_the_time_series_limit_fails_alone_and_counts_nowhere() {
    let db = TestDb::initialized().await;
    let mut page = sales_page();
    // 5 MB: under MongoDB's 16 MiB document limit, over the 4 MB of a time-series
    // measurement (the test server stores it; MongoDB refuses it after its aggregates).
    page["sales"][1]["register"] = json!("r".repeat(5_000_000));
    let endpoint = serve_sales(page).await;
    let name = apply(&db, &sales_config("big-sale", &endpoint, "eventId")).await;
    let run = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(run.completed);
    assert_eq!((run.inserted, run.failed), (4, 2), "{run:?}");
    assert!(
        run.samples.iter().any(|s| s.reason.contains("4 MB")),
        "{:?}",
        run.samples
    );
    assert_eq!(count(&db, "events").await, 4);
    let claims = db
        .store
        .collection("event_ids")
        .count_documents(doc! { "_id": "s2" })
        .await
        .unwrap();
    assert_eq!(claims, 0, "refused before it was claimed");
    // c1's profile counts the two sales stored (s1, s3), not the refused one (s2).
    let c1 = db
        .store
        .collection("users")
        .find_one(doc! { "visitorId": "c1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(int(&c1, "totalPurchases"), 2, "{c1}");
    assert_eq!(c1.get_f64("totalRevenue").unwrap(), 30.0);
}

#[tokio::test]
async fn a_narrower_unique_index_on_the_key_is_not_trusted_to_refuse_duplicates() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route(
        "/gadgets",
        get(|| async { Json(json!({"data": [{"sku": "g1"}, {"sku": "g2"}]})) }),
    ))
    .await;
    // Unique only among active gadgets: the imported ones are not, so it refuses nothing.
    db.store
        .collection("gadgets")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "sku": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .partial_filter_expression(doc! { "active": true })
                        .name("active_sku".to_string())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let text = format!(
        r#"
name = "gadgets"
type = "IMPORT"
endpoint = "http://{addr}/gadgets"
allow_private_network = true
[source]
records = "$.data[*]"
[target]
collection = "gadgets"
key = "sku"
[mapping.sku]
path = "$.sku"
type = "string"
required = true
"#
    );
    let name = apply(&db, &text).await;
    for run in 0..2 {
        run_import(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!(count(&db, "gadgets").await, 2, "after run {run}");
    }
}

#[tokio::test]
async fn a_custom_key_index_does_not_refuse_other_writers_documents_without_the_key() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route(
        "/contacts",
        get(|| async { Json(json!({"data": [{"crm": "k1", "visitor": "v-crm"}]})) }),
    ))
    .await;
    let text = format!(
        r#"
name = "crm"
type = "IMPORT"
endpoint = "http://{addr}/contacts"
allow_private_network = true
[source]
records = "$.data[*]"
[target]
collection = "users"
key = "crmId"
[mapping.crmId]
path = "$.crm"
type = "string"
required = true
[mapping.visitorId]
path = "$.visitor"
type = "string"
"#
    );
    // New users need their visitorId (the schema's unique identity).
    let without_visitor = text.replace(
        "[mapping.visitorId]\npath = \"$.visitor\"\ntype = \"string\"\n",
        "",
    );
    assert_ne!(without_visitor, text);
    let err = sluice_core::integration::validate(
        "t.toml",
        &parse_file("t.toml", &without_visitor).unwrap(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mapping.visitorId"), "{err}");
    // The key index as earlier versions built it (over every document) is rebuilt.
    db.store
        .collection("users")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "crmId": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .name("crmId_unique".to_string())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(s.inserted, 1);
    // Tracked visitors have no crmId: the key's unique index must not see them as
    // duplicates of each other.
    let writer = sluice_connectors::mongo::EventWriter::new(db.store.clone(), Default::default());
    let events: Vec<_> = ["v-a", "v-b"]
        .iter()
        .map(|v| {
            sluice_core::tracking::parse_event(
                &json!({"userId": v, "sessionId": format!("{v}-s"), "eventType": "PAGE_VIEW"}),
                &sluice_core::tracking::RequestContext {
                    received_at_ms: chrono::Utc::now().timestamp_millis(),
                    max_future_ms: 300_000,
                    ..Default::default()
                },
                Default::default(),
            )
            .unwrap()
        })
        .collect();
    let statuses = writer.write(&events).await.unwrap();
    assert!(
        statuses
            .iter()
            .all(|s| *s == sluice_connectors::mongo::WriteStatus::Stored),
        "{statuses:?}"
    );
    assert_eq!(count(&db, "users").await, 3);
}

#[tokio::test]
async fn a_path_matching_several_values_warns_unless_the_field_is_a_list() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route(
        "/things",
        get(|| async {
            Json(
                json!({"data": [{"id": "t1", "tags": [{"n": "a"}, {"n": "b"}],
                "sizes": [{"s": 1}, {"s": 2}, {"s": 3}]}]}),
            )
        }),
    ))
    .await;
    let text = things_config("tags", &format!("http://{addr}/things"), "type = \"none\"")
        + "[mapping.tag]\npath = \"$.tags[*].n\"\n[mapping.tagList]\npath = \"$.tags[*].n\"\nlist = true\n"
        + "[mapping.size]\npath = \"$.sizes[*].s\"\n";
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    // Each field cut to its first value is named, not only the first in the page.
    assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("mapping.tag`") && w.contains("list = true")),
        "{:?}",
        s.warnings
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("mapping.size`") && w.contains("(3 values")),
        "{:?}",
        s.warnings
    );
    let thing = db
        .store
        .collection("things")
        .find_one(doc! { "thingId": "t1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(thing.get_str("tag").unwrap(), "a");
    assert_eq!(
        thing.get_array("tagList").unwrap(),
        &vec![bson::Bson::from("a"), bson::Bson::from("b")]
    );
}

/// Orders in offset pages of `limit`, each order with its own number of line items.
async fn orders(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let get = |k: &str| {
        q.iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let (offset, limit) = (get("offset").unwrap_or(0), get("limit").unwrap_or(2));
    let lines_per_order = [3, 0, 1, 2, 1];
    let orders: Vec<Value> = (offset..(offset + limit).min(lines_per_order.len()))
        .map(|o| {
            let lines: Vec<Value> = (0..lines_per_order[o])
                .map(|l| json!({ "id": format!("o{o}-l{l}") }))
                .collect();
            json!({ "order": o, "lines": lines })
        })
        .collect();
    Json(json!({ "orders": orders }))
}

#[tokio::test]
async fn offset_paging_counts_the_apis_items_not_the_records_selected_from_them() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/orders", get(orders))).await;
    let config = things_config(
        "lines",
        &format!("http://{addr}/orders"),
        "type = \"offset\"\nsize = 2",
    )
    .replace("$.data[*]", "$.orders[*].lines[*]");
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    // Orders 0-1 hold 3 lines (a full page of 2 orders, not an offset of 3), orders 2-3
    // hold 3, order 4 holds 1 (a short page: the last).
    assert_eq!((s.fetched, s.pages), (7, 3));
    assert_eq!(count(&db, "things").await, 7);
}

/// An IMPORT of bare lists into `things`, sending the key in `$key_var` as the query
/// parameter `api_key`, one attempt per request, with `pagination` (a section, or none).
fn query_key_config(name: &str, endpoint: &str, key_var: &str, pagination: &str) -> String {
    format!(
        r#"
name = "{name}"
type = "IMPORT"
endpoint = "{endpoint}"
allow_private_network = true
[auth]
type = "API_KEY"
key = "${{env:{key_var}}}"
query = "api_key"
[source]
records = "$[*]"
{pagination}[source.retry]
max_attempts = 1
[target]
collection = "things"
key = "thingId"
[mapping.thingId]
path = "$.id"
"#
    )
}

#[tokio::test]
async fn a_query_api_key_never_shows_in_the_errors_a_run_records() {
    let db = TestDb::initialized().await;
    let opts = with_secrets(&[("IMPORT_TEST_QUERY_KEY", "sk-live-do-not-leak")]);
    // A port held (bound, never listening) for the whole test: connections are refused,
    // and no other test's server can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap().port();
    let text = query_key_config(
        "leaky",
        &format!("http://127.0.0.1:{closed}/items"),
        "IMPORT_TEST_QUERY_KEY",
        "",
    );
    let name = apply(&db, &text).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("network error"), "{err}");
    // The cause is named, not only "error sending request".
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("sk-live"), "{err}");
    let run = db
        .store
        .collection("import_runs")
        .find_one(bson::doc! { "config": "leaky" })
        .await
        .unwrap()
        .expect("the run is recorded");
    assert!(!run.to_string().contains("sk-live"), "{run}");
}

#[tokio::test]
async fn a_query_api_key_a_next_link_repeats_is_neither_stored_nor_shown() {
    let db = TestDb::initialized().await;
    let opts = with_secrets(&[("IMPORT_TEST_LINK_KEY", "sk-live-link-secret")]);
    // Builds its next link from the request, key included (as many paginators do); the
    // second page fails, so the run records an error naming the page's URL.
    let keys: Arc<Mutex<Vec<String>>> = Default::default();
    let seen = keys.clone();
    let addr = serve(Router::new().route(
        "/echoing",
        get(
            move |uri: axum::http::Uri, Query(q): Query<Vec<(String, String)>>| {
                let seen = seen.clone();
                async move {
                    let key = q
                        .iter()
                        .find(|(k, _)| k == "api_key")
                        .map(|(_, v)| v.clone());
                    seen.lock().unwrap().push(key.unwrap_or_default());
                    if q.iter().any(|(k, _)| k == "p") {
                        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
                            .into_response();
                    }
                    let next = format!("<{}&p=2>; rel=\"next\"", uri);
                    ([("link", next)], axum::Json(json!([{ "id": 1 }]))).into_response()
                }
            },
        ),
    ))
    .await;
    let text = query_key_config(
        "linkleak",
        &format!("http://{addr}/echoing?v=1"),
        "IMPORT_TEST_LINK_KEY",
        "[source.pagination]\ntype = \"link_header\"\n",
    );
    let name = apply(&db, &text).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("p=2"), "{err}");
    assert!(!err.contains("sk-live"), "{err}");
    // Each page was still sent the key, once.
    assert_eq!(
        *keys.lock().unwrap(),
        vec!["sk-live-link-secret".to_string(); 2]
    );
    for collection in ["import_runs", "import_checkpoints"] {
        let docs: Vec<bson::Document> = db
            .store
            .collection(collection)
            .find(bson::doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(!docs.is_empty(), "{collection}");
        for d in docs {
            assert!(!d.to_string().contains("sk-live"), "{collection}: {d}");
        }
    }
}

#[tokio::test]
async fn a_push_accepted_before_its_answer_broke_is_not_sent_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::initialized().await;
    db.store
        .collection("pushonce")
        .insert_many(vec![doc! { "k": 1 }, doc! { "k": 2 }])
        .await
        .unwrap();
    // A receiver that accepts with `200`, then breaks off its answer's body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut text = String::new();
            while !text.contains("\r\n\r\n[") && !text.contains("\r\n\r\n{") {
                let n = conn.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            seen.lock().unwrap().push(text);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            drop(conn);
        }
    });
    let text = format!(
        r#"
name = "once"
type = "EXPORT"
endpoint = "http://{addr}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "pushonce"
"#
    );
    let name = apply(&db, &text).await;
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(s.sent, 2);
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let key = requests[0]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("idempotency-key: ")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("{}", requests[0]));
    assert_eq!(key.trim().len(), 64, "{key}");
}

/// Three records by `updated`, after `since` when given; the second has a price that is
/// not a number.
async fn priced(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    updated_after(
        &q,
        vec![
            json!({ "id": "1", "updated": "2026-11-01T00:00:00Z", "price": 1 }),
            json!({ "id": "2", "updated": "2026-11-02T00:00:00Z", "price": "cheap" }),
            json!({ "id": "3", "updated": "2026-11-03T00:00:00Z", "price": 3 }),
        ],
    )
}

/// A page of the `records` whose `updated` is after the query's `since`, when given.
fn updated_after(q: &[(String, String)], records: Vec<Value>) -> Json<Value> {
    let since = q.iter().find(|(k, _)| k == "since").map(|(_, v)| v.clone());
    let data: Vec<Value> = records
        .into_iter()
        .filter(|r| {
            since.as_deref().is_none_or(|s| {
                chrono::DateTime::parse_from_rfc3339(r["updated"].as_str().unwrap()).unwrap()
                    > chrono::DateTime::parse_from_rfc3339(s).unwrap()
            })
        })
        .collect();
    Json(json!({ "data": data }))
}

#[tokio::test]
async fn records_that_fail_mapping_are_kept_and_can_hold_the_cursor_until_they_map() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/priced", get(priced))).await;
    let config = |name: &str, price_type: &str, hold: bool| {
        format!(
            "{}[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[mapping.price]\npath = \"$.price\"\ntype = \"{price_type}\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\nhold_on_failures = {hold}\n",
            things_config(name, &format!("http://{addr}/priced"), "type = \"none\"")
        )
    };
    // By default the cursor moves on, and the record that failed is kept whole.
    let name = apply(&db, &config("priced", "number", false)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed, s.dead_letters), (3, 1, 1));
    assert!(sync_cursor(&db, &name).await.is_some());
    assert!(
        s.warnings.iter().any(|w| w.contains("dead_letters")),
        "{:?}",
        s.warnings
    );
    let letter = db
        .store
        .collection("dead_letters")
        .find_one(doc! { "pipeline": "import:priced" })
        .await
        .unwrap()
        .expect("kept");
    assert_eq!(letter.get_str("plugin").unwrap(), "mapping");
    assert_eq!(
        letter
            .get_document("record")
            .unwrap()
            .get_str("id")
            .unwrap(),
        "2"
    );
    assert!(
        letter.get_str("reason").unwrap().contains("price"),
        "{letter}"
    );

    // Holding: the cursor stays until the record maps, then it is stored.
    let name = apply(&db, &config("held", "number", true)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed), (3, 1));
    assert!(
        s.warnings.iter().any(|w| w.contains("not advanced")),
        "{:?}",
        s.warnings
    );
    assert_eq!(sync_cursor(&db, &name).await, None);
    let name = apply(&db, &config("held", "any", true)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed), (3, 0));
    assert!(sync_cursor(&db, &name).await.is_some(), "now it advances");
    let stored = db
        .store
        .collection("things")
        .count_documents(doc! { "thingId": "2" })
        .await
        .unwrap();
    assert_eq!(stored, 1);
}

/// Three records by `updated`, after `since` when given; the second is noted `bad`, which
/// the hostile plugin's `panic-on-bad` traps on.
async fn noted(Query(q): Query<Vec<(String, String)>>) -> Json<Value> {
    let records = ["good", "bad", "good"]
        .iter()
        .enumerate()
        .map(|(i, note)| json!({ "id": format!("n{i}"), "updated": format!("2026-11-0{}T00:00:00Z", i + 1), "note": note }))
        .collect();
    updated_after(&q, records)
}

#[tokio::test]
async fn records_a_plugin_fails_hold_the_cursor_under_hold_on_failures() {
    use sluice_plugins::FailurePolicy;
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/noted", get(noted))).await;
    let host = sluice_plugins::PluginHost::new(false).unwrap();
    let options = |mode: &str, policy: FailurePolicy| ImportOptions {
        transforms: vec![std::sync::Arc::new(
            host.load(
                &support::plugin_dir(),
                "hostile",
                json!({ "mode": mode }),
                &sluice_plugins::Grants::default(),
                None,
            )
            .unwrap()
            .with_policy(policy),
        )],
        ..Default::default()
    };
    let config = |name: &str, hold: bool| {
        format!(
            "{}[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[mapping.note]\npath = \"$.note\"\ntype = \"string\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\nhold_on_failures = {hold}\n",
            things_config(name, &format!("http://{addr}/noted"), "type = \"none\"")
                .replace("type = \"IMPORT\"", "type = \"IMPORT\"\ntransforms = [\"hostile\"]")
        )
    };
    for (policy, said) in [
        (
            FailurePolicy::DeadLetter,
            "a plugin failed 1 record(s) (`dead-letter`)",
        ),
        (
            FailurePolicy::SkipBatch,
            "a plugin's failures skipped 1 record(s) (`skip-batch`)",
        ),
    ] {
        let tag = format!("{policy:?}").to_lowercase();
        // By default the cursor moves past the record the plugin failed, and says so.
        let name = apply(&db, &config(&format!("past-{tag}"), false)).await;
        let s = run_import(&db.store, &name, &options("panic-on-bad", policy))
            .await
            .unwrap();
        assert_eq!(s.fetched, 3);
        assert!(sync_cursor(&db, &name).await.is_some(), "{policy:?}");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("moved past records that failed") && w.contains(said)),
            "{policy:?}: {:?}",
            s.warnings
        );
        // Holding: the cursor stays until the plugin takes the record, then it is stored.
        let name = apply(&db, &config(&format!("held-{tag}"), true)).await;
        let s = run_import(&db.store, &name, &options("panic-on-bad", policy))
            .await
            .unwrap();
        assert!(s.completed);
        assert_eq!(sync_cursor(&db, &name).await, None, "{policy:?}");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("not advanced because") && w.contains(said)),
            "{policy:?}: {:?}",
            s.warnings
        );
        let s = run_import(&db.store, &name, &options("ok", policy))
            .await
            .unwrap();
        assert!(s.completed && s.warnings.is_empty(), "{:?}", s.warnings);
        assert!(sync_cursor(&db, &name).await.is_some(), "now it advances");
    }
    let stored = db
        .store
        .collection("things")
        .count_documents(doc! { "thingId": "n1" })
        .await
        .unwrap();
    assert_eq!(
        stored, 1,
        "the record held for is stored once the plugin takes it"
    );
}

#[tokio::test]
async fn documents_without_the_watermark_are_pushed_once() {
    let db = TestDb::initialized().await;
    let coll = db.store.collection("nowater");
    coll.insert_many(vec![
        doc! { "k": 1 },
        doc! { "k": 2, "updatedAt": bson::Bson::Null },
        doc! { "k": 3 },
    ])
    .await
    .unwrap();
    let (base, api) = fault_api(Fault::None).await;
    let text = format!(
        r#"
name = "nowater"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "nowater"
watermark_field = "updatedAt"
batch_size = 2
"#
    );
    let name = apply(&db, &text).await;
    let options = ImportOptions::default();
    let push = || run_push(&db.store, &name, &options);
    let first = push().await.unwrap();
    assert_eq!(first.sent, 3);
    // The progress a terminal shows counts what was sent, in requests.
    let p = &options.progress;
    assert!(p.pushing.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(
        (
            p.pages.load(std::sync::atomic::Ordering::Relaxed),
            p.records.load(std::sync::atomic::Ordering::Relaxed)
        ),
        (first.requests, 3)
    );
    assert_eq!(push().await.unwrap().sent, 0, "none of them again");
    // Newer documents are sent, with the field or (while the position is among the
    // documents without it) without.
    coll.insert_many(vec![
        doc! { "k": 4 },
        doc! { "k": 5, "updatedAt": bson::DateTime::from_millis(1_000) },
    ])
    .await
    .unwrap();
    assert_eq!(push().await.unwrap().sent, 2);
    assert_eq!(push().await.unwrap().sent, 0);
    let mut keys: Vec<i64> = api
        .pushed
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().clone())
        .map(|d| d["k"].as_i64().unwrap())
        .collect();
    keys.sort();
    assert_eq!(keys, vec![1, 2, 3, 4, 5], "each once");
}

/// Page 2 of 3 answers an error body with `200`: the run keeps pages 1's records, says
/// which page came without records, and does not move its (unsorted) cursor past the
/// records of page 3 it never read; the next run, with the API healthy, reads them.
#[tokio::test]
async fn an_error_answered_with_200_mid_run_keeps_the_cursor() {
    let db = TestDb::initialized().await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = healthy.clone();
    let api = move |Query(q): Query<Vec<(String, String)>>| {
        let ok = ok.clone();
        async move {
            let cursor = q
                .iter()
                .find(|(k, _)| k == "cursor")
                .map(|(_, v)| v.clone());
            Json(match cursor.as_deref() {
                None => json!({ "data": [
                    { "id": "a", "updated": "2026-11-05T00:00:00Z" },
                    { "id": "b", "updated": "2026-11-09T00:00:00Z" } ], "next": "2" }),
                Some("2") if !ok.load(std::sync::atomic::Ordering::SeqCst) => {
                    json!({ "error": "quota exceeded" })
                }
                Some("2") => {
                    json!({ "data": [ { "id": "c", "updated": "2026-11-06T00:00:00Z" } ], "next": "3" })
                }
                _ => {
                    json!({ "data": [ { "id": "d", "updated": "2026-11-07T00:00:00Z" } ], "next": null })
                }
            })
        }
    };
    let addr = serve(Router::new().route("/items", get(api))).await;
    let text = things_config(
        "quota",
        &format!("http://{addr}/items"),
        "type = \"cursor\"\ncursor_path = \"$.next\"",
    ) + "[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\n";
    let name = apply(&db, &text).await;
    let first = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(first.fetched, 2);
    let why = first.stopped_early.clone().unwrap_or_default();
    assert!(why.contains("page 2"), "{first:?}");
    // The warning says why the cursor stays, and asks for no more pages.
    let warned = first
        .warnings
        .iter()
        .find(|w| w.contains("not advanced because the run stopped early"))
        .unwrap_or_else(|| panic!("{:?}", first.warnings));
    assert!(
        warned.contains(&why) && !warned.contains("max_pages"),
        "{warned}"
    );
    assert_eq!(
        sync_cursor(&db, &name).await,
        None,
        "not moved past records never read"
    );
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let second = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        second.completed && second.stopped_early.is_none(),
        "{second:?}"
    );
    let things = db.store.collection("things");
    assert_eq!(things.count_documents(doc! {}).await.unwrap(), 4);
    assert!(sync_cursor(&db, &name).await.is_some());
}

#[tokio::test]
async fn an_error_object_answered_with_200_where_a_bare_list_was_keeps_the_cursor() {
    let db = TestDb::initialized().await;
    let api = |Query(q): Query<Vec<(String, String)>>| async move {
        let page = q.iter().find(|(k, _)| k == "page").map(|(_, v)| v.clone());
        Json(match page.as_deref() {
            None | Some("1") => json!([
                { "id": "a", "updated": "2026-11-05T00:00:00Z" },
                { "id": "b", "updated": "2026-11-09T00:00:00Z" } ]),
            _ => json!({ "error": "quota exceeded", "retry": true }),
        })
    };
    let addr = serve(Router::new().route("/items", get(api))).await;
    let text = things_config(
        "bare-quota",
        &format!("http://{addr}/items"),
        "type = \"page\"\nsize = 2",
    )
    .replace("records = \"$.data[*]\"", "records = \"$[*]\"")
        + "[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\n";
    let name = apply(&db, &text).await;
    let run = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((run.fetched, run.failed), (2, 0), "{run:?}");
    let why = run.stopped_early.clone().unwrap_or_default();
    assert!(why.contains("page 2"), "{run:?}");
    assert!(
        run.warnings
            .iter()
            .any(|w| w.contains("not a list of records")),
        "{:?}",
        run.warnings
    );
    assert_eq!(
        sync_cursor(&db, &name).await,
        None,
        "not moved past pages never read"
    );
}

/// An EXPORT's typed mappings read what MongoDB stores (a date, an ObjectId, as relaxed
/// extended JSON), and a document that still fails mapping is kept in `dead_letters`
/// rather than passed over without a trace.
#[tokio::test]
async fn push_mappings_read_dates_and_ids_and_keep_what_fails() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let users = db.store.collection("users");
    let seen = bson::DateTime::from_millis(1_764_000_000_123);
    users
        .insert_one(doc! { "visitorId": "v1", "email": "a@example.com", "lastSeen": seen, "updatedAt": bson::DateTime::from_millis(1_000) })
        .await
        .unwrap();
    users
        .insert_one(doc! { "visitorId": "v2", "updatedAt": bson::DateTime::from_millis(2_000) })
        .await
        .unwrap();
    let text = format!(
        r#"
name = "typed-push"
type = "EXPORT"
endpoint = "{base}/inbox"
method = "POST"
allow_private_network = true
[push]
collection = "users"
watermark_field = "updatedAt"
[mapping.id]
path = "$._id"
type = "string"
[mapping.email]
path = "$.email"
required = true
[mapping.lastSeen]
path = "$.lastSeen"
type = "date"
"#
    );
    let name = apply(&db, &text).await;
    let s = run_push(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.sent, s.failed, s.dead_letters), (1, 1, 1), "{s:?}");
    let pushed = api.pushed.lock().unwrap().clone();
    let record = &pushed[0][0];
    assert_eq!(
        record["lastSeen"],
        json!({ "$date": "2025-11-24T16:00:00.123Z" }),
        "{record}"
    );
    assert_eq!(
        record["id"].as_str().map(str::len),
        Some(24),
        "an ObjectId as text: {record}"
    );
    let letter = db
        .store
        .collection("dead_letters")
        .find_one(doc! { "pipeline": format!("push:{name}") })
        .await
        .unwrap()
        .expect("the unmapped document is kept");
    assert_eq!(letter.get_str("plugin").unwrap(), "mapping");
    assert_eq!(
        letter
            .get_document("record")
            .unwrap()
            .get_str("visitorId")
            .unwrap(),
        "v2"
    );
}

/// An interrupted run's saved next page expires (the API answers 410 to its cursor): the
/// resumed run fails once, drops the checkpoint and says so, and the next run starts
/// over and completes, instead of failing on the dead cursor for ever.
#[tokio::test]
async fn a_checkpoint_whose_next_page_expired_is_dropped_not_resumed_for_ever() {
    let db = TestDb::initialized().await;
    let generation = Arc::new(AtomicU64::new(1));
    let g = generation.clone();
    let api = move |Query(q): Query<Vec<(String, String)>>| {
        let g = g.load(Ordering::SeqCst);
        async move {
            let cursor = q
                .iter()
                .find(|(k, _)| k == "cursor")
                .map(|(_, v)| v.clone());
            match cursor.as_deref() {
                None => Json(json!({ "data": [{ "id": "a" }], "next": format!("g{g}-2") }))
                    .into_response(),
                Some(c) if c == format!("g{g}-2") => {
                    Json(json!({ "data": [{ "id": "b" }], "next": null })).into_response()
                }
                Some(_) => (StatusCode::GONE, "cursor expired").into_response(),
            }
        }
    };
    let addr = serve(Router::new().route("/items", get(api))).await;
    let text = things_config(
        "expiring",
        &format!("http://{addr}/items"),
        "type = \"cursor\"\ncursor_path = \"$.next\"",
    );
    let name = apply(&db, &text).await;
    let one = ImportOptions {
        stop_after_pages: Some(1),
        ..Default::default()
    };
    assert!(!run_import(&db.store, &name, &one).await.unwrap().completed);
    generation.store(2, Ordering::SeqCst);
    let err = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("410"), "{err}");
    let checkpoints = db.store.collection("import_checkpoints");
    assert_eq!(checkpoints.count_documents(doc! {}).await.unwrap(), 0);
    let failed = db
        .store
        .collection("import_runs")
        .find_one(doc! { "config": &name, "status": "FAILED" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        failed.get_str("error").unwrap().contains("starts over"),
        "{failed}"
    );
    let fresh = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(fresh.completed && !fresh.resumed, "{fresh:?}");
    assert_eq!(count(&db, "things").await, 2);
}

/// Records `{id, updated}` with `updated` in epoch seconds, those at or after `since`;
/// the queries seen are kept.
#[derive(Clone, Default)]
struct EpochApi {
    records: Arc<Mutex<Vec<(u32, i64)>>>,
    queries: Arc<Mutex<Vec<Option<String>>>>,
}

async fn epoch_seconds_page(
    State(api): State<EpochApi>,
    Query(q): Query<Vec<(String, String)>>,
) -> Json<Value> {
    let since = q.iter().find(|(k, _)| k == "since").map(|(_, v)| v.clone());
    api.queries.lock().unwrap().push(since.clone());
    let from: i64 = since.and_then(|s| s.parse().ok()).unwrap_or(i64::MIN);
    let data: Vec<Value> = api
        .records
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, at)| *at >= from)
        .map(|(id, at)| json!({ "id": id, "updated": at }))
        .collect();
    Json(json!({ "data": data }))
}

#[tokio::test]
async fn epoch_second_dates_take_a_unit_and_the_cursor_goes_back_with_a_lookback() {
    let db = TestDb::initialized().await;
    let api = EpochApi::default();
    *api.records.lock().unwrap() = vec![(1, 1_700_000_000), (2, 1_700_000_123)];
    let addr = serve(
        Router::new()
            .route("/epoch", get(epoch_seconds_page))
            .with_state(api.clone()),
    )
    .await;
    let config = |name: &str, unit: &str, lookback: u64| {
        things_config(name, &format!("http://{addr}/epoch"), "type = \"none\"")
            + &format!(
                "[mapping.updated]\npath = \"$.updated\"\ntype = \"date\"\n{unit}\n[incremental]\ncursor_field = \"updated\"\nparam = \"since\"\nlookback_seconds = {lookback}\n"
            )
    };
    let updated = |id: &str| {
        let db = &db;
        let id = id.to_string();
        async move {
            db.store
                .collection("things")
                .find_one(doc! { "thingId": id })
                .await
                .unwrap()
                .unwrap()
                .get_datetime("updated")
                .unwrap()
                .timestamp_millis()
        }
    };

    // Without a unit, epoch seconds land in 1970: stored as the config says, but warned.
    let name = apply(&db, &config("no-unit", "", 0)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(updated("2").await, 1_700_000_123);
    assert!(
        s.warnings.iter().any(|w| w.contains("unit = \"seconds\"")),
        "{:?}",
        s.warnings
    );

    // With `unit = "seconds"` the dates are right, and no warning is given.
    let name = apply(&db, &config("seconds", "unit = \"seconds\"", 200)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(updated("2").await, 1_700_000_123_000);
    assert_eq!(
        sync_cursor(&db, &name).await,
        Some(bson::Bson::DateTime(bson::DateTime::from_millis(
            1_700_000_123_000
        )))
    );

    // The next run sends the cursor as epoch seconds, 200 s early. Record 2 has gone at
    // the source, so this run reads only record 1, below the cursor: the cursor stays.
    api.records.lock().unwrap().retain(|(id, _)| *id == 1);
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(s.fetched, 1);
    let sent = api.queries.lock().unwrap().last().cloned().flatten();
    assert_eq!(sent.as_deref(), Some("1699999923"));
    assert_eq!(
        sync_cursor(&db, &name).await,
        Some(bson::Bson::DateTime(bson::DateTime::from_millis(
            1_700_000_123_000
        ))),
        "never moved backwards"
    );

    // The warning does not depend on which record of a page carries the suspect number.
    *api.records.lock().unwrap() = vec![(3, 1_700_000_000_000), (4, 1_700_000_100)];
    let name = apply(&db, &config("mixed", "", 0)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        s.warnings.iter().any(|w| w.contains("read 1700000100")),
        "{:?}",
        s.warnings
    );
}

/// A batch whose write MongoDB does not answer (its connection broken, the driver's own
/// retry too) is written again, not left to fail the run.
#[tokio::test]
async fn a_batch_whose_connection_broke_is_written_again() {
    let db = TestDb::initialized().await;
    let api = || async {
        Json(json!({ "data": [
            { "id": 1, "title": "Lamp" }, { "id": 2, "title": "Desk" }, { "id": 3, "title": "Chair" },
        ] }))
    };
    let addr = serve(Router::new().route("/broken", get(api))).await;
    let text = things_config(
        "broken",
        &format!("http://{addr}/broken"),
        "type = \"none\"",
    ) + "[mapping.title]\npath = \"$.title\"\n";
    let name = apply(&db, &text).await;
    // The batch's insert into `things`, and the driver's retry of it, break.
    let (uri, armed, severed, _) =
        support::severing_mongo_proxy_at_most(b"insert\0\x07\0\0\0things\0", 2).await;
    let proxied = support::store_via(&uri, &db.name).await;
    armed.store(true, Ordering::SeqCst);
    let s = run_import(&proxied, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(severed.load(Ordering::SeqCst), 2);
    assert_eq!((s.inserted, s.failed), (3, 0), "{s:?}");
    let stored = db
        .store
        .collection("things")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 3);
}

/// Imported events whose write MongoDB does not answer (the read of the visitors'
/// sessions that gap sessions start with, and the driver's retry of it, break) are
/// written again, not left to fail the run.
#[tokio::test]
async fn imported_events_whose_write_broke_are_written_again() {
    let db = TestDb::initialized().await;
    let endpoint = serve_sales(sales_page()).await;
    let name = apply(&db, &sales_config("pos-broken", &endpoint, "eventId")).await;
    let (uri, armed, severed, _) =
        support::severing_mongo_proxy_at_most(b"find\0\x09\0\0\0sessions\0", 2).await;
    let proxied = support::store_via(&uri, &db.name).await;
    armed.store(true, Ordering::SeqCst);
    let s = run_import(&proxied, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(severed.load(Ordering::SeqCst), 2);
    assert!(s.completed, "{s:?}");
    assert_eq!((s.inserted, s.unchanged), (5, 1), "{s:?}");
    assert_eq!(count(&db, "events").await, 5);
}

/// A record over 4 MiB is written with plain update operators (the comparing pipeline
/// carries each value twice, and could pass the 16 MiB limit on a statement): stored, its
/// `createdAt` kept, a cleared value unset, and counted updated on every run, as its
/// `updatedAt` moves.
#[tokio::test]
async fn a_record_over_four_mib_is_upserted_with_plain_operators() {
    let db = TestDb::initialized().await;
    let blob = "x".repeat(5 << 20);
    let body: Arc<Mutex<Value>> = Arc::new(Mutex::new(json!({ "data": [
        { "id": 1, "title": blob, "discount": 15 },
        { "id": 2, "title": "Desk", "discount": 5 },
    ] })));
    let shared = body.clone();
    let api = move || {
        let shared = shared.clone();
        async move { Json(shared.lock().unwrap().clone()) }
    };
    let addr = serve(Router::new().route("/big", get(api))).await;
    let text = things_config("big", &format!("http://{addr}/big"), "type = \"none\"")
        + "[mapping.title]\npath = \"$.title\"\n\
           [mapping.discount]\npath = \"$.discount\"\ntype = \"number\"\non_missing = \"unset\"\n";
    let name = apply(&db, &text).await;
    let things = db.store.collection("things");
    let thing = |id: &'static str| {
        let things = things.clone();
        async move {
            things
                .find_one(doc! { "thingId": id })
                .await
                .unwrap()
                .unwrap()
        }
    };
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.inserted, s.failed), (2, 0), "{s:?}");
    let first = thing("1").await;
    assert_eq!(first.get_str("title").unwrap().len(), 5 << 20);
    assert_eq!(first.get_str("source").unwrap(), "big");
    let created = *first.get_datetime("createdAt").unwrap();
    let updated = *first.get_datetime("updatedAt").unwrap();

    // Again, unchanged: the small record is counted so, the big one updated (its
    // `updatedAt` moves), its `createdAt` kept.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.inserted, s.updated, s.unchanged), (0, 1, 1), "{s:?}");
    let again = thing("1").await;
    assert_eq!(*again.get_datetime("createdAt").unwrap(), created);
    assert!(*again.get_datetime("updatedAt").unwrap() > updated);

    // The source clears its discount: unset, as `on_missing` says.
    *body.lock().unwrap() = json!({ "data": [
        { "id": 1, "title": blob },
        { "id": 2, "title": "Desk", "discount": 5 },
    ] });
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.updated, s.unchanged, s.failed), (1, 1, 0), "{s:?}");
    let cleared = thing("1").await;
    assert!(!cleared.contains_key("discount"), "discount kept");
    assert_eq!(cleared.get_str("title").unwrap().len(), 5 << 20);
    assert_eq!(thing("2").await.get_f64("discount").unwrap(), 5.0);
}

#[tokio::test]
async fn a_value_cleared_at_the_source_is_unset_only_where_the_mapping_says_so() {
    let db = TestDb::initialized().await;
    let body: Arc<Mutex<Value>> = Arc::new(Mutex::new(json!({ "data": [
        { "id": 1, "title": "Lamp", "discount": 15, "tags": ["sale"] },
        { "id": 2, "title": "$5 Desk", "discount": 5, "tags": ["new"] },
    ] })));
    let shared = body.clone();
    let api = move || {
        let shared = shared.clone();
        async move { Json(shared.lock().unwrap().clone()) }
    };
    let addr = serve(Router::new().route("/cleared", get(api))).await;
    let text = things_config(
        "cleared",
        &format!("http://{addr}/cleared"),
        "type = \"none\"",
    ) + "[mapping.title]\npath = \"$.title\"\n\
           [mapping.discount]\npath = \"$.discount\"\ntype = \"number\"\non_missing = \"unset\"\n\
           [mapping.tags]\npath = \"$.tags\"\nlist = true\non_missing = \"unset\"\n";
    let name = apply(&db, &text).await;
    let things = db.store.collection("things");
    let updated_at = |id: &'static str| {
        let things = things.clone();
        async move {
            let d = things
                .find_one(doc! { "thingId": id })
                .await
                .unwrap()
                .unwrap();
            *d.get_datetime("updatedAt").unwrap()
        }
    };
    run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    let first = (updated_at("1").await, updated_at("2").await);
    // The same answer again changes nothing: no document, no `updatedAt` (a push
    // watermarked on it would send them all again).
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.inserted, s.updated, s.unchanged), (0, 0, 2), "{s:?}");
    assert_eq!((updated_at("1").await, updated_at("2").await), first);
    // The source clears record 1's discount (null), title (missing) and tags (empty);
    // record 2 is unchanged.
    *body.lock().unwrap() = json!({ "data": [
        { "id": 1, "discount": null, "tags": [] },
        { "id": 2, "title": "$5 Desk", "discount": 5, "tags": ["new"] },
    ] });
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed), (2, 0), "{s:?}");
    assert_eq!((s.updated, s.unchanged), (1, 1), "{s:?}");
    assert!(updated_at("1").await > first.0);
    assert_eq!(updated_at("2").await, first.1);
    // The values cleared stay cleared, unchanged.
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.updated, s.unchanged), (0, 2), "{s:?}");
    let one = things
        .find_one(doc! { "thingId": "1" })
        .await
        .unwrap()
        .unwrap();
    assert!(!one.contains_key("discount"), "{one}");
    assert!(!one.contains_key("tags"), "{one}");
    assert_eq!(one.get_str("title").unwrap(), "Lamp", "kept: no on_missing");
    let two = things
        .find_one(doc! { "thingId": "2" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(two.get_f64("discount").unwrap(), 5.0);
    assert_eq!(
        two.get_str("title").unwrap(),
        "$5 Desk",
        "a value, not a field path"
    );

    // Where it makes no sense, `on_missing` is refused with the field named.
    for (extra, expected) in [
        ("required = true\n", "required"),
        ("default = 0\n", "default"),
        ("", "IMPORT"),
    ] {
        let mut text = text.replace(
            "type = \"number\"\non_missing = \"unset\"\n",
            &format!("type = \"number\"\non_missing = \"unset\"\n{extra}"),
        );
        if expected == "IMPORT" {
            text = text.replace("type = \"IMPORT\"", "type = \"EXPORT\"");
        }
        let err = parse_file("t.toml", &text)
            .and_then(|f| sluice_core::integration::validate("t.toml", &f, &|_| None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mapping.discount.on_missing") && err.contains(expected),
            "{err}"
        );
    }
}

#[tokio::test]
async fn import_reset_drops_the_checkpoint_and_with_cursor_the_cursor() {
    let db = TestDb::initialized().await;
    let (base, api) = fault_api(Fault::None).await;
    let name = apply(&db, &cursor_config("resettable", &base, "", "")).await;
    let job = format!("integration:{name}");
    let options = ImportOptions::default();
    options.progress.stop.store(true, Ordering::SeqCst);
    let first = run_import(&db.store, &name, &options).await.unwrap();
    assert!(!first.completed);

    // Refused while a run holds the config's lease.
    let run = sluice_jobs::schedule::start_manual_run(&db.store, &job, "test")
        .await
        .unwrap();
    let busy = sluice_jobs::import::reset_import(&db.store, &name, &job, false)
        .await
        .unwrap_err();
    assert!(busy.to_string().contains("in progress"), "{busy}");
    sluice_jobs::schedule::end_manual_run(&db.store, &run, &Ok("done".into()))
        .await
        .unwrap();

    let report = sluice_jobs::import::reset_import(&db.store, &name, &job, false)
        .await
        .unwrap();
    assert_eq!(report.checkpoint, Some((first.run_id.clone(), 1)));
    assert_eq!(report.cursor, None);
    let again = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(!again.resumed && again.completed, "{again:?}");
    assert_eq!(again.fetched, 45, "read from the start");
    assert!(sync_cursor(&db, &name).await.is_some(), "advanced");

    // A cursor in the future (a record dated ahead) never moves back by itself: the run
    // says so and names the way out.
    let future = bson::Bson::DateTime(bson::DateTime::from_millis(32_503_680_000_000));
    db.store
        .collection("integration_configs")
        .update_one(
            doc! { "name": &name },
            doc! { "$set": { "syncCursor": future.clone() } },
        )
        .await
        .unwrap();
    let stuck = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(
        stuck
            .warnings
            .iter()
            .any(|w| w.contains("in the future") && w.contains("import reset")),
        "{:?}",
        stuck.warnings
    );
    assert_eq!(sync_cursor(&db, &name).await, Some(future.clone()));

    // `--cursor` clears the cursor too: the next run sends no `since`.
    let report = sluice_jobs::import::reset_import(&db.store, &name, &job, true)
        .await
        .unwrap();
    assert_eq!(report.checkpoint, None);
    assert_eq!(report.cursor, Some(future));
    assert_eq!(sync_cursor(&db, &name).await, None);
    let asked_before = api.seen_queries.lock().unwrap().len();
    let all = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(all.fetched, 45, "everything again");
    let first_query = api.seen_queries.lock().unwrap()[asked_before].clone();
    assert!(!first_query.contains("since="), "{first_query}");
    assert_eq!(all.inserted, 0, "upserted by key, nothing stored twice");

    let unknown = sluice_jobs::import::reset_import(&db.store, "nope", "integration:nope", false)
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("no integration config"),
        "{unknown}"
    );
}

#[tokio::test]
async fn a_date_cursor_in_a_custom_format_goes_back_in_that_format() {
    let db = TestDb::initialized().await;
    let seen: Arc<Mutex<Vec<Option<String>>>> = Default::default();
    let log = seen.clone();
    let api = move |Query(q): Query<Vec<(String, String)>>| {
        let log = log.clone();
        async move {
            log.lock()
                .unwrap()
                .push(q.iter().find(|(k, _)| k == "since").map(|(_, v)| v.clone()));
            Json(json!({ "data": [
                { "id": 1, "modified": "2023-11-14 22:13:20" },
                { "id": 2, "modified": "2023-11-15 08:00:05" },
            ] }))
        }
    };
    let addr = serve(Router::new().route("/dated", get(api))).await;
    let text = things_config("dated", &format!("http://{addr}/dated"), "type = \"none\"")
        + "[mapping.modified]\npath = \"$.modified\"\ntype = \"date\"\nformat = \"%Y-%m-%d %H:%M:%S\"\n[incremental]\ncursor_field = \"modified\"\nparam = \"since\"\nlookback_seconds = 5\n";
    let name = apply(&db, &text).await;
    for _ in 0..2 {
        let s = run_import(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap();
        assert_eq!((s.fetched, s.failed), (2, 0));
    }
    let stored = db
        .store
        .collection("things")
        .find_one(doc! { "thingId": "2" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored
            .get_datetime("modified")
            .unwrap()
            .try_to_rfc3339_string()
            .unwrap(),
        "2023-11-15T08:00:05Z"
    );
    let sent = seen.lock().unwrap().clone();
    assert_eq!(
        sent,
        vec![None, Some("2023-11-15 08:00:00".to_string())],
        "the API's own form, 5 s early"
    );
}

/// Two link-header pages of things with a `sku` and, for one, an `_id` of its own.
async fn skus(Query(q): Query<Vec<(String, String)>>) -> Response {
    if q.iter().any(|(k, v)| k == "p" && v == "2") {
        return Json(json!({ "data": [{ "id": 4, "sku": "D" }] })).into_response();
    }
    let data = json!([
        { "id": 1, "sku": "A" },
        { "id": 2, "sku": "A" },
        { "id": 3, "sku": "B" },
        { "id": 9, "sku": "I", "oid": "y9" },
    ]);
    (
        [("link", "</skus?p=2>; rel=\"next\"")],
        Json(json!({ "data": data })),
    )
        .into_response()
}

#[tokio::test]
async fn a_record_mongodb_refuses_is_dead_lettered_and_the_run_goes_on() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/skus", get(skus))).await;
    let things = db.store.collection("things");
    // Another unique index the records break (two records share sku A), and a stored
    // thing 9 whose `_id` the record would change.
    things
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "sku": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    things
        .insert_one(doc! { "_id": "x9", "thingId": "9", "sku": "I" })
        .await
        .unwrap();
    let config = format!(
        "{}[mapping.sku]\npath = \"$.sku\"\ntype = \"string\"\n[mapping._id]\npath = \"$.oid\"\ntype = \"string\"\n",
        things_config("skus", &format!("http://{addr}/skus"), "type = \"link_header\"")
    );
    let name = apply(&db, &config).await;
    for round in 0..2 {
        let s = run_import(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(s.completed, "round {round}: {s:?}");
        assert_eq!((s.pages, s.fetched, s.failed), (2, 5, 2), "round {round}");
        // Kept once, however often the same records are refused.
        assert_eq!(
            s.dead_letters,
            if round == 0 { 2 } else { 0 },
            "round {round}"
        );
        let stored = things
            .find(doc! {})
            .sort(doc! { "thingId": 1 })
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
        let ids: Vec<&str> = stored
            .iter()
            .map(|d| d.get_str("thingId").unwrap())
            .collect();
        assert_eq!(ids, ["1", "3", "4", "9"], "round {round}");
        assert_eq!(stored[3].get_str("_id").unwrap(), "x9");
    }
    let letters = db
        .store
        .collection("dead_letters")
        .find(doc! { "pipeline": "import:skus" })
        .sort(doc! { "record.thingId": 1 })
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    for (letter, id) in letters.iter().zip(["2", "9"]) {
        assert_eq!(letter.get_str("plugin").unwrap(), "write", "{letter}");
        assert_eq!(
            letter
                .get_document("record")
                .unwrap()
                .get_str("thingId")
                .unwrap(),
            id
        );
        assert!(
            letter
                .get_str("reason")
                .unwrap()
                .starts_with("MongoDB refused the write: "),
            "{letter}"
        );
    }
    assert!(
        letters[0].get_str("reason").unwrap().contains("E11000"),
        "{}",
        letters[0]
    );
}

/// Django REST style pages of 3 (7 records): the next page's absolute URL in `next`,
/// and the same as a relative HAL link in `_links.next.href`.
async fn drf(Query(q): Query<Vec<(String, String)>>, headers: HeaderMap) -> Json<Value> {
    let page: u64 = q
        .iter()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1);
    let host = headers.get("host").unwrap().to_str().unwrap();
    let results: Vec<Value> = ((page - 1) * 3..(page * 3).min(7))
        .map(|i| json!({ "id": i }))
        .collect();
    let (next, href) = if page * 3 < 7 {
        (
            json!(format!("http://{host}/drf?page={}", page + 1)),
            json!(format!("/drf?page={}", page + 1)),
        )
    } else {
        (Value::Null, Value::Null)
    };
    Json(
        json!({ "count": 7, "next": next, "_links": { "next": { "href": href } }, "results": results }),
    )
}

#[tokio::test]
async fn next_page_urls_in_the_body_are_followed_and_a_url_cursor_is_explained() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/drf", get(drf))).await;
    let endpoint = format!("http://{addr}/drf");
    let config = |name: &str, pagination: &str| {
        things_config(name, &endpoint, pagination).replace("$.data[*]", "$.results[*]")
    };
    for (name, pagination) in [
        ("drf", "type = \"next_url\""),
        (
            "hal",
            "type = \"next_url\"\nnext_path = \"$._links.next.href\"",
        ),
    ] {
        let name = apply(&db, &config(name, pagination)).await;
        let s = run_import(&db.store, &name, &ImportOptions::default())
            .await
            .unwrap();
        assert!(s.completed, "{name}: {s:?}");
        assert_eq!((s.pages, s.fetched), (3, 7), "{name}");
        assert_eq!(s.stopped_early, None, "{name}");
    }
    assert_eq!(count(&db, "things").await, 7);
    // The next URL sent as a cursor parameter gets page 1 again: the loop guard stops
    // the run and says which paging type follows it.
    let name = apply(&db, &config("drf-cursor", "type = \"cursor\"")).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    let stopped = s.stopped_early.unwrap_or_default();
    assert!(stopped.contains("type = \"next_url\""), "{stopped}");
    // A bad path is refused when the config is loaded.
    let text = config("bad", "type = \"next_url\"\nnext_path = \"next\"");
    let err = sluice_core::integration::validate(
        "t.toml",
        &parse_file("t.toml", &text).unwrap(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("source.pagination.next_path"), "{err}");
}

/// Three pages by next URL; the second has no `results` at all (an API that leaves an
/// empty list out), but names the third.
async fn gappy(Query(q): Query<Vec<(String, String)>>, headers: HeaderMap) -> Json<Value> {
    let page = q
        .iter()
        .find(|(k, _)| k == "page")
        .map_or("1", |(_, v)| v.as_str());
    let host = headers.get("host").unwrap().to_str().unwrap();
    let next = |n: u32| json!(format!("http://{host}/gappy?page={n}"));
    Json(match page {
        "1" => json!({ "results": [{ "id": 0 }, { "id": 1 }], "next": next(2) }),
        "2" => json!({ "next": next(3) }),
        _ => json!({ "results": [{ "id": 2 }], "next": null }),
    })
}

#[tokio::test]
async fn a_page_without_records_that_names_the_next_does_not_cut_the_run_short() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/gappy", get(gappy))).await;
    let text = things_config(
        "gappy",
        &format!("http://{addr}/gappy"),
        "type = \"next_url\"",
    )
    .replace("$.data[*]", "$.results[*]");
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.completed, "{s:?}");
    assert_eq!((s.pages, s.fetched), (3, 3));
    // Every page was read: the run is not cut short (its cursor may move), though the
    // page is still warned about.
    assert_eq!(s.stopped_early, None);
    assert!(
        s.warnings.iter().any(|w| w.contains("page 2")),
        "{:?}",
        s.warnings
    );
    assert_eq!(count(&db, "things").await, 3);
}

/// A token endpoint that takes the client's credentials only in the form body
/// (`client_secret_post`), as some providers do, and an API that wants its tokens.
async fn post_only_token(headers: HeaderMap, body: String) -> Response {
    let form: std::collections::HashMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let in_body = form.get("client_id").map(String::as_str) == Some("post-client")
        && form.get("client_secret").map(String::as_str) == Some("post-secret");
    if headers.contains_key("authorization") || !in_body {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "invalid_client", "error_description": "credentials must be in the body" })),
        )
            .into_response();
    }
    Json(json!({ "access_token": "post-token", "token_type": "bearer", "expires_in": 3600 }))
        .into_response()
}

#[tokio::test]
async fn client_secret_post_sends_the_client_credentials_in_the_form_body() {
    let db = TestDb::initialized().await;
    let addr = serve(Router::new().route("/token", post(post_only_token)).route(
        "/things",
        get(|headers: HeaderMap| async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            if auth != Some("Bearer post-token") {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            Json(json!({ "data": [{ "id": 1 }, { "id": 2 }] })).into_response()
        }),
    ))
    .await;
    let opts = with_secrets(&[("POST_CLIENT_SECRET", "post-secret")]);
    let config = |name: &str, client_auth: &str| {
        format!(
            "{}[auth]\ntype = \"OAUTH\"\ntoken_url = \"http://{addr}/token\"\nclient_id = \"post-client\"\nclient_secret = \"${{env:POST_CLIENT_SECRET}}\"\n{client_auth}\n",
            things_config(name, &format!("http://{addr}/things"), "type = \"none\"")
        )
    };
    // HTTP Basic, the default, is refused by this provider, with its own error.
    let name = apply(&db, &config("basic", "")).await;
    let err = run_import(&db.store, &name, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid_client"), "{err}");
    let name = apply(&db, &config("post", "client_auth = \"client_secret_post\"")).await;
    let s = run_import(&db.store, &name, &opts).await.unwrap();
    assert_eq!(s.inserted, 2);
    // Anything else is refused when the config is loaded.
    let text = config("bad", "client_auth = \"private_key_jwt\"");
    let err = sluice_core::integration::validate(
        "t.toml",
        &parse_file("t.toml", &text).unwrap(),
        &|_| Some("post-secret".into()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.client_auth"), "{err}");
}

/// An upsert key the API sends as an object, a list or an extended-JSON regular
/// expression is refused, not used as the upsert's filter, where it would be a query
/// operator matching (and overwriting) another record.
#[tokio::test]
async fn an_upsert_key_that_is_not_a_single_value_cannot_overwrite_other_records() {
    let db = TestDb::initialized().await;
    let records = vec![
        json!({ "id": "a", "name": "alice" }),
        json!({ "id": "b", "name": "bob" }),
        json!({ "id": { "$gt": "" }, "name": "PWNED" }),
        json!({ "id": ["a", "b"], "name": "PWNED" }),
        json!({ "id": { "$regularExpression": { "pattern": ".*", "options": "" } }, "name": "PWNED" }),
    ];
    let url = serve_page("/injected", records).await;
    // `type = "any"`: the key is taken as the API sent it.
    let text = things_config("injected", &url, "type = \"none\"").replace(
        "type = \"string\"\nrequired = true",
        "type = \"any\"\nrequired = true",
    ) + "[mapping.name]\npath = \"$.name\"\n";
    let name = apply(&db, &text).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert_eq!((s.fetched, s.failed), (5, 3), "{s:?}");
    let names: Vec<String> = db
        .store
        .collection("things")
        .find(doc! {})
        .sort(doc! { "thingId": 1 })
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_str("name").unwrap().to_string())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    let sample = s
        .samples
        .iter()
        .map(|r| r.reason.clone())
        .collect::<Vec<_>>();
    assert!(
        sample.iter().all(|r| r.contains("not a single value")),
        "{sample:?}"
    );
}

/// A newest-first list read by offset while an item is added before each page after the
/// first: the last item of each page comes again at the top of the next.
async fn growing(
    State(list): State<Arc<std::sync::Mutex<Vec<u64>>>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Json<Value> {
    let offset: usize = q
        .iter()
        .find(|(k, _)| k == "offset")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut list = list.lock().unwrap();
    let data: Vec<Value> = list
        .iter()
        .skip(offset)
        .take(10)
        .map(|i| json!({ "id": i }))
        .collect();
    let newest = list[0] + 1;
    list.insert(0, newest);
    Json(json!({ "data": data }))
}

#[tokio::test]
async fn a_key_that_comes_twice_in_a_run_is_warned_of() {
    let db = TestDb::initialized().await;
    // Two records of one key with other values: the last one is stored, and said.
    let url = serve_page(
        "/twice",
        vec![
            json!({ "id": "a", "name": "first" }),
            json!({ "id": "b", "name": "other" }),
            json!({ "id": "a", "name": "second" }),
        ],
    )
    .await;
    let config = things_config("twice", &url, "type = \"none\"")
        + "[mapping.name]\npath = \"$.name\"\ntype = \"string\"\n";
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    let differing: Vec<&String> = s
        .warnings
        .iter()
        .filter(|w| w.contains("with other values"))
        .collect();
    assert_eq!(differing.len(), 1, "{:?}", s.warnings);
    assert!(
        differing[0].starts_with("1 record had the `thingId`")
            && differing[0].contains("(the first: \"a\")")
            && differing[0].contains("the last one read is stored"),
        "{}",
        differing[0]
    );
    let stored = db
        .store
        .collection("things")
        .find_one(bson::doc! { "thingId": "a" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_str("name").unwrap(), "second");

    // Offset paging over a list growing while it is read: the repeats are said, with
    // what they mean. The same records under no paging are not (an API may list an item
    // twice, harmlessly).
    let list = Arc::new(std::sync::Mutex::new((0..25).rev().collect::<Vec<u64>>()));
    let addr = serve(
        Router::new()
            .route("/growing", get(growing))
            .with_state(list.clone()),
    )
    .await;
    let config = things_config(
        "growing",
        &format!("http://{addr}/growing"),
        "type = \"offset\"\nsize = 10",
    );
    let name = apply(&db, &config).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    // Pages of 10, 10 and 7 items; the second and third each begin with the last item
    // of the one before.
    assert_eq!((s.fetched, s.pages), (27, 3));
    let shifting: Vec<&String> = s
        .warnings
        .iter()
        .filter(|w| w.contains("came twice in this run with the same values"))
        .collect();
    assert_eq!(shifting.len(), 1, "{:?}", s.warnings);
    assert!(
        shifting[0].starts_with("2 records came twice")
            && shifting[0].contains("(the first: `thingId` = \"15\")")
            && shifting[0].contains("page or offset paging"),
        "{}",
        shifting[0]
    );
    assert!(
        !s.warnings.iter().any(|w| w.contains("with other values")),
        "{:?}",
        s.warnings
    );
    let url = serve_page("/same", vec![json!({ "id": "x" }), json!({ "id": "x" })]).await;
    let name = apply(&db, &things_config("same", &url, "type = \"none\"")).await;
    let s = run_import(&db.store, &name, &ImportOptions::default())
        .await
        .unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

/// A run the scheduler recorded FAILED after its lease lapsed leaves its import run
/// RUNNING no longer: closed INTERRUPTED, unless it was written after the lapse (a run
/// started or resumed since).
#[tokio::test]
async fn the_import_run_of_a_lapsed_scheduled_run_is_closed_but_not_a_newer_one() {
    let db = TestDb::initialized().await;
    let runs = db.store.collection("import_runs");
    let now = db.store.now().timestamp_millis();
    let at = |ms: i64| bson::DateTime::from_millis(now + ms);
    runs.insert_many(vec![
        doc! { "runId": "crm-dead", "config": "crm", "status": "RUNNING", "updatedAt": at(-120_000) },
        doc! { "runId": "crm-live", "config": "crm", "status": "RUNNING", "updatedAt": at(-1_000) },
        doc! { "runId": "other-dead", "config": "other", "status": "RUNNING", "updatedAt": at(-120_000) },
    ])
    .await
    .unwrap();
    let closed = sluice_jobs::import::close_lapsed_runs(
        &db.store,
        "crm",
        at(-60_000),
        "abandoned: its process stopped",
    )
    .await
    .unwrap();
    assert_eq!(closed, 1);
    let status = |id: &'static str| {
        let runs = runs.clone();
        async move { runs.find_one(doc! { "runId": id }).await.unwrap().unwrap() }
    };
    let dead = status("crm-dead").await;
    assert_eq!(dead.get_str("status").unwrap(), "INTERRUPTED", "{dead}");
    assert!(
        dead.get_str("error").unwrap().starts_with("abandoned"),
        "{dead}"
    );
    assert_eq!(dead.get_array("failures").unwrap().len(), 1, "{dead}");
    assert_eq!(
        status("crm-live").await.get_str("status").unwrap(),
        "RUNNING"
    );
    assert_eq!(
        status("other-dead").await.get_str("status").unwrap(),
        "RUNNING"
    );
}

/// A plugin that fans records out makes repeats of its own: the warning says it may have.
#[tokio::test]
async fn repeats_a_plugin_fanned_out_are_said_to_be_perhaps_its() {
    let db = TestDb::initialized().await;
    let list = Arc::new(std::sync::Mutex::new(vec![2u64, 1, 0]));
    let addr = serve(
        Router::new()
            .route("/growing", get(growing))
            .with_state(list),
    )
    .await;
    let config = things_config(
        "fanned",
        &format!("http://{addr}/growing"),
        "type = \"offset\"\nsize = 10",
    )
    .replace(
        "type = \"IMPORT\"",
        "type = \"IMPORT\"\ntransforms = [\"hostile\"]",
    );
    let name = apply(&db, &config).await;
    let host = sluice_plugins::PluginHost::new(false).unwrap();
    let plugin = host
        .load(
            &support::plugin_dir(),
            "hostile",
            json!({ "mode": "fanout-6" }),
            &sluice_plugins::Grants::default(),
            None,
        )
        .unwrap();
    let options = ImportOptions {
        transforms: vec![Arc::new(plugin)],
        ..Default::default()
    };
    let s = run_import(&db.store, &name, &options).await.unwrap();
    let said = s
        .warnings
        .iter()
        .find(|w| w.contains("came twice in this run"))
        .unwrap_or_else(|| panic!("{:?}", s.warnings));
    assert!(
        said.starts_with("15 records came twice")
            && said
                .contains("(or the transform plugins made them: they returned 18 records for 3)"),
        "{said}"
    );
}
