//! Request enrichment: the client's IP (forwarded headers only from trusted proxies), and
//! device / browser / OS / bot flag parsed from the user agent with `woothee`.

use std::net::IpAddr;

use axum::http::HeaderMap;
use sluice_core::model::EventMetadata;

/// An IP network (`10.0.0.0/8`, `::1/128`, or a single address).
#[derive(Debug, Clone, Copy)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses the config's `trusted_proxies` entries (validated already).
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, p.parse().ok()?),
            None => {
                let addr: IpAddr = text.parse().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
            let prefix = u32::from(prefix).min(width);
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix)
                    == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.prefix)
                    == masked(u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

/// The client a limit counts against: its IPv4 address, or its IPv6 /64 (one host or
/// network is usually given a whole /64, so counting full addresses would give it 2^64
/// fresh keys).
pub fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy. Entries may carry
/// a port (`203.0.113.5:443`, `[2001:db8::1]:443`, as some proxies append them); an entry
/// that is not an address ends the walk at the peer, since what lies left of it was
/// written by nobody the server trusts. IPv4 peers of a dual-stack listener
/// (`::ffff:10.1.2.3`) are matched as the IPv4 addresses they are.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.into_iter().rev() {
        match forwarded_address(entry) {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return ip,
            None => return peer,
        }
    }
    peer
}

/// One `X-Forwarded-For` entry as an address, with or without a port, and an IPv6 zone
/// (`fe80::1%eth0`, which some proxies write) left out.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let unzoned;
    let entry = match entry.split_once('%') {
        // IPv6 only: zones are scopes of IPv6 addresses.
        Some((address, rest)) if address.contains(':') => {
            unzoned = match rest.find(']') {
                Some(end) => format!("{address}{}", &rest[end..]),
                None => address.to_string(),
            };
            unzoned.as_str()
        }
        _ => entry,
    };
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
}

const BOT_MARKERS: &[&str] = &[
    "bot",
    "spider",
    "crawl",
    "slurp",
    "headlesschrome",
    "phantomjs",
    "lighthouse",
];

/// Device, browser, OS and bot flag from a user agent string.
pub fn parse_user_agent(ua: &str) -> EventMetadata {
    let mut m = EventMetadata {
        user_agent: Some(ua.to_string()),
        ..Default::default()
    };
    let lower = ua.to_ascii_lowercase();
    let parsed = woothee::parser::Parser::new().parse(ua);
    let known = |s: &str| (!s.is_empty() && s != "UNKNOWN").then(|| s.to_string());
    if let Some(r) = &parsed {
        m.browser = known(r.name);
        m.os = known(r.os).and_then(|os| sluice_core::tracking::os_family(&os));
        m.device = match r.category {
            "pc" => Some("desktop".into()),
            "smartphone" if r.os == "iPad" || lower.contains("tablet") => Some("tablet".into()),
            "smartphone" | "mobilephone" => Some("mobile".into()),
            "appliance" => Some("appliance".into()),
            "crawler" => Some("bot".into()),
            _ => None,
        };
        m.bot = r.category == "crawler";
    }
    if !m.bot && BOT_MARKERS.iter().any(|b| lower.contains(b)) {
        m.bot = true;
        m.device = Some("bot".into());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_used_only_behind_trusted_proxies() {
        let trusted = vec![IpNet::parse("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.2.3".parse().unwrap());
        assert_eq!(
            client_ip("10.9.9.9".parse().unwrap(), &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // A client talking directly cannot spoof its address with the header.
        assert_eq!(
            client_ip("198.51.100.1".parse().unwrap(), &h, &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_entries_with_ports_mapped_peers_and_garbage() {
        let trusted = vec![IpNet::parse("10.0.0.0/8").unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let with = |xff: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", xff.parse().unwrap());
            h
        };
        // The proxy appends the client with a port; the client's own entry is ignored.
        let h = with("6.6.6.6, 203.0.113.5:44321");
        assert_eq!(client_ip(ip("10.9.9.9"), &h, &trusted), ip("203.0.113.5"));
        let h = with("[2001:db8::7]:443");
        assert_eq!(client_ip(ip("10.9.9.9"), &h, &trusted), ip("2001:db8::7"));
        // An IPv6 zone is left out.
        let h = with("2001:db8::5%eth0");
        assert_eq!(client_ip(ip("10.9.9.9"), &h, &trusted), ip("2001:db8::5"));
        let h = with("[2001:db8::6%25en0]:443");
        assert_eq!(client_ip(ip("10.9.9.9"), &h, &trusted), ip("2001:db8::6"));
        // An entry that is no address stops the walk: nothing left of it is believed.
        let h = with("6.6.6.6, unknown");
        assert_eq!(client_ip(ip("10.9.9.9"), &h, &trusted), ip("10.9.9.9"));
        // A dual-stack listener sees IPv4 proxies as mapped IPv6 addresses.
        let h = with("203.0.113.7");
        assert_eq!(
            client_ip(ip("::ffff:10.9.9.9"), &h, &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("::ffff:198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn user_agents_are_classified() {
        let chrome = parse_user_agent("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36");
        assert_eq!(chrome.device.as_deref(), Some("desktop"));
        assert_eq!(chrome.browser.as_deref(), Some("Chrome"));
        assert!(!chrome.bot);
        let iphone = parse_user_agent("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1");
        assert_eq!(iphone.device.as_deref(), Some("mobile"));
        // The parser names the device; the OS is said as a Segment SDK says it.
        assert_eq!(iphone.os.as_deref(), Some("iOS"));
        let google = parse_user_agent(
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        );
        assert!(google.bot);
        assert_eq!(google.device.as_deref(), Some("bot"));
    }
}

/// Country / region / city from a MaxMind-format city database (GeoLite2-City,
/// GeoIP2-City, or any `.mmdb` with the same record layout).
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// What a city record holds of a place: an ISO code and names by language.
#[derive(serde::Deserialize, Default)]
struct Place {
    #[serde(default)]
    iso_code: Option<String>,
    #[serde(default)]
    names: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct CityRecord {
    #[serde(default)]
    country: Option<Place>,
    #[serde(default)]
    subdivisions: Vec<Place>,
    #[serde(default)]
    city: Option<Place>,
}

/// Where an IP is: `country` is the ISO 3166-1 code, `region` the largest subdivision's
/// English name (else its code), `city` the English name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub country: Option<String>,
    pub region: Option<String>,
    pub city: Option<String>,
}

impl GeoIp {
    pub fn open(path: &str) -> anyhow::Result<Self> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open GeoIP database `{path}` (tracking.geoip_database): {e}{}",
                if path.starts_with('~') {
                    " (a `~` is not expanded in sluice.toml: write the path out)"
                } else {
                    ""
                }
            )
        })?;
        Ok(Self { reader })
    }

    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        let record: CityRecord = self.reader.lookup(ip).ok()?.decode().ok()??;
        let english = |p: &Place| p.names.get("en").cloned();
        let loc = Location {
            country: record.country.as_ref().and_then(|c| c.iso_code.clone()),
            region: record
                .subdivisions
                .first()
                .and_then(|s| english(s).or_else(|| s.iso_code.clone())),
            city: record.city.as_ref().and_then(english),
        };
        (loc != Location::default()).then_some(loc)
    }

    /// Fills the location fields the event does not carry yet.
    pub fn enrich(&self, m: &mut EventMetadata) {
        if m.country.is_some() {
            return;
        }
        let Some(ip) = m
            .ip_address
            .as_deref()
            .and_then(|t| t.parse::<IpAddr>().ok())
        else {
            return;
        };
        if let Some(loc) = self.locate(ip) {
            m.country = loc.country;
            m.region = m.region.take().or(loc.region);
            m.city = m.city.take().or(loc.city);
        }
    }
}
