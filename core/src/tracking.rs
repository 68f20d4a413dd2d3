//! The tracking payload: turning one JSON event from a client into a validated [`Event`].
//!
//! Clock skew: a client's clock may be wrong, so when it sends both `timestamp` (when the
//! event happened, by its clock) and `sentAt` (when it sent it, by the same clock), the
//! stored time is `receivedAt - (sentAt - timestamp)`, as Segment and Snowplow do.

use bson::{DateTime, Document};
use serde_json::Value;

use crate::error::ValidationError;
use crate::model::{event_fields as f, Event, EventMetadata, EventType};

/// Limits on a single event's fields.
pub const MAX_ID_LEN: usize = 256;
pub const MAX_URL_LEN: usize = 4096;
pub const MAX_PROPERTY_DEPTH: usize = 16;
/// The most a client's clock may have been set back between an event and its sending
/// for the event to be stored at its arrival (a week).
pub const MAX_CLOCK_SET_BACK_MS: i64 = 7 * 24 * 3_600_000;

/// Events before this instant are rejected as nonsense (2000-01-01T00:00:00Z).
const EARLIEST_MS: i64 = 946_684_800_000;
/// 9999-12-31T23:59:59.999Z: the latest time a client's own clock is kept as
/// (`metadata.clientTimestamp`, `metadata.sentAt`).
const LATEST_MS: i64 = 253_402_300_799_999;
/// The largest purchase amount accepted. Revenue is summed in integer millionths
/// (`i64`), so this keeps a visitor's total exact for over nine thousand such purchases.
pub const MAX_PURCHASE_AMOUNT: f64 = 1e9;
/// The longest `duration` accepted: one year, in milliseconds.
pub const MAX_DURATION_MS: i64 = 365 * 24 * 3_600_000;

/// What the server knows about the request an event came in.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub received_at_ms: i64,
    /// `sentAt` of the enclosing batch, if any.
    pub batch_sent_at_ms: Option<i64>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    /// Events further than this in the future (after correction) are rejected.
    pub max_future_ms: i64,
    /// The request's key may not set where an event came from: the event's own
    /// `context.ip` / `context.userAgent` (and Segment's `context.location`) are ignored
    /// in favour of the request's (see `[server] server_write_keys`).
    pub ignore_client_context: bool,
}

/// Parses a time given as an RFC 3339 string or epoch milliseconds. An ISO 8601 offset
/// without its colon (`+0100`, as iOS's `DateFormatter` writes with `Z`) is read too.
pub fn parse_time(field: &str, v: &Value) -> Result<i64, ValidationError> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .or_else(|e| {
                chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").map_err(|_| e)
            })
            .map(|t| t.timestamp_millis())
            .map_err(|_| {
                let zoneless =
                    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok();
                let hint = if zoneless {
                    " (it has no offset: end it with `Z` for UTC, or `+01:00`)"
                } else {
                    ""
                };
                ValidationError::new(field, format!("expected an RFC 3339 time, got `{s}`{hint}"))
            }),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| ValidationError::new(field, "expected epoch milliseconds")),
        _ => Err(ValidationError::new(
            field,
            format!(
                "expected an RFC 3339 string or epoch milliseconds, got {}",
                kind(v)
            ),
        )),
    }
}

const BEFORE_2000: &str =
    "is before the year 2000 (times are RFC 3339 strings or epoch milliseconds, not seconds)";

/// A JSON value's kind, as errors name it (`a string`, `an object`, ...).
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn opt_string(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > max => Err(ValidationError::new(
            field,
            format!("longer than {max} bytes"),
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ValidationError::new(
            field,
            format!("expected a string, got {}", kind(other)),
        )),
    }
}

/// An id (`eventId`, `userId`, `sessionId`...): at most `MAX_ID_LEN` bytes, not blank
/// (nothing but spaces and invisible characters), no control characters, line or
/// paragraph separators, or bidirectional controls (ids end up in file names, logs and
/// CSV exports, where those break lines or make one id display as another).
pub(crate) fn check_id(field: &str, id: &str) -> Result<(), ValidationError> {
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    // Zero-width spaces and joiners, the word joiner and the byte order mark.
    let invisible = |c: char| matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}');
    if id.chars().all(|c| c.is_whitespace() || invisible(c)) {
        return Err(ValidationError::new(field, "is blank"));
    }
    let disruptive = |c: char| {
        c.is_control()
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            )
    };
    if id.chars().any(disruptive) {
        return Err(ValidationError::new(
            field,
            "contains control characters (line separators and bidirectional controls included)",
        ));
    }
    Ok(())
}

/// The fields of a native event over [`MAX_URL_LEN`] that are stored cut there.
pub fn cut_urls(v: &Value) -> Vec<&'static str> {
    [f::PAGE_URL, f::REFERRER]
        .into_iter()
        .filter(|k| {
            v.get(*k)
                .and_then(Value::as_str)
                .is_some_and(|s| s.len() > MAX_URL_LEN)
        })
        .collect()
}

/// A numeric id's text: a whole number as an integer (`1000.0`, `1e3` and `1000` are one
/// visitor, as a Python or JavaScript SDK may send any of them), others as sent.
pub fn number_id(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
            (f as i64).to_string()
        }
        _ => n.to_string(),
    }
}

/// An id, as a string or as a number's text (some SDKs and backends send numeric user
/// and session ids; the Segment API takes them alike).
fn opt_id(
    obj: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ValidationError> {
    if let Some(Value::Number(n)) = obj.get(field) {
        return Ok(Some(number_id(n)));
    }
    let id = opt_string(obj, field, MAX_ID_LEN)?;
    if let Some(id) = &id {
        check_id(field, id)?;
    }
    Ok(id)
}

fn required_string(
    obj: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<String, ValidationError> {
    opt_id(obj, field)?
        .ok_or_else(|| ValidationError::new(field, "is required (a non-empty string)"))
}

/// Checks property keys MongoDB would misread or refuse (`$`-prefixed operators, dotted
/// paths, NUL characters) and nesting depth.
pub(crate) fn check_properties(path: &str, v: &Value, depth: usize) -> Result<(), ValidationError> {
    if depth > MAX_PROPERTY_DEPTH {
        return Err(ValidationError::new(
            path,
            format!("nested deeper than {MAX_PROPERTY_DEPTH} levels"),
        ));
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                check_property_name(path, k)?;
                check_properties(&format!("{path}.{k}"), child, depth + 1)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .try_for_each(|c| check_properties(path, c, depth + 1)),
        // MongoDB has no unsigned 64-bit integer: it would be stored as a rounded double.
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => Err(ValidationError::new(
            path,
            "an integer beyond the 64-bit range (send such ids as strings)",
        )),
        _ => Ok(()),
    }
}

fn check_property_name(path: &str, k: &str) -> Result<(), ValidationError> {
    if !crate::model::is_plain_field_name(k) {
        return Err(ValidationError::new(
            format!("{path}.{k}"),
            "property names must be non-empty and contain no `$` prefix or `.`",
        ));
    }
    // BSON names are NUL-terminated: the server could not store this one.
    if k.contains('\0') {
        return Err(ValidationError::new(
            format!("{path}.{}", k.replace('\0', "\\u0000")),
            "property names must not contain a NUL character (\\u0000)",
        ));
    }
    Ok(())
}

/// [`check_properties`] over BSON (an event a transform returned, or an import mapped):
/// the same names and depth; a date or any other BSON value is a value, not an object
/// whose `$date` name would be refused.
fn check_bson_properties(path: &str, v: &bson::Bson, depth: usize) -> Result<(), ValidationError> {
    if depth > MAX_PROPERTY_DEPTH {
        return Err(ValidationError::new(
            path,
            format!("nested deeper than {MAX_PROPERTY_DEPTH} levels"),
        ));
    }
    match v {
        bson::Bson::Document(d) => check_bson_document(path, d, depth),
        bson::Bson::Array(items) => items
            .iter()
            .try_for_each(|c| check_bson_properties(path, c, depth + 1)),
        _ => Ok(()),
    }
}

fn check_bson_document(path: &str, d: &Document, depth: usize) -> Result<(), ValidationError> {
    for (k, child) in d {
        check_property_name(path, k)?;
        check_bson_properties(&format!("{path}.{k}"), child, depth + 1)?;
    }
    Ok(())
}

/// Converts JSON into a BSON document (numbers stay integers where they are).
pub fn json_to_document(v: &Value) -> Result<Document, ValidationError> {
    match bson::Bson::try_from(v.clone()) {
        Ok(bson::Bson::Document(d)) => Ok(d),
        _ => Err(ValidationError::new(f::PROPERTIES, "expected an object")),
    }
}

/// The user agent a native `context` (an event's, or a batch's) says, a string when
/// present.
pub fn context_user_agent(
    context: &serde_json::Map<String, Value>,
) -> Result<Option<String>, ValidationError> {
    opt_string(context, "userAgent", MAX_URL_LEN).map_err(in_context)
}

/// The client address a native `context` (an event's, or a batch's) says, a string when
/// present. Backends forward what they have: a `X-Forwarded-For` chain, an address with
/// its port or zone; the client's address is read out of those, and a value that holds
/// none is not the event's fault (`None`: the request's address stands).
pub fn context_ip(
    context: &serde_json::Map<String, Value>,
) -> Result<Option<String>, ValidationError> {
    Ok(opt_string(context, "ip", MAX_URL_LEN)
        .map_err(in_context)?
        .and_then(|ip| client_ip(&ip))
        .map(|ip| ip.to_string()))
}

/// An error of a `context` member, named by its path.
fn in_context(e: ValidationError) -> ValidationError {
    ValidationError::new(format!("context.{}", e.field), e.reason)
}

/// The members of a native `context` that are not read, all but `ip` and `userAgent`,
/// as `context.NAME` (`context.locale` would otherwise be dropped without a word).
pub fn context_not_read(context: &Value) -> Vec<String> {
    members_not_read(context, |k| k == "ip" || k == "userAgent")
        .into_iter()
        .map(|k| format!("context.{k}"))
        .collect()
}

/// The client's address in a `context.ip` as backends send it: an address, the first of
/// a comma-separated forwarding chain, with a port (`1.2.3.4:80`, `[::1]:80`) or an IPv6
/// zone (`fe80::1%eth0`) left out.
pub fn client_ip(raw: &str) -> Option<std::net::IpAddr> {
    let first = raw.split(',').next()?.trim();
    if let Ok(ip) = first.parse() {
        return Some(ip);
    }
    if let Ok(at) = first.parse::<std::net::SocketAddr>() {
        return Some(at.ip());
    }
    let bare = first.trim_start_matches('[');
    let bare = bare.split([']', '%']).next()?;
    bare.parse().ok()
}

/// The top-level members of a native event that Sluice reads.
const EVENT_MEMBERS: [&str; 11] = [
    f::EVENT_ID,
    f::USER_ID,
    f::SESSION_ID,
    f::EVENT_TYPE,
    f::TIMESTAMP,
    "sentAt",
    f::PROPERTIES,
    f::PAGE_URL,
    f::REFERRER,
    f::DURATION,
    "context",
];

/// The device class (`desktop`, `mobile`, `tablet`, `appliance` or `bot`, the classes a
/// user agent is sorted into) a Segment SDK's `context.device` names: its `type` is a platform
/// (`ios`, `android`) or a class, its `model` a product (`iPhone15,2`, `iPad13,1`). None
/// when neither says (the user agent's then holds).
pub fn device_class(kind: Option<&str>, model: Option<&str>) -> Option<&'static str> {
    let model = model.unwrap_or("").to_ascii_lowercase();
    let tablet_model = model.contains("ipad") || model.contains("tablet");
    let kind = kind.unwrap_or("").trim().to_ascii_lowercase();
    match kind.as_str() {
        "ios" | "android" | "mobile" | "phone" | "smartphone" | "ipados" => {
            Some(if tablet_model || kind == "ipados" {
                "tablet"
            } else {
                "mobile"
            })
        }
        "tablet" | "ipad" => Some("tablet"),
        "desktop" | "pc" | "mac" | "macos" | "windows" | "linux" => Some("desktop"),
        "tv" | "appliance" | "console" => Some("appliance"),
        "bot" => Some("bot"),
        _ if tablet_model => Some("tablet"),
        _ if model.contains("iphone") || model.contains("ipod") => Some("mobile"),
        _ => None,
    }
}

/// An operating system's name as `metadata.os` holds it, whoever said it: Apple's phones
/// and tablets as `iOS` (a user agent names the device, `iPhone`; a Segment SDK sends
/// `iOS` or `iPadOS`), macOS as `Mac OSX` (the user agent parser's name), others as
/// said; without a version (a Segment SDK's stays in `metadata.context.os`).
pub fn os_family(name: &str) -> Option<String> {
    let name = name.trim();
    let lower = name.to_ascii_lowercase();
    let family = match lower.as_str() {
        "" => return None,
        "iphone" | "ipad" | "ipod" | "ios" | "ipados" | "iphone os" => "iOS",
        "android" => "Android",
        "mac os x" | "macos" | "mac osx" | "os x" => "Mac OSX",
        _ => return Some(name.to_string()),
    };
    Some(family.to_string())
}

/// What of a request's items [`integer_beyond_int64`] looks at: the top-level members
/// read, and the ids among them (stored as their text).
pub struct ReadMembers {
    pub read: fn(&str) -> bool,
    pub ids: &'static [&'static str],
}

/// A native event's (not its `context`, whose `ip` and `userAgent`, the members read, are
/// strings).
pub const EVENT_READ: ReadMembers = ReadMembers {
    read: |name| EVENT_MEMBERS.contains(&name) && name != "context",
    ids: &[f::EVENT_ID, f::USER_ID, f::SESSION_ID],
};

/// The first integer written in the JSON text `json` that no signed 64-bit integer holds,
/// standing in a top-level member `read` takes: where it stands (`properties.order.id`;
/// an array's items at the array's path) and the integer as written. JSON parsers read it
/// as a double, rounded (`2^70`), or as an unsigned integer MongoDB has no type for (from
/// 2^63 to 2^64 − 1), so the value stored would not be the one sent. The members at
/// `ids` (dotted paths) are stored as their text, so up to 2^64 − 1 they are exact. A
/// number written with a fraction or an exponent is a double as sent, and is left alone.
/// `json` is taken as valid JSON (already parsed): nothing is checked beyond where
/// numbers stand.
pub fn integer_beyond_int64(
    json: &str,
    read: impl Fn(&str) -> bool,
    ids: &[&str],
) -> Option<(String, String)> {
    // Each open container, and for an object the member it is at (None while a key is
    // awaited).
    let mut open: Vec<Option<Option<String>>> = Vec::new();
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => open.push(Some(None)),
            b'[' => open.push(None),
            b'}' | b']' => {
                open.pop();
            }
            b',' => {
                if let Some(Some(member)) = open.last_mut() {
                    *member = None;
                }
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(Some(member @ None)) = open.last_mut() {
                    let key = json.get(start..i.min(json.len())).unwrap_or_default();
                    *member = Some(
                        serde_json::from_str(&format!("\"{key}\""))
                            .unwrap_or_else(|_| key.to_string()),
                    );
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i + 1 < bytes.len()
                    && matches!(bytes[i + 1], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &json[start..=i];
                let integer = !number.contains(['.', 'e', 'E']);
                if integer && number.parse::<i64>().is_err() {
                    let path: Vec<&str> =
                        open.iter().filter_map(|c| c.as_ref()?.as_deref()).collect();
                    let path_text = path.join(".");
                    // An id straight in its member (not in an array), up to 2^64 - 1.
                    let exact_id = open.iter().all(Option::is_some)
                        && ids.contains(&path_text.as_str())
                        && number.parse::<u64>().is_ok();
                    if path.first().is_some_and(|top| read(top)) && !exact_id {
                        return Some((path_text, number.to_string()));
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The top-level members of `v` that [`parse_event`] does not read (at most 10, each cut
/// at 64 characters): a typo such as `pageURL` or `sessionid` would otherwise lose its
/// value without a word. The event is still taken; its answer lists them.
pub fn unknown_members(v: &Value) -> Vec<String> {
    let mut unread = members_not_read(v, |k| EVENT_MEMBERS.contains(&k));
    if let Some(context) = v.get("context") {
        unread.extend(context_not_read(context));
        unread.truncate(10);
    }
    unread
}

/// The top-level members of `v` that `known` does not take, as an answer lists them: at
/// most 10, each cut at 64 characters.
pub(crate) fn members_not_read(v: &Value, known: impl Fn(&str) -> bool) -> Vec<String> {
    let Value::Object(obj) = v else {
        return Vec::new();
    };
    names_not_read(obj.keys().map(String::as_str), known)
}

/// Of member names `names`, those `known` does not take, as an answer lists them: at
/// most 10, each cut at 64 characters.
pub fn names_not_read<'a>(
    names: impl Iterator<Item = &'a str>,
    known: impl Fn(&str) -> bool,
) -> Vec<String> {
    names
        .filter(|k| !known(k))
        .take(10)
        .map(|k| k.chars().take(64).collect())
        .collect()
}

/// An amount written as text: a number (` 7.5 `, `1e3`), or as people write money, with
/// a currency symbol or code before or after it (`$19.99`, `US$ 5`, `USD 19.99`,
/// `19.99 €`, `19.99 EUR`), thousands grouped in threes by commas, dots, spaces or
/// apostrophes (`1,299.00`, `1.299,00 €`, `1 299,00 €`, `CHF 1'299.00`), and a comma as
/// the decimal mark before one or two digits (`19,99`). Not what reads two ways, 1,000
/// times apart: one group of three after a comma or a dot beside a currency mark, with
/// nothing else to tell (`1,299`: 1299, or 1.299 where the comma is the decimal mark;
/// `1.299 €`), unless the currency has no minor unit (`¥1,000`, `1.000 JPY`: see
/// [`money_in`]).
pub fn money(text: &str) -> Option<f64> {
    money_in(text, None)
}

/// Currencies with no minor unit (ISO 4217 exponent 0): their amounts have no decimals,
/// so a separator before three digits groups thousands.
const WHOLE_UNIT_CURRENCIES: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];

/// Currencies with three decimals (ISO 4217 exponent 3): a dot before three digits is
/// their decimal mark (`12.500 KWD`).
const THOUSANDTHS_CURRENCIES: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];

/// [`money`], the amount's `currency` (sent beside it) known: in a currency with no minor
/// unit (`JPY`, `KRW`, named in the text or by `currency`), `1,000` and `1.000` are a
/// thousand. The yen and won signs say the same of a comma (`¥1,000`): neither Japan,
/// Korea nor China writes a comma as the decimal mark (a dot stays two ways: `¥1.500`
/// may be yuan).
pub fn money_in(text: &str, currency: Option<&str>) -> Option<f64> {
    const SYMBOLS: &[char] = &[
        '$', '€', '£', '¥', '₹', '₩', '₽', '₺', '₫', '₪', '฿', '₴', '₦', '¢', '₱', '₡', '₲', '₵',
    ];
    // What groups thousands: a comma or a dot, a space (also no-break and narrow
    // no-break), an apostrophe (Switzerland).
    const GROUPING: &[char] = &[',', '.', ' ', '\u{a0}', '\u{202f}', '\'', '’'];
    // Capitals that are part of a currency mark: before the number, one to three (`USD`,
    // `US$`, `R 100`, `RM 50`); after it, a code of three (`EUR`), or one or two apart
    // from it (`100 TL`, `100 $US`). Not a letter more, nor a magnitude (`1.5K`, `2 M`,
    // `5 MLN`), which leaves the text unread.
    const MAGNITUDES: &[&str] = &[
        "K", "M", "B", "T", "KK", "MM", "BN", "MN", "MLN", "MIO", "MRD", "BLN", "THS", "TSD",
    ];
    let capitals = |s: &str, from_end: bool| {
        let bytes = s.as_bytes();
        let run = |b: &&u8| b.is_ascii_uppercase();
        let n = if from_end {
            bytes.iter().rev().take_while(run).count()
        } else {
            bytes.iter().take_while(run).count()
        };
        let beyond = if from_end {
            s[..s.len() - n].chars().next_back()
        } else {
            s[n..].chars().next()
        };
        let letter_beyond = beyond.is_some_and(char::is_alphabetic);
        let magnitude = from_end && MAGNITUDES.contains(&&s[s.len() - n..]);
        match n {
            _ if letter_beyond || magnitude => 0,
            1..=3 if !from_end => n,
            3 => 3,
            1 | 2 if beyond.is_some_and(|c| c.is_whitespace() || SYMBOLS.contains(&c)) => n,
            _ => 0,
        }
    };
    // Before the number: a code, then a symbol (`USD`, `US$`, `R$`, `$`).
    let mut s = text.trim();
    s = &s[capitals(s, false)..];
    if let Some(c) = s.chars().next().filter(|c| SYMBOLS.contains(c)) {
        s = &s[c.len_utf8()..];
    }
    // After it: a symbol, then a code (`€`, `EUR`).
    s = s.trim();
    s = &s[..s.len() - capitals(s, true)];
    s = s.trim_end();
    if let Some(c) = s.chars().next_back().filter(|c| SYMBOLS.contains(c)) {
        s = &s[..s.len() - c.len_utf8()];
    }
    let s = s.trim();
    let marked = s.len() != text.trim().len();
    let currency = currency.map(str::trim).filter(|c| !c.is_empty());
    let named = currency_code(text).or(currency);
    let listed =
        |list: &[&str]| named.is_some_and(|c| list.iter().any(|w| w.eq_ignore_ascii_case(c)));
    let whole_units = listed(WHOLE_UNIT_CURRENCIES);
    // Three decimals (a dinar's fils): a dot before three digits is the decimal mark.
    let thousandths = listed(THOUSANDTHS_CURRENCIES);
    // Where a separator before three digits may only group thousands.
    let groups_after = |mark: char| whole_units || (mark == ',' && text.contains(['¥', '₩']));
    let plain = |s: &str| s.parse::<f64>().ok().filter(|f| f.is_finite());
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let (sign, body) = match s.strip_prefix('-') {
        Some(b) => ("-", b),
        None => ("", s.strip_prefix('+').unwrap_or(s)),
    };
    // `1.299 €`: 1.299, or 1299 with the dot grouping thousands; so with a currency
    // sent beside it (`"1.299"` in EUR).
    // (A group of thousands never starts with 0: `0.125` reads one way.)
    let thousands_like = !thousandths
        && body.split_once('.').is_some_and(|(w, f)| {
            (1..=3).contains(&w.len())
                && all_digits(w)
                && !w.starts_with('0')
                && f.len() == 3
                && all_digits(f)
        });
    if let Some(f) = plain(s) {
        if !((marked || currency.is_some()) && thousands_like) {
            return Some(f);
        }
        return groups_after('.')
            .then(|| plain(&format!("{sign}{}", body.replace('.', ""))))
            .flatten();
    }
    // The decimal mark is the last comma or dot, unless it is one of several, or three
    // digits follow it with nothing before it to tell (then it groups thousands, where
    // that is the only reading).
    let (whole, fraction) = match body.rfind([',', '.']) {
        Some(i) => {
            let mark = if body.as_bytes()[i] == b',' { ',' } else { '.' };
            let after = &body[i + 1..];
            let repeated = body[..i].contains(mark);
            let grouped_before = body[..i].contains(|c: char| !c.is_ascii_digit());
            let decimal = !repeated
                && match (mark, after.len()) {
                    (_, 3) if !grouped_before => false,
                    (',', 1..=2) => true,
                    (',', _) => grouped_before,
                    _ => true,
                };
            if decimal {
                (&body[..i], Some(after))
            } else if !repeated && after.len() == 3 && !grouped_before && !groups_after(mark) {
                return None;
            } else {
                (body, None)
            }
        }
        None => (body, None),
    };
    // The whole part: digits, in threes after the first one to three when grouped, by one
    // separator.
    let digits = match whole.chars().find(|c| !c.is_ascii_digit()) {
        None => whole.to_string(),
        Some(g) if GROUPING.contains(&g) => {
            let mut groups = whole.split(g);
            let first = groups.next().unwrap_or_default();
            let rest: Vec<&str> = groups.collect();
            let grouped = (1..=3).contains(&first.len())
                && all_digits(first)
                && !first.starts_with('0')
                && rest.iter().all(|r| r.len() == 3 && all_digits(r));
            if !grouped {
                return None;
            }
            rest.iter().fold(first.to_string(), |d, r| d + r)
        }
        Some(_) => return None,
    };
    if !all_digits(&digits) || fraction.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    match fraction {
        Some(f) => plain(&format!("{sign}{digits}.{f}")),
        None => plain(&format!("{sign}{digits}")),
    }
}

/// `sluice_events_timestamp_clamped_total`.
pub fn count_clamped(n: u64) {
    crate::metrics::count(
        "sluice_events_timestamp_clamped_total",
        "Events whose time, corrected by sentAt, lay in the future (the client's clock was set back between the event and its sending): stored at their arrival time.",
        &[],
        n,
    );
}

/// The ISO 4217 code a money text names (`"USD 19.99"`, `"19.99EUR"`): three capitals
/// before or after the number, not part of a longer word. A symbol alone (`$`, `US$`)
/// names no code: several currencies write it.
pub fn currency_code(text: &str) -> Option<&str> {
    let s = text.trim();
    let code = |c: &str| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase());
    let letter = |c: Option<char>| c.is_some_and(|c| c.is_alphabetic());
    if s.len() > 3 && s.is_char_boundary(3) && code(&s[..3]) && !letter(s[3..].chars().next()) {
        return Some(&s[..3]);
    }
    let at = s.len().checked_sub(3)?;
    (at > 0 && s.is_char_boundary(at) && code(&s[at..]) && !letter(s[..at].chars().next_back()))
        .then(|| &s[at..])
}

/// PURCHASE events stored (not duplicates) whose amount as sent could not be read (see
/// [`AMOUNTS_UNREAD_HELP`]).
pub const AMOUNTS_UNREAD: &str = "sluice_purchase_amounts_unread_total";
pub const AMOUNTS_UNREAD_HELP: &str = "PURCHASE events stored (not duplicates) whose amount as sent could not be read (kept as `properties.amountUnread`, or as sent in a Segment revenue, total, value or products): they count no revenue.";

/// Reads a PURCHASE's `properties.amount` as the tracking API stores it: text naming a
/// number (`"19.99"`, `"USD 5.00"`) becomes that number, an ISO code in it becoming
/// `currency` when there is none. An error when there is an amount that cannot be read,
/// or is out of range; then `properties` is left as it was.
pub fn read_amount(
    event_type: EventType,
    properties: &mut Document,
) -> Result<(), ValidationError> {
    if event_type != EventType::Purchase {
        return Ok(());
    }
    // A currency code in any case (`"eur"`, as Stripe writes them) is one currency:
    // ISO 4217 codes are upper case, and revenue is summed per code.
    if let Ok(code) = properties.get_str(f::CURRENCY) {
        let trimmed = code.trim();
        if trimmed.len() == 3 && trimmed.bytes().all(|b| b.is_ascii_alphabetic()) {
            let upper = trimmed.to_ascii_uppercase();
            if upper != code {
                properties.insert(f::CURRENCY, upper);
            }
        }
    }
    let text = properties.get_str(f::AMOUNT).map(str::to_string);
    let sent_currency = properties.get_str(f::CURRENCY).ok();
    if let Some((text, amount)) = text
        .ok()
        .and_then(|t| money_in(&t, sent_currency).map(|a| (t, a)))
    {
        let mut currency = None;
        if let Some(code) = currency_code(&text) {
            match properties.get(f::CURRENCY) {
                None | Some(bson::Bson::Null) => currency = Some(code.to_string()),
                Some(bson::Bson::String(c)) if c.trim().eq_ignore_ascii_case(code) => {}
                Some(other) => {
                    return Err(ValidationError::new(
                        "properties.amount",
                        format!(
                            "is in {code}, but properties.currency is {}",
                            other.clone().into_relaxed_extjson()
                        ),
                    ))
                }
            }
        }
        if !amount_in_range(amount) {
            return Err(amount_range_error());
        }
        properties.insert(f::AMOUNT, amount);
        if let Some(code) = currency {
            properties.insert(f::CURRENCY, code);
        }
        return Ok(());
    }
    check_amount(event_type, properties)
}

/// What a client hears of a PURCHASE whose amount, sent as `from`, could not be read:
/// `why` when its currency code disagrees with `currency` (else what an amount must be),
/// and where it was `kept` when Sluice set it aside.
pub fn amount_unread_warning(from: &str, why: Option<&str>, kept: Option<&str>) -> String {
    let what = match why {
        Some(why) => why.to_string(),
        None => format!(
            "a number from 0 to {MAX_PURCHASE_AMOUNT:e}, or text naming one that reads one way: not `1,299`"
        ),
    };
    match kept {
        Some(kept) => format!(
            "`{from}` is not an amount Sluice reads ({what}): kept as `{kept}`, counting no revenue"
        ),
        None => format!("`{from}` is not an amount Sluice reads ({what}): counting no revenue"),
    }
}

fn amount_in_range(amount: f64) -> bool {
    (0.0..=MAX_PURCHASE_AMOUNT).contains(&amount)
}

fn amount_range_error() -> ValidationError {
    ValidationError::new(
        "properties.amount",
        format!("expected a number from 0 to {MAX_PURCHASE_AMOUNT:e}"),
    )
}

/// A PURCHASE `amount`, when there is one, is a number from 0 to [`MAX_PURCHASE_AMOUNT`].
fn check_amount(event_type: EventType, properties: &Document) -> Result<(), ValidationError> {
    if event_type == EventType::Purchase
        && properties.contains_key(f::AMOUNT)
        && !crate::model::amount_of(properties).is_some_and(amount_in_range)
    {
        return Err(amount_range_error());
    }
    Ok(())
}

/// Checks an event built elsewhere (a transform plugin's output) against the rules
/// [`parse_event`] applies to what clients send: a plugin cannot store what a client
/// could not (an amount out of range, a `$` property name, a blank id...).
pub fn check_event(
    e: &Event,
    received_at_ms: i64,
    max_future_ms: i64,
) -> Result<(), ValidationError> {
    for (field, id) in [
        (f::EVENT_ID, &e.event_id),
        (f::USER_ID, &e.user_id),
        (f::SESSION_ID, &e.session_id),
    ] {
        if field == f::SESSION_ID && id.is_empty() {
            continue;
        }
        check_id(field, id)?;
    }
    let t = e.timestamp.timestamp_millis();
    if t < EARLIEST_MS {
        return Err(ValidationError::new(f::TIMESTAMP, BEFORE_2000));
    }
    if t > received_at_ms.saturating_add(max_future_ms) {
        return Err(ValidationError::new(
            f::TIMESTAMP,
            format!("is {} s in the future", (t - received_at_ms) / 1000),
        ));
    }
    check_bson_document(f::PROPERTIES, &e.properties, 0)?;
    check_bson_document("metadata.context", &e.metadata.context, 0)?;
    check_amount(e.event_type, &e.properties)?;
    for (field, v) in [(f::PAGE_URL, &e.page_url), (f::REFERRER, &e.referrer)] {
        if v.as_ref().is_some_and(|s| s.len() > MAX_URL_LEN) {
            return Err(ValidationError::new(
                field,
                format!("longer than {MAX_URL_LEN} bytes"),
            ));
        }
    }
    if e.duration
        .is_some_and(|d| !(0..=MAX_DURATION_MS).contains(&d))
    {
        return Err(ValidationError::new(
            f::DURATION,
            format!("expected 0 to {MAX_DURATION_MS} milliseconds"),
        ));
    }
    Ok(())
}

/// Names the ids given to events sent without an `eventId` (see [`assigned_event_id`]).
const ASSIGNED_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x8d3f_41c2_6e07_4b9a_b5d1_72a0_e94c_1f68);

/// The id of an event sent without an `eventId`. An event with its own `timestamp` is
/// named by its content (a UUID v5 of its JSON with keys sorted, `sentAt` left out since
/// a retry sends it anew), so a client resending after a 503 or a lost answer is
/// deduplicated as if it had sent an id; two events equal in every field, to the
/// millisecond, are one event. Equal however written: the `timestamp` is taken as the
/// instant it names (`…T13:00:00Z`, `…T14:00:00+01:00` and its epoch milliseconds are one
/// time), and a number as its value (`1`, `1.0` and `1e0` are one number). An event
/// without a `timestamp` is timed on arrival, so equal content does not make it the same
/// event: it gets a random UUID.
fn assigned_event_id(obj: &serde_json::Map<String, Value>, client_time: Option<i64>) -> String {
    let Some(at) = client_time else {
        return uuid::Uuid::new_v4().to_string();
    };
    let at = Value::from(at);
    let mut text = String::new();
    canonical_object(
        obj.iter().filter(|(k, _)| *k != "sentAt").map(|(k, v)| {
            if k == f::TIMESTAMP {
                (k, &at)
            } else {
                (k, v)
            }
        }),
        &mut text,
    );
    uuid::Uuid::new_v5(&ASSIGNED_ID_NAMESPACE, text.as_bytes()).to_string()
}

/// An object's `members` as JSON with their keys sorted, whatever order they came in.
fn canonical_object<'a>(members: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut String) {
    let mut members: Vec<_> = members.collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).unwrap_or_default());
        out.push(':');
        canonical_json(v, out);
    }
    out.push('}');
}

/// `v` as JSON with every object's keys sorted, whatever order they were sent in.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => canonical_object(map.iter(), out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        // A number as its value: a whole one as an integer, others as the shortest text
        // of their double.
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => {
                out.push_str(&(f as i64).to_string())
            }
            _ => out.push_str(&n.to_string()),
        },
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Validates one event and builds the document to store. `metadata` carries what the
/// server learnt from the request (user agent, IP, parsed device...), to which the event's
/// own `context.userAgent` / `context.ip` take precedence (server-side SDKs send them).
pub fn parse_event(
    v: &Value,
    ctx: &RequestContext,
    metadata: EventMetadata,
) -> Result<Event, ValidationError> {
    let Value::Object(obj) = v else {
        return Err(ValidationError::new(
            "event",
            format!("expected an object, got {}", kind(v)),
        ));
    };
    // A Segment message posted to the native routes: say where it goes.
    if !obj.contains_key(f::EVENT_TYPE)
        && obj
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| ["track", "page", "screen", "identify", "group", "alias"].contains(&t))
    {
        return Err(ValidationError::new(
            f::EVENT_TYPE,
            "is required (this is Sluice's own event API, `eventType` and `userId`: a Segment message with `type` goes to /v1/track, /v1/page, /v1/screen, /v1/identify or /v1/batch)",
        ));
    }
    // An empty id is a client's bug, not "none": assigned a new one, every resend of the
    // event would be stored again.
    if obj.get(f::EVENT_ID).and_then(Value::as_str) == Some("") {
        return Err(ValidationError::new(
            f::EVENT_ID,
            "is empty: send none to have Sluice assign one (an empty one would be given a new id on every resend, and stored again)",
        ));
    }
    let sent_id = opt_id(obj, f::EVENT_ID)?;
    let user_id = required_string(obj, f::USER_ID)?;
    // Without a sessionId the writer assigns one by the inactivity-gap rule.
    let session_id = opt_id(obj, f::SESSION_ID)?.unwrap_or_default();
    let type_text = match obj.get(f::EVENT_TYPE) {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => {
            return Err(ValidationError::new(f::EVENT_TYPE, "is required"));
        }
        Some(other) => {
            return Err(ValidationError::new(
                f::EVENT_TYPE,
                format!("expected a string, got {}", kind(other)),
            ))
        }
    };
    let event_type = EventType::parse(type_text)
        .map_err(|e| ValidationError::new(f::EVENT_TYPE, format!("expected {e}")))?;

    let client_time = match obj.get(f::TIMESTAMP) {
        None | Some(Value::Null) => None,
        Some(t) => Some(parse_time(f::TIMESTAMP, t)?),
    };
    let event_id = sent_id.unwrap_or_else(|| assigned_event_id(obj, client_time));
    let sent_at = match obj.get("sentAt") {
        None | Some(Value::Null) => ctx.batch_sent_at_ms,
        Some(t) => Some(parse_time("sentAt", t)?),
    };
    // Any skew is corrected, however large: a device whose clock was reset (to 1970, say)
    // sends `timestamp` and `sentAt` from the same wrong clock, and their difference is
    // still right. What the correction gives is checked below like any time.
    // A time the correction puts out of range is `sentAt`'s doing (it is not from the
    // clock `timestamp` came from): the error names it.
    let corrected = client_time.is_some() && sent_at.is_some();
    let field = if corrected { "sentAt" } else { f::TIMESTAMP };
    let timestamp_ms = match (client_time, sent_at) {
        (Some(t), Some(sent)) => sent
            .checked_sub(t)
            .and_then(|lag| ctx.received_at_ms.checked_sub(lag))
            .ok_or_else(|| ValidationError::new("sentAt", "out of range (with `timestamp`)"))?,
        (Some(t), None) => t,
        (None, _) => ctx.received_at_ms,
    };
    // Corrected into the future, from two times of this century: the client's clock was
    // set back between the event and its sending (a phone whose clock was ahead, fixed
    // while events were queued). The event happened before it was sent: it is stored at
    // its arrival, not refused. (A `sentAt` of 1970 with a time of today is a bug of the
    // client's, refused below.)
    // And by at most a week: more is no clock set back but a bug (epoch microseconds,
    // a year typed wrong), refused below.
    let plausible = |t: Option<i64>| t.is_some_and(|t| t >= EARLIEST_MS);
    let set_back = client_time.zip(sent_at).map(|(t, s)| t.saturating_sub(s));
    let timestamp_ms = if corrected
        && plausible(client_time)
        && plausible(sent_at)
        && set_back.is_some_and(|b| b <= MAX_CLOCK_SET_BACK_MS)
        && timestamp_ms > ctx.received_at_ms + ctx.max_future_ms
    {
        count_clamped(1);
        ctx.received_at_ms
    } else {
        timestamp_ms
    };
    if timestamp_ms > ctx.received_at_ms + ctx.max_future_ms {
        return Err(ValidationError::new(
            field,
            if corrected {
                format!(
                    "is {} s before `timestamp`, which puts the event in the future once the client's clock is corrected (both must come from the same clock)",
                    (timestamp_ms - ctx.received_at_ms) / 1000,
                )
            } else if timestamp_ms >= 1_000_000_000_000_000 {
                // Past the year 33,000 as milliseconds: epoch microseconds (or nanoseconds)
                // of today.
                let unit = if timestamp_ms >= 1_000_000_000_000_000_000 {
                    "nanoseconds"
                } else {
                    "microseconds"
                };
                format!("is thousands of years in the future: it looks like epoch {unit} (times are RFC 3339 strings or epoch milliseconds)")
            } else {
                format!(
                    "is {} s in the future (at most {} s allowed; a client whose clock may be wrong sends `sentAt`, the time of sending by the same clock, and the time is corrected)",
                    (timestamp_ms - ctx.received_at_ms) / 1000,
                    ctx.max_future_ms / 1000,
                )
            },
        ));
    }
    if timestamp_ms < EARLIEST_MS {
        return Err(ValidationError::new(
            field,
            if corrected {
                "is so far after `timestamp` that the corrected time is before the year 2000 (both must come from the same clock)"
            } else {
                BEFORE_2000
            },
        ));
    }

    let mut properties = match obj.get(f::PROPERTIES) {
        None | Some(Value::Null) => Document::new(),
        Some(p @ Value::Object(_)) => {
            check_properties(f::PROPERTIES, p, 0)?;
            json_to_document(p)?
        }
        Some(other) => {
            return Err(ValidationError::new(
                f::PROPERTIES,
                format!("expected an object, got {}", kind(other)),
            ))
        }
    };
    // A purchase's amount written as text (`"19.99"`, `"$1,299.00"`) is read as the
    // number it names.
    // A currency code in it (`"USD 19.99"`) becomes `currency` when there is none, and
    // must agree with the one there is.
    if event_type == EventType::Purchase {
        // A null amount says no more than none.
        if properties.get(f::AMOUNT) == Some(&bson::Bson::Null) {
            properties.remove(f::AMOUNT);
        }
        // An amount that cannot be read (`"1,299"`, `-5`, a currency disagreeing with
        // `currency`) is kept as sent under `amountUnread`, the purchase stored counting
        // no revenue: refused, it would be lost, since clients drop what is answered
        // `rejected`. A client's own `amountUnread` is not overwritten: then it is refused.
        if let Err(e) = read_amount(event_type, &mut properties) {
            if properties.contains_key(f::AMOUNT_UNREAD) {
                return Err(ValidationError::new(
                    e.field,
                    format!(
                        "{}; it cannot be kept as `properties.amountUnread` (counting no revenue), which the event already has",
                        e.reason
                    ),
                ));
            }
            if let Some(sent) = properties.remove(f::AMOUNT) {
                properties.insert(f::AMOUNT_UNREAD, sent);
            }
        }
    }
    // A URL of nothing but spaces says no more than none (and `"   "` is no top page). One
    // over MAX_URL_LEN is cut there (the event matters more than a URL's tail), as the
    // Segment API does; the answer says so ([`cut_urls`]).
    let url = |field| match obj.get(field) {
        Some(Value::String(s)) => Ok(Some(crate::model::prefix_within(s, MAX_URL_LEN))
            .filter(|u| !u.trim().is_empty())
            .map(str::to_string)),
        _ => opt_string(obj, field, MAX_URL_LEN),
    };
    let page_url = url(f::PAGE_URL)?;
    let referrer = url(f::REFERRER)?;
    let duration = match obj.get(f::DURATION) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(d) if (0.0..=MAX_DURATION_MS as f64).contains(&d) => Some(d.round() as i64),
            _ => {
                return Err(ValidationError::new(
                    f::DURATION,
                    format!("expected 0 to {MAX_DURATION_MS} milliseconds"),
                ))
            }
        },
        Some(other) => {
            return Err(ValidationError::new(
                f::DURATION,
                format!("expected a number of milliseconds, got {}", kind(other)),
            ))
        }
    };
    let mut metadata = metadata;
    match obj.get("context") {
        None | Some(Value::Null) => {}
        Some(Value::Object(context)) => {
            // Checked either way; used only when the request's key may say where its
            // events came from (else the request's own user agent and address are).
            let ua = context_user_agent(context)?;
            let ip = context_ip(context)?;
            if !ctx.ignore_client_context {
                metadata.user_agent = ua.or(metadata.user_agent);
                metadata.ip_address = ip.or(metadata.ip_address);
            }
        }
        Some(other) => {
            return Err(ValidationError::new(
                "context",
                format!("expected an object, got {}", kind(other)),
            ))
        }
    }
    if metadata.user_agent.is_none() {
        metadata.user_agent = ctx.user_agent.clone();
    }
    if metadata.ip_address.is_none() {
        metadata.ip_address = ctx.ip.clone();
    }
    // Kept when both are dates a column holds (years 1970 to 9999): a client whose clock
    // is far outside the calendar (epoch nanoseconds) is still corrected by the
    // difference of its two times, but its own times would be no date to export.
    let datable = |t: i64| (0..=LATEST_MS).contains(&t);
    if let (Some(t), Some(sent)) = (client_time, sent_at) {
        if datable(t) && datable(sent) {
            metadata.client_timestamp = Some(DateTime::from_millis(t));
            metadata.sent_at = Some(DateTime::from_millis(sent));
        }
    }
    let now = DateTime::from_millis(ctx.received_at_ms);
    Ok(Event {
        id: None,
        event_id,
        user_id,
        session_id,
        event_type,
        timestamp: DateTime::from_millis(timestamp_ms),
        properties,
        metadata,
        page_url,
        referrer,
        duration,
        created_at: now,
        updated_at: now,
    })
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn ids_that_break_lines_or_hide_are_refused() {
        for id in ["\u{200B}", " \u{FEFF} ", "\t"] {
            let err = check_id("userId", id).unwrap_err();
            assert!(
                err.to_string().contains("blank") || err.to_string().contains("control"),
                "{id:?}: {err}"
            );
        }
        for id in ["a\u{2028}b", "user\u{202E}gnp.exe", "a\u{2066}b", "a\nb"] {
            let err = check_id("userId", id).unwrap_err();
            assert!(
                err.to_string().contains("control characters"),
                "{id:?}: {err}"
            );
        }
        // Letters of any script, and an emoji sequence (joined by U+200D), are ids.
        for id in ["visitor-42", "ユーザー", "👩\u{200D}💻", "a b"] {
            assert!(check_id("userId", id).is_ok(), "{id:?}");
        }
    }

    use super::*;
    use serde_json::json;

    pub(crate) const NOW: i64 = 1_750_000_000_000;

    /// A request received at `NOW`, allowing 5 minutes of future skew.
    pub(crate) fn ctx() -> RequestContext {
        RequestContext {
            received_at_ms: NOW,
            max_future_ms: 300_000,
            ..Default::default()
        }
    }

    fn parse(v: Value) -> Result<Event, ValidationError> {
        parse_event(&v, &ctx(), EventMetadata::default())
    }

    #[test]
    fn minimal_event_gets_an_id_and_the_receive_time() {
        let e = parse(json!({"userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW"})).unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), NOW);
        assert_eq!(e.event_id.len(), 36);
    }

    #[test]
    fn an_event_timed_by_its_client_is_named_by_its_content() {
        let first = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW - 10_000, "sentAt": NOW - 5_000,
            "properties": {"a": 1, "b": [1, {"y": 2, "x": 1}]},
        }))
        .unwrap();
        // Resent later, with a new sentAt and its keys in another order: the same event.
        let retry = parse_event(
            &json!({
                "properties": {"b": [1, {"x": 1, "y": 2}], "a": 1},
                "sentAt": NOW + 60_000, "eventType": "CLICK",
                "timestamp": NOW - 10_000, "sessionId": "s", "userId": "v",
            }),
            &RequestContext {
                received_at_ms: NOW + 65_000,
                ..ctx()
            },
            EventMetadata::default(),
        )
        .unwrap();
        assert_eq!(first.event_id, retry.event_id);
        assert!(uuid::Uuid::parse_str(&first.event_id).is_ok());
        // Written otherwise, the same time and the same numbers: the same event.
        let iso = |offset_hours: i64, suffix: &str| {
            let at =
                chrono::DateTime::from_timestamp_millis(NOW - 10_000 + offset_hours * 3_600_000)
                    .unwrap()
                    .naive_utc();
            format!("{}{suffix}", at.format("%Y-%m-%dT%H:%M:%S%.3f"))
        };
        for timestamp in [
            json!(iso(0, "Z")),
            json!(iso(1, "+01:00")),
            json!(iso(-8, "-0800")),
        ] {
            let same = parse(json!({
                "userId": "v", "sessionId": "s", "eventType": "CLICK",
                "timestamp": timestamp, "properties": {"a": 1.0, "b": [1e0, {"y": 2, "x": 1}]},
            }))
            .unwrap();
            assert_eq!(same.event_id, first.event_id, "{timestamp}");
        }
        // Any other field, or another millisecond, is another event.
        let other = |v: Value| parse(v).unwrap().event_id;
        for different in [
            json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW - 9_999,
                   "properties": {"a": 1, "b": [1, {"y": 2, "x": 1}]}}),
            json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW - 10_000,
                   "properties": {"a": 2, "b": [1, {"y": 2, "x": 1}]}}),
            json!({"userId": "w", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW - 10_000,
                   "properties": {"a": 1, "b": [1, {"y": 2, "x": 1}]}}),
            json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW - 10_000,
                   "properties": {"a": 1, "b": [{"y": 2, "x": 1}, 1]}}),
        ] {
            assert_ne!(other(different), first.event_id);
        }
    }

    #[test]
    fn events_timed_on_arrival_get_distinct_ids_even_when_equal() {
        let event = json!({"userId": "v", "sessionId": "s", "eventType": "CLICK"});
        assert_ne!(
            parse(event.clone()).unwrap().event_id,
            parse(event).unwrap().event_id
        );
    }

    #[test]
    fn a_currency_code_in_any_case_is_stored_upper_case() {
        for (sent, stored) in [
            ("eur", "EUR"),
            (" usd ", "USD"),
            ("Gbp", "GBP"),
            ("EUR", "EUR"),
            // No ISO 4217 code: kept as sent.
            ("bitcoin", "bitcoin"),
            ("eu", "eu"),
            ("€", "€"),
        ] {
            let e = parse(json!({
                "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
                "properties": {"amount": 5, "currency": sent},
            }))
            .unwrap();
            assert_eq!(e.properties.get_str("currency").unwrap(), stored, "{sent}");
        }
        // Agreeing with a code in the amount's text, whatever its case.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": "19.99 EUR", "currency": "eur"},
        }))
        .unwrap();
        assert_eq!(e.properties.get_str("currency").unwrap(), "EUR");
        assert_eq!(e.properties.get_f64("amount").unwrap(), 19.99);
        // Another event's `currency` is its own business.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "properties": {"currency": "eur"},
        }))
        .unwrap();
        assert_eq!(e.properties.get_str("currency").unwrap(), "eur");
    }

    #[test]
    fn sent_at_corrects_client_clock_skew() {
        // Client clock is 1 h ahead; the event happened 10 s before sending.
        let skew = 3_600_000;
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW + skew - 10_000, "sentAt": NOW + skew,
        }))
        .unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), NOW - 10_000);
        // The client's own times are kept beside the corrected one.
        assert_eq!(
            e.metadata.client_timestamp.map(|t| t.timestamp_millis()),
            Some(NOW + skew - 10_000)
        );
        assert_eq!(
            e.metadata.sent_at.map(|t| t.timestamp_millis()),
            Some(NOW + skew)
        );
        // A client whose clock is far outside the calendar (epoch nanoseconds, sent 10,000
        // apart): corrected by their difference as any, its own times no date a column
        // holds, so not kept.
        let ns = 1_000_000;
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW * ns - 10_000, "sentAt": NOW * ns,
        }))
        .unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), NOW - 10_000);
        assert_eq!(
            (e.metadata.client_timestamp, e.metadata.sent_at),
            (None, None)
        );
        // Without `sentAt` nothing was corrected: neither is kept.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW - 10_000,
        }))
        .unwrap();
        assert_eq!(
            (e.metadata.client_timestamp, e.metadata.sent_at),
            (None, None)
        );
    }

    #[test]
    fn a_clock_set_back_between_the_event_and_its_sending_stores_it_on_arrival() {
        // Recorded while the clock was 50 min ahead, sent once it was right again.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW + 3_000_000, "sentAt": NOW,
        }))
        .unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), NOW);
        // More than a week ahead of its sending is a bug, not a clock: refused.
        let err = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW + 8 * 24 * 3_600_000, "sentAt": NOW,
        }))
        .unwrap_err();
        assert_eq!(err.field, "sentAt", "{err}");
        // Without `sentAt` such a time is refused, and the error says what corrects it.
        let err = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": NOW + 3_000_000,
        }))
        .unwrap_err();
        assert!(err.to_string().contains("sends `sentAt`"), "{err}");
    }

    #[test]
    fn iso_offsets_without_a_colon_are_read_and_a_missing_offset_is_named() {
        let at = |t: &str| {
            parse(json!({ "userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": t }))
                .map(|e| e.timestamp.timestamp_millis())
        };
        assert_eq!(
            at("2025-06-15T11:00:00.250+0100").unwrap(),
            1_749_981_600_250
        );
        assert_eq!(at("2025-06-15T11:00:00+01:00").unwrap(), 1_749_981_600_000);
        let err = at("2025-06-15T11:00:00").unwrap_err().to_string();
        assert!(err.contains("it has no offset"), "{err}");
        let err = at("yesterday").unwrap_err().to_string();
        assert!(
            err.contains("expected an RFC 3339 time") && !err.contains("offset"),
            "{err}"
        );
    }

    #[test]
    fn a_segment_message_sent_here_is_told_where_it_goes() {
        let err =
            parse(json!({ "type": "track", "event": "Clicked", "anonymousId": "a" })).unwrap_err();
        assert_eq!(err.field, "eventType");
        assert!(err.to_string().contains("goes to /v1/track"), "{err}");
    }

    #[test]
    fn a_url_of_nothing_but_spaces_is_none() {
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW",
            "pageUrl": "   ", "referrer": "",
        }))
        .unwrap();
        assert_eq!((e.page_url, e.referrer), (None, None));
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PAGE_VIEW", "pageUrl": " /a ",
        }))
        .unwrap();
        assert_eq!(e.page_url.as_deref(), Some(" /a "), "kept as sent");
    }

    #[test]
    fn numeric_ids_are_their_text_and_an_over_long_url_is_cut_not_refused() {
        let long = format!("/p?{}", "x".repeat(MAX_URL_LEN));
        let sent = json!({
            "userId": 42, "sessionId": 1718000000, "eventId": 7, "eventType": "PAGE_VIEW",
            "pageUrl": long, "referrer": "/short",
        });
        let e = parse(sent.clone()).unwrap();
        assert_eq!(
            (e.user_id.as_str(), e.session_id.as_str()),
            ("42", "1718000000")
        );
        assert_eq!(e.event_id, "7");
        let url = e.page_url.unwrap();
        assert_eq!(url.len(), MAX_URL_LEN);
        assert!(long.starts_with(&url));
        assert_eq!(e.referrer.as_deref(), Some("/short"));
        assert_eq!(cut_urls(&sent), ["pageUrl"]);
        // A whole number is one id however it is written; others keep their text.
        for (sent, id) in [
            (json!(1000.0), "1000"),
            (json!(1e3), "1000"),
            (json!(-0.0), "0"),
            (json!(1.5), "1.5"),
            (json!(9007199254740993u64), "9007199254740993"),
            (json!(1e20), "1e+20"),
        ] {
            let e =
                parse(json!({ "userId": sent.clone(), "sessionId": "s", "eventType": "CLICK" }))
                    .unwrap();
            assert_eq!(e.user_id, id, "{sent}");
        }
        // An empty eventId is no absent one: it would be stored again on every resend.
        let err = parse(json!({ "eventId": "", "userId": "u", "eventType": "CLICK" })).unwrap_err();
        assert_eq!(err.field, "eventId");
        assert!(err.reason.starts_with("is empty: send none"), "{err}");
    }

    #[test]
    fn a_money_text_names_a_currency_by_its_code_only() {
        for (text, code) in [
            ("USD 19.99", Some("USD")),
            ("19.99EUR", Some("EUR")),
            (" 19.99 GBP ", Some("GBP")),
            ("KWD1.25", Some("KWD")),
            ("$19.99", None),
            ("US$ 5", None),
            ("R$1,299.00", None),
            ("19.99 €", None),
            ("19.99", None),
            ("EUR", None),
            ("ABCD5", None),
            ("5 EURO", None),
            ("5 xEUR", None),
        ] {
            assert_eq!(currency_code(text), code, "{text}");
        }
    }

    #[test]
    fn devices_and_systems_are_said_in_one_vocabulary() {
        for (kind, model, class) in [
            (Some("ios"), Some("iPhone15,2"), Some("mobile")),
            (Some("ios"), Some("iPad13,1"), Some("tablet")),
            (Some("android"), None, Some("mobile")),
            (Some("Android"), Some("SM-T870 Tablet"), Some("tablet")),
            (Some("tablet"), None, Some("tablet")),
            (Some("macos"), None, Some("desktop")),
            (None, Some("iPhone14,2"), Some("mobile")),
            (None, Some("Pixel 8"), None),
            (Some("toaster"), None, None),
        ] {
            assert_eq!(device_class(kind, model), class, "{kind:?} {model:?}");
        }
        for (name, family) in [
            ("iPhone", Some("iOS")),
            ("iPad", Some("iOS")),
            ("iPadOS", Some("iOS")),
            ("iOS", Some("iOS")),
            ("android", Some("Android")),
            ("Mac OS X", Some("Mac OSX")),
            ("Windows 10", Some("Windows 10")),
            (" ", None),
        ] {
            assert_eq!(os_family(name).as_deref(), family, "{name}");
        }
    }

    #[test]
    fn epoch_microseconds_and_nanoseconds_are_named_as_such() {
        for (sent, unit) in [
            (json!(1_765_000_000_000_000i64), "microseconds"),
            (json!(1_765_000_000_000_000_000i64), "nanoseconds"),
        ] {
            let err = parse(json!({ "userId": "u", "eventType": "CLICK", "timestamp": sent }))
                .unwrap_err();
            assert!(
                err.reason.contains(&format!("looks like epoch {unit}")),
                "{sent}: {err}"
            );
        }
        // A year 9999 date is only far in the future.
        let err = parse(
            json!({ "userId": "u", "eventType": "CLICK", "timestamp": "9999-01-01T00:00:00Z" }),
        )
        .unwrap_err();
        assert!(err.reason.contains("s in the future (at most"), "{err}");
    }

    #[test]
    fn integers_beyond_64_bits_are_found_where_they_stand() {
        let all = |_: &str| true;
        let found = |json: &str| integer_beyond_int64(json, all, &[]);
        assert_eq!(found(r#"{"a": 1, "b": [1.5, -2, 3e30]}"#), None);
        assert_eq!(
            found(r#"{"p": {"n": {"deep": 18446744073709551616}}}"#),
            Some(("p.n.deep".into(), "18446744073709551616".into()))
        );
        assert_eq!(
            found(r#"{"p": {"l": [1, [2, 36893488147419103232]]}}"#),
            Some(("p.l".into(), "36893488147419103232".into()))
        );
        assert_eq!(
            found(r#"{"p": {"neg": -9223372036854775809}}"#),
            Some(("p.neg".into(), "-9223372036854775809".into()))
        );
        // 2^63: read as an unsigned integer, which MongoDB has no type for.
        assert_eq!(
            found(r#"{"id": 9223372036854775808}"#),
            Some(("id".into(), "9223372036854775808".into()))
        );
        assert_eq!(
            found(r#"{"min": -9223372036854775808, "max": 9223372036854775807}"#),
            None
        );
        // In strings, keys with escapes and quotes, and after other members.
        assert_eq!(
            found(
                r#"{"s": "99999999999999999999", "k\"e\\y": {"x": "a,b", "y": 99999999999999999999}}"#
            ),
            Some(("k\"e\\y.y".into(), "99999999999999999999".into()))
        );
        // Only in the members read.
        let props = |m: &str| m == "properties";
        assert_eq!(
            integer_beyond_int64(
                r#"{"extra": 99999999999999999999, "properties": {}}"#,
                props,
                &[]
            ),
            None
        );
        assert!(integer_beyond_int64(
            r#"{"extra": 1, "properties": {"a": [99999999999999999999]}}"#,
            props,
            &[]
        )
        .is_some());
        // Ids are stored as their text: exact up to 2^64 - 1, in their own member only.
        let ids = ["userId", "context.sessionId"];
        for (json, refused) in [
            (r#"{"userId": 18446744073709551615}"#, false),
            (r#"{"context": {"sessionId": 9223372036854775808}}"#, false),
            (r#"{"userId": 18446744073709551616}"#, true),
            (r#"{"userId": [9223372036854775808]}"#, true),
            (r#"{"properties": {"userId": 9223372036854775808}}"#, true),
        ] {
            assert_eq!(
                integer_beyond_int64(json, all, &ids).is_some(),
                refused,
                "{json}"
            );
        }
    }

    #[test]
    fn money_is_read_as_people_write_it() {
        for (text, value) in [
            ("19.99", 19.99),
            (" 7.5 ", 7.5),
            ("1e3", 1000.0),
            ("$19.99", 19.99),
            ("US$ 5", 5.0),
            ("USD 19.99", 19.99),
            ("19.99 €", 19.99),
            ("19.99EUR", 19.99),
            ("R$1,299.00", 1299.0),
            ("1,234,567", 1_234_567.0),
            ("1.299", 1.299),
            ("KWD 1.25", 1.25),
            ("£0.5", 0.5),
            // A comma as the decimal mark, and other ways to group thousands.
            ("19,99", 19.99),
            ("1,5", 1.5),
            ("1.299,00 €", 1299.0),
            ("EUR 1.299,00", 1299.0),
            ("1 299,00 €", 1299.0),
            ("1\u{a0}299,50\u{a0}€", 1299.5),
            ("CHF 1'299.00", 1299.0),
            ("12.500.000", 12_500_000.0),
            ("1 299 €", 1299.0),
            ("-1,25", -1.25),
            // No minor unit: a separator before three digits groups thousands.
            ("¥1,000", 1000.0),
            ("₩12,000", 12_000.0),
            ("1.000 JPY", 1000.0),
            ("JPY 1,500", 1500.0),
        ] {
            assert_eq!(money(text), Some(value), "{text}");
        }
        // The currency sent beside the amount says it too.
        assert_eq!(money_in("1,000", Some("JPY")), Some(1000.0));
        assert_eq!(money_in("1.000", Some("krw")), Some(1000.0));
        assert_eq!(money_in("1,000", Some("EUR")), None);
        // A currency sent beside the amount makes a dot before three digits two ways too.
        assert_eq!(money_in("1.299", Some("EUR")), None);
        assert_eq!(money_in("1.29", Some("EUR")), Some(1.29));
        assert_eq!(money("1.299"), Some(1.299));
        assert_eq!(money_in("0.125", Some("EUR")), Some(0.125));
        assert_eq!(money_in("12.500", Some("KWD")), Some(12.5));
        assert_eq!(money("12.500 KWD"), Some(12.5));
        assert_eq!(money_in("1.299", Some(" ")), Some(1.299));
        // Currency marks of one or two capitals, before or apart after.
        for (text, value) in [
            ("R 100", 100.0),
            ("R100", 100.0),
            ("RM 50.00", 50.0),
            ("100 TL", 100.0),
            ("5 KD", 5.0),
            ("100 $US", 100.0),
            ("19,99 $ CA", 19.99),
            ("USD5", 5.0),
            ("5USD", 5.0),
        ] {
            assert_eq!(money(text), Some(value), "{text}");
        }
        for text in [
            "abc",
            "NaN",
            "inf",
            "12,3456",
            "1,299,99",
            "1.299.00",
            "1,299.",
            "1 2345,00",
            "1_299",
            "1,2,3",
            "¥1.500",
            // A sign does not hide a group of thousands; magnitudes are not codes.
            "+1.299 €",
            "€+1.299",
            "$1.5K",
            "2M",
            "2 M",
            "10K USD",
            "1.5 MLN",
            "5 MIO",
            "5 EURO",
            // No group of thousands starts with 0.
            "¥0,500",
            "$",
            "",
            "five USD",
            "1,299.",
            "ABCD5",
            "1e400",
            "1,299",
            "$1,299",
            "1,299 €",
            "1.299 €",
            "€1.299",
        ] {
            assert_eq!(money(text), None, "{text}");
        }
        // A native purchase's amount as text is stored as the number.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": "$1,299.50", "currency": "USD"},
        }))
        .unwrap();
        assert_eq!(e.properties.get_f64("amount").unwrap(), 1299.5);
        // A code in the text becomes the currency, or must agree with it.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": "19.99 EUR"},
        }))
        .unwrap();
        assert_eq!(e.properties.get_str("currency").unwrap(), "EUR");
        assert_eq!(e.properties.get_f64("amount").unwrap(), 19.99);
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": "USD 5", "currency": "usd"},
        }))
        .unwrap();
        // (Its code stored upper case.)
        assert_eq!(e.properties.get_str("currency").unwrap(), "USD");
        // What cannot be read, or reads two ways, is kept as sent, counting no revenue.
        for unread in [
            json!({"amount": "USD 19.99", "currency": "EUR"}),
            json!({"amount": "1,299"}),
            json!({"amount": "twelve"}),
            json!({"amount": -1}),
            json!({"amount": 1e300}),
            json!({"amount": i64::MAX}),
            json!({"amount": true}),
        ] {
            let e = parse(json!({
                "userId": "v", "sessionId": "s", "eventType": "PURCHASE", "properties": unread.clone(),
            }))
            .unwrap();
            assert_eq!(e.purchase_amount(), None, "{unread}");
            assert_eq!(
                e.properties
                    .get(f::AMOUNT_UNREAD)
                    .cloned()
                    .map(bson::Bson::into_relaxed_extjson),
                Some(unread["amount"].clone()),
                "{unread}"
            );
        }
        // A null amount is none.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE", "properties": {"amount": null},
        }))
        .unwrap();
        assert!(e.properties.is_empty(), "{:?}", e.properties);
        // The client's own `amountUnread` is not overwritten: then the event is refused.
        let err = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": "1,299", "amountUnread": 1},
        }))
        .unwrap_err();
        assert_eq!(err.field, "properties.amount");
        assert!(err.reason.contains("`properties.amountUnread`"), "{err}");
    }

    #[test]
    fn a_clock_reset_to_1970_is_corrected_however_far_off() {
        // A phone whose clock restarted at 1970: the event 10 s before sending.
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": 3_600_000 - 10_000, "sentAt": 3_600_000,
        }))
        .unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), NOW - 10_000);
    }

    #[test]
    fn rfc3339_timestamps_are_accepted() {
        let e = parse(json!({
            "userId": "v", "sessionId": "s", "eventType": "CLICK",
            "timestamp": "2025-06-15T10:00:00.250Z",
        }))
        .unwrap();
        assert_eq!(e.timestamp.timestamp_millis(), 1_749_981_600_250);
    }

    #[test]
    fn rejects_each_bad_field_with_its_name() {
        let cases = [
            (json!({"sessionId": "s", "eventType": "CLICK"}), "userId"),
            (
                json!({"userId": true, "sessionId": "s", "eventType": "CLICK"}),
                "userId",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "TELEPORT"}),
                "eventType",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": NOW + 3_600_000}),
                "timestamp",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "timestamp": "yesterday"}),
                "timestamp",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "properties": [1]}),
                "properties",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "properties": {"$set": 1}}),
                "properties.$set",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "duration": -4}),
                "duration",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "duration": 1e300}),
                "duration",
            ),
            // Sent (by its clock) long before it happened: corrected into the future.
            (
                json!({"userId": "v", "eventType": "CLICK", "timestamp": NOW, "sentAt": 0}),
                "sentAt",
            ),
            (
                json!({"userId": " ", "sessionId": "s", "eventType": "CLICK"}),
                "userId",
            ),
            (
                json!({"userId": "v", "eventId": "a\u{0}b", "sessionId": "s", "eventType": "CLICK"}),
                "eventId",
            ),
            (
                json!({"userId": "v", "sessionId": "s\nt", "eventType": "CLICK"}),
                "sessionId",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "context": 1}),
                "context",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "context": {"ip": 5}}),
                "context.ip",
            ),
            (
                json!({"userId": "v", "sessionId": "s", "eventType": "CLICK", "context": {"userAgent": 5}}),
                "context.userAgent",
            ),
            (json!("just a string"), "event"),
            (
                json!({"userId": "v", "eventType": "CLICK", "timestamp": i64::MIN, "sentAt": i64::MAX}),
                "sentAt",
            ),
        ];
        for (input, field) in cases {
            let err = parse(input.clone()).unwrap_err();
            assert_eq!(err.field, field, "{input} -> {err}");
        }
    }

    #[test]
    fn a_forwarded_context_ip_is_read_and_an_unreadable_one_ignored() {
        for (raw, ip) in [
            ("203.0.113.7", Some("203.0.113.7")),
            ("203.0.113.7, 10.0.0.1", Some("203.0.113.7")),
            ("203.0.113.7:5678", Some("203.0.113.7")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("fe80::1%eth0", Some("fe80::1")),
            (" 2001:db8::2 ", Some("2001:db8::2")),
            ("unknown", None),
            ("", None),
        ] {
            assert_eq!(
                client_ip(raw).map(|i| i.to_string()).as_deref(),
                ip,
                "{raw}"
            );
        }
        // The event is taken either way; an unreadable address leaves the request's.
        let e = parse(
            json!({"userId": "v", "sessionId": "s", "eventType": "CLICK",
            "context": {"ip": "203.0.113.7, 10.0.0.1"}}),
        )
        .unwrap();
        assert_eq!(e.metadata.ip_address.as_deref(), Some("203.0.113.7"));
        let request = RequestContext {
            ip: Some("198.51.100.9".into()),
            ..ctx()
        };
        let e = parse_event(
            &json!({"userId": "v", "sessionId": "s", "eventType": "CLICK",
                "context": {"ip": "unknown"}}),
            &request,
            EventMetadata::default(),
        )
        .unwrap();
        assert_eq!(e.metadata.ip_address.as_deref(), Some("198.51.100.9"));
    }

    #[test]
    fn limits_of_amounts_durations_and_times_are_accepted_and_explained() {
        let ok = parse(
            json!({"userId": "v", "sessionId": "s", "eventType": "PURCHASE",
            "properties": {"amount": MAX_PURCHASE_AMOUNT}, "duration": MAX_DURATION_MS}),
        )
        .unwrap();
        assert_eq!(ok.duration, Some(MAX_DURATION_MS));
        // Epoch seconds instead of milliseconds: the error says what was expected.
        let err = parse(json!({"userId": "v", "eventType": "CLICK", "timestamp": NOW / 1000}))
            .unwrap_err();
        assert!(err.reason.contains("milliseconds"), "{err}");
    }

    #[test]
    fn what_a_plugin_returns_is_held_to_the_clients_rules() {
        let good = parse(json!({ "userId": "v", "eventType": "PURCHASE",
                                 "properties": { "amount": 10.0 } }))
        .unwrap();
        assert!(check_event(&good, NOW, 300_000).is_ok());
        let mut rich = good.clone();
        rich.properties.insert("amount", 1e14);
        let err = check_event(&rich, NOW, 300_000).unwrap_err();
        assert_eq!(err.field, "properties.amount");
        let mut dollar = good.clone();
        dollar.properties.insert("$set", 1);
        assert!(check_event(&dollar, NOW, 300_000).is_err());
        let mut blank = good;
        blank.user_id = " ".into();
        assert_eq!(
            check_event(&blank, NOW, 300_000).unwrap_err().field,
            "userId"
        );
    }

    #[test]
    fn a_property_beyond_64_bits_is_refused_not_rounded() {
        let err = parse(json!({ "userId": "v", "eventType": "CLICK",
                                "properties": { "order": { "id": u64::MAX } } }))
        .unwrap_err();
        assert_eq!(err.field, "properties.order.id", "{err}");
        assert!(parse(json!({ "userId": "v", "eventType": "CLICK",
                              "properties": { "id": i64::MAX } }))
        .is_ok());
    }

    #[test]
    fn a_sent_at_out_of_range_is_named_not_the_timestamp() {
        let err = parse(json!({ "userId": "v", "eventType": "CLICK",
                                "timestamp": NOW - 1000, "sentAt": 1e300 }))
        .unwrap_err();
        assert_eq!(err.field, "sentAt", "{err}");
    }

    #[test]
    fn members_sluice_does_not_read_are_named() {
        let v = json!({ "userId": "v", "eventType": "PAGE_VIEW", "pageURL": "/x",
                        "properties": {}, "sessionid": "s" });
        assert_eq!(unknown_members(&v), vec!["pageURL", "sessionid"]);
        assert!(parse(v).is_ok(), "still taken");
        assert!(unknown_members(&json!({ "userId": "v", "context": {} })).is_empty());
    }

    #[test]
    fn unknown_event_type_lists_the_known_ones() {
        let err =
            parse(json!({"userId": "v", "sessionId": "s", "eventType": "TELEPORT"})).unwrap_err();
        assert!(
            err.reason.contains("PAGE_VIEW") && err.reason.contains("`TELEPORT`"),
            "{err}"
        );
    }
}
