//! Write keys (HTTP basic user or `X-Write-Key`) and the rate limits (per key, per client).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::HeaderMap;
use base64::Engine;
use sluice_core::config::Secret;

/// The write keys a request presents in its headers: `X-Write-Key` first, then the HTTP
/// basic user. Both are returned, so a header that is not ours (a proxy's token in
/// `X-Write-Key`) does not hide a valid key in the other.
pub fn presented_keys(headers: &HeaderMap) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    // An empty header is no key (a client library that sends it blank).
    if let Some(v) = headers
        .get("x-write-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        keys.push(v.to_string());
    }
    if let Some(user) = basic_user(headers) {
        if !keys.contains(&user) {
            keys.push(user);
        }
    }
    keys
}

/// The user of an `Authorization: Basic` header, if any.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    // The scheme is case-insensitive (RFC 9110).
    let (scheme, encoded) = auth.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_string())
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where `presented` is in `keys`, compared in constant time.
pub fn key_index(keys: &[Secret], presented: &str) -> Option<usize> {
    keys.iter()
        .position(|k| constant_time_eq(k.expose().as_bytes(), presented.as_bytes()))
}

/// A token bucket per key (a write key, or a client address): `rate` requests per second,
/// bursts up to `rate`. Buckets that have refilled are forgotten once many are held, and
/// at most [`MAX_BUCKETS`] are (beyond, a new key is let through untracked: a limit per
/// address cannot stop that many addresses anyway, and memory stays bounded).
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_key: HashMap<String, (f64, Instant)>,
    pruned: Option<Instant>,
}

/// Buckets held before full ones are forgotten (at most once a second).
const PRUNE_ABOVE: usize = 10_000;
/// Buckets held at most.
pub const MAX_BUCKETS: usize = 200_000;

impl RateLimiter {
    pub fn new(rate_per_second: u32) -> Self {
        Self {
            rate: f64::from(rate_per_second),
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                pruned: None,
            }),
        }
    }

    /// Takes one token for `key`; `false` means over the limit.
    pub fn allow(&self, key: &str) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let rate = self.rate;
        if !buckets.by_key.contains_key(key) {
            if buckets.by_key.len() >= PRUNE_ABOVE
                && buckets
                    .pruned
                    .is_none_or(|at| now.duration_since(at).as_secs() >= 1)
            {
                // A bucket refilled to the brim is the same as no bucket.
                buckets.by_key.retain(|_, (tokens, last)| {
                    *tokens + now.duration_since(*last).as_secs_f64() * rate < rate
                });
                buckets.pruned = Some(now);
            }
            if buckets.by_key.len() >= MAX_BUCKETS {
                return true;
            }
        }
        let (tokens, last) = buckets.by_key.entry(key.to_string()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Buckets held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buckets.lock().map(|b| b.by_key.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_user_and_header_are_both_accepted() {
        let keys = vec![Secret::new("wk_abcdef12")];
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic d2tfYWJjZGVmMTI6".parse().unwrap()); // "wk_abcdef12:"
        assert_eq!(presented_keys(&h), ["wk_abcdef12"]);
        assert_eq!(key_index(&keys, &presented_keys(&h)[0]), Some(0));
        for scheme in ["BASIC", "basic", "bAsIc"] {
            let mut h = HeaderMap::new();
            let value = format!("{scheme} d2tfYWJjZGVmMTI6");
            h.insert("authorization", value.parse().unwrap());
            assert_eq!(presented_keys(&h), ["wk_abcdef12"], "{scheme}");
        }
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer d2tfYWJjZGVmMTI6".parse().unwrap());
        assert!(presented_keys(&h).is_empty());
        let mut h = HeaderMap::new();
        h.insert("x-write-key", "wrong-key".parse().unwrap());
        assert_eq!(presented_keys(&h), ["wrong-key"]);
        assert_eq!(key_index(&keys, "wrong-key"), None);
        // A foreign X-Write-Key does not hide the basic user: both are presented.
        h.insert("authorization", "Basic d2tfYWJjZGVmMTI6".parse().unwrap());
        assert_eq!(presented_keys(&h), ["wrong-key", "wk_abcdef12"]);
    }

    #[test]
    fn rate_limiter_refuses_past_the_burst() {
        let l = RateLimiter::new(3);
        assert!((0..3).all(|_| l.allow("k")));
        assert!(!l.allow("k"));
        assert!(l.allow("other"), "keys are limited separately");
    }

    #[test]
    fn rate_limiter_memory_stays_bounded() {
        // Full buckets are forgotten: many clients sending one request each a while ago.
        let l = RateLimiter::new(1_000_000);
        for i in 0..PRUNE_ABOVE {
            assert!(l.allow(&format!("old-{i}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(l.allow("new"));
        assert_eq!(l.held(), 1, "the refilled buckets were dropped");
        // Buckets still refilling are kept, up to the cap; past it, keys pass untracked.
        let l = RateLimiter::new(1);
        for i in 0..MAX_BUCKETS {
            assert!(l.allow(&format!("busy-{i}")));
        }
        assert_eq!(l.held(), MAX_BUCKETS);
        assert!(l.allow("one-more") && l.allow("one-more"));
        assert_eq!(l.held(), MAX_BUCKETS);
        assert!(!l.allow("busy-7"), "a tracked key is still limited");
    }
}
