//! The admin and analytics API: every role against every endpoint, and bad credentials.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use sluice_core::model::Role;
use support::{start_server, start_server_with_env, TestDb};

const PASSWORD: &str = "correct horse battery";

/// The bearer token `email` (whose password is [`PASSWORD`]) logs in for.
async fn token_of(base: &str, email: &str) -> String {
    let (status, body) = login(base, email, PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_string()
}

/// A server (configured by `adjust`) with an ADMIN `ops@x.io` signed in: the server, its
/// base URL and the ADMIN's token.
async fn signed_in_admin(
    db: &TestDb,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> (sluice::server::ServerHandle, String, String) {
    sluice::server::admin::create_admin_user(&db.store, "ops@x.io", PASSWORD, Role::Admin)
        .await
        .unwrap();
    let server = start_server(db, adjust).await;
    let base = format!("http://{}", server.addr);
    let token = token_of(&base, "ops@x.io").await;
    (server, base, token)
}

async fn login(base: &str, email: &str, password: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/admin/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// One export schedule, `daily` (DAILY_ANALYTICS at 02:15), writing under `dest`.
fn daily_export(raw: &mut sluice_core::config::RawConfig, dest: &str, timezone: Option<&str>) {
    raw.export.destination = dest.to_string();
    raw.schedules = vec![sluice_core::config::ScheduleSection {
        name: "daily".into(),
        kind: "DAILY_ANALYTICS".into(),
        cron: "0 15 2 * * *".into(),
        catch_up: Some(1),
        late_days_per_run: None,
        timezone: timezone.map(str::to_string),
    }];
}

/// `GET {base}{path}` as `token`: the JSON answer.
async fn get_json(base: &str, token: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET /v1/admin/jobs` as `token`: the job listed as `name` (the test fails if none is).
async fn admin_job(base: &str, token: &str, name: &str) -> Value {
    let jobs = get_json(base, token, "/v1/admin/jobs").await;
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no job `{name}` in {jobs}"))
}

#[tokio::test]
async fn every_role_against_every_endpoint() {
    let db = TestDb::initialized().await;
    for (email, role) in [
        ("admin@x.io", Role::Admin),
        ("analyst@x.io", Role::Analyst),
        ("user@x.io", Role::User),
    ] {
        sluice::server::admin::create_admin_user(&db.store, email, PASSWORD, role)
            .await
            .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("sluice-admin-{}", uuid::Uuid::new_v4().simple()));
    let dest = dir.display().to_string();
    // The server's own S3 key, read from a variable of no reserved prefix.
    let server = start_server_with_env(&db, &[("ADMIN_TEST_OWN_KEY", "own-s3-key")], |raw| {
        daily_export(raw, &dest, Some("Europe/Paris"));
        raw.s3.access_key = sluice_core::config::Secret::new("${env:ADMIN_TEST_OWN_KEY}");
        raw.s3.secret_key = sluice_core::config::Secret::new("${env:ADMIN_TEST_OWN_KEY}");
    })
    .await;
    let base = format!("http://{}", server.addr);
    let mut tokens = vec![(None, "anonymous")];
    for (email, name) in [
        ("admin@x.io", "ADMIN"),
        ("analyst@x.io", "ANALYST"),
        ("user@x.io", "USER"),
    ] {
        let (status, body) = login(&base, email, PASSWORD).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["role"], name);
        tokens.push((Some(body["token"].as_str().unwrap().to_string()), name));
    }
    // (method, path, body, least role that may call it)
    let endpoints: Vec<(Method, &str, Option<Value>, &str)> = vec![
        (Method::GET, "/v1/admin/me", None, "USER"),
        (Method::GET, "/v1/admin/jobs", None, "USER"),
        (Method::GET, "/v1/admin/configs", None, "USER"),
        (
            Method::POST,
            "/v1/admin/jobs/export:daily/run",
            None,
            "ANALYST",
        ),
        (Method::GET, "/v1/analytics/daily", None, "ANALYST"),
        (Method::GET, "/v1/analytics/top-pages", None, "ANALYST"),
        (
            Method::GET,
            "/v1/analytics/journey?userId=v1",
            None,
            "ANALYST",
        ),
        (Method::GET, "/v1/admin/users", None, "ADMIN"),
        (
            Method::POST,
            "/v1/admin/configs",
            Some(json!("CONFIG")),
            "ADMIN",
        ),
        // The config the admin applied just above.
        (Method::DELETE, "/v1/admin/configs/cfg-admin", None, "ADMIN"),
        (
            Method::POST,
            "/v1/admin/users",
            Some(json!({ "email": "new-{role}@x.io", "password": PASSWORD, "role": "USER" })),
            "ADMIN",
        ),
    ];
    let rank = |r: &str| match r {
        "USER" => 1,
        "ANALYST" => 2,
        "ADMIN" => 3,
        _ => 0,
    };
    let client = reqwest::Client::new();
    for (method, path, body, least) in &endpoints {
        for (token, role) in &tokens {
            let mut req = client.request(method.clone(), format!("{base}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            match body {
                Some(Value::String(s)) if s == "CONFIG" => {
                    req = req.body(format!(
                        "name = \"cfg-{}\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[mapping.productId]\npath = \"$.id\"\n",
                        role.to_lowercase()
                    ));
                }
                Some(b) => {
                    req = req.json(
                        &serde_json::from_str::<Value>(&b.to_string().replace("{role}", role))
                            .unwrap(),
                    );
                }
                None => {}
            }
            let status = req.send().await.unwrap().status().as_u16();
            let expected: &[u16] = if token.is_none() {
                &[401]
            } else if rank(role) < rank(least) {
                &[403]
            } else if path.ends_with("/run") {
                // Allowed; the second caller finds the first one's run still going.
                &[202, 409]
            } else {
                &[200, 201, 202]
            };
            assert!(
                expected.contains(&status),
                "{role} {method} {path}: {status}, expected {expected:?}"
            );
        }
    }
    // Jobs are listed with their time zone and next fire, read in that zone (02:15 in
    // Paris is 01:15 or 00:15 UTC, depending on daylight saving time).
    let daily = admin_job(&base, tokens[3].0.as_ref().unwrap(), "export:daily").await;
    assert_eq!(daily["timezone"], "Europe/Paris", "{daily}");
    let next = daily["nextFire"].as_str().unwrap();
    assert!(
        next.ends_with("T01:15:00.000Z") || next.ends_with("T00:15:00.000Z"),
        "{daily}"
    );
    let applied = db
        .store
        .collection("integration_configs")
        .count_documents(bson::doc! { "name": "cfg-admin" })
        .await
        .unwrap();
    assert_eq!(
        applied, 0,
        "the ADMIN's config was stored, then deleted by the ADMIN"
    );
    let deleted = db
        .store
        .collection("scheduled_runs")
        .count_documents(bson::doc! { "job": "integration:cfg-admin", "result": "config deleted" })
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    // An invalid config is a 400 naming the field. A name that looks like a path is
    // refused like any other, and nothing of it is stored (the body is validated in
    // memory, never written to a file).
    for (config, field) in [
        (
            "name = \"broken\"\ntype = \"IMPORT\"\nendpoint = \"ftp://x\"\n",
            "`endpoint`",
        ),
        (
            "name = \"../escape\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/x\"\n",
            "`name`",
        ),
        // Sluice's own settings and the cloud credentials cannot be sent to an endpoint.
        (
            "name = \"cfg-steal\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[auth]\ntype = \"API_KEY\"\nkey = \"${env:SLUICE_MONGODB_URI}\"\nheader = \"X-Key\"\n[mapping.productId]\npath = \"$.id\"\n",
            "SLUICE_MONGODB_URI",
        ),
        (
            "name = \"cfg-steal2\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[headers]\nAuthorization = \"${env:AWS_SECRET_ACCESS_KEY}\"\n[mapping.productId]\npath = \"$.id\"\n",
            "AWS_SECRET_ACCESS_KEY",
        ),
        (
            "name = \"cfg-steal3\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[headers]\nX-Token = \"${env:ADMIN_TEST_OWN_KEY}\"\n[mapping.productId]\npath = \"$.id\"\n",
            // Refused as the server's own secret, not for being unset here.
            "`${env:ADMIN_TEST_OWN_KEY}`: configs applied through the API may not reference",
        ),
        // Any other variable of the server's environment: none is listed by default.
        (
            "name = \"cfg-steal4\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[headers]\nX-Leak = \"${env:PATH}\"\n[mapping.productId]\npath = \"$.id\"\n",
            "`[security] api_config_env` lists, and it lists none",
        ),
        // A credential in the endpoint's query would be stored in clear and shown to
        // every USER: refused, pointing at `auth.query`.
        (
            "name = \"cfg-query\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x?page=1&api_key=abc123\"\n[mapping.productId]\npath = \"$.id\"\n",
            "query = \"api_key\"",
        ),
        // Loopback, private and cloud-metadata addresses are the operator's to allow.
        (
            "name = \"cfg-private\"\ntype = \"IMPORT\"\nendpoint = \"http://169.254.169.254/latest\"\nallow_private_network = true\n[mapping.productId]\npath = \"$.id\"\n",
            "`allow_private_network`",
        ),
        // An endpoint every run would refuse (a literal loopback address, or `localhost`,
        // for the endpoint or the token URL, without `allow_private_network`): refused
        // now, with the way out this route has.
        (
            "name = \"cfg-local\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:18901/x\"\n[mapping.productId]\npath = \"$.id\"\n",
            "`endpoint`: `http://127.0.0.1:18901/x` is not a public address (loopback)",
        ),
        // A host the HTTP client would read as another (`%`-escapes decoded, full-width
        // letters mapped to ASCII): refused, whatever it resolves to.
        (
            "name = \"cfg-escaped\"\ntype = \"IMPORT\"\nendpoint = \"http://%31%32%37.0.0.1:18901/x\"\n[mapping.productId]\npath = \"$.id\"\n",
            "no `%`-escapes",
        ),
        (
            "name = \"cfg-wide\"\ntype = \"IMPORT\"\nendpoint = \"http://\u{ff4c}ocalhost:18901/x\"\n[mapping.productId]\npath = \"$.id\"\n",
            "a host of ASCII letters",
        ),
        // A plugin this deployment does not have: refused now, not at the first run.
        (
            "name = \"cfg-plugin\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\ntransforms = [\"no-such-plugin\"]\n[mapping.productId]\npath = \"$.id\"\n",
            "no-such-plugin",
        ),
    ] {
        let r = client
            .post(format!("{base}/v1/admin/configs"))
            .bearer_auth(tokens[1].0.as_ref().unwrap())
            .body(config)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body: Value = r.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains(field), "{body}");
    }
    let stored = db
        .store
        .collection("integration_configs")
        .count_documents(bson::doc! { "name": { "$in": ["../escape", "cfg-plugin", "cfg-steal", "cfg-steal2", "cfg-steal3", "cfg-query", "cfg-private", "cfg-escaped", "cfg-wide"] } })
        .await
        .unwrap();
    assert_eq!(stored, 0);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_browsers_may_patch() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    let client = reqwest::Client::new();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = client
            .get(format!("{base}/v1/admin/me"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{scheme}");
    }
    let r = client
        .get(format!("{base}/v1/admin/me"))
        .header("authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A browser console changing a user (PATCH), or removing a config (DELETE), gets
    // past the preflight.
    for (path, method) in [("users/a@x.io", "PATCH"), ("configs/x", "DELETE")] {
        let r = client
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/admin/{path}"))
            .header("origin", "https://console.example")
            .header("access-control-request-method", method)
            .send()
            .await
            .unwrap();
        let methods = r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap();
        assert!(methods.contains(method), "{method}: {methods}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_env_allowlist_limits_what_api_configs_may_reference() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |raw| {
        raw.security.api_config_env = vec!["SHOP_*".into(), "CRM_TOKEN".into()];
    })
    .await;
    let apply = |var: &str| {
        let config = format!("name = \"cfg-env\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[headers]\nX-Token = \"${{env:{var}}}\"\n[mapping.productId]\npath = \"$.id\"\n");
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/admin/configs"))
            .bearer_auth(&token)
            .body(config)
            .send();
        async move {
            let r = r.await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<Value>().await.unwrap()["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        }
    };
    // Set in every process, and not listed: refused before it is read.
    let (status, message) = apply("PATH").await;
    assert_eq!(status, 400);
    assert!(
        message.contains("api_config_env") && message.contains("PATH"),
        "{message}"
    );
    // Listed (by prefix or name): passes the list, and fails only for being unset here.
    for var in ["SHOP_KEY_UNSET_IN_TESTS", "CRM_TOKEN"] {
        let (status, message) = apply(var).await;
        assert_eq!(status, 400);
        assert!(message.contains("to be set"), "{var}: {message}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn applying_a_config_says_whether_it_was_created_changed_or_already_so() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    let apply = |path: &str| {
        let config = format!("name = \"cfg-same\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/{path}\"\n[mapping.productId]\npath = \"$.id\"\n");
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/admin/configs"))
            .bearer_auth(&token)
            .body(config)
            .send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = apply("x").await;
    assert_eq!(
        (status, &body["created"], &body["changed"]),
        (201, &json!(true), &json!(true)),
        "{body}"
    );
    let (status, body) = apply("x").await;
    assert_eq!(
        (status, &body["created"], &body["changed"]),
        (200, &json!(false), &json!(false)),
        "{body}"
    );
    let (status, body) = apply("y").await;
    assert_eq!(
        (status, &body["created"], &body["changed"]),
        (200, &json!(false), &json!(true)),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_email_fails_whatever_the_password() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    // Even with the password the stand-in hash for unknown emails was made from: counted
    // as failing, so it is locked out like a known email (not left uncounted, which told
    // an unknown email from a known one and let its guesses through unlimited).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(login(&base, "ghost@x.io", "no such user").await.0);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429]);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_credentials_never_reveal_whether_an_email_exists_and_are_rate_limited() {
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "ops@x.io", PASSWORD, Role::Admin)
        .await
        .unwrap();
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let (s1, wrong_password) = login(&base, "ops@x.io", "not the password").await;
    let (s2, unknown_email) = login(&base, "nobody@x.io", "not the password").await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong_password, unknown_email, "the same answer either way");
    for _ in 0..4 {
        login(&base, "ops@x.io", "still wrong").await;
    }
    let (status, body) = login(&base, "ops@x.io", PASSWORD).await;
    assert_eq!(
        status, 429,
        "locked out after repeated failures, even with the right password: {body}"
    );
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/admin/me"))
        .bearer_auth("forged-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Weak passwords, passwords bcrypt would truncate and duplicate users are refused.
    for password in ["short".to_string(), "x".repeat(73)] {
        assert!(sluice::server::admin::create_admin_user(
            &db.store,
            "a@x.io",
            &password,
            Role::User
        )
        .await
        .is_err());
    }
    let dup = sluice::server::admin::create_admin_user(&db.store, "OPS@x.io", PASSWORD, Role::User)
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("already exists"), "{dup}");
    // A body of the wrong shape, or not JSON at all, gets the API's JSON error shape.
    let client = reqwest::Client::new();
    for (req, status, code) in [
        (
            client
                .post(format!("{base}/v1/admin/login"))
                .json(&json!({ "email": "ops@x.io" })),
            422,
            "invalid_body",
        ),
        (
            client
                .post(format!("{base}/v1/admin/login"))
                .body("email=ops@x.io"),
            415,
            "unsupported_media_type",
        ),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let body: Value = r.json().await.expect("a JSON error");
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_config_gets_every_error_found_each_at_its_line() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    // A check's error, an unknown field, a value of the wrong type, a secret from a
    // variable the API may not read, and a loopback endpoint: all five, in the file's
    // order.
    let config = "name = \"cfg-many\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:18901/x\"\ntimezone = \"Mars/Olympus\"\n\n[auth]\ntype = \"API_KEY\"\nheader = \"X-Key\"\nkey = \"${env:SLUICE_MONGODB_URI}\"\n\n[source]\ntimeout_seconds = \"slow\"\n\n[mapping.productId]\npath = \"$.id\"\nrequird = true\n";
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/admin/configs"))
        .bearer_auth(&token)
        .body(config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_config", "{body}");
    let errors: Vec<&str> = body["errors"]
        .as_array()
        .expect("a list of errors")
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 5, "{body}");
    let errors = &errors[1..];
    assert!(
        body["errors"][0].as_str().unwrap().starts_with(
            "request body:3: field `endpoint`: `http://127.0.0.1:18901/x` is not a public address"
        ),
        "{body}"
    );
    assert!(
        errors[0].starts_with("request body:4: field `timezone`"),
        "{body}"
    );
    assert!(
        errors[1]
            .starts_with("request body:9: field `auth.key`: `${env:SLUICE_MONGODB_URI}`: configs applied through the API may not"),
        "{body}"
    );
    assert!(
        errors[2].starts_with("request body:12: field `source.timeout_seconds`: invalid type"),
        "{body}"
    );
    assert!(
        errors[3].starts_with("request body:16: field `mapping.productId.requird`: unknown field"),
        "{body}"
    );
    assert_eq!(body["message"], body["errors"][0], "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_user_and_an_unreadable_config_body_get_their_own_json_errors() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    let client = reqwest::Client::new();
    let user = json!({ "email": "OPS@x.io", "password": PASSWORD, "role": "USER" });
    let configs = format!("{base}/v1/admin/configs");
    for (req, status, code) in [
        // The request is fine; the user exists: a conflict, not a bad request.
        (
            client.post(format!("{base}/v1/admin/users")).json(&user),
            409,
            "user_exists",
        ),
        (
            client.post(&configs).body(vec![b'n', b'a', 0xff, 0xfe]),
            400,
            "invalid_body",
        ),
        (
            // Too large: the code the tracking API answers too.
            client.post(&configs).body("#".repeat(300 * 1024)),
            413,
            "payload_too_large",
        ),
        // JSON of the wrong shape: 422, as the README says of every admin body.
        (
            client
                .post(format!("{configs}/any/active"))
                .json(&json!({ "isActive": "no" })),
            422,
            "invalid_body",
        ),
    ] {
        let r = req.bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        // Not kept by a cache, a refusal before any route (the 413) included.
        assert_eq!(r.headers()["cache-control"], "no-store", "{status}");
        let body: Value = r.json().await.expect("a JSON error");
        assert_eq!(body["error"], code, "{body}");
    }
    // Nor an admin path no route takes.
    let r = client
        .get(format!("{base}/v1/admin/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.headers()["cache-control"], "no-store");
    server.shutdown().await;
}

#[tokio::test]
async fn analytics_queries_beyond_the_cap_are_answered_busy_until_one_ends() {
    use std::sync::atomic::Ordering;
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "an@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    // `aggregate: "events"` as the server receives it: key, string length 7, value.
    let (uri, hold, held) = support::holding_mongo_proxy(b"aggregate\0\x07\0\0\0events\0").await;
    let store = support::store_via(&uri, &db.name).await;
    let config = support::test_config(&db.name, |_| {});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = sluice::server::start(config, store, listener, false)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let token = token_of(&base, "an@x.io").await;
    let get = |path: &'static str| {
        let (url, token) = (format!("{base}{path}"), token.clone());
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            (
                status,
                retry,
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    hold.store(true, Ordering::SeqCst);
    let cap = sluice::server::admin::ANALYTICS_QUERIES;
    let running: Vec<_> = (0..cap)
        .map(|_| tokio::spawn(get("/v1/analytics/top-pages")))
        .collect();
    let waited = std::time::Instant::now();
    while held.load(Ordering::SeqCst) < cap {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(20),
            "queries never reached the server"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let at_once = std::time::Duration::from_secs(10);
    let (status, retry, body) = tokio::time::timeout(at_once, get("/v1/analytics/top-pages"))
        .await
        .expect("answered at once, not queued behind the running queries");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "busy", "{body}");
    assert!(retry.is_some());
    // A caller that gives up does not free its place: the query still runs on the server.
    running[0].abort();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let journey = tokio::time::timeout(at_once, get("/v1/analytics/journey?userId=u1"))
        .await
        .expect("answered at once");
    assert_eq!(journey.0, 503, "{:?}", journey.2);

    hold.store(false, Ordering::SeqCst);
    for r in running.into_iter().skip(1) {
        assert_eq!(r.await.unwrap().0, 200);
    }
    let waited = std::time::Instant::now();
    loop {
        let (status, _, body) = get("/v1/analytics/top-pages").await;
        if status == 200 {
            break;
        }
        // The aborted caller's query may still be finishing.
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(20),
            "{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn analytics_parameters_are_validated() {
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "an@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let token = token_of(&base, "an@x.io").await;
    let client = reqwest::Client::new();
    let long_id = format!("/v1/analytics/journey?userId={}", "x".repeat(257));
    // Each answered 400 with what is wrong with it (`""`: its wording is not checked).
    for (path, said) in [
        ("/v1/analytics/daily?from=yesterday", ""),
        ("/v1/analytics/top-pages?limit=0", ""),
        ("/v1/analytics/journey", ""),
        (
            "/v1/analytics/daily?from=2026-01-01&to=2025-01-01",
            "`from` (2026-01-01) is after `to` (2025-01-01)",
        ),
        // 367 days, counting both ends.
        (
            "/v1/analytics/daily?from=2024-01-01&to=2025-01-01",
            "is 367 days; a range holds at most 366",
        ),
        // Days chrono reads but the window arithmetic would overflow on.
        ("/v1/analytics/daily?to=-262143-01-01", ""),
        (
            "/v1/analytics/daily?from=%2B262142-12-31&to=%2B262142-12-31",
            "",
        ),
        // JSON errors for a query string that does not parse, and a year at most.
        ("/v1/analytics/top-pages?limit=abc", ""),
        ("/v1/analytics/top-pages?from=2999-01-01", "is after today"),
        (
            "/v1/analytics/top-pages?from=2020-01-01",
            "must be within the last 366 days",
        ),
        // `from` alone after today, the default `to`: said so.
        ("/v1/analytics/daily?from=2999-01-01", "is after today ("),
        // Parameters an endpoint does not read are refused, not ignored.
        (
            "/v1/analytics/daily?from=2026-01-01&tz=Europe/Berlin",
            "`tz` is no parameter of this endpoint, which reads `from`, `to` (days are UTC)",
        ),
        (
            "/v1/analytics/top-pages?from=2026-01-01&to=2026-01-02",
            "`to` is no parameter",
        ),
        (
            "/v1/analytics/journey?userId=u&limit=5&from=2026-01-01",
            "`limit`, `from` are no parameter of this endpoint, which reads `userId`",
        ),
        // An id longer than any stored is said so, not "required".
        (
            long_id.as_str(),
            "`userId` is 257 bytes; ids are at most 256",
        ),
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "invalid_parameter");
        assert!(
            body["message"].as_str().unwrap().contains(said),
            "{path}: {body}"
        );
    }
    // `to` alone: the week ending it, from 1970 on (a day a parameter may name).
    let r = client
        .get(format!("{base}/v1/analytics/daily?to=1970-01-03"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let rows: Value = r.json().await.unwrap();
    let dates: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["date"].as_str().unwrap())
        .collect();
    assert_eq!(dates, ["1970-01-01", "1970-01-02", "1970-01-03"], "{rows}");
    // 366 days, a leap year: accepted.
    let r = client
        .get(format!(
            "{base}/v1/analytics/daily?from=2024-01-01&to=2024-12-31"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_manual_run_is_named_in_the_answer_and_its_outcome_is_listed() {
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "analyst@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-manual-{}", uuid::Uuid::new_v4().simple()));
    let dest = dir.display().to_string();
    let server = start_server(&db, |raw| daily_export(raw, &dest, None)).await;
    let base = format!("http://{}", server.addr);
    let (_, body) = login(&base, "analyst@x.io", PASSWORD).await;
    let token = body["token"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let started: Value = client
        .post(format!("{base}/v1/admin/jobs/export:daily/run"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = started["runId"]
        .as_str()
        .expect("the answer names the run")
        .to_string();
    assert!(run.starts_with("export:daily@manual-"), "{run}");
    let mut last = Value::Null;
    for _ in 0..100 {
        last = admin_job(&base, &token, "export:daily").await;
        if last["lastStatus"] == "COMPLETED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(last["lastRun"], run.as_str(), "{last}");
    assert_eq!(last["lastStatus"], "COMPLETED", "{last}");
    let recorded = db
        .store
        .collection("scheduled_runs")
        .find_one(bson::doc! { "_id": &run })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.get_bool("manual"), Ok(true));
    assert!(
        recorded.get_str("result").unwrap().contains(" run"),
        "{recorded}"
    );

    let post = |path: String| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
    };
    // An integration config with no schedule can be run by hand too (by its bare name).
    let file = sluice_core::integration::parse_file(
        "t",
        "name = \"feed\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/x\"\n[mapping.productId]\npath = \"$.id\"\n",
    )
    .unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    let r = post("/v1/admin/jobs/feed/run".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["runId"]
            .as_str()
            .unwrap()
            .starts_with("integration:feed@manual-"),
        "{body}"
    );
    // Its run shows in the job list, with no cron.
    let feed = admin_job(&base, &token, "integration:feed").await;
    assert_eq!(feed["lastRun"], body["runId"], "{feed}");
    assert!(feed["cron"].is_null() && feed["error"].is_null(), "{feed}");
    assert!(feed["note"].as_str().unwrap().contains("by hand"), "{feed}");
    let r = post("/v1/admin/jobs/integration:nope/run".into())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // Days asked for would be ignored (a backfill is the CLI's): refused, in a body or the
    // query, before anything runs.
    for r in [
        client
            .post(format!("{base}/v1/admin/jobs/export:daily/run"))
            .bearer_auth(&token)
            .json(&json!({ "from": "2026-01-01", "to": "2026-01-02" })),
        client
            .post(format!(
                "{base}/v1/admin/jobs/export:daily/run?from=2026-01-01"
            ))
            .bearer_auth(&token),
    ] {
        let r = r.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body: Value = r.json().await.unwrap();
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("--from DAY --to DAY"),
            "{body}"
        );
    }
    // A config an admin turned off is not run by hand either.
    db.store
        .collection("integration_configs")
        .update_one(
            bson::doc! { "name": "feed" },
            bson::doc! { "$set": { "isActive": false } },
        )
        .await
        .unwrap();
    let r = post("/v1/admin/jobs/feed/run".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "config_inactive", "{body}");
    // While another run of the job holds its lease, a second one is refused.
    db.store
        .collection("scheduled_runs")
        .insert_one(bson::doc! {
            "_id": "export:daily@2026-12-03T02:15:00Z", "job": "export:daily", "status": "RUNNING",
            "owner": "replica-b",
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 60_000),
        })
        .await
        .unwrap();
    let r = post("/v1/admin/jobs/export:daily/run".into())
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "already_running");
    assert!(
        body["message"].as_str().unwrap().contains("replica-b"),
        "{body}"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn concurrent_guesses_count_as_they_arrive_and_limits_are_per_client_email_and_both() {
    let db = TestDb::initialized().await;
    for email in ["ops@x.io", "dev@x.io"] {
        sluice::server::admin::create_admin_user(&db.store, email, PASSWORD, Role::Admin)
            .await
            .unwrap();
    }
    let server = start_server(&db, |raw| {
        raw.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let from = |ip: &'static str, email: &'static str, password: &'static str| {
        client
            .post(format!("{base}/v1/admin/login"))
            .header("x-forwarded-for", ip)
            .json(&json!({ "email": email, "password": password }))
            .send()
    };
    // 20 guesses at once: only the first 5 are checked, however long a check takes.
    let answers = futures_util::future::join_all(
        (0..20).map(|_| from("203.0.113.1", "ops@x.io", "a wrong guess")),
    )
    .await;
    let mut statuses: Vec<u16> = answers
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [vec![401; 5], vec![429; 15]].concat());
    // Another client behind the same proxy is not locked out by the guesser...
    let r = from("198.51.100.2", "dev@x.io", PASSWORD).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // ...nor is the guessed email locked out of other clients: one stranger's guesses do
    // not lock a named admin out.
    let r = from("198.51.100.2", "ops@x.io", PASSWORD).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // One client trying many emails is stopped after 20 failures, whatever the emails.
    let mut statuses = Vec::new();
    for i in 0..16 {
        let email: &'static str = format!("sprayed{i}@x.io").leak();
        statuses.push(
            from("203.0.113.1", email, "a wrong guess")
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [vec![401; 15], vec![429]].concat());
    // Addresses of one IPv6 /64 are one client.
    let r = from("2001:db8:0:1::1", "dev@x.io", "a wrong guess")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    for _ in 0..4 {
        from("2001:db8:0:1::2", "dev@x.io", "a wrong guess")
            .await
            .unwrap();
    }
    let r = from("2001:db8:0:1::3", "dev@x.io", PASSWORD).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    // Guesses at one email spread over many clients lock it after 50, from anywhere.
    for n in 0..9u8 {
        let ip: &'static str = format!("192.0.2.{n}").leak();
        for _ in 0..5 {
            from(ip, "ops@x.io", "a wrong guess").await.unwrap();
        }
    }
    let r = from("198.51.100.9", "ops@x.io", PASSWORD).await.unwrap();
    assert_eq!(r.status().as_u16(), 429, "5 + 45 failures");
    server.shutdown().await;
}

#[tokio::test]
async fn two_admins_demoting_each_other_at_once_leave_one_admin() {
    let db = TestDb::initialized().await;
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let users = db.store.collection("admin_users");
    for round in 0..5 {
        let (a, b) = (format!("a{round}@x.io"), format!("b{round}@x.io"));
        for email in [&a, &b] {
            sluice::server::admin::create_admin_user(&db.store, email, PASSWORD, Role::Admin)
                .await
                .unwrap();
        }
        let token_a = login(&base, &a, PASSWORD).await.1["token"]
            .as_str()
            .unwrap()
            .to_string();
        let token_b = login(&base, &b, PASSWORD).await.1["token"]
            .as_str()
            .unwrap()
            .to_string();
        let demote = |token: String, whom: String| {
            let url = format!("{base}/v1/admin/users/{whom}");
            async move {
                let r = reqwest::Client::new()
                    .patch(url)
                    .bearer_auth(token)
                    .json(&json!({ "role": "USER" }))
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            }
        };
        let (by_a, by_b) = tokio::join!(demote(token_a, b.clone()), demote(token_b, a.clone()));
        let mut outcomes = [by_a, by_b];
        outcomes.sort();
        // One demotion happened; the other admin had lost the right to make theirs.
        assert_eq!(outcomes, [200, 403], "round {round}");
        let admins = users
            .count_documents(bson::doc! { "email": { "$in": [&a, &b] }, "role": "ADMIN" })
            .await
            .unwrap();
        assert_eq!(admins, 1, "round {round}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn role_changes_deactivation_and_logout_take_effect_on_the_next_request() {
    let db = TestDb::initialized().await;
    for (email, role) in [("admin@x.io", Role::Admin), ("an@x.io", Role::Analyst)] {
        sluice::server::admin::create_admin_user(&db.store, email, PASSWORD, role)
            .await
            .unwrap();
    }
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let admin = login(&base, "admin@x.io", PASSWORD).await.1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let analyst = login(&base, "an@x.io", PASSWORD).await.1["token"]
        .as_str()
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    let daily = || {
        client
            .get(format!("{base}/v1/analytics/daily"))
            .bearer_auth(&analyst)
            .send()
    };
    let change = |email: &str, body: Value| {
        client
            .patch(format!("{base}/v1/admin/users/{email}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    assert_eq!(daily().await.unwrap().status().as_u16(), 200);

    // Any case, as the CLI's `--role` takes it.
    let r = change("an@x.io", json!({ "role": "user" })).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let changed: Value = r.json().await.unwrap();
    assert_eq!(changed["role"], "USER", "{changed}");
    // Members never set are said null, as the list says them.
    assert!(
        changed.get("passwordChangedAt").is_some_and(Value::is_null),
        "{changed}"
    );
    assert!(changed.get("password").is_none(), "{changed}");
    assert_eq!(
        daily().await.unwrap().status().as_u16(),
        403,
        "the token issued as ANALYST now acts as USER"
    );

    let r = change("an@x.io", json!({ "isActive": false }))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(daily().await.unwrap().status().as_u16(), 401);
    let tokens = db
        .store
        .collection("admin_tokens")
        .count_documents(bson::doc! { "email": "an@x.io" })
        .await
        .unwrap();
    assert_eq!(tokens, 0, "a deactivated user's tokens are deleted");
    assert_eq!(login(&base, "an@x.io", PASSWORD).await.0, 401);
    // A token stored while the user was being deactivated (a login checked just
    // before): as if it had been, one made now and the user deactivated behind it.
    // (Written to the store directly: through the API a deactivation deletes tokens.)
    let users = db.store.collection("admin_users");
    let set_active = |active: bool| {
        users.update_one(
            bson::doc! { "email": "an@x.io" },
            bson::doc! { "$set": { "isActive": active } },
        )
    };
    set_active(true).await.unwrap();
    let late = login(&base, "an@x.io", PASSWORD).await.1["token"]
        .as_str()
        .unwrap()
        .to_string();
    set_active(false).await.unwrap();
    let r = change("an@x.io", json!({ "isActive": true }))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let me_late = client
        .get(format!("{base}/v1/admin/me"))
        .bearer_auth(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(
        me_late.status().as_u16(),
        401,
        "reactivated, the user signs in anew"
    );
    assert_eq!(login(&base, "an@x.io", PASSWORD).await.0, 200);

    for (email, body, status) in [
        ("admin@x.io", json!({ "isActive": false }), 400),
        ("nobody@x.io", json!({ "role": "USER" }), 404),
        // The wrong shape, as for any body that deserializes wrongly.
        ("an@x.io", json!({}), 422),
        ("an@x.io", json!({ "role": "ROOT" }), 400),
        // A password reset to one Sluice does not take (12 to 72 bytes).
        ("an@x.io", json!({ "password": "x" }), 400),
        ("an@x.io", json!({ "colour": "red" }), 422),
    ] {
        let r = change(email, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{email} {body}");
    }

    let me = || {
        client
            .get(format!("{base}/v1/admin/me"))
            .bearer_auth(&admin)
            .send()
    };
    let r = me().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Nothing of the admin API is kept by a cache.
    assert_eq!(r.headers()["cache-control"], "no-store");
    let r = client
        .post(format!("{base}/v1/admin/logout"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    // A token that ended says why, and how to authenticate (RFC 6750).
    let r = me().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert!(
        body["message"].as_str().unwrap().contains("sign in again"),
        "{body}"
    );
    // No token at all: how to get one.
    let r = client
        .get(format!("{base}/v1/admin/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("POST /v1/admin/login"),
        "{body}"
    );
    server.shutdown().await;
}

/// The daily and top-pages answers equal a count made here from the events sent: distinct
/// visitors and sessions per day, views and distinct visitors per page.
#[tokio::test]
async fn daily_and_top_pages_count_what_was_stored() {
    use sluice_connectors::mongo::{EventWriter, WriterOptions};
    use sluice_core::model::{Event, EventType};
    use std::collections::{HashMap, HashSet};
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "an@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    let day = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let start = day
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    let events: Vec<Event> = (0..120usize)
        .map(|i| Event {
            event_id: format!("e{i}"),
            user_id: format!("u{}", i % 7),
            session_id: format!("s{}", i % 11),
            event_type: match i % 3 {
                0 if i % 2 == 0 => EventType::Purchase,
                0 => EventType::Click,
                _ => EventType::PageView,
            },
            timestamp: bson::DateTime::from_millis(start + i as i64 * 60_000),
            page_url: (i % 3 != 0).then(|| format!("/p{}", i % 5)),
            id: None,
            // Purchases in two currencies, one without: 20 of them.
            properties: match i % 3 {
                0 if i % 2 == 0 => match i % 4 {
                    0 => bson::doc! { "amount": 0.1, "currency": "EUR" },
                    _ => bson::doc! { "amount": 2.5 },
                },
                _ => bson::Document::new(),
            },
            metadata: Default::default(),
            referrer: None,
            duration: None,
            created_at: bson::DateTime::now(),
            updated_at: bson::DateTime::now(),
        })
        .collect();
    EventWriter::new(db.store.clone(), WriterOptions::default())
        .write(&events)
        .await
        .unwrap();
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let token = token_of(&base, "an@x.io").await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .send();
        async move { r.await.unwrap().json::<Value>().await.unwrap() }
    };

    let daily = get(format!("/v1/analytics/daily?from={day}&to={day}")).await;
    let users: HashSet<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
    let sessions: HashSet<&str> = events.iter().map(|e| e.session_id.as_str()).collect();
    // Purchases i = 0, 6, 12, ...: EUR when i % 4 == 0 (10 of them), none otherwise (10).
    assert_eq!(
        daily,
        json!([{ "date": day.to_string(), "events": 120, "users": users.len(), "sessions": sessions.len(),
                 "purchases": 20, "revenue": [
                     { "currency": null, "purchases": 10, "revenueMicros": 25_000_000, "revenue": 25.0 },
                     { "currency": "EUR", "purchases": 10, "revenueMicros": 1_000_000, "revenue": 1.0 },
                 ] }])
    );
    // A day without events has its row too, with zeros.
    let (before, after) = (day.pred_opt().unwrap(), day.succ_opt().unwrap());
    let three = get(format!("/v1/analytics/daily?from={before}&to={after}")).await;
    let zero = |d: chrono::NaiveDate| json!({ "date": d.to_string(), "events": 0, "users": 0, "sessions": 0, "purchases": 0, "revenue": [] });
    assert_eq!(three, json!([zero(before), daily[0].clone(), zero(after)]));

    let top = get(format!("/v1/analytics/top-pages?from={day}&limit=3")).await;
    let mut pages: HashMap<&str, (i64, HashSet<&str>)> = HashMap::new();
    for e in events.iter().filter(|e| e.page_url.is_some()) {
        let p = pages.entry(e.page_url.as_deref().unwrap()).or_default();
        p.0 += 1;
        p.1.insert(&e.user_id);
    }
    let mut expected: Vec<(&str, i64, usize)> = pages
        .iter()
        .map(|(url, (views, users))| (*url, *views, users.len()))
        .collect();
    expected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let expected: Vec<Value> = expected
        .iter()
        .take(3)
        .map(|(url, views, users)| json!({ "pageUrl": url, "views": views, "uniqueUsers": users }))
        .collect();
    assert_eq!(top, json!(expected));
    server.shutdown().await;
}

#[tokio::test]
async fn a_fire_no_replica_ran_is_listed_as_missed_and_a_failure_with_its_reason() {
    let db = TestDb::initialized().await;
    sluice::server::admin::create_admin_user(&db.store, "ops@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    let cron = support::apply_missed_nightly(&db).await;
    // An export schedule of the config file, at the same time: it has no start of its
    // own, so an instant is missed only if the one before it was claimed.
    let dir = std::env::temp_dir().join(format!("sluice-missed-{}", uuid::Uuid::new_v4().simple()));
    let dest = dir.display().to_string();
    let export_cron = cron.clone();
    let server = start_server(&db, move |raw| {
        daily_export(raw, &dest, None);
        raw.schedules[0].cron = export_cron.clone();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let (_, body) = login(&base, "ops@x.io", PASSWORD).await;
    let token = body["token"].as_str().unwrap().to_string();
    let listed = |name: &'static str| admin_job(&base, &token, name);
    let export = listed("export:daily").await;
    assert!(
        export["missed"].is_null(),
        "never claimed, a new schedule: {export}"
    );
    let job = listed("integration:nightly").await;
    let missed = job["missed"].as_str().unwrap_or_else(|| panic!("{job}"));
    assert!(missed.contains("no run was recorded"), "{job}");
    assert!(
        missed.contains("sluice jobs run integration:nightly"),
        "{job}"
    );
    let job_def = sluice_jobs::schedule::ScheduledJob {
        name: "integration:nightly".into(),
        cron: cron.clone(),
        timezone: None,
        since: None,
    };
    let fire = sluice_jobs::schedule::previous_fire(&job_def, chrono::Utc::now()).unwrap();
    let runs = db.store.collection("scheduled_runs");
    // The export schedule's instant the day before was claimed: it was in effect then,
    // and its latest instant is missed.
    let day_before = fire - chrono::Duration::days(1);
    runs.insert_one(bson::doc! {
        "_id": sluice_jobs::schedule::run_id("export:daily", day_before),
        "job": "export:daily",
        "scheduledFor": bson::DateTime::from_chrono(day_before),
        "status": "COMPLETED",
    })
    .await
    .unwrap();
    let export = listed("export:daily").await;
    assert!(export["missed"].as_str().is_some(), "{export}");
    // A run by hand since makes up for it.
    runs.insert_one(bson::doc! {
        "_id": "integration:nightly@manual-1", "job": "integration:nightly",
        "scheduledFor": bson::DateTime::now(), "status": "COMPLETED", "manual": true,
    })
    .await
    .unwrap();
    let job = listed("integration:nightly").await;
    assert!(job["missed"].is_null(), "{job}");
    runs.delete_one(bson::doc! { "_id": "integration:nightly@manual-1" })
        .await
        .unwrap();
    // Its fire recorded as failed: not missed, and the reason is shown.
    runs.insert_one(bson::doc! {
        "_id": sluice_jobs::schedule::run_id("integration:nightly", fire),
        "job": "integration:nightly",
        "scheduledFor": bson::DateTime::from_chrono(fire),
        "status": "FAILED",
        "error": "the API answered 401",
        "endedAt": bson::DateTime::from_chrono(fire + chrono::Duration::seconds(3)),
    })
    .await
    .unwrap();
    let job = listed("integration:nightly").await;
    assert!(job["missed"].is_null(), "{job}");
    assert_eq!(job["lastStatus"], "FAILED", "{job}");
    assert_eq!(job["lastError"], "the API answered 401", "{job}");
    assert!(job["lastEndedAt"].is_string(), "{job}");
    assert!(job["running"].is_null(), "{job}");
    // A run going, waiting for a run slot, while the latest fire was SKIPPED for it: the
    // listing says so, not only "SKIPPED".
    let later = fire + chrono::Duration::seconds(1);
    runs.insert_many([
        bson::doc! {
            "_id": "integration:nightly@going", "job": "integration:nightly",
            "scheduledFor": bson::DateTime::from_chrono(fire), "status": "RUNNING",
            "waitingSince": bson::DateTime::now(),
            "expiresAt": bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 60_000),
        },
        bson::doc! {
            "_id": sluice_jobs::schedule::run_id("integration:nightly", later),
            "job": "integration:nightly", "scheduledFor": bson::DateTime::from_chrono(later),
            "status": "SKIPPED", "reason": "the run `integration:nightly@going` is waiting for a run slot",
        },
    ])
    .await
    .unwrap();
    let job = listed("integration:nightly").await;
    assert_eq!(job["lastStatus"], "SKIPPED", "{job}");
    assert_eq!(
        job["running"],
        serde_json::json!({ "run": "integration:nightly@going", "waitingForSlot": true }),
        "{job}"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `sluice admin create-user`, the way the first admin is made: the password from
/// `SLUICE_ADMIN_PASSWORD` or one piped line, ADMIN by default; the user can then sign
/// in with it; a second user of the same email is refused, creating nothing.
#[tokio::test]
async fn the_cli_creates_admin_users_who_can_sign_in() {
    let db = TestDb::initialized().await;
    let dir = std::env::temp_dir().join(format!(
        "sluice-admin-cli-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[mongodb]\nuri = \"{}\"\ndatabase = \"{}\"\n",
            support::mongo_uri(),
            db.name
        ),
    )
    .unwrap();
    let create = |email: &'static str,
                  role: Option<&'static str>,
                  env: Option<&'static str>,
                  stdin: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut cmd = support::sluice_command();
            cmd.arg("--config")
                .arg(&config)
                .args(["admin", "create-user", "--email", email])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            if let Some(role) = role {
                cmd.args(["--role", role]);
            }
            if let Some(password) = env {
                cmd.env("SLUICE_ADMIN_PASSWORD", password);
            }
            let mut child = cmd.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
    };
    let out = create("Boss@X.io", None, Some(PASSWORD), "").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "created ADMIN boss@x.io"
    );
    let piped = "a piped password line\n";
    let out = create("analyst@x.io", Some("analyst"), None, piped)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A role that does not exist is a command line that cannot be read.
    let out = create("root@x.io", Some("ROOT"), Some(PASSWORD), "")
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("expected one of ADMIN, ANALYST, USER, got `ROOT`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same email again (any case): refused, and the first user's password stands.
    let out = create("BOSS@x.io", None, Some("another password here"), "")
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let (status, body) = login(&base, "boss@x.io", PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = login(&base, "analyst@x.io", "a piped password line").await;
    assert_eq!(status, 200, "the piped line, without its newline: {body}");
    let (status, _) = login(&base, "boss@x.io", "another password here").await;
    assert_eq!(status, 401);
    let roles: Vec<(String, String)> = {
        use futures_util::TryStreamExt;
        db.store
            .collection("admin_users")
            .find(bson::doc! {})
            .sort(bson::doc! { "email": 1 })
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .map(|u| {
                assert!(!u.to_string().contains(PASSWORD), "stored hashed: {u}");
                (
                    u.get_str("email").unwrap().to_string(),
                    u.get_str("role").unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        roles,
        [
            ("analyst@x.io".to_string(), "ANALYST".to_string()),
            ("boss@x.io".to_string(), "ADMIN".to_string())
        ]
    );
    // A forgotten password is set anew from the command line; the user's sessions end.
    let boss = token_of(&base, "boss@x.io").await;
    let set_password = |email: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            support::sluice_command()
                .arg("--config")
                .arg(&config)
                .args(["admin", "set-password", "--email", email])
                .env("SLUICE_ADMIN_PASSWORD", "set from the shell")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let out = set_password("BOSS@x.io").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(me_status(&base, &boss).await, 401);
    assert_eq!(login(&base, "boss@x.io", PASSWORD).await.0, 401);
    assert_eq!(login(&base, "boss@x.io", "set from the shell").await.0, 200);
    let out = set_password("nobody@x.io").await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no user `nobody@x.io`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn admin_answers_write_times_as_rfc_3339_text() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    sluice::server::admin::create_admin_user(&db.store, "new@x.io", PASSWORD, Role::User)
        .await
        .unwrap();
    let users = get_json(&base, &token, "/v1/admin/users").await;
    let by_email = |email: &str| {
        users
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["email"] == email)
            .cloned()
            .unwrap_or_else(|| panic!("{users}"))
    };
    let user = by_email("ops@x.io");
    let created = user["createdAt"]
        .as_str()
        .unwrap_or_else(|| panic!("{user}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{user}"
    );
    // Never signed in: said as null, not left out.
    let new = by_email("new@x.io");
    assert!(new.get("lastLogin").is_some_and(Value::is_null), "{new}");
    // So is a config's lastSync before its first complete run.
    let file = sluice_core::integration::parse_file(
        "t",
        "name = \"feed\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/x\"\n[mapping.productId]\npath = \"$.id\"\n",
    )
    .unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    let configs = get_json(&base, &token, "/v1/admin/configs").await;
    let feed = &configs.as_array().unwrap()[0];
    assert!(feed.get("lastSync").is_some_and(Value::is_null), "{feed}");
    server.shutdown().await;
}

/// `GET /v1/analytics/journey`: the user's sessions, latest first, each with its events in
/// time order (id, type, time, page) and its span; no other visitor's events.
#[tokio::test]
async fn the_journey_lists_a_users_sessions_latest_first_with_their_events_in_order() {
    let db = TestDb::initialized().await;
    let (server, base, token) = signed_in_admin(&db, |_| {}).await;
    let t0 = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let ev = |id: &str, user: &str, session: &str, ty: &str, dt: i64, page: Option<&str>| {
        let mut e = json!({ "eventId": id, "userId": user, "sessionId": session,
                            "eventType": ty, "timestamp": t0 + dt });
        if let Some(p) = page {
            e["pageUrl"] = json!(p);
        }
        e
    };
    // Sent out of order: the journey orders by time, not by arrival.
    let mut batch = json!({ "batch": [
        ev("b2", "jv", "later", "PURCHASE", 2_000_000, None),
        ev("a2", "jv", "first", "CLICK", 60_000, Some("/a")),
        ev("a1", "jv", "first", "PAGE_VIEW", 0, Some("/")),
        ev("b1", "jv", "later", "PAGE_VIEW", 1_900_000, Some("/cart")),
        ev("x1", "someone-else", "first", "PAGE_VIEW", 30_000, Some("/x")),
    ] });
    batch["batch"][0]["properties"] = json!({ "amount": 5 });
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/analytics/journey?userId=jv"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    let sessions = body.as_array().unwrap_or_else(|| panic!("{body}"));
    // (eventId, eventType, pageUrl) of each event of a session.
    type Step = (String, String, Option<String>);
    let summary: Vec<(String, Vec<Step>)> = sessions
        .iter()
        .map(|s| {
            (
                s["_id"].as_str().unwrap().to_string(),
                s["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e["eventId"].as_str().unwrap().to_string(),
                            e["eventType"].as_str().unwrap().to_string(),
                            e["pageUrl"].as_str().map(str::to_string),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        summary,
        [
            (
                s("later"),
                vec![
                    (s("b1"), s("PAGE_VIEW"), Some(s("/cart"))),
                    (s("b2"), s("PURCHASE"), None)
                ]
            ),
            (
                s("first"),
                vec![
                    (s("a1"), s("PAGE_VIEW"), Some(s("/"))),
                    (s("a2"), s("CLICK"), Some(s("/a")))
                ]
            ),
        ],
        "{body}"
    );
    let millis = |v: &Value| {
        // Plain RFC 3339 text, not extended JSON's `{"$date": ...}`.
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("{v}")))
            .unwrap()
            .timestamp_millis()
    };
    assert_eq!(millis(&sessions[1]["startTime"]), t0);
    assert_eq!(millis(&sessions[1]["endTime"]), t0 + 60_000);
    assert_eq!(
        millis(&sessions[0]["events"][1]["timestamp"]),
        t0 + 2_000_000
    );
    // Each session says its id by name too; a purchase its amount; nothing was left out.
    assert_eq!(sessions[0]["sessionId"], "later", "{body}");
    assert_eq!(sessions[0]["events"][1]["amount"], 5, "{body}");
    assert!(sessions[0]["events"][0].get("amount").is_none(), "{body}");
    assert_eq!(r_truncated(&base, &token, "jv").await, None);

    // A visitor with more sessions than the journey shows: the latest 100, and a header
    // saying so.
    let many: Vec<Value> = (0..101)
        .map(|i| {
            ev(
                &format!("m{i}"),
                "many",
                &format!("s{i:03}"),
                "CLICK",
                i * 1_000,
                None,
            )
        })
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/events/batch"))
        .json(&json!({ "batch": many }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r_truncated(&base, &token, "many").await.as_deref(),
        Some("true")
    );
    let shown = get_json(&base, &token, "/v1/analytics/journey?userId=many").await;
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 100);
    assert_eq!(shown[0]["sessionId"], "s100");
    assert_eq!(shown[99]["sessionId"], "s001", "the oldest is left out");
    server.shutdown().await;
}

/// The journey's `X-Sluice-Journey-Truncated` header for `user`, if any.
async fn r_truncated(base: &str, token: &str, user: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/analytics/journey?userId={user}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.headers()
        .get("x-sluice-journey-truncated")
        .map(|v| v.to_str().unwrap().to_string())
}

/// A failed login takes a bcrypt check's time whether or not the email exists (an unknown
/// email answered at once would tell which emails do).
#[tokio::test]
async fn a_login_for_an_unknown_email_takes_as_long_as_one_for_a_known_email() {
    let db = TestDb::initialized().await;
    let (server, base, _) = signed_in_admin(&db, |_| {}).await;
    let timed = |email: &'static str| {
        let base = base.clone();
        async move {
            let started = std::time::Instant::now();
            let (status, _) = login(&base, email, "a wrong password here").await;
            assert_eq!(status, 401);
            started.elapsed()
        }
    };
    // The stand-in hash is made as the server starts; the first check may still wait for it.
    timed("nobody@x.io").await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        known.push(timed("ops@x.io").await);
        unknown.push(timed("nobody@x.io").await);
    }
    let (known, unknown) = (known.iter().min().unwrap(), unknown.iter().min().unwrap());
    // Before, 1 % of it; the bound leaves room for a loaded machine.
    assert!(
        unknown.as_secs_f64() >= 0.3 * known.as_secs_f64(),
        "unknown {unknown:?}, known {known:?}"
    );
    server.shutdown().await;
}

async fn post_password(base: &str, token: &str, current: &str, new: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/admin/password"))
        .bearer_auth(token)
        .json(&json!({ "current": current, "new": new }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn me_status(base: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{base}/v1/admin/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn passwords_are_changed_by_their_user_or_reset_by_an_admin_and_end_sessions() {
    let db = TestDb::initialized().await;
    let (server, base, admin) = signed_in_admin(&db, |_| {}).await;
    sluice::server::admin::create_admin_user(&db.store, "ana@x.io", PASSWORD, Role::Analyst)
        .await
        .unwrap();
    let ana = token_of(&base, "ana@x.io").await;
    let other_session = token_of(&base, "ana@x.io").await;
    // The current password is checked; the new one must be one Sluice takes.
    let (status, body) =
        post_password(&base, &ana, "not the password", "a new long password").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_credentials")),
        "{body}"
    );
    let (status, body) = post_password(&base, &ana, PASSWORD, "short").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(me_status(&base, &ana).await, 200, "nothing changed yet");
    // Changed: every session of the user ends, and only the new password signs in.
    let (status, body) = post_password(&base, &ana, PASSWORD, "a new long password").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["passwordChanged"], true);
    assert_eq!(me_status(&base, &ana).await, 401);
    assert_eq!(me_status(&base, &other_session).await, 401);
    assert_eq!(login(&base, "ana@x.io", PASSWORD).await.0, 401);
    let (status, body) = login(&base, "ana@x.io", "a new long password").await;
    assert_eq!(status, 200, "{body}");
    let ana = body["token"].as_str().unwrap().to_string();
    // An admin resets it: the user's sessions end, the answer holds no hash.
    let r = reqwest::Client::new()
        .patch(format!("{base}/v1/admin/users/ana@x.io"))
        .bearer_auth(&admin)
        .json(&json!({ "password": "reset by the admin" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let changed: Value = r.json().await.unwrap();
    assert!(changed.get("password").is_none(), "{changed}");
    assert_eq!(changed["role"], "ANALYST", "{changed}");
    assert_eq!(me_status(&base, &ana).await, 401);
    assert_eq!(login(&base, "ana@x.io", "a new long password").await.0, 401);
    assert_eq!(login(&base, "ana@x.io", "reset by the admin").await.0, 200);
    // Not another ADMIN's through the API: the resetting admin could act as them.
    sluice::server::admin::create_admin_user(&db.store, "second@x.io", PASSWORD, Role::Admin)
        .await
        .unwrap();
    let second = token_of(&base, "second@x.io").await;
    let r = reqwest::Client::new()
        .patch(format!("{base}/v1/admin/users/ops@x.io"))
        .bearer_auth(&second)
        .json(&json!({ "password": "taken over by second" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("sluice admin set-password"),
        "{body}"
    );
    assert_eq!(me_status(&base, &admin).await, 200);
    assert_eq!(login(&base, "ops@x.io", PASSWORD).await.0, 200);
    // Nor reset and made ADMIN by one request.
    let r = reqwest::Client::new()
        .patch(format!("{base}/v1/admin/users/ana@x.io"))
        .bearer_auth(&second)
        .json(&json!({ "password": "a password for an admin", "role": "ADMIN" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // A token signed in with a password since changed is refused even if it outlived the
    // change's deletion of tokens (a login whose check was in flight meanwhile).
    let ana = token_of_with(&base, "ana@x.io", "reset by the admin").await;
    let other_hash = bcrypt::hash("yet another password", 4).unwrap();
    db.store
        .collection("admin_users")
        .update_one(
            bson::doc! { "email": "ana@x.io" },
            bson::doc! { "$set": { "password": other_hash } },
        )
        .await
        .unwrap();
    assert_eq!(me_status(&base, &ana).await, 401);
    server.shutdown().await;
}

async fn token_of_with(base: &str, email: &str, password: &str) -> String {
    let (status, body) = login(base, email, password).await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_string()
}
