//! The Segment HTTP Tracking API's messages (identify, track, page, screen, group, alias),
//! mapped onto the platform's event model.
//!
//! Each message becomes one native event, validated by the same rules as the native API
//! ([`crate::tracking::parse_event`]):
//! - `messageId` -> `eventId` (dedupe); the visitor is `userId`, else `anonymousId`
//!   (resolved through identity links by the server);
//! - `page` -> PAGE_VIEW (`properties.url` / `referrer`, else `context.page.*`, ->
//!   `pageUrl` / `referrer`); `screen` -> SCREEN_VIEW;
//! - `track`: a purchase-like name (`tracking.purchase_events`) -> PURCHASE with
//!   `amount` from `revenue`, `total` or `value`; a name of the Segment e-commerce / B2B
//!   spec or a native event type -> that type; anything else -> CUSTOM. The original name
//!   is always kept in `properties.eventName` (a client property of that name moves to
//!   `properties.clientEventName`);
//! - `identify` -> IDENTIFY with the traits as properties (the server also copies them to
//!   the user's profile); `group` -> GROUP, `alias` -> ALIAS. Only these calls make these
//!   three types: a `track` named `IDENTIFY`, `GROUP` or `ALIAS` is CUSTOM, so a type says
//!   which call was made;
//! - `context.userAgent` / `ip` / `device` / `os` / `location` -> `metadata`, the rest of
//!   `context` is kept in `metadata.context`;
//! - the event time is `originalTimestamp`, else `timestamp`, corrected for clock skew by
//!   `sentAt` (of the message or its batch).
//!
//! A message may carry `context.sessionId` (or top-level `sessionId`); without one the
//! event writer assigns the session by the inactivity-gap rule.

use bson::Document;
use serde_json::{Map, Value};

use crate::error::ValidationError;
use crate::model::{Event, EventMetadata, EventType};
use crate::tracking::{parse_event, RequestContext, MAX_ID_LEN};

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl Kind {
    pub fn parse(text: &str) -> Option<Kind> {
        Some(match text {
            "identify" => Kind::Identify,
            "track" => Kind::Track,
            "page" => Kind::Page,
            "screen" => Kind::Screen,
            "group" => Kind::Group,
            "alias" => Kind::Alias,
            _ => return None,
        })
    }
}

/// One Segment message, ready for identity resolution and storage.
#[derive(Debug, Clone)]
pub struct Message {
    pub kind: Kind,
    /// `userId` is the raw visitor id here; the server replaces it with the resolved one.
    pub event: Event,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// `(from, to)`: an id that from now on counts as the user `to`.
    pub link: Option<(String, String)>,
    /// `identify` traits for the user's profile.
    pub traits: Option<Document>,
    /// What the client should hear of a message stored not quite as sent.
    pub warning: Option<String>,
    /// A PURCHASE whose amount could not be read: stored counting no revenue.
    pub amount_unread: bool,
}

/// Settings of the mapping.
#[derive(Debug, Clone)]
pub struct Options {
    /// `track` names (compared case-insensitively) stored as PURCHASE.
    pub purchase_events: Vec<String>,
}

/// Segment spec event names with a native event type.
const SPEC_NAMES: &[(&str, EventType)] = &[
    ("Signed Up", EventType::Signup),
    ("Signed In", EventType::Login),
    ("Signed Out", EventType::Logout),
    ("Products Searched", EventType::Search),
    ("Product Added", EventType::AddToCart),
    ("Product Removed", EventType::RemoveFromCart),
    ("Checkout Started", EventType::Checkout),
    ("Product Clicked", EventType::Click),
];

/// The property holding a `track` call's original name.
pub const EVENT_NAME: &str = "eventName";

/// Where a `track`'s own `properties.eventName` is kept (the name takes its place).
pub const CLIENT_EVENT_NAME: &str = "clientEventName";

fn id_field(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => Err(ValidationError::new(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        )),
        Some(Value::String(s)) => {
            crate::tracking::check_id(field, s)?;
            Ok(Some(s.clone()))
        }
        // Some SDKs send numeric user ids.
        Some(Value::Number(n)) => Ok(Some(crate::tracking::number_id(n))),
        Some(_) => Err(ValidationError::new(field, "expected a string")),
    }
}

fn object<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(ValidationError::new(field, "expected an object")),
    }
}

fn text(obj: Option<&Map<String, Value>>, field: &str) -> Option<String> {
    match obj?.get(field)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The user-profile field an `identify` trait is copied to (`email`, `firstName`,
/// `lastName`, also in snake case); other traits go under the profile's attributes.
pub fn profile_field(name: &str) -> Option<&'static str> {
    use crate::model::user_fields as u;
    match name {
        "email" => Some(u::EMAIL),
        "firstName" | "first_name" => Some(u::FIRST_NAME),
        "lastName" | "last_name" => Some(u::LAST_NAME),
        _ => None,
    }
}

/// The traits of `traits` that name a profile field (`email`, ...) but are neither a
/// string nor null: stored with their event, not copied to the profile, whose fields are
/// strings.
pub fn traits_not_copied(traits: &Document) -> Vec<&str> {
    traits
        .iter()
        .filter(|(k, v)| {
            profile_field(k).is_some() && !matches!(v, bson::Bson::String(_) | bson::Bson::Null)
        })
        .map(|(k, _)| k.as_str())
        .collect()
}

/// The warning for the traits of an identify (sent under `sent_in`) that are not
/// copied to the profile ([`traits_not_copied`]), if any.
pub fn traits_warning(traits: &Document, sent_in: &str) -> Option<String> {
    let names = traits_not_copied(traits);
    (!names.is_empty()).then(|| {
        let names: Vec<String> = names.iter().map(|n| format!("`{sent_in}.{n}`")).collect();
        format!(
            "{} not a string: stored with the event, not copied to the user's profile",
            names.join(", ")
        )
    })
}

/// A number, or a string holding one as people write money (`"19.90"`, `"$1,299.00"`,
/// see [`crate::tracking::money_in`], in the order's `currency` when it names one): some
/// SDKs send revenue as text.
fn number(v: &Value, currency: Option<&str>) -> Option<Value> {
    match v {
        Value::Number(_) => Some(v.clone()),
        Value::String(s) => crate::tracking::money_in(s, currency)
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number)),
        _ => None,
    }
}

/// The top-level members of a message the Segment spec does not define (a typo such as
/// `properites` would otherwise lose its value silently), at most 10; `_`-prefixed ones
/// (SDKs' own, `_metadata`) are left alone.
pub fn unknown_members(v: &Value) -> Vec<String> {
    crate::tracking::members_not_read(v, |k| KNOWN.contains(&k) || k.starts_with('_'))
}

/// A Segment message's members [`crate::tracking::integer_beyond_int64`] looks at: those
/// Sluice reads into the event (not `integrations`, `options`, `version`, `channel`,
/// which it does not store), and the ids among them.
pub const READ: crate::tracking::ReadMembers = crate::tracking::ReadMembers {
    read: |name| {
        KNOWN.contains(&name)
            && !["integrations", "options", "version", "channel", "writeKey"].contains(&name)
    },
    ids: &[
        "userId",
        "anonymousId",
        "messageId",
        "previousId",
        "groupId",
        "sessionId",
        "context.sessionId",
    ],
};

/// The top-level members of a message the Segment spec defines.
const KNOWN: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "context",
    "integrations",
    "properties",
    "traits",
    "event",
    "name",
    "category",
    "groupId",
    "previousId",
    "version",
    "channel",
    "writeKey",
    "options",
    "sessionId",
];

/// The total of an order's `products` (`price` × `quantity`, 1 when absent): `None`
/// when there are none or an item names no price (a list of what was ordered, not
/// priced); `Some(Err)` when a price or quantity cannot be read, or the total is no
/// amount (a coupon line taking it below 0): the order then counts no revenue, rather
/// than being refused for an amount it never sent, and the answer says so.
fn products_total(properties: &Map<String, Value>) -> Option<Result<Value, NoTotal>> {
    let items = match properties.get("products")? {
        Value::Null => return None,
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) => items,
        _ => return Some(Err(NoTotal::Unpriced)),
    };
    if items
        .iter()
        .any(|i| i.get("price").is_none_or(Value::is_null))
    {
        return Some(Err(NoTotal::Unpriced));
    }
    // A price in the order's currency (`"1.000"` in JPY is a thousand); a quantity in none.
    let currency = properties.get("currency").and_then(Value::as_str);
    let read = |v: &Value, currency| number(v, currency).and_then(|n| n.as_f64());
    let mut total = 0.0;
    for item in items {
        let Some(price) = item.get("price").and_then(|p| read(p, currency)) else {
            return Some(Err(NoTotal::Unread));
        };
        let quantity = match item.get("quantity") {
            None | Some(Value::Null) => 1.0,
            Some(q) => match read(q, None) {
                Some(q) => q,
                None => return Some(Err(NoTotal::Unread)),
            },
        };
        total += price * quantity;
    }
    // Cents added as doubles (0.1 + 0.2): the total to the millionth, as revenue counts.
    let total = (total * 1e6).round() / 1e6;
    if !(0.0..=crate::tracking::MAX_PURCHASE_AMOUNT).contains(&total) {
        return Some(Err(NoTotal::Unread));
    }
    Some(
        serde_json::Number::from_f64(total)
            .map(Value::Number)
            .ok_or(NoTotal::Unread),
    )
}

/// Why an order's `products` give it no amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoTotal {
    /// A price or quantity sent that cannot be read, or a total out of range: an amount
    /// that could not be read (counted as such).
    Unread,
    /// No price to read: `products` not a list, or an item that is not an object or has
    /// no `price`. Nothing unreadable was sent; the order has no amount (said, not
    /// counted).
    Unpriced,
}

/// Whether the native rules read `amount` as an amount ([`crate::tracking::read_amount`]:
/// money text, its currency code agreeing with `currency`, within range).
fn reads_as_amount(amount: &Value, currency: Option<&Value>) -> Result<(), String> {
    let mut probe = serde_json::Map::new();
    probe.insert("amount".into(), amount.clone());
    if let Some(c) = currency {
        probe.insert("currency".into(), c.clone());
    }
    let mut probe =
        crate::tracking::json_to_document(&Value::Object(probe)).map_err(|e| e.reason)?;
    crate::tracking::read_amount(EventType::Purchase, &mut probe).map_err(|e| e.reason)
}

fn track_type(name: &str, options: &Options) -> EventType {
    if options
        .purchase_events
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
    {
        return EventType::Purchase;
    }
    if let Some((_, t)) = SPEC_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        return *t;
    }
    match EventType::parse(name) {
        // Made by their own calls only (an identify also updates the profile).
        Ok(EventType::Identify | EventType::Group | EventType::Alias) | Err(_) => EventType::Custom,
        Ok(t) => t,
    }
}

/// Maps one message. `kind` comes from the path (`/v1/track`...) or, in a batch, from the
/// message's `type`.
pub fn parse_message(
    v: &Value,
    kind: Option<Kind>,
    ctx: &RequestContext,
    options: &Options,
) -> Result<Message, ValidationError> {
    let Value::Object(obj) = v else {
        return Err(ValidationError::new("message", "expected an object"));
    };
    let own_kind = obj
        .get("type")
        .and_then(Value::as_str)
        .and_then(Kind::parse);
    let kind = match (kind, own_kind) {
        // A body whose `type` names another call than its path (`"type": "track"` posted
        // to /v1/page): its fields (`event`) are that call's, so it is read as one.
        (Some(_), Some(own)) => own,
        (Some(k), None) => k,
        (None, _) => match obj.get("type") {
            Some(Value::String(t)) => Kind::parse(t).ok_or_else(|| {
                ValidationError::new(
                    "type",
                    format!(
                        "unknown type `{t}` (expected identify, track, page, screen, group or alias)"
                    ),
                )
            })?,
            // A native event sent to the Segment-compatible path: say where it belongs.
            _ if obj.contains_key("eventType") => {
                return Err(ValidationError::new(
                    "type",
                    "is required in a batch (this looks like a native Sluice event, with `eventType`: send those to /v1/events/batch)",
                ))
            }
            _ => return Err(ValidationError::new("type", "is required in a batch")),
        },
    };
    let user_id = id_field(obj, "userId")?;
    let anonymous_id = id_field(obj, "anonymousId")?;
    let visitor = user_id
        .clone()
        .or_else(|| anonymous_id.clone())
        .ok_or_else(|| {
            ValidationError::new("userId", "either userId or anonymousId is required")
        })?;
    let context = object(obj, "context")?;
    // `context.traits` are the current user's traits: an identify without its own
    // traits takes them (and they leave the context); one with its own keeps them in the
    // context as sent. A group's traits are the group's, never the user's.
    let own_traits = object(obj, "traits")?;
    // An empty `traits` says no more than none: an SDK may send `{}` there with the
    // user's traits in `context.traits`. Only an object is taken from there: anything
    // else stays in the context, as sent.
    let context_traits_taken = kind == Kind::Identify
        && own_traits.is_none_or(Map::is_empty)
        && context
            .and_then(|c| c.get("traits"))
            .is_some_and(Value::is_object);
    // Where the client sent what an identify stores as its properties, for errors.
    let traits_from = if context_traits_taken {
        "context.traits"
    } else {
        "traits"
    };
    // Traits (a user's or a group's) are what SDKs keep and send again with every call:
    // names MongoDB would misread are escaped as in the context, since refusing them
    // would refuse every later identify of that user. A `track`'s properties are escaped
    // too, and the answer names them: they come from app code the SDK passes on as it
    // is (`button.color`, a Mixpanel-style `$price`), and refused, every such event is
    // lost, as SDKs drop what is answered `rejected` (the native API, whose clients are
    // written for it, refuses them, naming the field).
    let traits_of = |t: Option<&Map<String, Value>>| match escaped_names(Value::Object(
        t.cloned().unwrap_or_default(),
    )) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // Property names stored with look-alikes, as sent.
    let mut escaped = Vec::new();
    let mut properties = match kind {
        Kind::Identify if context_traits_taken => traits_of(
            context
                .and_then(|c| c.get("traits"))
                .and_then(Value::as_object),
        ),
        Kind::Identify => traits_of(own_traits),
        Kind::Group => traits_of(own_traits),
        _ => {
            let sent = Value::Object(object(obj, "properties")?.cloned().unwrap_or_default());
            match escaped_names_noted(sent, "properties", &mut escaped) {
                Value::Object(m) => m,
                _ => Map::new(),
            }
        }
    };
    // `page` and `screen` carry their `name` and `category` at the top level.
    if matches!(kind, Kind::Page | Kind::Screen) {
        if let Some(category) = text(Some(obj), "category") {
            properties
                .entry("category")
                .or_insert(Value::String(category));
        }
    }
    let page = context
        .and_then(|c| c.get("page"))
        .and_then(Value::as_object);
    let mut page_url = None;
    let mut referrer = None;
    let mut link = None;
    let mut traits = None;
    let mut warning = None;
    // The property a purchase's `amount` was taken from (`revenue`, ...), if not its own.
    let mut amount_from = None;
    // Where an amount that cannot be read was sent (`properties.revenue`, ...), with why
    // when it is readable but its currency code disagrees with `currency`.
    let mut unread_from: Option<(String, Option<String>)> = None;
    let event_type = match kind {
        Kind::Page => {
            let sources = [(Some(&properties), "properties"), (page, "context.page")];
            page_url = first_text(&sources, "url");
            referrer = first_text(&sources, "referrer");
            if let Some(name) = text(Some(obj), "name") {
                properties.entry("name").or_insert(Value::String(name));
            }
            EventType::PageView
        }
        Kind::Screen => {
            if let Some(name) = text(Some(obj), "name") {
                properties.entry("name").or_insert(Value::String(name));
            }
            EventType::ScreenView
        }
        Kind::Track => {
            let name = text(Some(obj), "event").ok_or_else(|| {
                // Sluice's own event shape sent to the Segment routes: say where it goes.
                let native = obj.contains_key("eventType") && !obj.contains_key("type");
                ValidationError::new(
                    "event",
                    if native {
                        "is required for track (this is the Segment API: an event with `eventType` is Sluice's own shape, posted to /v1/events or /v1/events/batch)"
                    } else {
                        "is required for track"
                    },
                )
            })?;
            let t = track_type(&name, options);
            if t == EventType::Purchase && !properties.contains_key("amount") {
                // The first of these present is the amount. One the native rules cannot
                // read leaves the purchase without revenue, kept as sent where it was.
                let named = ["revenue", "total", "value"]
                    .iter()
                    .find(|k| properties.get(**k).is_some_and(|v| !v.is_null()));
                if let Some(k) = named {
                    // Text goes on as text: the native rules read it, with the currency
                    // code it may name.
                    let amount = match &properties[*k] {
                        Value::String(s) => Value::String(s.clone()),
                        other => number(other, None).unwrap_or_else(|| other.clone()),
                    };
                    // One they cannot read is not copied: it stays as sent where it
                    // was (no `amountUnread` copy of it).
                    match reads_as_amount(&amount, properties.get("currency")) {
                        Ok(()) => {
                            properties.insert("amount".into(), amount);
                            amount_from = Some(format!("properties.{k}"));
                        }
                        Err(why) => {
                            // Read without `currency`, it is an amount: the codes clash.
                            let clash = reads_as_amount(&amount, None).is_ok();
                            unread_from = Some((format!("properties.{k}"), clash.then_some(why)));
                        }
                    }
                } else {
                    // An order sent with its line items only.
                    match products_total(&properties) {
                        Some(Ok(amount)) => {
                            properties.insert("amount".into(), amount);
                            amount_from = Some("properties.products".into());
                        }
                        Some(Err(NoTotal::Unread)) => {
                            unread_from = Some(("properties.products".into(), None))
                        }
                        Some(Err(NoTotal::Unpriced)) => {
                            warning = Some(
                                "`properties.products` gives no amount: an order's total is read from its items when `products` is a list of objects that each have a `price`; counting no revenue (send `revenue` or `total`, or a price on every item)".into()
                            )
                        }
                        None => {}
                    }
                }
            }
            // The client's own property of that name is kept beside it.
            if let Some(own) = properties.remove(EVENT_NAME) {
                if own.as_str() != Some(name.as_str()) {
                    // Under the first of clientEventName, clientEventName2, ... that is
                    // free: nothing the client sent is overwritten.
                    let key = (1..)
                        .map(|n| match n {
                            1 => CLIENT_EVENT_NAME.to_string(),
                            n => format!("{CLIENT_EVENT_NAME}{n}"),
                        })
                        .find(|k| !properties.contains_key(k))
                        .unwrap_or_default();
                    properties.insert(key, own);
                }
            }
            properties.insert(EVENT_NAME.into(), Value::String(name));
            page_url = first_text(&[(page, "context.page")], "url");
            referrer = first_text(&[(page, "context.page")], "referrer");
            t
        }
        Kind::Identify => {
            // Traits that become the profile's own fields are strings there: one that is
            // not (`email: 123`) stays with the event, but is not copied to the profile
            // (the profile's update leaves it out). Refusing the identify would lose its
            // other traits and the event with them, since clients drop what is answered
            // rejected.
            let all = crate::tracking::json_to_document(&Value::Object(properties.clone()))?;
            warning = traits_warning(&all, traits_from);
            traits = Some(all);
            EventType::Identify
        }
        Kind::Group => {
            let group = id_field(obj, "groupId")?
                .ok_or_else(|| ValidationError::new("groupId", "is required for group"))?;
            let traits = std::mem::take(&mut properties);
            properties.insert("groupId".into(), Value::String(group));
            properties.insert("traits".into(), Value::Object(traits));
            EventType::Group
        }
        Kind::Alias => {
            let previous = id_field(obj, "previousId")?
                .ok_or_else(|| ValidationError::new("previousId", "is required for alias"))?;
            let to = user_id
                .clone()
                .ok_or_else(|| ValidationError::new("userId", "is required for alias"))?;
            properties.insert("previousId".into(), Value::String(previous.clone()));
            link = Some((previous, to));
            EventType::Alias
        }
    };
    // Any message carrying both ids ties the anonymous id to the user.
    if link.is_none() {
        if let (Some(anon), Some(user)) = (&anonymous_id, &user_id) {
            if anon != user {
                link = Some((anon.clone(), user.clone()));
            }
        }
    }

    // Where each native field came from, so an error names what the client sent.
    let mut sent_as: Vec<(&str, String)> = vec![("eventId", "messageId".into())];
    if user_id.is_none() {
        sent_as.push(("userId", "anonymousId".into()));
    }
    let mut native = Map::new();
    if let Some(id) = obj.get("messageId") {
        native.insert("eventId".into(), id.clone());
    }
    native.insert("userId".into(), Value::String(visitor));
    let session = match obj.get("sessionId") {
        Some(s) => Some(s),
        None => {
            sent_as.push(("sessionId", "context.sessionId".into()));
            context.and_then(|c| c.get("sessionId"))
        }
    };
    match session {
        Some(Value::Number(n)) => {
            native.insert(
                "sessionId".into(),
                Value::String(crate::tracking::number_id(n)),
            );
        }
        Some(s) => {
            native.insert("sessionId".into(), s.clone());
        }
        None => {}
    }
    native.insert(
        "eventType".into(),
        Value::String(event_type.as_str().into()),
    );
    // A message that went through Segment already (a replay of archived payloads, a
    // forward) carries `receivedAt`, and its `timestamp` is the corrected time: taken as
    // it is. One from an SDK has the client's clock in `originalTimestamp` (or
    // `timestamp`), corrected with `sentAt`.
    let relayed = obj.get("receivedAt").is_some_and(|v| !v.is_null());
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let order = if relayed {
        ["timestamp", "originalTimestamp"]
    } else {
        ["originalTimestamp", "timestamp"]
    };
    if let Some((name, t)) = order.iter().find_map(|k| present(k).map(|t| (*k, t))) {
        native.insert("timestamp".into(), t.clone());
        sent_as.push(("timestamp", name.into()));
    }
    if let (Some(sent), false) = (obj.get("sentAt"), relayed) {
        native.insert("sentAt".into(), sent.clone());
    }
    let uncorrected;
    let ctx = if relayed {
        uncorrected = RequestContext {
            batch_sent_at_ms: None,
            ..ctx.clone()
        };
        &uncorrected
    } else {
        ctx
    };
    // A client's own `amountUnread` (beside an amount that cannot be read, the event is
    // refused: see `parse_event`).
    let own_unread = properties.contains_key(crate::model::event_fields::AMOUNT_UNREAD);
    native.insert("properties".into(), Value::Object(properties));
    // SDKs fill these from the browser's address bar; a URL longer than an event's
    // `pageUrl` may be (tracking parameters) is cut there, and kept whole where it was
    // sent (`properties.url`, `context.page`), rather than refusing the event.
    if let Some((u, from)) = page_url {
        native.insert("pageUrl".into(), Value::String(cut_url(u)));
        sent_as.push(("pageUrl", from));
    }
    if let Some((r, from)) = referrer {
        native.insert("referrer".into(), Value::String(cut_url(r)));
        sent_as.push(("referrer", from));
    }
    if kind == Kind::Group {
        sent_as.push(("properties.traits", "traits".into()));
    }
    let amount_from_copied = amount_from.is_some();
    if let Some(from) = amount_from {
        sent_as.push(("properties.amount", from));
    }
    sent_as.push((
        "properties",
        match kind {
            Kind::Identify => traits_from.into(),
            _ => "properties".into(),
        },
    ));
    if let Some(c) = context {
        native.insert("context".into(), Value::Object(c.clone()));
    }
    let mut event = parse_event(&Value::Object(native), ctx, EventMetadata::default())
        .map_err(|e| rename_field(e, &sent_as))?;
    // An amount that cannot be read: one sent as `revenue` (or ...) was left where it
    // was; one sent as `amount` was set aside by `parse_event` as `amountUnread` (a
    // client's own `amountUnread` beside it is refused there, so with one, the amount
    // was read or absent).
    let set_aside = !own_unread
        && event.event_type == EventType::Purchase
        && !event
            .properties
            .contains_key(crate::model::event_fields::AMOUNT)
        && event
            .properties
            .contains_key(crate::model::event_fields::AMOUNT_UNREAD);
    // `parse_event` reads an amount copied here as it was read above.
    debug_assert!(!(set_aside && amount_from_copied));
    let unread_from = unread_from.or_else(|| set_aside.then(|| ("properties.amount".into(), None)));
    // Only a PURCHASE reads an amount.
    let amount_unread = unread_from.is_some();
    if let Some((from, clash)) = &unread_from {
        warning = Some(if from == "properties.products" {
            format!(
                "`properties.products` gives no amount Sluice reads (a `price` or `quantity` that cannot be read, or a total below 0 or over {:e}): counting no revenue",
                crate::tracking::MAX_PURCHASE_AMOUNT
            )
        } else {
            // A message's own `amount` was set aside by `parse_event`, as a native one is.
            let kept = (from == "properties.amount").then_some("properties.amountUnread");
            crate::tracking::amount_unread_warning(from, clash.as_deref(), kept)
        });
    }
    if !escaped.is_empty() {
        let shown: Vec<String> = escaped.iter().take(5).map(|p| format!("`{p}`")).collect();
        let more = escaped.len().saturating_sub(shown.len());
        let said = format!(
            "{}{} stored with look-alike characters (`$` as `＄`, `.` as `．`, NUL as `�`, an empty name as `_`; with `_` appended where two names would be one): MongoDB would read such names as operators or paths",
            shown.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        );
        warning = Some(match warning {
            Some(w) => format!("{w}; {said}"),
            None => said,
        });
    }
    if let Some(c) = context {
        apply_context(
            &mut event.metadata,
            c,
            context_traits_taken,
            ctx.ignore_client_context,
        )?;
    }
    // Kept whenever sent, an anonymous visitor's too (its `userId` is then the same id):
    // a reader tells anonymous traffic from known users by it.
    event.metadata.anonymous_id = anonymous_id.clone();
    Ok(Message {
        kind,
        event,
        user_id,
        anonymous_id,
        link,
        traits,
        warning,
        amount_unread,
    })
}

/// `url` cut to at most [`MAX_URL_LEN`](crate::tracking::MAX_URL_LEN) bytes, at a
/// character boundary.
fn cut_url(mut url: String) -> String {
    let end = crate::model::prefix_within(&url, crate::tracking::MAX_URL_LEN).len();
    url.truncate(end);
    url
}

/// A `context` as MongoDB can hold it: names it would misread (a `$` prefix, a `.`, a
/// NUL, an empty name) are written with look-alikes (`＄` U+FF04, `．` U+FF0E, `�`
/// U+FFFD, `_`), at any depth. SDKs attach what they hold to the context (Mixpanel-style
/// `$email` traits in `context.traits`, say): refusing the event for it would lose
/// every event of that device.
fn escaped_names(v: Value) -> Value {
    escaped_names_noted(v, "", &mut Vec::new())
}

/// [`escaped_names`], noting in `escaped` the path (under `at`) of each name written
/// with look-alikes, as sent.
fn escaped_names_noted(v: Value, at: &str, escaped: &mut Vec<String>) -> Value {
    match v {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let path = format!("{at}.{k}");
                let v = escaped_names_noted(v, &path, escaped);
                let mut name = escaped_name(k);
                let mut renamed = name != path[at.len() + 1..];
                // Two names that escape alike (`a.b` and `a．b`) both keep their values:
                // the later as sent gets `_` appended, and is said too.
                while out.contains_key(&name) {
                    name.push('_');
                    renamed = true;
                }
                if renamed {
                    escaped.push(path);
                }
                out.insert(name, v);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| escaped_names_noted(item, at, escaped))
                .collect(),
        ),
        other => other,
    }
}

fn escaped_name(k: String) -> String {
    if k.is_empty() {
        return "_".into();
    }
    if crate::model::is_storable_field_name(&k) {
        return k;
    }
    let k = k.replace('.', "\u{FF0E}").replace('\0', "\u{FFFD}");
    match k.strip_prefix('$') {
        Some(rest) => format!("\u{FF04}{rest}"),
        None => k,
    }
}

/// Errors name the Segment field the client sent, not the native one: `sent_as` pairs a
/// native field with the client's (a field under it keeps its path).
fn rename_field(mut err: ValidationError, sent_as: &[(&str, String)]) -> ValidationError {
    for (native, client) in sent_as {
        if let Some(rest) = err.field.strip_prefix(native) {
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                err.field = format!("{client}{rest}");
                break;
            }
        }
    }
    err
}

/// The first non-empty string `key` among `sources` (an object and its path), with the
/// path it was found at.
fn first_text(
    sources: &[(Option<&Map<String, Value>>, &str)],
    key: &str,
) -> Option<(String, String)> {
    sources
        .iter()
        .find_map(|(obj, path)| text(*obj, key).map(|v| (v, format!("{path}.{key}"))))
}

/// `context.device` / `os` / `location` into the metadata; the rest kept as sent.
/// `context.traits` is left out when an identify took them as its traits. When the
/// request's key may not say where the event came from (`untrusted`), `location` is left
/// to the request's address, and `ip`, `userAgent` and `location` stay in the context as
/// sent, unused.
fn apply_context(
    m: &mut EventMetadata,
    c: &Map<String, Value>,
    traits_taken: bool,
    untrusted: bool,
) -> Result<(), ValidationError> {
    // In the vocabulary the user agent's are said in (the context keeps them as sent).
    let device = c.get("device").and_then(Value::as_object);
    m.device = crate::tracking::device_class(
        text(device, "type").as_deref(),
        text(device, "model").as_deref(),
    )
    .map(str::to_string);
    let os = c.get("os").and_then(Value::as_object);
    m.os = text(os, "name").and_then(|n| crate::tracking::os_family(&n));
    if !untrusted {
        let location = c.get("location").and_then(Value::as_object);
        m.country = text(location, "country");
        m.region = text(location, "region");
        m.city = text(location, "city");
    }
    let mut rest = Map::new();
    for (k, v) in c {
        let taken = match k.as_str() {
            "userAgent" | "ip" => !untrusted,
            "sessionId" => true,
            "traits" => traits_taken,
            _ => false,
        };
        if !taken {
            rest.insert(k.clone(), v.clone());
        }
    }
    if !rest.is_empty() {
        let rest = escaped_names(Value::Object(rest));
        crate::tracking::check_properties("context", &rest, 0)?;
        m.context = crate::tracking::json_to_document(&rest)
            .map_err(|_| ValidationError::new("context", "expected an object"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::tests::{ctx, NOW};
    use serde_json::json;

    fn opts() -> Options {
        Options {
            purchase_events: vec!["Order Completed".into()],
        }
    }

    fn parse(v: Value) -> Result<Message, ValidationError> {
        parse_message(&v, None, &ctx(), &opts())
    }

    #[test]
    fn an_order_with_line_items_only_takes_their_total() {
        let message = |products: Value| {
            parse(
                json!({ "type": "track", "userId": "u1", "event": "Order Completed",
                "properties": { "products": products } }),
            )
            .unwrap()
        };
        let order = |products: Value| message(products).event.properties;
        let p =
            order(json!([{ "price": 5, "quantity": 2 }, { "price": "0.10" }, { "price": 0.2 }]));
        assert_eq!(p.get_f64("amount").unwrap(), 10.3);
        // An item without a price, or items that are no objects: no amount, said.
        for unpriced in [
            json!([{ "price": 5 }, { "sku": "x" }]),
            json!([{ "price": 5 }, "sku-x"]),
            json!({ "sku": "x", "price": 5 }),
            json!("sku-x"),
        ] {
            let m = message(unpriced.clone());
            assert!(!m.event.properties.contains_key("amount"), "{unpriced}");
            assert!(!m.amount_unread, "{unpriced}: nothing unreadable was sent");
            assert!(
                m.warning
                    .as_deref()
                    .is_some_and(|w| w.starts_with("`properties.products` gives no amount:")),
                "{unpriced}: {:?}",
                m.warning
            );
        }
        // None, or an empty list: no amount, nothing to say.
        for quiet in [json!([]), Value::Null] {
            let m = message(quiet.clone());
            assert!(!m.event.properties.contains_key("amount"));
            assert_eq!(m.warning, None, "{quiet}");
        }
        // Nor a total no amount may be: the order is still stored.
        let p = order(json!([{ "price": 20 }, { "price": -25, "name": "coupon" }]));
        assert!(!p.contains_key("amount"), "{p}");
    }

    #[test]
    fn a_body_s_own_type_wins_over_its_path() {
        let m = parse_message(
            &json!({ "type": "track", "userId": "v", "event": "Clicked" }),
            Some(Kind::Page),
            &ctx(),
            &opts(),
        )
        .unwrap();
        assert_eq!(m.event.event_type, EventType::Custom);
        assert_eq!(m.event.properties.get_str(EVENT_NAME).unwrap(), "Clicked");
        // Without one, the path says.
        let m =
            parse_message(&json!({ "userId": "v" }), Some(Kind::Page), &ctx(), &opts()).unwrap();
        assert_eq!(m.event.event_type, EventType::PageView);
    }

    #[test]
    fn a_native_event_in_a_segment_batch_is_pointed_to_the_native_path() {
        let err = parse(json!({ "userId": "v", "eventType": "PAGE_VIEW" })).unwrap_err();
        assert_eq!(err.field, "type");
        assert!(err.reason.contains("/v1/events/batch"), "{err}");
        let err = parse(json!({ "userId": "v" })).unwrap_err();
        assert_eq!(err.reason, "is required in a batch");
        // At /v1/track too (the path names the type).
        let native = json!({ "userId": "v", "eventType": "PAGE_VIEW" });
        let err = parse_message(&native, Some(Kind::Track), &ctx(), &opts()).unwrap_err();
        assert_eq!(err.field, "event");
        assert!(err.reason.contains("posted to /v1/events"), "{err}");
        let segment = json!({ "userId": "v" });
        let err = parse_message(&segment, Some(Kind::Track), &ctx(), &opts()).unwrap_err();
        assert_eq!(err.reason, "is required for track");
    }

    #[test]
    fn page_maps_url_referrer_and_time_with_skew_correction() {
        let m = parse(json!({
            "type": "page", "messageId": "m1", "anonymousId": "anon-1", "name": "Home",
            "properties": {"url": "https://shop.example/", "title": "Shop"},
            "context": {"page": {"referrer": "https://search.example/"}, "userAgent": "ua"},
            "timestamp": "2025-06-15T15:06:30Z", "sentAt": "2025-06-15T15:06:40Z",
        }))
        .unwrap();
        assert_eq!(m.kind, Kind::Page);
        let e = &m.event;
        assert_eq!(e.event_id, "m1");
        assert_eq!(e.user_id, "anon-1");
        assert_eq!(e.session_id, "", "no session id: the writer assigns one");
        assert_eq!(e.event_type, EventType::PageView);
        assert_eq!(e.page_url.as_deref(), Some("https://shop.example/"));
        assert_eq!(e.referrer.as_deref(), Some("https://search.example/"));
        assert_eq!(e.properties.get_str("name").unwrap(), "Home");
        assert_eq!(e.timestamp.timestamp_millis(), NOW - 10_000);
        assert_eq!(e.metadata.user_agent.as_deref(), Some("ua"));
        assert!(e.metadata.context.get_document("page").is_ok());
        assert!(m.link.is_none());
    }

    #[test]
    fn a_revenue_text_names_its_currency_as_an_amount_text_does() {
        let e = parse(json!({
            "type": "track", "anonymousId": "a", "event": "Order Completed",
            "properties": {"revenue": "GBP 12.50"},
        }))
        .unwrap()
        .event;
        assert_eq!(e.properties.get_f64("amount").unwrap(), 12.5);
        assert_eq!(e.properties.get_str("currency").unwrap(), "GBP");
        // In another currency than `currency` says: no revenue, the text kept.
        let e = parse(json!({
            "type": "track", "anonymousId": "a", "event": "Order Completed",
            "properties": {"revenue": "GBP 12.50", "currency": "USD"},
        }))
        .unwrap()
        .event;
        assert_eq!(e.purchase_amount(), None);
        assert_eq!(e.properties.get_str("revenue").unwrap(), "GBP 12.50");
    }

    #[test]
    fn purchase_names_become_purchase_with_amount_from_revenue() {
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "order completed",
            "properties": {"revenue": "19.90", "currency": "EUR"},
        }))
        .unwrap();
        assert_eq!(m.event.event_type, EventType::Purchase);
        assert_eq!(m.event.properties.get_f64("amount").unwrap(), 19.9);
        assert_eq!(
            m.event.properties.get_str(EVENT_NAME).unwrap(),
            "order completed"
        );
        let spec = parse(json!({"type": "track", "userId": "u1", "event": "Signed Up"})).unwrap();
        assert_eq!(spec.event.event_type, EventType::Signup);
        let custom =
            parse(json!({"type": "track", "userId": "u1", "event": "Video Played"})).unwrap();
        assert_eq!(custom.event.event_type, EventType::Custom);
        assert_eq!(
            custom.event.properties.get_str(EVENT_NAME).unwrap(),
            "Video Played"
        );
    }

    #[test]
    fn revenue_that_cannot_be_read_leaves_a_purchase_without_revenue() {
        for bad in [
            json!("abc"),
            json!("NaN"),
            json!({}),
            json!("€ 1,250"),
            json!(-10),
        ] {
            let e = parse(json!({
                "type": "track", "userId": "u1", "event": "Order Completed",
                "properties": { "revenue": bad.clone() },
            }))
            .unwrap()
            .event;
            assert_eq!(e.event_type, EventType::Purchase);
            // Kept as sent where it was sent, and no amount: no revenue counted.
            let kept = e
                .properties
                .get("revenue")
                .cloned()
                .map(bson::Bson::into_relaxed_extjson);
            assert_eq!(kept.as_ref(), Some(&bad));
            assert!(
                !e.properties.contains_key("amount") && !e.properties.contains_key("amountUnread"),
                "{bad}: {:?}",
                e.properties
            );
            assert_eq!(e.purchase_amount(), None);
        }
        // The client's own `amountUnread` stays beside a revenue that was read...
        let e = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "revenue": 10, "amountUnread": "x" },
        }))
        .unwrap()
        .event;
        assert_eq!(e.properties.get_str("amountUnread").unwrap(), "x");
        assert_eq!(e.purchase_amount(), Some(10.0));
        // ...and beside one that was not: the purchase is stored, not refused, and the
        // message says which property could not be read.
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "revenue": "12,500", "amountUnread": "mine" },
        }))
        .unwrap();
        assert!(m.amount_unread);
        assert_eq!(m.event.properties.get_str("amountUnread").unwrap(), "mine");
        assert!(m
            .warning
            .unwrap()
            .starts_with("`properties.revenue` is not an amount"));
        // A message's own `amount` that cannot be read is set aside, as a native one is,
        // and the warning says where.
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "amount": "12,500" },
        }))
        .unwrap();
        assert!(m.amount_unread);
        assert_eq!(
            m.event.properties.get_str("amountUnread").unwrap(),
            "12,500"
        );
        let warning = m.warning.unwrap();
        assert!(
            warning.starts_with("`properties.amount` is not an amount")
                && warning.contains("kept as `properties.amountUnread`"),
            "{warning}"
        );
        // A currency code disagreeing with `currency` is said as such.
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "revenue": "GBP 12.50", "currency": "USD" },
        }))
        .unwrap();
        assert!(m.amount_unread);
        let warning = m.warning.unwrap();
        assert!(warning.contains("is in GBP"), "{warning}");
    }

    #[test]
    fn context_traits_that_are_no_object_stay_in_the_context() {
        let m = parse(json!({
            "type": "identify", "userId": "u1",
            "context": {"traits": "vip"},
        }))
        .unwrap();
        assert_eq!(m.event.metadata.context.get_str("traits").unwrap(), "vip");
    }

    #[test]
    fn an_empty_traits_object_leaves_the_context_s_traits_to_the_identify() {
        let m = parse(json!({
            "type": "identify", "userId": "u1", "traits": {},
            "context": {"traits": {"email": "ctx@example.com"}},
        }))
        .unwrap();
        assert_eq!(
            m.traits.unwrap().get_str("email").unwrap(),
            "ctx@example.com"
        );
    }

    #[test]
    fn products_that_cannot_be_totalled_are_said_products_without_prices_are_not() {
        for (products, unread) in [
            (json!([{ "price": "abc" }]), true),
            (json!([{ "price": -3 }]), true),
            (json!([{ "price": "abc" }, { "price": 2 }]), true),
            (json!([{ "price": 2, "quantity": "many" }]), true),
            (json!([{ "sku": "a" }, { "price": 2 }]), false),
            (json!([]), false),
        ] {
            let m = parse(json!({
                "type": "track", "userId": "u1", "event": "Order Completed",
                "properties": { "products": products.clone() },
            }))
            .unwrap();
            assert_eq!(m.amount_unread, unread, "{products}");
            assert_eq!(m.event.purchase_amount(), None, "{products}");
            assert_eq!(
                m.warning.is_some_and(
                    |w| w.starts_with("`properties.products` gives no amount Sluice reads")
                ),
                unread,
                "{products}"
            );
        }
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "products": [{ "price": "$2.50", "quantity": "2" }] },
        }))
        .unwrap();
        assert_eq!(m.event.purchase_amount(), Some(5.0));
        assert!(!m.amount_unread && m.warning.is_none());
        // Prices are read in the order's currency: a yen has no decimals.
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Order Completed",
            "properties": { "currency": "JPY", "products": [{ "price": "1.000", "quantity": "2" }] },
        }))
        .unwrap();
        assert_eq!(m.event.purchase_amount(), Some(2000.0));
    }

    #[test]
    fn identify_errors_name_traits() {
        let err = parse(json!({
            "type": "identify", "userId": "u1", "traits": {"n": u64::MAX},
        }))
        .unwrap_err();
        assert_eq!(err.field, "traits.n");
        // Traits taken from the context are named where they were sent.
        let err = parse(json!({
            "type": "identify", "userId": "u1", "context": {"traits": {"n": u64::MAX}},
        }))
        .unwrap_err();
        assert_eq!(err.field, "context.traits.n");
        // Names MongoDB would misread are escaped, as in the context, not refused.
        for m in [
            json!({ "type": "identify", "userId": "u1", "traits": {"$email": "a@b.io"} }),
            json!({ "type": "identify", "userId": "u1", "context": {"traits": {"$email": "a@b.io"}} }),
        ] {
            let traits = parse(m).unwrap().traits.unwrap();
            assert_eq!(traits.get_str("\u{FF04}email").unwrap(), "a@b.io");
        }
    }

    #[test]
    fn property_names_mongodb_cannot_hold_are_escaped_and_said() {
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Clicked",
            "properties": {"button.color": "red", "$price": 3, "ok": {"a.b": [{"$k": 1}]}, "": 2, "z.z": 0},
        }))
        .unwrap();
        let p = &m.event.properties;
        assert_eq!(p.get_str("button\u{FF0E}color").unwrap(), "red");
        assert_eq!(p.get_i32("\u{FF04}price").unwrap(), 3);
        assert_eq!(p.get_i32("_").unwrap(), 2);
        let inner = p
            .get_document("ok")
            .unwrap()
            .get_array("a\u{FF0E}b")
            .unwrap();
        assert_eq!(
            inner[0]
                .as_document()
                .unwrap()
                .get_i32("\u{FF04}k")
                .unwrap(),
            1
        );
        let warning = m.warning.unwrap();
        for path in [
            "`properties.button.color`",
            "`properties.$price`",
            "`properties.ok.a.b`",
        ] {
            assert!(warning.contains(path), "{path}: {warning}");
        }
        // Five are named, the others counted.
        assert!(
            warning.contains("and 1 more stored with look-alike"),
            "{warning}"
        );
        // Names that escape alike keep both values.
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Clicked",
            "properties": {"a.b": 1, "a\u{FF0E}b": 2},
        }))
        .unwrap();
        let p = &m.event.properties;
        let mut kept: Vec<i32> = ["a\u{FF0E}b", "a\u{FF0E}b_"]
            .iter()
            .map(|k| p.get_i32(k).unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, [1, 2], "{p:?}");
        // Both are said: one was escaped, the other renamed.
        let warning = m.warning.unwrap();
        assert!(
            warning.contains("`properties.a.b`, `properties.a\u{FF0E}b`"),
            "{warning}"
        );
        // Names that need none are not said.
        let quiet = parse(json!({
            "type": "track", "userId": "u1", "event": "Clicked", "properties": {"a_b": 1},
        }))
        .unwrap();
        assert_eq!(quiet.warning, None);
    }

    #[test]
    fn context_names_mongodb_cannot_hold_are_escaped_not_refused() {
        let m = parse(json!({
            "type": "track", "userId": "u1", "event": "Viewed",
            "context": {
                "traits": {"$email": "a@b.io", "plan.tier": "pro", "ok": 1},
                "app": {"": "x", "nested": [{"$k": "v"}]},
            },
        }))
        .unwrap();
        let context = &m.event.metadata.context;
        let traits = context.get_document("traits").unwrap();
        assert_eq!(traits.get_str("\u{FF04}email").unwrap(), "a@b.io");
        assert_eq!(traits.get_str("plan\u{FF0E}tier").unwrap(), "pro");
        assert!(traits.contains_key("ok"));
        let app = context.get_document("app").unwrap();
        assert_eq!(app.get_str("_").unwrap(), "x");
        let nested = app.get_array("nested").unwrap()[0].as_document().unwrap();
        assert_eq!(nested.get_str("\u{FF04}k").unwrap(), "v");
    }

    #[test]
    fn urls_longer_than_page_url_takes_are_cut_and_kept_whole_where_sent() {
        let long = format!("https://shop.example/?{}", "é".repeat(3_000));
        let m = parse(json!({
            "type": "page", "userId": "u1",
            "properties": {"url": long.clone()},
            "context": {"page": {"referrer": long.clone()}},
        }))
        .unwrap();
        let url = m.event.page_url.unwrap();
        assert!(url.len() <= crate::tracking::MAX_URL_LEN && long.starts_with(&url));
        assert!(url.len() > crate::tracking::MAX_URL_LEN - 2);
        assert!(long.starts_with(&m.event.referrer.unwrap()));
        assert_eq!(m.event.properties.get_str("url").unwrap(), long);
        assert_eq!(
            m.event
                .metadata
                .context
                .get_document("page")
                .unwrap()
                .get_str("referrer")
                .unwrap(),
            long
        );
    }

    #[test]
    fn an_identify_with_its_own_traits_keeps_the_context_traits_in_the_context() {
        let m = parse(json!({
            "type": "identify", "userId": "u1", "traits": {"plan": "pro"},
            "context": {"traits": {"email": "ada@example.com"}, "locale": "fr"},
        }))
        .unwrap();
        assert_eq!(m.traits.unwrap(), bson::doc! { "plan": "pro" });
        let context = &m.event.metadata.context;
        assert_eq!(context.get_str("locale").unwrap(), "fr");
        assert_eq!(
            context.get_document("traits").unwrap(),
            &bson::doc! { "email": "ada@example.com" }
        );
        // Without its own, the identify takes them, and they leave the context.
        let m = parse(json!({
            "type": "identify", "userId": "u1",
            "context": {"traits": {"email": "ada@example.com"}, "locale": "fr"},
        }))
        .unwrap();
        assert_eq!(
            m.traits.unwrap().get_str("email").unwrap(),
            "ada@example.com"
        );
        assert!(!m.event.metadata.context.contains_key("traits"));
    }

    #[test]
    fn profile_traits_that_are_not_strings_stay_with_the_event_only() {
        for (name, sent_in) in [
            ("email", "traits"),
            ("firstName", "traits"),
            ("last_name", "context.traits"),
        ] {
            let traits = json!({ name: ["x"], "plan": "pro" });
            let m = parse(match sent_in {
                "traits" => json!({ "type": "identify", "userId": "u1", "traits": traits }),
                _ => json!({ "type": "identify", "userId": "u1", "context": {"traits": traits} }),
            })
            .unwrap();
            let to_profile = m.traits.unwrap();
            assert_eq!(traits_not_copied(&to_profile), vec![name]);
            assert_eq!(to_profile.get_str("plan").unwrap(), "pro");
            assert!(
                m.event.properties.get_array(name).is_ok(),
                "{:?}",
                m.event.properties
            );
            let warning = m.warning.unwrap();
            assert!(
                warning.starts_with(&format!("`{sent_in}.{name}` not a string")),
                "{warning}"
            );
        }
        // A null is a value the profile takes (it clears the field).
        let m = parse(json!({
            "type": "identify", "userId": "u1", "traits": {"email": null, "plan": 3},
        }))
        .unwrap();
        assert_eq!(m.traits.unwrap().get("email"), Some(&bson::Bson::Null));
        assert_eq!(m.warning, None);
    }

    #[test]
    fn identify_links_ids_and_carries_traits() {
        let m = parse(json!({
            "type": "identify", "userId": "u1", "anonymousId": "a1",
            "traits": {"email": "ada@example.com", "plan": "pro"},
            "context": {"sessionId": 1718000000, "os": {"name": "iOS", "version": "17.1"},
                         "device": {"type": "ios"}, "location": {"country": "FR", "city": "Lyon"}},
        }))
        .unwrap();
        assert_eq!(m.event.event_type, EventType::Identify);
        assert_eq!(m.event.user_id, "u1");
        assert_eq!(m.event.session_id, "1718000000");
        assert_eq!(m.link, Some(("a1".into(), "u1".into())));
        assert_eq!(
            m.traits.unwrap().get_str("email").unwrap(),
            "ada@example.com"
        );
        let meta = &m.event.metadata;
        // In the user agent's vocabulary; the context keeps them as sent.
        assert_eq!(meta.os.as_deref(), Some("iOS"));
        assert_eq!(meta.device.as_deref(), Some("mobile"));
        assert_eq!(
            meta.context.get_document("os").unwrap().get_str("version"),
            Ok("17.1")
        );
        assert_eq!(meta.country.as_deref(), Some("FR"));
        assert_eq!(meta.city.as_deref(), Some("Lyon"));
        assert_eq!(meta.anonymous_id.as_deref(), Some("a1"));
    }

    #[test]
    fn alias_links_the_previous_id() {
        let m = parse(json!({"type": "alias", "previousId": "old", "userId": "new"})).unwrap();
        assert_eq!(m.link, Some(("old".into(), "new".into())));
        assert_eq!(m.event.event_type, EventType::Alias);
        assert!(!m.event.properties.contains_key(EVENT_NAME));
    }

    #[test]
    fn a_call_s_type_tells_it_from_a_track_of_the_same_name() {
        let group = parse(json!({"type": "group", "userId": "u", "groupId": "g1",
            "traits": {"plan": "pro"}}))
        .unwrap();
        assert_eq!(group.event.event_type, EventType::Group);
        assert_eq!(group.event.properties.get_str("groupId").unwrap(), "g1");
        for name in ["Group", "GROUP", "ALIAS", "IDENTIFY"] {
            let track = parse(json!({"type": "track", "userId": "u", "event": name})).unwrap();
            assert_eq!(track.event.event_type, EventType::Custom, "{name}");
            assert_eq!(track.event.properties.get_str(EVENT_NAME).unwrap(), name);
        }
        // A native type name other than those three still types a track.
        let click = parse(json!({"type": "track", "userId": "u", "event": "CLICK"})).unwrap();
        assert_eq!(click.event.event_type, EventType::Click);
    }

    #[test]
    fn a_track_s_own_event_name_property_is_kept_beside_the_name() {
        let m = parse(
            json!({"type": "track", "userId": "u", "event": "Video Played",
            "properties": {"eventName": "play", "position": 3}}),
        )
        .unwrap();
        let p = &m.event.properties;
        assert_eq!(p.get_str(EVENT_NAME).unwrap(), "Video Played");
        assert_eq!(p.get_str(CLIENT_EVENT_NAME).unwrap(), "play");
        let both = parse(json!({"type": "track", "userId": "u", "event": "Played",
            "properties": {"eventName": "play", "clientEventName": "mine"}}))
        .unwrap();
        let p = &both.event.properties;
        assert_eq!(p.get_str(CLIENT_EVENT_NAME).unwrap(), "mine");
        assert_eq!(p.get_str("clientEventName2").unwrap(), "play");
        let same = parse(json!({"type": "track", "userId": "u", "event": "Played",
            "properties": {"eventName": "Played"}}))
        .unwrap();
        assert!(!same.event.properties.contains_key(CLIENT_EVENT_NAME));
    }

    #[test]
    fn bad_messages_name_the_field() {
        let cases = [
            (json!({"type": "track", "event": "X"}), "userId"),
            (json!({"type": "track", "userId": "u"}), "event"),
            (json!({"type": "teleport", "userId": "u"}), "type"),
            (json!({"userId": "u"}), "type"),
            (json!({"type": "alias", "userId": "u"}), "previousId"),
            (json!({"type": "group", "userId": "u"}), "groupId"),
            (
                json!({"type": "page", "userId": "u", "timestamp": "soon"}),
                "timestamp",
            ),
            (
                json!({"type": "page", "userId": "u", "messageId": [7]}),
                "messageId",
            ),
            (
                json!({"type": "track", "userId": "u", "event": "X", "properties": {"n": {"m": u64::MAX}}}),
                "properties.n.m",
            ),
            // Native fields filled from Segment ones are named as the client sent them.
            (
                json!({"type": "page", "userId": "u", "originalTimestamp": "soon"}),
                "originalTimestamp",
            ),
            (
                json!({"type": "identify", "userId": "u", "context": {"traits": {"n": u64::MAX}}}),
                "context.traits.n",
            ),
            (
                json!({"type": "page", "userId": "u", "context": {"sessionId": true}}),
                "context.sessionId",
            ),
            (
                json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"n": u64::MAX}}),
                "traits.n",
            ),
        ];
        for (input, field) in cases {
            let err = parse(input.clone()).unwrap_err();
            assert_eq!(err.field, field, "{input} -> {err}");
        }
    }
}
