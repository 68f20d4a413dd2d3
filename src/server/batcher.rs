//! The bounded in-process batcher between the HTTP handlers and MongoDB.
//!
//! Handlers submit the events of one request and wait for their statuses; writer tasks
//! coalesce queued requests into writes of up to `write_batch_size` events. The queue is
//! bounded in events by a semaphore: when it is full, `submit` fails at once (the endpoint
//! answers 503 with `Retry-After`) instead of buffering without bound. A request is only
//! answered after MongoDB acknowledged its events.

use std::sync::Arc;
use std::time::Instant;

use sluice_connectors::mongo::{EventWriter, WriteStatus};
use sluice_core::model::Event;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the ingest queue is full")]
    Full,
    #[error("the event store failed: {0}")]
    Store(String),
    #[error("the server is shutting down")]
    Closed,
}

struct Job {
    events: Vec<Event>,
    reply: oneshot::Sender<Result<Vec<WriteStatus>, String>>,
    _permit: OwnedSemaphorePermit,
}

/// Cheap to clone; the queue closes when every clone is dropped.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl Batcher {
    /// Starts `writers` tasks; they finish once every `Batcher` clone is dropped and the
    /// queue is drained.
    pub fn start(
        writer: EventWriter,
        capacity: usize,
        batch_size: usize,
        writers: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..writers)
            .map(|_| {
                let rx = rx.clone();
                let writer = writer.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move { write_loop(rx, writer, batch_size, metrics).await })
            })
            .collect();
        let batcher = Self {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
        };
        (batcher, handles)
    }

    /// Events queued or being written now.
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Queues `events` and waits until they are durably written.
    pub async fn submit(&self, events: Vec<Event>) -> Result<Vec<WriteStatus>, SubmitError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = u32::try_from(events.len()).map_err(|_| SubmitError::Full)?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| SubmitError::Full)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Job {
                events,
                reply,
                _permit: permit,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
            })?;
        match answer.await {
            Ok(Ok(statuses)) => Ok(statuses),
            Ok(Err(e)) => Err(SubmitError::Store(e)),
            Err(_) => Err(SubmitError::Closed),
        }
    }
}

async fn write_loop(
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    writer: EventWriter,
    batch_size: usize,
    metrics: Arc<Metrics>,
) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
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
        }
        let events: Vec<Event> = jobs.iter().flat_map(|j| j.events.iter().cloned()).collect();
        let started = Instant::now();
        let result = writer.write(&events).await;
        metrics.observe_write(started.elapsed());
        match result {
            Ok(statuses) => {
                let mut offset = 0;
                for job in jobs {
                    let n = job.events.len();
                    let _ = job.reply.send(Ok(statuses[offset..offset + n].to_vec()));
                    offset += n;
                }
            }
            Err(err) => {
                tracing::error!(error = %err, events = events.len(), "event write failed");
                let text = err.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(text.clone()));
                }
            }
        }
    }
}
