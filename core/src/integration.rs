//! Integration configs: the file format data engineers write (one TOML file per config),
//! its one-step validation into a [`Connector`], and the JSONPath field mapping.
//!
//! The file carries the design document's fields (`name`, `type`, `endpoint`, `method`,
//! `headers`, `auth`, `mapping`, `schedule`, `is_active`) plus what a real connector needs:
//! the record selector, pagination, incremental cursor, rate limit, retry policy, target
//! collection and upsert key, and a transform chain.

use std::collections::BTreeMap;

use bson::{Bson, Document};
use jsonpath_rust::JsonPath;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Secret;
use crate::error::ConfigError;
use crate::model::{AuthType, HttpMethod, IntegrationType};

/// The file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrationFile {
    /// Unique name; `sluice import run NAME`.
    pub name: String,
    /// `IMPORT` (pull into MongoDB) or `EXPORT` (push MongoDB data out).
    #[serde(rename = "type")]
    pub kind: String,
    /// The API URL (for IMPORT, the first page).
    pub endpoint: String,
    /// `GET` for an IMPORT, `POST` (default) or `PUT` for an EXPORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Cron expression with seconds (`0 */15 * * * *`); none = manual runs only.
    #[serde(default)]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in (`America/New_York`); default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default = "yes")]
    pub is_active: bool,
    /// Endpoints on loopback, link-local or private addresses are refused unless allowed.
    #[serde(default)]
    pub allow_private_network: bool,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub source: SourceSection,
    #[serde(default)]
    pub target: TargetSection,
    /// Target field -> how to fill it.
    #[serde(default)]
    pub mapping: BTreeMap<String, FieldMapping>,
    #[serde(default)]
    pub incremental: Option<IncrementalSection>,
    /// EXPORT only: what to read and how to send it.
    #[serde(default)]
    pub push: Option<PushSection>,
    /// Transform plugins applied to mapped records, in order.
    #[serde(default)]
    pub transforms: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `NONE`, `API_KEY`, `BASIC` or `OAUTH`.
    #[serde(rename = "type", default = "auth_none")]
    pub kind: String,
    /// API_KEY: the key; sent in `header` (default `X-API-Key`) or as query `query`.
    #[serde(default)]
    pub key: Option<Secret>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    /// BASIC.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// OAUTH (client credentials; refresh-token grant when `refresh_token` is set).
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    /// OAUTH: how the client authenticates to the token endpoint,
    /// `client_secret_basic` (default) or `client_secret_post`.
    // Not written when unset: a config stored before this setting existed keeps its
    // fingerprint (an interrupted run still resumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
}

fn auth_none() -> String {
    "NONE".into()
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            kind: auth_none(),
            key: None,
            header: None,
            query: None,
            username: None,
            password: None,
            token_url: None,
            client_id: None,
            client_secret: None,
            scopes: Vec::new(),
            refresh_token: None,
            client_auth: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSection {
    /// JSONPath selecting the records of a page (`$[*]` for a bare array).
    pub records: String,
    pub timeout_seconds: u64,
    /// The largest answer read, in MiB: one page, held as text and then parsed.
    pub max_page_mb: u64,
    /// Requests per second to this API (0 = unlimited).
    pub rate_limit_per_second: f64,
    pub pagination: Pagination,
    pub retry: RetryPolicy,
}

impl Default for SourceSection {
    fn default() -> Self {
        Self {
            records: "$[*]".into(),
            timeout_seconds: 30,
            max_page_mb: 16,
            rate_limit_per_second: 0.0,
            pagination: Pagination::default(),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pagination {
    /// `none`, `page`, `offset`, `cursor`, `next_url` or `link_header`.
    #[serde(rename = "type")]
    pub kind: String,
    /// page: the page-number parameter and the first page.
    pub page_param: String,
    pub start_page: u64,
    /// page / offset: the page-size parameter and the size.
    pub size_param: String,
    pub size: u64,
    /// offset: the offset parameter.
    pub offset_param: String,
    /// cursor: JSONPath of the next cursor in the body, and the parameter to send it in.
    pub cursor_path: String,
    pub cursor_param: String,
    /// next_url: JSONPath of the next page's URL in the body (Django REST's `$.next`,
    /// HAL's `$._links.next.href`, OData's `$['@odata.nextLink']`).
    #[serde(skip_serializing_if = "is_default_next_path")]
    pub next_path: String,
    /// Optional stop signals: a boolean "has more" flag, or a total count (body or header).
    pub has_more_path: Option<String>,
    pub total_path: Option<String>,
    pub total_header: Option<String>,
    /// Loop guard.
    pub max_pages: u64,
}

/// A pagination field set that its `type` does not use (`size` with `cursor`, any with
/// the default `none`), as (field, what was expected): it would be ignored without a
/// word, and a run would fetch other pages than the author meant (or one page only).
/// Checked of files and API bodies (`configs validate`, `configs apply`, the admin API),
/// not by [`validate`], which also loads stored configs for their runs: a config stored
/// before this check keeps running until it is applied again.
pub fn unused_paging_fields(p: &Pagination) -> Result<(), (String, String)> {
    let d = Pagination::default();
    let set = [
        ("page_param", p.page_param != d.page_param),
        ("start_page", p.start_page != d.start_page),
        ("size_param", p.size_param != d.size_param),
        ("size", p.size != d.size),
        ("offset_param", p.offset_param != d.offset_param),
        ("cursor_path", p.cursor_path != d.cursor_path),
        ("cursor_param", p.cursor_param != d.cursor_param),
        ("next_path", p.next_path != d.next_path),
        ("has_more_path", p.has_more_path.is_some()),
        ("total_path", p.total_path.is_some()),
        ("total_header", p.total_header.is_some()),
        ("max_pages", p.max_pages != d.max_pages),
    ];
    // Every type stops on `has_more_path` and `max_pages`; on a total, only the paging
    // that counts records.
    const STOP: [&str; 2] = ["has_more_path", "max_pages"];
    const TOTAL: [&str; 2] = ["total_path", "total_header"];
    let takes: Vec<&str> = match p.kind.as_str() {
        "page" => ["page_param", "start_page", "size_param", "size"]
            .into_iter()
            .chain(TOTAL)
            .collect(),
        "offset" => ["offset_param", "size_param", "size"]
            .into_iter()
            .chain(TOTAL)
            .collect(),
        "cursor" => ["cursor_path", "cursor_param"].into(),
        "next_url" => ["next_path"].into(),
        "link_header" => Vec::new(),
        // `none`, or a type refused on its own.
        _ => Vec::new(),
    };
    if !matches!(
        p.kind.as_str(),
        "none" | "page" | "offset" | "cursor" | "next_url" | "link_header"
    ) {
        return Ok(());
    }
    let Some((field, _)) = set
        .iter()
        .find(|(f, on)| *on && !(takes.contains(f) || (p.kind != "none" && STOP.contains(f))))
    else {
        return Ok(());
    };
    let expected = if p.kind == "none" {
        format!(
            "a pagination `type` with `{field}` (without one, `none`, a run fetches one page and `{field}` is not used): one of page, offset, cursor, next_url, link_header"
        )
    } else {
        let takes = takes
            .iter()
            .chain(&STOP)
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = if matches!(*field, "size" | "size_param") {
            " (to send a page size with it, put it in the endpoint's query: `?limit=100`)"
        } else {
            ""
        };
        format!(
            "no `{field}` with `type = \"{}\"`, which does not use it (it takes {takes}){hint}",
            p.kind
        )
    };
    Err((format!("source.pagination.{field}"), expected))
}

/// `next_path` at its default is not written: a config stored before it existed keeps its
/// fingerprint (an interrupted run still resumes).
fn is_default_next_path(path: &str) -> bool {
    path == Pagination::default().next_path
}

impl Default for Pagination {
    fn default() -> Self {
        Self {
            kind: "none".into(),
            page_param: "page".into(),
            start_page: 1,
            size_param: "limit".into(),
            size: 100,
            offset_param: "offset".into(),
            cursor_path: "$.next".into(),
            cursor_param: "cursor".into(),
            next_path: "$.next".into(),
            has_more_path: None,
            total_path: None,
            total_header: None,
            max_pages: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetSection {
    /// IMPORT: the collection upserted into.
    pub collection: String,
    /// IMPORT: the target field records are upserted by.
    pub key: String,
    /// Records per bulk upsert.
    pub batch_size: usize,
}

impl Default for TargetSection {
    fn default() -> Self {
        Self {
            collection: "products".into(),
            key: "productId".into(),
            batch_size: 500,
        }
    }
}

/// How one target field is filled from a source record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// JSONPath into the source record (`$.price.amount`).
    pub path: String,
    /// `string`, `number`, `integer`, `bool`, `date` or `any` (default).
    #[serde(rename = "type", default = "any")]
    pub kind: String,
    #[serde(default)]
    pub required: bool,
    /// Used when the path finds nothing (or null).
    #[serde(default)]
    pub default: Option<toml::Value>,
    /// Keep every value the path finds, as a list (each coerced to `type`), instead of
    /// the first.
    #[serde(default)]
    pub list: bool,
    /// `type = "date"`: what a number (or a string of digits) counts: `milliseconds`
    /// (the default) or `seconds` since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `type = "date"`: a `strftime` format for dates sent as text in another form than
    /// RFC 3339 (`"%Y-%m-%d %H:%M:%S"`, read as UTC unless it has `%z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// IMPORT: what an update does to the stored value when the path finds nothing, `null`
    /// or an empty list: `keep` it (the default) or `unset` it, so a value cleared at the
    /// source is cleared in MongoDB too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_missing: Option<String>,
}

fn any() -> String {
    "any".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSection {
    /// Target field whose largest value becomes the next run's cursor.
    pub cursor_field: String,
    /// Query parameter the cursor is sent in.
    pub param: String,
    /// The API returns records in ascending `cursor_field` order, so a run cut short by a
    /// loop guard (`max_pages`, a repeated page) may still advance the cursor to the
    /// largest value it stored: everything below it was read. Without it such a run keeps
    /// the cursor, so records it did not reach are not skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sorted: bool,
    /// Keep the cursor when records failed mapping, were refused by MongoDB or were failed
    /// by a transform plugin (dead-lettered or skipped), so the next run reads the window
    /// again and stores them once the mapping (the plugin, the source) is fixed. Off by
    /// default: a record that never maps would hold the cursor forever. Either way the
    /// records that failed are kept in `dead_letters` (but those skipped under
    /// `skip-batch`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_on_failures: bool,
    /// A date cursor is sent this many seconds early, so records the API stamped with the
    /// cursor's own second (or committed late) are read again: needed when the parameter
    /// is exclusive (`updated_after`) or the API's timestamps are coarse. Records read
    /// again are upserted by key, so they are not stored twice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lookback_seconds: u64,
}

/// A year: a larger lookback is a full reread, and `import reset --cursor` says so.
const MAX_LOOKBACK_SECONDS: u64 = 366 * 86_400;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSection {
    /// Collection read. Required of an EXPORT, checked with the rest (not by TOML's
    /// reading, which would ask an IMPORT holding `[push]` by mistake to fill it in).
    #[serde(default)]
    pub collection: String,
    /// A MongoDB filter as JSON (`{"totalPurchases": {"$gt": 0}}`).
    #[serde(default)]
    pub filter: Option<String>,
    /// Field whose value above the last sync selects new documents (`updatedAt`).
    #[serde(default)]
    pub watermark_field: Option<String>,
    /// Records per request.
    #[serde(default = "push_batch")]
    pub batch_size: usize,
    /// A batch is also cut once the documents read for it reach this many MiB (as BSON,
    /// about): documents may be up to 16 MiB each, and a batch is held in a few copies.
    #[serde(default = "push_batch_mb")]
    pub max_batch_mb: u64,
    /// The JSON body: `{"<wrap>": [records]}`, or a bare array when empty.
    #[serde(default)]
    pub wrap: String,
    /// Documents whose watermark is a date are sent once it is this many seconds old, so
    /// a write stamped just before another but committed after it is not passed over.
    #[serde(default = "push_settle")]
    pub settle_seconds: u64,
}

fn push_batch() -> usize {
    100
}

fn push_batch_mb() -> u64 {
    8
}

/// The most documents a push sends per request.
pub const MAX_PUSH_BATCH: usize = 10_000;

fn push_settle() -> u64 {
    60
}

/// Target value types of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Any,
    String,
    Number,
    Integer,
    Bool,
    Date,
}

/// A validated field mapping.
#[derive(Debug, Clone)]
pub struct Field {
    pub target: String,
    pub path: String,
    /// `path`, parsed once at validation instead of once per record.
    pub query: jsonpath_rust::parser::model::JpQuery,
    /// For a plain member chain (`$.a.b.c`, the common case) its keys, looked up directly
    /// instead of through the JSONPath engine (same result, several times faster).
    pub members: Option<Vec<String>>,
    pub kind: FieldType,
    pub required: bool,
    pub default: Option<Value>,
    /// Every match, as a list (`list = true`).
    pub list: bool,
    /// What a `date` read from a number counts (`unit`).
    pub epoch_unit: EpochUnit,
    /// `unit` was given: a `date` may also come as a string of digits, and a small number
    /// is not suspected of being seconds.
    pub unit_given: bool,
    /// An update removes the stored value when the record has none (`on_missing = "unset"`).
    pub unset_missing: bool,
    /// A `date` sent as text in this `strftime` format (else RFC 3339 or `YYYY-MM-DD`).
    pub date_format: Option<String>,
}

/// Pagination, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Paging {
    None,
    Page {
        param: String,
        start: u64,
        size_param: String,
        size: u64,
    },
    Offset {
        param: String,
        size_param: String,
        size: u64,
    },
    Cursor {
        path: String,
        param: String,
    },
    /// The next page's URL, found in the body.
    NextUrl {
        path: String,
    },
    LinkHeader,
}

/// Auth, validated, secrets resolved.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    ApiKey {
        key: Secret,
        header: Option<String>,
        query: Option<String>,
    },
    Basic {
        username: String,
        password: Secret,
    },
    OAuth {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scopes: Vec<String>,
        refresh_token: Option<Secret>,
        /// The client's credentials go in the form body (`client_secret_post`) instead
        /// of HTTP Basic (`client_secret_basic`).
        secret_in_body: bool,
    },
}

impl Auth {
    pub fn auth_type(&self) -> AuthType {
        match self {
            Auth::None => AuthType::None,
            Auth::ApiKey { .. } => AuthType::ApiKey,
            Auth::Basic { .. } => AuthType::Basic,
            Auth::OAuth { .. } => AuthType::OAuth,
        }
    }
}

/// A validated integration config, ready to run.
#[derive(Debug, Clone)]
pub struct Connector {
    pub name: String,
    pub kind: IntegrationType,
    pub endpoint: url_lite::Url,
    pub method: HttpMethod,
    pub headers: Vec<(String, String)>,
    /// The values of headers given as `${env:NAME}` references: secrets by where they
    /// came from, whatever the header's name (kept out of error texts).
    pub env_header_values: Vec<String>,
    pub schedule: Option<String>,
    pub is_active: bool,
    pub allow_private_network: bool,
    pub auth: Auth,
    pub records: String,
    pub timeout: std::time::Duration,
    /// `source.max_page_mb` in bytes.
    pub max_response_bytes: usize,
    pub rate_limit_per_second: f64,
    pub paging: Paging,
    pub has_more_path: Option<String>,
    pub total_path: Option<String>,
    pub total_header: Option<String>,
    pub max_pages: u64,
    pub retry: RetryPolicy,
    pub collection: String,
    pub key: String,
    pub batch_size: usize,
    pub fields: Vec<Field>,
    pub incremental: Option<IncrementalSection>,
    pub push: Option<PushSection>,
    pub transforms: Vec<String>,
}

impl Connector {
    /// The mapping of the incremental cursor's field, if the config is incremental.
    pub fn cursor_mapping(&self) -> Option<&Field> {
        let inc = self.incremental.as_ref()?;
        self.fields.iter().find(|f| f.target == inc.cursor_field)
    }
}

/// What an integration config's or an export schedule's name may be: it is a job name
/// (`integration:NAME`, `export:NAME`) in commands, run ids and metrics.
pub const JOB_NAME_RULE: &str = "1-100 characters of a-z A-Z 0-9 - _ .";

/// Whether `name` follows [`JOB_NAME_RULE`].
pub fn is_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A tiny URL check (scheme, host) without pulling a URL crate into `core`.
pub mod url_lite {
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Url {
        pub text: String,
        pub https: bool,
        pub host: String,
        pub port: u16,
    }

    pub fn parse(text: &str) -> Result<Url, String> {
        let (https, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("an http:// or https:// URL, got `{text}`"));
        };
        // HTTP clients end the host at a backslash too, and read what precedes an `@` as
        // credentials: either would let the host checked here differ from the one
        // connected to (`http://10.0.0.1\@api.example/`).
        if text.contains('\\') {
            return Err(format!("a URL without `\\`, got `{text}`"));
        }
        // HTTP clients drop tabs and line breaks anywhere in a URL.
        if text.chars().any(|c| c.is_ascii_control()) {
            return Err(format!(
                "a URL without control characters (tabs, line breaks), got `{}`",
                text.escape_debug()
            ));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(format!(
                "a URL without credentials before its host (use `[auth]`), got `{text}`"
            ));
        }
        let hostport = authority;
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("a valid IPv6 host")?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("a URL with a host, got `{text}`"));
        }
        // The host exactly as an HTTP client reads it, so the one checked is the one
        // connected to: clients decode `%`-escapes in a host and map other scripts (and
        // full-width letters) to ASCII, so `%31%32%37.0.0.1` or `ｌocalhost` would be
        // checked as a name and reached as 127.0.0.1. Names are ASCII (an
        // internationalized one in its `xn--` form) and compared in lower case.
        let plain = if hostport.starts_with('[') {
            host.chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        } else {
            host.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        };
        if !plain {
            return Err(format!(
                "a host of ASCII letters, digits, `-` and `.` (an internationalized name in its `xn--` form; no `%`-escapes), got `{host}`"
            ));
        }
        let host = host.to_ascii_lowercase();
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("a valid port in `{text}`"))?,
            None if https => 443,
            None => 80,
        };
        Ok(Url {
            text: text.to_string(),
            https,
            host,
            port,
        })
    }
}

/// `source.retry.max_attempts`, at most.
const MAX_ATTEMPTS: u32 = 20;
/// `source.retry.max_backoff_ms`, at most.
const MAX_BACKOFF_MS: u64 = 300_000;

/// Parses a file's text (`origin` names it in errors).
pub fn parse_file(origin: &str, text: &str) -> Result<IntegrationFile, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut message = e.to_string().trim_end().to_string();
        if let Some(hint) = top_level_field_in_a_table(&message) {
            message.push_str(&hint);
        }
        ConfigError::Parse {
            origin: origin.to_string(),
            message,
        }
    })
}

/// How `toml_errors` searches a config file: the hint for a top-level field written
/// under a section, and the checks across tables (a `[target]` names the mappings it
/// needs: `productId` for `products`, its key; a mapping provides the key and the
/// incremental cursor).
pub const FILE_RULES: crate::toml_errors::Rules = crate::toml_errors::Rules {
    hint: top_level_field_in_a_table,
    related: |taken, field| {
        let under =
            |path: &str, table: &str| path == table || path.starts_with(&format!("{table}."));
        (under(taken, "target") && under(field, "mapping"))
            || (under(taken, "mapping") && (field == "target.key" || under(field, "incremental")))
    },
    // Required fields a wrong value of still leaves the rest of the file to check.
    placeholder: |path| {
        let value = match path {
            "name" => "set-aside",
            "endpoint" => "https://api.example.com/set-aside",
            "push.collection" | "target.collection" => "set_aside",
            _ if path.starts_with("mapping.") && path.ends_with(".path") => "$.set_aside",
            _ => return None,
        };
        Some(toml::Value::String(value.into()))
    },
};

/// The fields of a config file's top level, outside any `[section]`.
const TOP_LEVEL_FIELDS: [&str; 10] = [
    "name",
    "type",
    "endpoint",
    "method",
    "headers",
    "schedule",
    "timezone",
    "is_active",
    "allow_private_network",
    "transforms",
];

/// A top-level field written after a `[section]` header belongs to that section in TOML,
/// which then calls it unknown: the hint for that classic slip.
fn top_level_field_in_a_table(message: &str) -> Option<String> {
    let field = message.split("unknown field `").nth(1)?.split('`').next()?;
    let in_a_table = !message.contains("expected one of `name`");
    (in_a_table && TOP_LEVEL_FIELDS.contains(&field)).then(|| {
        format!(
            "\n(`{field}` is a top-level field: write it above the first `[section]`; below a section header, TOML puts it in that section)"
        )
    })
}

fn check_jsonpath(path: &str) -> Result<(), String> {
    let probe = serde_json::json!({});
    probe
        .query(path)
        .map(|_| ())
        .map_err(|e| format!("a valid JSONPath, got `{path}` ({e})"))
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Whether a request header carries a credential by its name.
pub fn credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || [
        "token", "secret", "password", "api-key", "apikey", "api_key",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// The name of a query parameter of `url` that carries a credential (`?api_key=...`),
/// if any: such a URL would store the secret in clear and show it to every reader of the
/// config. Cursor parameters (`page_token`, `next_token`) are not credentials.
pub fn credential_in_query(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let name = pair.split('=').next().unwrap_or(pair);
        let n: String = name
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let exact = [
            "key",
            "token",
            "auth",
            "sig",
            "signature",
            "pwd",
            "passwd",
            "bearer",
            "accesskey",
            "secretkey",
            "privatekey",
            "appkey",
            "sessiontoken",
            "apisig",
        ];
        let within = [
            "secret",
            "password",
            "apikey",
            "accesstoken",
            "authtoken",
            "apitoken",
        ];
        (exact.contains(&n.as_str()) || within.iter().any(|w| n.contains(w)))
            .then(|| name.to_string())
    })
}

/// The one validation step. Secrets are resolved through `env`.
pub fn validate(
    origin: &str,
    file: &IntegrationFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Connector, ConfigError> {
    let invalid = |field: &str, expected: String| ConfigError::Invalid {
        origin: origin.to_string(),
        field: field.to_string(),
        expected,
    };
    if !is_job_name(&file.name) {
        return Err(invalid(
            "name",
            format!("{JOB_NAME_RULE}, got `{}`", file.name),
        ));
    }
    let kind = IntegrationType::parse(&file.kind).map_err(|e| invalid("type", e))?;
    let endpoint = url_lite::parse(&file.endpoint).map_err(|e| invalid("endpoint", e))?;
    let method = match &file.method {
        Some(m) => HttpMethod::parse(&m.to_ascii_uppercase()).map_err(|e| invalid("method", e))?,
        None if kind == IntegrationType::Export => HttpMethod::Post,
        None => HttpMethod::Get,
    };
    match (kind, method) {
        (IntegrationType::Import, HttpMethod::Post | HttpMethod::Put) => {
            return Err(invalid(
                "method",
                "`GET` for an IMPORT (its pages are fetched with GET; APIs read with a request body are not supported)".into(),
            ))
        }
        (IntegrationType::Export, HttpMethod::Get) => {
            return Err(invalid(
                "method",
                "`POST` (the default) or `PUT` for an EXPORT: it sends its records as a request body, which a GET does not carry (configs stored before the default became POST say `GET`: apply them again)".into(),
            ))
        }
        _ => {}
    }
    if let Some(cron) = &file.schedule {
        crate::cron::parse(cron).map_err(|e| invalid("schedule", e))?;
    }
    if let Some(tz) = &file.timezone {
        tz.parse::<chrono_tz::Tz>().map_err(|_| {
            invalid(
                "timezone",
                format!("an IANA time zone such as `Europe/Paris`, got `{tz}`"),
            )
        })?;
    }
    // A `${env:NAME}` reference resolved through `env`; a literal stays as it is.
    let resolve = |field: &str, s: &Secret| -> Result<Secret, ConfigError> {
        match s.env_reference() {
            // Empty is most likely a secret store that did not fill it: sent, it would
            // fail every request as a bad credential.
            Some(name) => match env(name) {
                Some(value) if !value.is_empty() => Ok(Secret::new(value)),
                Some(_) => Err(invalid(
                    field,
                    format!("environment variable `{name}` to be set (it is empty)"),
                )),
                None => Err(invalid(
                    field,
                    format!("environment variable `{name}` to be set (it is not)"),
                )),
            },
            None => Ok(s.clone()),
        }
    };
    let secret = |field: &str, s: &Option<Secret>| -> Result<Secret, ConfigError> {
        let s = s
            .as_ref()
            .ok_or_else(|| invalid(field, "a value (a secret: use `${env:NAME}`)".into()))?;
        resolve(field, s)
    };
    let a = &file.auth;
    let auth = match AuthType::parse(&a.kind).map_err(|e| invalid("auth.type", e))? {
        AuthType::None => Auth::None,
        AuthType::ApiKey => {
            if a.header.is_some() && a.query.is_some() {
                return Err(invalid(
                    "auth.query",
                    "either `auth.header` or `auth.query`, not both".into(),
                ));
            }
            let key = secret("auth.key", &a.key)?;
            if a.query.is_none() {
                let name = a.header.as_deref().unwrap_or("X-API-Key");
                header_ok("auth.header", name, key.expose()).map_err(|e| invalid("auth", e))?;
            }
            Auth::ApiKey {
                key,
                header: a.header.clone(),
                query: a.query.clone(),
            }
        }
        AuthType::Basic => Auth::Basic {
            username: a
                .username
                .clone()
                .ok_or_else(|| invalid("auth.username", "a user name".into()))?,
            password: secret("auth.password", &a.password)?,
        },
        AuthType::OAuth => {
            let token_url = a
                .token_url
                .clone()
                .ok_or_else(|| invalid("auth.token_url", "the token endpoint URL".into()))?;
            url_lite::parse(&token_url).map_err(|e| invalid("auth.token_url", e))?;
            Auth::OAuth {
                token_url,
                client_id: a
                    .client_id
                    .clone()
                    .ok_or_else(|| invalid("auth.client_id", "a client id".into()))?,
                client_secret: secret("auth.client_secret", &a.client_secret)?,
                scopes: a.scopes.clone(),
                refresh_token: match &a.refresh_token {
                    Some(_) => Some(secret("auth.refresh_token", &a.refresh_token)?),
                    None => None,
                },
                secret_in_body: match a.client_auth.as_deref() {
                    None | Some("client_secret_basic") => false,
                    Some("client_secret_post") => true,
                    Some(other) => {
                        return Err(invalid(
                            "auth.client_auth",
                            format!(
                                "`client_secret_basic` (HTTP Basic, the default) or `client_secret_post` (in the form body), got `{other}`"
                            ),
                        ))
                    }
                },
            }
        }
    };
    let s = &file.source;
    check_jsonpath(&s.records).map_err(|e| invalid("source.records", e))?;
    let p = &s.pagination;
    let paging = match p.kind.as_str() {
        "none" => Paging::None,
        "page" => Paging::Page {
            param: p.page_param.clone(),
            start: p.start_page,
            size_param: p.size_param.clone(),
            size: p.size,
        },
        "offset" => Paging::Offset {
            param: p.offset_param.clone(),
            size_param: p.size_param.clone(),
            size: p.size,
        },
        "cursor" => {
            check_jsonpath(&p.cursor_path)
                .map_err(|e| invalid("source.pagination.cursor_path", e))?;
            Paging::Cursor {
                path: p.cursor_path.clone(),
                param: p.cursor_param.clone(),
            }
        }
        "next_url" => {
            check_jsonpath(&p.next_path).map_err(|e| invalid("source.pagination.next_path", e))?;
            Paging::NextUrl {
                path: p.next_path.clone(),
            }
        }
        "link_header" => Paging::LinkHeader,
        other => {
            return Err(invalid(
                "source.pagination.type",
                format!("one of none, page, offset, cursor, next_url, link_header, got `{other}`"),
            ))
        }
    };
    for (field, path) in [
        ("source.pagination.has_more_path", &p.has_more_path),
        ("source.pagination.total_path", &p.total_path),
    ] {
        if let Some(path) = path {
            check_jsonpath(path).map_err(|e| invalid(field, e))?;
        }
    }
    for (field, value) in [
        ("source.pagination.max_pages", p.max_pages),
        ("source.pagination.size", p.size),
    ] {
        if value == 0 {
            return Err(invalid(field, "a number greater than 0".into()));
        }
    }
    // Bounded, so a typo cannot hold a run (and its lease) for days, nor retry at once
    // without a pause.
    let r = &s.retry;
    if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
        return Err(invalid(
            "source.retry.max_attempts",
            format!("1 to {MAX_ATTEMPTS}, got {}", r.max_attempts),
        ));
    }
    if !(10..=60_000).contains(&r.initial_backoff_ms) {
        return Err(invalid(
            "source.retry.initial_backoff_ms",
            format!("10 to 60000, got {}", r.initial_backoff_ms),
        ));
    }
    if !(r.initial_backoff_ms..=MAX_BACKOFF_MS).contains(&r.max_backoff_ms) {
        return Err(invalid(
            "source.retry.max_backoff_ms",
            format!(
                "`initial_backoff_ms` ({}) to {MAX_BACKOFF_MS} (5 minutes), got {}",
                r.initial_backoff_ms, r.max_backoff_ms
            ),
        ));
    }
    if !(1..=3600).contains(&s.timeout_seconds) {
        return Err(invalid(
            "source.timeout_seconds",
            format!("1 to 3600 seconds, got {}", s.timeout_seconds),
        ));
    }
    if !(1..=1024).contains(&s.max_page_mb) {
        return Err(invalid(
            "source.max_page_mb",
            format!("1 to 1024, got {}", s.max_page_mb),
        ));
    }
    let mut fields = Vec::new();
    for (target, m) in &file.mapping {
        let field = format!("mapping.{target}");
        if !crate::model::is_plain_field_name(target) {
            return Err(invalid(
                &field,
                "a target field name without `$` or `.`".into(),
            ));
        }
        let query = jsonpath_rust::parser::parse_json_path(&m.path).map_err(|e| {
            invalid(
                &format!("{field}.path"),
                format!("a valid JSONPath, got `{}` ({e})", m.path),
            )
        })?;
        let field_kind = match m.kind.as_str() {
            "any" => FieldType::Any,
            "string" => FieldType::String,
            "number" => FieldType::Number,
            "integer" => FieldType::Integer,
            "bool" => FieldType::Bool,
            "date" => FieldType::Date,
            other => {
                return Err(invalid(
                    &format!("{field}.type"),
                    format!("one of any, string, number, integer, bool, date, got `{other}`"),
                ))
            }
        };
        let epoch_unit = match m.unit.as_deref() {
            None | Some("milliseconds") => EpochUnit::Milliseconds,
            Some("seconds") => EpochUnit::Seconds,
            Some("auto") => EpochUnit::Auto,
            Some(other) => {
                return Err(invalid(
                    &format!("{field}.unit"),
                    format!("`milliseconds`, `seconds` or `auto`, got `{other}`"),
                ))
            }
        };
        if let Some(format) = &m.format {
            if field_kind != FieldType::Date {
                return Err(invalid(
                    &format!("{field}.format"),
                    "no `format` unless `type = \"date\"`".into(),
                ));
            }
            if let Err(e) = check_date_format(format) {
                return Err(invalid(&format!("{field}.format"), e));
            }
        }
        if m.unit.is_some() && m.format.is_some() {
            return Err(invalid(
                &format!("{field}.unit"),
                "either `unit` (epoch numbers) or `format` (text), not both".into(),
            ));
        }
        if m.unit.is_some() && field_kind != FieldType::Date {
            return Err(invalid(
                &format!("{field}.unit"),
                "no `unit` unless `type = \"date\"` (it says what an epoch number counts)".into(),
            ));
        }
        let unset_missing = switch(m.on_missing.as_deref(), [("keep", false), ("unset", true)])
            .map_err(|e| invalid(&format!("{field}.on_missing"), e))?;
        if unset_missing {
            let clash = if kind != IntegrationType::Import {
                Some("an IMPORT config (an EXPORT sends only the values it finds)")
            } else if m.required {
                Some("a field that is not `required` (a record without it is rejected)")
            } else if m.default.is_some() {
                Some("a field without a `default` (a record without it gets the default)")
            } else if *target == file.target.key {
                Some("a field other than the upsert key")
            } else if file.target.collection == crate::model::collections::EVENTS {
                Some("a target other than `events` (a stored event is never updated)")
            } else {
                None
            };
            if let Some(expected) = clash {
                return Err(invalid(
                    &format!("{field}.on_missing"),
                    format!("`on_missing = \"unset\"` only on {expected}"),
                ));
            }
        }
        // A list is never a key: every record would fail as "not a single value".
        if m.list && *target == file.target.key && !file.kind.eq_ignore_ascii_case("EXPORT") {
            return Err(invalid(
                &format!("{field}.list"),
                "no `list = true` on the upsert key (a document is found by one value)".into(),
            ));
        }
        let field_spec = Field {
            target: target.clone(),
            path: m.path.clone(),
            members: member_chain(&m.path),
            query,
            kind: field_kind,
            required: m.required,
            default: m.default.as_ref().map(toml_to_json),
            list: m.list,
            epoch_unit,
            unit_given: m.unit.is_some(),
            unset_missing,
            date_format: m.format.clone(),
        };
        // A default is coerced to the type like a found value: check it does coerce, or
        // every record without the field would be rejected at run time.
        if let Some(default) = &field_spec.default {
            coerce(&field_spec, default.clone()).map_err(|e| {
                invalid(
                    &format!("{field}.default"),
                    format!("a value of the field's type ({e})"),
                )
            })?;
        }
        fields.push(field_spec);
    }
    if kind == IntegrationType::Import {
        let mapped = |target: &str| fields.iter().any(|f| f.target == target);
        // Sluice writes these itself on every upsert: a mapped value would be replaced
        // silently, or (`createdAt`) make every update after the first fail.
        for reserved in IMPORT_RESERVED_FIELDS {
            if mapped(reserved) {
                return Err(invalid(
                    &format!("mapping.{reserved}"),
                    format!(
                        "a target field other than {} (Sluice sets them on every upsert); map the API's value to another name",
                        IMPORT_RESERVED_FIELDS.map(|f| format!("`{f}`")).join(", ")
                    ),
                ));
            }
        }
        if fields.is_empty() {
            return Err(invalid("mapping", "at least one mapped field".into()));
        }
        // A visitor's aggregates are the event writer's, kept from the visitor's events
        // (`sessions` is refused as a target for the same reason): an import writing one
        // would leave it wrong until `db check` finds it, and USER_DATA exports it so.
        if file.target.collection == crate::model::collections::USERS {
            if let Some(f) = fields
                .iter()
                .find(|f| USERS_WRITER_FIELDS.contains(&f.target.as_str()))
            {
                return Err(invalid(
                    &format!("mapping.{}", f.target),
                    format!(
                        "a target field other than the visitor's aggregates, which the event writer keeps from the visitor's events ({}); map the API's value to another name",
                        USERS_WRITER_FIELDS.map(|f| format!("`{f}`")).join(", ")
                    ),
                ));
            }
        }
        if file.target.collection == crate::model::collections::EVENTS {
            if let Some((field, expected)) = event_target_problem(&file.target, &fields) {
                return Err(invalid(&field, expected));
            }
        }
        // The schema's unique identities are indexed over every document: a new
        // document without one is a duplicate null from the second on.
        let identity = match file.target.collection.as_str() {
            crate::model::collections::USERS => Some(crate::model::user_fields::VISITOR_ID),
            crate::model::collections::PRODUCTS => Some(crate::model::product_fields::PRODUCT_ID),
            _ => None,
        };
        if let Some(id) = identity.filter(|id| !mapped(id)) {
            return Err(invalid(
                &format!("mapping.{id}"),
                format!(
                    "a mapping for `{id}`: every document in `{}` has one (its unique index), so an import that may create documents must map it",
                    file.target.collection
                ),
            ));
        }
        if !mapped(&file.target.key) {
            return Err(invalid(
                "target.key",
                format!(
                    "a mapped field (the upsert key `{}` has no `[mapping.{}]`)",
                    file.target.key, file.target.key
                ),
            ));
        }
        if let Some(inc) = &file.incremental {
            if !mapped(&inc.cursor_field) {
                return Err(invalid(
                    "incremental.cursor_field",
                    format!(
                        "a mapped field (`{}` has no `[mapping.{}]`, so the cursor would never move)",
                        inc.cursor_field, inc.cursor_field
                    ),
                ));
            }
            let date_cursor = fields
                .iter()
                .any(|f| f.target == inc.cursor_field && f.kind == FieldType::Date);
            // The cursor goes back to the API in the unit its records use: one unit.
            if fields
                .iter()
                .any(|f| f.target == inc.cursor_field && f.epoch_unit == EpochUnit::Auto)
            {
                return Err(invalid(
                    &format!("mapping.{}.unit", inc.cursor_field),
                    "`seconds` or `milliseconds` for the incremental cursor (it is sent back to the API as a number in one unit), not `auto`".into(),
                ));
            }
            if inc.lookback_seconds > MAX_LOOKBACK_SECONDS {
                return Err(invalid(
                    "incremental.lookback_seconds",
                    format!(
                        "at most {MAX_LOOKBACK_SECONDS} (a year), got {}",
                        inc.lookback_seconds
                    ),
                ));
            }
            if inc.lookback_seconds > 0 && !date_cursor {
                return Err(invalid(
                    "incremental.lookback_seconds",
                    format!(
                        "a cursor field mapped with `type = \"date\"` (`{}` is not one, so seconds cannot be taken off it)",
                        inc.cursor_field
                    ),
                ));
            }
        }
        if file.push.is_some() {
            return Err(invalid(
                "push",
                "no `[push]` section in an IMPORT config (`[push]` is for `type = \"EXPORT\"`)"
                    .into(),
            ));
        }
    }
    if kind == IntegrationType::Export {
        if file.push.is_none() {
            return Err(invalid(
                "push",
                "a `[push]` section for an EXPORT config".into(),
            ));
        }
        // An EXPORT reads `[push] collection` and sends to `[source]`: sections of an
        // IMPORT would be ignored without a word. (A `[target]` equal to the defaults is
        // what configs stored by earlier versions carry, so it is let through.)
        if file.target != TargetSection::default() {
            return Err(invalid(
                "target",
                "no `[target]` section in an EXPORT config (it reads `[push] collection`; `[push] batch_size` sets the records per request)".into(),
            ));
        }
        if file.incremental.is_some() {
            return Err(invalid(
                "incremental",
                "no `[incremental]` section in an EXPORT config (`[push] watermark_field` selects new documents)".into(),
            ));
        }
    }
    if let Some(push) = &file.push {
        if push.collection.is_empty() {
            return Err(invalid(
                "push.collection",
                "the collection whose documents are pushed (`collection = \"users\"`)".into(),
            ));
        }
        if let Some(f) = &push.filter {
            push_filter(f).map_err(|e| invalid("push.filter", e))?;
        }
        // Read a batch at a time: 0 would read the collection whole (`limit(0)` is no
        // limit) into one request.
        if !(1..=MAX_PUSH_BATCH).contains(&push.batch_size) {
            return Err(invalid(
                "push.batch_size",
                format!("1 to {MAX_PUSH_BATCH}, got {}", push.batch_size),
            ));
        }
        if !(1..=256).contains(&push.max_batch_mb) {
            return Err(invalid(
                "push.max_batch_mb",
                format!("1 to 256, got {}", push.max_batch_mb),
            ));
        }
        if crate::model::collections::INTERNAL.contains(&push.collection.as_str()) {
            return Err(invalid(
                "push.collection",
                format!(
                    "a collection of your data, not Sluice's own `{}`",
                    push.collection
                ),
            ));
        }
    }
    if file.target.batch_size == 0 {
        return Err(invalid(
            "target.batch_size",
            "a number greater than 0".into(),
        ));
    }
    let coll = &file.target.collection;
    if crate::model::collections::INTERNAL.contains(&coll.as_str()) {
        return Err(invalid(
            "target.collection",
            format!("a collection of your data, not Sluice's own `{coll}`"),
        ));
    }
    if coll.is_empty()
        || coll.len() > 120
        || coll.starts_with("system.")
        || coll.contains(['$', '\0'])
    {
        return Err(invalid(
            "target.collection",
            format!("a collection name (not empty, no `$`, not `system.*`), got `{coll}`"),
        ));
    }
    let rate = file.source.rate_limit_per_second;
    if !(rate.is_finite() && (rate == 0.0 || rate >= MIN_RATE_PER_SECOND)) {
        return Err(invalid(
            "source.rate_limit_per_second",
            format!("0 (no limit) or at least {MIN_RATE_PER_SECOND} (a request per 1,000 s), got {rate}"),
        ));
    }
    // Header values may be `${env:NAME}` references, resolved like auth secrets; a header
    // that carries a credential must be one, so the stored config never holds it in clear.
    let mut headers = Vec::with_capacity(file.headers.len());
    let mut env_header_values = Vec::new();
    for (k, v) in &file.headers {
        let field = format!("headers.{k}");
        let value = Secret::new(v.clone());
        if value.env_reference().is_none() && credential_header(k) {
            return Err(invalid(
                &field,
                "a `${env:NAME}` reference (this header carries a credential, and secrets are never stored in clear)".into(),
            ));
        }
        let resolved = resolve(&field, &value)?;
        header_ok(&field, k, resolved.expose()).map_err(|e| invalid(&field, e))?;
        if value.env_reference().is_some() {
            env_header_values.push(resolved.expose().to_string());
        }
        headers.push((k.clone(), resolved.expose().to_string()));
    }
    Ok(Connector {
        name: file.name.clone(),
        kind,
        endpoint,
        method,
        headers,
        env_header_values,
        schedule: file.schedule.clone(),
        is_active: file.is_active,
        allow_private_network: file.allow_private_network,
        auth,
        records: s.records.clone(),
        timeout: std::time::Duration::from_secs(s.timeout_seconds),
        max_response_bytes: (s.max_page_mb as usize) << 20,
        rate_limit_per_second: s.rate_limit_per_second,
        paging,
        has_more_path: p.has_more_path.clone(),
        total_path: p.total_path.clone(),
        total_header: p.total_header.clone(),
        max_pages: p.max_pages,
        retry: s.retry.clone(),
        collection: file.target.collection.clone(),
        key: file.target.key.clone(),
        batch_size: file.target.batch_size,
        fields,
        incremental: file.incremental.clone(),
        push: file.push.clone(),
        transforms: file.transforms.clone(),
    })
}

/// Selects the records of a page with the connector's JSONPath.
pub fn select_records(body: &Value, path: &str) -> Result<Vec<Value>, String> {
    body.query(path)
        .map(|found| found.into_iter().cloned().collect())
        .map_err(|e| format!("record selector `{path}`: {e}"))
}

/// Fields an IMPORT into `events` must map: each record becomes a tracking event.
pub const EVENT_IMPORT_REQUIRED: [&str; 3] = ["userId", "eventType", "timestamp"];

/// What is wrong with an IMPORT into `events`, as (field, what was expected). Records
/// become events (validated as the tracking API validates them, deduplicated by
/// `eventId`, folded into `sessions` and `users`), so the key is `eventId`, the fields
/// every event has are mapped, and `metadata` stays Sluice's.
fn event_target_problem(target: &TargetSection, fields: &[Field]) -> Option<(String, String)> {
    use crate::model::event_fields as e;
    if target.key != e::EVENT_ID {
        return Some((
            "target.key".into(),
            format!(
                "`eventId` for `collection = \"events\"` (events are stored once per eventId), got `{}`",
                target.key
            ),
        ));
    }
    let mapped = |name: &str| fields.iter().any(|f| f.target == name);
    if let Some(missing) = EVENT_IMPORT_REQUIRED.iter().find(|n| !mapped(n)) {
        return Some((
            format!("mapping.{missing}"),
            format!(
                "a mapping for `{missing}`: an IMPORT into `events` must map {} (a `default` will do for a constant)",
                EVENT_IMPORT_REQUIRED.map(|f| format!("`{f}`")).join(", ")
            ),
        ));
    }
    for own in [e::METADATA, "_id"] {
        if mapped(own) {
            return Some((
                format!("mapping.{own}"),
                format!("no `{own}` mapping (Sluice sets it on every event); map the value to another name, which lands in `properties`"),
            ));
        }
    }
    None
}

/// Why a records selector that found nothing probably points at the wrong place: the
/// response has nothing where the selector's last step looks (`$.data` for `$.data[*]`),
/// so this is not an empty page. `None` when that place exists (an empty list, `null`),
/// when the selector starts at the root, or when the body is empty.
pub fn records_miss(body: &Value, path: &str) -> Option<String> {
    if body.is_null() {
        return None;
    }
    let parent = parent_path(path)?;
    let found = body.query(parent).ok()?;
    if !found.is_empty() {
        return None;
    }
    let keys = match body {
        Value::Object(m) if !m.is_empty() => format!(" (its top-level keys: {})", some_keys(m)),
        Value::Array(_) => " (it is a list)".to_string(),
        _ => String::new(),
    };
    Some(format!(
        "records path `{path}` found nothing: the response has no `{parent}`{keys}; check `source.records`"
    ))
}

/// Why a records selector walking a list (`$.data[*]`, `$[*]`) found no records where it
/// should have: its place holds a scalar, or an object that is not one of records
/// (`{"error": "quota exceeded"}` where a bare list was), most likely an error answered
/// with 200. `None` when the place holds a list, `null`, an object of records, nothing,
/// or the selector is not a plain member chain ending in `[*]`.
pub fn records_not_a_list(body: &Value, path: &str) -> Option<String> {
    let chain = member_chain(path.trim().strip_suffix("[*]")?)?;
    let found = at_chain(body, &chain)?;
    let what = match found {
        Value::Array(_) | Value::Null => return None,
        // An object of records keyed by id; not one holding an error's details
        // (`{"error": {"code": 429, ...}}`), however shaped.
        Value::Object(m)
            if m.values().all(Value::is_object) && !m.keys().any(|k| names_an_error(k)) =>
        {
            return None
        }
        Value::Object(m) => format!("an object (its keys: {})", some_keys(m)),
        other => {
            let text: String = other.to_string().chars().take(300).collect();
            format!("`{}`", text.replace('\n', " "))
        }
    };
    let place = if chain.is_empty() {
        "body".to_string()
    } else {
        format!("`$.{}`", chain.join("."))
    };
    Some(format!(
        "the response's {place} is {what}, not a list of records (an error answered with 200?); check `source.records`"
    ))
}

/// A key under which APIs answer an error's details (`error`, `errors`, `fault`, any case).
fn names_an_error(key: &str) -> bool {
    ["error", "errors", "fault"]
        .iter()
        .any(|e| key.eq_ignore_ascii_case(e))
}

/// An object's first ten keys for a message, `...` when there are more.
fn some_keys(m: &serde_json::Map<String, Value>) -> String {
    let mut names: Vec<&str> = m.keys().take(10).map(String::as_str).collect();
    if m.len() > names.len() {
        names.push("...");
    }
    names.join(", ")
}

/// The JSONPath without its last step (`$.data` for `$.data[*]`, `$.a` for `$.a.b`);
/// `None` when that is the root or a recursive descent.
fn parent_path(path: &str) -> Option<&str> {
    let p = path.trim();
    let cut = if p.ends_with(']') {
        let mut depth = 0;
        let mut at = None;
        for (i, ch) in p.char_indices().rev() {
            match ch {
                ']' => depth += 1,
                '[' => {
                    depth -= 1;
                    if depth == 0 {
                        at = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        at?
    } else {
        p.rfind('.')?
    };
    let parent = p[..cut].trim_end_matches('.');
    (parent.len() > 1 && parent.starts_with('$') && !parent.ends_with('.')).then_some(parent)
}

/// The first value a JSONPath finds, if any.
pub fn first(value: &Value, path: &str) -> Option<Value> {
    value.query(path).ok()?.into_iter().next().cloned()
}

fn coerce(field: &Field, v: Value) -> Result<Bson, String> {
    if field.list {
        let Value::Array(items) = v else {
            return Err(format!(
                "field `{}` ({}): expected a list (`list = true`), got {v}",
                field.target, field.path
            ));
        };
        let one = Field {
            list: false,
            ..field.clone()
        };
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| coerce(&one, item).map_err(|e| format!("{e} (item {i})")))
            .collect::<Result<Vec<_>, _>>()
            .map(Bson::Array);
    }
    coerce_one(field, v)
}

/// A scalar MongoDB wrote as extended JSON (an EXPORT maps documents read from MongoDB
/// as relaxed extended JSON: dates as `{"$date": ...}`, ids as `{"$oid": ...}`, big or
/// exact numbers as `{"$numberLong": ...}` / `{"$numberDecimal": ...}`), as the plain
/// JSON value it stands for; anything else as it is.
fn plain_scalar(v: Value) -> Value {
    let Value::Object(m) = &v else {
        return v;
    };
    let Some((key, inner)) = m.iter().next().filter(|_| m.len() == 1) else {
        return v;
    };
    match (key.as_str(), inner) {
        (
            "$oid" | "$numberLong" | "$numberInt" | "$numberDecimal" | "$numberDouble" | "$symbol",
            Value::String(s),
        ) => Value::String(s.clone()),
        ("$date", Value::String(s)) => Value::String(s.clone()),
        ("$date", Value::Number(n)) => Value::Number(n.clone()),
        ("$date", Value::Object(d)) => match d.get("$numberLong") {
            Some(Value::String(ms)) if d.len() == 1 => ms
                .parse::<i64>()
                .map(|ms| Value::Number(ms.into()))
                .unwrap_or(v),
            _ => v,
        },
        _ => v,
    }
}

fn coerce_one(field: &Field, v: Value) -> Result<Bson, String> {
    // MongoDB's own dates count milliseconds whatever the field's `unit`.
    let extended_date = matches!(&v, Value::Object(m) if m.len() == 1 && m.contains_key("$date"));
    let v = if field.kind == FieldType::Any {
        v
    } else {
        plain_scalar(v)
    };
    let bad = |what: &str| {
        format!(
            "field `{}` ({}): expected {what}, got {v}",
            field.target, field.path
        )
    };
    Ok(match field.kind {
        // An integer beyond 64 bits would be stored as an approximate double, and two
        // such ids could become one document.
        FieldType::Any if beyond_int64(&v) => {
            return Err(bad(
                "integers within the 64-bit range (map larger ids with `type = \"string\"`)",
            ))
        }
        FieldType::Any => Bson::try_from(v.clone()).map_err(|e| bad(&e.to_string()))?,
        FieldType::String => match &v {
            Value::String(s) => Bson::String(s.clone()),
            // The JSON reader holds whole numbers from -2^63 to 2^64 exactly; beyond, only
            // as a rounded double, whose digits are not the API's.
            Value::Number(n)
                if n.is_f64()
                    && n
                        .as_f64()
                        .is_some_and(|f| f >= TWO_TO_64 || f <= -TWO_TO_63) =>
            {
                return Err(bad(
                    "a number within 64 bits (larger whole numbers are rounded when the JSON is read: the API must send such ids as strings)",
                ))
            }
            Value::Number(n) => Bson::String(n.to_string()),
            Value::Bool(b) => Bson::String(b.to_string()),
            _ => return Err(bad("a string")),
        },
        FieldType::Number => match &v {
            Value::Number(n) => Bson::Double(n.as_f64().ok_or_else(|| bad("a number"))?),
            Value::String(s) => Bson::Double(
                s.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| bad("a number (not NaN or infinite)"))?,
            ),
            _ => return Err(bad("a number")),
        },
        FieldType::Integer => match &v {
            // A whole float is taken only where a double holds every integer exactly;
            // nothing is clamped.
            Value::Number(n) => Bson::Int64(
                n.as_i64()
                    .or_else(|| {
                        n.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_EXACT_DOUBLE_INT)
                            .map(|f| f as i64)
                    })
                    .ok_or_else(|| {
                        bad("an integer within the 64-bit range (map larger ids with `type = \"string\"`)")
                    })?,
            ),
            // Text as an integer, or a whole decimal (`"12.00"`, as a number's `12.0` is).
            Value::String(s) => {
                let s = s.trim();
                let whole = match s.split_once('.') {
                    Some((int, zeros))
                        if !zeros.is_empty() && zeros.bytes().all(|b| b == b'0') =>
                    {
                        int
                    }
                    _ => s,
                };
                Bson::Int64(whole.parse().map_err(|_| bad("an integer"))?)
            }
            _ => return Err(bad("an integer")),
        },
        FieldType::Bool => match &v {
            Value::Bool(b) => Bson::Boolean(*b),
            Value::String(s) if s == "true" || s == "1" => Bson::Boolean(true),
            Value::String(s) if s == "false" || s == "0" => Bson::Boolean(false),
            Value::Number(n) if n.as_i64() == Some(1) => Bson::Boolean(true),
            Value::Number(n) if n.as_i64() == Some(0) => Bson::Boolean(false),
            _ => return Err(bad("a boolean")),
        },
        FieldType::Date => match &v {
            // With a `unit`, an epoch number may come as a string.
            Value::String(s) if field.unit_given && is_decimal(s) => {
                let seconds = s.parse::<f64>().ok();
                let at = if field.epoch_unit.counts_seconds(seconds) {
                    epoch_seconds(seconds)
                } else {
                    s.parse::<i64>()
                        .ok()
                        .map(bson::DateTime::from_millis)
                        .or_else(|| epoch_millis(seconds))
                };
                Bson::DateTime(at.ok_or_else(|| bad("an epoch number"))?)
            }
            Value::String(s) if field.date_format.is_some() => {
                let format = field.date_format.as_deref().unwrap_or_default();
                let at = parse_formatted(s, format)
                    .or_else(|| {
                        chrono::DateTime::parse_from_rfc3339(s)
                            .ok()
                            .map(|t| t.timestamp_millis())
                    })
                    .ok_or_else(|| bad(&format!("a date in the format `{format}` (or RFC 3339)")))?;
                Bson::DateTime(bson::DateTime::from_millis(at))
            }
            Value::String(s) => {
                let t = chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.timestamp_millis())
                    .or_else(|_| {
                        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map(|d| {
                            d.and_hms_opt(0, 0, 0)
                                .map_or(0, |t| t.and_utc().timestamp_millis())
                        })
                    })
                    .map_err(|_| bad(&format!("an RFC 3339 date{}", date_hint(s))))?;
                Bson::DateTime(bson::DateTime::from_millis(t))
            }
            Value::Number(n) if extended_date || !field.epoch_unit.counts_seconds(n.as_f64()) => {
                Bson::DateTime(
                n.as_i64()
                    .map(bson::DateTime::from_millis)
                    .or_else(|| epoch_millis(n.as_f64()))
                        .ok_or_else(|| bad("epoch milliseconds"))?,
                )
            }
            Value::Number(n) => {
                Bson::DateTime(epoch_seconds(n.as_f64()).ok_or_else(|| bad("epoch seconds"))?)
            }
            _ => return Err(bad("a date")),
        },
    })
}

/// A two-way setting: each choice's flag, false when absent, anything else an error
/// naming both choices.
fn switch(value: Option<&str>, choices: [(&str, bool); 2]) -> Result<bool, String> {
    let Some(v) = value else {
        return Ok(false);
    };
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, flag)| *flag)
        .ok_or_else(|| format!("`{}` or `{}`, got `{v}`", choices[0].0, choices[1].0))
}

/// Whether `format` has an offset (`%z` and its variants): without one, times are UTC.
fn has_offset(format: &str) -> bool {
    format.contains("%z")
        || format.contains("%:z")
        || format.contains("%#z")
        || format.contains("%::z")
}

/// A `strftime` format a date can be read with: known specifiers only, and a date in it.
fn check_date_format(format: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(format).any(|i| matches!(i, Item::Error)) {
        return Err(format!("a valid strftime format, got `{format}`"));
    }
    // chrono skips a zone name when reading: `EST` would be read as UTC, hours off.
    if format.contains("%Z") {
        return Err(format!(
            "a format with a numeric offset (`%z`, `+0100`) rather than a zone name (`%Z` is not read back), got `{format}`"
        ));
    }
    // Formatting a date and reading it back must give it again (a format without a day,
    // say, cannot be read).
    let sample = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
    let text = sample.format(format).to_string();
    if parse_formatted(&text, format).is_none() {
        return Err(format!(
            "a strftime format that names a whole date, got `{format}` (it writes `{text}`, which does not read back)"
        ));
    }
    Ok(())
}

/// `s` read with the `strftime` `format` (UTC unless it has an offset), in epoch ms.
fn parse_formatted(s: &str, format: &str) -> Option<i64> {
    if has_offset(format) {
        return chrono::DateTime::parse_from_str(s, format)
            .ok()
            .map(|t| t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(s, format)
        .map(|t| t.and_utc().timestamp_millis())
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(s, format).map(|d| {
                d.and_time(chrono::NaiveTime::MIN)
                    .and_utc()
                    .timestamp_millis()
            })
        })
        .ok()
}

/// A date as `format` writes it (in UTC), for sending a cursor back as the API wrote it.
pub fn format_date(at: bson::DateTime, format: &str) -> String {
    at.to_chrono().format(format).to_string()
}

/// `seconds` since the epoch (fractions kept to the millisecond), if a date holds them.
fn epoch_seconds(seconds: Option<f64>) -> Option<bson::DateTime> {
    epoch_millis(Some(seconds? * 1000.0))
}

/// What an epoch number in a `date` field counts (`unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EpochUnit {
    #[default]
    Milliseconds,
    Seconds,
    /// Seconds below [`AUTO_SECONDS_BELOW`], milliseconds from it: for an API whose
    /// records mix both. A date before March 1973 sent in milliseconds is misread.
    Auto,
}

/// Where `unit = "auto"` passes from seconds to milliseconds: 10^11 seconds is the year
/// 5138, 10^11 milliseconds is 3 March 1973.
pub const AUTO_SECONDS_BELOW: f64 = 1e11;

impl EpochUnit {
    /// Whether the epoch number `n` counts seconds.
    pub fn counts_seconds(self, n: Option<f64>) -> bool {
        match self {
            EpochUnit::Milliseconds => false,
            EpochUnit::Seconds => true,
            EpochUnit::Auto => n.is_some_and(|n| n.abs() < AUTO_SECONDS_BELOW),
        }
    }
}

/// Epoch milliseconds with a fraction, cut to the millisecond (as RFC 3339 times with
/// finer digits are, so a cursor taken from the largest stored value never passes a
/// record of the same millisecond); a value within float error of a whole millisecond
/// (`1735726020.123` seconds times 1000) is that millisecond.
fn epoch_millis(ms: Option<f64>) -> Option<bson::DateTime> {
    let ms = ms?;
    let whole = ms.round();
    let ms = if (ms - whole).abs() < 1e-3 {
        whole
    } else {
        ms.floor()
    };
    (ms.is_finite() && ms.abs() < 8.64e15).then(|| bson::DateTime::from_millis(ms as i64))
}

/// What a date string that is not RFC 3339 may need instead, for its error.
fn date_hint(s: &str) -> String {
    if is_decimal(s) {
        " (an epoch number as a string is read with `unit = \"seconds\"` or `unit = \"milliseconds\"`)"
            .into()
    } else if s.len() >= 19 && s.as_bytes().get(10) == Some(&b' ') {
        " (a date and time without `T` or offset is read with `format`, such as `format = \"%Y-%m-%d %H:%M:%S\"`, taken as UTC)"
            .into()
    } else {
        " (other layouts are read with `format`)".into()
    }
}

/// `-?digits[.digits]`: an epoch number written as a string.
fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let mut parts = digits.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let all = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    all(whole) && parts.next().is_none_or(all)
}

/// A date field without a `unit` whose value, read as epoch milliseconds, falls in the
/// 12th to the 46th day of 1970 (epoch seconds of 2001 to 2096): almost surely seconds read
/// as milliseconds. Says so.
pub fn suspect_epoch_seconds(field: &Field, record: &Value) -> Option<String> {
    if field.kind != FieldType::Date || field.unit_given {
        return None;
    }
    let n = lookup(field, record)?.as_i64()?;
    ((1_000_000_000..4_000_000_000).contains(&n)).then(|| {
        format!(
            "field `{}` ({}) read {n} as epoch milliseconds: a date in early 1970; if the API sends epoch seconds, set `unit = \"seconds\"` in `[mapping.{}]`",
            field.target, field.path, field.target
        )
    })
}

/// Whether `record` holds `field`'s date as an epoch number (which a cursor is then sent
/// back as).
pub fn sent_as_epoch(field: &Field, record: &Value) -> bool {
    match lookup(field, record) {
        Some(Value::Number(_)) => true,
        Some(Value::String(s)) => field.unit_given && is_decimal(&s),
        _ => false,
    }
}

/// Fields an import writes on every document it upserts.
pub const IMPORT_RESERVED_FIELDS: [&str; 3] = ["createdAt", "updatedAt", "source"];

/// The fields of `users` the event writer keeps (a visitor's aggregates, and the time of
/// the identify whose traits the profile holds): no import maps them.
pub const USERS_WRITER_FIELDS: [&str; 8] = {
    use crate::model::user_fields as u;
    [
        u::FIRST_SEEN,
        u::LAST_SEEN,
        u::TOTAL_SESSIONS,
        u::TOTAL_EVENTS,
        u::TOTAL_PURCHASES,
        u::TOTAL_REVENUE,
        u::TOTAL_REVENUE_MICROS,
        u::TRAITS_AT,
    ]
};

/// 2^53: every integer up to it is exactly a double.
const MAX_EXACT_DOUBLE_INT: f64 = 9_007_199_254_740_992.0;

/// 2^64: from here on a JSON number is read as a double, rounded.
const TWO_TO_64: f64 = 18_446_744_073_709_551_616.0;
/// 2^63: below -2^63 a JSON number is read as a double, rounded.
const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;

/// Whether `v` holds (anywhere) an integer that no 64-bit integer holds: JSON parsers
/// read it as a double, which cannot tell it from its neighbours.
pub fn beyond_int64(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_u64() && n.as_i64().is_none(),
        Value::Array(a) => a.iter().any(beyond_int64),
        Value::Object(o) => o.values().any(beyond_int64),
        _ => false,
    }
}

/// What `body` holds at the member `chain` (from [`member_chain`]), if every step is an
/// object holding the next member.
pub fn at_chain<'a>(body: &'a Value, chain: &[String]) -> Option<&'a Value> {
    chain.iter().try_fold(body, |v, k| v.as_object()?.get(k))
}

/// The keys of a JSONPath that is only `$` and `.name` steps (ASCII names of letters,
/// digits and `_`, not starting with a digit: RFC 9535's member-name shorthand), else
/// `None`.
pub fn member_chain(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix('$')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let rest = rest.strip_prefix('.')?;
    rest.split('.')
        .map(|k| {
            let plain = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            plain.then(|| k.to_string())
        })
        .collect()
}

/// Whether a parsed path names at most one value: names and indices only, one per
/// segment (no wildcard, slice, filter, union or descent).
fn singular(query: &jsonpath_rust::parser::model::JpQuery) -> bool {
    use jsonpath_rust::parser::model::{Segment, Selector};
    let one = |s: &Selector| matches!(s, Selector::Name(_) | Selector::Index(_));
    query.segments.iter().all(|segment| match segment {
        Segment::Selector(s) => one(s),
        Segment::Selectors(list) => list.len() == 1 && one(&list[0]),
        Segment::Descendant(_) => false,
    })
}

/// The value `f`'s path finds in `record` (with the path parsed once, at validation): the
/// first match, or with `list = true` every match as a list.
pub fn lookup(f: &Field, record: &Value) -> Option<Value> {
    find(f, record).0
}

/// [`lookup`], and how many values the path matched.
fn find(f: &Field, record: &Value) -> (Option<Value>, usize) {
    match &f.members {
        Some(keys) => {
            let found = keys
                .iter()
                .try_fold(record, |v, k| v.as_object()?.get(k))
                .cloned();
            match found {
                // A member chain names one value; as a list, a list found there is the
                // list itself (without its nulls: a list with nothing in it is no list).
                Some(Value::Array(items)) if f.list => {
                    let items: Vec<Value> = items.into_iter().filter(|v| !v.is_null()).collect();
                    let n = items.len();
                    ((!items.is_empty()).then_some(Value::Array(items)), n)
                }
                // `null` where a list is expected is no list (as APIs send an empty one).
                Some(Value::Null) if f.list => (None, 0),
                Some(v) if f.list => (Some(Value::Array(vec![v])), 1),
                Some(v) => (Some(v), 1),
                None => (None, 0),
            }
        }
        None => {
            let found = jsonpath_rust::query::js_path_process(&f.query, record).unwrap_or_default();
            let n = found.len();
            // A path naming one value (`$['tags']`, `$.a['b-c'][0]`) reads as a member
            // chain does: as a list, a list found there is the list itself.
            if f.list && n == 1 && singular(&f.query) {
                return match found.into_iter().next().map(|r| r.val()) {
                    Some(Value::Array(items)) => {
                        let items: Vec<Value> =
                            items.iter().filter(|v| !v.is_null()).cloned().collect();
                        let n = items.len();
                        ((!items.is_empty()).then_some(Value::Array(items)), n)
                    }
                    Some(Value::Null) | None => (None, 0),
                    Some(v) => (Some(Value::Array(vec![v.clone()])), 1),
                };
            }
            if f.list {
                // The values found, without nulls (an item without the member).
                let items: Vec<Value> = found
                    .into_iter()
                    .map(|r| r.val().clone())
                    .filter(|v| !v.is_null())
                    .collect();
                ((!items.is_empty()).then_some(Value::Array(items)), n)
            } else {
                (found.into_iter().next().map(|r| r.val().clone()), n)
            }
        }
    }
}

/// A field whose path matched several values in a record, of which mapping kept the
/// first (`list = true` keeps them all).
#[derive(Debug, Clone, PartialEq)]
pub struct SeveralMatches {
    pub target: String,
    pub path: String,
    pub matches: usize,
}

impl std::fmt::Display for SeveralMatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`mapping.{}` (`{}`) matched several values and kept the first; set `list = true` to keep them all",
            self.target, self.path
        )
    }
}

/// The slowest `source.rate_limit_per_second` (slower would overflow the pause).
const MIN_RATE_PER_SECOND: f64 = 0.001;

/// Whether `name: value` can be sent as an HTTP header: a token name (RFC 9110) and a
/// value of visible ASCII, spaces and tabs. Checked at validation, so a typo (or a secret
/// read with its trailing newline) fails there, naming the field, not at every request.
/// The value is never shown: it may be a secret.
fn header_ok(field: &str, name: &str, value: &str) -> Result<(), String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(tchar) {
        return Err(format!(
            "a header name of letters, digits and !#$%&'*+-.^_`|~ (no spaces), got `{name}`"
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(*c == '\t' || (' '..='~').contains(c)))
    {
        return Err(format!(
            "`{field}`: a header value of visible ASCII, spaces and tabs; it holds {:?} (a secret read with its trailing newline?)",
            bad
        ));
    }
    Ok(())
}

/// Maps one source record to a target document, or says why it cannot.
pub fn map_record(fields: &[Field], record: &Value) -> Result<Document, String> {
    map_record_noting(fields, record, &mut Vec::new())
}

/// [`map_record`], noting in `several` each field whose path matched several values (once
/// per field: the first record it happened in).
pub fn map_record_noting(
    fields: &[Field],
    record: &Value,
    several: &mut Vec<SeveralMatches>,
) -> Result<Document, String> {
    let mut out = Document::new();
    // Every field that fails is said, so that one run shows all a record lacks.
    let mut failed: Vec<String> = Vec::new();
    for f in fields {
        let (found, matches) = find(f, record);
        if matches > 1 && !f.list && !several.iter().any(|s| s.target == f.target) {
            several.push(SeveralMatches {
                target: f.target.clone(),
                path: f.path.clone(),
                matches,
            });
        }
        let found = found.filter(|v| !v.is_null());
        let value = match (found, &f.default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.clone(),
            (None, None) if f.required => {
                failed.push(format!(
                    "required field `{}` ({}) is missing",
                    f.target, f.path
                ));
                continue;
            }
            (None, None) => continue,
        };
        match coerce(f, value) {
            Ok(v) => {
                out.insert(f.target.clone(), v);
            }
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(failed.join("; "))
    }
}

/// An EXPORT config's `[push] filter`: a JSON object (extended JSON: `{"$date": ..}` is a
/// date), as the query it becomes. Refused, not widened to every document, when it does
/// not convert (a number beyond 64 bits, say).
pub fn push_filter(text: &str) -> Result<bson::Document, String> {
    let value: serde_json::Map<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("a JSON object ({e})"))?;
    // MongoDB has no unsigned 64-bit integer: such a number would match a rounded double.
    fn too_big(v: &Value) -> bool {
        match v {
            Value::Number(n) => n.is_u64() && n.as_i64().is_none(),
            Value::Array(items) => items.iter().any(too_big),
            Value::Object(m) => m.values().any(too_big),
            _ => false,
        }
    }
    if value.values().any(too_big) {
        return Err("a filter whose integers fit in 64 bits (send bigger ones as strings)".into());
    }
    // Operators that run JavaScript on the server (`$where`, and `$function` /
    // `$accumulator` inside `$expr`): code an ADMIN of the API could have MongoDB run on
    // every document, beyond what a filter needs.
    fn javascript(m: &serde_json::Map<String, Value>) -> Option<&'static str> {
        m.iter().find_map(|(k, v)| {
            ["$where", "$function", "$accumulator"]
                .into_iter()
                .find(|op| k == op)
                .or_else(|| within(v))
        })
    }
    fn within(v: &Value) -> Option<&'static str> {
        match v {
            Value::Array(items) => items.iter().find_map(within),
            Value::Object(m) => javascript(m),
            _ => None,
        }
    }
    if let Some(op) = javascript(&value) {
        return Err(format!(
            "a filter without `{op}` (operators that run JavaScript on the server are refused)"
        ));
    }
    match bson::Bson::try_from(Value::Object(value)) {
        Ok(bson::Bson::Document(d)) => Ok(d),
        Ok(_) => Err("a JSON object".into()),
        Err(e) => Err(format!("a filter MongoDB can read ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    #[test]
    fn a_push_section_is_refused_from_an_import_before_it_is_asked_to_be_complete() {
        let text = "name = \"p\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[push]\nbatch_size = 10\n[mapping.productId]\npath = \"$.id\"\n";
        let err = parse_file("p.toml", text)
            .and_then(|f| validate("p.toml", &f, &|_| None).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no `[push]` section in an IMPORT config"),
            "{err}"
        );
        // An EXPORT without its collection is still told to name one.
        let text = "name = \"e\"\ntype = \"EXPORT\"\nendpoint = \"https://api.example/x\"\n[push]\nbatch_size = 10\n[mapping.id]\npath = \"$._id\"\n";
        let err = parse_file("e.toml", text)
            .and_then(|f| validate("e.toml", &f, &|_| None).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `push.collection`"), "{err}");
    }

    #[test]
    fn pagination_fields_their_type_does_not_use_are_refused() {
        let check = |paging: &str| {
            let text = format!("name = \"p\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[source.pagination]\n{paging}\n[mapping.productId]\npath = \"$.id\"\n");
            let file = parse_file("p.toml", &text).unwrap();
            // A stored config is loaded for its runs whatever it holds.
            validate("p.toml", &file, &|_| None).unwrap();
            unused_paging_fields(&file.source.pagination)
                .map_err(|(field, expected)| format!("field `{field}`: expected {expected}"))
        };
        for ok in [
            "type = \"page\"\nsize = 50\npage_param = \"p\"\nmax_pages = 9",
            "type = \"offset\"\nsize = 50\noffset_param = \"skip\"\ntotal_path = \"$.total\"",
            "type = \"cursor\"\ncursor_path = \"$.meta.next\"\nhas_more_path = \"$.more\"",
            "type = \"next_url\"\nnext_path = \"$.links.next\"",
            "type = \"link_header\"\nhas_more_path = \"$.more\"",
            "",
        ] {
            assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
        }
        for (paging, field, says) in [
            (
                "type = \"cursor\"\nsize = 4",
                "source.pagination.size",
                "`?limit=100`",
            ),
            (
                "type = \"offset\"\npage_param = \"p\"",
                "source.pagination.page_param",
                "it takes `offset_param`",
            ),
            (
                "size = 5\noffset_param = \"o\"",
                "source.pagination.size",
                "a run fetches one page",
            ),
            (
                "type = \"link_header\"\ncursor_param = \"c\"",
                "source.pagination.cursor_param",
                "type = \"link_header\"",
            ),
            (
                "type = \"cursor\"\ntotal_header = \"X-Total\"",
                "source.pagination.total_header",
                "it takes `cursor_path`",
            ),
        ] {
            let err = check(paging).unwrap_err().to_string();
            assert!(
                err.contains(&format!("field `{field}`")) && err.contains(says),
                "{paging}: {err}"
            );
        }
    }

    #[test]
    fn an_import_into_users_maps_none_of_the_visitor_s_aggregates() {
        let import = |target: &str| {
            format!("name = \"x\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[target]\ncollection = \"users\"\nkey = \"visitorId\"\n[mapping.visitorId]\npath = \"$.id\"\n[mapping.\"{target}\"]\npath = \"$.n\"\n")
        };
        let check = |text: String| {
            parse_file("t.toml", &text).and_then(|f| validate("t", &f, &|_| None).map(|_| ()))
        };
        for owned in ["totalEvents", "totalRevenueMicros", "firstSeen", "traitsAt"] {
            let err = check(import(owned)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("mapping.{owned}"))
                    && err.contains("the visitor's aggregates"),
                "{owned}: {err}"
            );
        }
        for free in ["plan", "totalEventsInCrm", "email"] {
            check(import(free)).unwrap_or_else(|e| panic!("{free}: {e}"));
        }
    }

    #[test]
    fn sluices_own_collections_are_no_import_target_or_export_source() {
        let import = |coll: &str| {
            format!("name = \"x\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example/x\"\n[target]\ncollection = \"{coll}\"\nkey = \"id\"\n[mapping.id]\npath = \"$.id\"\n")
        };
        let push = |coll: &str, filter: &str| {
            format!("name = \"y\"\ntype = \"EXPORT\"\nendpoint = \"https://api.example/y\"\n[push]\ncollection = \"{coll}\"\n{filter}\n[mapping.id]\npath = \"$._id\"\n")
        };
        let check = |text: String| {
            parse_file("t.toml", &text).and_then(|f| validate("t", &f, &|_| None).map(|_| ()))
        };
        for coll in ["admin_tokens", "admin_users", "oauth_tokens", "sessions"] {
            let err = check(import(coll)).unwrap_err().to_string();
            assert!(err.contains("Sluice's own"), "{coll}: {err}");
            let err = check(push(coll, "")).unwrap_err().to_string();
            assert!(err.contains("Sluice's own"), "{coll}: {err}");
        }
        // A filter that does not convert is refused, not widened to every document.
        let err = check(push(
            "contacts",
            "filter = '{\"accountId\": 18446744073709551615}'",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("push.filter"), "{err}");
        // Nor may it run JavaScript on the server, at any depth.
        for js in [
            r#"{"$where": "sleep(100) || true"}"#,
            r#"{"$and": [{"a": 1}, {"$expr": {"$function": {"body": "f", "args": [], "lang": "js"}}}]}"#,
        ] {
            let err = push_filter(js).unwrap_err();
            assert!(err.contains("JavaScript"), "{err}");
        }
        let date =
            push_filter(r#"{"updatedAt": {"$gte": {"$date": "2026-01-01T00:00:00Z"}}}"#).unwrap();
        assert!(matches!(
            date.get_document("updatedAt").unwrap().get("$gte"),
            Some(bson::Bson::DateTime(_))
        ));
    }

    #[test]
    fn urls_whose_host_clients_read_differently_are_refused() {
        for bad in [
            "http://169.254.169.254\\@api.example.com/latest/",
            "http://api.example.com\\path",
            "https://user:secret@api.example.com/x",
            "https://10.0.0.1@api.example.com/",
            // Hosts a client decodes or maps to another before connecting.
            "http://%31%32%37.0.0.1:8080/x",
            "http://%69nternal.test/items",
            "http://\u{ff49}nternal.test/x",
            "http://\u{ff4c}ocalhost/x",
            "http://[::1%25eth0]/x",
            // Characters a client drops from a URL.
            "http://127.0.0\t.1/x",
            "http://api.example.com/a\nb",
            " http://127.0.0.1/x",
        ] {
            assert!(url_lite::parse(bad).is_err(), "{bad}");
        }
        let ok = url_lite::parse("https://api.example.com:8443/v1?q=a@b").unwrap();
        assert_eq!((ok.host.as_str(), ok.port), ("api.example.com", 8443));
        // Compared as clients read it: in lower case.
        let upper = url_lite::parse("https://API.Example.com/v1").unwrap();
        assert_eq!(upper.host, "api.example.com");
        let v6 = url_lite::parse("http://[2001:db8::1]:8080/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 8080));
        let xn = url_lite::parse("https://xn--bcher-kva.example/x%20y?q=%41").unwrap();
        assert_eq!(xn.host, "xn--bcher-kva.example");
    }

    const FILE: &str = r#"
name = "shop-products"
type = "IMPORT"
endpoint = "https://api.shop.example/products"
schedule = "0 */15 * * * *"

[auth]
type = "OAUTH"
token_url = "https://auth.shop.example/token"
client_id = "sluice"
client_secret = "${env:SHOP_SECRET}"

[source]
records = "$.data[*]"
[source.pagination]
type = "cursor"
cursor_path = "$.meta.next"

[target]
collection = "products"
key = "productId"

[mapping.productId]
path = "$.id"
type = "string"
required = true

[mapping.price]
path = "$.price.amount"
type = "number"
default = 0

[mapping.inStock]
path = "$.stock.available"
type = "bool"
"#;

    fn env(k: &str) -> Option<String> {
        (k == "SHOP_SECRET").then(|| "s3cr3t".to_string())
    }

    #[test]
    fn a_complete_file_validates() {
        let file = parse_file("shop.toml", FILE).unwrap();
        let c = validate("shop.toml", &file, &env).unwrap();
        assert_eq!(c.kind, IntegrationType::Import);
        assert_eq!(
            c.paging,
            Paging::Cursor {
                path: "$.meta.next".into(),
                param: "cursor".into()
            }
        );
        assert!(
            matches!(c.auth, Auth::OAuth { ref client_secret, .. } if client_secret.expose() == "s3cr3t")
        );
        assert_eq!(c.endpoint.port, 443);
    }

    #[test]
    fn credentials_in_a_query_are_told_from_cursors() {
        for (url, found) in [
            ("https://a.example/x?api_key=1", Some("api_key")),
            ("https://a.example/x?page=2&ApiKey=1", Some("ApiKey")),
            (
                "https://a.example/x?access_token=1#frag",
                Some("access_token"),
            ),
            ("https://a.example/x?sig=abc&expires=1", Some("sig")),
            ("https://a.example/x?client_secret=s", Some("client_secret")),
            ("https://a.example/x?page_token=abc&next_token=d", None),
            ("https://a.example/x?keyword=shoes&monkey=1", None),
            ("https://a.example/x", None),
        ] {
            assert_eq!(credential_in_query(url).as_deref(), found, "{url}");
        }
    }

    #[test]
    fn credential_headers_are_env_references_resolved_at_validation() {
        let with = |headers: &str| {
            let text = FILE.replacen(
                "endpoint = \"https://api.shop.example/products\"",
                &format!("endpoint = \"https://api.shop.example/products\"\nheaders = {headers}"),
                1,
            );
            validate("shop.toml", &parse_file("shop.toml", &text).unwrap(), &env)
        };
        let c = with(r#"{ X-Token = "${env:SHOP_SECRET}", Accept = "application/json" }"#).unwrap();
        assert!(c.headers.contains(&("X-Token".into(), "s3cr3t".into())));
        assert!(c
            .headers
            .contains(&("Accept".into(), "application/json".into())));
        for literal in [
            r#"{ Authorization = "Bearer abc" }"#,
            r#"{ X-Api-Key = "abc" }"#,
        ] {
            let err = with(literal).unwrap_err().to_string();
            assert!(
                err.contains("field `headers.") && err.contains("${env:NAME}"),
                "{err}"
            );
        }
        let err = with(r#"{ X-Token = "${env:NOT_SET}" }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOT_SET"), "{err}");
        // Names and values that cannot be sent are refused here, not at every request;
        // a bad secret is described, never shown.
        let err = with(r#"{ "X Api Key" = "1" }"#).unwrap_err().to_string();
        assert!(err.contains("headers.X Api Key"), "{err}");
        let bad_secret = |k: &str| match k {
            "NL" => Some("tok\n".to_string()),
            _ => env(k),
        };
        let text = FILE.replacen(
            "endpoint = \"https://api.shop.example/products\"",
            "endpoint = \"https://api.shop.example/products\"\nheaders = { X-Token = \"${env:NL}\" }",
            1,
        );
        let err = validate(
            "shop.toml",
            &parse_file("shop.toml", &text).unwrap(),
            &bad_secret,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("trailing newline") && !err.contains("tok"),
            "{err}"
        );
    }

    #[test]
    fn methods_and_rates_that_would_be_ignored_or_overflow_are_refused() {
        let check = |from: &str, to: &str| {
            let text = FILE.replacen(from, to, 1);
            validate("f", &parse_file("f", &text).unwrap(), &env).map(|_| ())
        };
        let endpoint = "endpoint = \"https://api.shop.example/products\"";
        let err = check(endpoint, &format!("{endpoint}\nmethod = \"POST\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`method`") && err.contains("GET"), "{err}");
        let err = check("[source]", "[source]\nrate_limit_per_second = 1e-20")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rate_limit_per_second"), "{err}");
        assert!(check("[source]", "[source]\nrate_limit_per_second = 0.5").is_ok());
        // Retries, timeouts and the page cap are bounded: a typo must not hold a run for
        // days, retry with no pause, or read a page the process cannot hold.
        for (set, field) in [
            ("max_page_mb = 0", "source.max_page_mb"),
            ("max_page_mb = 4096", "source.max_page_mb"),
            ("timeout_seconds = 86400", "source.timeout_seconds"),
            (
                "[source.retry]\nmax_attempts = 1000000",
                "source.retry.max_attempts",
            ),
            (
                "[source.retry]\ninitial_backoff_ms = 0",
                "source.retry.initial_backoff_ms",
            ),
            (
                "[source.retry]\nmax_backoff_ms = 604800000",
                "source.retry.max_backoff_ms",
            ),
            (
                "[source.retry]\ninitial_backoff_ms = 500\nmax_backoff_ms = 100",
                "source.retry.max_backoff_ms",
            ),
        ] {
            let err = if set.starts_with("[source.retry]") {
                check("[target]", &format!("{set}\n[target]"))
            } else {
                check("[source]", &format!("[source]\n{set}"))
            }
            .unwrap_err()
            .to_string();
            assert!(err.contains(field), "{set}: {err}");
        }
        assert!(check("[source]", "[source]\nmax_page_mb = 512").is_ok());
        // An EXPORT sends a body: POST by default, GET refused.
        let push = "name = \"p\"\ntype = \"EXPORT\"\nendpoint = \"https://x.example/in\"\n[push]\ncollection = \"users\"\n";
        let c = validate("p", &parse_file("p", push).unwrap(), &env).unwrap();
        assert_eq!(c.method, HttpMethod::Post);
        let push = push.replace("[push]", "method = \"GET\"\n[push]");
        let err = validate("p", &parse_file("p", &push).unwrap(), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`method`") && err.contains("POST"), "{err}");
        // A batch of 0 would read the collection whole (no limit) into one request.
        for size in [0, 10_001] {
            let sized = push.replace(
                "collection = \"users\"",
                &format!("collection = \"users\"\nbatch_size = {size}"),
            );
            let sized = sized.replace("method = \"GET\"\n", "");
            let err = validate("p", &parse_file("p", &sized).unwrap(), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("push.batch_size"), "{size}: {err}");
        }
        for mb in [0, 257] {
            let sized = push.replace(
                "collection = \"users\"",
                &format!("collection = \"users\"\nmax_batch_mb = {mb}"),
            );
            let sized = sized.replace("method = \"GET\"\n", "");
            let err = validate("p", &parse_file("p", &sized).unwrap(), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("push.max_batch_mb"), "{mb}: {err}");
        }
    }

    #[test]
    fn target_collections_and_rates_are_checked() {
        for (from, to, field) in [
            (
                "collection = \"products\"",
                "collection = \"\"",
                "target.collection",
            ),
            (
                "collection = \"products\"",
                "collection = \"system.profile\"",
                "target.collection",
            ),
            (
                "collection = \"products\"",
                "collection = \"a$b\"",
                "target.collection",
            ),
        ] {
            let bad = FILE.replacen(from, to, 1);
            assert_ne!(bad, FILE, "{from}");
            let err = validate("f", &parse_file("f", &bad).unwrap(), &env).unwrap_err();
            assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        }
    }

    #[test]
    fn what_would_only_fail_at_run_time_is_refused_at_validation() {
        let price = "[mapping.price]\npath = \"$.price.amount\"\ntype = \"number\"\ndefault = 0";
        for (from, to, field) in [
            (
                price,
                "[mapping.price]\npath = \"$.price.amount\"\ntype = \"number\"\ndefault = \"abc\"",
                "mapping.price.default",
            ),
            (
                "[target]",
                "[incremental]\ncursor_field = \"updatedAt\"\nparam = \"since\"\n[target]",
                "incremental.cursor_field",
            ),
            (
                "[target]",
                "[push]\ncollection = \"users\"\n[target]",
                "push",
            ),
            (
                "[target]",
                "[mapping.createdAt]\npath = \"$.created\"\n[target]",
                "mapping.createdAt",
            ),
            (
                "cursor_path = \"$.meta.next\"",
                "cursor_path = \"$.meta.next\"\nsize = 0",
                "source.pagination.size",
            ),
        ] {
            let bad = FILE.replacen(from, to, 1);
            assert_ne!(bad, FILE, "{from}");
            let err = validate("f", &parse_file("f", &bad).unwrap(), &env).unwrap_err();
            assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        }
    }

    #[test]
    fn an_export_config_refuses_the_sections_only_an_import_reads() {
        let push = include_str!("../../examples/integrations/crm-push.toml");
        let env = |name: &str| (name == "CRM_API_KEY").then(|| "k".to_string());
        validate("p", &parse_file("p", push).unwrap(), &env).unwrap();
        for (extra, field) in [
            ("[target]\ncollection = \"crm\"\n", "target"),
            (
                "[incremental]\ncursor_field = \"updatedAt\"\nparam = \"since\"\n",
                "incremental",
            ),
        ] {
            let bad = format!("{push}\n{extra}");
            let err = validate("p", &parse_file("p", &bad).unwrap(), &env).unwrap_err();
            assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        }
        // What earlier versions stored for every EXPORT (the default target) still loads.
        let stored = format!("{push}\n[target]\ncollection = \"products\"\n");
        validate("p", &parse_file("p", &stored).unwrap(), &env).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let bad = FILE.replace("type = \"cursor\"", "type = \"scroll\"");
        let err = validate("shop.toml", &parse_file("shop.toml", &bad).unwrap(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("shop.toml: field `source.pagination.type`"),
            "{err}"
        );
        let bad = FILE.replace("path = \"$.price.amount\"", "path = \"price[\"");
        let err = validate("shop.toml", &parse_file("shop.toml", &bad).unwrap(), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`mapping.price.path`"), "{err}");
        let err = validate(
            "shop.toml",
            &parse_file("shop.toml", FILE).unwrap(),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`auth.client_secret`") && err.contains("SHOP_SECRET"),
            "{err}"
        );
        let err = parse_file("shop.toml", &FILE.replace("schedule", "schedul"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedul"), "{err}");
    }

    #[test]
    fn list_fields_keep_every_match_and_single_fields_note_that_they_kept_one() {
        let text = format!(
            "{FILE}\n[mapping.skus]\npath = \"$.items[*].sku\"\ntype = \"string\"\nlist = true\n[mapping.firstSku]\npath = \"$.items[*].sku\"\n[mapping.tags]\npath = \"$.tags\"\nlist = true\n[mapping.counts]\npath = \"$.counts\"\ntype = \"integer\"\nlist = true\n"
        );
        let c = validate("f", &parse_file("f", &text).unwrap(), &env).unwrap();
        let record = json!({
            "id": 1, "items": [{ "sku": "a" }, { "sku": 2 }], "tags": "solo", "counts": [1, "x"],
        });
        let mut several = Vec::new();
        let err = map_record_noting(&c.fields, &record, &mut several).unwrap_err();
        assert!(
            err.contains("`counts`") && err.contains("(item 1)"),
            "{err}"
        );
        let record = json!({ "id": 1, "items": [{ "sku": "a" }, { "sku": 2 }], "tags": "solo" });
        let doc = map_record_noting(&c.fields, &record, &mut several).unwrap();
        let strings = |v: &[&str]| {
            v.iter()
                .map(|s| Bson::String(s.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(doc.get_array("skus").unwrap(), &strings(&["a", "2"]));
        assert_eq!(doc.get_str("firstSku").unwrap(), "a");
        assert_eq!(
            doc.get_array("tags").unwrap(),
            &strings(&["solo"]),
            "a single value is a list of one"
        );
        let [noted] = &several[..] else {
            panic!("firstSku alone matched two values: {several:?}")
        };
        assert_eq!((noted.target.as_str(), noted.matches), ("firstSku", 2));
        assert!(noted.to_string().contains("list = true"), "{noted}");
        // No match at all is a missing field, not an empty list.
        let doc = map_record(&c.fields, &json!({ "id": 2 })).unwrap();
        assert!(
            !doc.contains_key("skus") && !doc.contains_key("tags"),
            "{doc}"
        );
        // Nor is `null` where the list would be; nulls inside a list are left out.
        let record = json!({ "id": 3, "tags": null, "counts": [null, 4], "items": [{ "sku": null }, { "sku": "b" }] });
        let doc = map_record(&c.fields, &record).unwrap();
        assert!(!doc.contains_key("tags"), "{doc}");
        assert_eq!(doc.get_array("skus").unwrap(), &strings(&["b"]));
        assert_eq!(doc.get_array("counts").unwrap(), &vec![Bson::Int64(4)]);
        let doc = map_record(&c.fields, &json!({ "id": 4, "tags": [null] })).unwrap();
        assert!(!doc.contains_key("tags"), "{doc}");
    }

    #[test]
    fn mapping_coerces_defaults_and_rejects_with_a_reason() {
        let c = validate("f", &parse_file("f", FILE).unwrap(), &env).unwrap();
        let doc = map_record(
            &c.fields,
            &json!({ "id": 42, "price": { "amount": "19.90" }, "stock": { "available": 1 } }),
        )
        .unwrap();
        assert_eq!(doc.get_str("productId").unwrap(), "42");
        assert_eq!(doc.get_f64("price").unwrap(), 19.9);
        assert!(doc.get_bool("inStock").unwrap());
        let doc = map_record(&c.fields, &json!({ "id": "a" })).unwrap();
        assert_eq!(
            doc.get_f64("price").unwrap(),
            0.0,
            "default applied, coerced to the type"
        );
        assert!(!doc.contains_key("inStock"));
        let err = map_record(&c.fields, &json!({ "price": { "amount": 3 } })).unwrap_err();
        assert!(err.contains("required field `productId`"), "{err}");
        let err = map_record(
            &c.fields,
            &json!({ "id": "a", "price": { "amount": "cheap" } }),
        )
        .unwrap_err();
        assert!(err.contains("`price`") && err.contains("a number"), "{err}");
        // Every field that fails is said, not the first only.
        let err = map_record(&c.fields, &json!({ "price": { "amount": "cheap" } })).unwrap_err();
        assert!(
            err.contains("required field `productId`") && err.contains("`price`"),
            "{err}"
        );
    }

    #[test]
    fn epoch_dates_follow_the_unit_and_bad_units_are_refused() {
        let with = |extra: &str| {
            let text =
                format!("{FILE}\n[mapping.seen]\npath = \"$.seen\"\ntype = \"date\"\n{extra}");
            validate("f", &parse_file("f", &text).unwrap(), &env)
        };
        let seen = |c: &Connector, v: Value| {
            map_record(&c.fields, &json!({ "id": 1, "seen": v }))
                .map(|d| d.get_datetime("seen").unwrap().timestamp_millis())
        };
        let ms = with("").unwrap();
        assert_eq!(
            seen(&ms, json!(1_700_000_000_123i64)),
            Ok(1_700_000_000_123)
        );
        let digits = seen(&ms, json!("1700000000")).unwrap_err();
        assert!(
            digits.contains("unit = \"seconds\""),
            "digits need a unit: {digits}"
        );
        let spaced = seen(&ms, json!("2025-01-01 10:06:00")).unwrap_err();
        assert!(spaced.contains("%Y-%m-%d %H:%M:%S"), "{spaced}");
        // Fractions of a millisecond, as a number or digits, cut to the millisecond.
        assert_eq!(
            seen(&ms, json!(1_735_726_020_123.5f64)),
            Ok(1_735_726_020_123)
        );
        let explicit = with("unit = \"milliseconds\"").unwrap();
        assert_eq!(
            seen(&explicit, json!("1735726020123.9")),
            Ok(1_735_726_020_123)
        );
        let s = with("unit = \"seconds\"").unwrap();
        assert_eq!(seen(&s, json!(1_700_000_000)), Ok(1_700_000_000_000));
        assert_eq!(seen(&s, json!(1_700_000_000.25)), Ok(1_700_000_000_250));
        // Float error in seconds times 1000 does not cut a millisecond off.
        assert_eq!(seen(&s, json!(1_735_726_020.123)), Ok(1_735_726_020_123));
        assert_eq!(seen(&s, json!("1700000000")), Ok(1_700_000_000_000));
        assert_eq!(
            seen(&s, json!({ "$date": { "$numberLong": "1700000000123" } })),
            Ok(1_700_000_000_123),
            "MongoDB's own dates are milliseconds whatever the unit"
        );
        assert_eq!(
            seen(&s, json!("2023-11-14T22:13:20Z")),
            Ok(1_700_000_000_000)
        );
        // `auto`: one field taking both, as numbers or digits.
        let auto = with("unit = \"auto\"").unwrap();
        assert_eq!(seen(&auto, json!(1_700_000_000)), Ok(1_700_000_000_000));
        assert_eq!(seen(&auto, json!("1700000000.5")), Ok(1_700_000_000_500));
        assert_eq!(
            seen(&auto, json!(1_700_000_000_123i64)),
            Ok(1_700_000_000_123)
        );
        assert_eq!(seen(&auto, json!("1700000000123")), Ok(1_700_000_000_123));
        // The boundary: 10^11 is milliseconds (March 1973), just below it seconds.
        assert_eq!(seen(&auto, json!(100_000_000_000i64)), Ok(100_000_000_000));
        assert_eq!(
            seen(&auto, json!(99_999_999_999i64)),
            Ok(99_999_999_999_000)
        );
        // Not on an incremental cursor, which goes back to the API in one unit.
        let text = format!(
            "{FILE}\n[mapping.seen]\npath = \"$.seen\"\ntype = \"date\"\nunit = \"auto\"\n"
        )
        .replace(
            "[target]",
            "[incremental]\ncursor_field = \"seen\"\nparam = \"since\"\n[target]",
        );
        let err = validate("f", &parse_file("f", &text).unwrap(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mapping.seen.unit") && err.contains("not `auto`"),
            "{err}"
        );
        assert!(seen(&s, json!(1e300)).is_err(), "out of a date's range");
        let explicit_ms = with("unit = \"milliseconds\"").unwrap();
        assert_eq!(
            seen(&explicit_ms, json!("1700000000123")),
            Ok(1_700_000_000_123)
        );

        let field = |c: &Connector| {
            c.fields
                .iter()
                .find(|f| f.target == "seen")
                .unwrap()
                .clone()
        };
        let record = json!({ "seen": 1_700_000_000 });
        assert!(suspect_epoch_seconds(&field(&ms), &record).is_some());
        assert!(suspect_epoch_seconds(&field(&explicit_ms), &record).is_none());
        assert!(
            suspect_epoch_seconds(&field(&ms), &json!({ "seen": 1_700_000_000_000i64 })).is_none()
        );

        for (extra, expected) in [
            ("unit = \"minutes\"", "`milliseconds`, `seconds` or `auto`"),
            ("on_missing = \"drop\"", "`keep` or `unset`"),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(
                err.contains("mapping.seen") && err.contains(expected),
                "{err}"
            );
        }
        let formatted = with("format = \"%Y-%m-%d %H:%M:%S\"").unwrap();
        assert_eq!(
            seen(&formatted, json!("2023-11-14 22:13:20")),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            seen(&formatted, json!("2023-11-14T22:13:20Z")),
            Ok(1_700_000_000_000),
            "RFC 3339 is still read"
        );
        let err = seen(&formatted, json!("14/11/2023")).unwrap_err();
        assert!(err.contains("%Y-%m-%d %H:%M:%S"), "{err}");
        let offset = with("format = \"%d/%m/%Y %H:%M %z\"").unwrap();
        assert_eq!(
            seen(&offset, json!("14/11/2023 23:13 +0100")),
            Ok(1_700_000_000_000 - 20_000)
        );
        let day = with("format = \"%d.%m.%Y\"").unwrap();
        assert_eq!(seen(&day, json!("14.11.2023")), Ok(1_699_920_000_000));
        assert_eq!(
            format_date(
                bson::DateTime::from_millis(1_700_000_000_000),
                "%Y-%m-%d %H:%M:%S"
            ),
            "2023-11-14 22:13:20"
        );
        for (format, expected) in [
            ("%Y-%m-%", "valid strftime"),
            ("%H:%M", "whole date"),
            ("%Y-%m-%d %H:%M:%S %Z", "numeric offset"),
        ] {
            let err = with(&format!("format = \"{format}\""))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("mapping.seen.format") && err.contains(expected),
                "{err}"
            );
        }
        let err = with("unit = \"seconds\"\nformat = \"%Y%m%d\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mapping.seen.unit") && err.contains("not both"),
            "{err}"
        );
        let text = format!("{FILE}\n[mapping.seen]\npath = \"$.seen\"\nunit = \"seconds\"\n");
        let err = validate("f", &parse_file("f", &text).unwrap(), &env).unwrap_err();
        assert!(err.to_string().contains("mapping.seen.unit"), "{err}");
    }

    #[test]
    fn a_top_level_field_below_a_section_gets_a_hint() {
        let late = format!("{FILE}schedule = \"0 0 * * * *\"\n");
        let err = parse_file("f", &late).unwrap_err().to_string();
        assert!(
            err.contains("unknown field `schedule`")
                && err.contains("write it above the first `[section]`"),
            "{err}"
        );
        // An unknown field that is no top-level one gets none.
        let other = format!("{FILE}colour = \"red\"\n");
        let err = parse_file("f", &other).unwrap_err().to_string();
        assert!(!err.contains("above the first"), "{err}");
    }

    #[test]
    fn on_missing_and_lookback_are_refused_where_they_cannot_work() {
        let refused = |text: String, field: &str| {
            let err = validate("f", &parse_file("f", &text).unwrap(), &env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        };
        // The upsert key (made optional so only the key rule applies).
        refused(
            FILE.replace(
                "type = \"string\"\nrequired = true",
                "type = \"string\"\non_missing = \"unset\"",
            ),
            "mapping.productId.on_missing",
        );
        refused(
            FILE.replace(
                "type = \"string\"\nrequired = true",
                "type = \"string\"\nlist = true",
            ),
            "mapping.productId.list",
        );
        // Into `events`, whose stored events are never updated.
        let events = FILE
            .replace("collection = \"products\"\nkey = \"productId\"", "collection = \"events\"\nkey = \"eventId\"")
            .replace("[mapping.productId]", "[mapping.eventId]")
            + "[mapping.userId]\npath = \"$.u\"\n[mapping.eventType]\npath = \"$.t\"\n[mapping.note]\npath = \"$.n\"\non_missing = \"unset\"\n";
        refused(events, "mapping.note.on_missing");
        // A lookback needs a date cursor, and at most a year.
        let cursor = |kind: &str, lookback: u64| {
            FILE.replace("[target]", &format!("[incremental]\ncursor_field = \"seen\"\nparam = \"since\"\nlookback_seconds = {lookback}\n[target]"))
                + &format!("[mapping.seen]\npath = \"$.seen\"\ntype = \"{kind}\"\n")
        };
        refused(cursor("integer", 60), "incremental.lookback_seconds");
        refused(cursor("date", 400 * 86_400), "incremental.lookback_seconds");
        assert!(validate("f", &parse_file("f", &cursor("date", 60)).unwrap(), &env).is_ok());
    }

    #[test]
    fn numbers_are_never_clamped_or_rounded_into_another_key() {
        let typed = |kind: &str| {
            let text = FILE.replacen(
                "path = \"$.id\"\ntype = \"string\"",
                &format!("path = \"$.id\"\ntype = \"{kind}\""),
                1,
            );
            validate("f", &parse_file("f", &text).unwrap(), &env).unwrap()
        };
        let c = typed("integer");
        let exact = map_record(&c.fields, &json!({ "id": 9_007_199_254_740_993u64 })).unwrap();
        assert_eq!(exact.get_i64("productId").unwrap(), 9_007_199_254_740_993);
        // Text: an integer, or a whole decimal as the number `12.0` is; nothing else.
        for (text, n) in [
            (" 12 ", 12),
            ("12.00", 12),
            ("-3.0", -3),
            ("9007199254740993.0", 9_007_199_254_740_993),
        ] {
            let d = map_record(&c.fields, &json!({ "id": text })).unwrap();
            assert_eq!(d.get_i64("productId").unwrap(), n, "{text}");
        }
        for text in ["12.50", "12.", ".0", "1e3", "12.0x"] {
            assert!(
                map_record(&c.fields, &json!({ "id": text })).is_err(),
                "{text}"
            );
        }
        for big in [
            json!(10_000_000_000_000_000_000u64),
            json!(u64::MAX),
            json!(1e19),
            json!(1e17),
        ] {
            let err = map_record(&c.fields, &json!({ "id": big })).unwrap_err();
            assert!(err.contains("64-bit"), "{big}: {err}");
        }
        let c = typed("any");
        for big in [
            json!(10_000_000_000_000_000_001u64),
            json!({ "n": [u64::MAX] }),
        ] {
            let err = map_record(&c.fields, &json!({ "id": big })).unwrap_err();
            assert!(err.contains("64-bit"), "{big}: {err}");
        }
        assert!(map_record(&c.fields, &json!({ "id": i64::MAX })).is_ok());
        // `string` keeps whole numbers exact up to 2^64; beyond, the JSON reader has
        // rounded them already, so they are refused rather than stored as other digits.
        let c = typed("string");
        let exact = map_record(&c.fields, &json!({ "id": u64::MAX })).unwrap();
        assert_eq!(exact.get_str("productId").unwrap(), "18446744073709551615");
        let read: Value = serde_json::from_str(r#"{"id": 123456789012345678901234}"#).unwrap();
        let err = map_record(&c.fields, &read).unwrap_err();
        assert!(err.contains("as strings"), "{err}");
        // Below -2^63 too (read as a double, its text would be `-9.223372036854776e18`).
        let exact = map_record(&c.fields, &json!({ "id": i64::MIN })).unwrap();
        assert_eq!(exact.get_str("productId").unwrap(), "-9223372036854775808");
        let read: Value = serde_json::from_str(r#"{"id": -9223372036854775809}"#).unwrap();
        let err = map_record(&c.fields, &read).unwrap_err();
        assert!(err.contains("as strings"), "{err}");
        let c = typed("any");
        let err =
            map_record(&c.fields, &json!({ "id": 1, "price": { "amount": "NaN" } })).unwrap_err();
        assert!(err.contains("finite"), "{err}");
    }

    #[test]
    fn records_are_selected_by_jsonpath() {
        let body = json!({ "data": [{ "id": 1 }, { "id": 2 }], "meta": { "next": "abc" } });
        assert_eq!(select_records(&body, "$.data[*]").unwrap().len(), 2);
        assert_eq!(first(&body, "$.meta.next"), Some(json!("abc")));
        assert_eq!(select_records(&json!([1, 2, 3]), "$[*]").unwrap().len(), 3);
    }

    #[test]
    fn a_records_path_into_nothing_is_told_from_an_empty_page() {
        let wrong = json!({"items": [{"id": 1}], "total": 1});
        let miss = records_miss(&wrong, "$.data[*]").expect("`data` is absent");
        assert!(
            miss.contains("no `$.data`") && miss.contains("items, total"),
            "{miss}"
        );
        assert!(records_miss(&json!({"data": []}), "$.data[*]").is_none());
        assert!(records_miss(&json!({"data": null}), "$.data[*]").is_none());
        assert!(records_miss(&json!({"a": {"b": []}}), "$.a.b[*]").is_none());
        assert!(records_miss(&json!({"a": {}}), "$.a.b[*]").is_some());
        assert!(
            records_miss(&json!({"a": {}}), "$.a.b").is_none(),
            "parent `$.a` exists"
        );
        assert!(
            records_miss(&json!([]), "$[*]").is_none(),
            "root always exists"
        );
        assert!(records_miss(&json!({"x": 1}), "$..items[*]").is_some());
        assert!(records_miss(&json!({"x": 1}), "$..items").is_none());
        assert!(
            records_miss(&Value::Null, "$.data[*]").is_none(),
            "an empty body"
        );
        assert_eq!(parent_path("$.data[?(@.active == true)]"), Some("$.data"));
        assert_eq!(parent_path("$['data'][*]"), Some("$['data']"));
    }

    #[test]
    fn a_list_place_holding_an_error_is_not_read_as_records() {
        let error = json!({"error": "quota exceeded", "code": 429});
        let miss = records_not_a_list(&error, "$[*]").expect("an error object");
        assert!(
            miss.contains("body is an object (its keys: error, code)"),
            "{miss}"
        );
        // An error's details as an object look like an object of records keyed by id.
        let nested = json!({"error": {"code": 429, "message": "quota exceeded"}});
        let miss = records_not_a_list(&nested, "$[*]").expect("an error object");
        assert!(miss.contains("its keys: error"), "{miss}");
        assert!(records_not_a_list(&json!({"a1": {"id": 1}}), "$[*]").is_none());
        let miss = records_not_a_list(&json!({"data": "down"}), "$.data[*]").expect("scalar");
        assert!(miss.contains("`$.data` is `\"down\"`"), "{miss}");
        for fine in [
            json!([]),
            json!({"data": []}),
            json!({"data": null}),
            json!({"a": {"id": 1}, "b": {"id": 2}}),
        ] {
            let path = if fine.is_array() { "$[*]" } else { "$.data[*]" };
            assert!(records_not_a_list(&fine, path).is_none(), "{fine}");
        }
        // Not a plain chain ending in [*], or nothing there: for records_miss to judge.
        assert!(records_not_a_list(&json!({"data": 1}), "$.data").is_none());
        assert!(records_not_a_list(&json!({}), "$.data[*]").is_none());
    }

    /// An untyped mapping field at `path`, as validation builds it.
    fn field(path: &str, list: bool) -> Field {
        Field {
            target: "t".into(),
            path: path.into(),
            query: jsonpath_rust::parser::parse_json_path(path).unwrap(),
            members: member_chain(path),
            kind: FieldType::Any,
            required: false,
            default: None,
            list,
            epoch_unit: EpochUnit::Milliseconds,
            unit_given: false,
            unset_missing: false,
            date_format: None,
        }
    }

    #[test]
    fn plain_member_paths_take_the_fast_lookup_with_the_engines_results() {
        assert_eq!(
            member_chain("$.a.b_c.d2"),
            Some(vec!["a".into(), "b_c".into(), "d2".into()])
        );
        for complex in [
            "$.a[0]",
            "$['a b']",
            "$..a",
            "$.a.*",
            "$.1a",
            "a.b",
            "$.a[?@.x]",
            "$.d-e",
        ] {
            assert_eq!(member_chain(complex), None, "{complex}");
        }
        let record = json!({
            "id": 7, "name": "n", "price": { "amount": "1.5", "tax": null },
            "tags": ["x"], "deep": { "a": { "b": { "c": true } } }, "weird-key": 1
        });
        for path in [
            "$.id",
            "$.name",
            "$.price.amount",
            "$.price.tax",
            "$.price.missing",
            "$.tags",
            "$.deep.a.b.c",
            "$.deep.a.b.c.d",
            "$.name.inner",
            "$.missing",
            "$",
        ] {
            let fast = field(path, false);
            assert!(fast.members.is_some(), "{path}");
            for list in [false, true] {
                let fast = Field {
                    list,
                    ..fast.clone()
                };
                let engine = Field {
                    members: None,
                    ..fast.clone()
                };
                assert_eq!(
                    lookup(&fast, &record),
                    lookup(&engine, &record),
                    "{path} list={list}"
                );
            }
        }
        // A bracketed name is one value too: as a list, the list found there is the list.
        let list = |path: &str| lookup(&field(path, true), &record);
        assert_eq!(list("$['tags']"), Some(json!(["x"])));
        assert_eq!(list("$['weird-key']"), Some(json!([1])));
        // A wildcard finds each item: the items, not the list.
        assert_eq!(list("$.tags[*]"), Some(json!(["x"])));
        assert_eq!(list("$..c"), Some(json!([true])));
    }

    #[test]
    fn typed_fields_read_the_extended_json_an_export_maps_from() {
        let field = |kind: FieldType| Field {
            kind,
            ..field("$.v", false)
        };
        let at = bson::DateTime::from_millis(1_764_000_000_123);
        let cases = [
            (
                FieldType::Date,
                json!({ "$date": "2025-11-24T16:00:00.123Z" }),
                Bson::DateTime(at),
            ),
            (
                FieldType::Date,
                json!({ "$date": { "$numberLong": "1764000000123" } }),
                Bson::DateTime(at),
            ),
            (
                FieldType::String,
                json!({ "$oid": "65a1b2c3d4e5f60718293a4b" }),
                Bson::String("65a1b2c3d4e5f60718293a4b".into()),
            ),
            (
                FieldType::Integer,
                json!({ "$numberLong": "9007199254740993" }),
                Bson::Int64(9_007_199_254_740_993),
            ),
            (
                FieldType::Number,
                json!({ "$numberDecimal": "12.50" }),
                Bson::Double(12.5),
            ),
            (
                FieldType::String,
                json!({ "$date": "2025-11-24T16:00:00.123Z" }),
                Bson::String("2025-11-24T16:00:00.123Z".into()),
            ),
        ];
        for (kind, v, want) in cases {
            assert_eq!(
                coerce(&field(kind), v.clone()).unwrap(),
                want,
                "{v} as {kind:?}"
            );
        }
        // An object that is not one of those is still refused.
        assert!(coerce(&field(FieldType::Date), json!({ "$date": "x", "more": 1 })).is_err());
        assert!(coerce(&field(FieldType::String), json!({ "a": 1 })).is_err());
    }
}
