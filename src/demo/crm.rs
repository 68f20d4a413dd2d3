//! The demo's external source: a small CRM API served on loopback, behind OAuth2 client
//! credentials and paged with `?page=N&per_page=M`, as a real SaaS API would be. The demo
//! imports its contacts with the bundled `examples/demo/crm-contacts.toml`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

/// The client id the demo config uses; the secret is `CLIENT_SECRET`.
pub const CLIENT_ID: &str = "sluice-demo";
pub const CLIENT_SECRET: &str = "demo-crm-secret";

struct Crm {
    contacts: Vec<Value>,
    tokens: Mutex<HashSet<String>>,
}

/// A running CRM API; it stops when the handle is dropped.
pub struct CrmServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CrmServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Contacts for some of the tracked visitors (so the import can be joined with `users`).
pub fn contacts(visitors: &[String]) -> Vec<Value> {
    const FIRST: [&str; 8] = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
    ];
    const LAST: [&str; 8] = [
        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
    ];
    const COMPANY: [&str; 4] = ["Acme", "Globex", "Initech", "Umbrella"];
    visitors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (first, last) = (FIRST[i % 8], LAST[(i / 8) % 8]);
            json!({
                "id": 1000 + i,
                "email": format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), i),
                "first_name": first,
                "last_name": last,
                "company": { "name": COMPANY[i % 4] },
                "visitor_id": v,
                "updated_at": format!("2026-11-{:02}T09:00:00Z", 1 + i % 24),
            })
        })
        .collect()
}

pub async fn start(contacts: Vec<Value>) -> anyhow::Result<CrmServer> {
    let state = Arc::new(Crm {
        contacts,
        tokens: Mutex::new(HashSet::new()),
    });
    let app = Router::new()
        .route("/oauth/token", post(token))
        .route("/api/contacts", get(list))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(CrmServer { addr, task })
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": code }))).into_response()
}

/// Client credentials, from HTTP basic auth (RFC 6749 2.3.1) or the form.
async fn token(
    State(crm): State<Arc<Crm>>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if form.grant_type != "client_credentials" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let (id, secret) = match basic {
        Some(pair) => pair,
        None => (
            form.client_id.unwrap_or_default(),
            form.client_secret.unwrap_or_default(),
        ),
    };
    // Basic credentials are form-urlencoded first (RFC 6749 2.3.1); ours need no escaping.
    if id != CLIENT_ID || secret != CLIENT_SECRET {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    crm.tokens.lock().unwrap().insert(token.clone());
    Json(json!({ "access_token": token, "token_type": "Bearer", "expires_in": 300 }))
        .into_response()
}

#[derive(Deserialize)]
struct Page {
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn list(State(crm): State<Arc<Crm>>, headers: HeaderMap, Query(q): Query<Page>) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    if !bearer.is_some_and(|t| crm.tokens.lock().unwrap().contains(&t)) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_token");
    }
    let per_page = q.per_page.unwrap_or(20).clamp(1, 100);
    let page = q.page.unwrap_or(1).max(1);
    let start = (page - 1) * per_page;
    let data: Vec<Value> = crm
        .contacts
        .iter()
        .skip(start)
        .take(per_page)
        .cloned()
        .collect();
    let has_more = start + per_page < crm.contacts.len();
    Json(json!({ "data": data, "meta": { "page": page, "per_page": per_page, "has_more": has_more } }))
        .into_response()
}
