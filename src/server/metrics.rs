//! Prometheus metrics of the tracking endpoint, kept as atomics and rendered in the text
//! exposition format (no registry crate needed for a handful of series).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (seconds) of the write-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub deduplicated: AtomicU64,
    pub rejected_invalid: AtomicU64,
    pub rejected_bot: AtomicU64,
    /// Events a tracking transform plugin dropped.
    pub rejected_transform: AtomicU64,
    /// Events a tracking plugin failed (rejected, trapped on), or whose request a plugin
    /// failure answered 503.
    pub rejected_transform_error: AtomicU64,
    /// Events whose request waited its whole write deadline for a plugin instance.
    pub rejected_transform_busy: AtomicU64,
    pub retry: AtomicU64,
    pub queue_full: AtomicU64,
    pub write_errors: AtomicU64,
    pub unauthorized: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Tracking requests refused by `[server] rate_limit_per_client`.
    pub rate_limited_client: AtomicU64,
    /// Tracking requests refused because their address held its share of the in-flight
    /// bytes (`tracking.max_in_flight_per_client_mb`).
    pub rate_limited_client_bytes: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Segment `identify` traits a profile refused (the events were stored).
    pub traits_failed: AtomicU64,
    /// HTTP connections open now (a gauge).
    pub open_connections: AtomicU64,
    /// Request bytes the tracking endpoint holds now (a gauge; `tracking.max_in_flight_mb`).
    pub in_flight_bytes: AtomicU64,
    /// Tracking requests refused because `tracking.max_in_flight_mb` was reached.
    pub in_flight_full: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// Answers by route pattern (`/v1/admin/jobs/{name}/run`, or `unmatched`) and status.
    responses: std::sync::Mutex<BTreeMap<String, BTreeMap<u16, u64>>>,
}

impl Metrics {
    /// Counts one answer of `route` (a route pattern: bounded) with `status`.
    pub fn count_response(&self, route: &str, status: u16) {
        let mut responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        let by_status = match responses.get_mut(route) {
            Some(m) => m,
            None => responses.entry(route.to_string()).or_default(),
        };
        *by_status.entry(status).or_insert(0) += 1;
    }

    pub fn observe_write(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// The text exposition; `queue_depth` and `queue_waiting` are sampled by the caller.
    pub fn render(&self, queue_depth: usize, queue_waiting: usize) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, labels: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name}{labels} {}", v.load(Relaxed));
        };
        counter(
            &mut out,
            "sluice_events_accepted_total",
            "Events stored.",
            "",
            &self.accepted,
        );
        counter(
            &mut out,
            "sluice_events_deduplicated_total",
            "Events already stored (same eventId).",
            "",
            &self.deduplicated,
        );
        let _ = writeln!(
            out,
            "# HELP sluice_events_rejected_total Events not stored, by reason.\n# TYPE sluice_events_rejected_total counter"
        );
        for (reason, v) in [
            ("invalid", &self.rejected_invalid),
            ("bot", &self.rejected_bot),
            ("transform", &self.rejected_transform),
            ("transform_error", &self.rejected_transform_error),
            ("transform_busy", &self.rejected_transform_busy),
            ("retry", &self.retry),
            ("queue_full", &self.queue_full),
            ("write_error", &self.write_errors),
        ] {
            let _ = writeln!(
                out,
                "sluice_events_rejected_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        counter(
            &mut out,
            "sluice_requests_unauthorized_total",
            "Requests without a valid write key.",
            "",
            &self.unauthorized,
        );
        let _ = writeln!(
            out,
            "# HELP sluice_requests_rate_limited_total Requests refused by a rate limit: per write key, per client address, or for the request bytes a client address holds (tracking.max_in_flight_per_client_mb).\n# TYPE sluice_requests_rate_limited_total counter"
        );
        for (limit, v) in [
            ("write_key", &self.rate_limited),
            ("client", &self.rate_limited_client),
            ("client_bytes", &self.rate_limited_client_bytes),
        ] {
            let _ = writeln!(
                out,
                "sluice_requests_rate_limited_total{{limit=\"{limit}\"}} {}",
                v.load(Relaxed)
            );
        }
        counter(
            &mut out,
            "sluice_requests_in_flight_full_total",
            "Tracking requests answered 503 because the request bytes held reached tracking.max_in_flight_mb.",
            "",
            &self.in_flight_full,
        );
        counter(
            &mut out,
            "sluice_traits_failed_total",
            "Segment identify traits a user profile refused (events stored; see the log).",
            "",
            &self.traits_failed,
        );
        counter(
            &mut out,
            "sluice_sessions_expired_total",
            "Sessions marked EXPIRED by the idle sweeper.",
            "",
            &self.sessions_expired,
        );
        let _ = writeln!(
            out,
            "# HELP sluice_ingest_queue_events Events queued or being written (and room set aside for a request waiting for the rest it needs).\n# TYPE sluice_ingest_queue_events gauge\nsluice_ingest_queue_events {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP sluice_ingest_queue_waiting_requests Tracking requests waiting for room in the ingest queue (tracking.queue_wait_ms); past the wait they are answered 503.\n# TYPE sluice_ingest_queue_waiting_requests gauge\nsluice_ingest_queue_waiting_requests {queue_waiting}"
        );
        let _ = writeln!(
            out,
            "# HELP sluice_http_connections_open HTTP connections open now (at most [server] max_connections).\n# TYPE sluice_http_connections_open gauge\nsluice_http_connections_open {}",
            self.open_connections.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sluice_http_in_flight_bytes Request bytes the tracking endpoint holds now (bodies and decompressed copies, until their events are written; at most tracking.max_in_flight_mb).\n# TYPE sluice_http_in_flight_bytes gauge\nsluice_http_in_flight_bytes {}",
            self.in_flight_bytes.load(Relaxed)
        );
        let name = "sluice_event_write_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to write one batch to MongoDB (claims, aggregates, events).\n# TYPE {name} histogram"
        );
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        let name = "sluice_http_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} Answers of this server, by route pattern and status (a 5xx ratio for an SLO; `unmatched`: no route).\n# TYPE {name} counter"
        );
        let responses = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        for (route, by_status) in responses.iter() {
            for (status, n) in by_status {
                let _ = writeln!(out, "{name}{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        out
    }
}
