//! The bounded in-process batcher between the HTTP handlers and MongoDB.
//!
//! Handlers submit the events of one request and wait for their statuses; writer tasks
//! coalesce queued requests into writes of up to `write_batch_size` events. Events are
//! routed to writers by a hash of their visitor, so one visitor's sessions and profile are
//! only ever written by one writer: concurrent writers do not conflict on the same
//! documents (a conflict is still correct, it only costs a transaction retry). The queue is
//! bounded in events, each lane to its share of `queue_capacity`: a request whose lanes
//! are full waits for room up to `queue_wait`, in arrival order, and is then refused
//! (the endpoint answers 503 with `Retry-After`) instead of buffering without bound; a
//! slow lane cannot take the whole queue. A request is only answered after MongoDB
//! acknowledged its events.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use sluice_connectors::mongo::{EventWriter, WriteStatus};
use sluice_core::model::Event;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use super::metrics::Metrics;
use super::InFlight;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the ingest queue is full")]
    Full,
    #[error("the event store failed: {}", .0.message)]
    Store(WriteFailure),
    #[error("the server is shutting down")]
    Closed,
}

/// Why a write failed, as its requests are told.
#[derive(Debug, Clone)]
pub struct WriteFailure {
    pub message: String,
    /// The claim transaction spent its attempts on write conflicts (or a failover): a
    /// transaction holding the same sessions or profiles, not a store that is down.
    pub conflicts: bool,
}

struct Job {
    events: Vec<Event>,
    reply: oneshot::Sender<Result<Vec<WriteStatus>, WriteFailure>>,
    _permit: OwnedSemaphorePermit,
    /// The request's share of `tracking.max_in_flight_mb`, kept until its events are
    /// written even when the request was answered before (a write timeout).
    _held: Option<InFlight>,
}

/// How requests that do not fit in the queue are let in.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// How long a request waits for room before it is refused (zero: refused at once).
    pub wait: Duration,
    /// A writer that has neither taken nor finished a write for this long while its
    /// share is full is stuck: requests for it are refused at once instead of waiting.
    pub stuck_after: Duration,
}

/// Cheap to clone; the queue closes when every clone is dropped.
#[derive(Clone)]
pub struct Batcher {
    lanes: Arc<Vec<mpsc::Sender<Job>>>,
    /// Each lane's share of the queue: a lane whose writer is slow (a hot visitor, write
    /// conflicts) fills its own share, not the whole queue, so the other lanes' visitors
    /// are still served.
    permits: Arc<Vec<Arc<Semaphore>>>,
    /// Permits per lane.
    share: usize,
    capacity: usize,
    /// How long a request that does not fit waits for room, and when a writer is stuck.
    admission: Admission,
    /// Requests waiting for room now.
    waiting: Arc<AtomicUsize>,
    /// When each lane's writer last took or finished a write (milliseconds after
    /// `started`).
    progress: Arc<Vec<AtomicU64>>,
    started: Instant,
    /// Set by [`Batcher::close`]: the writers take nothing new and end once they have
    /// written what is queued.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// The lanes' writer (its clones share what it remembers).
    writer: EventWriter,
    /// How the writes of late went, for `/readyz`.
    health: Arc<Health>,
}

/// When the writers' last write that succeeded, and the last that failed (or that a
/// request gave up waiting for), ended; milliseconds after the batcher started, plus one
/// (0: never). With the last failure's message.
#[derive(Default)]
struct Health {
    last_ok: AtomicU64,
    last_failed: AtomicU64,
    failure: std::sync::Mutex<String>,
}

/// Now on [`Health`]'s clock: milliseconds after `started`, plus one (0 is never).
fn health_clock(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64 + 1
}

impl Health {
    fn failed(&self, now: u64, message: &str) {
        message.clone_into(
            &mut self
                .failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.last_failed.fetch_max(now, Relaxed);
    }
}

/// A write that succeeded this recently keeps `/readyz` ready whatever failed since:
/// the lanes write for different visitors, and one lane failing (a hot visitor's
/// conflicts) while the others succeed is no reason to leave rotation.
pub const WRITES_SUCCEEDING: Duration = Duration::from_secs(10);

impl Batcher {
    /// Starts `writers` tasks; they finish once every `Batcher` clone is dropped and the
    /// queue is drained. A request that does not fit waits for room as `admission` says.
    pub fn start(
        writer: EventWriter,
        capacity: usize,
        batch_size: usize,
        writers: usize,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let mut lanes = Vec::with_capacity(writers);
        let mut handles = Vec::with_capacity(writers);
        let closing = Arc::new(tokio::sync::watch::channel(false).0);
        let started = Instant::now();
        let progress: Arc<Vec<AtomicU64>> =
            Arc::new((0..writers.max(1)).map(|_| AtomicU64::new(0)).collect());
        let health = Arc::new(Health::default());
        for lane in 0..writers.max(1) {
            let (tx, rx) = mpsc::channel::<Job>(capacity);
            let writer = writer.clone();
            let metrics = metrics.clone();
            let closed = closing.subscribe();
            let progress = progress.clone();
            let wrote = move || {
                progress[lane].store(started.elapsed().as_millis() as u64, Relaxed);
            };
            let health = health.clone();
            let outcome = move |failed: Option<&WriteFailure>| {
                let now = health_clock(started);
                match failed {
                    None => {
                        health.last_ok.fetch_max(now, Relaxed);
                    }
                    Some(f) => health.failed(now, &f.message),
                }
            };
            handles.push(tokio::spawn(async move {
                write_loop(rx, closed, writer, batch_size, metrics, wrote, outcome).await
            }));
            lanes.push(tx);
        }
        let share = capacity / lanes.len();
        let batcher = Self {
            permits: Arc::new(
                (0..lanes.len())
                    .map(|_| Arc::new(Semaphore::new(share)))
                    .collect(),
            ),
            lanes: Arc::new(lanes),
            share,
            capacity: share * writers.max(1),
            admission,
            waiting: Arc::default(),
            progress,
            started,
            closing,
            writer,
            health,
        };
        (batcher, handles)
    }

    /// Takes no more requests (they are answered [`SubmitError::Closed`]); the writers
    /// write what is queued and end. For a shutdown whose handlers may still hold clones.
    pub fn close(&self) {
        self.closing.send_replace(true);
        // Requests waiting for room are refused as closed now, not after their wait.
        for permits in self.permits.iter() {
            permits.close();
        }
    }

    /// Whether this endpoint's writers met write conflicts within the last `window`.
    pub fn met_conflicts_within(&self, window: std::time::Duration) -> bool {
        self.writer.met_conflicts_within(window)
    }

    /// Why event writes fail now: the message of the last write that failed, if one
    /// failed within `window` and none succeeded within [`WRITES_SUCCEEDING`] nor after
    /// it. `None` while writes succeed (some of them: a replica whose writes fail only
    /// for some visitors, on write conflicts say, still serves the others), or when none
    /// failed for `window` (with no traffic, nothing more is known).
    pub fn failing_within(&self, window: Duration) -> Option<String> {
        let failed = self.health.last_failed.load(Relaxed);
        let ok = self.health.last_ok.load(Relaxed);
        let now = health_clock(self.started);
        let recent = |at: u64, within: Duration| {
            at != 0 && now.saturating_sub(at) <= within.as_millis() as u64
        };
        if !recent(failed, window) || ok > failed || recent(ok, WRITES_SUCCEEDING) {
            return None;
        }
        Some(
            self.health
                .failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    /// Notes that a request gave up waiting for its events' write (`what` says so): a
    /// write that does not end (a write concern waiting out its `wtimeout`) is failing
    /// long before it fails.
    pub fn note_given_up(&self, what: &str) {
        self.health.failed(health_clock(self.started), what);
    }

    /// The writer lane a visitor's events go to.
    pub fn lane(&self, user_id: &str) -> usize {
        lane_of(user_id, self.lanes.len())
    }

    /// Events the queue holds at most (each lane's share, times the lanes).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Requests waiting for room in the queue now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Events queued or being written now, and room set aside for a request waiting for
    /// the rest it needs.
    pub fn depth(&self) -> usize {
        self.capacity
            - self
                .permits
                .iter()
                .map(|p| p.available_permits())
                .sum::<usize>()
    }

    /// Queues `events` and waits until they are durably written; `held` is released once
    /// every part of them is written (or dropped unqueued).
    pub async fn submit(
        &self,
        events: Vec<Event>,
        held: Option<InFlight>,
    ) -> Result<Vec<WriteStatus>, SubmitError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Checked here too: a writer busy with a write closes its lane only when it next
        // looks, and until then its lane would still take requests.
        if *self.closing.borrow() {
            return Err(SubmitError::Closed);
        }
        let total = events.len();
        // Split by lane, remembering each event's position in the request.
        let mut parts: Vec<(Vec<usize>, Vec<Event>)> = vec![Default::default(); self.lanes.len()];
        for (i, e) in events.into_iter().enumerate() {
            let lane = lane_of(&e.user_id, self.lanes.len());
            parts[lane].0.push(i);
            parts[lane].1.push(e);
        }
        // Every lane's share first, so a request is queued whole or not at all (permits
        // taken are given back when the request is refused). A part bigger than a whole
        // share (a transform that fans events out) takes the whole share rather than
        // being refused for ever.
        let needs: Vec<u32> = parts
            .iter()
            .map(|(_, events)| events.len().min(self.share).min(u32::MAX as usize) as u32)
            .collect();
        let shares = match self.try_reserve(&needs) {
            Some(shares) => shares,
            None if self.admission.wait.is_zero() || self.stuck(&needs) => {
                return Err(SubmitError::Full)
            }
            None => self.reserve_waiting(&needs).await?,
        };
        let mut answers = Vec::new();
        for ((lane, (positions, events)), share) in parts.into_iter().enumerate().zip(shares) {
            // The permits travel with the job and return when it is answered.
            let Some(share) = share else {
                continue;
            };
            let (reply, answer) = oneshot::channel();
            self.lanes[lane]
                .try_send(Job {
                    events,
                    reply,
                    _permit: share,
                    _held: held.clone(),
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })?;
            answers.push((positions, answer));
        }
        let mut statuses = vec![WriteStatus::Retry; total];
        for (positions, answer) in answers {
            match answer.await {
                Ok(Ok(part)) => {
                    for (pos, status) in positions.into_iter().zip(part) {
                        statuses[pos] = status;
                    }
                }
                Ok(Err(e)) => return Err(SubmitError::Store(e)),
                Err(_) => return Err(SubmitError::Closed),
            }
        }
        Ok(statuses)
    }
}

impl Batcher {
    /// Each lane's `needs` (0: none) if the queue has room for all of them now.
    fn try_reserve(&self, needs: &[u32]) -> Option<Vec<Option<OwnedSemaphorePermit>>> {
        needs
            .iter()
            .zip(self.permits.iter())
            .map(|(&n, permits)| match n {
                0 => Ok(None),
                n => permits.clone().try_acquire_many_owned(n).map(Some),
            })
            .collect::<Result<_, _>>()
            .ok()
    }

    /// Whether `lane` has too little room for `n` events now.
    fn lacks_room(&self, lane: usize, n: u32) -> bool {
        n > 0 && (self.permits[lane].available_permits() as u64) < u64::from(n)
    }

    /// Whether a lane without room for its part of `needs` has a writer that has neither
    /// taken nor finished a write for `stuck_after` (a store that does not answer):
    /// requests are refused at once there rather than piling up for their whole wait,
    /// holding the connections and in-flight bytes every lane shares.
    fn stuck(&self, needs: &[u32]) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let stuck_after = self.admission.stuck_after.as_millis() as u64;
        needs.iter().enumerate().any(|(lane, &n)| {
            self.lacks_room(lane, n)
                && now.saturating_sub(self.progress[lane].load(Relaxed)) > stuck_after
        })
    }

    /// Waits up to `admission.wait` for each lane's `needs`. It waits on one full lane
    /// at a time, holding only the room it is given there, and takes the other lanes'
    /// room only once that lane's is whole (a lane full by then is waited on next, and
    /// what was held is given back): a request never holds room in a lane that has some
    /// while it waits on a slow one, whose writers would otherwise sit idle. The
    /// semaphores are fair: in the lane it waits on, a request is served before requests
    /// that came after it, so a large batch (an app back online) is not starved by a
    /// stream of small ones, which wait behind it rather than taking the room it waits
    /// for.
    async fn reserve_waiting(
        &self,
        needs: &[u32],
    ) -> Result<Vec<Option<OwnedSemaphorePermit>>, SubmitError> {
        /// Takes the request off the gauge however it stops waiting.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting);
        let reserve = async {
            let mut wait_on = (0..needs.len())
                .find(|&lane| self.lacks_room(lane, needs[lane]))
                .unwrap_or(0);
            loop {
                let mut shares: Vec<Option<OwnedSemaphorePermit>> =
                    (0..needs.len()).map(|_| None).collect();
                if needs[wait_on] > 0 {
                    shares[wait_on] = Some(
                        self.permits[wait_on]
                            .clone()
                            .acquire_many_owned(needs[wait_on])
                            .await
                            .map_err(|_| SubmitError::Closed)?,
                    );
                }
                let mut full = None;
                for (lane, &n) in needs.iter().enumerate() {
                    if n == 0 || lane == wait_on {
                        continue;
                    }
                    match self.permits[lane].clone().try_acquire_many_owned(n) {
                        Ok(share) => shares[lane] = Some(share),
                        Err(TryAcquireError::Closed) => return Err(SubmitError::Closed),
                        Err(TryAcquireError::NoPermits) => {
                            full = Some(lane);
                            break;
                        }
                    }
                }
                match full {
                    None => return Ok(shares),
                    // Given back as `shares` drops, and that lane waited on.
                    Some(lane) => wait_on = lane,
                }
            }
        };
        match tokio::time::timeout(self.admission.wait, reserve).await {
            Ok(shares) => shares,
            Err(_) => Err(SubmitError::Full),
        }
    }
}

/// The writer lane of a visitor (FNV-1a: stable and cheap).
fn lane_of(user_id: &str, lanes: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes as u64) as usize
}

async fn write_loop(
    mut rx: mpsc::Receiver<Job>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    writer: EventWriter,
    batch_size: usize,
    metrics: Arc<Metrics>,
    wrote: impl Fn(),
    outcome: impl Fn(Option<&WriteFailure>),
) {
    let mut closed = false;
    loop {
        let mut jobs = Vec::new();
        let next = tokio::select! {
            job = rx.recv() => job,
            _ = closing.wait_for(|c| *c), if !closed => {
                // What is queued is still written; nothing more is taken.
                rx.close();
                closed = true;
                continue;
            }
        };
        match next {
            Some(job) => jobs.push(job),
            None => return,
        }
        // A writer that takes work after being idle is not stuck, however long ago its
        // last write ended.
        wrote();
        let mut total = jobs[0].events.len();
        while total < batch_size {
            match rx.try_recv() {
                Ok(job) => {
                    total += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // A request whose handler is gone (its client hung up, or it answered 503 after
        // `write_timeout_seconds`) was not acknowledged: its client resends, and writing
        // it now would only keep a slow store busier. Its permits return with it.
        let before = jobs.len();
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.len() < before {
            tracing::debug!(
                requests = before - jobs.len(),
                "skipped requests nobody waits for"
            );
        }
        if jobs.is_empty() {
            continue;
        }
        let total: usize = jobs.iter().map(|j| j.events.len()).sum();
        // The events move into one write; each job keeps its count to take its answers.
        let mut events = Vec::with_capacity(total);
        let mut counts = Vec::with_capacity(jobs.len());
        for job in &mut jobs {
            counts.push(job.events.len());
            events.append(&mut job.events);
        }
        let started = Instant::now();
        // A panic while writing fails this write's requests (they may be resent: writes
        // are idempotent) and keeps the lane alive; without this, one bad batch would
        // leave every later visitor of the lane unanswerable.
        let result = match AssertUnwindSafe(writer.write(&events)).catch_unwind().await {
            Ok(result) => result.map_err(|e| WriteFailure {
                conflicts: matches!(
                    e,
                    sluice_connectors::StoreError::Transaction {
                        transient: true,
                        ..
                    }
                ),
                message: e.to_string(),
            }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, events = events.len(), "event writer panicked");
                Err(WriteFailure {
                    message: "internal error while writing events".to_string(),
                    conflicts: false,
                })
            }
        };
        metrics.observe_write(started.elapsed());
        wrote();
        outcome(result.as_ref().err());
        match result {
            Ok(statuses) => {
                let mut offset = 0;
                for (job, n) in jobs.into_iter().zip(counts) {
                    let _ = job.reply.send(Ok(statuses[offset..offset + n].to_vec()));
                    offset += n;
                }
            }
            Err(failure) => {
                tracing::error!(error = %failure.message, events = events.len(), "event write failed");
                for job in jobs {
                    let _ = job.reply.send(Err(failure.clone()));
                }
            }
        }
    }
}
