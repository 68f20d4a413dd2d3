//! The native API: `POST /v1/events` (one event) and `POST /v1/events/batch`
//! (`{"batch": [...], "sentAt": ...}`), and the stages every tracking request shares
//! (admission, body decoding, enrichment, transforms, the write and the answer). The
//! Segment-compatible API (`segment.rs`) feeds the same stages.
//!
//! Whole-request problems (key, rate, size, malformed JSON) are 4xx JSON errors. In a
//! batch, each event is judged alone: good events are stored, bad ones are listed with
//! their index and reason. A request is answered only once MongoDB acknowledged its
//! events; if the store cannot take them the answer is 503 with `Retry-After`, and
//! resending is safe because events are deduplicated by `eventId`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sluice_connectors::mongo::WriteStatus;
use sluice_core::config::BotPolicy;
use sluice_core::model::{Event, EventMetadata};
use sluice_core::tracking::ReadMembers;
use sluice_core::tracking::{
    check_event, parse_event, parse_time, unknown_members, RequestContext,
};
use sluice_core::transform::client_reason;
use sluice_core::ValidationError;
use tracing::Instrument;

use super::{auth, enrich, ApiError, AppState, InFlight, SubmitError};

/// How one event of a request ended.
enum Outcome {
    Rejected(ValidationError),
    /// A transform failed the event (under `fail-run`); the reason.
    Failed(String),
    Dropped(&'static str),
    /// A transform failed the event under `dead-letter`: kept in `dead_letters`, so
    /// answered `dropped` (not to be resent), with `transform_error` and the reason.
    DeadLettered(String),
    Queued(usize),
    /// A later copy of the event sent at this index (the same eventId): answered as it is,
    /// a copy of one stored being a duplicate. Neither written nor transformed again.
    Copy(usize),
}

pub async fn track(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    held: Option<Extension<InFlight>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // The key in a header, else `writeKey` in the body: `navigator.sendBeacon` cannot set
    // headers.
    let by_header = admit_by_header(&state, &headers)?;
    let body = read_body(&headers, body, state.config.tracking.max_event_bytes)?;
    let mut value: Value = serde_json::from_slice(&body).map_err(malformed)?;
    let body_key = match value.as_object_mut() {
        Some(obj) => obj.remove(BODY_KEY),
        None => None,
    };
    let admitted = admit_after_body(&state, &headers, by_header, body_key.as_ref())?;
    let ctx = request_context(&state, peer, &headers, None, &admitted);
    let event = no_wide_integer(
        std::str::from_utf8(&body).unwrap_or_default(),
        &sluice_core::tracking::EVENT_READ,
    )
    .and_then(|()| parse_event(&value, &ctx, EventMetadata::default()));
    let set_aside = amount_set_aside(&event, Some(&value));
    let warning = warning(&event, Some(&value), set_aside);
    let unread = vec![set_aside];
    // Held until the answer is built, beyond the write.
    let held = held.map(|h| h.0);
    let mut answer = ingest(&state, vec![event], held.clone())
        .instrument(admitted.span())
        .await?;
    answer.note_ignored(vec![unknown_members(&value)]);
    answer.note_sent_ids(vec![string_member(&value, "eventId")], "eventId");
    answer.note_warnings(vec![warning]);
    answer.count_amounts_unread(&unread);
    answer.into_single_response("invalid_event")
}

/// What a client should hear of an event stored not quite as sent ([`revenue_warning`],
/// an IDENTIFY's traits not copied to the profile, and the URL fields cut at their
/// limit), `sent` as the client sent it, its amount `set_aside` ([`amount_set_aside`]).
fn warning(
    event: &Result<Event, ValidationError>,
    sent: Option<&Value>,
    set_aside: bool,
) -> Option<String> {
    let e = event.as_ref().ok()?;
    let cut = sent
        .map(sluice_core::tracking::cut_urls)
        .unwrap_or_default();
    let mut said: Vec<String> = revenue_warning(event, set_aside).into_iter().collect();
    if e.event_type == sluice_core::model::EventType::Identify {
        said.extend(sluice_core::segment::traits_warning(
            &e.properties,
            "properties",
        ));
    }
    said.extend(cut.iter().map(|field| {
        format!(
            "`{field}` is longer than {} bytes: stored cut there",
            sluice_core::tracking::MAX_URL_LEN
        )
    }));
    (!said.is_empty()).then(|| said.join("; "))
}

/// Whether `event` is a PURCHASE whose amount (`sent` as the client sent it) could not
/// be read: set aside as `properties.amountUnread`. A client's own `amountUnread` sent
/// without an amount is no amount that could not be read (and beside one that cannot be
/// read, it is refused).
fn amount_set_aside(event: &Result<Event, ValidationError>, sent: Option<&Value>) -> bool {
    use sluice_core::model::event_fields as f;
    let Ok(e) = event else { return false };
    let sent_amount = sent
        .and_then(|v| v.pointer("/properties/amount"))
        .is_some_and(|a| !a.is_null());
    sent_amount
        && e.event_type == sluice_core::model::EventType::Purchase
        && !e.properties.contains_key(f::AMOUNT)
        && e.properties.contains_key(f::AMOUNT_UNREAD)
}

/// What a client should hear of an event stored as sent but probably not as meant: a
/// PURCHASE without `properties.amount` counts in the visitor's purchases with no revenue
/// (a `revenue` or `total` property, Segment's names, is not read here).
fn revenue_warning(event: &Result<Event, ValidationError>, set_aside: bool) -> Option<String> {
    let e = event.as_ref().ok()?;
    if e.event_type != sluice_core::model::EventType::Purchase
        || e.properties
            .contains_key(sluice_core::model::event_fields::AMOUNT)
    {
        return None;
    }
    if set_aside {
        return Some(sluice_core::tracking::amount_unread_warning(
            "properties.amount",
            None,
            Some("properties.amountUnread"),
        ));
    }
    let named = ["revenue", "total", "value", "price"]
        .into_iter()
        .find(|k| e.properties.contains_key(*k));
    Some(match named {
        Some(k) => format!(
            "a PURCHASE without `properties.amount` counts no revenue (`properties.{k}` is not read as the amount)"
        ),
        None => "a PURCHASE without `properties.amount` counts no revenue".to_string(),
    })
}

/// A write key sent in a body, by a client that cannot set headers (`sendBeacon`).
pub(super) const BODY_KEY: &str = "writeKey";

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<Value>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<Value>,
    /// Said of every event of the batch (`ip`, `userAgent`), as an event's own context;
    /// read once the request is admitted.
    #[serde(default, borrow)]
    context: Option<&'a RawValue>,
}

/// A native batch's own `context`: its `ip` and `userAgent` stand for each event that
/// does not say its own (when the request's key may say where its events came from).
/// What cannot be read of it is not applied and is named (`context.ip`, or `context`
/// when it is not an object) among the batch's `ignored`, rather than refusing the
/// batch: SDKs drop a batch answered 400, and every event of it would be lost.
fn apply_batch_context(ctx: &mut RequestContext, context: Option<&RawValue>) -> Vec<String> {
    use sluice_core::tracking::{context_ip, context_not_read, context_user_agent};
    let Some(context) = context else {
        return Vec::new();
    };
    let context: Value = serde_json::from_str(context.get()).unwrap_or(Value::Null);
    let Value::Object(members) = &context else {
        return if context.is_null() {
            Vec::new()
        } else {
            vec!["context".to_string()]
        };
    };
    let mut ignored = context_not_read(&context);
    // Each read on its own: one that cannot be read leaves the other standing.
    let mut unread = |name: &str| {
        ignored.push(format!("context.{name}"));
        None
    };
    let ua = context_user_agent(members).unwrap_or_else(|_| unread("userAgent"));
    let ip = context_ip(members).unwrap_or_else(|_| unread("ip"));
    if !ctx.ignore_client_context {
        ctx.user_agent = ua.or(ctx.user_agent.take());
        ctx.ip = ip.or(ctx.ip.take());
    }
    ignored.truncate(10);
    ignored
}

pub async fn batch(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    held: Option<Extension<InFlight>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let by_header = admit_by_header(&state, &headers)?;
    let limits = &state.config.tracking;
    let body = read_body(&headers, body, limits.max_batch_bytes)?;
    let parsed: BatchBody = parse_batch(&body, "events")?;
    let admitted = admit_after_body(&state, &headers, by_header, parsed.write_key.as_ref())?;
    check_batch_len(&state, parsed.batch.len(), "events")?;
    let sent_at = batch_sent_at(parsed.sent_at.as_ref())?;
    let mut ctx = request_context(&state, peer, &headers, sent_at, &admitted);
    let context_ignored = apply_batch_context(&mut ctx, parsed.context);
    let mut ignored = Vec::with_capacity(parsed.batch.len());
    let mut sent_ids = Vec::with_capacity(parsed.batch.len());
    let mut warnings = Vec::with_capacity(parsed.batch.len());
    let mut unread = Vec::with_capacity(parsed.batch.len());
    let values: Vec<Result<Event, ValidationError>> = parsed
        .batch
        .iter()
        .map(|raw| {
            let item = batch_item(&state, raw, "event", &sluice_core::tracking::EVENT_READ);
            ignored.push(item.as_ref().map(unknown_members).unwrap_or_default());
            sent_ids.push(match &item {
                Ok(v) => string_member(v, "eventId"),
                // Too large to be read as an event, it is still read for its id.
                Err(_) => sent_id(raw, "eventId"),
            });
            let event = item
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|v| parse_event(v, &ctx, EventMetadata::default()));
            let set_aside = amount_set_aside(&event, item.as_ref().ok());
            warnings.push(warning(&event, item.as_ref().ok(), set_aside));
            unread.push(set_aside);
            event
        })
        .collect();
    let held = held.map(|h| h.0);
    let mut answer = ingest(&state, values, held.clone())
        .instrument(admitted.span())
        .await?;
    answer.note_ignored(ignored);
    // The batch's own members not read, then what of its context was not.
    let mut batch_ignored =
        batch_members_not_read(&body, &["batch", "sentAt", BODY_KEY, "context"]);
    batch_ignored.extend(context_ignored);
    batch_ignored.truncate(10);
    answer.note_batch_ignored(batch_ignored);
    answer.note_sent_ids(sent_ids, "eventId");
    answer.note_warnings(warnings);
    answer.count_amounts_unread(&unread);
    Ok(answer.into_batch_response(&headers))
}

/// The body of a batch request, with its items left as raw JSON until each is checked.
pub(super) fn parse_batch<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    what: &str,
) -> Result<T, ApiError> {
    // serde would also read a struct written as a JSON array; a batch is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_batch",
            format!("expected {{\"batch\": [{what}...]}}, got a JSON array"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_batch",
                format!("expected {{\"batch\": [{what}...]}}: {e}"),
            )
        } else {
            malformed(e)
        }
    })
}

/// The top-level members of a batch body that `known` does not take (at most 10, each
/// cut at 64 characters; `_`-prefixed ones, which SDKs add for themselves, left out): a
/// member a client meant (a misspelt `sentAt`) would otherwise be dropped without a word.
/// The body is skimmed again for its keys alone.
pub(super) fn batch_members_not_read(body: &[u8], known: &[&str]) -> Vec<String> {
    struct Keys(Vec<String>);
    struct KeysVisitor;
    impl<'de> serde::de::Visitor<'de> for KeysVisitor {
        type Value = Keys;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(k);
            }
            Ok(Keys(keys))
        }
    }
    impl<'de> Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(KeysVisitor)
        }
    }
    serde_json::from_slice::<Keys>(body)
        .map(|k| {
            sluice_core::tracking::names_not_read(k.0.iter().map(String::as_str), |k| {
                known.contains(&k) || k.starts_with('_')
            })
        })
        .unwrap_or_default()
}

/// `tracking.max_batch_events`; `what` names the items in the error.
pub(super) fn check_batch_len(state: &AppState, n: usize, what: &str) -> Result<(), ApiError> {
    check_batch_len_at(state.config.tracking.max_batch_events, n, what)
}

/// The messages a Segment batch may hold: SDKs cut their batches by bytes only (about
/// 500 KB), so an app back online sends thousands of small messages at once, and a 413
/// would make it drop them. Half a writer's share of the queue (2,500 by default): one
/// visitor's events all go to one writer, whose share must have room for them at once,
/// so a batch as large as the whole share would be refused (503) whenever that writer
/// holds anything. Never fewer than `max_batch_events`; the byte limits still apply.
pub(super) fn segment_batch_messages(state: &AppState) -> usize {
    let t = &state.config.tracking;
    (t.queue_capacity / t.writers.max(1) / 2).max(t.max_batch_events)
}

pub(super) fn check_batch_len_at(max: usize, n: usize, what: &str) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("a batch holds at most {max} {what}, this one has {n}"),
        ));
    }
    Ok(())
}

/// A batch's `sentAt`, if any.
pub(super) fn batch_sent_at(v: Option<&Value>) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_time("sentAt", v)
            .map(Some)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_batch", e.to_string())),
    }
}

/// One item of a batch: `tracking.max_event_bytes` as sent, then parsed; a failure is
/// that item's (`what`) alone.
pub(super) fn batch_item(
    state: &AppState,
    raw: &RawValue,
    what: &str,
    members: &ReadMembers,
) -> Result<Value, ValidationError> {
    let max = state.config.tracking.max_event_bytes;
    if raw.get().len() > max {
        return Err(ValidationError::new(
            what,
            format!("larger than {max} bytes"),
        ));
    }
    let value = serde_json::from_str(raw.get()).map_err(|e| {
        ValidationError::new(what, deeper_than_read(&e).unwrap_or_else(|| e.to_string()))
    })?;
    no_wide_integer(raw.get(), members)?;
    Ok(value)
}

/// Refuses an event (or message) `text` holding, in a member it reads, an integer no
/// signed 64-bit integer holds (ids: beyond 2^64 - 1): parsed, it is a rounded double (or
/// an unsigned integer MongoDB has no type for), and the value stored would not be the
/// one sent.
pub(super) fn no_wide_integer(text: &str, members: &ReadMembers) -> Result<(), ValidationError> {
    match sluice_core::tracking::integer_beyond_int64(text, members.read, members.ids) {
        Some((path, number)) => Err(ValidationError::new(
            path,
            format!("`{number}` is an integer beyond the 64-bit range, which would be stored rounded (send such numbers as strings)"),
        )),
        None => Ok(()),
    }
}

/// A string member of a JSON object, cut to 256 characters (an id as echoed back).
pub(super) fn string_member(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(|id| id.chars().take(256).collect())
}

/// The id member `key` of a batch item that was not read as an event or message.
pub(super) fn sent_id(raw: &RawValue, key: &str) -> Option<String> {
    serde_json::from_str::<Value>(raw.get())
        .ok()
        .and_then(|v| string_member(&v, key))
}

/// A request its write key admitted.
pub(super) struct Admitted {
    /// The key it is accounted to (the rate limit); empty when no key is required.
    key: String,
    /// Whether its events may say where they came from (`context.ip`, ...): keys in
    /// `server_write_keys`, or every key when that list is empty.
    client_context: bool,
    /// Which key it is, as logged: `write_keys[1]`, `server_write_keys[0]`, or `none`
    /// when no key is required. Never the key itself.
    source: String,
}

impl Admitted {
    /// The span its events are handled in: what is logged about them (an event
    /// rejected, say) names the key that sent them, so an operator can tell which
    /// source sends invalid events. At error level, so a quieter log level keeps it.
    pub(super) fn span(&self) -> tracing::Span {
        tracing::error_span!("request", write_key = %self.source)
    }
}

/// Which of our keys `presented` is, if any. With no key configured every request is
/// admitted.
fn match_key(state: &AppState, presented: Option<&str>) -> Option<Admitted> {
    let (browser, server) = (&state.config.write_keys, &state.config.server_write_keys);
    if browser.is_empty() && server.is_empty() {
        return Some(Admitted {
            key: String::new(),
            client_context: true,
            source: "none".to_string(),
        });
    }
    let presented = presented?;
    let found = |keys: &[sluice_core::config::Secret], list: &str| {
        auth::key_index(keys, presented)
            .map(|i| (keys[i].expose().to_string(), format!("{list}[{i}]")))
    };
    if let Some((key, source)) = found(server, "server_write_keys") {
        return Some(Admitted {
            key,
            client_context: true,
            source,
        });
    }
    found(browser, "write_keys").map(|(key, source)| Admitted {
        key,
        client_context: server.is_empty(),
        source,
    })
}

/// Checks a write key sent in the headers before the body is read (so a request without
/// a valid key costs no decompression or parsing). Returns the admission if there was
/// one; if not, the caller admits the request with the key found in the body.
pub(super) fn admit_by_header(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Admitted>, ApiError> {
    // A header key that is not one of ours (a proxy's own `Authorization`) leaves the
    // other header, then the body's `writeKey`, to decide.
    match auth::presented_keys(headers)
        .iter()
        .find_map(|k| match_key(state, Some(k)))
    {
        Some(admitted) => rate_limit(state, admitted).map(Some),
        None => Ok(None),
    }
}

/// The request's admission once its body is read: the header's key [`admit_by_header`]
/// admitted before, else the body's `writeKey` (`body_key`).
pub(super) fn admit_after_body(
    state: &AppState,
    headers: &HeaderMap,
    by_header: Option<Admitted>,
    body_key: Option<&Value>,
) -> Result<Admitted, ApiError> {
    match by_header {
        Some(admitted) => Ok(admitted),
        None => admit(state, headers, body_key.and_then(Value::as_str)),
    }
}

/// Write key and rate limit. `body_key` is a key sent in the body (the Segment API's
/// `writeKey`), used when the headers carry none of ours.
pub(super) fn admit(
    state: &AppState,
    headers: &HeaderMap,
    body_key: Option<&str>,
) -> Result<Admitted, ApiError> {
    // A header's key if one is ours, else the body's.
    let authorized = auth::presented_keys(headers)
        .iter()
        .find_map(|k| match_key(state, Some(k)))
        .or_else(|| match_key(state, body_key));
    let Some(admitted) = authorized else {
        state.metrics.unauthorized.fetch_add(1, Relaxed);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid write key is required (HTTP basic user, `X-Write-Key`, or `writeKey` in the body)",
        ));
    };
    rate_limit(state, admitted)
}

/// The per-key rate limit of an admitted request.
fn rate_limit(state: &AppState, admitted: Admitted) -> Result<Admitted, ApiError> {
    if !state.limiter.allow(&admitted.key) {
        state.metrics.rate_limited.fetch_add(1, Relaxed);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests for this write key",
        )
        .retry(1));
    }
    Ok(admitted)
}

/// The request body, gunzipped when sent with `Content-Encoding: gzip`; `limit` applies to
/// the body as sent and again to the decompressed body (no gzip bombs).
pub(super) fn read_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let body = decoded_body(headers, raw_body(body, limit)?, limit)?;
    as_json_text(headers, body, limit)
}

/// The body of a tracking request, decompressed, without a byte order mark.
fn decoded_body(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, ApiError> {
    // A byte order mark (some Windows tools and .NET clients write one) is no JSON: it is
    // skipped, not answered as malformed JSON at column 1.
    let without_bom = |b: Bytes| match b.strip_prefix(b"\xEF\xBB\xBF") {
        Some(rest) => b.slice(b.len() - rest.len()..),
        None => b,
    };
    match content_encoding(headers).as_deref() {
        None => Ok(without_bom(body)),
        Some("gzip") | Some("x-gzip") => {
            use std::io::Read;
            let mut out = Vec::new();
            // Every member: gzip streams may be concatenated (RFC 1952).
            flate2::read::MultiGzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "unreadable_body",
                        format!("the gzip body does not decompress: {e}"),
                    )
                })?;
            if out.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the decompressed body is larger than {limit} bytes"),
                ));
            }
            Ok(without_bom(Bytes::from(out)))
        }
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("content encoding `{other}` is not supported (use gzip or none)"),
        )),
    }
}

/// The body as UTF-8 JSON text, read as Go's standard JSON decoder reads one: bytes that
/// are not UTF-8, and `\u` escapes of half a surrogate pair (JavaScript's `JSON.stringify`
/// writes one for a string cut in the middle of an emoji), become U+FFFD, rather than
/// failing the whole body and with it a batch of thousands of queued messages. A body
/// declared in a Latin-1 charset is read as windows-1252, as browsers read every label of
/// it; one in another charset is refused (`415`) unless it is plain ASCII, which reads the
/// same in all of them. Counted in `sluice_tracking_bodies_repaired_total`. A repair that
/// makes the text larger than `limit` (each byte that is not UTF-8 becomes three) is
/// refused `413`, as a body that large would be.
pub(super) fn as_json_text(
    headers: &HeaderMap,
    body: Bytes,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let charset = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| {
            t.split(';').skip(1).find_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("charset")
                    .then(|| v.trim().trim_matches('"').to_ascii_lowercase())
            })
        });
    let repaired = |what: &str| {
        sluice_core::metrics::count(BODIES_REPAIRED, BODIES_REPAIRED_HELP, &[("what", what)], 1)
    };
    let body = if body.is_ascii() {
        body
    } else {
        match charset.as_deref() {
            // A body labelled ASCII that is not is most likely UTF-8 labelled loosely.
            None | Some("utf-8" | "utf8" | "unicode-1-1-utf-8" | "us-ascii" | "ascii") => {
                match std::str::from_utf8(&body) {
                    Ok(_) => body,
                    Err(_) => {
                        repaired("invalid_utf8");
                        Bytes::from(String::from_utf8_lossy(&body).into_owned())
                    }
                }
            }
            Some(label) if WINDOWS_1252_LABELS.contains(&label) => {
                repaired("latin1");
                Bytes::from(body.iter().map(|&b| windows_1252(b)).collect::<String>())
            }
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_charset",
                    format!("charset `{other}` is not supported: send UTF-8 (or ISO-8859-1)"),
                ))
            }
        }
    };
    if body.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("read as UTF-8 text, the body is larger than {limit} bytes"),
        ));
    }
    Ok(match without_lone_surrogates(&body) {
        Some(text) => {
            repaired("lone_surrogate");
            Bytes::from(text)
        }
        None => body,
    })
}

/// `sluice_tracking_bodies_repaired_total{what}`.
pub(super) const BODIES_REPAIRED: &str = "sluice_tracking_bodies_repaired_total";
pub(super) const BODIES_REPAIRED_HELP: &str = "Tracking bodies read after a repair: `invalid_utf8` bytes and `lone_surrogate` escapes became U+FFFD, or a `latin1` body was read as windows-1252.";
/// Its `what` labels, each a series from the start.
pub(super) const BODY_REPAIRS: [&str; 3] = ["invalid_utf8", "lone_surrogate", "latin1"];

/// The charset labels browsers read as windows-1252 (the WHATWG Encoding Standard's, but
/// its ASCII ones, read as UTF-8 here).
const WINDOWS_1252_LABELS: [&str; 14] = [
    "cp1252",
    "cp819",
    "csisolatin1",
    "ibm819",
    "iso-8859-1",
    "iso-ir-100",
    "iso8859-1",
    "iso88591",
    "iso_8859-1",
    "iso_8859-1:1987",
    "l1",
    "latin1",
    "windows-1252",
    "x-cp1252",
];

/// A windows-1252 byte as a character: Latin-1, but for the printable characters of
/// 0x80-0x9F (the five it leaves undefined stay the control characters of those codes).
fn windows_1252(b: u8) -> char {
    const HIGH: [u16; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    match b {
        0x80..=0x9F => char::from_u32(u32::from(HIGH[usize::from(b - 0x80)])).unwrap_or('\u{fffd}'),
        _ => char::from(b),
    }
}

/// `text` with every `\u` escape of half a surrogate pair written `\ufffd`; `None` when
/// it has none.
fn without_lone_surrogates(text: &[u8]) -> Option<Vec<u8>> {
    // The code unit escaped at `at` (`\uXXXX`).
    let unit = |at: usize| -> Option<u16> {
        let e = text.get(at..at + 6)?;
        if e[0] != b'\\' || e[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&e[2..]).ok()?, 16).ok()
    };
    let high = |u: u16| (0xD800..0xDC00).contains(&u);
    let low = |u: u16| (0xDC00..0xE000).contains(&u);
    let mut out: Option<Vec<u8>> = None;
    let (mut i, mut copied) = (0, 0);
    while i < text.len() {
        if text[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(i) {
            Some(u) if high(u) && unit(i + 6).is_some_and(low) => i += 12,
            Some(u) if high(u) || low(u) => {
                let o = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
                o.extend_from_slice(&text[copied..i]);
                o.extend_from_slice(b"\\ufffd");
                i += 6;
                copied = i;
            }
            Some(_) => i += 6,
            // `\\`, `\"`, ...: the escaped character is skipped with its backslash.
            None => i += 2,
        }
    }
    out.map(|mut o| {
        o.extend_from_slice(&text[copied..]);
        o
    })
}

/// The request's `Content-Encoding`, lower-cased; `None` when it has none (or says
/// `identity`). A value that is not visible ASCII is no encoding we know (not "none").
pub(super) fn content_encoding(headers: &HeaderMap) -> Option<String> {
    let encoding = headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_ascii_lowercase())?;
    (!encoding.is_empty() && encoding != "identity").then_some(encoding)
}

fn raw_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {limit} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                rejection.body_text(),
            )
        }
    })
}

pub(super) fn malformed(e: serde_json::Error) -> ApiError {
    let message = match deeper_than_read(&e) {
        Some(said) => format!("the body is {said}"),
        None => format!("the body is not valid JSON: {e}"),
    };
    ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message)
}

/// The JSON parser stops at 128 levels of nesting, valid JSON or not: said as what it is.
fn deeper_than_read(e: &serde_json::Error) -> Option<String> {
    e.to_string()
        .starts_with("recursion limit exceeded")
        .then(|| {
            format!(
            "nested more than 127 levels deep, which is not read (properties may nest {} levels)",
            sluice_core::tracking::MAX_PROPERTY_DEPTH
        )
        })
}

pub(super) fn request_context(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    batch_sent_at_ms: Option<i64>,
    admitted: &Admitted,
) -> RequestContext {
    let ip = enrich::client_ip(peer.ip(), headers, &state.trusted);
    RequestContext {
        received_at_ms: state.store.now().timestamp_millis(),
        batch_sent_at_ms,
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        ip: Some(ip.to_string()),
        max_future_ms: state
            .config
            .tracking
            .max_future_seconds
            .saturating_mul(1000),
        ignore_client_context: !admitted.client_context,
    }
}

/// Why the event of a one-event request was not taken.
enum Rejection {
    /// It is not a valid event (400).
    Invalid(String),
    /// A transform failed it (422 `transform_rejected`).
    Transform(String),
}

/// The per-event answer of a request.
pub struct Answer {
    results: Vec<Value>,
    pub(super) stored: usize,
    pub(super) duplicates: usize,
    pub(super) dropped: usize,
    pub(super) rejected: usize,
    /// Some events are to be sent again: after this many seconds (`Retry-After`).
    retry: Option<u32>,
    /// What a one-event request answers when its event was not taken.
    first_rejection: Option<Rejection>,
    /// Per input: whether its event is in `events` now (stored or a duplicate).
    pub(super) written: Vec<bool>,
    /// A batch of nothing but invalid events: answered 400.
    all_rejected: bool,
    /// The batch's own members that are not read (and what of its `context` is not).
    ignored: Vec<String>,
}

impl Answer {
    /// The answer to a one-event request: an invalid event is a 400 `code` error.
    pub(super) fn into_single_response(self, code: &'static str) -> Result<Response, ApiError> {
        match self.first_rejection {
            Some(Rejection::Invalid(message)) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, code, message))
            }
            Some(Rejection::Transform(message)) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "transform_rejected",
                message,
            )),
            None => Ok(self.into_response()),
        }
    }

    /// Some events are to be sent again, one not before `seconds`: the answer's
    /// `Retry-After` is the longest wait any of them needs.
    fn retry_after(&mut self, seconds: u32) {
        self.retry = Some(self.retry.unwrap_or(1).max(seconds));
    }

    /// The members of the batch itself that are not read, listed beside its results.
    pub(super) fn note_batch_ignored(&mut self, ignored: Vec<String>) {
        self.ignored = ignored;
    }

    /// Names, in each event's result, the members of the event Sluice did not read
    /// (`ignored`), one list per input in order.
    pub(super) fn note_ignored(&mut self, ignored: Vec<Vec<String>>) {
        for (entry, fields) in self.results.iter_mut().zip(ignored) {
            if !fields.is_empty() {
                entry["ignored"] = json!(fields);
            }
        }
    }

    /// A warning on the result of each event stored (or already stored) that has one.
    pub(super) fn note_warnings(&mut self, warnings: Vec<Option<String>>) {
        for (entry, warning) in self.results.iter_mut().zip(warnings) {
            let kept = matches!(entry["status"].as_str(), Some("stored" | "duplicate"));
            if let (Some(w), true) = (warning, kept) {
                entry["warning"] = json!(w);
            }
        }
    }

    /// Counts the purchases whose amount could not be read (`unread`, one per input)
    /// that are stored now: a resend answered `duplicate` is not counted again.
    pub(super) fn count_amounts_unread(&self, unread: &[bool]) {
        let stored = self
            .results
            .iter()
            .zip(unread)
            .filter(|(entry, &unread)| unread && entry["status"] == "stored")
            .count();
        if stored > 0 {
            sluice_core::metrics::count(
                sluice_core::tracking::AMOUNTS_UNREAD,
                sluice_core::tracking::AMOUNTS_UNREAD_HELP,
                &[],
                stored as u64,
            );
        }
    }

    /// The ids the client sent (`key`: `eventId`, a Segment `messageId`), on the entries
    /// that name none (an event rejected before it was read), so a client can tell which
    /// of its events each is.
    pub(super) fn note_sent_ids(&mut self, sent: Vec<Option<String>>, key: &str) {
        for (entry, id) in self.results.iter_mut().zip(sent) {
            if let (Some(id), None) = (id, entry.get("eventId")) {
                entry[key] = json!(id);
            }
        }
    }

    /// A batch with nothing but invalid events is a 400; otherwise 200 (or 503 to retry).
    /// A client asking `Prefer: return=minimal` (RFC 7240) is given the counts and only
    /// the results that say more than `stored` or `duplicate` (rejected, dropped, to
    /// retry, or with a warning or ignored members), each with its `index`; the answer
    /// then says `Preference-Applied: return=minimal`.
    pub(super) fn into_batch_response(self, headers: &HeaderMap) -> Response {
        let mut answer = self;
        answer.all_rejected =
            answer.stored + answer.duplicates + answer.dropped == 0 && answer.rejected > 0;
        let minimal = prefers_minimal(headers);
        if minimal {
            // (A `context` member left unread, which a sender may attach to every event,
            // does not keep a result on its own.)
            let ignored_beyond_context = |entry: &Value| {
                entry["ignored"].as_array().is_some_and(|names| {
                    names
                        .iter()
                        .any(|n| !n.as_str().unwrap_or("").starts_with("context."))
                })
            };
            answer.results.retain(|entry| {
                !matches!(entry["status"].as_str(), Some("stored" | "duplicate"))
                    || entry.get("warning").is_some()
                    || ignored_beyond_context(entry)
            });
        }
        let mut resp = answer.into_response();
        // What the answer lists depends on `Prefer`.
        resp.headers_mut().insert(
            axum::http::header::VARY,
            axum::http::HeaderValue::from_static("prefer"),
        );
        if minimal {
            resp.headers_mut().insert(
                "preference-applied",
                axum::http::HeaderValue::from_static("return=minimal"),
            );
        }
        resp
    }
}

/// Whether the request's `Prefer` headers ask for `return=minimal` (RFC 7240: preferences
/// separated by commas, each with parameters after `;`; names and this value compared
/// without case).
fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|preference| {
            let token = preference.split(';').next().unwrap_or("").trim();
            let (name, value) = token.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("return")
                .then(|| value.trim().trim_matches('"').to_string())
        })
        // A preference given twice counts as its first (RFC 7240, section 2).
        .next()
        .is_some_and(|value| value.eq_ignore_ascii_case("minimal"))
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = if self.retry.is_some() {
            StatusCode::SERVICE_UNAVAILABLE
        } else if self.all_rejected {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        // `success` is what Segment-compatible clients look for.
        let mut body = json!({
            "success": status == StatusCode::OK,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "results": self.results,
        });
        if !self.ignored.is_empty() {
            body["ignored"] = json!(self.ignored);
        }
        let body = Json(body);
        let mut resp = (status, body).into_response();
        if let Some(seconds) = self.retry {
            for name in ["retry-after", "x-ratelimit-reset"] {
                resp.headers_mut()
                    .insert(name, axum::http::HeaderValue::from(seconds));
            }
        }
        resp
    }
}

/// Lines about events a tracking transform failed or mangled: logged at most once a
/// second with the count held back (a plugin failing on what clients send would
/// otherwise log a line per event).
static TRANSFORM_LINES: super::Throttle = super::Throttle::new();

macro_rules! transform_warn {
    ($($arg:tt)*) => {
        if let Some(held) = TRANSFORM_LINES.pass(std::time::Duration::from_secs(1)) {
            tracing::warn!(more_since_last = held, $($arg)*);
        }
    };
}

/// Runs `[plugins] tracking_transforms` over the events to store. An event a plugin drops
/// is answered `dropped`; outputs keep their input's eventId, so further outputs of one
/// input are duplicates of the first; an output that is not an event, breaks the client's
/// rules or is over 4 × `max_event_bytes` as stored fails its input (one under no input's
/// eventId, or a record skipped under one, is not stored and logged, and every input
/// left with no output is then answered `rejected`). Under `skip-batch`, an event a plugin failed is answered
/// `rejected` with the plugin's reason. Under `fail-run`, an
/// event the chain fails (the plugin rejected it, or trapped on it) is answered
/// `rejected` with the reason and the rest of the request goes on: there is no run to
/// stop, and a client told to resend would send the same event into the same failure
/// forever. A failure that is not the events' (a deadline, a plugin that cannot load)
/// stores nothing and answers 503.
async fn transform(
    state: &AppState,
    events: Vec<Event>,
    outcomes: Vec<Outcome>,
) -> Result<(Vec<Event>, Vec<Outcome>), ApiError> {
    if state.transforms.is_empty() || events.is_empty() {
        return Ok((events, outcomes));
    }
    let docs = events
        .iter()
        .map(bson::to_document)
        .collect::<Result<Vec<bson::Document>, _>>()
        .map_err(|e| {
            tracing::error!(error = %e, "could not encode events for the transforms");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not encode the events for the transforms; nothing was stored",
            )
        })?;
    let chain = state.transforms.clone();
    let sent = events.len() as u64;
    let failed_all = || {
        state
            .metrics
            .rejected_transform_error
            .fetch_add(sent, Relaxed)
    };
    // Narrowing a failing batch down to its bad events may take this long in all; the
    // events of parts still failing then are rejected together.
    let budget = std::time::Duration::from_secs(state.config.tracking.write_timeout_seconds);
    // As many requests run the plugins at once as each plugin has instances; the others
    // wait their turn, within the write deadline. A request keeps its place until its
    // plugins have finished, even when its client has gone: slow plugins cannot pile
    // blocked threads up behind them.
    let slot = tokio::time::timeout(budget, state.transform_slots.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            state.metrics.rejected_transform_busy.fetch_add(sent, Relaxed);
            static LOGGED: super::Throttle = super::Throttle::new();
            if let Some(held) = LOGGED.pass(std::time::Duration::from_secs(1)) {
                tracing::warn!(
                    seconds = budget.as_secs(),
                    more_since_last = held,
                    "the tracking transforms are busy: a request waited its whole write deadline for them"
                );
            }
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the transform plugins are busy; nothing was stored, retry shortly",
            )
            .retry(2)
        })?;
    let isolated = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        sluice_core::transform::apply_chain_isolating(&chain, docs, budget)
    })
    .await
    .map_err(|e| {
        failed_all();
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transform_failed",
            e.to_string(),
        )
        .retry(5)
    })?
    .map_err(|e| {
        failed_all();
        tracing::error!(error = %e, "tracking transform failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transform_failed",
            "a transform plugin failed; nothing was stored",
        )
        .retry(5)
    })?;
    let out = isolated.records;
    let dead_letters = isolated.dead_letters;
    // The eventId is the client's dedupe key and how its answer finds the event: an
    // output under an id no input had would be stored while the client is told its event
    // was dropped, and a resend would store it again. Such outputs are not stored.
    let sent: HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id.as_str(), i))
        .collect();
    // The input an output or a set-aside record came from, by the eventId it keeps.
    let input_of = |d: &bson::Document| {
        d.get_str(sluice_core::model::event_fields::EVENT_ID)
            .ok()
            .and_then(|id| sent.get(id).copied())
    };
    // Outputs (and records skipped) under an eventId no input had: their inputs cannot
    // be told apart from events a plugin dropped on purpose, so every input left with no
    // output is then answered `rejected` (a client told `dropped` would not resend).
    let mut strays = 0usize;
    // The inputs a plugin failed under `dead-letter`, with its reason; a letter under an
    // eventId no input had is a stray too (a plugin before it changed the id).
    let mut lettered: HashMap<usize, String> = HashMap::new();
    for l in &dead_letters {
        match input_of(&l.record) {
            Some(i) => {
                lettered.entry(i).or_insert_with(|| {
                    format!(
                        "transform `{}` failed: {}",
                        l.transform,
                        client_reason(&l.reason)
                    )
                });
            }
            None => strays += 1,
        }
    }
    let mut failed: HashMap<usize, String> = HashMap::new();
    for (i, e) in isolated.failed {
        transform_warn!(event_id = %events[i].event_id, error = %e, "a transform failed the event; rejected");
        failed.insert(i, client_reason(&e.to_string()).to_string());
    }
    // Under skip-batch, an event a plugin failed is not stored: it is answered `rejected`
    // with the reason, not `dropped`, which would read as the plugin's choice.
    let skipped = isolated.skipped;
    // Events a plugin failed under the dead-letter policy are kept before anything is
    // answered; if they cannot be, the client is asked to resend.
    tokio::time::timeout(
        budget,
        state
            .store
            .keep_dead_letters(dead_letters, "tracking", None),
    )
    .await
    .map_err(|_| super::store_timeout(budget, "the dead letters' write", false))?
    .map_err(|e| {
        tracing::error!(error = %e, "could not store dead letters");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "could not keep the events a plugin failed; nothing was stored",
        )
        .retry(5)
    })?;
    for s in skipped {
        match input_of(&s.record) {
            Some(input) => {
                transform_warn!(event_id = %events[input].event_id, plugin = ?s.transform, reason = ?s.reason, "a transform failed the event under skip-batch; rejected");
                failed.entry(input).or_insert_with(|| {
                    format!(
                        "transform `{}` failed: {}",
                        s.transform,
                        client_reason(&s.reason)
                    )
                });
            }
            None => {
                strays += 1;
                tracing::warn!(plugin = ?s.transform, reason = ?s.reason, "a transform failed, under skip-batch, a record under an eventId no event of the request had (an earlier plugin changed it)");
            }
        }
    }
    // What a plugin returns is held to the rules a client's event is: it cannot store an
    // amount, an id or a property name the endpoint would have refused.
    let now = state.store.now().timestamp_millis();
    let max_future = state
        .config
        .tracking
        .max_future_seconds
        .saturating_mul(1000);
    // An event a plugin grew past this (BSON bytes) is refused: one past the 4 MB MongoDB
    // takes in a time-series collection would fail every event of the write it joins.
    let max_bytes = (4 * state.config.tracking.max_event_bytes).max(64 * 1024);
    let mut kept: Vec<Event> = Vec::with_capacity(out.len());
    for d in out {
        // Read first: an output that is no longer an event still names its input.
        let claimed = input_of(&d);
        match (bson::from_document::<Event>(d), claimed) {
            (Ok(e), Some(input)) => {
                // One the server could not store (a NUL in a key of its metadata, say)
                // would fail every event of the write it joins, not just itself.
                let storable = check_event(&e, now, max_future).and_then(|()| {
                    let raw = bson::to_raw_document_buf(&e).map_err(|err| {
                        ValidationError::new("event", format!("cannot be stored: {err}"))
                    })?;
                    if raw.as_bytes().len() > max_bytes {
                        return Err(ValidationError::new(
                            "event",
                            format!(
                                "is {} bytes as stored, more than {max_bytes} (4 × tracking.max_event_bytes)",
                                raw.as_bytes().len()
                            ),
                        ));
                    }
                    Ok(())
                });
                match storable {
                    Ok(()) => kept.push(e),
                    Err(err) => {
                        transform_warn!(event_id = %e.event_id, error = %err, "a transform returned an invalid event; rejected");
                        failed.entry(input).or_insert_with(|| {
                            format!("a transform returned an invalid event: {err}")
                        });
                    }
                }
            }
            (Ok(e), None) => {
                strays += 1;
                transform_warn!(
                    event_id = %e.event_id,
                    "a transform returned an event under an eventId no input had; not stored (plugins must keep eventId)"
                )
            }
            // Answered `dropped`, the client would never resend an event it lost.
            (Err(err), Some(input)) => {
                transform_warn!(event_id = %events[input].event_id, error = %err, "a transform returned something that is not an event; rejected");
                failed.entry(input).or_insert_with(|| {
                    format!("a transform returned something that is not an event: {err}")
                });
            }
            (Err(err), None) => {
                strays += 1;
                transform_warn!(error = %err, "a transform returned something that is not an event, under no eventId of the request; not stored")
            }
        }
    }
    // A fan-out with one invalid record fails its whole input.
    kept.retain(|e| !failed.contains_key(&sent[e.event_id.as_str()]));
    // An input's answer is its first output's: further outputs under the same eventId
    // are duplicates of it.
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (i, e) in kept.iter().enumerate() {
        position.entry(e.event_id.as_str()).or_insert(i);
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Queued(i) => {
                match (failed.remove(&i), position.get(events[i].event_id.as_str())) {
                    (Some(reason), _) => Outcome::Failed(reason),
                    (None, Some(&j)) => Outcome::Queued(j),
                    (None, None) if strays > 0 => Outcome::Failed(format!(
                        "a transform returned or skipped {strays} record(s) under an eventId no event of the request had, so this event may be among them; nothing of it was stored (plugins must keep eventId)"
                    )),
                    (None, None) => match lettered.remove(&i) {
                        Some(reason) => Outcome::DeadLettered(reason),
                        None => Outcome::Dropped("transform"),
                    },
                }
            }
            other => other,
        })
        .collect();
    Ok((kept, outcomes))
}

/// Enriches parsed events, filters bots, runs the transforms, writes, and builds the
/// per-event answer (one entry per input, in order).
pub(super) async fn ingest(
    state: &AppState,
    parsed: Vec<Result<Event, ValidationError>>,
    held: Option<InFlight>,
) -> Result<Answer, ApiError> {
    let sent = parsed.len();
    let prepared = prepare(state, parsed).await?;
    // A native IDENTIFY's properties are its visitor's traits, as a Segment identify's
    // are: copied to the profile once the event is stored.
    let traits = (0..sent)
        .map(|index| {
            let e = &prepared.events[prepared.kept(index)?];
            (e.event_type == sluice_core::model::EventType::Identify && !e.properties.is_empty())
                .then(|| sluice_connectors::mongo::identities::Traits {
                    visitor: e.user_id.clone(),
                    traits: e.properties.clone(),
                    at: e.timestamp,
                })
        })
        .collect();
    let answer = write(state, prepared, held).await?;
    // The events are stored: a profile that could not be updated is logged and counted,
    // not answered 503, whose resend would store again an event sent without an id.
    if let Err(e) = super::segment::apply_traits(state, &answer, traits).await {
        state.metrics.traits_failed.fetch_add(1, Relaxed);
        tracing::warn!(error = ?e.message, "IDENTIFY traits not applied; the events are stored");
    }
    Ok(answer)
}

/// Events enriched and transformed, ready to be written, and what became of each one sent.
pub(super) struct Prepared {
    pub events: Vec<Event>,
    outcomes: Vec<Outcome>,
}

impl Prepared {
    /// Where the event sent at `index` is in `events`, if it is still to be written.
    pub fn kept(&self, index: usize) -> Option<usize> {
        match self.outcomes.get(index) {
            Some(Outcome::Queued(i)) => Some(*i),
            _ => None,
        }
    }
}

/// Enriches the valid events, drops bots (when configured to) and runs the transforms.
pub(super) async fn prepare(
    state: &AppState,
    parsed: Vec<Result<Event, ValidationError>>,
) -> Result<Prepared, ApiError> {
    let mut ua_cache: HashMap<String, EventMetadata> = HashMap::new();
    let mut outcomes = Vec::with_capacity(parsed.len());
    let mut to_write: Vec<Event> = Vec::new();
    // The first index at which each eventId was sent: an eventId names one event, so a
    // later copy is that event again, answered as the first is (the writer would call it
    // a duplicate; the transforms could otherwise answer the two differently).
    let mut first_sent: HashMap<String, usize> = HashMap::new();
    for parsed in parsed {
        let mut event = match parsed {
            Ok(e) => e,
            Err(err) => {
                outcomes.push(Outcome::Rejected(err));
                continue;
            }
        };
        match first_sent.entry(event.event_id.clone()) {
            std::collections::hash_map::Entry::Occupied(first) => {
                outcomes.push(Outcome::Copy(*first.get()));
                continue;
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(outcomes.len());
            }
        }
        if let Some(ua) = event.metadata.user_agent.clone() {
            let parsed = ua_cache
                .entry(ua.clone())
                .or_insert_with(|| enrich::parse_user_agent(&ua));
            // What an SDK says about its device and OS (`context.device` / `os`) is more
            // precise than what the user agent reveals.
            let m = &mut event.metadata;
            m.device = m.device.take().or_else(|| parsed.device.clone());
            m.browser = m.browser.take().or_else(|| parsed.browser.clone());
            m.os = m.os.take().or_else(|| parsed.os.clone());
            m.bot = parsed.bot;
        }
        if let Some(geo) = &state.geoip {
            geo.enrich(&mut event.metadata);
        }
        if event.metadata.bot && state.config.bots == BotPolicy::Drop {
            outcomes.push(Outcome::Dropped("bot"));
            continue;
        }
        outcomes.push(Outcome::Queued(to_write.len()));
        to_write.push(event);
    }
    let (events, outcomes) = transform(state, to_write, outcomes).await?;
    Ok(Prepared { events, outcomes })
}

/// Writes prepared events through the batcher and answers for each event sent; `held`
/// (the request's in-flight reservation) stays with the events until they are written,
/// but for its client address's share, given back with the answer.
pub(super) async fn write(
    state: &AppState,
    prepared: Prepared,
    held: Option<InFlight>,
) -> Result<Answer, ApiError> {
    let Prepared {
        events: to_write,
        outcomes,
    } = prepared;
    let ids: Vec<String> = to_write.iter().map(|e| e.event_id.clone()).collect();
    let deadline = std::time::Duration::from_secs(state.config.tracking.write_timeout_seconds);
    // The queue keeps the bytes of the whole bound; `held` keeps the client's share
    // until the answer is built.
    let queued = held.as_ref().map(InFlight::for_queue);
    let submitted = tokio::time::timeout(deadline, state.batcher.submit(to_write, queued)).await;
    let Ok(submitted) = submitted else {
        // The writes may still complete; a resend of the same eventIds is then answered
        // `duplicate`, so telling the client to resend loses nothing and stores nothing twice.
        state
            .metrics
            .write_errors
            .fetch_add(ids.len() as u64, Relaxed);
        state.batcher.note_given_up(&format!(
            "events not written within tracking.write_timeout_seconds ({} s)",
            deadline.as_secs()
        ));
        return Err(super::store_timeout(
            deadline,
            "the events' write",
            state.batcher.met_conflicts_within(deadline),
        ));
    };
    let statuses = match submitted {
        Ok(s) => s,
        Err(SubmitError::Full) => {
            state
                .metrics
                .queue_full
                .fetch_add(ids.len() as u64, Relaxed);
            // Every request while the writers are behind: a line a second says so.
            static LOGGED: super::Throttle = super::Throttle::new();
            if let Some(held) = LOGGED.pass(std::time::Duration::from_secs(1)) {
                tracing::warn!(
                    events = ids.len(),
                    more_since_last = held,
                    queued = state.batcher.depth(),
                    "a writer's share of the ingest queue is full (queued counts every share): its visitors' requests are answered 503 until it catches up (tracking.queue_capacity, tracking.writers, tracking.queue_wait_ms)"
                );
            }
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the ingest queue is full; retry shortly",
            )
            // Spread over 1 to 3 s: clients turned away together by one burst should
            // not all come back in the same second.
            .retry(rand::random_range(1..=3)));
        }
        Err(SubmitError::Store(error)) => {
            state
                .metrics
                .write_errors
                .fetch_add(ids.len() as u64, Relaxed);
            let message = if error.conflicts {
                format!(
                    "events could not be stored: {}; nothing was acknowledged, retry shortly",
                    super::CONFLICTS
                )
            } else {
                "events could not be stored; nothing was acknowledged, retry shortly".to_string()
            };
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            )
            .retry(2));
        }
        Err(SubmitError::Closed) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; retry on another instance",
            )
            .retry(1));
        }
    };
    let mut answer = Answer {
        results: Vec::with_capacity(outcomes.len()),
        stored: 0,
        duplicates: 0,
        dropped: 0,
        rejected: 0,
        retry: None,
        first_rejection: None,
        written: Vec::with_capacity(outcomes.len()),
        all_rejected: false,
        ignored: Vec::new(),
    };
    let m = &state.metrics;
    for (index, outcome) in outcomes.into_iter().enumerate() {
        answer.written.push(matches!(
            outcome,
            Outcome::Queued(i) if !statuses[i].is_retry()
        ));
        let entry = match outcome {
            Outcome::Rejected(err) => {
                answer.rejected += 1;
                m.rejected_invalid.fetch_add(1, Relaxed);
                // The client is told why; the log says it once a second at most (a
                // broken client on the public endpoint would otherwise flood it).
                static LOGGED: super::Throttle = super::Throttle::new();
                if let Some(held) = LOGGED.pass(std::time::Duration::from_secs(1)) {
                    tracing::warn!(index, field = ?err.field, reason = ?err.reason, more_since_last = held, "event rejected");
                }
                let entry = json!({
                    "index": index, "status": "rejected",
                    "field": err.field, "reason": err.reason,
                });
                answer
                    .first_rejection
                    .get_or_insert(Rejection::Invalid(err.to_string()));
                entry
            }
            Outcome::Failed(reason) => {
                answer.rejected += 1;
                m.rejected_transform_error.fetch_add(1, Relaxed);
                let entry = json!({ "index": index, "status": "rejected", "reason": reason });
                answer
                    .first_rejection
                    .get_or_insert(Rejection::Transform(reason));
                entry
            }
            Outcome::DeadLettered(error) => {
                answer.dropped += 1;
                m.rejected_transform_error.fetch_add(1, Relaxed);
                json!({ "index": index, "status": "dropped", "reason": "transform_error", "error": error })
            }
            Outcome::Dropped(reason) => {
                answer.dropped += 1;
                match reason {
                    "transform" => &m.rejected_transform,
                    _ => &m.rejected_bot,
                }
                .fetch_add(1, Relaxed);
                json!({ "index": index, "status": "dropped", "reason": reason })
            }
            Outcome::Queued(i) => {
                // A claim held by another write: not before its lease ends.
                let mut held = None;
                let status = match statuses[i] {
                    WriteStatus::Stored => {
                        answer.stored += 1;
                        m.accepted.fetch_add(1, Relaxed);
                        "stored"
                    }
                    WriteStatus::Duplicate => {
                        answer.duplicates += 1;
                        m.deduplicated.fetch_add(1, Relaxed);
                        "duplicate"
                    }
                    WriteStatus::Retry => {
                        answer.retry_after(1);
                        m.retry.fetch_add(1, Relaxed);
                        "retry"
                    }
                    WriteStatus::Held { seconds } => {
                        answer.retry_after(seconds);
                        m.retry.fetch_add(1, Relaxed);
                        held = Some(seconds);
                        "retry"
                    }
                };
                let mut entry = json!({ "index": index, "eventId": ids[i], "status": status });
                if let Some(seconds) = held {
                    entry["retryAfter"] = json!(seconds);
                }
                entry
            }
            Outcome::Copy(first) => {
                let mut entry = answer.results[first].clone();
                entry["index"] = json!(index);
                match entry["status"].as_str() {
                    Some("stored" | "duplicate") => {
                        entry["status"] = json!("duplicate");
                        answer.duplicates += 1;
                        m.deduplicated.fetch_add(1, Relaxed);
                    }
                    Some("retry") => {
                        answer.retry_after(1);
                        m.retry.fetch_add(1, Relaxed);
                    }
                    Some("dropped") => answer.dropped += 1,
                    _ => answer.rejected += 1,
                }
                entry
            }
        };
        answer.results.push(entry);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_surrogate_pairs_become_replacement_characters() {
        let fixed =
            |t: &str| without_lone_surrogates(t.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        // A string cut in the middle of an emoji, and a low half alone.
        assert_eq!(
            fixed(r#"{"t":"x\ud83d"}"#).as_deref(),
            Some(r#"{"t":"x\ufffd"}"#)
        );
        assert_eq!(
            fixed(r#"{"t":"\uDE00y"}"#).as_deref(),
            Some(r#"{"t":"\ufffdy"}"#)
        );
        // A high half followed by another escape that is not a low half.
        assert_eq!(
            fixed(r#"["\ud83d\u0041"]"#).as_deref(),
            Some(r#"["\ufffd\u0041"]"#)
        );
        // Whole pairs, other escapes and an escaped backslash before `ud83d` are kept.
        for kept in [
            r#"{"t":"\ud83d\ude00"}"#,
            r#"{"t":"\u00e9\n\"\\"}"#,
            r#"{"t":"\\ud83d"}"#,
        ] {
            assert_eq!(fixed(kept), None, "{kept}");
        }
        let value: Value = serde_json::from_str(&fixed(r#"{"t":"x\ud83d"}"#).unwrap()).unwrap();
        assert_eq!(value["t"], "x\u{fffd}");
    }

    #[test]
    fn bodies_are_read_as_utf8_text_whatever_they_hold() {
        let read = |content_type: &str, body: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", content_type.parse().unwrap());
            as_json_text(&headers, Bytes::copy_from_slice(body), 100)
        };
        // A Latin-1 byte in a UTF-8 body: replaced, the rest kept.
        let body = read("application/json", b"{\"city\":\"Montr\xe9al\",\"n\":1}").unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (value["city"].as_str(), value["n"].as_i64()),
            (Some("Montr\u{fffd}al"), Some(1))
        );
        // Declared ISO-8859-1: read as that.
        let body = read(
            "application/json; charset=ISO-8859-1",
            b"{\"city\":\"Montr\xe9al\"}",
        )
        .unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["city"], "Montréal");
        // UTF-8 as it is, whatever the case of its name.
        let body = read("text/plain;charset=UTF-8", "{\"a\":\"é\"}".as_bytes()).unwrap();
        assert_eq!(&body[..], "{\"a\":\"é\"}".as_bytes());
        // windows-1252's own characters, under any of its labels.
        let body = read("application/json; charset=cp1252", b"{\"p\":\"\x80 5\"}").unwrap();
        assert_eq!(&body[..], "{\"p\":\"€ 5\"}".as_bytes());
        // ASCII reads the same in any charset: taken whatever the label.
        let body = read("application/json; charset=iso-8859-15", b"{\"a\":1}").unwrap();
        assert_eq!(&body[..], b"{\"a\":1}");
        // A repair beyond the limit is refused as a body that large.
        let big = [&b"{\"a\":\""[..], &[0xff; 40][..], &b"\"}"[..]].concat();
        assert_eq!(
            read("application/json", &big).unwrap_err().status.as_u16(),
            413
        );
        let refused =
            read("application/json; charset=iso-8859-15", b"{\"a\":\"\xe9\"}").unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.code),
            (415, "unsupported_charset")
        );
    }
}
