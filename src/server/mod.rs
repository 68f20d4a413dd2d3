//! The `sluice serve` HTTP server: the tracking APIs (native `/v1/events`,
//! `/v1/events/batch`; Segment-compatible `/v1/identify|track|page|screen|group|alias|batch`),
//! the admin API, health (`/healthz`, `/readyz`) and Prometheus metrics (`/metrics`).

pub mod admin;
mod auth;
mod batcher;
pub mod enrich;
mod listen;
mod metrics;
mod process;
mod segment;
mod tracking;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sluice_connectors::mongo::{expire_idle_sessions, EventWriter, WriterOptions};
use sluice_connectors::Store;
use sluice_core::config::Config;
use sluice_core::segment::Kind;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use batcher::{Admission, Batcher, SubmitError};
pub use metrics::Metrics;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    limiter: Arc<auth::RateLimiter>,
    /// `[server] rate_limit_per_client`, keyed by client address.
    client_limiter: Arc<auth::RateLimiter>,
    trusted: Arc<Vec<enrich::IpNet>>,
    login_guard: Arc<admin::LoginGuard>,
    /// Analytics queries running now, at most [`admin::ANALYTICS_QUERIES`].
    analytics: Arc<tokio::sync::Semaphore>,
    /// Requests running the tracking transforms now, at most `[plugins] instances`.
    transform_slots: Arc<tokio::sync::Semaphore>,
    /// `[plugins] tracking_transforms`, applied to events before they are stored.
    transforms: Arc<Vec<Arc<dyn sluice_core::transform::Transform>>>,
    /// `tracking.geoip_database`, when configured.
    geoip: Option<Arc<enrich::GeoIp>>,
    /// Set when the shutdown begins: `/readyz` answers 503 from then on.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of `tracking.max_in_flight_mb` not reserved by a request now.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Bytes of [`OTHER_IN_FLIGHT`] (the bodies of routes other than tracking's) not
    /// reserved by a request now.
    other_in_flight: Arc<tokio::sync::Semaphore>,
    /// What each client address holds of `tracking.max_in_flight_mb`.
    client_bytes: Arc<ClientBytes>,
}

/// The tracking bytes each client address holds now, bounded by
/// `tracking.max_in_flight_per_client_mb` (0: not counted). An address is forgotten once
/// it holds nothing.
struct ClientBytes {
    cap: u64,
    /// What a request its address holds nothing beside may reach: the share, or a
    /// quarter of the whole bound if that is more.
    alone_cap: u64,
    held: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl ClientBytes {
    fn new(cap_mb: usize, bound_mb: usize) -> Self {
        let cap = (cap_mb as u64) << 20;
        Self {
            cap,
            alone_cap: cap.max(((bound_mb as u64) << 20) / 4),
            held: Default::default(),
        }
    }

    /// Counts `n` more bytes for `client`, if its share has room, or if it holds just
    /// `alone` bytes now (a request alone may go beyond the share: see [`hold_more`]).
    fn take(&self, client: &str, n: u64, alone: Option<u64>) -> bool {
        // Nothing is left half-done under the lock: a poisoned one is still consistent.
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let within =
            |now: u64| now + n <= self.cap || (alone == Some(now) && now + n <= self.alone_cap);
        match held.get_mut(client) {
            Some(now) if !within(*now) => false,
            Some(now) => {
                *now += n;
                true
            }
            None if !within(0) => false,
            None => {
                held.insert(client.to_string(), n);
                true
            }
        }
    }

    fn give(&self, client: &str, n: u64) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(now) = held.get_mut(client) {
            *now = now.saturating_sub(n);
            if *now == 0 {
                held.remove(client);
            }
        }
    }
}

/// A client address, and the table of what each address holds.
#[derive(Clone)]
struct ClientShare {
    table: Arc<ClientBytes>,
    address: Arc<str>,
}

/// Bytes a request holds of its client address's share, given back when dropped.
struct ClientHeld {
    share: ClientShare,
    bytes: u64,
}

impl Drop for ClientHeld {
    fn drop(&mut self) {
        self.share.table.give(&self.share.address, self.bytes);
    }
}

/// What the bodies of the routes other than tracking's (the admin and analytics API's) may
/// hold at once, apart from `tracking.max_in_flight_mb`, so that they cannot take the
/// tracking endpoint's room.
pub const OTHER_IN_FLIGHT: usize = 8 << 20;

/// A tracking request's share of `tracking.max_in_flight_mb`, reserved as its body is
/// read (see [`body_deadline`]). The handler keeps it until it returns and hands a copy
/// to the write queue with the request's events, so it is given back once the request is
/// done and its events have left the queue, whichever is later (a request answered 503
/// on a write timeout may leave events queued, which the writer drops unwritten). Its
/// client address's share (`tracking.max_in_flight_per_client_mb`) is held by the
/// handler only: events left queued after the answer are the server's, not the
/// client's (a store that stops answering would otherwise turn into 429s that blame
/// the clients).
#[derive(Clone)]
pub struct InFlight {
    _reserved: Vec<Arc<Reserved>>,
    client: Vec<Arc<ClientHeld>>,
}

impl InFlight {
    /// The client address its bytes count for, when addresses are bounded, and how many
    /// of them it holds there.
    fn client(&self) -> Option<(ClientShare, u64)> {
        let first = self.client.first()?;
        Some((
            first.share.clone(),
            self.client.iter().map(|c| c.bytes).sum(),
        ))
    }

    /// One reservation holding both.
    fn join(mut self, other: InFlight) -> InFlight {
        self._reserved.extend(other._reserved);
        self.client.extend(other.client);
        self
    }

    /// What the write queue keeps with the request's events: the budget's bytes, not
    /// the client's share.
    pub(crate) fn for_queue(&self) -> InFlight {
        InFlight {
            _reserved: self._reserved.clone(),
            client: Vec::new(),
        }
    }
}

struct Reserved {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: u64,
    /// Where the bytes are shown (`sluice_http_in_flight_bytes`, tracking's budget only).
    metrics: Option<Arc<Metrics>>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.in_flight_bytes
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// An error answered as JSON `{"error": code, "message": text}`; never internals.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Every error found, when there may be several (`message` is the first).
    pub errors: Vec<String>,
    /// More members of the answer and headers (see [`Extra`]).
    pub extra: Vec<Extra>,
}

/// What an error's answer says besides its code and message.
#[derive(Debug)]
pub enum Extra {
    /// A member, for a program to read what `message` says (`archived_days`' days).
    Field(&'static str, serde_json::Value),
    /// A header (`WWW-Authenticate` on a `401`).
    Header(&'static str, String),
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            errors: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The answer with one more member.
    pub fn field(mut self, name: &'static str, value: serde_json::Value) -> Self {
        self.extra.push(Extra::Field(name, value));
        self
    }

    /// The answer with a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.extra.push(Extra::Header(name, value.into()));
        self
    }

    /// The error for a list of errors (not empty): `message` is the first, `errors` all.
    pub fn many(status: StatusCode, code: &'static str, errors: Vec<String>) -> Self {
        Self {
            errors: errors.clone(),
            ..Self::new(status, code, errors.into_iter().next().unwrap_or_default())
        }
    }

    pub fn retry(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        let mut headers = Vec::new();
        for extra in self.extra {
            match extra {
                Extra::Field(name, value) => body[name] = value,
                Extra::Header(name, value) => headers.push((name, value)),
            }
        }
        let body = Json(body);
        let mut resp = (self.status, body).into_response();
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, value);
            }
        }
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(s));
            // Read by the browser SDK's batching dispatcher (seconds).
            resp.headers_mut()
                .insert("x-ratelimit-reset", HeaderValue::from(s));
        }
        resp
    }
}

/// A log line that one client, or every client at once, can cause on each request: at
/// most one a `every`, saying how many like it were held back since the last. Each call
/// site has its own (a `static`, or one per listener).
pub(crate) struct Throttle(std::sync::Mutex<(Option<std::time::Instant>, u64)>);

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self(std::sync::Mutex::new((None, 0)))
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn pass(&self, every: Duration) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(at) if at.elapsed() < every => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(std::time::Instant::now()), 0);
                Some(held)
            }
        }
    }
}

/// `503 store_timeout`: MongoDB did not answer a tracking request's reads or writes of
/// `what` within `deadline` (`tracking.write_timeout_seconds`), or, with `conflicts`, its
/// writers kept meeting write conflicts meanwhile. Logged; the writes may still complete,
/// and a resend is then answered `duplicate`.
pub(crate) fn store_timeout(deadline: Duration, what: &str, conflicts: bool) -> ApiError {
    // Every request while MongoDB is stuck: one line a second is enough to say so.
    static LOGGED: Throttle = Throttle::new();
    let why = if conflicts {
        format!(
            "not stored within {} s ({what}): {CONFLICTS}",
            deadline.as_secs()
        )
    } else {
        format!(
            "MongoDB did not answer within {} s ({what})",
            deadline.as_secs()
        )
    };
    if let Some(held) = LOGGED.pass(Duration::from_secs(1)) {
        tracing::error!(more_since_last = held, "{why}");
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_timeout",
        format!("{why}; resend the events (those already stored are answered `duplicate`)"),
    )
    .retry(5)
}

/// Why writes stall while MongoDB answers: their transactions keep meeting write
/// conflicts.
pub(crate) const CONFLICTS: &str = "MongoDB answered write conflicts on the sessions or profiles they update (another transaction holds them: one a stopped replica left open holds them until MongoDB aborts it, within transactionLifetimeLimitSeconds, 60 s by default)";

/// What `[server] ops_listen` serves while `sluice serve` waits for MongoDB: `/healthz`
/// (alive), `/readyz` (503 `starting`) and `/metrics` (what the process has counted).
pub struct Starting {
    stop: oneshot::Sender<()>,
    join: JoinHandle<()>,
}

/// Notes when the process started (`process_start_time_seconds`), once.
pub fn mark_process_started() {
    process::mark_started();
}

/// Listens on `at` with the [`Starting`] routes until [`Starting::stop`].
pub async fn serve_starting(at: SocketAddr) -> anyhow::Result<Starting> {
    let listener = TcpListener::bind(at)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on `server.ops_listen` ({at}): {e}"))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting",
                    "waiting for MongoDB to answer",
                )
            }),
        )
        .route(
            "/metrics",
            get(|| async { sluice_core::metrics::render() + &process::render() }),
        );
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(Starting { stop, join })
}

impl Starting {
    /// Stops listening (the address is free for the server once this returns).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut join = self.join;
        // A scraper's idle keep-alive connection does not hold the address.
        if tokio::time::timeout(Duration::from_secs(2), &mut join)
            .await
            .is_err()
        {
            join.abort();
            let _ = join.await;
        }
    }
}

/// A running server; dropping the handle does not stop it, `shutdown` does.
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// Where `[server] ops_listen` serves `/healthz`, `/readyz` and `/metrics`, if set.
    pub ops_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

impl ServerHandle {
    /// Stops taking requests, answers those in flight, drains the write queue.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join.await;
    }

    /// Waits until the server ends (after a shutdown signal).
    pub async fn wait(self) {
        let _ = self.join.await;
    }
}

fn cors(config: &Config) -> CorsLayer {
    let origins = if config.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let allowed = config.cors_origins.clone();
        AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|o| sluice_core::config::origin_allowed(&allowed, o))
        })
    };
    CorsLayer::new()
        .allow_origin(origins)
        // Every method a route takes (the admin API's DELETE too).
        .allow_methods([
            Method::POST,
            Method::GET,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        // Whatever headers the page sends: tracing tools (Sentry, Datadog RUM,
        // OpenTelemetry) add `sentry-trace`, `baggage`, `traceparent` to every `fetch`, and
        // a preflight refusing them blocks the events. No credentials are allowed (keys
        // go in headers a page sets itself), so mirroring opens nothing.
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        // A cross-origin SDK can read when to come back (and whether its answer is a
        // minimal one) only if these are exposed.
        .expose_headers([
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderName::from_static("x-ratelimit-reset"),
            axum::http::HeaderName::from_static("preference-applied"),
            // The analytics API's notes on a journey (a dashboard on another origin).
            axum::http::HeaderName::from_static("x-sluice-archived-through"),
            axum::http::HeaderName::from_static("x-sluice-journey-truncated"),
        ])
        .max_age(Duration::from_secs(3600))
}

pub fn router(state: AppState) -> Router {
    let t = &state.config.tracking;
    let one = DefaultBodyLimit::max(t.max_event_bytes);
    let many = DefaultBodyLimit::max(t.max_batch_bytes);
    let mut app = Router::new()
        .route("/v1/events", post(tracking::track).layer(one))
        .route("/v1/events/batch", post(tracking::batch).layer(many))
        .route("/v1/batch", post(segment::batch).layer(many))
        .route("/v1/import", post(segment::batch).layer(many))
        // The browser SDK (analytics.js / analytics-next) posts to one-letter paths.
        .route("/v1/b", post(segment::batch).layer(many));
    let mut tracking_paths = vec![
        "/v1/events",
        "/v1/events/batch",
        "/v1/batch",
        "/v1/import",
        "/v1/b",
    ];
    for (path, kind) in [
        ("/v1/identify", Kind::Identify),
        ("/v1/track", Kind::Track),
        ("/v1/page", Kind::Page),
        ("/v1/screen", Kind::Screen),
        ("/v1/group", Kind::Group),
        ("/v1/alias", Kind::Alias),
        ("/v1/i", Kind::Identify),
        ("/v1/t", Kind::Track),
        ("/v1/p", Kind::Page),
        ("/v1/s", Kind::Screen),
        ("/v1/g", Kind::Group),
        ("/v1/a", Kind::Alias),
    ] {
        let handler = move |State(state): State<AppState>,
                            ConnectInfo(peer): ConnectInfo<SocketAddr>,
                            held: Option<axum::Extension<InFlight>>,
                            headers: HeaderMap,
                            body: Result<Bytes, BytesRejection>| {
            segment::single(kind, state, peer, held.map(|h| h.0), headers, body)
        };
        app = app.route(path, post(handler).layer(one));
        tracking_paths.push(path);
    }
    // Each tracking route's body limit, for the in-flight reservation.
    let batch_paths = ["/v1/events/batch", "/v1/batch", "/v1/import", "/v1/b"];
    let limits: Arc<std::collections::HashMap<&'static str, usize>> = Arc::new(
        tracking_paths
            .iter()
            .map(|p| {
                let limit = if batch_paths.contains(p) {
                    t.max_batch_bytes
                } else {
                    t.max_event_bytes
                };
                (*p, limit)
            })
            .collect(),
    );
    let tracking_paths: Arc<std::collections::HashSet<&'static str>> =
        Arc::new(tracking_paths.into_iter().collect());
    let app = app
        .merge(admin::routes())
        .merge(probe_routes(state.config.ops_listen.is_none()))
        .fallback(|uri: axum::http::Uri| async move {
            // A base URL joined with a trailing slash is a common SDK slip.
            let path = uri.path();
            let message = match path.strip_suffix('/').filter(|p| !p.is_empty()) {
                Some(bare) => format!("no such endpoint: `{path}` ends with a slash (the endpoints end without one: `{bare}`)"),
                None => "no such endpoint".to_string(),
            };
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this endpoint does not take {method}"),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            move |state: State<AppState>, request: axum::extract::Request, next| {
                body_deadline(state, limits.clone(), request, next)
            },
        ))
        // Outside the body's deadline: a client over its limit is turned away before its
        // body is read.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            move |state: State<AppState>, request: axum::extract::Request, next| {
                client_limit(state, tracking_paths.clone(), request, next)
            },
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            count_responses,
        ))
        .layer(axum::middleware::from_fn(admin::no_store));
    outer_layers(app, &state.config).with_state(state)
}

/// Counts every answer by route pattern and status (`sluice_http_responses_total`); a
/// panic is counted as the `500` it is answered with.
async fn count_responses(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let answered = std::panic::AssertUnwindSafe(next.run(request));
    let response = match futures_util::FutureExt::catch_unwind(answered).await {
        Ok(response) => response,
        Err(panic) => {
            metrics.count_response(&route, 500);
            std::panic::resume_unwind(panic);
        }
    };
    metrics.count_response(&route, response.status().as_u16());
    response
}

/// `[server] rate_limit_per_client` on the tracking endpoints (`paths`, without
/// parameters: a request's path is one of them exactly): per client
/// address (IPv4, or IPv6 /64), resolved through the trusted proxies as for enrichment.
async fn client_limit(
    State(state): State<AppState>,
    paths: Arc<std::collections::HashSet<&'static str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limited = state.config.rate_limit_per_client > 0 && paths.contains(request.uri().path());
    if limited {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(peer) = peer {
            let ip = enrich::client_ip(peer, request.headers(), &state.trusted);
            if !state.client_limiter.allow(&enrich::client_key(ip)) {
                state
                    .metrics
                    .rate_limited_client
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests from this address",
                )
                .retry(1)
                .into_response();
            }
        }
    }
    next.run(request).await
}

/// What wraps every route: a panic answered as a JSON `500`, and CORS outermost, so that
/// every answer carries its headers, that `500` too (a browser reads no answer lacking
/// them).
fn outer_layers<S: Clone + Send + Sync + 'static>(app: Router<S>, config: &Config) -> Router<S> {
    app.layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
        .layer(cors(config))
}

/// A handler that panicked answers a JSON `500` (its connection stays usable) and is
/// logged; nothing it was given is acknowledged, so resending it is safe.
fn on_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = what, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server failed to handle this request; send it again",
    )
    .into_response()
}

/// Reads each request's whole body within `[server] body_timeout_seconds`, before the
/// route sees it: a client trickling its body in (or sending none after its headers) is
/// answered `408` and its connection closed, instead of holding it, and a handler, for
/// as long as it likes.
///
/// Every body is counted as it arrives: a tracking route's against
/// `tracking.max_in_flight_mb`, an API route's (at most `MAX_ADMIN_BODY`, and read only
/// from a caller whose token is valid, but to sign in) against [`OTHER_IN_FLIGHT`],
/// apart, so that they cannot take the tracking endpoint's room. A request no route
/// takes, a probe's, or a tracking path's with another method than POST is answered
/// without its body being read. A tracking route's (its
/// path in `limits`, with the route's limit) is read up to that limit, plus the limit
/// again for the decompressed copy of a compressed body; with too little left the
/// request is answered 503 at once (waiting would hold its connection and grow the
/// backlog the bound is there to stop). Counting what arrived, not what the headers
/// declare, keeps a client trickling large bodies from holding more than it sent.
async fn body_deadline(
    State(state): State<AppState>,
    limits: Arc<std::collections::HashMap<&'static str, usize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let limit = limits.get(parts.uri.path()).copied();
    let has_body = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || parts
            .headers
            .contains_key(axum::http::header::TRANSFER_ENCODING);
    // No route (404), a tracking path asked with another method than POST (405), or a
    // probe (which takes no body): answered without reading a byte of the body.
    let unrouted = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .is_none();
    let bodyless = limit.is_none() && !parts.uri.path().starts_with("/v1/");
    if unrouted || bodyless || (limit.is_some() && parts.method != axum::http::Method::POST) {
        let request = axum::extract::Request::from_parts(parts, axum::body::Body::empty());
        let response = next.run(request).await;
        return if has_body {
            response.with_close()
        } else {
            response
        };
    }
    // A body sent to the API (what is left) is read only from a caller signed in (but to
    // sign in).
    let login = parts.uri.path() == admin::LOGIN_PATH;
    if has_body && limit.is_none() && !login {
        if let Err(refused) = admin::signed_in(&state, &parts.headers).await {
            return refused.into_response().with_close();
        }
    }
    let cap = match limit {
        Some(limit) => limit,
        None if login => admin::MAX_LOGIN_BODY,
        None => admin::MAX_ADMIN_BODY,
    };
    let mut reserved = match limit {
        Some(_) => Reservation::new(&state).for_client(&state, &parts),
        None => Reservation::other(&state),
    };
    let deadline = state.config.body_timeout;
    let read = tokio::time::timeout(deadline, read_body_within(body, cap, &mut reserved)).await;
    let too_little = || match limit {
        Some(_) => in_flight_full(&state).into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server holds as many request bytes for this API as it may; retry shortly",
        )
        .retry(rand::random_range(1..=3))
        .into_response(),
    };
    match read {
        Ok(Ok(bytes)) => {
            // Tracking routes decompress their bodies (others take none compressed).
            let compressed = tracking::content_encoding(&parts.headers).is_some();
            if limit.is_some() && compressed {
                match reserved.take(cap) {
                    Ok(()) => {}
                    Err(Short::Budget) => return too_little(),
                    Err(Short::Client) => {
                        return client_full(&state, reserved.share()).into_response()
                    }
                }
            }
            parts.extensions.insert(reserved.held());
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Ok(Err(BodyError::TooLarge)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            // One code for a body too large, on every route.
            "payload_too_large",
            format!("the body is larger than {cap} bytes"),
        )
        .into_response()
        .with_close(),
        // Their connections may still carry a body part-sent: closed.
        Ok(Err(BodyError::InFlightFull)) => too_little().with_close(),
        Ok(Err(BodyError::ClientFull)) => client_full(&state, reserved.share())
            .into_response()
            .with_close(),
        Ok(Err(BodyError::Unreadable(e))) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            format!("the body could not be read: {e}"),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body was not received within {} s; nothing was stored",
                deadline.as_secs()
            ),
        )
        .into_response()
        .with_close(),
    }
}

/// An answer that closes its connection: the request's body was not read whole, so the
/// connection cannot carry another request.
trait WithClose {
    fn with_close(self) -> Self;
}

impl WithClose for Response {
    fn with_close(mut self) -> Self {
        self.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
        self
    }
}

/// The answer to a request that finds too little of `tracking.max_in_flight_mb` left
/// (counted).
fn in_flight_full(state: &AppState) -> ApiError {
    state
        .metrics
        .in_flight_full
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "the server holds as many request bytes as it may (tracking.max_in_flight_mb); retry shortly",
    )
    .retry(rand::random_range(1..=3))
}

/// The answer to a tracking request whose client address holds its whole share of the
/// in-flight bytes (`tracking.max_in_flight_per_client_mb`; counted).
fn client_full(state: &AppState, share: &ClientShare) -> ApiError {
    state
        .metrics
        .rate_limited_client_bytes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    static LOGGED: Throttle = Throttle::new();
    if let Some(held) = LOGGED.pass(Duration::from_secs(1)) {
        tracing::warn!(
            client = &*share.address,
            more_since_last = held,
            "a client address holds its share of the in-flight request bytes (tracking.max_in_flight_per_client_mb): its requests are answered 429"
        );
    }
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "this address holds as many request bytes as it may (tracking.max_in_flight_per_client_mb); retry shortly",
    )
    .retry(rand::random_range(1..=3))
}

/// `held` with `bytes` more of `tracking.max_in_flight_mb` (what a request builds beyond
/// its body, such as the copies of a Segment batch's `context`): `503` when too little is
/// left, `413` when more than the whole bound is asked; with a per-address share, `429`
/// when the address has too little of it left, and `413` when more than one address may
/// ever hold is asked.
fn hold_more(
    state: &AppState,
    held: Option<InFlight>,
    bytes: usize,
    what: &str,
) -> Result<Option<InFlight>, ApiError> {
    if bytes == 0 {
        return Ok(held);
    }
    let bound = state.config.tracking.max_in_flight_mb << 20;
    if bytes > bound {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what} come to {bytes} bytes, more than `tracking.max_in_flight_mb` ({bound} bytes)"),
        ));
    }
    // Counted for the request's client address too, as its body was: a small body can
    // ask for much more (a Segment batch's `context`, copied into each message). A
    // request its address holds nothing beside may go beyond the share, up to a quarter
    // of the whole bound (`alone_cap`): an SDK's batch of 2,000 messages with a 1 KB
    // context needs 2 MB, and a batch answered 413 is dropped. So an address holds at
    // most one such request at a time.
    let mut more = Reservation::new(state);
    if let Some((share, own)) = held.as_ref().and_then(InFlight::client) {
        // Never, from one address: 413, as past the whole bound.
        if own + bytes as u64 > share.table.alone_cap {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "{what} come to {bytes} bytes, {} with the body: more than one client address may hold ({} bytes: `tracking.max_in_flight_per_client_mb`, or a quarter of `tracking.max_in_flight_mb` if more)",
                    own + bytes as u64,
                    share.table.alone_cap
                ),
            ));
        }
        more.client = Some(share);
        more.alone = Some(own);
    }
    match more.take(bytes) {
        Ok(()) => {}
        Err(Short::Budget) => return Err(in_flight_full(state)),
        Err(Short::Client) => return Err(client_full(state, more.share())),
    }
    let more = more.held();
    Ok(Some(match held {
        Some(h) => h.join(more),
        None => more,
    }))
}

enum BodyError {
    TooLarge,
    InFlightFull,
    /// The client address holds its whole share.
    ClientFull,
    Unreadable(axum::Error),
}

/// The whole of `body`, refused past `cap` bytes; each piece counted in `reserved` as it
/// arrives.
async fn read_body_within(
    mut body: axum::body::Body,
    cap: usize,
    reserved: &mut Reservation,
) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    // Not sized from the declared length: a client declaring a large body and trickling
    // it would hold that much uncounted.
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if out.len() + data.len() > cap {
            return Err(BodyError::TooLarge);
        }
        match reserved.take(data.len()) {
            Ok(()) => {}
            Err(Short::Budget) => return Err(BodyError::InFlightFull),
            Err(Short::Client) => return Err(BodyError::ClientFull),
        }
        out.extend_from_slice(&data);
    }
    // Grown by doubling, the buffer may be up to twice what was counted: the handler
    // holds only the body.
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}

/// Bytes of `tracking.max_in_flight_mb` taken for one request so far.
struct Reservation {
    budget: Arc<tokio::sync::Semaphore>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: u64,
    /// Shown in `sluice_http_in_flight_bytes` (tracking's budget).
    metrics: Option<Arc<Metrics>>,
    /// Counted for this client address too.
    client: Option<ClientShare>,
    /// Beyond the client's share if it holds just this many bytes (this request's own).
    alone: Option<u64>,
}

/// Which bound a reservation found too little room under.
enum Short {
    /// The whole budget.
    Budget,
    /// The client address's share.
    Client,
}

impl Reservation {
    /// Of `tracking.max_in_flight_mb`.
    fn new(state: &AppState) -> Self {
        Self {
            budget: state.in_flight.clone(),
            permit: None,
            bytes: 0,
            metrics: Some(state.metrics.clone()),
            client: None,
            alone: None,
        }
    }

    /// The client address counted, when a take was refused for its share.
    fn share(&self) -> &ClientShare {
        self.client
            .as_ref()
            .expect("only a reservation with a client's share is refused for it")
    }

    /// Counted for the request's client address too, when addresses are bounded.
    fn for_client(mut self, state: &AppState, parts: &axum::http::request::Parts) -> Self {
        if state.client_bytes.cap == 0 {
            return self;
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(peer) = peer {
            let ip = enrich::client_ip(peer, &parts.headers, &state.trusted);
            self.client = Some(ClientShare {
                table: state.client_bytes.clone(),
                address: enrich::client_key(ip).into(),
            });
        }
        self
    }

    /// Of [`OTHER_IN_FLIGHT`].
    fn other(state: &AppState) -> Self {
        Self {
            budget: state.other_in_flight.clone(),
            permit: None,
            bytes: 0,
            metrics: None,
            client: None,
            alone: None,
        }
    }

    /// Takes `n` more bytes, if that many are left (under the client's share too).
    fn take(&mut self, n: usize) -> Result<(), Short> {
        if n == 0 {
            return Ok(());
        }
        if let Some(share) = &self.client {
            if !share.table.take(&share.address, n as u64, self.alone) {
                return Err(Short::Client);
            }
        }
        let Some(more) = u32::try_from(n)
            .ok()
            .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok())
        else {
            if let Some(share) = &self.client {
                share.table.give(&share.address, n as u64);
            }
            return Err(Short::Budget);
        };
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.bytes += n as u64;
        if let Some(m) = &self.metrics {
            m.in_flight_bytes
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// What the handler keeps with its events.
    fn held(mut self) -> InFlight {
        InFlight {
            client: self
                .client
                .take()
                .map(|share| {
                    Arc::new(ClientHeld {
                        share,
                        bytes: self.bytes,
                    })
                })
                .into_iter()
                .collect(),
            _reserved: vec![Arc::new(Reserved {
                _permit: self.permit.take(),
                bytes: std::mem::take(&mut self.bytes),
                metrics: self.metrics.clone(),
            })],
        }
    }
}

impl Drop for Reservation {
    /// A request refused before its handler ran gives its bytes back (the permit goes by
    /// itself).
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.in_flight_bytes
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(share) = &self.client {
            share.table.give(&share.address, self.bytes);
        }
    }
}

/// How long `/readyz` waits for MongoDB: a probe answered late is a probe failed, and a
/// driver waiting out its server selection timeout (10 s) would answer very late.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after an event write failed `/readyz` answers 503 `writes_failing` (unless
/// a write succeeded since): no traffic, no news, and a replica taken out of rotation
/// gets none, so it comes back on its own once the window has passed.
pub const WRITES_FAILING_WINDOW: Duration = Duration::from_secs(30);

/// The probes, and the metrics if `metrics`: on `[server] ops_listen`, and on the public
/// listener (its metrics only when there is no ops address: they name configs and
/// traffic, which the public need not see once scrapes have an address of their own).
fn probe_routes(metrics: bool) -> Router<AppState> {
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    if metrics {
        probes.route("/metrics", get(metrics_text))
    } else {
        probes
    }
}

/// `[server] ops_listen`'s routes: the probes and the metrics, nothing a client sends.
fn ops_router(state: AppState) -> Router {
    probe_routes(true)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "this address serves /healthz, /readyz and /metrics only",
            )
        })
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    // Stopping: routed elsewhere while it drains.
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this replica is shutting down",
        ));
    }
    let pinged = tokio::time::timeout(READY_TIMEOUT, state.store.ping())
        .await
        .unwrap_or_else(|_| {
            Err(sluice_connectors::StoreError::Busy(
                "no answer within 2 s".into(),
            ))
        });
    pinged.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the database does not answer",
        )
    })?;
    // A database that answers a ping may still fail every write (a write concern a
    // replica set cannot meet, a full disk, a user without write rights).
    if let Some(failure) = state.batcher.failing_within(WRITES_FAILING_WINDOW) {
        tracing::warn!(error = %failure, "readiness check failed: event writes are failing");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "writes_failing",
            format!(
                "event writes are failing: the last one failed (or was given up on) within {} s, and none succeeded since nor within {} s (the log says why)",
                WRITES_FAILING_WINDOW.as_secs(),
                batcher::WRITES_SUCCEEDING.as_secs()
            ),
        ));
    }
    Ok("ready")
}

/// The limits the usage gauges fill up to, as gauges: how full the queue, the in-flight
/// bytes and the connections are is then a ratio an alert can use.
fn limits(state: &AppState) -> String {
    let config = &state.config;
    [
        (
            "sluice_ingest_queue_capacity_events",
            "Events the ingest queue holds at most (sluice_ingest_queue_events fills it).",
            state.batcher.capacity() as f64,
        ),
        (
            "sluice_http_in_flight_max_bytes",
            "Request bytes the tracking endpoint holds at most (tracking.max_in_flight_mb; sluice_http_in_flight_bytes fills it).",
            (config.tracking.max_in_flight_mb * 1024 * 1024) as f64,
        ),
        (
            "sluice_http_connections_max",
            "HTTP connections the public listener takes at most ([server] max_connections; sluice_http_connections_open fills it).",
            config.max_connections as f64,
        ),
    ]
    .iter()
    .map(|(name, help, v)| format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"))
    .collect()
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        // The tracking endpoint's series, then those of imports, pushes, exports,
        // scheduled jobs and plugins run by this process.
        state
            .metrics
            .render(state.batcher.depth(), state.batcher.waiting())
            + &limits(&state)
            + &sluice_core::metrics::render()
            + &process::render(),
    )
}

/// What the tracking endpoint loads from files before it starts: loaded by `serve` before
/// it touches the database or starts the scheduler, so a missing plugin or GeoIP database
/// stops it before anything runs.
pub struct Loaded {
    transforms: Vec<Arc<dyn sluice_core::transform::Transform>>,
    /// The builds of `transforms`.
    builds: Vec<crate::cli::PluginBuild>,
    geoip: Option<enrich::GeoIp>,
}

impl Loaded {
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let (transforms, builds) =
            crate::cli::load_plugin_builds(config, &config.plugins.tracking_transforms)?
                .into_iter()
                .unzip();
        Ok(Self {
            transforms,
            builds,
            geoip: match &config.tracking.geoip_database {
                Some(path) => Some(enrich::GeoIp::open(path)?),
                None => None,
            },
        })
    }
}

/// Binds `listener`, starts the writers and the idle-session sweeper, and serves until
/// `shutdown` is called (or, with `until_signal`, until SIGTERM / Ctrl-C).
pub async fn start(
    config: Config,
    store: Store,
    listener: TcpListener,
    until_signal: bool,
) -> anyhow::Result<ServerHandle> {
    let loaded = Loaded::load(&config)?;
    start_loaded(config, store, listener, until_signal, loaded).await
}

/// [`start`] with what it loads from files already loaded.
pub async fn start_loaded(
    config: Config,
    store: Store,
    listener: TcpListener,
    until_signal: bool,
    loaded: Loaded,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    // Counters that may first count a failure exist at 0 from the start: that first
    // failure is then an increase an alert sees, not a new series.
    sluice_connectors::mongo::declare_dead_letter_metrics();
    sluice_core::tracking::count_clamped(0);
    sluice_core::aggregate::count_revenue_saturated(0);
    sluice_connectors::mongo::count_sessions_unread(0);
    sluice_core::metrics::count(
        sluice_core::tracking::AMOUNTS_UNREAD,
        sluice_core::tracking::AMOUNTS_UNREAD_HELP,
        &[],
        0,
    );
    for what in tracking::BODY_REPAIRS {
        sluice_core::metrics::count(
            tracking::BODIES_REPAIRED,
            tracking::BODIES_REPAIRED_HELP,
            &[("what", what)],
            0,
        );
    }
    process::mark_started();
    for task in sluice_core::metrics::BACKGROUND_TASKS {
        sluice_core::metrics::count_background_error(task, 0);
    }
    let t = config.tracking.clone();
    let writer = EventWriter::new(
        store.clone(),
        WriterOptions {
            session_gap: Duration::from_secs(t.session_timeout_minutes * 60),
            ..WriterOptions::default()
        },
    );
    let (batcher, writers) = Batcher::start(
        writer,
        t.queue_capacity,
        t.write_batch_size,
        t.writers,
        Admission {
            // Half the write deadline at most (the config holds it to that, saying so): a
            // request let in late still has time to be written before its deadline.
            wait: Duration::from_millis(t.queue_wait_ms),
            // A writer that has not finished a write for half the write deadline leaves
            // its requests to time out anyway.
            stuck_after: Duration::from_millis(t.write_timeout_seconds * 500),
        },
        metrics.clone(),
    );
    let trusted = config
        .trusted_proxies
        .iter()
        .filter_map(|p| enrich::IpNet::parse(p))
        .collect();
    let plugin_watch = (!loaded.builds.is_empty()).then(|| {
        spawn_plugin_watch(
            config.plugins.dir.clone(),
            loaded.builds,
            Duration::from_secs(config.scheduler.reload_seconds.max(1)),
        )
    });
    let state = AppState {
        limiter: Arc::new(auth::RateLimiter::new(config.rate_limit_per_key)),
        client_limiter: Arc::new(auth::RateLimiter::new(config.rate_limit_per_client)),
        login_guard: Arc::new(admin::LoginGuard::default()),
        analytics: Arc::new(tokio::sync::Semaphore::new(admin::ANALYTICS_QUERIES)),
        transform_slots: Arc::new(tokio::sync::Semaphore::new(config.plugins.instances.max(1))),
        transforms: Arc::new(loaded.transforms),
        trusted: Arc::new(trusted),
        geoip: loaded.geoip.map(Arc::new),
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            config.tracking.max_in_flight_mb << 20,
        )),
        other_in_flight: Arc::new(tokio::sync::Semaphore::new(OTHER_IN_FLIGHT)),
        client_bytes: Arc::new(ClientBytes::new(
            config.tracking.max_in_flight_per_client_mb,
            config.tracking.max_in_flight_mb,
        )),
        config: Arc::new(config),
        store: store.clone(),
        batcher,
        metrics: metrics.clone(),
    };
    let handle_metrics = state.metrics.clone();
    let queue = state.batcher.clone();
    let app = router(state.clone());
    // Probes and scrapes on an address of their own: outside the public listener's
    // connection cap, up until the write queue has drained.
    let ops =
        match state.config.ops_listen {
            Some(at) => Some(TcpListener::bind(at).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on `server.ops_listen` ({at}): {e}")
            })?),
            None => None,
        };
    let ops_addr = ops.as_ref().map(TcpListener::local_addr).transpose()?;
    let ops_task = ops.map(|listener| {
        let app = ops_router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the ops listener stopped");
            }
        })
    });
    let draining = state.draining.clone();
    let limits = listen::Limits {
        header_timeout: state.config.header_timeout,
        max_connections: state.config.max_connections,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // The login's stand-in hash, made now rather than by the first login for an unknown
    // email (which would take twice as long as one for a known email).
    tokio::task::spawn_blocking(admin::warm_up);
    let sweeper = spawn_sweeper(
        store,
        Duration::from_secs(t.session_timeout_minutes * 60),
        metrics.clone(),
    );
    let join = tokio::spawn(async move {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let stop = {
            let stopping = stopping.clone();
            async move {
                if until_signal {
                    tokio::select! {
                        _ = stop_rx => {},
                        _ = shutdown_signal() => {},
                    }
                } else {
                    let _ = stop_rx.await;
                }
                tracing::info!("shutting down: no new requests, draining the write queue");
                draining.store(true, std::sync::atomic::Ordering::SeqCst);
                stopping.notify_one();
            }
        };
        // Requests in flight get as long as a write may take, and a little more; a client
        // that keeps a request open longer (a body trickling in) does not hold the
        // shutdown up.
        let grace = Duration::from_secs(t.write_timeout_seconds + 10);
        let deadline = async move {
            stopping.notified().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = listen::serve(listener, app, limits, metrics, stop) => {}
            _ = deadline => {
                tracing::warn!(seconds = grace.as_secs(), "requests still open after the shutdown grace period are not waited for (none of them was acknowledged; what they submit now is refused)");
            }
        }
        // The connections still open were aborted with `serve`; a handler still running
        // on another thread at that instant cannot queue more (it answers 503
        // `shutting_down`): the writers write what is queued and end.
        queue.close();
        drop(queue);
        sweeper.abort();
        if let Some(w) = plugin_watch {
            w.abort();
        }
        // The router (and its Batcher clones) is gone: writers drain the queue and end.
        // Every request has been answered by now, and one is answered 200 only once its
        // events are written: what is still queued belongs to requests answered 503
        // (their clients resend). So a store that stopped answering may hold the
        // shutdown only so long.
        let drain = Duration::from_secs(t.write_timeout_seconds * 3);
        let aborts: Vec<_> = writers.iter().map(|w| w.abort_handle()).collect();
        if tokio::time::timeout(drain, futures_util::future::join_all(writers))
            .await
            .is_err()
        {
            tracing::error!(
                seconds = drain.as_secs(),
                "the write queue did not drain (MongoDB is not answering); its events belong to requests answered 503, whose clients resend them"
            );
            for a in aborts {
                a.abort();
            }
        } else {
            tracing::info!("the write queue is drained: every request answered 200 is stored");
        }
        if let Some(ops) = ops_task {
            ops.abort();
        }
    });
    drop(state);
    Ok(ServerHandle {
        addr,
        ops_addr,
        metrics: handle_metrics,
        stop: Some(stop_tx),
        join,
    })
}

/// Warns, once per build, when a plugin the tracking endpoint runs has another build
/// installed (`plugin install`): the endpoint keeps the build it started with until a
/// restart, while the process's scheduled runs load the installed one at their next run,
/// so two builds are live at once.
/// Looked at every `every` (`scheduler.reload_seconds`, how often configs are re-read).
fn spawn_plugin_watch(
    dir: String,
    running: Vec<crate::cli::PluginBuild>,
    every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut warned: Vec<(String, String)> = Vec::new();
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for b in &running {
                let dir = std::path::PathBuf::from(&dir);
                let name = b.name.clone();
                let Ok(Some((version, sha256))) = tokio::task::spawn_blocking(move || {
                    sluice_plugins::installed_build(&dir, &name)
                })
                .await
                else {
                    continue;
                };
                if sha256 == b.sha256 || warned.contains(&(b.name.clone(), sha256.clone())) {
                    continue;
                }
                let installed = crate::cli::PluginBuild {
                    name: b.name.clone(),
                    version,
                    sha256,
                };
                tracing::warn!(
                    "the tracking endpoint runs plugin {b}, but {installed} is installed: tracked events go through {b} until `sluice serve` restarts, while this process's scheduled runs load {installed} from their next run"
                );
                warned.push((installed.name, installed.sha256));
            }
        }
    })
}

fn spawn_sweeper(store: Store, idle: Duration, metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60).min(idle));
        loop {
            tick.tick().await;
            match expire_idle_sessions(&store, idle).await {
                Ok(n) => {
                    metrics
                        .sessions_expired
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    sluice_core::metrics::count_background_error("session_sweeper", 1);
                    tracing::warn!(error = %e, "session sweeper failed")
                }
            }
        }
    })
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    #[test]
    fn a_throttled_line_passes_once_a_period_and_counts_the_rest() {
        let t = Throttle::new();
        // Long enough that the calls in between cannot outlast it on a loaded machine.
        let every = Duration::from_secs(1);
        assert_eq!(t.pass(every), Some(0));
        assert_eq!(t.pass(every), None);
        assert_eq!(t.pass(every), None);
        std::thread::sleep(Duration::from_millis(1_100));
        assert_eq!(t.pass(every), Some(2));
        assert_eq!(t.pass(every), None);
    }

    #[tokio::test]
    async fn a_handler_that_panics_answers_a_json_500() {
        let app: Router = Router::new().route(
            "/boom",
            get(|| async {
                if true {
                    panic!("boom");
                }
                "unreachable"
            }),
        );
        let config =
            sluice_core::config::validate("test", &Default::default(), Default::default(), &|_| {
                None
            })
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let app = app.layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            count_responses,
        ));
        let mut app = outer_layers(app, &config);
        let request = axum::http::Request::get("/boom")
            .header("origin", "https://shop.example")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // Readable by the browser that sent it.
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "internal", "{body}");
        // Counted as the 500 it was answered with.
        assert!(
            metrics
                .render(0, 0)
                .contains("sluice_http_responses_total{route=\"/boom\",status=\"500\"} 1"),
            "{}",
            metrics.render(0, 0)
        );
    }
}
