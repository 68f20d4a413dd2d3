//! The database's clock, as this process reads it.
//!
//! Leases and claims (`scheduled_runs`, `job_locks`, the event ledger's claims, an export's
//! heartbeat) are written by one replica and judged by another. Timed by each replica's
//! own clock, a replica whose clock runs 20 s fast would see every other replica's live
//! lease as lapsed and take its run over while it is still going. So they are timed by
//! one clock all replicas share: the MongoDB primary's, as its `hello` reply reports it
//! (`localTime`).
//!
//! A reading is taken at connect and again once a minute (the best of three round trips,
//! placed at their midpoint, so it is off by at most half a round trip); between readings
//! the time advances by this process's monotonic clock, which a step of the wall clock
//! does not move. A server that reports no `localTime` leaves this host's wall clock in
//! use, with a warning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{doc, DateTime};
use mongodb::Database;

/// How long a reading is used before the next is taken.
const REFRESH: Duration = Duration::from_secs(60);
/// Round trips per reading; the fastest is kept.
const SAMPLES: usize = 3;
/// A reading whose fastest round trip took longer than this is not trusted.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(2);
/// A difference from this host's wall clock worth a warning.
const WARN_OFFSET_MS: i64 = 2_000;

/// One reading: the server's time at the local instant `at`.
#[derive(Clone, Copy, Debug)]
struct Reading {
    server_ms: i64,
    at: Instant,
    round_trip: Duration,
}

impl Reading {
    fn now_ms(&self) -> i64 {
        self.server_ms + self.at.elapsed().as_millis() as i64
    }
}

/// The database's clock. Cheap to share; [`ServerClock::now`] never waits on the server.
#[derive(Debug)]
pub struct ServerClock {
    db: Database,
    reading: Mutex<Option<Reading>>,
    refreshing: AtomicBool,
    /// The last offset from this host's wall clock that was reported, in ms.
    reported_offset_ms: Mutex<Option<i64>>,
}

impl ServerClock {
    /// Takes a first reading from `db`'s primary. A server without `localTime` leaves
    /// this host's clock in use (warned about), so this fails only as the server does.
    pub async fn read(db: Database) -> Result<Arc<Self>, mongodb::error::Error> {
        let clock = Arc::new(Self {
            db,
            reading: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            reported_offset_ms: Mutex::new(None),
        });
        clock.refresh().await?;
        Ok(clock)
    }

    /// The database's time now. Starts a new reading in the background once the current
    /// one is a minute old.
    pub fn now(self: &Arc<Self>) -> DateTime {
        let reading = *self.reading.lock().unwrap_or_else(|p| p.into_inner());
        let Some(reading) = reading else {
            return DateTime::now();
        };
        if reading.at.elapsed() > REFRESH && !self.refreshing.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let clock = Arc::clone(self);
                    handle.spawn(async move {
                        if let Err(e) = clock.refresh().await {
                            tracing::debug!(error = %e, "could not read the database's clock; keeping the last reading");
                        }
                        clock.refreshing.store(false, Ordering::Release);
                    });
                }
                Err(_) => self.refreshing.store(false, Ordering::Release),
            }
        }
        DateTime::from_millis(reading.now_ms())
    }

    /// Takes a new reading (the fastest of [`SAMPLES`] round trips).
    pub async fn refresh(&self) -> Result<(), mongodb::error::Error> {
        let mut best: Option<Reading> = None;
        let mut reported = true;
        for _ in 0..SAMPLES {
            let sent = Instant::now();
            let reply = self.db.run_command(doc! { "hello": 1 }).await?;
            let round_trip = sent.elapsed();
            let Ok(server_time) = reply.get_datetime("localTime") else {
                reported = false;
                break;
            };
            let sample = Reading {
                server_ms: server_time.timestamp_millis(),
                at: sent + round_trip / 2,
                round_trip,
            };
            if best.is_none_or(|b| sample.round_trip < b.round_trip) {
                best = Some(sample);
            }
        }
        let mut slot = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        match best {
            Some(b) if b.round_trip <= MAX_ROUND_TRIP => *slot = Some(b),
            // A slow first reading (off by at most half its round trip) still beats this
            // host's clock, which may be off by anything; the next refresh replaces it.
            Some(b) if slot.is_none() => {
                tracing::warn!(
                    round_trip_ms = b.round_trip.as_millis() as u64,
                    "reading the database's clock was slow; using it until the next reading"
                );
                *slot = Some(b);
            }
            Some(b) => {
                tracing::warn!(
                    round_trip_ms = b.round_trip.as_millis() as u64,
                    "reading the database's clock took too long; keeping the last reading"
                );
                // Kept from being retried on every call until the next minute.
                if let Some(old) = slot.as_mut() {
                    let now_ms = old.now_ms();
                    *old = Reading {
                        server_ms: now_ms,
                        at: Instant::now(),
                        ..*old
                    };
                }
            }
            None if !reported && slot.is_none() => tracing::warn!(
                "the database server reports no `localTime`: leases are timed by this host's clock, so replicas' clocks must agree (NTP)"
            ),
            None => {}
        }
        drop(slot);
        self.report_offset();
        Ok(())
    }

    /// Warns when this host's clock is off the database's by more than
    /// [`WARN_OFFSET_MS`] (once, and again when that changes by as much).
    fn report_offset(&self) {
        let Some(reading) = *self.reading.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        let offset = reading.now_ms() - wall_clock_ms();
        sluice_core::metrics::set(
            "sluice_clock_offset_seconds",
            "How far this host's clock is behind the database's (negative: ahead), by the last reading; leases are timed by the database's.",
            &[],
            offset as f64 / 1000.0,
        );
        let mut last = self
            .reported_offset_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let changed = last.is_none_or(|l| (offset - l).abs() >= WARN_OFFSET_MS);
        if offset.abs() >= WARN_OFFSET_MS && changed {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock is {:.1} s {} the database's; leases and claims are timed by the database's clock, cron fires by this host's",
                offset.abs() as f64 / 1000.0,
                if offset > 0 { "behind" } else { "ahead of" }
            );
            *last = Some(offset);
        } else if offset.abs() < WARN_OFFSET_MS {
            *last = None;
        }
    }
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
