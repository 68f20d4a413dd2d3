//! The HTTP source (pull pages from an API) and sink (push batches to it): auth (API key,
//! basic, OAuth2 client credentials / refresh token with a cached token refreshed before
//! expiry), pagination with loop guards, retries with exponential backoff and full jitter
//! on network errors and 5xx, `Retry-After` on 429, a per-connector request rate, and a
//! guard against endpoints on loopback, link-local (cloud metadata) or private addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oauth2::{ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::integration::{
    at_chain, first, records_miss, records_not_a_list, select_records, Auth, Connector, Paging,
};
use sluice_core::model::HttpMethod;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address itself is logged, not in the error: run errors are read by USER
    /// accounts, and an ADMIN's config naming internal hosts would map them.
    #[error("`{url}` is refused: it resolves to a {kind} address (set `allow_private_network = true` to allow it)")]
    PrivateNetwork { url: String, kind: &'static str },
    #[error("cannot resolve `{host}`: {message}")]
    Resolve { host: String, message: String },
    #[error("OAuth token request to `{url}` failed: {message}")]
    Token { url: String, message: String },
    /// The token endpoint did not answer, or answered something other than an OAuth
    /// answer (a 5xx page): retried like a failed request.
    #[error("OAuth token request to `{url}` got no usable answer: {message}")]
    TokenUnavailable {
        url: String,
        message: String,
        /// The `Retry-After` of a 429 or 503 answer.
        retry_after: Option<Duration>,
    },
    #[error("`{url}` answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("`{url}` sent malformed JSON: {message}")]
    Malformed { url: String, message: String },
    #[error("`{url}`: {message}")]
    Network { url: String, message: String },
    #[error("`{url}` failed after {attempts} attempts; last error: {last}")]
    Exhausted {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("{0}")]
    Selector(String),
    #[error("`{url}` is refused: pages are only fetched from the endpoint's own origin `{origin}`, the one host that was vetted and pinned")]
    OffOrigin { url: String, origin: String },
}

/// Where a page's records are.
#[derive(Debug, Clone)]
enum Records {
    /// The list at this member chain of the body (`$.data[*]`, the common selector): read
    /// in place, not copied, since a page can be large.
    InBody(Vec<String>),
    /// Copied out of the body by the JSONPath engine (any other selector).
    Copied(Vec<Value>),
}

/// What a fetched page holds.
#[derive(Debug, Clone)]
pub struct Page {
    pub url: String,
    pub body: Value,
    pub headers: HeaderMap,
    records: Records,
    /// A hash of the raw answer: tells a page served twice in a row without keeping the
    /// previous page's body.
    pub digest: u64,
    /// Set when no records were found because the response has nothing where the
    /// records selector looks (a wrong `source.records`, or an error body), as opposed to
    /// an empty list.
    pub records_missing: Option<String>,
    /// How many items the API paged: the length of the list the selector walks first
    /// (`$.orders` for `$.orders[*].lines[*]` or `$.data[?(@.active)]`), which is what
    /// offsets, short pages and empty pages are about, whatever the selector picks out of
    /// them.
    items: usize,
}

impl Page {
    /// The page's records, in order.
    pub fn records(&self) -> &[Value] {
        match &self.records {
            Records::InBody(chain) => match at_chain(&self.body, chain) {
                Some(Value::Array(items)) => items,
                _ => &[],
            },
            Records::Copied(records) => records,
        }
    }

    /// Frees the body once pagination has read what it needs from it, unless the records
    /// are read from it in place.
    pub fn release_body(&mut self) {
        if matches!(self.records, Records::Copied(_)) {
            self.body = Value::Null;
        }
    }
}

/// The length of the list a records selector walks first: the members before its first
/// `[*]` or `[?`, when they are plain members and lead to a list.
fn paged_list(body: &Value, selector: &str) -> Option<usize> {
    let selector = selector.trim();
    let at = [selector.find("[*]"), selector.find("[?")]
        .into_iter()
        .flatten()
        .min()?;
    let chain = sluice_core::integration::member_chain(&selector[..at])?;
    match at_chain(body, &chain)? {
        Value::Array(items) => Some(items.len()),
        _ => None,
    }
}

/// Where pagination stands; serializable so an interrupted import can resume from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PageState {
    /// Fetch this URL with these extra query parameters.
    Fetch {
        url: String,
        query: Vec<(String, String)>,
        page: u64,
        offset: u64,
    },
    Done,
}

/// Counters a run reports.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HttpStats {
    pub requests: u64,
    /// Attempts that failed, by what went wrong (a retried one and the last alike).
    pub failed: HttpFailures,
    pub retries: u64,
    pub token_refreshes: u64,
    /// Refresh tokens the provider rotated (each saved before use).
    pub refresh_rotations: u64,
}

/// What a client is waiting out before its next attempt, for a progress display: a
/// long `Retry-After` otherwise looks like a hung run.
#[derive(Debug, Default)]
pub struct RetryWait(std::sync::Mutex<Option<Waiting>>);

/// One wait before a retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    /// When the next attempt is sent.
    pub until: Instant,
    /// How long the whole wait is.
    pub wait: Duration,
    /// The attempt that follows the wait (1-based), of `attempts`.
    pub attempt: u32,
    pub attempts: u32,
    /// What the last attempt got (`429 Too Many Requests (Retry-After 60 s)`).
    pub why: String,
}

impl RetryWait {
    /// The wait under way, if any.
    pub fn current(&self) -> Option<Waiting> {
        self.0.lock().ok().and_then(|w| w.clone())
    }

    fn show(&self, waiting: Waiting) {
        if let Ok(mut w) = self.0.lock() {
            *w = Some(waiting);
        }
    }

    /// Clears the wait that ends at `until`, if it is still the one shown (a wait of
    /// another request may have taken its place).
    fn clear(&self, until: Instant) {
        if let Ok(mut w) = self.0.lock() {
            if w.as_ref().is_some_and(|w| w.until == until) {
                *w = None;
            }
        }
    }
}

/// Clears a wait shown in a [`RetryWait`] when dropped: at its end, or when the request
/// waiting is cancelled.
struct ShownWait<'a>(Option<(&'a RetryWait, Instant)>);

impl Drop for ShownWait<'_> {
    fn drop(&mut self) {
        if let Some((waits, until)) = self.0 {
            waits.clear(until);
        }
    }
}

/// Failed attempts of a run, by class: what an alert on an API's health tells apart.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HttpFailures {
    /// No complete answer: refused or reset connections, timeouts, a body cut short.
    pub network: u64,
    /// 5xx answers.
    pub server_error: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// Other answers that are not a success (4xx, a redirect).
    pub refused: u64,
    /// A success whose body is not JSON (often a proxy's or a login page).
    pub malformed: u64,
}

impl HttpFailures {
    /// Each class with its count, as the metrics label them.
    pub fn by_class(&self) -> [(&'static str, u64); 5] {
        [
            ("network", self.network),
            ("server_error", self.server_error),
            ("rate_limited", self.rate_limited),
            ("refused", self.refused),
            ("malformed", self.malformed),
        ]
    }
}

fn ip_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if v4.is_private() {
                Some("private")
            } else if o[0] == 0 || v4.is_broadcast() {
                Some("unspecified (\"this network\")")
            } else if o[0] == 100 && (64..128).contains(&o[1]) {
                Some("carrier-grade NAT")
            } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
                Some("IETF protocol assignment")
            } else if o[0] == 198 && (18..20).contains(&o[1]) {
                Some("benchmarking")
            } else if matches!(
                (o[0], o[1], o[2]),
                (192, 0, 2) | (198, 51, 100) | (203, 0, 113)
            ) {
                Some("documentation (TEST-NET)")
            } else if (o[0], o[1], o[2]) == (192, 88, 99) {
                Some("reserved (former 6to4 relay)")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if o[0] >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let o = v6.octets();
            let embedded =
                |at: usize| std::net::Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3]);
            // The local-use NAT64 prefix translates into the operator's own networks.
            if seg[..3] == [0x64, 0xff9b, 1] {
                return Some("local-use NAT64");
            }
            // Addresses that carry an IPv4 address a gateway reaches: judged by it.
            // IPv4-mapped and -compatible (`::a.b.c.d`), IPv4-translated
            // (`::ffff:0:a.b.c.d`), well-known NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
            let inner = if let Some(v4) = v6.to_ipv4_mapped() {
                Some(v4)
            } else if seg[..6] == [0, 0, 0, 0, 0xffff, 0]
                || (seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified())
                || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            {
                Some(embedded(12))
            } else if seg[0] == 0x2002 {
                Some(embedded(2))
            } else {
                None
            };
            if let Some(kind) = inner.and_then(|v4| ip_kind(IpAddr::V4(v4))) {
                return Some(kind);
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[..2] == [0x2001, 0xdb8] || (seg[0] == 0x3fff && seg[1] < 0x1000) {
                Some("documentation")
            } else if seg[..2] == [0x2001, 0] {
                // Tunnels to whatever IPv4 address its last 32 bits hide: not judged by it.
                Some("Teredo tunnel")
            } else if seg[..4] == [0x100, 0, 0, 0] {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

/// What non-public address `url` names literally (an IP of a private, loopback or
/// link-local range, or `localhost`), if any: known without resolving anything, so a
/// config can be refused when it is applied rather than failing each run. IPv4 is read
/// as URL parsers read a host (`127.1`, `0x7f.0.0.1`, `2130706433`), since the request
/// goes where they do.
pub fn literal_private_host(url: &str) -> Option<&'static str> {
    let host = sluice_core::integration::url_lite::parse(url).ok()?.host;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // A fully qualified name's trailing dot names the same host.
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("loopback");
    }
    let ip = match host.parse() {
        Ok(ip) => ip,
        Err(_) => std::net::IpAddr::V4(url_ipv4(&host)?),
    };
    ip_kind(ip)
}

/// An IPv4 host as the URL standard reads one: one to four numbers, each decimal, `0x`
/// hex or `0`-led octal, the last filling the bytes the others leave. `None` when it is a
/// name.
fn url_ipv4(host: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let numbers = parts
        .iter()
        .map(|p| {
            let (digits, radix) = if let Some(h) = p.strip_prefix("0x") {
                (h, 16)
            } else if p.len() > 1 && p.starts_with('0') {
                (&p[1..], 8)
            } else {
                (*p, 10)
            };
            if digits.is_empty() && radix == 16 {
                return Some(0);
            }
            u64::from_str_radix(digits, radix).ok()
        })
        .collect::<Option<Vec<u64>>>()?;
    let (last, first) = numbers.split_last()?;
    if first.iter().any(|&n| n > 255) || *last >= 1 << (8 * (5 - numbers.len())) {
        return None;
    }
    let value = first
        .iter()
        .enumerate()
        .fold(*last, |v, (i, &n)| v | n << (8 * (3 - i)));
    Some(std::net::Ipv4Addr::from(value as u32))
}

/// The host and port the HTTP client connects to for `url`, as it reads the URL.
fn client_host(url: &str) -> Result<(String, u16), HttpError> {
    let unreadable = |why: &str| HttpError::Network {
        url: url.to_string(),
        message: format!("the HTTP client cannot read this URL: {why}"),
    };
    let read = reqwest::Url::parse(url).map_err(|e| unreadable(&e.to_string()))?;
    let host = match read.host() {
        Some(oauth2::url::Host::Domain(d)) => d.to_string(),
        Some(oauth2::url::Host::Ipv4(ip)) => ip.to_string(),
        Some(oauth2::url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(unreadable("it has no host")),
    };
    let port = read
        .port_or_known_default()
        .ok_or_else(|| unreadable("it has no port"))?;
    Ok((host, port))
}

/// The first of `addrs` in a non-public range, with the range's kind.
fn first_non_public(addrs: &[SocketAddr]) -> Option<(IpAddr, &'static str)> {
    addrs
        .iter()
        .find_map(|a| ip_kind(a.ip()).map(|kind| (a.ip(), kind)))
}

/// Resolves `host` and refuses private ranges unless allowed; returns the addresses to
/// pin the connection to (so a second DNS answer cannot point elsewhere).
pub async fn vet_host(
    url: &str,
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, HttpError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| HttpError::Resolve {
            host: host.to_string(),
            message: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(HttpError::Resolve {
            host: host.to_string(),
            message: "no address".into(),
        });
    }
    if !allow_private {
        if let Some((addr, kind)) = first_non_public(&addrs) {
            tracing::warn!(url, %addr, kind, "an endpoint resolving to a non-public address was refused");
            return Err(HttpError::PrivateNetwork {
                url: url.to_string(),
                kind,
            });
        }
    }
    Ok(addrs)
}

/// Resolves the names the client was not pinned to, refusing non-public addresses unless
/// they are allowed, as [`vet_host`] does for the endpoint.
struct VettingResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some((_, kind)) = first_non_public(&addrs) {
                    let refused = format!(
                        "`{host}` resolves to a {kind} address (set `allow_private_network = true` to allow it)"
                    );
                    return Err(refused.into());
                }
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

struct Token {
    value: String,
    /// When to ask for a new one (None: the token does not expire).
    refresh_at: Option<Instant>,
}

/// A connector's HTTP side. One per run.
/// Durable storage for a refresh token the provider rotated (each refresh answers a new
/// refresh token and invalidates the old one). The client saves the new token before it
/// uses the access token that came with it, so a crash can never leave the only valid
/// refresh token in memory.
pub trait TokenVault: Send + Sync {
    /// The latest refresh token saved for this connector, if any.
    fn load(&self) -> BoxFuture<'_, Result<Option<String>, String>>;
    /// Saves `token` as the latest refresh token.
    fn save<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub struct HttpClient {
    connector: Arc<Connector>,
    client: reqwest::Client,
    token: Mutex<Option<Token>>,
    /// The refresh token to use next (refresh-token grant), once known.
    refresh: Mutex<Option<String>>,
    vault: Option<Arc<dyn TokenVault>>,
    next_request: Mutex<Instant>,
    pub stats: std::sync::Mutex<HttpStats>,
    /// Where waits before a retry are shown (see [`RetryWait`]).
    waits: Option<Arc<RetryWait>>,
    /// Access and refresh tokens this client was given (the latest few), kept out of the
    /// error texts it writes as the connector's own secrets are.
    issued: std::sync::Mutex<Vec<String>>,
}

/// Tokens of a run kept for scrubbing error texts (the latest; older ones have expired).
const ISSUED_KEPT: usize = 8;

/// Refresh a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

/// How long a token that lives `lifetime` is used before a new one is asked for:
/// [`TOKEN_MARGIN`] before it expires, or halfway through a shorter life (a token living
/// under the margin would otherwise be fetched anew for every request).
fn refresh_after(lifetime: Duration) -> Duration {
    lifetime - TOKEN_MARGIN.min(lifetime / 2)
}
/// How much of an answer's text is scrubbed of secrets before its start is quoted.
const SNIPPET_SCRUBBED: usize = 16_384;

/// `Retry-After` values are honoured up to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

impl HttpClient {
    /// The start of an answer's body for an error, the connector's secrets removed.
    fn snippet(&self, text: &str) -> String {
        // Scrubbed before it is cut, so a secret across the cut leaves no part behind (a
        // secret is far shorter than the margin read beyond the cut).
        let start: String = text.chars().take(SNIPPET_SCRUBBED).collect();
        snippet(&self.scrub(start))
    }

    /// `text` without the connector's secrets nor the tokens issued to this client.
    fn scrub(&self, text: String) -> String {
        let issued = self.issued.lock().map(|i| i.clone()).unwrap_or_default();
        scrub(&self.connector, &issued, text)
    }

    /// Notes a token given to this client, to keep it out of error texts.
    fn note_issued(&self, token: &str) {
        if let Ok(mut issued) = self.issued.lock() {
            if issued.len() >= ISSUED_KEPT {
                issued.remove(0);
            }
            issued.push(token.to_string());
        }
    }

    /// Vets the endpoint (and token URL) and builds a client pinned to the vetted addresses.
    pub async fn new(connector: Arc<Connector>) -> Result<Self, HttpError> {
        let mut builder = reqwest::Client::builder()
            .timeout(connector.timeout)
            .connect_timeout(connector.timeout.min(Duration::from_secs(10)))
            // Redirects could lead to addresses that were never vetted.
            .redirect(reqwest::redirect::Policy::none())
            // Nor may `HTTP(S)_PROXY` from the environment take the requests: a proxy
            // resolves the host again itself, past the vetted, pinned addresses (a name
            // rebound to 169.254.169.254 after vetting would reach it).
            .no_proxy()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
        let mut urls = vec![connector.endpoint.text.clone()];
        if let Auth::OAuth { token_url, .. } = &connector.auth {
            urls.push(token_url.clone());
        }
        // Names no pinned entry covers are vetted too, at each lookup: nothing this client
        // connects to by name goes unchecked, whatever URL reaches it.
        builder = builder.dns_resolver(Arc::new(VettingResolver {
            allow_private: connector.allow_private_network,
        }));
        for url in urls {
            // The host vetted is the one the client connects to: the client's own reading
            // of the URL (an IPv6 address in its shortest form, a name in lower case).
            let (host, port) = client_host(&url)?;
            let addrs = vet_host(&url, &host, port, connector.allow_private_network).await?;
            if host.parse::<IpAddr>().is_err() {
                builder = builder.resolve_to_addrs(&host, &addrs);
            }
        }
        let client = builder.build().map_err(|e| HttpError::Network {
            url: connector.endpoint.text.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            connector,
            client,
            token: Mutex::new(None),
            refresh: Mutex::new(None),
            vault: None,
            next_request: Mutex::new(Instant::now()),
            stats: Default::default(),
            waits: None,
            issued: Default::default(),
        })
    }

    /// Shows each wait before a retry in `waits`.
    pub fn with_retry_waits(mut self, waits: Arc<RetryWait>) -> Self {
        self.waits = Some(waits);
        self
    }

    /// Sleeps `wait` before attempt `attempt` (0-based) of `attempts`, showing why.
    async fn wait_to_retry(&self, wait: Duration, attempt: u32, attempts: u32, why: &str) {
        let until = Instant::now() + wait;
        let _shown = ShownWait(self.waits.as_deref().map(|waits| {
            waits.show(Waiting {
                until,
                wait,
                attempt: attempt + 1,
                attempts,
                why: why.to_string(),
            });
            (waits, until)
        }));
        tokio::time::sleep(wait).await;
    }

    /// Where rotated refresh tokens are kept (without one, a rotated token lives only as
    /// long as this client).
    pub fn with_vault(mut self, vault: Arc<dyn TokenVault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// The refresh token to present: the latest rotated one, else the configured one.
    async fn current_refresh(&self, configured: &str) -> Result<String, String> {
        let mut slot = self.refresh.lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let saved = match &self.vault {
            Some(v) => v.load().await?,
            None => None,
        };
        let t = saved.unwrap_or_else(|| configured.to_string());
        *slot = Some(t.clone());
        Ok(t)
    }

    fn bump(&self, f: impl FnOnce(&mut HttpStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Waits for the connector's request rate.
    async fn pace(&self) {
        let rate = self.connector.rate_limit_per_second;
        if rate <= 0.0 {
            return;
        }
        let gap = Duration::from_secs_f64(1.0 / rate);
        let wait = {
            let mut next = self.next_request.lock().await;
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + gap;
            at - now
        };
        tokio::time::sleep(wait).await;
    }

    /// A valid access token, fetched or refreshed when missing or about to expire.
    async fn bearer(&self, force: bool) -> Result<Option<String>, HttpError> {
        let Auth::OAuth {
            token_url,
            client_id,
            client_secret,
            scopes,
            refresh_token,
            secret_in_body,
        } = &self.connector.auth
        else {
            return Ok(None);
        };
        let mut slot = self.token.lock().await;
        let fresh = slot
            .as_ref()
            .is_some_and(|t| t.refresh_at.is_none_or(|at| at > Instant::now()));
        if fresh && !force {
            return Ok(slot.as_ref().map(|t| t.value.clone()));
        }
        let err = |message: String| HttpError::Token {
            url: token_url.clone(),
            message,
        };
        let provider = Provider {
            token_url: token_url.clone(),
            client_id: client_id.clone(),
            client_secret: client_secret.expose().to_string(),
            secret_in_body: *secret_in_body,
            asked: Default::default(),
            status: Default::default(),
            answered_refresh: Default::default(),
        };
        let token = match refresh_token {
            Some(configured) => {
                let current = self
                    .current_refresh(configured.expose())
                    .await
                    .map_err(|e| err(format!("cannot read the saved refresh token: {e}")))?;
                // In a task of its own: a run stopped mid-exchange (its lease lost, a
                // shutdown) must not drop a rotated token after the provider has spent
                // the old one. The task saves it whether or not anyone still waits.
                let exchange = tokio::spawn(exchange_refresh(
                    provider,
                    self.client.clone(),
                    self.vault.clone(),
                    current,
                    scopes.iter().map(|s| Scope::new(s.clone())).collect(),
                ));
                let exchanged = exchange
                    .await
                    .map_err(|e| err(format!("the token exchange failed: {e}")))?;
                if let Some(presented) = &exchanged.presented {
                    *self.refresh.lock().await = Some(presented.clone());
                }
                if let Some(new) = &exchanged.rotated {
                    self.note_issued(new);
                    *self.refresh.lock().await = Some(new.clone());
                }
                let token = exchanged.response?;
                if exchanged.rotated.is_some() {
                    self.bump(|s| s.refresh_rotations += 1);
                }
                token
            }
            None => provider
                .client()?
                .exchange_client_credentials()
                .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
                .request_async(&provider.http(&self.client))
                .await
                .map_err(|e| provider.failed(&e))?,
        };
        self.bump(|s| s.token_refreshes += 1);
        let value = token.access_token().secret().clone();
        self.note_issued(&value);
        *slot = Some(Token {
            value: value.clone(),
            // A provider's `expires_in` past what a clock can hold means "long-lived".
            refresh_at: token
                .expires_in()
                .and_then(|d| Instant::now().checked_add(refresh_after(d))),
        });
        Ok(Some(value))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let r = &self.connector.retry;
        let cap = r
            .initial_backoff_ms
            .saturating_mul(1 << attempt.min(16))
            .min(r.max_backoff_ms);
        Duration::from_millis(rand::random_range(0..=cap.max(1)))
    }

    /// A request error for the run history: timeouts say which limit they hit.
    fn describe(&self, e: &reqwest::Error, timed_out: &str, other: &str) -> String {
        if e.is_timeout() {
            format!(
                "{timed_out} within `timeout_seconds` ({} s)",
                self.connector.timeout.as_secs()
            )
        } else {
            // With its causes (reqwest's own text says only "error sending request":
            // the refused connection, the reset or the TLS failure is in its sources).
            // reqwest names the URL, query included, and an API key may be a query
            // parameter: the URL is shown without its query.
            let mut text = error_with_causes(e);
            if let Some(url) = e.url() {
                let mut bare = url.clone();
                bare.set_query(None);
                text = text.replace(url.as_str(), bare.as_str());
            }
            format!("{other}: {text}")
        }
    }

    /// Pushes one body (an EXPORT batch): any 2xx answer accepts it, whatever its body
    /// says (`OK`, nothing, JSON); a receiver's answer is never parsed, so an accepted
    /// batch is never sent again because its answer was not JSON.
    ///
    /// `key` goes in the `Idempotency-Key` header of every attempt.
    pub async fn push(
        &self,
        method: HttpMethod,
        url: &str,
        body: &Value,
        key: &str,
    ) -> Result<(), HttpError> {
        self.request(method, url, &[], Some((body, key)), false)
            .await
            .map(|_| ())
    }

    /// Sends one request with auth, pacing and retries; returns the parsed JSON body.
    /// `204 No Content` is `null`; any other success must carry JSON (an empty `200` in
    /// the middle of a paginated read is a broken answer, not the end of the data).
    pub async fn send(
        &self,
        method: HttpMethod,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<(Value, HeaderMap), HttpError> {
        self.request(method, url, query, body.map(|b| (b, "")), true)
            .await
            .map(|(v, h, _)| (v, h))
    }

    async fn request(
        &self,
        method: HttpMethod,
        url: &str,
        query: &[(String, String)],
        // The JSON to send, with its `Idempotency-Key` (none when empty).
        body: Option<(&Value, &str)>,
        json_answer: bool,
    ) -> Result<(Value, HeaderMap, u64), HttpError> {
        let replaced = without_params(url, query);
        let url = replaced.as_deref().unwrap_or(url);
        // Errors name the page asked for (`?page=2`), not only the endpoint. A next page's
        // URL comes from the API and may carry a key: scrubbed too, once an error needs it
        // (not for every page that succeeds).
        let shown = std::cell::LazyCell::new(|| self.scrub(shown_url(url, query)));
        let mut attempts = self.connector.retry.max_attempts;
        let mut last = String::new();
        let mut force_token = false;
        let mut refreshed_on_401 = false;
        let mut next = 0;
        while next < attempts {
            let attempt = next;
            next += 1;
            if attempt > 0 {
                self.bump(|s| s.retries += 1);
            }
            self.pace().await;
            let m = match method {
                HttpMethod::Get => reqwest::Method::GET,
                HttpMethod::Post => reqwest::Method::POST,
                HttpMethod::Put => reqwest::Method::PUT,
            };
            let mut req = self.client.request(m, url).query(query);
            for (k, v) in &self.connector.headers {
                req = req.header(k, v);
            }
            match &self.connector.auth {
                Auth::None => {}
                Auth::ApiKey { key, header, query } => match query {
                    Some(param) => req = req.query(&[(param.as_str(), key.expose())]),
                    None => {
                        req = req.header(header.as_deref().unwrap_or("X-API-Key"), key.expose())
                    }
                },
                Auth::Basic { username, password } => {
                    req = req.basic_auth(username, Some(password.expose()))
                }
                Auth::OAuth { .. } => match self.bearer(force_token).await {
                    Ok(Some(t)) => {
                        force_token = false;
                        req = req.bearer_auth(t);
                    }
                    Ok(None) => {}
                    // The provider did not answer (or answered 5xx, 429): retried like the
                    // API, not before its `Retry-After`.
                    Err(HttpError::TokenUnavailable {
                        url: token_url,
                        message,
                        retry_after: asked,
                    }) => {
                        if let Some(wait) = asked.filter(|w| *w > MAX_RETRY_AFTER) {
                            return Err(HttpError::Token {
                                url: token_url,
                                message: format!(
                                    "{message}; the token endpoint asked to wait {} s, longer than a run waits ({} s); a later run tries again",
                                    wait.as_secs(),
                                    MAX_RETRY_AFTER.as_secs()
                                ),
                            });
                        }
                        last = HttpError::TokenUnavailable {
                            url: token_url,
                            message,
                            retry_after: asked,
                        }
                        .to_string();
                        if next < attempts {
                            let wait = asked.unwrap_or_else(|| self.backoff(attempt));
                            self.wait_to_retry(wait, next, attempts, &last).await;
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            }
            if let Some((b, key)) = body {
                req = req.json(b);
                if !key.is_empty() {
                    // A pushed batch whose answer was lost (a timeout) is sent again: the
                    // same batch always carries the same key, so a receiver can drop the
                    // repeat.
                    req = req.header("Idempotency-Key", key);
                }
            }
            self.bump(|s| s.requests += 1);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    self.bump(|s| s.failed.network += 1);
                    last = self.describe(&e, "no complete answer", "network error");
                    if next < attempts {
                        self.wait_to_retry(self.backoff(attempt), next, attempts, &last)
                            .await;
                    }
                    continue;
                }
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let asked = retry_after(&headers);
            if let Some(wait) = asked.filter(|w| {
                *w > MAX_RETRY_AFTER
                    && (status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE)
            }) {
                // Retrying before the server said to only spends attempts on more refusals.
                if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    self.bump(|s| s.failed.rate_limited += 1);
                } else {
                    self.bump(|s| s.failed.server_error += 1);
                }
                return Err(HttpError::Status {
                    url: shown.clone(),
                    status: status.as_u16(),
                    body: format!(
                        "the server asked to wait {} s, longer than a run waits ({} s); a later run tries again",
                        wait.as_secs(),
                        MAX_RETRY_AFTER.as_secs()
                    ),
                });
            }
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                self.bump(|s| s.failed.rate_limited += 1);
                let why = match asked {
                    Some(w) => format!(
                        "429 Too Many Requests (the server asked to wait {} ms)",
                        w.as_millis()
                    ),
                    None => "429 Too Many Requests (no Retry-After)".into(),
                };
                if attempt + 1 == attempts {
                    last = why;
                    break;
                }
                let wait = asked
                    .unwrap_or_else(|| self.backoff(attempt))
                    .min(MAX_RETRY_AFTER);
                self.wait_to_retry(wait, next, attempts, &why).await;
                last = format!("429 Too Many Requests (waited {} ms)", wait.as_millis());
                continue;
            }
            if status == reqwest::StatusCode::UNAUTHORIZED
                && matches!(self.connector.auth, Auth::OAuth { .. })
                && !refreshed_on_401
            {
                // The token may have been revoked or expired early: refresh once, on an
                // attempt of its own (so even `max_attempts = 1` gets it).
                refreshed_on_401 = true;
                force_token = true;
                attempts += 1;
                last = "401 Unauthorized".into();
                continue;
            }
            if status.is_success() && !json_answer {
                // Accepted: the receiver's body is not needed, and failing to read it must
                // not send the batch again.
                return Ok((Value::Null, headers, 0));
            }
            let cap = self.connector.max_response_bytes;
            // An error's body is only quoted (a snippet): its start is enough, however
            // large the page an API may send.
            let text = if !status.is_success() {
                read_start(resp, ERROR_BODY_BYTES).await.map(Some)
            } else {
                read_capped(resp, cap).await
            };
            let text = match text {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return Err(HttpError::Network {
                        url: shown.clone(),
                        message: format!(
                            "the answer is larger than {} MiB (`source.max_page_mb`); lower the page size, or raise the limit if the process has the memory (a page parses to up to 16 times its size)",
                            cap >> 20
                        ),
                    })
                }
                Err(e) => {
                    self.bump(|s| s.failed.network += 1);
                    last = self.describe(&e, "the body did not arrive", "reading the body");
                    if next < attempts {
                        self.wait_to_retry(self.backoff(attempt), next, attempts, &last)
                            .await;
                    }
                    continue;
                }
            };
            if status.is_server_error() {
                self.bump(|s| s.failed.server_error += 1);
                last = format!("{status}: {}", self.snippet(&text));
                // A 503 may say when to come back (`Retry-After`): not before then.
                if next == attempts {
                    break; // no attempt left to wait for
                }
                let wait = match asked {
                    Some(w) if status == reqwest::StatusCode::SERVICE_UNAVAILABLE => w,
                    _ => self.backoff(attempt),
                };
                self.wait_to_retry(wait, next, attempts, &last).await;
                continue;
            }
            if !status.is_success() {
                self.bump(|s| s.failed.refused += 1);
                let body = match headers.get("location").and_then(|l| l.to_str().ok()) {
                    // Redirects are not followed: the target was never vetted. Shown
                    // without its query, which a redirect keeps (an API key with it).
                    Some(to) if status.is_redirection() => format!(
                        "a redirect to `{}`, which is not followed (set the endpoint to the final URL)",
                        self.snippet(to.split(['?', '#']).next().unwrap_or(""))
                    ),
                    _ => self.snippet(&text),
                };
                return Err(HttpError::Status {
                    url: shown.clone(),
                    status: status.as_u16(),
                    body,
                });
            }
            if !json_answer || status == reqwest::StatusCode::NO_CONTENT {
                return Ok((Value::Null, headers, digest(&text)));
            }
            let parsed = if text.trim().is_empty() {
                Err("an empty body, not JSON".to_string())
            } else {
                serde_json::from_str(&text).map_err(|e| e.to_string())
            };
            match parsed {
                Ok(v) => return Ok((v, headers, digest(&text))),
                Err(e) => {
                    self.bump(|s| s.failed.malformed += 1);
                    // Often a proxy's error page: retry, then fail with the parse error.
                    last = format!("malformed JSON: {e}");
                    if attempt + 1 == attempts {
                        // What came instead (a login page, an HTML error page) shows
                        // what is wrong better than where the parser stopped.
                        let kind = headers
                            .get(reqwest::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("no content type");
                        // A JSON answer cut short would quote the API's records (personal
                        // data, into the run's history): only other content is quoted.
                        let json_like =
                            kind.contains("json") || text.trim_start().starts_with(['{', '[']);
                        let message = if text.trim().is_empty() || json_like {
                            e
                        } else {
                            format!("{e}; the answer ({kind}) begins `{}`", self.snippet(&text))
                        };
                        let message = if attempts > 1 {
                            format!("{message} (the last of {attempts} attempts)")
                        } else {
                            message
                        };
                        return Err(HttpError::Malformed {
                            url: shown.clone(),
                            message,
                        });
                    }
                    self.wait_to_retry(self.backoff(attempt), next, attempts, &last)
                        .await;
                }
            }
        }
        Err(HttpError::Exhausted {
            url: shown.clone(),
            attempts,
            last,
        })
    }

    /// The first page of an import.
    pub fn first_state(&self, extra: Vec<(String, String)>) -> PageState {
        let mut query = extra;
        match &self.connector.paging {
            Paging::Page {
                param,
                start,
                size_param,
                size,
            } => {
                query.push((param.clone(), start.to_string()));
                query.push((size_param.clone(), size.to_string()));
            }
            Paging::Offset {
                param,
                size_param,
                size,
            } => {
                query.push((param.clone(), "0".into()));
                query.push((size_param.clone(), size.to_string()));
            }
            _ => {}
        }
        PageState::Fetch {
            url: self.connector.endpoint.text.clone(),
            query,
            page: 0,
            offset: 0,
        }
    }

    /// Refuses a page `state` points at off the endpoint's origin. A next page named by
    /// the API (a `Link` header, or a URL saved in a checkpoint) must stay on the vetted
    /// endpoint's origin: anything else could reach a host the private-network guard
    /// never saw.
    pub fn check_origin(&self, state: &PageState) -> Result<(), HttpError> {
        let PageState::Fetch { url, .. } = state else {
            return Ok(());
        };
        let origin = |u: &str| reqwest::Url::parse(u).map(|u| u.origin());
        let endpoint = origin(&self.connector.endpoint.text);
        if endpoint.is_err() || origin(url).ok() != endpoint.clone().ok() {
            return Err(HttpError::OffOrigin {
                url: url.clone(),
                origin: endpoint
                    .map(|o| o.ascii_serialization())
                    .unwrap_or_else(|_| self.connector.endpoint.text.clone()),
            });
        }
        Ok(())
    }

    /// Fetches the page `state` points at.
    pub async fn fetch(&self, state: &PageState) -> Result<Option<Page>, HttpError> {
        self.check_origin(state)?;
        let PageState::Fetch { url, query, .. } = state else {
            return Ok(None);
        };
        let (body, headers, digest) = self
            .request(HttpMethod::Get, url, query, None, true)
            .await?;
        let selector = &self.connector.records;
        // A selector walking a list (`...[*]`) whose place holds no list but a scalar, or
        // an object that is not one of records (`{"error": "quota exceeded"}` where the
        // list was): not records, but an error answered with 200.
        if let Some(miss) = records_not_a_list(&body, selector) {
            return Ok(Some(Page {
                url: url.clone(),
                body,
                headers,
                records: Records::Copied(Vec::new()),
                digest,
                records_missing: Some(miss),
                items: 0,
            }));
        }
        let in_body = selector
            .trim()
            .strip_suffix("[*]")
            .and_then(sluice_core::integration::member_chain)
            .filter(|chain| matches!(at_chain(&body, chain), Some(Value::Array(_))));
        let records = match in_body {
            Some(chain) => Records::InBody(chain),
            None => Records::Copied(select_records(&body, selector).map_err(HttpError::Selector)?),
        };
        let mut page = Page {
            url: url.clone(),
            body,
            headers,
            records,
            digest,
            records_missing: None,
            items: 0,
        };
        page.items = paged_list(&page.body, selector).unwrap_or(page.records().len());
        if page.records().is_empty() {
            page.records_missing = records_miss(&page.body, selector);
        }
        Ok(Some(page))
    }

    /// `url` without the API key's query parameter: a server that builds its next link
    /// from the request repeats the key in it, and the next URL is kept in the checkpoint
    /// and named in errors. Each request adds the key again.
    fn without_query_key(&self, mut url: reqwest::Url) -> String {
        if let Auth::ApiKey {
            query: Some(param), ..
        } = &self.connector.auth
        {
            if url.query_pairs().any(|(k, _)| k == param.as_str()) {
                let kept: Vec<(String, String)> = url
                    .query_pairs()
                    .filter(|(k, _)| k != param.as_str())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                if kept.is_empty() {
                    url.set_query(None);
                } else {
                    url.query_pairs_mut().clear().extend_pairs(kept);
                }
            }
        }
        url.to_string()
    }

    /// The state after `page`, or `Done` when the API says there is no more. `max_pages`
    /// is the caller's to apply, so that a run which read everything in exactly
    /// `max_pages` pages is not reported as cut short.
    pub fn next_state(&self, state: &PageState, page: &Page) -> PageState {
        if *state == PageState::Done {
            return PageState::Done;
        }
        let c = &self.connector;
        // The API's items, not the records selected from them: a page of 100 orders
        // holding 250 line items moves an offset by 100, and a page whose items a filter
        // selector left out entirely is not the last.
        let got = page.items as u64;
        // The API's own word on whether more follows, when it gives one.
        let more = c
            .has_more_path
            .as_ref()
            .and_then(|p| match first(&page.body, p) {
                Some(Value::Bool(b)) => Some(b),
                _ => None,
            });
        if more == Some(false) {
            return PageState::Done;
        }
        if got == 0 && more != Some(true) {
            // An empty numbered page is past the end. An empty page naming where to go
            // next (a cursor, a next URL or link) is followed: some APIs page through a
            // filtered stream and return empty pages mid-way. Unless it names the page just
            // read, which is how a caught-up feed says it has nothing yet.
            let next = match c.paging {
                Paging::Cursor { .. } | Paging::NextUrl { .. } | Paging::LinkHeader => {
                    self.continuation(state, page, 0, more, None)
                }
                _ => PageState::Done,
            };
            return match (&next, state) {
                (
                    PageState::Fetch { url, query, .. },
                    PageState::Fetch {
                        url: was,
                        query: asked,
                        ..
                    },
                ) if url == was && query == asked => PageState::Done,
                _ => next,
            };
        }
        self.continuation(state, page, got, more, self.total(page))
    }

    /// The record total `total_path` / `total_header` gives on `page`.
    fn total(&self, page: &Page) -> Option<u64> {
        let c = &self.connector;
        c.total_path
            .as_ref()
            .and_then(|p| first(&page.body, p))
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .or_else(|| {
                c.total_header
                    .as_ref()
                    .and_then(|h| page.headers.get(h.as_str()))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.trim().parse().ok())
            })
    }

    /// When a full `page` / `offset` page ends the run because its total is below the
    /// items read so far, which no record total can be: most likely `total_path` names a
    /// page count (`total_pages`). Said, rather than stopping as if everything was read.
    pub fn total_below_read(&self, state: &PageState, page: &Page) -> Option<String> {
        let c = &self.connector;
        let (
            PageState::Fetch { offset, .. },
            Paging::Page { size, .. } | Paging::Offset { size, .. },
        ) = (state, &c.paging)
        else {
            return None;
        };
        let (got, total) = (page.items as u64, self.total(page)?);
        let seen = offset + got;
        (got >= *size && total < seen).then(|| {
            let source = match (&c.total_path, &c.total_header) {
                (Some(p), _) => format!("`total_path` ({p})"),
                (None, Some(h)) => format!("`total_header` ({h})"),
                (None, None) => "the total".to_string(),
            };
            format!(
                "{source} says {total} records, fewer than the {seen} read by this full page; if it counts pages, remove it (a short page ends the run)"
            )
        })
    }

    /// The state after `page` of `got` items, by the pagination style.
    fn continuation(
        &self,
        state: &PageState,
        page: &Page,
        got: u64,
        more: Option<bool>,
        total: Option<u64>,
    ) -> PageState {
        let PageState::Fetch {
            url,
            query,
            page: n,
            offset,
        } = state
        else {
            return PageState::Done;
        };
        let c = &self.connector;
        let n = n + 1;
        let set = |q: &[(String, String)], k: &str, v: String| {
            let mut q: Vec<(String, String)> =
                q.iter().filter(|(key, _)| key != k).cloned().collect();
            q.push((k.to_string(), v));
            q
        };
        match &c.paging {
            Paging::None => PageState::Done,
            Paging::Page {
                param, start, size, ..
            } => {
                let seen = offset + got;
                // `has_more: true` or a total decides (an API may cap its pages below
                // `size`); without either, a short page is the last.
                if more != Some(true) && total.map_or(got < *size, |t| seen >= t) {
                    return PageState::Done;
                }
                PageState::Fetch {
                    url: url.clone(),
                    query: set(query, param, (start + n).to_string()),
                    page: n,
                    offset: seen,
                }
            }
            Paging::Offset { param, size, .. } => {
                let seen = offset + got;
                if more != Some(true) && total.map_or(got < *size, |t| seen >= t) {
                    return PageState::Done;
                }
                PageState::Fetch {
                    url: url.clone(),
                    query: set(query, param, seen.to_string()),
                    page: n,
                    offset: seen,
                }
            }
            Paging::Cursor { path, param } => match first(&page.body, path) {
                Some(Value::String(s)) if !s.is_empty() => PageState::Fetch {
                    url: url.clone(),
                    query: set(query, param, s),
                    page: n,
                    offset: offset + got,
                },
                Some(Value::Number(x)) => PageState::Fetch {
                    url: url.clone(),
                    query: set(query, param, x.to_string()),
                    page: n,
                    offset: offset + got,
                },
                _ => PageState::Done,
            },
            Paging::NextUrl { path } => match first(&page.body, path) {
                Some(Value::String(next)) if !next.trim().is_empty() => {
                    self.follow(url, next.trim(), n, offset + got)
                }
                _ => PageState::Done,
            },
            Paging::LinkHeader => match next_link(&page.headers) {
                Some(next) => self.follow(url, &next, n, offset + got),
                None => PageState::Done,
            },
        }
    }

    /// The state for a next page the API names by URL. The URL carries its own query:
    /// nothing the first request added is carried over (the API key's parameter is taken
    /// out of it, sent as configured). A relative reference is resolved against the
    /// page that named it (RFC 8288, RFC 3986). Its origin is checked when it is fetched.
    fn follow(&self, url: &str, next: &str, page: u64, offset: u64) -> PageState {
        PageState::Fetch {
            url: reqwest::Url::parse(url)
                .and_then(|base| base.join(next))
                .map(|u| self.without_query_key(u))
                .unwrap_or_else(|_| next.to_string()),
            query: Vec::new(),
            page,
            offset,
        }
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    t.replace('\n', " ")
}

/// `text` with the connector's secrets replaced, as they were configured and as they go
/// on the wire (an API echoing the request's headers in an error body would otherwise
/// put a Basic credential or a bearer token in the run history, which USER accounts
/// read): the auth secrets, their Basic `Authorization` encodings, headers that carry a
/// credential or came from `${env:NAME}`, and the tokens `issued` during the run.
fn scrub(connector: &Connector, issued: &[String], text: String) -> String {
    use base64::Engine;
    let basic = |user: &str, secret: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    };
    let mut secrets: Vec<String> = match &connector.auth {
        Auth::None => Vec::new(),
        Auth::ApiKey { key, .. } => vec![key.expose().to_string()],
        Auth::Basic { username, password } => vec![
            password.expose().to_string(),
            basic(username, password.expose()),
        ],
        Auth::OAuth {
            client_id,
            client_secret,
            refresh_token,
            ..
        } => {
            let mut s: Vec<String> = std::iter::once(client_secret)
                .chain(refresh_token)
                .map(|s| s.expose().to_string())
                .collect();
            // `client_secret_basic` form-encodes both before joining them (RFC 6749 2.3.1).
            let form = |v: &str| -> String {
                oauth2::url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
            };
            s.push(basic(client_id, client_secret.expose()));
            s.push(basic(&form(client_id), &form(client_secret.expose())));
            s
        }
    };
    secrets.extend(
        connector
            .headers
            .iter()
            .filter(|(name, _)| sluice_core::integration::credential_header(name))
            .map(|(_, value)| value.clone()),
    );
    secrets.extend(connector.env_header_values.iter().cloned());
    secrets.extend(issued.iter().cloned());
    // Short values (a 1-character test key) would blank unrelated text.
    secrets.retain(|s| s.len() >= 4);
    // And as an API may echo them: `%`-encoded (a query parameter, as a form encodes it or
    // as RFC 3986 does, with upper- or lower-case hex), JSON-escaped (also with `\/`, and
    // with `<>&` as `\u003c`... as Go writes them).
    let encoded: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            let json = serde_json::to_string(s).unwrap_or_default();
            let json = json
                .strip_prefix('"')
                .and_then(|j| j.strip_suffix('"'))
                .unwrap_or_default()
                .to_string();
            let slashed = json.replace('/', "\\/");
            let go = json
                .replace('<', "\\u003c")
                .replace('>', "\\u003e")
                .replace('&', "\\u0026");
            // Every character but letters and digits as `\u00XX` (as .NET writes `+`).
            let unicode = |lower: bool| -> String {
                s.chars()
                    .map(|c| match c {
                        c if c.is_ascii_alphanumeric() => c.to_string(),
                        c if lower => format!("\\u{:04x}", u32::from(c)),
                        c => format!("\\u{:04X}", u32::from(c)),
                    })
                    .collect()
            };
            let mut all = vec![json, slashed, go, unicode(false), unicode(true)];
            // As an HTML page quotes it (an error page echoing a query).
            all.extend(html_escaped(s));
            for form in [true, false] {
                for lower in [false, true] {
                    let encoded = percent_encoded(s, form, lower);
                    // As Python's `quote` writes it (`/` kept), and encoded twice.
                    all.push(encoded.replace("%2F", "/").replace("%2f", "/"));
                    all.push(percent_encoded(&encoded, form, lower));
                    all.push(encoded);
                }
            }
            all
        })
        .collect();
    secrets.extend(encoded);
    secrets.sort();
    secrets.dedup();
    // Longest first: a secret inside another (a password inside its Basic encoding's
    // text, say) must not break the longer one's match.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
        .iter()
        .fold(text, |t, s| t.replace(s.as_str(), "<redacted>"))
}

/// `text` as HTML escapers write it: Python's `html.escape` (`'` as `&#x27;`), Go's
/// `html.EscapeString` (`&#39;`, `&#34;`), Go's `html/template` (`+` as `&#43;` too),
/// Rails' and Spring's (`&quot;`, `&#39;`), PHP's `htmlspecialchars` (`&#039;`) and XML's
/// `&apos;`.
fn html_escaped(text: &str) -> Vec<String> {
    let escape = |quote: &str, apos: &str, plus: bool| -> String {
        text.chars()
            .map(|c| match c {
                '&' => "&amp;".to_string(),
                '<' => "&lt;".to_string(),
                '>' => "&gt;".to_string(),
                '"' => quote.to_string(),
                '\'' => apos.to_string(),
                '+' if plus => "&#43;".to_string(),
                c => c.to_string(),
            })
            .collect()
    };
    vec![
        escape("&quot;", "&#x27;", false),
        escape("&#34;", "&#39;", false),
        escape("&#34;", "&#39;", true),
        escape("&quot;", "&apos;", false),
        escape("&quot;", "&#39;", false),
        escape("&quot;", "&#039;", false),
    ]
}

/// `text` `%`-encoded: as a form encodes it (`form`: a space as `+`, `~` escaped) or as
/// RFC 3986 does (a space as `%20`, `~` as it is), with lower- or upper-case hex digits.
fn percent_encoded(text: &str, form: bool, lower: bool) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for &b in text.as_bytes() {
        let kept = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_')
            || (form && b == b'*')
            || (!form && b == b'~');
        if kept {
            out.push(char::from(b));
        } else if form && b == b' ' {
            out.push('+');
        } else if lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An OAuth2 token endpoint and the client's credentials.
struct Provider {
    token_url: String,
    client_id: String,
    client_secret: String,
    /// `client_secret_post` instead of HTTP Basic.
    secret_in_body: bool,
    /// The `Retry-After` of the last answer, when it was a 429 or 503 (oauth2's error
    /// does not carry the headers).
    asked: Arc<std::sync::Mutex<Option<Duration>>>,
    /// The HTTP status of the last answer (oauth2's error names only its body).
    status: Arc<std::sync::Mutex<Option<u16>>>,
    /// The refresh token in the last successful answer's body, read before oauth2 parses
    /// it: a provider that rotates tokens has spent the old one even when the rest of
    /// its answer cannot be read.
    answered_refresh: Arc<std::sync::Mutex<Option<String>>>,
}

/// What a token request through [`Provider::http`] resolves to.
type TokenAnswer = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<oauth2::HttpResponse, oauth2::HttpClientError<reqwest::Error>>,
            > + Send,
    >,
>;

type OAuthClient = oauth2::basic::BasicClient<
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

impl Provider {
    fn error(&self, message: String) -> HttpError {
        HttpError::Token {
            url: self.token_url.clone(),
            message,
        }
    }

    /// Sends token requests through `http`, keeping each answer's `Retry-After` when it
    /// is a 429 or 503.
    fn http(&self, http: &reqwest::Client) -> impl Fn(oauth2::HttpRequest) -> TokenAnswer {
        let (http, asked, answered, status) = (
            http.clone(),
            self.asked.clone(),
            self.answered_refresh.clone(),
            self.status.clone(),
        );
        move |request| {
            let (http, asked, answered, status) = (
                http.clone(),
                asked.clone(),
                answered.clone(),
                status.clone(),
            );
            Box::pin(async move {
                *status.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let mut answer = token_call(&http, request).await?;
                *status.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer.status().as_u16());
                let wait = match answer.status().as_u16() {
                    429 | 503 => retry_after(answer.headers()),
                    _ => None,
                };
                *asked.lock().unwrap_or_else(|p| p.into_inner()) = wait;
                if answer.status().is_success() {
                    let (fresh, readable) = lenient_token_answer(answer.body());
                    *answered.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                    if let Some(body) = readable {
                        *answer.body_mut() = body;
                        answer.headers_mut().insert(
                            reqwest::header::CONTENT_TYPE,
                            reqwest::header::HeaderValue::from_static("application/json"),
                        );
                    }
                }
                Ok(answer)
            })
        }
    }

    /// The HTTP status of the token endpoint's last answer, if one came.
    fn answered_status(&self) -> Option<u16> {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> Result<OAuthClient, HttpError> {
        Ok(
            oauth2::basic::BasicClient::new(ClientId::new(self.client_id.clone()))
                .set_client_secret(ClientSecret::new(self.client_secret.clone()))
                .set_token_uri(
                    TokenUrl::new(self.token_url.clone()).map_err(|e| self.error(e.to_string()))?,
                )
                .set_auth_type(if self.secret_in_body {
                    oauth2::AuthType::RequestBody
                } else {
                    oauth2::AuthType::BasicAuth
                }),
        )
    }

    /// The provider's own answer (`invalid_client`, `invalid_grant`) is final; anything
    /// else (unreachable, a 5xx) may pass.
    fn failed<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
        &self,
        e: &oauth2::RequestTokenError<RE, T>,
    ) -> HttpError {
        let status = self.answered_status();
        // `500 Internal Server Error`: oauth2's error names only what it made of the body
        // (`Failed to parse server response` of an HTML error page).
        let answered = |status: u16| {
            let name = reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            format!("the token endpoint answered {status} {name}")
        };
        match e {
            // Only the errors RFC 6749 defines say the credentials or the request are
            // wrong. Anything else in that shape (a 429 `too_many_requests`, a 503
            // `temporarily_unavailable`) is the endpoint being unavailable: retried.
            oauth2::RequestTokenError::ServerResponse(answer)
                if serde_json::to_value(answer)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|c| c.as_str()).map(str::to_owned))
                    .is_some_and(|code| RFC6749_TOKEN_ERRORS.contains(&code.as_str())) =>
            {
                self.error(error_with_causes(e))
            }
            // A token URL that is not one (404, 405) or refuses the request outright
            // does not change its mind on a retry; a 408, a 429 and a 5xx may.
            _ if status.is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429) => {
                let status = status.unwrap_or_default();
                self.error(format!(
                    "{}{}: {}",
                    answered(status),
                    if status == 404 || status == 405 {
                        " (check `token_url`)"
                    } else {
                        ""
                    },
                    error_with_causes(e)
                ))
            }
            _ => HttpError::TokenUnavailable {
                url: self.token_url.clone(),
                message: match status.filter(|s| !(200..300).contains(s)) {
                    Some(s) => format!("{}: {}", answered(s), error_with_causes(e)),
                    None => error_with_causes(e),
                },
                retry_after: *self.asked.lock().unwrap_or_else(|p| p.into_inner()),
            },
        }
    }
}

/// The longest token endpoint answer read (they are a few KB; a JWT-laden one tens).
const TOKEN_ANSWER_BYTES: usize = 1 << 20;

/// Sends a token request as oauth2's own reqwest client does, but reads the answer only
/// up to [`TOKEN_ANSWER_BYTES`]: oauth2's reads it whole, however long.
async fn token_call(
    http: &reqwest::Client,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, oauth2::HttpClientError<reqwest::Error>> {
    use oauth2::HttpClientError;
    let answer = http
        .execute(request.try_into().map_err(Box::new)?)
        .await
        .map_err(Box::new)?;
    let mut builder = oauth2::http::Response::builder()
        .status(answer.status())
        .version(answer.version());
    for (name, value) in answer.headers() {
        builder = builder.header(name, value);
    }
    let body = read_capped(answer, TOKEN_ANSWER_BYTES)
        .await
        .map_err(Box::new)?
        .ok_or_else(|| {
            HttpClientError::Other(format!(
                "the token endpoint's answer is longer than {} KiB",
                TOKEN_ANSWER_BYTES >> 10
            ))
        })?;
    builder
        .body(body.into_bytes())
        .map_err(HttpClientError::Http)
}

/// How much of an error answer's body is read: it is quoted, never parsed.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// The first `cap` bytes of the body (or all of it, if shorter), as text; the rest is
/// not read.
async fn read_start(mut resp: reqwest::Response, cap: usize) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == cap {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The body as text, or `None` once it is longer than `cap` bytes (a `Content-Length`
/// over the cap is refused before anything is read).
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Option<String>, reqwest::Error> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    // Valid UTF-8 (JSON's encoding) becomes the text without a copy.
    Ok(Some(String::from_utf8(body).unwrap_or_else(|e| {
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })))
}

/// The token endpoint errors of RFC 6749 (section 5.2): final, not retried.
const RFC6749_TOKEN_ERRORS: [&str; 6] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

/// What a refresh-token exchange came to.
struct Exchanged {
    response: Result<oauth2::basic::BasicTokenResponse, HttpError>,
    /// The refresh token presented last, when it was not the one the exchange started
    /// with (another run had rotated it and saved the new one).
    presented: Option<String>,
    /// The new refresh token, when the provider rotated it (already saved).
    rotated: Option<String>,
}

/// Saves a rotated refresh token, retried a few times: the provider has spent the old one.
async fn save_with_retries(vault: &dyn TokenVault, token: &str) -> Result<(), String> {
    let mut saved = vault.save(token).await;
    for attempt in 0..3u32 {
        if saved.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        saved = vault.save(token).await;
    }
    saved
}

/// Exchanges the refresh token `current` (or, when the provider refuses it, the one
/// saved since by another run of the same config), and saves a rotated refresh token
/// before answering: the provider has spent the old one.
async fn exchange_refresh(
    provider: Provider,
    http: reqwest::Client,
    vault: Option<Arc<dyn TokenVault>>,
    current: String,
    scopes: Vec<Scope>,
) -> Exchanged {
    let mut presented = None;
    let mut rotated = None;
    let response = async {
        let oauth = provider.client()?;
        let mut result = oauth
            .exchange_refresh_token(&RefreshToken::new(current.clone()))
            .add_scopes(scopes.iter().cloned())
            .request_async(&provider.http(&http))
            .await;
        if result.is_err() {
            // Another run of the same config may have rotated the token since this one
            // read it: try the saved one once.
            if let Some(v) = &vault {
                if let Ok(Some(saved)) = v.load().await {
                    if saved != current {
                        result = oauth
                            .exchange_refresh_token(&RefreshToken::new(saved.clone()))
                            .add_scopes(scopes.iter().cloned())
                            .request_async(&provider.http(&http))
                            .await;
                        presented = Some(saved);
                    }
                }
            }
        }
        let in_use = presented.as_ref().unwrap_or(&current).clone();
        let token = match result {
            Ok(token) => token,
            Err(e) => {
                // Answered with a new refresh token the rest of whose answer could not
                // be read: the provider has spent the old one, so the new one is kept.
                let answered = provider
                    .answered_refresh
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .filter(|new| *new != in_use);
                let mut failure = provider.failed(&e);
                if let Some(new) = answered {
                    let kept = match &vault {
                        Some(v) => save_with_retries(v.as_ref(), &new).await.is_ok(),
                        None => false,
                    };
                    rotated = Some(new);
                    failure = provider.error(format!(
                        "{} (the answer carried a new refresh token, {})",
                        error_with_causes(&e),
                        if kept { "which was saved" } else { "which could not be saved" }
                    ));
                }
                return Err(failure);
            }
        };
        let in_use = &in_use;
        if let Some(new) = token
            .refresh_token()
            .map(|t| t.secret().clone())
            .filter(|new| new != in_use)
        {
            // Rotated: the old token is spent. Keep the new one durably first.
            rotated = Some(new.clone());
            if let Some(v) = &vault {
                save_with_retries(v.as_ref(), &new).await.map_err(|e| {
                    provider.error(format!(
                        "the provider rotated the refresh token but it could not be saved ({e}); the run stops before using it"
                    ))
                })?;
            }
        }
        Ok(token)
    }
    .await;
    Exchanged {
        response,
        presented,
        rotated,
    }
}

/// A token endpoint's successful answer: the refresh token it holds, and the body as the
/// oauth2 crate reads it when the provider bent RFC 6749 in a common way (`expires_in`
/// as a string, no `token_type`, JSON served as `text/plain`); `None` to leave the body
/// as it is (not a JSON object: the crate reports it).
fn lenient_token_answer(body: &[u8]) -> (Option<String>, Option<Vec<u8>>) {
    let Ok(serde_json::Value::Object(mut answer)) = serde_json::from_slice(body) else {
        return (None, None);
    };
    let fresh = answer
        .get("refresh_token")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    // Seconds as a string or with a fraction (`"3599"`, `3599.0`): whole seconds, rounded
    // down. One that cannot be read is treated as a short lifetime, not as none (a token
    // kept for ever would be refused at some page).
    let seconds = match answer.get("expires_in") {
        Some(serde_json::Value::String(text)) => Some(text.trim().parse::<f64>().ok()),
        Some(serde_json::Value::Number(n)) if n.as_u64().is_none() => Some(n.as_f64()),
        _ => None,
    };
    if let Some(seconds) = seconds {
        let whole = seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(60, |s| s as u64);
        answer.insert("expires_in".into(), whole.into());
    }
    if !answer.contains_key("token_type") {
        answer.insert("token_type".into(), "bearer".into());
    }
    let body = serde_json::to_vec(&answer).ok();
    (fresh, body)
}

/// `e` with its chain of causes, each after a colon.
fn error_with_causes<E: std::error::Error>(e: &E) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// `url` without the query parameters `query` sets (by name, decoded), when it has any:
/// a parameter Sluice sets on a request (the page, its size, the cursor, the incremental
/// cursor) replaces one of the same name in the endpoint instead of being sent beside it,
/// where an API reading the first would take the endpoint's. `None`: `url` as it is (its
/// other parameters keep their encoding).
fn without_params(url: &str, query: &[(String, String)]) -> Option<String> {
    if query.is_empty() {
        return None;
    }
    let mut parsed = reqwest::Url::parse(url).ok()?;
    let set = |name: &str| query.iter().any(|(k, _)| k == name);
    if !parsed.query_pairs().any(|(k, _)| set(&k)) {
        return None;
    }
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| !set(k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Some(parsed.to_string())
}

/// `url` with the paging and cursor parameters of a request, for errors (a long value,
/// such as an opaque cursor, cut short). The API key's parameter is not among them.
fn shown_url(url: &str, query: &[(String, String)]) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_string();
    };
    if !query.is_empty() {
        let cut = |v: &str| match v.char_indices().nth(64) {
            Some((at, _)) => format!("{}...", &v[..at]),
            None => v.to_string(),
        };
        parsed
            .query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (k.as_str(), cut(v))));
    }
    parsed.to_string()
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// The `rel="next"` URL of a `Link` header (RFC 8288). The URL is whatever stands between
/// `<` and `>`, commas included; links are separated by commas outside quotes.
fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all("link") {
        let Ok(mut rest) = value.to_str() else {
            continue;
        };
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let params = &after[close + 1..];
            let mut quoted = false;
            let end = params
                .char_indices()
                .find(|&(_, c)| {
                    if c == '"' {
                        quoted = !quoted;
                    }
                    c == ',' && !quoted
                })
                .map_or(params.len(), |(i, _)| i);
            let is_next = params[..end].split(';').any(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim()
                            .trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                })
            });
            if is_next {
                return Some(target.trim().to_string());
            }
            rest = &params[end..];
        }
    }
    None
}

fn digest(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every connection with `head` then `body`, once.
    async fn answer_once(head: String, body: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body).await;
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn answers_over_the_cap_are_not_read_whole() {
        let get = |url: String| async move { reqwest::get(url).await.unwrap() };
        // Announced too large: refused before reading.
        let url = answer_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".into(),
            vec![b'x'; 100],
        )
        .await;
        assert_eq!(read_capped(get(url).await, 50).await.unwrap(), None);
        // Streamed without a length: stopped once over the cap.
        let url = answer_once(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".into(),
            vec![b'y'; 100],
        )
        .await;
        assert_eq!(read_capped(get(url).await, 50).await.unwrap(), None);
        let url = answer_once(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".into(),
            b"[1,2]".to_vec(),
        )
        .await;
        assert_eq!(
            read_capped(get(url).await, 50).await.unwrap().as_deref(),
            Some("[1,2]")
        );
        // An error's body: its start, the rest left unread.
        let url = answer_once(
            "HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\r\n".into(),
            vec![b'z'; 100],
        )
        .await;
        assert_eq!(
            read_start(get(url).await, 50).await.unwrap(),
            "z".repeat(50)
        );
        let url = answer_once(
            "HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\r\n".into(),
            b"oops".to_vec(),
        )
        .await;
        assert_eq!(read_start(get(url).await, 50).await.unwrap(), "oops");
    }

    #[test]
    fn secrets_are_looked_for_as_each_encoder_writes_them() {
        let key = "sk/S+1 ~";
        assert_eq!(percent_encoded(key, true, false), "sk%2FS%2B1+%7E");
        assert_eq!(percent_encoded(key, true, true), "sk%2fS%2b1+%7e");
        assert_eq!(percent_encoded(key, false, false), "sk%2FS%2B1%20~");
        assert_eq!(
            ip_kind("::ffff:0:127.0.0.1".parse().unwrap()),
            Some("loopback")
        );
        // The form encoding is the one queries are sent with.
        let sent: String = oauth2::url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        assert_eq!(percent_encoded(key, true, false), sent);
        // As HTML pages quote it.
        let html = html_escaped("a<&'\"+b");
        for expected in [
            "a&lt;&amp;&#x27;&quot;+b",
            "a&lt;&amp;&#39;&#34;+b",
            "a&lt;&amp;&#39;&#34;&#43;b",
            "a&lt;&amp;&apos;&quot;+b",
            "a&lt;&amp;&#39;&quot;+b",
            "a&lt;&amp;&#039;&quot;+b",
        ] {
            assert!(html.iter().any(|h| h == expected), "{expected}: {html:?}");
        }
    }

    #[test]
    fn the_host_vetted_is_the_client_s_own_reading() {
        for (url, host, port) in [
            ("http://[2001:db8:0:0::1]:8080/x", "2001:db8::1", 8080),
            ("http://[::ffff:1.2.3.4]/", "::ffff:1.2.3.4", 80),
            ("https://API.Example.com/v1", "api.example.com", 443),
            ("https://8.8.8.010/", "8.8.8.8", 443),
        ] {
            assert_eq!(client_host(url).unwrap(), (host.to_string(), port), "{url}");
        }
    }

    #[tokio::test]
    async fn names_no_pinned_entry_covers_are_vetted_at_each_lookup() {
        use reqwest::dns::Resolve;
        let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
        let refused = VettingResolver {
            allow_private: false,
        }
        .resolve(name())
        .await
        .err()
        .expect("localhost is refused")
        .to_string();
        assert!(refused.contains("loopback"), "{refused}");
        let allowed = VettingResolver {
            allow_private: true,
        }
        .resolve(name())
        .await
        .unwrap();
        assert!(allowed.into_iter().all(|a| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn the_client_vets_names_it_was_not_pinned_to() {
        // A public literal needs no lookup to be vetted and pinned; any other name the
        // client is sent to goes through the vetting resolver.
        let text = r#"
name = "vetted"
type = "IMPORT"
endpoint = "http://8.8.8.8/items"
[source]
records = "$.data[*]"
[target]
collection = "things"
key = "thingId"
[mapping.thingId]
path = "$.id"
"#;
        let file = sluice_core::integration::parse_file("test", text).unwrap();
        let connector = sluice_core::integration::validate("test", &file, &|_| None).unwrap();
        let client = HttpClient::new(Arc::new(connector)).await.unwrap();
        let refused = client
            .client
            .get("http://localhost:9/")
            .send()
            .await
            .unwrap_err();
        let chain = std::iter::successors(Some(&refused as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        assert!(chain.contains("loopback"), "{chain}");
    }

    #[test]
    fn errors_name_the_page_asked_for() {
        let page = [("page".to_string(), "2".to_string())];
        assert_eq!(
            shown_url("https://api.example/v1/items?region=eu", &page),
            "https://api.example/v1/items?region=eu&page=2"
        );
        let cursor = [("cursor".to_string(), "c".repeat(100))];
        let shown = shown_url("https://api.example/v1/items", &cursor);
        assert!(
            shown.ends_with(&format!("cursor={}...", "c".repeat(64))),
            "{shown}"
        );
        assert_eq!(
            shown_url("https://api.example/x", &[]),
            "https://api.example/x"
        );
    }

    #[test]
    fn private_ranges_are_recognised() {
        for (ip, private) in [
            ("127.0.0.1", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.100.100.200", true),
            ("::1", true),
            ("fd00::1", true),
            ("fe80::1", true),
            ("::ffff:127.0.0.1", true),
            ("0.1.2.3", true),
            ("192.0.0.170", true),
            ("198.18.0.1", true),
            ("240.0.0.1", true),
            // IPv4 carried in IPv6: NAT64 (well-known and local-use), 6to4, compatible.
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b:1::a00:1", true),
            ("2002:a9fe:a9fe::1", true),
            ("::10.0.0.1", true),
            ("fec0::1", true),
            ("224.0.0.251", true),
            ("239.255.255.250", true),
            ("192.0.2.10", true),
            ("198.51.100.7", true),
            ("203.0.113.99", true),
            ("192.88.99.1", true),
            ("ff02::1", true),
            ("2001:db8::1", true),
            ("3fff::1", true),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", true),
            ("100::1", true),
            ("93.184.216.34", false),
            ("2001:4860:4860::8888", false),
            ("223.255.255.1", false),
            ("2606:4700::1111", false),
            ("64:ff9b::5db8:d822", false),
            ("2002:5db8:d822::1", false),
        ] {
            assert_eq!(ip_kind(ip.parse().unwrap()).is_some(), private, "{ip}");
        }
    }

    #[test]
    fn literal_non_public_hosts_are_known_without_resolving() {
        for (url, kind) in [
            ("http://127.0.0.1:8080/x", Some("loopback")),
            ("http://localhost/x", Some("loopback")),
            ("http://api.localhost/x", Some("loopback")),
            ("http://LOCALHOST./x", Some("loopback")),
            ("http://127.0.0.1./x", Some("loopback")),
            ("http://[::1]:9/x", Some("loopback")),
            ("http://10.1.2.3/x", Some("private")),
            (
                "http://169.254.169.254/latest",
                Some("link-local (cloud metadata)"),
            ),
            ("http://127.1/x", Some("loopback")),
            ("http://0x7f.0.0.1/x", Some("loopback")),
            ("http://2130706433/x", Some("loopback")),
            ("http://0177.0.0.1/x", Some("loopback")),
            ("http://10.0x10203/x", Some("private")),
            (
                "http://0xa9.254.169.254/x",
                Some("link-local (cloud metadata)"),
            ),
            ("https://api.example/x", None),
            ("https://93.184.216.34/x", None),
            ("https://1.2.3.4.5/x", None),
            ("https://1.256.3.4/x", None),
            ("https://16909060/x", None),
            ("https://0x5db8d822/x", None),
            ("not a url", None),
        ] {
            assert_eq!(literal_private_host(url), kind, "{url}");
        }
    }

    #[test]
    fn a_parameter_sluice_sets_replaces_the_endpoints_own() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let url = "https://api.example/items?limit=50&region=eu&page%5Bsize%5D=9";
        // Not set by this request: the URL as written.
        assert_eq!(without_params(url, &[]), None);
        assert_eq!(without_params(url, &q(&[("page", "2")])), None);
        assert_eq!(
            without_params(url, &q(&[("limit", "100"), ("page", "2")])).as_deref(),
            Some("https://api.example/items?region=eu&page%5Bsize%5D=9")
        );
        // Names compare decoded.
        assert_eq!(
            without_params(url, &q(&[("page[size]", "100")])).as_deref(),
            Some("https://api.example/items?limit=50&region=eu")
        );
        assert_eq!(
            without_params(
                "https://api.example/items?since=2024-01-01",
                &q(&[("since", "x")])
            )
            .as_deref(),
            Some("https://api.example/items")
        );
    }

    #[test]
    fn token_answers_bent_in_common_ways_are_read() {
        use serde_json::json;
        let read = |body: serde_json::Value| {
            let (fresh, fixed) = lenient_token_answer(body.to_string().as_bytes());
            let fixed: serde_json::Value = serde_json::from_slice(&fixed.unwrap()).unwrap();
            (fresh, fixed)
        };
        let (fresh, fixed) =
            read(json!({ "access_token": "a", "expires_in": "3599", "refresh_token": "r2" }));
        assert_eq!(fresh.as_deref(), Some("r2"));
        assert_eq!(fixed["expires_in"], 3599);
        assert_eq!(fixed["token_type"], "bearer");
        assert_eq!(read(json!({ "expires_in": 3599.9 })).1["expires_in"], 3599);
        assert_eq!(read(json!({ "expires_in": "soon" })).1["expires_in"], 60);
        let (fresh, fixed) = read(json!({ "expires_in": 10, "token_type": "Bearer" }));
        assert_eq!(fresh, None);
        assert_eq!(
            (fixed["expires_in"].clone(), fixed["token_type"].clone()),
            (json!(10), json!("Bearer"))
        );
        assert_eq!(lenient_token_answer(b"not json"), (None, None));
    }

    #[test]
    fn a_short_lived_token_is_used_for_half_its_life() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(s(3600)), s(3570));
        assert_eq!(refresh_after(s(60)), s(30));
        assert_eq!(refresh_after(s(20)), s(10));
        assert_eq!(refresh_after(s(0)), s(0));
    }

    #[test]
    fn link_header_next_is_found() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            "<http://x/p?_page=1>; rel=\"first\", <http://x/p?_page=3>; rel=\"next\", <http://x/p?_page=9>; rel=\"last\""
                .parse()
                .unwrap(),
        );
        assert_eq!(next_link(&h).as_deref(), Some("http://x/p?_page=3"));
        assert_eq!(next_link(&HeaderMap::new()), None);
        // Commas inside the URL and inside quoted parameters; several rel values.
        h.insert(
            "link",
            "<http://x/p?fields=id,name&p=1>; rel=\"prev\"; title=\"a, b\", <http://x/p?fields=id,name&p=2>; rel=\"next last\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("http://x/p?fields=id,name&p=2")
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
    }
}
