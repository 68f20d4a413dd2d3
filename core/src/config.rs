//! `sluice.toml`: the raw file shape, environment overrides and the one validation step
//! that turns them into a [`Config`]. Validation is pure: the environment is passed in as a
//! lookup function, and nothing connects anywhere.
//!
//! Every error names its origin (the file or the environment variable), the field and what
//! was expected. Secrets are written as `${env:NAME}` references and never printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Where a value came from, for error messages.
const DEFAULTS_ORIGIN: &str = "embedded defaults";

/// A secret value (password, key, token). Written in config files as `${env:NAME}`;
/// a literal is accepted for local use but is never printed back.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The environment variable this secret refers to, when it is a reference.
    pub fn env_reference(&self) -> Option<&str> {
        self.0.strip_prefix("${env:")?.strip_suffix('}')
    }

    /// Resolves a reference through `env`; a literal resolves to itself.
    fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
        match self.env_reference() {
            Some("") => Err("`${env:NAME}` with a variable name".into()),
            // Set but empty is a value here: an empty `s3.access_key` means the AWS
            // credential chain.
            Some(name) => env(name)
                .map(Secret)
                .ok_or_else(|| format!("environment variable `{name}` to be set (it is not)")),
            None => Ok(self.clone()),
        }
    }

    /// The clear value. Call only where the secret is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What may be shown: the reference, or a placeholder for a literal.
    pub fn redacted(&self) -> String {
        match self.env_reference() {
            Some(_) => self.0.clone(),
            None if self.0.is_empty() => String::new(),
            None => "<redacted>".into(),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

/// The file as written. Every section and field has a default, so an empty file (or no
/// file) is a working local configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub mongodb: MongoSection,
    pub server: ServerSection,
    pub tracking: TrackingSection,
    pub export: ExportSection,
    pub s3: S3Section,
    pub log: LogSection,
    pub plugins: PluginsSection,
    /// Export jobs run on a cron schedule by `sluice serve`.
    pub schedules: Vec<ScheduleSection>,
    pub scheduler: SchedulerSection,
    pub security: SecuritySection,
}

/// `[security]`: keys for credentials Sluice must keep itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySection {
    /// Encrypts OAuth refresh tokens that providers rotate (stored in `oauth_tokens`);
    /// needed by integration configs with `auth.refresh_token`. Use a `${env:NAME}`
    /// reference to a long random value.
    pub token_key: Option<Secret>,
    /// Integration configs applied through the admin API may set
    /// `allow_private_network` (reach loopback, private and cloud-metadata addresses
    /// such as 169.254.169.254). Off: only the operator's `sluice configs apply` may.
    pub api_configs_may_reach_private_network: bool,
    /// The environment variables configs applied through the admin API may reference
    /// (`${env:NAME}`): names, or prefixes ending in `*` (`["SHOP_*", "CRM_TOKEN"]`).
    /// Empty: none (`SLUICE_*`, `AWS_*` and those this file reads are refused even when
    /// listed). A config sends its secrets to the endpoint its applier names: an open
    /// list would let an API caller send any secret of the process's environment there.
    pub api_config_env: Vec<String>,
}

/// `[scheduler]`: how replicas share scheduled runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    /// Run scheduled jobs in this process (turn off for tracking-only replicas).
    pub enabled: bool,
    /// A claimed run not renewed for this long is taken over by another replica.
    pub lease_seconds: u64,
    /// How often integration configs are re-read (and dead export runs failed);
    /// `[[schedules]]` are read once, at start.
    pub reload_seconds: u64,
    /// Scheduled runs this process executes at once. A fire beyond waits, claimed, for
    /// one to end (`sluice jobs history` shows it waiting).
    pub max_concurrent_runs: usize,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_seconds: 60,
            reload_seconds: 30,
            max_concurrent_runs: 4,
        }
    }
}

/// `[[schedules]]`: an export job on a cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub name: String,
    /// EVENT_DATA, USER_DATA, DAILY_ANALYTICS or ARCHIVE.
    #[serde(rename = "type")]
    pub kind: String,
    /// Cron with seconds, read in `timezone` (`0 15 2 * * *` = daily at 02:15).
    pub cron: String,
    /// EVENT_DATA and DAILY_ANALYTICS: missed daily windows run after downtime, oldest
    /// first, at most this many (default 7; see [`ScheduleSection::catch_up`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<usize>,
    /// EVENT_DATA and DAILY_ANALYTICS: days published before that received late events,
    /// published again per run (oldest first); the rest wait for the next runs (default
    /// 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_days_per_run: Option<usize>,
    /// IANA time zone the cron is read in (`Europe/Paris`); default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
}

impl ScheduleSection {
    /// Missed windows a run publishes (the run's own included).
    pub fn catch_up(&self) -> usize {
        self.catch_up.unwrap_or(7)
    }

    /// Days with late events a run publishes again.
    pub fn late_days_per_run(&self) -> usize {
        self.late_days_per_run.unwrap_or(7)
    }

    /// Whether the kind runs day by day (EVENT_DATA, DAILY_ANALYTICS), so that the
    /// catch-up and late-day settings apply to it.
    fn by_day(&self) -> bool {
        crate::model::ExportJobType::parse(&self.kind).is_ok_and(|k| k.by_day())
    }
}

/// The longest batch deadline a plugin may have: a call holds a thread and an instance
/// until it ends, and a deadline is also the unit of the narrowing budgets.
pub const MAX_PLUGIN_BATCH_DEADLINE_MS: u64 = 600_000;

/// WASM transform plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Folder with `NAME.toml` manifests and their `.wasm` components.
    pub dir: String,
    /// Meter instructions (needed for plugins with a fuel limit; costs some speed).
    pub fuel: bool,
    /// Plugins run on every export job's records, in order (ARCHIVE's excepted).
    pub export_transforms: Vec<String>,
    /// A chain of its own for an export type (`EVENT_DATA`, `USER_DATA`,
    /// `DAILY_ANALYTICS`), run on its records instead of `export_transforms`.
    pub export_transforms_by_type: std::collections::BTreeMap<String, Vec<String>>,
    /// Plugins run on tracked events before they are stored, in order.
    pub tracking_transforms: Vec<String>,
    /// `fail-run`, `skip-batch` or `dead-letter`.
    pub failure_policy: String,
    /// Capabilities granted to plugins that ask (`clocks`).
    pub grants: Vec<String>,
    /// The most memory (MiB) any plugin may have, whatever its manifest asks.
    pub max_memory_mib: u64,
    /// The longest batch deadline (ms) any plugin may have, whatever its manifest asks.
    pub max_batch_deadline_ms: u64,
    /// Instances of each plugin that may run batches at once (concurrent tracking
    /// requests); more are built only when calls overlap.
    pub instances: usize,
    /// Per-plugin config, passed to the plugin's `configure` as JSON.
    pub config: std::collections::BTreeMap<String, toml::Value>,
    /// Folder keeping compiled components across processes (relative paths are inside
    /// `dir`); empty: compile at every load.
    pub compile_cache: String,
}

impl PluginsSection {
    /// The chain configured for an export of `kind`: its own (`export_transforms_by_type`),
    /// else `export_transforms`. An ARCHIVE run, which moves events as they were stored,
    /// runs none of it (and logs so when there is one).
    pub fn export_chain(&self, kind: crate::model::ExportJobType) -> &[String] {
        self.export_transforms_by_type
            .get(kind.as_str())
            .unwrap_or(&self.export_transforms)
    }

    /// Every plugin an export chain names, each once, in the order first named.
    pub fn export_plugins(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for name in self
            .export_transforms
            .iter()
            .chain(self.export_transforms_by_type.values().flatten())
        {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    /// The compile cache folder, if one is configured.
    pub fn compile_cache_dir(&self) -> Option<std::path::PathBuf> {
        (!self.compile_cache.is_empty())
            .then(|| std::path::Path::new(&self.dir).join(&self.compile_cache))
    }
}

impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            dir: "plugins/dist".into(),
            fuel: false,
            export_transforms: Vec::new(),
            export_transforms_by_type: Default::default(),
            tracking_transforms: Vec::new(),
            failure_policy: "fail-run".into(),
            grants: Vec::new(),
            max_memory_mib: 256,
            max_batch_deadline_ms: 10_000,
            instances: 4,
            config: Default::default(),
            compile_cache: ".compiled".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoSection {
    /// Connection string (`mongodb://` or `mongodb+srv://`). Transactions need a replica
    /// set or sharded cluster (Atlas always is one).
    pub uri: String,
    /// Database holding every Sluice collection.
    pub database: String,
    /// Write concern for event writes: `majority` or a node count such as `1`.
    pub write_concern: String,
}

impl Default for MongoSection {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017/?directConnection=true".into(),
            database: "sluice".into(),
            write_concern: "majority".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address `sluice serve` listens on.
    pub listen: String,
    /// Write keys accepted by the tracking endpoint. Empty means no key is required
    /// (local use only; `config check` warns).
    pub write_keys: Vec<Secret>,
    /// Write keys of server-side sources, also accepted (with either list set, a key is
    /// required: an empty `write_keys` beside these admits server-side sources only,
    /// warned about). When any is set,
    /// only requests with one of these may set an event's `context.ip`,
    /// `context.userAgent` and (Segment) `context.location`: a browser's key is public,
    /// and anyone holding it could otherwise place its events anywhere. Empty: every
    /// accepted key may.
    pub server_write_keys: Vec<Secret>,
    /// Origins allowed by CORS; `*` allows any.
    pub cors_origins: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is trusted for the client IP (IPs or CIDRs).
    pub trusted_proxies: Vec<String>,
    /// Requests per second allowed per write key (0 = unlimited).
    pub rate_limit_per_key: u32,
    /// Tracking requests per second allowed per client address (its IPv4 address or its
    /// IPv6 /64, behind `trusted_proxies` the forwarded one; 0 = unlimited). A browser's
    /// write key is public: without it, one client can spend the whole key's limit.
    pub rate_limit_per_client: u32,
    /// A request body not received whole within this many seconds is answered `408`
    /// and its connection closed (a client trickling its body holds no connection longer).
    pub body_timeout_seconds: u64,
    /// A request's headers (and, on a kept-alive connection, the next request's) not
    /// received within this many seconds close the connection.
    pub header_timeout_seconds: u64,
    /// Connections open at once; beyond, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A second address serving `/healthz`, `/readyz` and `/metrics` only, for probes
    /// and scrapes: not subject to `max_connections`, and never public. Empty: none.
    pub ops_listen: String,
}

/// The largest `tracking.max_event_bytes`.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            write_keys: Vec::new(),
            server_write_keys: Vec::new(),
            cors_origins: vec!["*".into()],
            trusted_proxies: Vec::new(),
            rate_limit_per_key: 0,
            rate_limit_per_client: 0,
            body_timeout_seconds: 60,
            header_timeout_seconds: 30,
            max_connections: 10_000,
            ops_listen: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSection {
    /// A session with no event for this long is marked EXPIRED; and an event sent
    /// without a `sessionId` this long after the visitor's previous one starts a new
    /// session.
    pub session_timeout_minutes: u64,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub max_event_bytes: usize,
    /// Events whose corrected time is further than this in the future are rejected.
    pub max_future_seconds: i64,
    /// Events waiting to be written; when full the endpoint answers 503.
    pub queue_capacity: usize,
    /// How long a request that does not fit in the queue waits for room (in arrival
    /// order) before it is answered 503; at most half of `write_timeout_seconds` is
    /// used. 0: refused at once.
    pub queue_wait_ms: u64,
    /// Request bodies the tracking endpoint holds at once, in MiB: each request's body
    /// as it arrives plus, when compressed, the route's limit for its decompressed copy,
    /// held until the request is answered and its events are written. Beyond, 503 with
    /// `Retry-After`.
    /// What the process holds is a few times this (parsed events take more room than
    /// their JSON).
    pub max_in_flight_mb: usize,
    /// What one client address (IPv4, or IPv6 /64; behind `trusted_proxies`, the
    /// forwarded one) may hold of `max_in_flight_mb`, in MiB; beyond, 429 with
    /// `Retry-After`. 0: no bound per address (behind a proxy that is not in
    /// `trusted_proxies`, every client has the proxy's address).
    pub max_in_flight_per_client_mb: usize,
    /// Events per write to MongoDB.
    pub write_batch_size: usize,
    /// Concurrent writers draining the queue.
    pub writers: usize,
    /// A request whose events MongoDB has not acknowledged within this many seconds is
    /// answered 503 (resend: the eventIds are recognized) instead of hanging.
    pub write_timeout_seconds: u64,
    /// `keep` stores bot traffic flagged (`metadata.bot`); `drop` discards it.
    pub bots: String,
    /// Segment API: `track` event names (case-insensitive) stored as PURCHASE.
    pub purchase_events: Vec<String>,
    /// A MaxMind-format city database (GeoLite2-City / GeoIP2-City `.mmdb`): fills
    /// `metadata.country` / `region` / `city` from the client IP. Unset: no GeoIP.
    pub geoip_database: Option<String>,
}

impl Default for TrackingSection {
    fn default() -> Self {
        Self {
            session_timeout_minutes: 30,
            max_batch_events: 500,
            max_batch_bytes: 500 * 1024,
            max_event_bytes: 32 * 1024,
            max_future_seconds: 300,
            queue_capacity: 20_000,
            queue_wait_ms: 2_000,
            max_in_flight_mb: 64,
            max_in_flight_per_client_mb: 0,
            write_batch_size: 1_000,
            writers: 4,
            write_timeout_seconds: 10,
            bots: "keep".into(),
            purchase_events: vec!["Order Completed".into()],
            geoip_database: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// Where export jobs write: a local folder (`./out`, `file:///data/out`) or
    /// `s3://bucket/prefix`.
    pub destination: String,
    /// Events older than this many days are archived by ARCHIVE jobs.
    pub archive_after_days: u32,
    /// Parts a rerun replaces are removed this many minutes later instead of at once, so
    /// queries already reading them finish (0: at once).
    pub keep_replaced_parts_minutes: u64,
    /// Local folder for part files before upload and for an archive's spooled eventIds
    /// (about 65 bytes an event); empty: the system temporary folder.
    pub work_dir: String,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self {
            destination: "./sluice-output".into(),
            archive_after_days: 90,
            keep_replaced_parts_minutes: 0,
            work_dir: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Section {
    /// Custom endpoint for S3-compatible stores; empty means AWS.
    pub endpoint: String,
    /// Empty: from the AWS chain (`AWS_REGION`, the profile, instance metadata) on AWS,
    /// else `us-east-1` (any region does for S3-compatible stores).
    pub region: String,
    /// Empty means the standard AWS credential chain.
    pub access_key: Secret,
    pub secret_key: Secret,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible stores.
    pub path_style: bool,
    /// CRC32 checksums on uploads; `false` for S3-compatible stores that refuse the
    /// checksum headers.
    pub checksums: bool,
    /// Server-side encryption asked for on every object written (uploads and copies):
    /// `AES256` (SSE-S3), `aws:kms` or `aws:kms:dsse` (SSE-KMS). Empty: the bucket's
    /// default. Buckets whose policy refuses writes without the header need it.
    pub server_side_encryption: String,
    /// The KMS key (id, ARN or `alias/...`) for `aws:kms*`; empty: the AWS-managed key.
    pub sse_kms_key_id: String,
    /// The storage class of every object written, such as `STANDARD_IA` or
    /// `INTELLIGENT_TIERING`. Empty: the bucket's default (STANDARD). Classes whose
    /// objects must be restored before they are read (`GLACIER`, `DEEP_ARCHIVE`) are
    /// refused: ARCHIVE reads its files back, and warehouses read every partition.
    pub storage_class: String,
    /// The AWS account id that must own the bucket (sent with every request as
    /// `x-amz-expected-bucket-owner`): a bucket name taken over by another account
    /// after a deletion is then refused instead of written to. Empty: not checked.
    pub expected_bucket_owner: String,
}

/// Storage classes `s3.storage_class` takes: those whose objects are read at once.
pub const STORAGE_CLASSES: [&str; 8] = [
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
    "EXPRESS_ONEZONE",
    "OUTPOSTS",
];

impl Default for S3Section {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: String::new(),
            access_key: Secret::default(),
            secret_key: Secret::default(),
            path_style: false,
            checksums: true,
            server_side_encryption: String::new(),
            sse_kms_key_id: String::new(),
            storage_class: String::new(),
            expected_bucket_owner: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter such as `info` or `sluice=debug,info`.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Write concern for event and aggregate writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteConcernLevel {
    Majority,
    Nodes(u32),
}

/// Where export files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Local(p) => write!(f, "{}", p.display()),
            Destination::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Destination::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl Destination {
    /// Parses `s3://bucket/prefix`, `file:///path` or a plain path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = "a folder path, `file:///path` or `s3://bucket/prefix`";
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.len() < 3
                || bucket.len() > 63
                || !bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            {
                return Err(format!(
                    "{expected} with a valid bucket name (3-63 of a-z 0-9 . -), got `{text}`"
                ));
            }
            return Ok(Destination::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        let is_url = text.starts_with("file://");
        let path = text.strip_prefix("file://").unwrap_or(text);
        if path.is_empty() || text.contains("://") && !is_url {
            return Err(format!("{expected}, got `{text}`"));
        }
        // `file://host/path` names a host; a URL's path is absolute (`file:///path`, or
        // `file://localhost/path`). `file://exports/x` is refused rather than read as the
        // relative folder `exports/x`.
        let path = match path.strip_prefix("localhost") {
            Some(rest) if is_url && rest.starts_with('/') => rest,
            _ => path,
        };
        if is_url && !path.starts_with('/') {
            return Err(format!(
                "{expected} (a `file://` URL takes an absolute path, `file:///data/exports`; a relative folder is given as it is), got `{text}`"
            ));
        }
        Ok(Destination::Local(PathBuf::from(path)))
    }
}

/// Bot traffic policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BotPolicy {
    Keep,
    Drop,
}

/// A validated configuration: every value parsed, every secret resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub mongodb_uri: Secret,
    pub database: String,
    pub write_concern: WriteConcernLevel,
    pub listen: SocketAddr,
    pub write_keys: Vec<Secret>,
    /// `[server] server_write_keys`, resolved.
    pub server_write_keys: Vec<Secret>,
    pub cors_origins: Vec<String>,
    pub trusted_proxies: Vec<String>,
    pub rate_limit_per_key: u32,
    /// `[server] rate_limit_per_client`.
    pub rate_limit_per_client: u32,
    /// `[server] body_timeout_seconds`.
    pub body_timeout: std::time::Duration,
    /// `[server] header_timeout_seconds`.
    pub header_timeout: std::time::Duration,
    /// `[server] max_connections`.
    pub max_connections: usize,
    /// `[server] ops_listen`, if set.
    pub ops_listen: Option<SocketAddr>,
    pub tracking: TrackingSection,
    pub bots: BotPolicy,
    pub destination: Destination,
    pub archive_after_days: u32,
    /// `[export] keep_replaced_parts_minutes`.
    pub keep_replaced_parts: std::time::Duration,
    /// `[export] work_dir`, resolved (the system temporary folder when empty).
    pub export_work_dir: std::path::PathBuf,
    pub s3: S3Section,
    pub log: LogSection,
    pub plugins: PluginsSection,
    pub schedules: Vec<ScheduleSection>,
    pub scheduler: SchedulerSection,
    /// `[security] token_key`, resolved.
    pub token_key: Option<Secret>,
    /// `[plugins.config.*]` with `${env:NAME}` strings resolved (what plugins receive);
    /// `plugins.config` keeps the references.
    pub plugin_configs: PluginConfigs,
    /// Non-fatal remarks (for example: no write key configured).
    pub warnings: Vec<String>,
    /// The raw form, for printing with secrets redacted.
    pub raw: RawConfig,
}

/// Environment variables that override the file, in the order they are applied.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("SLUICE_MONGODB_URI", "mongodb.uri"),
    ("SLUICE_MONGODB_DATABASE", "mongodb.database"),
    ("SLUICE_MONGODB_WRITE_CONCERN", "mongodb.write_concern"),
    ("SLUICE_SERVER_LISTEN", "server.listen"),
    ("SLUICE_SERVER_OPS_LISTEN", "server.ops_listen"),
    ("SLUICE_SERVER_WRITE_KEYS", "server.write_keys"),
    ("SLUICE_EXPORT_DESTINATION", "export.destination"),
    ("SLUICE_S3_ENDPOINT", "s3.endpoint"),
    ("SLUICE_S3_REGION", "s3.region"),
    ("SLUICE_S3_ACCESS_KEY", "s3.access_key"),
    ("SLUICE_S3_SECRET_KEY", "s3.secret_key"),
    ("SLUICE_S3_PATH_STYLE", "s3.path_style"),
    ("SLUICE_S3_CHECKSUMS", "s3.checksums"),
    ("SLUICE_LOG_FORMAT", "log.format"),
    ("SLUICE_LOG_LEVEL", "log.level"),
    ("SLUICE_TOKEN_KEY", "security.token_key"),
];

/// A flag as an environment variable gives it.
fn flag(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("`true`, `false`, `1` or `0`".into()),
    }
}

/// Sets one field from an environment variable's text.
fn apply_override(c: &mut RawConfig, field: &str, v: String) -> Result<(), String> {
    match field {
        "mongodb.uri" => c.mongodb.uri = v,
        "mongodb.database" => c.mongodb.database = v,
        "mongodb.write_concern" => c.mongodb.write_concern = v,
        "server.listen" => c.server.listen = v,
        "server.ops_listen" => c.server.ops_listen = v,
        "server.write_keys" => {
            c.server.write_keys = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
            // A template that expands a missing secret to "" must not open the endpoint.
            if c.server.write_keys.is_empty() {
                return Err("one or more comma-separated write keys (set but empty, it would open the tracking endpoint to anyone; unset it to use the file's keys)".into());
            }
        }
        "export.destination" => c.export.destination = v,
        "s3.endpoint" => c.s3.endpoint = v,
        "s3.region" => c.s3.region = v,
        "s3.access_key" => c.s3.access_key = Secret::new(v),
        "s3.secret_key" => c.s3.secret_key = Secret::new(v),
        "s3.path_style" => c.s3.path_style = flag(&v)?,
        "s3.checksums" => c.s3.checksums = flag(&v)?,
        "log.format" => c.log.format = v,
        "log.level" => c.log.level = v,
        "security.token_key" => c.security.token_key = Some(Secret::new(v)),
        // ENV_OVERRIDES and this match are edited together; a unit test walks every
        // entry, so an unknown field here is caught by `cargo test`.
        _ => return Err("a known field".into()),
    }
    Ok(())
}

/// Parses a config file's text. `origin` names the file in errors.
pub fn parse(origin: &str, text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Messages a Segment SDK may send in one batch (small ones, within its 500 KB).
pub const SEGMENT_BATCH_MESSAGES: usize = 2_500;

/// Reads `path` (or uses the embedded defaults when `None`), applies environment
/// overrides and validates. `env` looks variables up (pass `|k| std::env::var(k).ok()`).
/// A file's errors are said at their lines, up to
/// [`MAX_ERRORS_PER_FILE`](crate::toml_errors::MAX_ERRORS_PER_FILE) of them (as
/// [`ConfigError::Several`] when more than one).
pub fn load(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let Some(p) = path else {
        return from_text(DEFAULTS_ORIGIN, None, env);
    };
    let text = std::fs::read_to_string(p).map_err(|reason| ConfigError::Read {
        path: p.to_path_buf(),
        reason,
    })?;
    let origin = p.display().to_string();
    from_text(&origin, Some(&text), env).map_err(|first| {
        let all = crate::toml_errors::all_errors::<RawConfig>(
            &origin,
            &text,
            first,
            &|rest| from_text(&origin, Some(rest), env).map(|_| ()),
            &FILE_RULES,
        );
        ConfigError::all(all).expect("the first error at least")
    })
}

/// How `toml_errors` searches `sluice.toml`: the checks across fields it makes (a KMS
/// key needs `aws:kms`; a server key may not also be a browser's).
const FILE_RULES: crate::toml_errors::Rules = crate::toml_errors::Rules {
    hint: |_| None,
    related: |taken, field| {
        (taken == "s3.server_side_encryption" && field == "s3.sse_kms_key_id")
            || (taken.starts_with("server.write_keys")
                && field.starts_with("server.server_write_keys"))
    },
    // A schedule's name and cron are required: a schedule whose one is wrong still has
    // its other fields checked.
    placeholder: |path| {
        let (schedule, field) = path.strip_prefix("schedules[")?.split_once("].")?;
        match field {
            "cron" => Some(toml::Value::String("0 0 0 1 1 *".into())),
            "name" => Some(toml::Value::String(format!(
                "schedule-{schedule}-set-aside"
            ))),
            _ => None,
        }
    },
};

/// A config file's text (the embedded defaults for `None`) with the environment's
/// overrides, validated; the first error found.
fn from_text(
    origin: &str,
    text: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut raw = match text {
        Some(text) => parse(origin, text)?,
        None => RawConfig::default(),
    };
    // Remember which fields the environment set, so errors point at the variable.
    let mut origins: BTreeMap<&str, String> = BTreeMap::new();
    // Every variable that cannot be read is said, not the first only.
    let mut refused = Vec::new();
    for (var, field) in ENV_OVERRIDES {
        if let Some(value) = env(var) {
            match apply_override(&mut raw, field, value) {
                Ok(()) => {
                    origins.insert(field, format!("environment variable `{var}`"));
                }
                Err(expected) => refused.push(ConfigError::Invalid {
                    origin: format!("environment variable `{var}`"),
                    field: (*field).to_string(),
                    expected,
                }),
            }
        }
    }
    if let Some(refused) = ConfigError::all(refused) {
        return Err(refused);
    }
    validate(origin, &origins, raw, env)
}

/// The one validation step: raw values to runtime types, secrets resolved.
pub fn validate(
    file_origin: &str,
    env_origins: &BTreeMap<&str, String>,
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let invalid = |field: &str, expected: String| ConfigError::Invalid {
        // A list's entry (`server.write_keys[0]`) came from where the list did.
        origin: env_origins
            .get(field)
            .or_else(|| env_origins.get(field.split('[').next().unwrap_or(field)))
            .cloned()
            .unwrap_or_else(|| file_origin.to_string()),
        field: field.to_string(),
        expected,
    };
    let mut warnings = Vec::new();

    let uri = &raw.mongodb.uri;
    if uri.contains("${env:") {
        // The URI carries the password; it is given whole through the environment.
        return Err(invalid(
            "mongodb.uri",
            "a connection string, not an `${env:...}` reference: set the whole URI in `SLUICE_MONGODB_URI` instead".into(),
        ));
    }
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        return Err(invalid(
            "mongodb.uri",
            "a `mongodb://` or `mongodb+srv://` connection string".into(),
        ));
    }
    let db = &raw.mongodb.database;
    if db.is_empty()
        || db.len() > 63
        || db
            .chars()
            .any(|c| "/\\. \"$*<>:|?".contains(c) || c == '\0')
    {
        return Err(invalid(
            "mongodb.database",
            format!("a database name (1-63 characters, none of /\\. \"$*<>:|?), got `{db}`"),
        ));
    }
    let write_concern = match raw.mongodb.write_concern.as_str() {
        "majority" => WriteConcernLevel::Majority,
        n => match n.parse::<u32>() {
            Ok(w) if w >= 1 => WriteConcernLevel::Nodes(w),
            _ => {
                return Err(invalid(
                    "mongodb.write_concern",
                    format!("`majority` or a node count of at least 1, got `{n}`"),
                ))
            }
        },
    };
    let listen: SocketAddr = raw.server.listen.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!(
                "an address like `127.0.0.1:8080`, got `{}`",
                raw.server.listen
            ),
        )
    })?;
    let ops_listen: Option<SocketAddr> = match raw.server.ops_listen.trim() {
        "" => None,
        text => {
            let at: SocketAddr = text.parse().map_err(|_| {
                invalid(
                    "server.ops_listen",
                    format!("an address like `0.0.0.0:9090`, or nothing, got `{text}`"),
                )
            })?;
            // The same port on an address that overlaps (equal, or either one every
            // interface) could never be bound beside the public one.
            let overlaps =
                at.ip() == listen.ip() || at.ip().is_unspecified() || listen.ip().is_unspecified();
            if overlaps && at.port() == listen.port() && at.port() != 0 {
                return Err(invalid(
                    "server.ops_listen",
                    format!("an address other than `server.listen` ({listen})"),
                ));
            }
            Some(at)
        }
    };
    let resolve_keys = |name: &str, keys: &[Secret]| {
        let mut out: Vec<Secret> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let field = format!("server.{name}[{i}]");
            let resolved = key.resolve(env).map_err(|e| invalid(&field, e))?;
            if resolved.expose().len() < 8 {
                return Err(invalid(
                    &field,
                    "a write key of at least 8 characters".into(),
                ));
            }
            out.push(resolved);
        }
        Ok(out)
    };
    let write_keys = resolve_keys("write_keys", &raw.server.write_keys)?;
    let server_write_keys = resolve_keys("server_write_keys", &raw.server.server_write_keys)?;
    if let Some(i) = server_write_keys
        .iter()
        .position(|k| write_keys.iter().any(|w| w.expose() == k.expose()))
    {
        return Err(invalid(
            &format!("server.server_write_keys[{i}]"),
            "a key that is not also in `server.write_keys` (a key is a browser's or a server's)"
                .into(),
        ));
    }
    if write_keys.is_empty() && !server_write_keys.is_empty() {
        warnings.push(
            "`server.write_keys` is empty but `server.server_write_keys` is set: only server-side keys are accepted, so browsers and apps need a key in `write_keys`"
                .into(),
        );
    }
    if write_keys.is_empty() && server_write_keys.is_empty() {
        warnings.push(
            "`server.write_keys` is empty: the tracking endpoint accepts events without a key"
                .into(),
        );
    }
    // The Segment API takes half a writer's share of the queue per batch (see the
    // README): an app back online sends up to about 2,500 small messages, and a Segment
    // SDK drops a batch answered 413.
    let t = &raw.tracking;
    let segment = (t.queue_capacity / t.writers.max(1) / 2).max(t.max_batch_events);
    if segment < SEGMENT_BATCH_MESSAGES {
        warnings.push(format!(
            "a Segment batch holds at most {segment} messages here (`tracking.queue_capacity` / `tracking.writers` / 2): an app back online sends up to about {SEGMENT_BATCH_MESSAGES}, and Segment SDKs drop a batch answered 413; raise `tracking.queue_capacity` to {} or more",
            SEGMENT_BATCH_MESSAGES * 2 * t.writers.max(1)
        ));
    }
    for (i, origin) in raw.server.cors_origins.iter().enumerate() {
        // A browser's `Origin` is scheme, host and port, nothing after: an entry with a
        // path or a trailing slash would never match one. A `*` stands only for the
        // leading labels of a host (`https://*.shop.example`).
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let is_origin = rest.is_some_and(|host| {
            let host = host.strip_prefix("*.").unwrap_or(host);
            !host.is_empty()
                && !host.starts_with(['.', ':'])
                && !host.contains(['/', '?', '#', ' ', '*'])
                && origin.is_ascii()
        });
        if origin != "*" && !is_origin {
            return Err(invalid(
                &format!("server.cors_origins[{i}]"),
                format!(
                    "`*`, an origin like `https://shop.example` (scheme, host and port; no path or trailing `/`), or `https://*.shop.example` for its subdomains, got `{origin}`"
                ),
            ));
        }
    }
    for (i, proxy) in raw.server.trusted_proxies.iter().enumerate() {
        let (addr, prefix) = match proxy.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (proxy.as_str(), None),
        };
        let bits = match addr.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => Some(32),
            Ok(std::net::IpAddr::V6(_)) => Some(128),
            Err(_) => None,
        };
        let prefix_ok = |max: u8| prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max));
        if !bits.is_some_and(prefix_ok) {
            return Err(invalid(
                &format!("server.trusted_proxies[{i}]"),
                format!("an IP address or CIDR such as `10.0.0.0/8`, got `{proxy}`"),
            ));
        }
    }
    // Without trusted proxies the client address is the connection's: behind a load
    // balancer that is the balancer's, and every client would share one limit. Right
    // when clients connect directly, so a warning, not a refusal.
    let per_client: Vec<&str> = [
        (
            "server.rate_limit_per_client",
            raw.server.rate_limit_per_client > 0,
        ),
        (
            "tracking.max_in_flight_per_client_mb",
            raw.tracking.max_in_flight_per_client_mb > 0,
        ),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    if !per_client.is_empty() && raw.server.trusted_proxies.is_empty() {
        warnings.push(format!(
            "`{}` {} each client address, and `server.trusted_proxies` is empty: behind a proxy or load balancer every client has its address and they share one limit; list the proxy's addresses there (clients that connect directly need nothing)",
            per_client.join("` and `"),
            if per_client.len() == 1 { "limits" } else { "limit" }
        ));
    }
    let t = &raw.tracking;
    let positive = [
        (
            "tracking.session_timeout_minutes",
            t.session_timeout_minutes as usize,
        ),
        ("tracking.max_batch_events", t.max_batch_events),
        ("tracking.max_batch_bytes", t.max_batch_bytes),
        ("tracking.max_event_bytes", t.max_event_bytes),
        ("tracking.queue_capacity", t.queue_capacity),
        ("tracking.max_in_flight_mb", t.max_in_flight_mb),
        ("tracking.write_batch_size", t.write_batch_size),
        ("tracking.writers", t.writers),
        (
            "tracking.write_timeout_seconds",
            t.write_timeout_seconds as usize,
        ),
    ];
    for (field, value) in positive {
        if value == 0 {
            return Err(invalid(field, "a number greater than 0".into()));
        }
    }
    // Beyond these, a deadline (or a session's date arithmetic) stops meaning anything:
    // a request would wait for hours, or an overflow would panic.
    if !(1..=600).contains(&t.write_timeout_seconds) {
        return Err(invalid(
            "tracking.write_timeout_seconds",
            format!("1 to 600, got {}", t.write_timeout_seconds),
        ));
    }
    if !(1..=10_080).contains(&t.session_timeout_minutes) {
        return Err(invalid(
            "tracking.session_timeout_minutes",
            format!("1 to 10080 (a week), got {}", t.session_timeout_minutes),
        ));
    }
    for (i, name) in raw.security.api_config_env.iter().enumerate() {
        let stem = name.strip_suffix('*').unwrap_or(name);
        if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(
                &format!("security.api_config_env[{i}]"),
                format!("a variable name, or a prefix ending in `*` (`SHOP_*`; not `*` alone), got `{name}`"),
            ));
        }
        // Never readable by an API config, whatever this list says: listed, a name of
        // them looks allowed and is refused at every request. Warned of, not refused, so
        // that a file listing one still starts.
        if ["SLUICE_", "AWS_"].iter().any(|p| stem.starts_with(p)) {
            warnings.push(format!(
                "`security.api_config_env[{i}]`: `{name}` has no effect: configs applied through the API never read `SLUICE_*` or `AWS_*` variables (Sluice's own settings and the cloud credentials)"
            ));
        }
    }
    if !(1..=3600).contains(&raw.server.body_timeout_seconds) {
        return Err(invalid(
            "server.body_timeout_seconds",
            format!("1 to 3600, got {}", raw.server.body_timeout_seconds),
        ));
    }
    if !(1..=3600).contains(&raw.server.header_timeout_seconds) {
        return Err(invalid(
            "server.header_timeout_seconds",
            format!("1 to 3600, got {}", raw.server.header_timeout_seconds),
        ));
    }
    if !(1..=1_000_000).contains(&raw.server.max_connections) {
        return Err(invalid(
            "server.max_connections",
            format!("1 to 1000000, got {}", raw.server.max_connections),
        ));
    }
    // Up to a week: an idle gap is minutes or hours, and the milliseconds stay in range.
    if t.session_timeout_minutes > 7 * 24 * 60 {
        return Err(invalid(
            "tracking.session_timeout_minutes",
            format!("1 to 10080 (a week), got {}", t.session_timeout_minutes),
        ));
    }
    // Up to a year: further ahead is no clock skew, and the milliseconds stay in range.
    if !(0..=366 * 86_400).contains(&t.max_future_seconds) {
        return Err(invalid(
            "tracking.max_future_seconds",
            format!("0 to 31622400 (a year), got {}", t.max_future_seconds),
        ));
    }
    // Each writer has its share of the queue, and a full batch of one visitor goes to one
    // writer: it must fit a share, or every resend of it is answered 503 for ever.
    if t.queue_capacity / t.writers.max(1) < t.max_batch_events {
        return Err(invalid(
            "tracking.queue_capacity",
            format!(
                "at least `tracking.max_batch_events` × `tracking.writers` ({} × {}), got {}",
                t.max_batch_events, t.writers, t.queue_capacity
            ),
        ));
    }
    if t.max_batch_bytes > 1 << 30 {
        return Err(invalid(
            "tracking.max_batch_bytes",
            format!("at most 1073741824 (1 GiB), got {}", t.max_batch_bytes),
        ));
    }
    // A compressed full batch reserves its body and its decompressed copy: it must fit,
    // or every such request is answered 503 for ever. The semaphore counts bytes in a
    // u32 per request and holds at most 2^61 in all: 1 TiB is far within.
    let needed = (2 * t.max_batch_bytes).div_ceil(1 << 20);
    if t.max_in_flight_mb < needed || t.max_in_flight_mb > 1 << 20 {
        return Err(invalid(
            "tracking.max_in_flight_mb",
            format!(
                "{needed} to 1048576 (a compressed batch holds twice `tracking.max_batch_bytes`, {}), got {}",
                t.max_batch_bytes, t.max_in_flight_mb
            ),
        ));
    }
    // A client's share must hold one compressed full batch too, and is a share.
    let share = t.max_in_flight_per_client_mb;
    if share != 0 && (share < needed || share > t.max_in_flight_mb) {
        return Err(invalid(
            "tracking.max_in_flight_per_client_mb",
            format!(
                "0 (no bound), or {needed} to `tracking.max_in_flight_mb` ({}): a compressed batch holds twice `tracking.max_batch_bytes`, {}; got {share}",
                t.max_in_flight_mb, t.max_batch_bytes
            ),
        ));
    }
    // An event is stored as BSON, up to 8 times its JSON (`[1,1,...]`), and MongoDB takes
    // time-series measurements up to 4 MB: 256 KiB stays clear of it.
    if t.max_event_bytes > MAX_EVENT_BYTES {
        return Err(invalid(
            "tracking.max_event_bytes",
            format!("at most {MAX_EVENT_BYTES}, got {}", t.max_event_bytes),
        ));
    }
    if t.max_event_bytes > t.max_batch_bytes {
        return Err(invalid(
            "tracking.max_event_bytes",
            format!(
                "at most `tracking.max_batch_bytes` ({}), got {}",
                t.max_batch_bytes, t.max_event_bytes
            ),
        ));
    }
    let bots = match t.bots.as_str() {
        "keep" => BotPolicy::Keep,
        "drop" => BotPolicy::Drop,
        other => {
            return Err(invalid(
                "tracking.bots",
                format!("`keep` or `drop`, got `{other}`"),
            ))
        }
    };
    let destination = Destination::parse(&raw.export.destination)
        .map_err(|e| invalid("export.destination", e))?;
    // A week at most: longer, a rerun's replaced parts pile up beside the new ones.
    if raw.export.keep_replaced_parts_minutes > 7 * 24 * 60 {
        return Err(invalid(
            "export.keep_replaced_parts_minutes",
            format!(
                "0 to 10080 (a week), got {}",
                raw.export.keep_replaced_parts_minutes
            ),
        ));
    }
    // Bounded: a huge number meant as "never" overflowed the date arithmetic and archived
    // every day before today.
    if !(1..=36_500).contains(&raw.export.archive_after_days) {
        return Err(invalid(
            "export.archive_after_days",
            format!(
                "1 to 36500 days (leave ARCHIVE unscheduled to never archive), got {}",
                raw.export.archive_after_days
            ),
        ));
    }
    let mut s3 = raw.s3.clone();
    let endpoint_ok = s3.endpoint.is_empty()
        || s3.endpoint.starts_with("http://")
        || s3.endpoint.starts_with("https://");
    if !endpoint_ok {
        return Err(invalid(
            "s3.endpoint",
            format!("an `http://` or `https://` URL, got `{}`", s3.endpoint),
        ));
    }
    if !["", "AES256", "aws:kms", "aws:kms:dsse"].contains(&s3.server_side_encryption.as_str()) {
        return Err(invalid(
            "s3.server_side_encryption",
            format!(
                "`AES256`, `aws:kms`, `aws:kms:dsse` or empty (the bucket's default), got `{}`",
                s3.server_side_encryption
            ),
        ));
    }
    if !s3.sse_kms_key_id.is_empty() && !s3.server_side_encryption.starts_with("aws:kms") {
        return Err(invalid(
            "s3.sse_kms_key_id",
            "set only with `s3.server_side_encryption = \"aws:kms\"` (or `aws:kms:dsse`)".into(),
        ));
    }
    if !s3.storage_class.is_empty() && !STORAGE_CLASSES.contains(&s3.storage_class.as_str()) {
        return Err(invalid(
            "s3.storage_class",
            format!(
                "one of {} or empty (GLACIER and DEEP_ARCHIVE objects cannot be read back without a restore), got `{}`",
                STORAGE_CLASSES.join(", "),
                s3.storage_class
            ),
        ));
    }
    let owner = &s3.expected_bucket_owner;
    let account_id = owner.len() == 12 && owner.bytes().all(|b| b.is_ascii_digit());
    if !owner.is_empty() && !account_id {
        return Err(invalid(
            "s3.expected_bucket_owner",
            format!("a 12-digit AWS account id, got `{owner}`"),
        ));
    }
    s3.access_key = s3
        .access_key
        .resolve(env)
        .map_err(|e| invalid("s3.access_key", e))?;
    s3.secret_key = s3
        .secret_key
        .resolve(env)
        .map_err(|e| invalid("s3.secret_key", e))?;
    if s3.access_key.expose().is_empty() != s3.secret_key.expose().is_empty() {
        return Err(invalid(
            "s3.secret_key",
            "`s3.access_key` and `s3.secret_key` to be set together".into(),
        ));
    }
    if !matches!(raw.log.format.as_str(), "text" | "json") {
        return Err(invalid(
            "log.format",
            format!("`text` or `json`, got `{}`", raw.log.format),
        ));
    }
    if let Some(bad) = bad_log_directive(&raw.log.level) {
        return Err(invalid(
            "log.level",
            format!(
                "a level (trace, debug, info, warn, error, off) or comma-separated `target=level` directives, got `{bad}` in `{}`",
                raw.log.level
            ),
        ));
    }
    if !matches!(
        raw.plugins.failure_policy.as_str(),
        "fail-run" | "skip-batch" | "dead-letter"
    ) {
        return Err(invalid(
            "plugins.failure_policy",
            format!(
                "`fail-run`, `skip-batch` or `dead-letter`, got `{}`",
                raw.plugins.failure_policy
            ),
        ));
    }
    for (field, value) in [
        ("plugins.max_memory_mib", raw.plugins.max_memory_mib),
        (
            "plugins.max_batch_deadline_ms",
            raw.plugins.max_batch_deadline_ms,
        ),
    ] {
        if value == 0 {
            return Err(invalid(field, "a number greater than 0".into()));
        }
    }
    // A call holds a thread and an instance until its deadline; the plugin host refuses
    // deadlines past this.
    if raw.plugins.max_batch_deadline_ms > MAX_PLUGIN_BATCH_DEADLINE_MS {
        return Err(invalid(
            "plugins.max_batch_deadline_ms",
            format!(
                "at most {MAX_PLUGIN_BATCH_DEADLINE_MS} (10 minutes), got {}",
                raw.plugins.max_batch_deadline_ms
            ),
        ));
    }
    if !(1..=64).contains(&raw.plugins.instances) {
        return Err(invalid(
            "plugins.instances",
            format!("1 to 64, got {}", raw.plugins.instances),
        ));
    }
    for (i, g) in raw.plugins.grants.iter().enumerate() {
        if g != "clocks" {
            return Err(invalid(
                &format!("plugins.grants[{i}]"),
                format!("`clocks` (the only grantable capability), got `{g}`"),
            ));
        }
    }
    if raw.scheduler.lease_seconds < 2 {
        return Err(invalid(
            "scheduler.lease_seconds",
            format!("at least 2, got {}", raw.scheduler.lease_seconds),
        ));
    }
    if raw.scheduler.reload_seconds == 0 {
        return Err(invalid(
            "scheduler.reload_seconds",
            "a number greater than 0".into(),
        ));
    }
    if !(1..=1000).contains(&raw.scheduler.max_concurrent_runs) {
        return Err(invalid(
            "scheduler.max_concurrent_runs",
            format!("1 to 1000, got {}", raw.scheduler.max_concurrent_runs),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, sched) in raw.schedules.iter().enumerate() {
        crate::model::ExportJobType::parse(&sched.kind)
            .map_err(|e| invalid(&format!("schedules[{i}].type"), e))?;
        crate::cron::parse(&sched.cron).map_err(|e| invalid(&format!("schedules[{i}].cron"), e))?;
        if sched.catch_up == Some(0) && sched.by_day() {
            // Zero would publish no window at all, and record every run COMPLETED.
            return Err(invalid(
                &format!("schedules[{i}].catch_up"),
                "at least 1 (the window of the run itself)".into(),
            ));
        }
        if sched.late_days_per_run == Some(0) && sched.by_day() {
            // Zero would leave every late event unpublished.
            return Err(invalid(
                &format!("schedules[{i}].late_days_per_run"),
                "at least 1, got 0".into(),
            ));
        }
        if !sched.by_day() {
            for (field, set) in [
                ("catch_up", sched.catch_up.is_some()),
                ("late_days_per_run", sched.late_days_per_run.is_some()),
            ] {
                if set {
                    warnings.push(format!(
                        "`schedules[{i}].{field}` has no effect on a {} schedule (only EVENT_DATA and DAILY_ANALYTICS publish day by day): each run exports what is due when it runs",
                        sched.kind
                    ));
                }
            }
        }
        if let Some(tz) = &sched.timezone {
            tz.parse::<chrono_tz::Tz>().map_err(|_| {
                invalid(
                    &format!("schedules[{i}].timezone"),
                    format!("an IANA time zone such as `Europe/Paris`, got `{tz}`"),
                )
            })?;
        }
        // As integration config names: it is a job name (`export:NAME`).
        if !crate::integration::is_job_name(&sched.name) {
            return Err(invalid(
                &format!("schedules[{i}].name"),
                format!(
                    "{}, got `{}`",
                    crate::integration::JOB_NAME_RULE,
                    sched.name
                ),
            ));
        }
        if !names.insert(sched.name.clone()) {
            return Err(invalid(
                &format!("schedules[{i}].name"),
                format!("a unique name (`{}` is used twice)", sched.name),
            ));
        }
    }
    // A shell expands a leading `~` on a command line; a setting read from a file is
    // taken as written, a folder called `~` in the working folder.
    for (field, path) in [
        ("plugins.dir", Some(&raw.plugins.dir)),
        ("plugins.compile_cache", Some(&raw.plugins.compile_cache)),
        ("export.destination", Some(&raw.export.destination)),
        ("export.work_dir", Some(&raw.export.work_dir)),
        (
            "tracking.geoip_database",
            raw.tracking.geoip_database.as_ref(),
        ),
    ] {
        if let Some(path) = path.filter(|p| p.starts_with('~')) {
            warnings.push(format!(
                "`{field}`: `{path}` starts with `~`, which is not expanded in `sluice.toml` (a shell expands it only on a command line): it names a folder called `~` in the working folder; write the path out"
            ));
        }
    }
    let token_key = match &raw.security.token_key {
        None => None,
        Some(k) => {
            let resolved = k
                .resolve(env)
                .map_err(|e| invalid("security.token_key", e))?;
            if resolved.expose().len() < 16 {
                return Err(invalid(
                    "security.token_key",
                    "at least 16 characters (a long random value)".into(),
                ));
            }
            Some(resolved)
        }
    };
    for kind in raw.plugins.export_transforms_by_type.keys() {
        use crate::model::ExportJobType;
        if !matches!(
            ExportJobType::parse(kind),
            Ok(ExportJobType::EventData | ExportJobType::UserData | ExportJobType::DailyAnalytics)
        ) {
            return Err(invalid(
                &format!("plugins.export_transforms_by_type.{kind}"),
                format!("an export type with records to transform: EVENT_DATA, USER_DATA or DAILY_ANALYTICS (ARCHIVE runs none: it moves events as they were stored), got `{kind}`"),
            ));
        }
    }
    // Plugin configs may hold secrets (a redaction salt): `${env:NAME}` strings resolve.
    let mut plugin_configs = raw.plugins.config.clone();
    for (name, value) in plugin_configs.iter_mut() {
        resolve_env_strings(value, &format!("plugins.config.{name}"), env)
            .map_err(|(field, e)| invalid(&field, e))?;
        toml_json(value, &format!("plugins.config.{name}"))
            .map_err(|(field, e)| invalid(&field, e))?;
    }
    // A request let in after half the write deadline would have too little of it left to
    // be written: the wait is held to that, and said (refusing it would stop a file that
    // ran before from starting), so that `config check` shows the value used.
    let mut raw = raw;
    let most_wait = raw.tracking.write_timeout_seconds * 500;
    if raw.tracking.queue_wait_ms > most_wait {
        warnings.push(format!(
            "`tracking.queue_wait_ms` ({}) is more than half of `tracking.write_timeout_seconds` ({} s): {most_wait} is used, so that a request let in last still has time to be written",
            raw.tracking.queue_wait_ms, raw.tracking.write_timeout_seconds
        ));
        raw.tracking.queue_wait_ms = most_wait;
    }
    let mongodb_uri = Secret::new(raw.mongodb.uri.clone());
    Ok(Config {
        mongodb_uri,
        database: raw.mongodb.database.clone(),
        write_concern,
        listen,
        write_keys,
        server_write_keys,
        cors_origins: raw
            .server
            .cors_origins
            .iter()
            .map(|o| normalized_origin(o))
            .collect(),
        trusted_proxies: raw.server.trusted_proxies.clone(),
        rate_limit_per_key: raw.server.rate_limit_per_key,
        rate_limit_per_client: raw.server.rate_limit_per_client,
        body_timeout: std::time::Duration::from_secs(raw.server.body_timeout_seconds),
        header_timeout: std::time::Duration::from_secs(raw.server.header_timeout_seconds),
        max_connections: raw.server.max_connections,
        ops_listen,
        tracking: raw.tracking.clone(),
        bots,
        destination,
        archive_after_days: raw.export.archive_after_days,
        export_work_dir: if raw.export.work_dir.is_empty() {
            std::env::temp_dir()
        } else {
            std::path::PathBuf::from(&raw.export.work_dir)
        },
        keep_replaced_parts: std::time::Duration::from_secs(
            raw.export.keep_replaced_parts_minutes * 60,
        ),
        s3,
        log: raw.log.clone(),
        plugins: raw.plugins.clone(),
        plugin_configs: PluginConfigs(plugin_configs),
        schedules: raw.schedules.clone(),
        scheduler: raw.scheduler.clone(),
        token_key,
        warnings,
        raw,
    })
}

impl Config {
    /// The effective configuration as TOML, with secrets shown only as references and the
    /// MongoDB URI's password masked.
    pub fn redacted_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.mongodb.uri = mask_uri_password(&raw.mongodb.uri);
        // Serializing a struct of strings, numbers and vectors cannot fail.
        toml::to_string(&RedactedView(&raw)).unwrap_or_default()
    }

    /// The environment variables this configuration reads its own secrets from (write
    /// keys, S3 keys, the token key, plugin settings): a connector config applied through
    /// the API may not name them.
    pub fn env_references(&self) -> Vec<String> {
        let raw = &self.raw;
        let mut names: Vec<String> = raw
            .server
            .write_keys
            .iter()
            .chain(&raw.server.server_write_keys)
            .chain([&raw.s3.access_key, &raw.s3.secret_key])
            .chain(raw.security.token_key.as_ref())
            .filter_map(|s| s.env_reference().map(str::to_string))
            .collect();
        if let Some(name) = Secret::new(raw.mongodb.uri.clone()).env_reference() {
            names.push(name.to_string());
        }
        fn strings(v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::String(s) => {
                    if let Some(name) = Secret::new(s.clone()).env_reference() {
                        out.push(name.to_string());
                    }
                }
                toml::Value::Table(t) => t.iter().for_each(|(_, v)| strings(v, out)),
                toml::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
                _ => {}
            }
        }
        for v in raw.plugins.config.values() {
            strings(v, &mut names);
        }
        names
    }
}

/// Serializes a [`RawConfig`] with every [`Secret`] replaced by [`Secret::redacted`].
struct RedactedView<'a>(&'a RawConfig);

impl Serialize for RedactedView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut raw = self.0.clone();
        for keys in [
            &mut raw.server.write_keys,
            &mut raw.server.server_write_keys,
        ] {
            *keys = keys.iter().map(|k| Secret::new(k.redacted())).collect();
        }
        raw.s3.access_key = Secret::new(raw.s3.access_key.redacted());
        raw.s3.secret_key = Secret::new(raw.s3.secret_key.redacted());
        raw.security.token_key = raw
            .security
            .token_key
            .as_ref()
            .map(|k| Secret::new(k.redacted()));
        // The effective day-by-day settings, and only where they apply (a setting on
        // another kind is left as written, and warned of).
        for s in raw.schedules.iter_mut().filter(|s| s.by_day()) {
            s.catch_up = Some(s.catch_up());
            s.late_days_per_run = Some(s.late_days_per_run());
        }
        // Sluice cannot tell which of a plugin's settings are secret (a redaction salt
        // is), so every literal string is shown redacted.
        for value in raw.plugins.config.values_mut() {
            redact_strings(value);
        }
        raw.serialize(serializer)
    }
}

/// Resolved plugin configs. They may hold secrets, so `Debug` shows only the plugin names.
#[derive(Clone, Default, PartialEq)]
pub struct PluginConfigs(pub std::collections::BTreeMap<String, toml::Value>);

impl PluginConfigs {
    /// `[plugins.config.NAME]` as the JSON the plugin's `configure` receives (`{}` if
    /// unset): TOML dates and times as their text (`2024-01-01`, `1979-05-27T07:32:00Z`).
    pub fn json(&self, name: &str) -> serde_json::Value {
        self.0.get(name).map_or_else(
            || serde_json::json!({}),
            |v| toml_json(v, name).unwrap_or_default(),
        )
    }
}

/// A TOML value as JSON; `Err((field, why))` for what JSON cannot hold (NaN, infinities).
fn toml_json(value: &toml::Value, field: &str) -> Result<serde_json::Value, (String, String)> {
    use serde_json::Value as J;
    Ok(match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f)
                .map(J::Number)
                .ok_or_else(|| {
                    (
                field.to_string(),
                format!("a number JSON can hold (a plugin receives its config as JSON), got {f}"),
            )
                })?
        }
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| toml_json(v, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| Ok((k.clone(), toml_json(v, &format!("{field}.{k}"))?)))
                .collect::<Result<_, (String, String)>>()?,
        ),
    })
}

impl std::fmt::Debug for PluginConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Replaces every string of `value` that is not a `${env:NAME}` reference by `<redacted>`.
fn redact_strings(value: &mut toml::Value) {
    match value {
        toml::Value::String(s) => *s = Secret::new(std::mem::take(s)).redacted(),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| redact_strings(v)),
        toml::Value::Array(items) => items.iter_mut().for_each(redact_strings),
        _ => {}
    }
}

/// Replaces every string of `value` that is a `${env:NAME}` reference by the variable's
/// value; the error names the field.
fn resolve_env_strings(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => {
            let secret = Secret::new(s.clone());
            if secret.env_reference().is_some() {
                *s = secret
                    .resolve(env)
                    .map_err(|e| (path.to_string(), e))?
                    .expose()
                    .to_string();
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                resolve_env_strings(v, &format!("{path}.{k}"), env)?;
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                resolve_env_strings(v, &format!("{path}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `mongodb://user:pass@host/?opts` with its secrets masked: the password, and the
/// options that carry one (`tlsCertificateKeyFilePassword`, `authMechanismProperties`,
/// which may hold an `AWS_SESSION_TOKEN`, and any option naming a password, secret or
/// token).
pub fn mask_uri_password(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:<redacted>@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let options: Vec<String> = query
                .split('&')
                .map(|option| match option.split_once('=') {
                    Some((k, _)) if secret_option(k) => format!("{k}=<redacted>"),
                    _ => option.to_string(),
                })
                .collect();
            format!("{path}?{}", options.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

fn secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k == "authmechanismproperties"
        || ["password", "secret", "token"]
            .iter()
            .any(|w| k.contains(w))
}

/// The first directive of a `tracing` filter that is not a level nor `target=level`. A
/// bare word is a valid filter (every level of the target of that name), but a log level
/// of `verbose` or `warning` would then silence the whole log: refuse it.
fn bad_log_directive(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    filter.split(',').find(|d| match d.rsplit_once('=') {
        Some((target, level)) => target.trim().is_empty() || !is_level(level),
        None => !is_level(d),
    })
}

/// An origin as a browser sends it in `Origin`: its scheme and host in lower case, and
/// without the scheme's default port (`https://Shop.example:443` is sent as
/// `https://shop.example`).
pub fn normalized_origin(origin: &str) -> String {
    let o = origin.to_ascii_lowercase();
    if o.starts_with("https://") {
        o.strip_suffix(":443").map(str::to_string).unwrap_or(o)
    } else if o.starts_with("http://") {
        o.strip_suffix(":80").map(str::to_string).unwrap_or(o)
    } else {
        o
    }
}

/// Whether a browser's `Origin` is among `allowed` (normalized `server.cors_origins`):
/// `*`, the same origin, or one under a `*.` entry (`https://*.shop.example` takes
/// `https://www.shop.example` and `https://a.b.shop.example`, not `https://shop.example`
/// nor `http://www.shop.example`).
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|a| {
        a == "*"
            || a == origin
            || a.split_once("://*.").is_some_and(|(scheme, parent)| {
                origin
                    .strip_prefix(scheme)
                    .and_then(|o| o.strip_prefix("://"))
                    .and_then(|host| host.strip_suffix(parent))
                    .and_then(|sub| sub.strip_suffix('.'))
                    .is_some_and(|sub| {
                        !sub.is_empty()
                            && !sub.starts_with('.')
                            && sub
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn check(text: &str) -> Result<Config, ConfigError> {
        let raw = parse("test.toml", text)?;
        validate("test.toml", &BTreeMap::new(), raw, &no_env)
    }

    #[test]
    fn s3_write_settings_are_checked() {
        let ok = "[s3]\nserver_side_encryption = \"aws:kms\"\nsse_kms_key_id = \"alias/exports\"\nstorage_class = \"STANDARD_IA\"\nexpected_bucket_owner = \"123456789012\"\n";
        let c = check(ok).unwrap();
        assert_eq!(
            (
                c.s3.server_side_encryption.as_str(),
                c.s3.storage_class.as_str()
            ),
            ("aws:kms", "STANDARD_IA")
        );
        for (text, field) in [
            (
                "[s3]\nserver_side_encryption = \"aes256\"\n",
                "s3.server_side_encryption",
            ),
            ("[s3]\nsse_kms_key_id = \"alias/x\"\n", "s3.sse_kms_key_id"),
            (
                "[s3]\nserver_side_encryption = \"AES256\"\nsse_kms_key_id = \"k\"\n",
                "s3.sse_kms_key_id",
            ),
            ("[s3]\nstorage_class = \"GLACIER\"\n", "s3.storage_class"),
            (
                "[s3]\nstorage_class = \"DEEP_ARCHIVE\"\n",
                "s3.storage_class",
            ),
            (
                "[s3]\nexpected_bucket_owner = \"12345\"\n",
                "s3.expected_bucket_owner",
            ),
        ] {
            let err = check(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_is_a_working_local_config() {
        let c = check("").unwrap();
        assert_eq!(c.database, "sluice");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.destination, Destination::Local("./sluice-output".into()));
        assert_eq!(c.warnings.len(), 1, "no write key must be warned about");
    }

    #[test]
    fn a_file_s_errors_are_said_at_their_lines_as_many_as_are_found() {
        let text = "[tracking]\nbots = \"sometimes\"\nwriterz = 3\n\n[[schedules]]\nname = \"a\"\ntype = \"DAILY_ANALYTICS\"\ncron = \"0 0 25 * * *\"\n\n[[schedules]]\nname = \"b\"\ntype = \"EVENT_DATA\"\n\n[[schedules]]\nname = \"c\"\ntype = \"USER_DATA\"\ncron = \"0 0 2 * * *\"\ntimezone = \"Mars/Olympus\"\n\n[plugins]\nfuel = \"yes\"\n";
        let path = std::env::temp_dir().join(format!("sluice-errors-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let ConfigError::Several(all) = &err else {
            panic!("one error: {err}");
        };
        let said: Vec<String> = all.iter().map(ToString::to_string).collect();
        let line = |needle: &str| 1 + text.lines().position(|l| l == needle).unwrap();
        let third = 1 + text
            .match_indices("[[schedules]]")
            .nth(1)
            .map(|(at, _)| text[..at].lines().count())
            .unwrap();
        let at = |n: usize, rest: &str| format!("{}:{n}: {rest}", path.display());
        let expected = [
            at(line("bots = \"sometimes\""), "field `tracking.bots`"),
            at(
                line("writerz = 3"),
                "field `tracking.writerz`: unknown field `writerz`",
            ),
            at(line("cron = \"0 0 25 * * *\""), "field `schedules[0].cron`"),
            // Missing its cron: the table, at its header, which sets it aside whole; the
            // next is still said with the file's index.
            at(third, "table `schedules[1]`: missing field `cron`"),
            at(
                line("timezone = \"Mars/Olympus\""),
                "field `schedules[2].timezone`",
            ),
            at(line("fuel = \"yes\""), "field `plugins.fuel`: invalid type"),
        ];
        assert_eq!(said.len(), expected.len(), "{said:#?}");
        for (said, expected) in said.iter().zip(&expected) {
            assert!(said.starts_with(expected), "{said}\nexpected {expected}");
        }
        // Said as a command prints it: one per line.
        assert_eq!(err.to_string().matches("\nerror: ").count(), 5, "{err}");
    }

    /// Past ten errors, the ten said are the first in the file, not the first the search
    /// came to (it reads `[tracking]`'s fields in the format's order: `writers` late).
    #[test]
    fn the_errors_said_are_the_first_ten_in_the_file() {
        let text = "[tracking]\nwriters = \"x\"\nqueue_capacity = -1\nmax_batch_events = \"a\"\nmax_event_bytes = \"b\"\nmax_batch_bytes = \"c\"\nwrite_timeout_seconds = 0\nbots = \"sometimes\"\nmax_future_seconds = \"d\"\nsession_timeout_minutes = \"e\"\nwrite_batch_size = \"f\"\nqueue_wait_ms = \"g\"\n";
        let path =
            std::env::temp_dir().join(format!("sluice-first-ten-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let ConfigError::Several(all) = &err else {
            panic!("{err}")
        };
        let lines: Vec<usize> = all.iter().filter_map(ConfigError::line).collect();
        assert_eq!(lines, (2..=11).collect::<Vec<_>>(), "{err}");
        assert!(
            err.to_string().contains(
                "writers`: invalid type: string \"x\", expected a whole number, 0 or more"
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("the first 10 errors in the file's order"));
    }

    #[test]
    fn fields_beside_a_wrong_one_are_checked_on_their_own() {
        let text = "[[schedules]]\nname = \"nightly analytics\"\ntype = \"DAILY_ANALYTICS\"\ncron = \"0 0 25 * * *\"\ntimezone = \"Europe/Pariss\"\n\n[s3]\nserver_side_encryption = \"aes256\"\nsse_kms_key_id = \"alias/x\"\n";
        let path = std::env::temp_dir().join(format!("sluice-beside-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let said = err.to_string();
        for field in [
            "schedules[0].name",
            "schedules[0].cron",
            "schedules[0].timezone",
            "s3.server_side_encryption",
        ] {
            assert!(
                said.contains(&format!("field `{field}`")),
                "{field}: {said}"
            );
        }
        // A KMS key is refused without `aws:kms`: that follows from setting the typo aside.
        assert!(!said.contains("s3.sse_kms_key_id"), "{said}");
        // A check naming a field set aside (now at its default) is not said either.
        let text = "[server]\nlisten = \"localhost:9000\"\nops_listen = \"0.0.0.0:8080\"\n";
        std::fs::write(&path, text).unwrap();
        let err = load(Some(&path), &no_env).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let said = err.to_string();
        assert!(said.contains("field `server.listen`"), "{said}");
        assert!(!said.contains("server.ops_listen"), "{said}");
    }

    #[test]
    fn a_queue_wait_beyond_half_the_write_deadline_is_held_to_it_and_said() {
        let c = check("[tracking]\nqueue_wait_ms = 600000\nwrite_timeout_seconds = 1\n").unwrap();
        assert_eq!(c.tracking.queue_wait_ms, 500);
        assert!(c.redacted_toml().contains("queue_wait_ms = 500\n"));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("`tracking.queue_wait_ms` (600000) is more than half")),
            "{:?}",
            c.warnings
        );
        let c = check("[tracking]\nqueue_wait_ms = 5000\n").unwrap();
        assert_eq!(c.tracking.queue_wait_ms, 5000, "half of the default 10 s");
        assert!(!c.warnings.iter().any(|w| w.contains("queue_wait_ms")));
    }

    #[test]
    fn an_export_type_may_have_a_chain_of_its_own() {
        use crate::model::ExportJobType;
        let c = check("[plugins]\nexport_transforms = [\"bot-filter\", \"redact-pii\"]\nexport_transforms_by_type = { USER_DATA = [\"redact-pii\"], DAILY_ANALYTICS = [] }\n").unwrap();
        let p = &c.plugins;
        assert_eq!(
            p.export_chain(ExportJobType::EventData),
            ["bot-filter", "redact-pii"]
        );
        assert_eq!(p.export_chain(ExportJobType::UserData), ["redact-pii"]);
        assert!(p.export_chain(ExportJobType::DailyAnalytics).is_empty());
        // An archive is given the chain to say it runs none of it.
        assert_eq!(
            p.export_chain(ExportJobType::Archive),
            ["bot-filter", "redact-pii"]
        );
        assert_eq!(p.export_plugins(), ["bot-filter", "redact-pii"]);
        for kind in ["ARCHIVE", "user_data"] {
            let err = check(&format!(
                "[plugins.export_transforms_by_type]\n{kind} = [\"noop\"]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("field `plugins.export_transforms_by_type.{kind}`: expected an export type with records to transform")),
                "{err}"
            );
        }
    }

    #[test]
    fn api_config_env_naming_sluice_s_own_variables_is_warned_of() {
        let c = check("[security]\napi_config_env = [\"SHOP_*\", \"SLUICE_S3_*\"]\n").unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("`security.api_config_env[1]`: `SLUICE_S3_*` has no effect")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn a_path_starting_with_a_tilde_is_warned_of() {
        let c = check("[plugins]\ndir = \"~/plugins\"\ncompile_cache = \"/var/cache/sluice\"\n[export]\nwork_dir = \"~/work\"\n").unwrap();
        let tilde: Vec<_> = c
            .warnings
            .iter()
            .filter(|w| w.contains("starts with `~`"))
            .collect();
        assert_eq!(tilde.len(), 2, "{:?}", c.warnings);
        assert!(
            tilde[0].starts_with("`plugins.dir`: `~/plugins`"),
            "{tilde:?}"
        );
        assert!(
            tilde[1].starts_with("`export.work_dir`: `~/work`"),
            "{tilde:?}"
        );
    }

    #[test]
    fn a_per_client_limit_without_trusted_proxies_is_warned_of() {
        let limit = "[server]\nrate_limit_per_client = 20\n";
        let c = check(limit).unwrap();
        let warned: Vec<_> = c
            .warnings
            .iter()
            .filter(|w| w.contains("server.trusted_proxies"))
            .collect();
        assert_eq!(warned.len(), 1, "{:?}", c.warnings);
        assert!(
            warned[0].starts_with("`server.rate_limit_per_client` limits"),
            "{warned:?}"
        );
        let both =
            "[server]\nrate_limit_per_client = 20\n[tracking]\nmax_in_flight_per_client_mb = 8\n";
        let c = check(both).unwrap();
        assert!(
            c.warnings.iter().any(|w| w.starts_with(
                "`server.rate_limit_per_client` and `tracking.max_in_flight_per_client_mb` limit"
            )),
            "{:?}",
            c.warnings
        );
        for quiet in [
            "[server]\nrate_limit_per_client = 20\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
            "[server]\nrate_limit_per_key = 20\n",
        ] {
            let c = check(quiet).unwrap();
            assert!(
                !c.warnings.iter().any(|w| w.contains("trusted_proxies")),
                "{quiet}: {:?}",
                c.warnings
            );
        }
    }

    #[test]
    fn a_queue_too_small_for_segment_batches_is_warned_of() {
        let c = check("[tracking]\nqueue_capacity = 2000\nwriters = 2\n").unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("at most 500 messages")
                && w.contains("`tracking.queue_capacity` to 10000")),
            "{:?}",
            c.warnings
        );
        let c = check("[tracking]\nqueue_capacity = 10000\nwriters = 2\n").unwrap();
        assert!(
            !c.warnings.iter().any(|w| w.contains("Segment")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn day_by_day_settings_are_shown_where_they_apply_and_warned_of_elsewhere() {
        let schedule = |kind: &str, extra: &str| {
            format!(
                "[[schedules]]\nname = \"{}\"\ntype = \"{kind}\"\ncron = \"0 0 2 * * *\"\n{extra}",
                kind.to_lowercase().replace('_', "-")
            )
        };
        let c = check(&format!(
            "{}{}{}",
            schedule("EVENT_DATA", ""),
            schedule("ARCHIVE", ""),
            schedule("USER_DATA", "catch_up = 3\nlate_days_per_run = 2\n"),
        ))
        .unwrap();
        let shown: toml::Table = c.redacted_toml().parse().unwrap();
        let shown = shown["schedules"].as_array().unwrap();
        // The effective values, defaults included, for the kind that uses them.
        assert_eq!(shown[0]["catch_up"].as_integer(), Some(7));
        assert_eq!(shown[0]["late_days_per_run"].as_integer(), Some(7));
        // None for a kind that does not, unless written (and then warned of).
        assert!(shown[1].get("catch_up").is_none() && shown[1].get("late_days_per_run").is_none());
        assert_eq!(shown[2]["catch_up"].as_integer(), Some(3));
        let warned: Vec<_> = c
            .warnings
            .iter()
            .filter(|w| w.contains("has no effect on a USER_DATA schedule"))
            .collect();
        assert_eq!(warned.len(), 2, "{:?}", c.warnings);
        assert!(warned[0].contains("`schedules[2].catch_up`"), "{warned:?}");
        assert!(
            !c.warnings.iter().any(|w| w.contains("ARCHIVE")),
            "{:?}",
            c.warnings
        );
        let day = c.schedules.iter().find(|s| s.name == "event-data").unwrap();
        assert_eq!((day.catch_up(), day.late_days_per_run()), (7, 7));
    }

    #[test]
    fn a_log_level_that_would_silence_the_log_is_refused() {
        for ok in [
            "info",
            "DEBUG",
            "sluice=debug,info",
            "sluice_jobs = trace , warn",
        ] {
            assert!(check(&format!("[log]\nlevel = \"{ok}\"\n")).is_ok(), "{ok}");
        }
        for bad in ["verbose", "warning", "info,sluice=loud", "=debug", ""] {
            let err = check(&format!("[log]\nlevel = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("log.level"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_event_size_that_could_pass_the_time_series_limit_is_refused() {
        let err = check("[tracking]\nmax_batch_bytes = 1048576\nmax_event_bytes = 262145\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tracking.max_event_bytes") && err.contains("at most 262144"),
            "{err}"
        );
        assert!(check("[tracking]\nmax_batch_bytes = 1048576\nmax_event_bytes = 262144\n").is_ok());
        // A compressed full batch must fit the in-flight bound (twice 1.5 MiB: 3 MiB).
        let err = check("[tracking]\nmax_batch_bytes = 1572864\nmax_in_flight_mb = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tracking.max_in_flight_mb") && err.contains("3 to 1048576"),
            "{err}"
        );
        assert!(check("[tracking]\nmax_batch_bytes = 1572864\nmax_in_flight_mb = 3\n").is_ok());
        // A client's share: 0, or a compressed batch's room up to the whole.
        for (share, ok) in [(0, true), (1, false), (2, true), (64, true), (65, false)] {
            let checked = check(&format!(
                "[tracking]\nmax_batch_bytes = 1048576\nmax_in_flight_mb = 64\nmax_in_flight_per_client_mb = {share}\n"
            ));
            assert_eq!(checked.is_ok(), ok, "{share}: {checked:?}");
            if let Err(e) = checked {
                assert!(
                    e.to_string()
                        .contains("tracking.max_in_flight_per_client_mb"),
                    "{e}"
                );
            }
        }
        let err = check("[tracking]\nmax_batch_bytes = 1073741825\nmax_in_flight_mb = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tracking.max_batch_bytes"), "{err}");
    }

    #[test]
    fn plugin_configs_reach_plugins_as_json_with_dates_as_text() {
        let c = check(
            "[plugins.config.p]\nsince = 2024-01-02\nat = 1979-05-27T07:32:00Z\nn = 1.5\nlist = [1, \"a\"]\n[plugins.config.p.sub]\nk = true\n",
        )
        .unwrap();
        assert_eq!(
            c.plugin_configs.json("p"),
            serde_json::json!({
                "since": "2024-01-02", "at": "1979-05-27T07:32:00Z", "n": 1.5,
                "list": [1, "a"], "sub": { "k": true },
            })
        );
        assert_eq!(c.plugin_configs.json("other"), serde_json::json!({}));
        let err = check("[plugins.config.p]\nx = [1.0, nan]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugins.config.p.x[1]"), "{err}");
    }

    #[test]
    fn a_queue_share_smaller_than_one_batch_is_refused() {
        let err = check("[tracking]\nqueue_capacity = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tracking.queue_capacity") && err.contains("(500 × 4), got 1000"),
            "{err}"
        );
        assert!(check("[tracking]\nqueue_capacity = 1000\nwriters = 2\n").is_ok());
    }

    #[test]
    fn a_file_url_destination_takes_an_absolute_path() {
        for (text, path) in [
            ("file:///data/out", "/data/out"),
            ("file://localhost/data/out", "/data/out"),
            ("out/exports", "out/exports"),
            // A folder named `localhost` is a folder, not a host.
            ("localhost/out", "localhost/out"),
        ] {
            assert_eq!(
                Destination::parse(text),
                Ok(Destination::Local(PathBuf::from(path))),
                "{text}"
            );
        }
        for bad in ["file://exports/x", "file://", "ftp://host/x"] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
        let err = Destination::parse("file://exports/x").unwrap_err();
        assert!(err.contains("takes an absolute path"), "{err}");
    }

    #[test]
    fn schedule_errors_read_as_what_was_expected_and_what_was_got() {
        let schedule = |kind: &str, cron: &str| {
            check(&format!(
                "[[schedules]]\nname = \"d\"\ntype = \"{kind}\"\ncron = \"{cron}\"\n"
            ))
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        let err = schedule("EVENTDATA", "0 0 2 * * *");
        assert!(
            err.ends_with(
                "expected one of DAILY_ANALYTICS, USER_DATA, EVENT_DATA, ARCHIVE, got `EVENTDATA`"
            ),
            "{err}"
        );
        let err = schedule("EVENT_DATA", "0 0 0 31 2 *");
        assert!(
            err.contains("expected a cron expression that fires again; `0 0 0 31 2 *` never does"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_scheduler_setting_is_named_by_its_own_field() {
        for (text, field) in [
            ("lease_seconds = 1", "scheduler.lease_seconds"),
            ("reload_seconds = 0", "scheduler.reload_seconds"),
            ("max_concurrent_runs = 0", "scheduler.max_concurrent_runs"),
        ] {
            let err = check(&format!("[scheduler]\n{text}\n"));
            let err = err.map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{text}: {err}");
        }
    }

    #[test]
    fn a_plugin_deadline_ceiling_is_1_ms_to_10_minutes() {
        let c = check("[plugins]\nmax_batch_deadline_ms = 600000\n").unwrap();
        assert_eq!(c.plugins.max_batch_deadline_ms, 600_000);
        for bad in ["0", "600001", "18446744073709551615"] {
            let err = check(&format!("[plugins]\nmax_batch_deadline_ms = {bad}\n"));
            let err = err.map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains("plugins.max_batch_deadline_ms"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_grace_period_for_replaced_parts_is_at_most_a_week() {
        let c = check("[export]\nkeep_replaced_parts_minutes = 30\n").unwrap();
        assert_eq!(c.keep_replaced_parts, std::time::Duration::from_secs(1800));
        let err = check("[export]\nkeep_replaced_parts_minutes = 20000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("export.keep_replaced_parts_minutes"), "{err}");
    }

    #[test]
    fn origins_are_matched_as_browsers_send_them() {
        let c = check("[server]\ncors_origins = [\"https://Shop.example:443\", \"http://localhost:80\", \"https://*.shop.example\", \"http://dev.example:8080\"]\n").unwrap();
        assert_eq!(
            c.cors_origins,
            [
                "https://shop.example",
                "http://localhost",
                "https://*.shop.example",
                "http://dev.example:8080"
            ]
        );
        for (origin, allowed) in [
            ("https://shop.example", true),
            ("http://localhost", true),
            ("https://www.shop.example", true),
            ("https://a.b.shop.example", true),
            ("http://dev.example:8080", true),
            ("http://www.shop.example", false),
            ("https://evilshop.example", false),
            ("https://www.shop.example.evil", false),
            ("https://shop.example:8443", false),
            ("http://dev.example", false),
        ] {
            assert_eq!(origin_allowed(&c.cors_origins, origin), allowed, "{origin}");
        }
        for bad in [
            "https://*shop.example",
            "https://www.*.example",
            "*.shop.example",
            "https://*.",
        ] {
            let err = check(&format!("[server]\ncors_origins = [\"{bad}\"]\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("server.cors_origins[0]"), "{bad}: {err}");
        }
    }

    #[test]
    fn server_limits_and_origins_that_could_never_work_are_refused() {
        let c = check("[server]\nbody_timeout_seconds = 5\ncors_origins = [\"https://shop.example:8443\", \"*\"]\n").unwrap();
        assert_eq!(c.body_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.header_timeout, std::time::Duration::from_secs(30));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.ops_listen, None);
        let c = check("[server]\nops_listen = \"0.0.0.0:9090\"\n").unwrap();
        assert_eq!(c.ops_listen.unwrap().port(), 9090);
        for (text, field) in [
            (
                "[server]\nops_listen = \"9090\"\n",
                "server.ops_listen",
            ),
            (
                "[server]\nlisten = \"0.0.0.0:8080\"\nops_listen = \"0.0.0.0:8080\"\n",
                "server.ops_listen",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:8080\"\nops_listen = \"[::]:8080\"\n",
                "server.ops_listen",
            ),
            (
                "[server]\nbody_timeout_seconds = 0\n",
                "server.body_timeout_seconds",
            ),
            (
                "[server]\nheader_timeout_seconds = 0\n",
                "server.header_timeout_seconds",
            ),
            (
                "[server]\nmax_connections = 0\n",
                "server.max_connections",
            ),
            (
                "[server]\ncors_origins = [\"https://shop.example/\"]\n",
                "server.cors_origins[0]",
            ),
            (
                "[server]\ncors_origins = [\"https://shop.example/app\"]\n",
                "server.cors_origins[0]",
            ),
            (
                "[server]\ncors_origins = [\"https://\"]\n",
                "server.cors_origins[0]",
            ),
            (
                "[tracking]\nsession_timeout_minutes = 100000000\n",
                "tracking.session_timeout_minutes",
            ),
            (
                "[[schedules]]\nname = \"d\"\ntype = \"EVENT_DATA\"\ncron = \"0 0 2 * * *\"\ncatch_up = 0\n",
                "schedules[0].catch_up",
            ),
            (
                "[[schedules]]\nname = \"d\"\ntype = \"EVENT_DATA\"\ncron = \"0 0 2 * * *\"\nlate_days_per_run = 0\n",
                "schedules[0].late_days_per_run",
            ),
            (
                "[[schedules]]\nname = \"\"\ntype = \"EVENT_DATA\"\ncron = \"0 0 2 * * *\"\n",
                "schedules[0].name",
            ),
            (
                "[[schedules]]\nname = \"daily export\"\ntype = \"EVENT_DATA\"\ncron = \"0 0 2 * * *\"\n",
                "schedules[0].name",
            ),
        ] {
            let err = check(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_field_is_named_with_the_file() {
        let err = check("[mongodb]\nurii = \"x\"\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml"), "{err}");
        assert!(err.contains("urii"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field_and_line() {
        let err = check("[server]\nlisten = 42\n").unwrap_err().to_string();
        assert!(err.contains("listen") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn invalid_value_names_field_and_expectation() {
        let err = check("[mongodb]\nuri = \"http://db\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "test.toml: field `mongodb.uri`: expected a `mongodb://` or `mongodb+srv://` connection string"
        );
        let err = check("[mongodb]\nuri = \"${env:MY_URI}\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_MONGODB_URI"), "{err}");
        let err = check("[plugins.config.redact-pii]\nsalt = \"${env:SLUICE_TEST_UNSET_SALT}\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`plugins.config.redact-pii.salt`")
                && err.contains("SLUICE_TEST_UNSET_SALT"),
            "{err}"
        );
        let err = check("[tracking]\nbots = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`tracking.bots`") && err.contains("`maybe`"),
            "{err}"
        );
        for bad in ["-1", "9223372036854775807"] {
            let err = check(&format!("[tracking]\nmax_future_seconds = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("`tracking.max_future_seconds`"), "{err}");
        }
        let err = check("[export]\ndestination = \"s3://A\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`export.destination`"), "{err}");
        for proxy in ["10.0.0.0/abc", "10.0.0.0/33", "::1/129", "10.0.0/8"] {
            let text = format!("[server]\ntrusted_proxies = [\"{proxy}\"]\n");
            let err = check(&text).unwrap_err().to_string();
            assert!(
                err.contains("`server.trusted_proxies[0]`"),
                "{proxy}: {err}"
            );
        }
        for proxy in ["10.0.0.0/8", "192.168.1.7", "fd00::/8"] {
            let text = format!("[server]\ntrusted_proxies = [\"{proxy}\"]\n");
            assert!(check(&text).is_ok(), "{proxy}");
        }
    }

    #[test]
    fn server_write_keys_are_secrets_and_no_key_is_in_both_lists() {
        let raw = parse(
            "f.toml",
            "[server]\nwrite_keys = [\"browser-key-1\"]\nserver_write_keys = [\"${env:SK}\"]\n",
        )
        .unwrap();
        let env = |k: &str| (k == "SK").then(|| "server-key-from-env".to_string());
        let c = validate("f.toml", &BTreeMap::new(), raw, &env).unwrap();
        assert_eq!(c.server_write_keys[0].expose(), "server-key-from-env");
        assert!(c.env_references().contains(&"SK".to_string()));
        assert!(!c.redacted_toml().contains("server-key-from-env"));
        assert!(!c.warnings.iter().any(|w| w.contains("without a key")));

        let raw = parse(
            "f.toml",
            "[server]\nwrite_keys = [\"same-key-123\"]\nserver_write_keys = [\"same-key-123\"]\n",
        )
        .unwrap();
        let err = validate("f.toml", &BTreeMap::new(), raw, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.server_write_keys[0]"), "{err}");

        // Server keys alone: a key is required, so browsers are turned away; said so.
        let raw = parse(
            "f.toml",
            "[server]\nserver_write_keys = [\"server-key-123\"]\n",
        )
        .unwrap();
        let c = validate("f.toml", &BTreeMap::new(), raw, &|_| None).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("only server-side keys")),
            "{:?}",
            c.warnings
        );

        let raw = parse("f.toml", "[server]\nserver_write_keys = [\"short\"]\n").unwrap();
        let err = validate("f.toml", &BTreeMap::new(), raw, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.server_write_keys[0]") && err.contains("8"),
            "{err}"
        );
    }

    #[test]
    fn secrets_resolve_from_env_and_are_never_printed() {
        let raw = parse(
            "f.toml",
            "[server]\nwrite_keys = [\"${env:WK}\", \"literal-key-123\"]\n",
        )
        .unwrap();
        let env = |k: &str| (k == "WK").then(|| "from-env-key-456".to_string());
        let c = validate("f.toml", &BTreeMap::new(), raw, &env).unwrap();
        assert_eq!(c.write_keys[0].expose(), "from-env-key-456");
        let shown = c.redacted_toml();
        assert!(shown.contains("${env:WK}"), "{shown}");
        assert!(!shown.contains("from-env-key-456") && !shown.contains("literal-key-123"));
        assert!(!format!("{c:?}").contains("literal-key-123"));

        let raw = parse(
            "f.toml",
            "[security]\ntoken_key = \"${env:TK}\"\n[plugins.config.redact-pii]\nsalt = \"${env:SALT}\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "TK" => Some("token-key-from-env-0123".to_string()),
            "SALT" => Some("salt-from-env-0123456".to_string()),
            _ => None,
        };
        let c = validate("f.toml", &BTreeMap::new(), raw, &env).unwrap();
        assert_eq!(
            c.token_key.as_ref().unwrap().expose(),
            "token-key-from-env-0123"
        );
        assert_eq!(
            c.plugin_configs.0["redact-pii"]["salt"].as_str(),
            Some("salt-from-env-0123456")
        );
        let shown = format!("{}\n{c:?}", c.redacted_toml());
        assert!(
            !shown.contains("token-key-from-env") && !shown.contains("salt-from-env"),
            "{shown}"
        );
    }

    #[test]
    fn missing_secret_variable_names_field_and_variable() {
        let raw = parse(
            "f.toml",
            "[s3]\naccess_key = \"${env:AK}\"\nsecret_key = \"x\"\n",
        )
        .unwrap();
        let err = validate("f.toml", &BTreeMap::new(), raw, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`s3.access_key`") && err.contains("`AK`"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_in_errors() {
        let env = |k: &str| match k {
            "SLUICE_MONGODB_DATABASE" => Some("other".to_string()),
            "SLUICE_SERVER_LISTEN" => Some("nonsense".to_string()),
            _ => None,
        };
        let err = load(None, &env).unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_SERVER_LISTEN") && err.contains("server.listen"),
            "{err}"
        );
        let env = |k: &str| (k == "SLUICE_MONGODB_DATABASE").then(|| "other".to_string());
        assert_eq!(load(None, &env).unwrap().database, "other");
    }

    #[test]
    fn an_empty_write_keys_variable_and_a_huge_archive_age_are_refused() {
        let env = |k: &str| (k == "SLUICE_SERVER_WRITE_KEYS").then(|| " , ".to_string());
        let err = load(None, &env).unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_SERVER_WRITE_KEYS") && err.contains("set but empty"),
            "{err}"
        );
        // A variable set but empty is a value (an empty `s3.access_key`: the AWS chain).
        let env = |k: &str| (k == "EMPTY_KEY").then(String::new);
        let raw = parse(
            "t.toml",
            "[s3]\naccess_key = \"${env:EMPTY_KEY}\"\nsecret_key = \"${env:EMPTY_KEY}\"\n",
        )
        .unwrap();
        assert!(validate("t.toml", &BTreeMap::new(), raw, &env).is_ok());
        // A flag says all it takes.
        let env = |k: &str| (k == "SLUICE_S3_PATH_STYLE").then(|| "yes".to_string());
        let err = load(None, &env).unwrap_err().to_string();
        assert!(err.contains("`true`, `false`, `1` or `0`"), "{err}");
        // Every variable that cannot be read is said at once.
        let env = |k: &str| match k {
            "SLUICE_S3_PATH_STYLE" | "SLUICE_S3_CHECKSUMS" => Some("yes".to_string()),
            _ => None,
        };
        let err = load(None, &env).unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_S3_PATH_STYLE") && err.contains("SLUICE_S3_CHECKSUMS"),
            "{err}"
        );
        // A bad entry of the variable names the variable, not the file it overrides.
        let env =
            |k: &str| (k == "SLUICE_SERVER_WRITE_KEYS").then(|| "long-enough,short".to_string());
        let err = load(None, &env).unwrap_err().to_string();
        assert!(
            err.contains("SLUICE_SERVER_WRITE_KEYS") && err.contains("write_keys[1]"),
            "{err}"
        );
        for (field, set) in [
            (
                "write_timeout_seconds",
                (|r: &mut RawConfig| r.tracking.write_timeout_seconds = u64::MAX)
                    as fn(&mut RawConfig),
            ),
            ("session_timeout_minutes", |r| {
                r.tracking.session_timeout_minutes = 10_081
            }),
            ("api_config_env[0]", |r| {
                r.security.api_config_env = vec!["*".into()]
            }),
            ("api_config_env[1]", |r| {
                r.security.api_config_env = vec!["A_*".into(), "B-C".into()]
            }),
        ] {
            let mut raw = RawConfig::default();
            set(&mut raw);
            let err = validate("t", &Default::default(), raw, &|_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        for days in [0, 36_501, u32::MAX] {
            let mut raw = RawConfig::default();
            raw.export.archive_after_days = days;
            let err = validate("t", &Default::default(), raw, &|_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("1 to 36500 days"), "{days}: {err}");
        }
    }

    #[test]
    fn every_env_override_has_a_setter() {
        for (var, field) in ENV_OVERRIDES {
            let mut raw = RawConfig::default();
            // Each flag set to what its default is not.
            let value = match *field {
                "s3.path_style" => "true",
                "s3.checksums" => "false",
                _ => "x",
            };
            assert!(
                apply_override(&mut raw, field, value.into()).is_ok(),
                "{var} -> {field}"
            );
            assert_ne!(raw, RawConfig::default(), "{var} changed nothing");
        }
    }

    #[test]
    fn uri_password_is_masked() {
        assert_eq!(
            mask_uri_password("mongodb+srv://app:s3cret@cluster0.example/db"),
            "mongodb+srv://app:<redacted>@cluster0.example/db"
        );
        assert_eq!(
            mask_uri_password("mongodb://a:p@h1,h2/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tok&tlsCertificateKeyFilePassword=pw&replicaSet=rs0"),
            "mongodb://a:<redacted>@h1,h2/?authMechanism=MONGODB-AWS&authMechanismProperties=<redacted>&tlsCertificateKeyFilePassword=<redacted>&replicaSet=rs0"
        );
        // No credentials: unchanged, even with an `@` in an option.
        let plain = "mongodb://h1:27017/db?appName=ops@team&w=majority";
        assert_eq!(mask_uri_password(plain), plain);
    }
}
