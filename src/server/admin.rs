//! The admin and analytics API. Admin users (`admin_users`, bcrypt hashes, roles ADMIN /
//! ANALYST / USER) log in for an expiring bearer token (stored only as its SHA-256).
//! ADMIN manages users and configs, ANALYST also triggers jobs and reads analytics, USER
//! reads jobs and configs. Login failures are rate limited per email and per client, and
//! every failure looks the same, so no answer tells whether an email exists.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bson::{doc, Bson, DateTime, Document};
use futures_util::{FutureExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_core::model::{collections as c, common, integration_fields as f, AdminUser, Role};

use super::{ApiError, AppState};

/// Tokens live this long.
pub const TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);
/// Failed logins allowed per window for one email from one client...
const MAX_FAILURES: usize = 5;
/// ...from one client, whatever the emails (one client trying many accounts)...
const MAX_CLIENT_FAILURES: usize = 20;
/// ...and for one email from any client (guesses spread over many addresses). Higher
/// than the first, so a stranger guessing from one address cannot lock a named admin
/// out: that takes guesses from several addresses.
const MAX_EMAIL_FAILURES: usize = 50;
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
const MAX_EMAIL_BYTES: usize = 254;
/// bcrypt reads only the first 72 bytes of a password: a longer one would let every
/// password sharing its first 72 bytes in.
const MAX_PASSWORD_BYTES: usize = 72;
/// Admin request bodies (a config file is the largest).
pub const MAX_ADMIN_BODY: usize = 256 * 1024;
/// Computes the stand-in hash ahead of the first login (a blocking bcrypt hash).
pub fn warm_up() {
    let _ = dummy_hash();
}

/// Verified when the email is unknown, so both paths cost one bcrypt check.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| bcrypt::hash("no such user", bcrypt::DEFAULT_COST).unwrap_or_default())
}

/// Login attempts by email and by client address: failures within the window, and
/// attempts still being checked (reserved before the password is verified, so a burst of
/// concurrent guesses is counted as it arrives, not after each bcrypt check). Keys whose
/// attempts have all aged out are dropped, so unanswered guesses cannot grow the map.
pub struct LoginGuard {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    /// Bounds the bcrypt checks running at once (each takes a core for ~0.25 s); a
    /// permit is held by the check itself, so a client that hangs up does not free it.
    verifying: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            attempts: Mutex::default(),
            verifying: std::sync::Arc::new(tokio::sync::Semaphore::new(cores.div_ceil(2).max(1))),
        }
    }
}

/// An attempt counted against its keys until it succeeds (or is abandoned unanswered).
struct Attempt {
    guard: std::sync::Arc<LoginGuard>,
    keys: Vec<String>,
    at: Instant,
    failed: bool,
}

impl LoginGuard {
    /// A password check of `email`'s from `client`, under the login limits (per client
    /// and email, per client, per email); `None` when one is reached.
    fn password_attempt(self: &std::sync::Arc<Self>, client: &str, email: &str) -> Option<Attempt> {
        self.attempt(vec![
            (format!("pair:{client} {email}"), MAX_FAILURES),
            (format!("ip:{client}"), MAX_CLIENT_FAILURES),
            (format!("email:{email}"), MAX_EMAIL_FAILURES),
        ])
    }

    /// Counts an attempt for every key, or refuses it when a key already has its limit
    /// of attempts in the window.
    fn attempt(self: &std::sync::Arc<Self>, limits: Vec<(String, usize)>) -> Option<Attempt> {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, list| list.iter().any(|t| t.elapsed() < FAILURE_WINDOW));
        }
        for (k, limit) in &limits {
            if let Some(list) = map.get_mut(k) {
                list.retain(|t| t.elapsed() < FAILURE_WINDOW);
                if list.len() >= *limit {
                    return None;
                }
            }
        }
        let keys: Vec<String> = limits.into_iter().map(|(k, _)| k).collect();
        let at = Instant::now();
        for k in &keys {
            map.entry(k.clone()).or_default().push(at);
        }
        Some(Attempt {
            guard: self.clone(),
            keys,
            at,
            failed: false,
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }
}

impl Attempt {
    /// Keeps the attempt counted as a failure.
    fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        let mut map = self
            .guard
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            if let Some(list) = map.get_mut(k) {
                if let Some(i) = list.iter().position(|t| *t == self.at) {
                    list.swap_remove(i);
                }
                if list.is_empty() {
                    map.remove(k);
                }
            }
        }
    }
}

fn token_hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// What a token keeps of the password hash it was signed in with (`pw`): a token minted
/// by a login whose check was in flight while the password was changed (after the change
/// deleted the user's tokens) names the old hash, and is refused.
fn password_version(hash: &str) -> String {
    token_hash(hash)[..16].to_string()
}

fn rank(role: Role) -> u8 {
    match role {
        Role::User => 1,
        Role::Analyst => 2,
        Role::Admin => 3,
    }
}

/// The path of the one API route that takes a body from a caller not signed in.
pub const LOGIN_PATH: &str = "/v1/admin/login";
/// What `POST /v1/admin/login` reads at most (an email and a password).
pub const MAX_LOGIN_BODY: usize = 16 * 1024;

/// Whether the request carries a valid token (of any role): checked before a body sent to
/// the API is read, so that only signed-in callers can make the server hold one.
pub(super) async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    caller(state, headers, Role::User).await.map(|_| ())
}

/// A token that signs no one in, saying `why`, so a dashboard can tell "sign in" from
/// "your session ended"; the code is one (`unauthorized`: sign in again).
fn token_refused(why: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
        .header("www-authenticate", "Bearer error=\"invalid_token\"")
}

/// The caller, from `Authorization: Bearer TOKEN`, if at least `min`.
async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    min: Role,
) -> Result<(String, Role), ApiError> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no token: sign in with `POST /v1/admin/login` and send `Authorization: Bearer TOKEN`",
        )
        .header("www-authenticate", "Bearer")
    })?;
    let found = state
        .store
        .collection(c::ADMIN_TOKENS)
        .find_one(doc! { common::ID: token_hash(token), "expiresAt": { "$gt": state.store.now() } })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "try again",
            )
        })?
        .ok_or_else(|| {
            token_refused("the token is unknown, expired (after 8 hours) or ended by a logout or a password change: sign in again")
        })?;
    // The user as it is now, not as it was at login: deactivating a user or changing
    // their role takes effect on their next request.
    let email = found.get_str("email").unwrap_or("").to_string();
    let user = state
        .store
        .collection(c::ADMIN_USERS)
        .find_one(doc! { "email": &email })
        .await
        .map_err(store_error)?
        .filter(|u| u.get_bool("isActive").unwrap_or(false))
        .ok_or_else(|| token_refused("the account is deactivated or deleted"))?;
    // Signed in with a password since changed (tokens from before `pw` was kept have
    // none: they end by expiring, or with the user's next change).
    if let Ok(pw) = found.get_str("pw") {
        if user.get_str("password").map(password_version).as_deref() != Ok(pw) {
            return Err(token_refused(
                "the password changed since this token was issued: sign in again",
            ));
        }
    }
    let role = Role::parse(user.get_str("role").unwrap_or(""))
        .map_err(|_| token_refused("the account's stored role is not one Sluice knows"))?;
    if rank(role) < rank(min) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the {min} role or higher"),
        ));
    }
    Ok((email, role))
}

/// `POST /v1/admin/logout`: the caller's token stops working at once.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    caller(&state, &headers, Role::User).await?;
    if let Some(token) = bearer(&headers) {
        state
            .store
            .collection(c::ADMIN_TOKENS)
            .delete_one(doc! { common::ID: token_hash(token) })
            .await
            .map_err(store_error)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 11.1).
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim_start_matches(' '))
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: Option<String>,
    #[serde(rename = "isActive")]
    is_active: Option<bool>,
    /// A new password (a reset by an admin): the user's sessions end.
    password: Option<String>,
}

/// `PATCH /v1/admin/users/{email}` with `{"role": ..., "isActive": ..., "password": ...}`:
/// changes take effect on the user's next request; deactivating, reactivating or a
/// password reset (not of another ADMIN) also deletes their tokens. An admin cannot change
/// their own account, so the last admin cannot lock everyone out.
async fn change_user(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Path(email): Path<String>,
    body: Result<Json<UserChange>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (me, _) = caller(&state, &headers, Role::Admin).await?;
    let body = json_body(body)?;
    let email = email.trim().to_ascii_lowercase();
    if email == me {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_user",
            "an admin cannot change their own role, deactivate themselves or reset their own password here (change it with POST /v1/admin/password)",
        ));
    }
    let mut set = doc! { common::UPDATED_AT: state.store.now() };
    if let Some(role) = &body.role {
        let role = role_param(role)?;
        set.insert("role", role.as_str());
    }
    if let Some(active) = body.is_active {
        set.insert("isActive", active);
    }
    if let Some(password) = &body.password {
        // Not another ADMIN's: the resetting admin could then act as them, their actions
        // logged under the other's name. An ADMIN changes their own, or one is set with
        // `sluice admin set-password` by whoever runs the deployment.
        let target_role = state
            .store
            .collection(c::ADMIN_USERS)
            .find_one(doc! { "email": &email })
            .await
            .map_err(store_error)?
            .and_then(|u| u.get_str("role").ok().map(str::to_string));
        // Nor reset and made ADMIN at once. (Checked again as the change commits.)
        let to_admin = body.role.as_deref().and_then(|r| Role::parse(r).ok()) == Some(Role::Admin);
        if target_role.as_deref() == Some(Role::Admin.as_str()) || to_admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                ADMIN_RESET_REFUSED,
            ));
        }
        let hash = password_hash(password).await.map_err(user_error)?;
        set.insert("password", hash);
        set.insert("passwordChangedAt", state.store.now());
    }
    if set.len() == 1 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "expected {\"role\": ...}, {\"isActive\": true|false} and/or {\"password\": ...}",
        ));
    }
    let changed = change_as_admin(&state, &me, &email, set).await?;
    tracing::info!(
        by = %me,
        client = %client_of(&state, peer, &headers),
        user = %email,
        role = body.role.as_deref().unwrap_or("-"),
        is_active = ?body.is_active,
        password_reset = body.password.is_some(),
        "an admin changed a user"
    );
    // Deactivated or reactivated, the user signs in anew: a login whose check was in
    // flight as the user was deactivated may have stored a token after that deletion,
    // useless while the user is inactive, but not to come back with a reactivation. A
    // password reset ends their sessions too.
    if body.is_active.is_some() || body.password.is_some() {
        end_sessions(&state.store, &email)
            .await
            .map_err(store_error)?;
    }
    Ok(Json(plain_json(bson::Bson::Document(with_nulls(
        changed,
        USER_NULLABLE,
    )))))
}

/// The members of an admin user an answer says `null` when never set.
const USER_NULLABLE: &[&str] = &["lastLogin", "passwordChangedAt"];

/// Applies `set` to user `email` in a transaction that also writes the caller's own
/// record, and only while the caller is still an active ADMIN. Two admins changing each
/// other at the same moment therefore write the same two documents: one transaction
/// conflicts and is retried, sees the other's change, and is refused when it took the
/// caller's rights. Checking the caller only when the request arrived (a read) would let
/// both demote each other and leave no admin. The caller never changes themselves, so an
/// active admin always remains.
async fn change_as_admin(
    state: &AppState,
    me: &str,
    email: &str,
    set: Document,
) -> Result<Document, ApiError> {
    let users = state.store.collection(c::ADMIN_USERS);
    let mut session = state
        .store
        .client()
        .start_session()
        .await
        .map_err(store_error)?;
    // The driver runs the body again on a transient transaction error (the other admin's
    // transaction won the conflict) and retries a commit whose outcome is unknown. A
    // refusal is carried out as a custom error, so the transaction is aborted.
    let context = (users, state.store.clone(), me, email, set);
    let run = session
        .start_transaction()
        .write_concern(sluice_connectors::mongo::majority_write_concern())
        .and_run(context, |session, (users, store, me, email, set)| {
            async move {
                let still_admin = users
                    .update_one(
                        doc! { "email": *me, "role": Role::Admin.as_str(), "isActive": true },
                        doc! { "$set": { "lastAdminChangeAt": store.now() } },
                    )
                    .session(&mut *session)
                    .await?;
                if still_admin.matched_count == 0 {
                    return Err(mongodb::error::Error::custom(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "you are no longer an active admin (changed by another admin just now)",
                    )));
                }
                // A password reset lands only on a user who is no ADMIN as it commits (one
                // promoted meanwhile is refused).
                let mut target = doc! { "email": *email };
                let reset = set.contains_key("password");
                if reset {
                    target.insert("role", doc! { "$ne": Role::Admin.as_str() });
                }
                let changed = users
                    .find_one_and_update(target, doc! { "$set": set.clone() })
                    .return_document(mongodb::options::ReturnDocument::After)
                    .projection(doc! { "password": 0, common::ID: 0 })
                    .session(&mut *session)
                    .await?;
                if let Some(changed) = changed {
                    return Ok(changed);
                }
                let exists = reset
                    && users
                        .find_one(doc! { "email": *email })
                        .session(&mut *session)
                        .await?
                        .is_some();
                Err(mongodb::error::Error::custom(if exists {
                    ApiError::new(StatusCode::FORBIDDEN, "forbidden", ADMIN_RESET_REFUSED)
                } else {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        format!("no user `{email}`"),
                    )
                }))
            }
            .boxed()
        });
    // The driver would retry for up to two minutes; an admin request gives up sooner.
    match tokio::time::timeout(ADMIN_CHANGE_TIMEOUT, run).await {
        Ok(Ok(changed)) => Ok(changed),
        Ok(Err(e)) => match e.get_custom::<ApiError>() {
            Some(refusal) => Err(ApiError {
                message: refusal.message.clone(),
                ..ApiError::new(refusal.status, refusal.code, "")
            }),
            None => Err(store_error(e)),
        },
        Err(_) => Err(store_error("the user change did not commit in time")),
    }
}

/// Why a password reset of an ADMIN (or one made ADMIN by the same request) is refused.
const ADMIN_RESET_REFUSED: &str = "an ADMIN's password is not reset through the API (the resetting admin could then act under their name): its owner changes it (POST /v1/admin/password), or it is set with `sluice admin set-password`; a user is made ADMIN by a request of its own";

/// How long a user change may take, conflicts retried included.
const ADMIN_CHANGE_TIMEOUT: Duration = Duration::from_secs(20);

fn store_error(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "admin API store error");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the database failed; try again",
    )
}

#[derive(Deserialize)]
struct Login {
    email: String,
    password: String,
}

/// The query string, or the API's JSON error shape (`400 invalid_parameter`) instead of
/// the framework's plain-text rejection (`?limit=abc`).
fn query_params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", r.body_text()))
}

/// The request body, or the API's JSON error shape instead of the framework's plain-text
/// rejection: `415 unsupported_media_type` without a JSON content type, `400
/// invalid_body` (or 422 for a body of the wrong shape) otherwise.
/// A store error of a step held as a run of a job: `409 already_running` when another
/// run of the job holds its lease, else as [`store_error`].
fn run_store_error(e: sluice_connectors::StoreError) -> ApiError {
    match e {
        sluice_connectors::StoreError::Busy(message) => {
            ApiError::new(StatusCode::CONFLICT, "already_running", message)
        }
        other => store_error(other),
    }
}

/// A role given in a request body: `400 invalid_role` naming the roles when unknown.
fn role_param(text: &str) -> Result<Role, ApiError> {
    // Any case, as the CLI's `--role` takes it.
    Role::parse(&text.to_ascii_uppercase()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_role",
            format!("role: expected {e}"),
        )
    })
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|r| {
        let status = r.status();
        let code = match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            _ => "invalid_body",
        };
        ApiError::new(status, code, r.body_text())
    })
}

async fn login(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(body)?;
    let email = body.email.trim().to_ascii_lowercase();
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong email or password",
        )
        .header("www-authenticate", "Bearer")
    };
    if email.len() > MAX_EMAIL_BYTES || body.password.len() > MAX_PASSWORD_BYTES {
        return Err(refused()); // no such user can exist
    }
    // Behind a load balancer the peer is the balancer: the client is the forwarded one.
    let client = client_of(&state, peer, &headers);
    let Some(attempt) = state.login_guard.password_attempt(&client, &email) else {
        tracing::warn!(email = ?email, client = %client, "a login was refused: too many failed logins (429)");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed logins; wait 15 minutes",
        )
        .retry(900));
    };
    let users = state.store.db().collection::<AdminUser>(c::ADMIN_USERS);
    let user = users
        .find_one(doc! { "email": &email })
        .await
        .map_err(store_error)?;
    let hash = user.as_ref().map(|u| u.password.clone());
    let checked = check_password(&state, attempt, body.password.clone(), hash).await?;
    let (Some(attempt), Some(user)) = (checked, user) else {
        tracing::warn!(email = ?email, client = %client, "a login failed: wrong email or password");
        return Err(refused());
    };
    if !user.is_active {
        attempt.failed();
        tracing::warn!(email = ?email, client = %client, "a login failed: the user is deactivated");
        return Err(refused());
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let expires =
        DateTime::from_millis(state.store.now().timestamp_millis() + TOKEN_TTL.as_millis() as i64);
    state
        .store
        .collection(c::ADMIN_TOKENS)
        .insert_one(doc! {
            common::ID: token_hash(&token), "email": &email, "role": user.role.as_str(),
            "expiresAt": expires, "pw": password_version(&user.password),
        })
        .await
        .map_err(store_error)?;
    let _ = users
        .update_one(
            doc! { "email": &email },
            doc! { "$set": { "lastLogin": state.store.now() } },
        )
        .await;
    tracing::info!(email = %email, role = user.role.as_str(), client = %client, "signed in");
    Ok(Json(
        json!({ "token": token, "role": user.role.as_str(), "expiresIn": TOKEN_TTL.as_secs() }),
    ))
}

async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (email, role) = caller(&state, &headers, Role::User).await?;
    Ok(Json(json!({ "email": email, "role": role.as_str() })))
}

async fn list_users(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::Admin).await?;
    let users: Vec<Document> = state
        .store
        .collection(c::ADMIN_USERS)
        .find(doc! {})
        .projection(doc! { "password": 0, common::ID: 0 })
        .await
        .map_err(store_error)?
        .try_collect()
        .await
        .map_err(store_error)?;
    Ok(Json(json!(users
        .into_iter()
        .map(|u| plain_json(bson::Bson::Document(with_nulls(u, USER_NULLABLE))))
        .collect::<Vec<_>>())))
}

/// `doc` with each of `fields` it lacks as `null`: an answer's members are the same
/// whether or not a value was ever set (a dashboard reads `lastLogin: null`, not a
/// missing member).
fn with_nulls(mut doc: Document, fields: &[&str]) -> Document {
    for field in fields {
        if !doc.contains_key(field) {
            doc.insert(*field, Bson::Null);
        }
    }
    doc
}

#[derive(Deserialize)]
struct NewUser {
    email: String,
    password: String,
    role: String,
}

async fn create_user(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (me, _) = caller(&state, &headers, Role::Admin).await?;
    let body = json_body(body)?;
    let role = role_param(&body.role)?;
    create_admin_user(&state.store, &body.email, &body.password, role)
        .await
        .map_err(user_error)?;
    tracing::info!(
        by = %me,
        client = %client_of(&state, peer, &headers),
        user = %body.email.trim().to_ascii_lowercase(),
        role = role.as_str(),
        "an admin created a user"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({ "email": body.email.trim().to_ascii_lowercase(), "role": role.as_str() })),
    ))
}

/// Why an admin user was not created.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The email or password is refused.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    /// The database (or hashing) failed: nothing is wrong with the request.
    #[error("{0}")]
    Store(String),
}

/// Creates an admin user (also `sluice admin create-user`).
pub async fn create_admin_user(
    store: &sluice_connectors::Store,
    email: &str,
    password: &str,
    role: Role,
) -> Result<(), UserError> {
    let email = email.trim().to_ascii_lowercase();
    if !email.contains('@') || email.len() > MAX_EMAIL_BYTES {
        return Err(UserError::Invalid(format!(
            "`{email}` is not an email address"
        )));
    }
    let hash = password_hash(password).await?;
    let now = store.now();
    let user = AdminUser {
        id: None,
        email: email.clone(),
        password: hash,
        first_name: None,
        last_name: None,
        role,
        is_active: true,
        last_login: None,
        created_at: now,
        updated_at: now,
    };
    let doc = bson::to_document(&user).map_err(|e| UserError::Store(e.to_string()))?;
    store
        .collection(c::ADMIN_USERS)
        .insert_one(doc)
        .await
        .map_err(|e| {
            if sluice_connectors::mongo::is_duplicate_key(&e) {
                UserError::Exists(format!("a user `{email}` already exists"))
            } else {
                UserError::Store(e.to_string())
            }
        })?;
    Ok(())
}

/// The bcrypt hash of `password`, once it is one Sluice takes (12 to 72 bytes).
async fn password_hash(password: &str) -> Result<String, UserError> {
    if password.len() < 12 || password.len() > MAX_PASSWORD_BYTES {
        return Err(UserError::Invalid(format!(
            "a password of 12 to {MAX_PASSWORD_BYTES} bytes (bcrypt ignores the bytes after the first {MAX_PASSWORD_BYTES})"
        )));
    }
    let password = password.to_string();
    tokio::task::spawn_blocking(move || bcrypt::hash(password, bcrypt::DEFAULT_COST))
        .await
        .map_err(|e| UserError::Store(e.to_string()))?
        .map_err(|e| UserError::Store(e.to_string()))
}

/// Sets the password of admin user `email` (also `sluice admin set-password`) and ends
/// their sessions: every token of theirs is deleted, so whoever held the old password
/// (or a token got with it) is signed out.
pub async fn set_admin_password(
    store: &sluice_connectors::Store,
    email: &str,
    password: &str,
) -> Result<(), UserError> {
    let email = email.trim().to_ascii_lowercase();
    let hash = password_hash(password).await?;
    let now = store.now();
    let set = store
        .collection(c::ADMIN_USERS)
        .update_one(
            doc! { "email": &email },
            doc! { "$set": { "password": hash, "passwordChangedAt": now, common::UPDATED_AT: now } },
        )
        .await
        .map_err(|e| UserError::Store(e.to_string()))?;
    if set.matched_count == 0 {
        return Err(UserError::Invalid(format!("no user `{email}`")));
    }
    end_sessions(store, &email)
        .await
        .map_err(|e| UserError::Store(e.to_string()))
}

/// Deletes every token of `email`.
async fn end_sessions(
    store: &sluice_connectors::Store,
    email: &str,
) -> Result<(), mongodb::error::Error> {
    store
        .collection(c::ADMIN_TOKENS)
        .delete_many(doc! { "email": email })
        .await
        .map(|_| ())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current: String,
    new: String,
}

/// `POST /v1/admin/password` with `{"current", "new"}`: a signed-in user changes their own
/// password. The current one is checked as a login's is (and its failures count against
/// the same limits, so a stolen token cannot be used to guess it); every token of the
/// user is then deleted, this one too: they sign in again with the new password.
async fn change_password(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (me, _) = caller(&state, &headers, Role::User).await?;
    let body = json_body(body)?;
    let client = client_of(&state, peer, &headers);
    let Some(attempt) = state.login_guard.password_attempt(&client, &me) else {
        tracing::warn!(email = %me, client = %client, "a password change was refused: too many failed password checks (429)");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed password checks; wait 15 minutes",
        )
        .retry(900));
    };
    let user = state
        .store
        .db()
        .collection::<AdminUser>(c::ADMIN_USERS)
        .find_one(doc! { "email": &me })
        .await
        .map_err(store_error)?
        .ok_or_else(|| token_refused("no such user"))?;
    let ok = check_password(&state, attempt, body.current.clone(), Some(user.password))
        .await?
        .is_some();
    if !ok {
        tracing::warn!(email = %me, client = %client, "a password change was refused: wrong current password");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_credentials",
            "the current password is wrong",
        ));
    }
    set_admin_password(&state.store, &me, &body.new)
        .await
        .map_err(user_error)?;
    tracing::info!(email = %me, client = %client, "an admin user changed their password; their sessions were ended");
    Ok(Json(
        json!({ "email": me, "passwordChanged": true, "message": "every session of yours was ended: sign in again with the new password" }),
    ))
}

/// Checks `password` against `hash`, the stored hash of the user it is given for (`None`:
/// no such user), at most one check per two cores at a time: the attempt back when it
/// matches, else `None`, the attempt counted failed. In a task of its own, so the check,
/// and the failure it records, finish even if the client hangs up.
async fn check_password(
    state: &AppState,
    attempt: Attempt,
    password: String,
    hash: Option<String>,
) -> Result<Option<Attempt>, ApiError> {
    let permit = state
        .login_guard
        .verifying
        .clone()
        .acquire_owned()
        .await
        .map_err(store_error)?;
    Ok(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        // An unknown user is checked against a stand-in hash all the same, so both take a
        // bcrypt check's time (`known &&` first would skip it: a timing oracle telling
        // which emails exist), and fails even with the password the stand-in was made from.
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| dummy_hash().to_string());
        let ok = password.len() <= MAX_PASSWORD_BYTES
            && bcrypt::verify(password, &hash).unwrap_or(false)
            && known;
        if !ok {
            attempt.failed();
            return None;
        }
        Some(attempt)
    })
    .await
    .ok()
    .flatten())
}

/// The client a request comes from, as the login limits count it (behind
/// `trusted_proxies`, the forwarded address; an IPv6 /64 as one).
fn client_of(state: &AppState, peer: std::net::SocketAddr, headers: &HeaderMap) -> String {
    let ip = super::enrich::client_ip(peer.ip(), headers, &state.trusted);
    super::enrich::client_key(ip).to_string()
}

/// A [`UserError`] as the API answers it.
fn user_error(e: UserError) -> ApiError {
    match e {
        UserError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_user", m),
        UserError::Exists(m) => ApiError::new(StatusCode::CONFLICT, "user_exists", m),
        UserError::Store(m) => store_error(m),
    }
}

async fn list_jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::User).await?;
    let jobs = crate::engine::job_overview(&state.config, &state.store)
        .await
        .map_err(store_error)?;
    Ok(Json(json!(jobs
        .into_iter()
        .map(|j| {
            // A job with no cron has no next fire, which is no error: say why instead.
            let (next_fire, error, note) = match (j.next_fire, &j.cron) {
                (Ok(t), _) => (Some(t), None, None),
                (Err(e), Some(_)) => (None, Some(e), None),
                (Err(e), None) => (None, None, Some(e)),
            };
            let last = j.last_run.as_ref();
            json!({
                "name": j.name, "cron": j.cron, "timezone": j.timezone,
                "nextFire": next_fire, "error": error, "note": note,
                "lastRun": last.map(|r| &r.id), "lastStatus": last.map(|r| &r.status),
                "lastEndedAt": last.and_then(|r| r.ended_at.as_ref()),
                "lastCompletedAt": last.and_then(|r| r.last_completed_at.as_ref()),
                "lastError": last.and_then(|r| r.error.as_ref()),
                "running": j.running.as_ref().map(|r| json!({ "run": r.id, "waitingForSlot": r.waiting })),
                "missed": j.missed,
            })
        })
        .collect::<Vec<_>>())))
}

async fn list_configs(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::User).await?;
    let configs: Vec<Document> = state
        .store
        .collection(c::INTEGRATION_CONFIGS)
        .find(doc! {})
        .projection(doc! { "name": 1, "type": 1, "endpoint": 1, "schedule": 1, "isActive": 1, "lastSync": 1, common::ID: 0 })
        .await
        .map_err(store_error)?
        .try_collect()
        .await
        .map_err(store_error)?;
    Ok(Json(json!(configs
        .into_iter()
        .map(|d| plain_json(bson::Bson::Document(with_nulls(
            d,
            &["schedule", "lastSync"]
        ))))
        .collect::<Vec<_>>())))
}

const RESERVED_ENV_PREFIXES: [&str; 2] = ["SLUICE_", "AWS_"];

fn reserved_env(name: &str) -> bool {
    RESERVED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Validates a config from the API in memory, exactly as `sluice configs validate`
/// validates a file: nothing from the body ever names a path on this machine. Its
/// `${env:NAME}` references may not name Sluice's own settings or the cloud credentials:
/// a config sends its secrets to the endpoint it names, so an API caller could otherwise
/// send the database URI or the S3 keys anywhere.
fn validate_api_config(
    config: &sluice_core::config::Config,
    body: &str,
) -> Result<sluice_core::integration::IntegrationFile, Vec<String>> {
    let own = config.env_references();
    let allowed = &config.raw.security.api_config_env;
    // None listed, none allowed: the variables of the server's environment are the
    // operator's, and a config sends its secrets to the endpoint its applier names.
    let listed = |k: &str| {
        allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => k.starts_with(prefix),
            None => a == k,
        })
    };
    // The names refused, each as reserved (true) or as not listed (false).
    let refused = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let env = |k: &str| {
        if reserved_env(k) || own.iter().any(|o| o == k) {
            refused.borrow_mut().insert(k.to_string(), true);
            return None;
        }
        if !listed(k) {
            refused.borrow_mut().insert(k.to_string(), false);
            return None;
        }
        std::env::var(k).ok()
    };
    // A field's line, and where an error of it is said (`request body:LINE`).
    let place = |field: &str| sluice_core::toml_errors::line_and_origin(ORIGIN, body, field);
    let may_reach = config.raw.security.api_configs_may_reach_private_network;
    // What this route refuses of a config beyond what validation does, at its line; read
    // from the TOML alone, so that it is said with the other errors of a file that does
    // not validate, not one round later.
    let api_refusals = |file: &toml::Table| {
        let allow_private_network = file
            .get("allow_private_network")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false);
        let endpoint = file.get("endpoint").and_then(toml::Value::as_str);
        let token_url = file
            .get("auth")
            .and_then(|a| a.get("token_url"))
            .and_then(toml::Value::as_str);
        if allow_private_network && !may_reach {
            let (line, at) = place("allow_private_network");
            return vec![(line, format!("{at}: field `allow_private_network`: configs applied through the API may not reach loopback, private or cloud-metadata addresses (an operator may allow it with `[security] api_configs_may_reach_private_network = true`, or apply the config with `sluice configs apply`)"))];
        }
        if allow_private_network {
            return Vec::new();
        }
        // An address every run would refuse: refused now, with the way out this route has.
        let urls = [("endpoint", endpoint), ("auth.token_url", token_url)];
        urls.into_iter()
            .filter_map(|(field, url)| {
                let kind = sluice_connectors::http::literal_private_host(url?)?;
                let (line, at) = place(field);
                Some((line, format!(
                    "{at}: field `{field}`: `{}` is not a public address ({kind}), which a config reaches only with `allow_private_network = true`; {}",
                    url?,
                    if may_reach {
                        "set it in the config"
                    } else {
                        "configs applied through the API may not (an operator may allow it with `[security] api_configs_may_reach_private_network = true`, or apply the config with `sluice configs apply`)"
                    }
                )))
            })
            .collect::<Vec<_>>()
    };
    let (file, mut said) = match sluice_jobs::configs::validate_text_all(ORIGIN, body, &env) {
        Ok((file, _)) => (Some(file), Vec::new()),
        // An error for a variable refused is said as the refusal, with its reason.
        Err(errors) => {
            let said: Vec<(Option<usize>, String)> = errors
                .iter()
                .map(|e| {
                    let refusal = match e {
                        sluice_core::ConfigError::Invalid {
                            origin,
                            field,
                            expected,
                        } => refused.borrow().iter().find_map(|(name, reserved)| {
                            expected
                                .contains(&format!("environment variable `{name}` to be set"))
                                .then(|| {
                                    format!(
                                        "{origin}: field `{field}`: {}",
                                        refused_env(name, *reserved, allowed)
                                    )
                                })
                        }),
                        _ => None,
                    };
                    (e.line(), refusal.unwrap_or_else(|| e.to_string()))
                })
                .collect();
            (None, said)
        }
    };
    if let Ok(table) = body.parse::<toml::Table>() {
        said.extend(api_refusals(&table));
    }
    match file {
        Some(file) if said.is_empty() => Ok(file),
        _ => {
            sluice_core::toml_errors::first_in_file(&mut said, |(line, _)| *line);
            Err(said.into_iter().map(|(_, e)| e).collect())
        }
    }
}

/// Why an API config may not reference `${env:name}`.
fn refused_env(name: &str, reserved: bool, allowed: &[String]) -> String {
    if reserved {
        format!(
            "`${{env:{name}}}`: configs applied through the API may not reference {}* variables, nor those Sluice's own configuration reads its secrets from; give the connector's secret a name of its own",
            RESERVED_ENV_PREFIXES.join("* or ")
        )
    } else if allowed.is_empty() {
        format!(
            "`${{env:{name}}}`: configs applied through the API may reference only the variables `[security] api_config_env` lists, and it lists none (an operator may list the connectors' variables there, or apply the config with `sluice configs apply`)"
        )
    } else {
        format!(
            "`${{env:{name}}}`: configs applied through the API may reference only the variables `[security] api_config_env` lists ({})",
            allowed.join(", ")
        )
    }
}

/// What the errors of a config from the API name it.
const ORIGIN: &str = "request body";

/// `POST /v1/admin/configs` with a config file (TOML) as the body: validated like
/// `sluice configs apply`, then stored.
async fn apply_config(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller(&state, &headers, Role::Admin).await?;
    // Not UTF-8, or over the body limit: the API's JSON error shape, not axum's text.
    let body = body.map_err(|r| ApiError::new(r.status(), "invalid_body", r.body_text()))?;
    let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", e);
    let file = {
        let config = state.config.clone();
        // Validating parses the body up to a few hundred times (to find every error), and
        // loading compiles the plugins: both off the async threads.
        tokio::task::spawn_blocking(move || {
            let file = validate_api_config(&config, &body)
                .map_err(|all| ApiError::many(StatusCode::BAD_REQUEST, "invalid_config", all))?;
            crate::cli::check_config_transforms(&config, &file)
                .map(|_| file)
                .map_err(|e| bad(format!("{e:#}")))
        })
        .await
        .map_err(|e| bad(e.to_string()))??
    };
    let applied = sluice_jobs::configs::apply(&state.store, &file)
        .await
        .map_err(store_error)?;
    let status = if applied == sluice_jobs::configs::Applied::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "name": file.name,
            "created": applied == sluice_jobs::configs::Applied::Created,
            "changed": applied != sluice_jobs::configs::Applied::Unchanged,
        })),
    ))
}

/// `DELETE /v1/admin/configs/{name}`: as `sluice configs delete`.
async fn delete_config(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::Admin).await?;
    let job = crate::engine::job_name(&name);
    let removed = sluice_jobs::configs::remove(&state.store, &name, &job)
        .await
        .map_err(run_store_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no config `{name}`"),
            )
        })?;
    Ok(Json(json!({
        "name": name,
        "deleted": true,
        "checkpointDropped": removed.checkpoint,
        "savedTokenDropped": removed.saved_token,
    })))
}

async fn set_config_active(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::Admin).await?;
    let body = json_body(body)?;
    let active = body["isActive"].as_bool().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "expected {\"isActive\": true|false}",
        )
    })?;
    let configs = state.store.collection(c::INTEGRATION_CONFIGS);
    let now = state.store.now();
    // Turned on (or off) anew, its schedule takes effect now; a no-op toggle leaves that.
    let flipped = configs
        .update_one(
            doc! { "name": &name, f::IS_ACTIVE: { "$ne": active } },
            doc! { "$set": { f::IS_ACTIVE: active, common::UPDATED_AT: now, f::SCHEDULE_SINCE: now } },
        )
        .await
        .map_err(store_error)?;
    let r = if flipped.matched_count == 1 {
        flipped
    } else {
        configs
            .update_one(
                doc! { "name": &name },
                doc! { "$set": { common::UPDATED_AT: now } },
            )
            .await
            .map_err(store_error)?
    };
    if r.matched_count == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no config `{name}`"),
        ));
    }
    Ok(Json(json!({ "name": name, "isActive": active })))
}

async fn run_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller(&state, &headers, Role::Analyst).await?;
    // It runs the job as its schedule would; days asked for (`{"from", "to"}`) would be
    // ignored, and the caller believe a backfill ran.
    let empty_body = body.iter().all(u8::is_ascii_whitespace)
        || match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Null) => true,
            Ok(Value::Object(o)) => o.is_empty(),
            _ => false,
        };
    if query.as_deref().is_some_and(|q| !q.is_empty()) || !empty_body {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            match name.strip_prefix(crate::engine::EXPORT_PREFIX) {
                Some(_) => format!("this endpoint takes no parameters or body: it runs the job as its schedule would (its next window and late days); to export chosen days, run `sluice jobs run {name} --from DAY --to DAY`"),
                None => "this endpoint takes no parameters or body: an integration fetches what its config and cursor select".to_string(),
            },
        ));
    }
    // Any export schedule or active integration config can be run by hand, scheduled or
    // not. A config stored inactive (`isActive: false`) is not run through the API; the
    // CLI (`sluice import run`, `jobs run`) still runs it on the operator's word.
    let unavailable = store_error;
    let known = match name.strip_prefix(crate::engine::EXPORT_PREFIX) {
        Some(schedule) => state.config.schedules.iter().any(|s| s.name == schedule),
        None => {
            let config = name
                .strip_prefix(crate::engine::INTEGRATION_PREFIX)
                .unwrap_or(&name);
            match sluice_jobs::configs::load(&state.store, config)
                .await
                .map_err(unavailable)?
            {
                Some((_, stored)) if stored.get_bool("isActive") == Ok(false) => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "config_inactive",
                        format!("integration config `{config}` is turned off (isActive: false); turn it on to run it"),
                    ));
                }
                found => found.is_some(),
            }
        }
    };
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no export schedule or integration config `{name}`"),
        ));
    }
    let name = crate::engine::job_name(&name);
    let runner = crate::engine::EngineRunner {
        config: state.config.clone(),
        store: state.store.clone(),
    };
    // Recorded before it starts, so the answer can name the run and its outcome is
    // visible in `GET /v1/admin/jobs` (latestRun) and `sluice jobs history`.
    let run = sluice_jobs::schedule::start_manual_run(&state.store, &name, "admin-api")
        .await
        .map_err(run_store_error)?;
    let job = name.clone();
    let run_id = run.clone();
    tokio::spawn(async move {
        let result = sluice_jobs::schedule::run_and_end_manual_run(
            &runner.store,
            &run_id,
            runner.run_job(&job),
        )
        .await;
        match &result {
            Ok(summary) => tracing::info!(job, run = run_id, summary, "manual run completed"),
            Err(error) => tracing::error!(job, run = run_id, error, "manual run failed"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": name, "runId": run, "status": "started" })),
    ))
}

#[derive(Deserialize)]
struct Window {
    from: Option<String>,
    to: Option<String>,
    limit: Option<i64>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// Refuses a query parameter the endpoint does not read (`tz`, or `to` where only `from`
/// is read): ignored, the answer would be to another question than the one asked.
fn only_params(
    all: Result<Query<Vec<(String, String)>>, QueryRejection>,
    takes: &[&str],
) -> Result<(), ApiError> {
    let mut unknown: Vec<String> = Vec::new();
    for (name, _) in query_params(all)? {
        if !takes.contains(&name.as_str()) && !unknown.contains(&name) {
            unknown.push(name);
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let quoted = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
    let days = if takes.contains(&"from") {
        " (days are UTC)"
    } else {
        ""
    };
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        format!(
            "{} {} no parameter of this endpoint, which reads {}{days}",
            quoted(&unknown),
            if unknown.len() == 1 { "is" } else { "are" },
            quoted(takes)
        ),
    ))
}

fn day_param(
    name: &str,
    value: Option<&str>,
    default: chrono::NaiveDate,
) -> Result<chrono::NaiveDate, ApiError> {
    match value {
        None => Ok(default),
        // Years 1970 to 9999 only: chrono reads signed and five-digit years, and a day
        // at the edge of its range would overflow the window arithmetic.
        Some(v) => chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .ok()
            .filter(|d| (1970..=9999).contains(&chrono::Datelike::year(d)))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    format!("`{name}` must be a YYYY-MM-DD day of 1970 to 9999, got `{v}`"),
                )
            }),
    }
}

/// How long one analytics query may run on the server (a caller that goes away does not
/// stop it).
const ANALYTICS_MAX_TIME: Duration = Duration::from_secs(60);
/// Analytics queries run at once by one process; more are answered `503 busy`. A query
/// counts until the server has finished it, also when its caller went away.
pub const ANALYTICS_QUERIES: usize = 4;
/// The user journey groups at most the user's latest this many events.
const JOURNEY_MAX_EVENTS: i64 = 5_000;

async fn aggregate(state: &AppState, pipeline: Vec<Document>) -> Result<Json<Value>, ApiError> {
    let docs = aggregate_docs(state, pipeline).await?;
    Ok(Json(json!(docs
        .into_iter()
        .map(|d| plain_json(bson::Bson::Document(d)))
        .collect::<Vec<_>>())))
}

/// An answer's value as plain JSON: dates as RFC 3339 text (`2026-11-25T10:00:00.000Z`),
/// as the API writes every time, not extended JSON's `{"$date": ...}`.
fn plain_json(value: bson::Bson) -> Value {
    match value {
        bson::Bson::DateTime(t) => Value::String(crate::engine::rfc3339(t.to_chrono())),
        bson::Bson::Document(d) => {
            Value::Object(d.into_iter().map(|(k, v)| (k, plain_json(v))).collect())
        }
        bson::Bson::Array(items) => Value::Array(items.into_iter().map(plain_json).collect()),
        other => other.into_relaxed_extjson(),
    }
}

/// Runs an analytics pipeline over `events` (on disk where a group outgrows memory).
async fn aggregate_docs(
    state: &AppState,
    pipeline: Vec<Document>,
) -> Result<Vec<Document>, ApiError> {
    // Analytics may read from secondaries (secondary preferred): they may lag the
    // primary by the replication delay, and take no load off it.
    let options = mongodb::options::SelectionCriteria::ReadPreference(
        mongodb::options::ReadPreference::SecondaryPreferred {
            options: Default::default(),
        },
    );
    let Ok(permit) = state.analytics.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{ANALYTICS_QUERIES} analytics queries are running; retry shortly"),
        )
        .retry(5));
    };
    let events = state.store.collection(c::EVENTS);
    // Run to the end in a task of its own, which holds the permit: a caller that hangs
    // up does not stop the query on the server, so it must not free its place either.
    let query = tokio::spawn(async move {
        let _permit = permit;
        let docs: Vec<Document> = events
            .aggregate(pipeline)
            .selection_criteria(options)
            .max_time(ANALYTICS_MAX_TIME)
            .allow_disk_use(true)
            .await?
            .try_collect()
            .await?;
        Ok::<_, mongodb::error::Error>(docs)
    });
    match query.await {
        Ok(docs) => docs.map_err(store_error),
        Err(e) => {
            tracing::error!(error = %e, "an analytics query's task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the query failed; retry shortly",
            ))
        }
    }
}

/// The design document's daily analytics query.
async fn daily(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Window>, QueryRejection>,
    all: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::Analyst).await?;
    only_params(all, &["from", "to"])?;
    let q = query_params(q)?;
    let today = chrono::Utc::now().date_naive();
    let to = day_param("to", q.to.as_deref(), today)?;
    // The week ending `to`, from 1970 on (the earliest day a parameter may name).
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid day");
    let from = day_param(
        "from",
        q.from.as_deref(),
        (to - chrono::Days::new(6)).max(epoch),
    )?;
    // Both ends count: 2024-01-01..=2024-12-31 is 366 days.
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", m);
    if from > to {
        let to_said = if q.to.is_some() {
            format!("`to` ({to})")
        } else {
            format!("today ({to}, UTC), the default `to`")
        };
        return Err(bad(format!("`from` ({from}) is after {to_said}")));
    }
    if (to - from).num_days() + 1 > 366 {
        return Err(bad(format!(
            "`from` ({from}) to `to` ({to}) is {} days; a range holds at most 366",
            (to - from).num_days() + 1
        )));
    }
    refuse_archived_days(&state, from, to).await?;
    let in_window = doc! { "$match": sluice_jobs::export::counted_events(doc! { "$gte": sluice_jobs::export::day_start(from), "$lt": sluice_jobs::export::day_start(to + chrono::Days::new(1)) }) };
    let totals = aggregate_docs(
        &state,
        vec![
            in_window.clone(),
            doc! { "$group": { "_id": sluice_jobs::export::event_day(), "n": { "$sum": 1 } } },
        ],
    )
    .await?;
    let distinct = |field: &'static str| {
        aggregate_docs(
            &state,
            sluice_jobs::export::distinct_per_day(&in_window, field),
        )
    };
    let count_by_day = |rows: Vec<Document>| -> std::collections::HashMap<String, Bson> {
        rows.into_iter()
            .filter_map(|r| Some((r.get_str("_id").ok()?.to_string(), r.get("n")?.clone())))
            .collect()
    };
    let events = count_by_day(totals);
    let users = count_by_day(distinct("userId").await?);
    let sessions = count_by_day(distinct("sessionId").await?);
    let revenue = aggregate_docs(&state, sluice_jobs::export::revenue_per_day(&in_window)).await?;
    // One row per day of the window, a day without events too (a chart reading the rows
    // must not join a quiet Sunday's neighbours).
    Ok(Json(json!(from
        .iter_days()
        .take_while(|d| *d <= to)
        .map(|day| {
            let date = day.format("%Y-%m-%d").to_string();
            let n = |m: &std::collections::HashMap<String, Bson>| {
                m.get(&date).cloned().unwrap_or(Bson::Int32(0))
            };
            // As DAILY_ANALYTICS has them: per currency, exact in millionths.
            let (purchases, per_currency) = sluice_jobs::export::day_revenue(&revenue, &date);
            let per_currency: Vec<Bson> = per_currency
                .into_iter()
                .filter_map(|entry| {
                    let mut entry = entry.as_document()?.clone();
                    let micros = entry.get_i64("revenueMicros").ok()?;
                    entry.insert(
                        "revenue",
                        micros as f64 / sluice_core::aggregate::REVENUE_SCALE,
                    );
                    Some(Bson::Document(entry))
                })
                .collect();
            Bson::Document(doc! {
                "date": &date, "events": n(&events),
                "users": n(&users), "sessions": n(&sessions),
                "purchases": purchases, "revenue": per_currency,
            })
            .into_relaxed_extjson()
        })
        .collect::<Vec<_>>())))
}

/// Days whose events ARCHIVE moved to Parquet and deleted would be counted from what is
/// left (nothing, or a few late events): refused, naming the days, as the
/// DAILY_ANALYTICS export refuses them. An archive run names each day in `export_jobs`
/// from before it deletes anything (`pendingDeletes`) until after (`partitions`).
async fn refuse_archived_days(
    state: &AppState,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> Result<(), ApiError> {
    let days: Vec<chrono::NaiveDate> = from.iter_days().take_while(|d| *d <= to).collect();
    let archived = sluice_jobs::history::archived_days(&state.store, &days)
        .await
        .map_err(store_error)?;
    let Some(last) = archived.last().copied() else {
        return Ok(());
    };
    // The latest day archived at all: a range starting before it meets archived days.
    let latest = sluice_jobs::history::latest_archived_day(&state.store)
        .await
        .ok()
        .flatten()
        .map_or(last, |d| d.max(last));
    let archived: Vec<String> = archived.iter().map(|d| d.to_string()).collect();
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "archived_days",
        format!(
            "days of this range were archived, or are being archived ({}): their events were moved to the ARCHIVE partitions and deleted from MongoDB, so counting them here would report only what arrived later; read the DAILY_ANALYTICS or ARCHIVE partitions for them, or start the range after {}",
            archived.join(", "),
            latest,
        ),
    )
    // For a date picker: the days, and the first a range may start at (after every day
    // archived, those past this range too).
    .field("days", json!(archived))
    .field("firstAllowed", json!((latest + chrono::Days::new(1)).to_string())))
}

/// The design document's top pages query.
async fn top_pages(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Window>, QueryRejection>,
    all: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, Role::Analyst).await?;
    // Always up to today: a `to` would be ignored, so it is refused.
    only_params(all, &["from", "limit"])?;
    let q = query_params(q)?;
    let today = chrono::Utc::now().date_naive();
    let from = day_param("from", q.from.as_deref(), today - chrono::Days::new(7))?;
    // As for the daily analytics: at most a year, and not over days moved to ARCHIVE
    // (their page views are no longer here to count).
    if from > today {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("`from` ({from}) is after today ({today}, UTC)"),
        ));
    }
    if (today - from).num_days() + 1 > 366 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("`from` ({from}) must be within the last 366 days"),
        ));
    }
    refuse_archived_days(&state, from, today).await?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "`limit` must be 1-100",
        ));
    }
    aggregate(&state, vec![
        // Page views without a `pageUrl` are no page to list.
        // Bot traffic left out, as in the daily analytics.
        doc! { "$match": {
            "eventType": "PAGE_VIEW",
            "pageUrl": { "$type": "string" },
            "$and": [sluice_jobs::export::counted_events(doc! { "$gte": sluice_jobs::export::day_start(from) })],
        } },
        // Per page and visitor first: a page's distinct visitors are counted, not collected.
        doc! { "$group": { "_id": { "p": "$pageUrl", "u": "$userId" }, "views": { "$sum": 1 } } },
        doc! { "$group": { "_id": "$_id.p", "views": { "$sum": "$views" }, "uniqueUsers": { "$sum": 1 } } },
        doc! { "$project": { "_id": 0, "pageUrl": "$_id", "views": 1, "uniqueUsers": 1 } },
        doc! { "$sort": { "views": -1, "pageUrl": 1 } },
        doc! { "$limit": limit },
    ]).await
}

/// The design document's user journey query: the user's events by session, the latest
/// session first, each session's events in time order. Its answer is the query's list;
/// when ARCHIVE has moved days out of `events`, `X-Sluice-Archived-Through` names the
/// latest, whose events and those before it the journey cannot show (they are in the
/// ARCHIVE partitions), and `X-Sluice-Journey-Truncated: true` says older events or
/// sessions were left out.
async fn journey(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<Window>, QueryRejection>,
    all: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller(&state, &headers, Role::Analyst).await?;
    only_params(all, &["userId"])?;
    let q = query_params(q)?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", m);
    let user = match q.user_id {
        None => return Err(bad("`userId` is required".into())),
        Some(u) if u.is_empty() => return Err(bad("`userId` is required".into())),
        Some(u) if u.len() > 256 => {
            return Err(bad(format!(
                "`userId` is {} bytes; ids are at most 256",
                u.len()
            )))
        }
        Some(u) => u,
    };
    // Only a note: the journey is answered without it if it cannot be read.
    let archived = sluice_jobs::history::latest_archived_day(&state.store)
        .await
        .ok()
        .flatten();
    // The latest events first (the `userId, timestamp` index), at most
    // JOURNEY_MAX_EVENTS of them (one more, to know whether there were more), so a
    // visitor with a huge history (a bot) cannot make the answer unbounded. Grouped here
    // rather than by `$group`, whose session documents would be held to 16 MB.
    let mut events = aggregate_docs(
        &state,
        vec![
            doc! { "$match": { "userId": &user } },
            doc! { "$sort": { "timestamp": -1 } },
            doc! { "$limit": JOURNEY_MAX_EVENTS + 1 },
            doc! { "$project": {
                "_id": 0, "eventId": 1, "sessionId": 1, "eventType": 1, "timestamp": 1,
                "pageUrl": 1, "referrer": 1, "duration": 1, "metadata.bot": 1,
                "properties.amount": 1, "properties.currency": 1,
            } },
        ],
    )
    .await?;
    let mut truncated = events.len() > JOURNEY_MAX_EVENTS as usize;
    events.truncate(JOURNEY_MAX_EVENTS as usize);
    events.reverse();
    let sessions = journey_sessions(events);
    truncated |= sessions.len() > JOURNEY_MAX_SESSIONS;
    let answer: Vec<Value> = sessions
        .into_iter()
        .take(JOURNEY_MAX_SESSIONS)
        .map(|s| plain_json(Bson::Document(s)))
        .collect();
    let mut response = Json(answer).into_response();
    if let Some(day) = archived {
        if let Ok(value) = axum::http::HeaderValue::from_str(&day.to_string()) {
            response
                .headers_mut()
                .insert("x-sluice-archived-through", value);
        }
    }
    if truncated {
        response.headers_mut().insert(
            "x-sluice-journey-truncated",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// The journey shows at most this many sessions, the latest.
const JOURNEY_MAX_SESSIONS: usize = 100;

/// A journey's sessions from its events in time order: `{_id, sessionId, startTime,
/// endTime, events}` (`_id` as the design document's `$group` names it), the latest
/// session first. Each event: `eventId`, `eventType`, `timestamp`, and those it has of
/// `pageUrl`, `referrer`, `duration`, `bot` (when flagged) and a purchase's `amount` and
/// `currency`.
fn journey_sessions(events: Vec<Document>) -> Vec<Document> {
    let mut order: Vec<Document> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = Default::default();
    for mut event in events {
        let session = event.remove("sessionId").unwrap_or(Bson::Null);
        let mut entry = Document::new();
        for field in [
            "eventId",
            "eventType",
            "timestamp",
            "pageUrl",
            "referrer",
            "duration",
        ] {
            if let Some(v) = event.remove(field) {
                entry.insert(field, v);
            }
        }
        if let Ok(metadata) = event.get_document("metadata") {
            if metadata.get_bool("bot") == Ok(true) {
                entry.insert("bot", true);
            }
        }
        if entry.get_str("eventType") == Ok("PURCHASE") {
            if let Ok(properties) = event.get_document("properties") {
                for field in ["amount", "currency"] {
                    if let Some(v) = properties.get(field) {
                        entry.insert(field, v.clone());
                    }
                }
            }
        }
        let time = entry.get("timestamp").cloned().unwrap_or(Bson::Null);
        let key = session.clone().into_relaxed_extjson().to_string();
        let index = *at.entry(key).or_insert_with(|| {
            order.push(doc! {
                "_id": session.clone(), "sessionId": session, "startTime": time.clone(),
                "endTime": time.clone(), "events": [],
            });
            order.len() - 1
        });
        let s = &mut order[index];
        s.insert("endTime", time);
        if let Ok(list) = s.get_array_mut("events") {
            list.push(Bson::Document(entry));
        }
    }
    // The latest session first, by its start (the events came in time order).
    order.reverse();
    order.sort_by(|a, b| {
        let start = |d: &Document| d.get_datetime("startTime").ok().copied();
        start(b).cmp(&start(a))
    });
    order
}

/// Every answer under the admin and analytics paths, its errors included (a `413` or `405`
/// answered before any route): tokens, users and figures of the moment, which no cache (a
/// shared proxy, the browser's) may keep or serve again.
pub async fn no_store(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path();
    let admin = path.starts_with("/v1/admin/") || path.starts_with("/v1/analytics/");
    let mut response = next.run(request).await;
    if admin {
        response
            .headers_mut()
            .entry(axum::http::header::CACHE_CONTROL)
            .or_insert(axum::http::HeaderValue::from_static("no-store"));
    }
    response
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(LOGIN_PATH, post(login))
        .route("/v1/admin/logout", post(logout))
        .route("/v1/admin/me", get(me))
        .route("/v1/admin/password", post(change_password))
        .route("/v1/admin/users", get(list_users).post(create_user))
        .route("/v1/admin/users/{email}", axum::routing::patch(change_user))
        .route("/v1/admin/configs", get(list_configs).post(apply_config))
        .route("/v1/admin/configs/{name}", delete(delete_config))
        .route("/v1/admin/configs/{name}/active", post(set_config_active))
        .route("/v1/admin/jobs", get(list_jobs))
        .route("/v1/admin/jobs/{name}/run", post(run_job))
        .route("/v1/analytics/daily", get(daily))
        .route("/v1/analytics/top-pages", get(top_pages))
        .route("/v1/analytics/journey", get(journey))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_ADMIN_BODY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_client_cannot_grow_the_guard_and_answered_attempts_are_released() {
        let guard = std::sync::Arc::new(LoginGuard::default());
        let limit = |k: &str| (k.to_string(), MAX_FAILURES);
        let blocked = "ip:203.0.113.1";
        for _ in 0..MAX_FAILURES {
            guard.attempt(vec![limit(blocked)]).unwrap().failed();
        }
        for i in 0..1000 {
            assert!(guard
                .attempt(vec![limit(blocked), limit(&format!("email:{i}@x.io"))])
                .is_none());
        }
        assert_eq!(guard.tracked(), 1, "refused attempts leave nothing behind");
        // An attempt in flight counts; once it succeeds it no longer does.
        let other = "ip:198.51.100.2";
        let held: Vec<_> = (0..MAX_FAILURES)
            .map(|_| guard.attempt(vec![limit(other)]).unwrap())
            .collect();
        assert!(guard.attempt(vec![limit(other)]).is_none(), "5 in flight");
        drop(held);
        assert_eq!(guard.tracked(), 1);
        assert!(guard.attempt(vec![limit(other)]).is_some());
    }

    #[test]
    fn clients_are_counted_by_ipv4_address_and_ipv6_64() {
        let key = |s: &str| crate::server::enrich::client_key(s.parse().unwrap());
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
