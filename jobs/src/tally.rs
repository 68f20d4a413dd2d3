//! Work in flight in this process, counted while each piece's guard lives, so a stopping
//! process can wait (for a bounded time) until none is left.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub(crate) struct Tally(AtomicUsize);

/// One piece of work counted in a [`Tally`] until it is dropped.
pub(crate) struct Counted(Arc<Tally>);

impl Tally {
    pub(crate) fn enter(self: &Arc<Self>) -> Counted {
        self.0.fetch_add(1, SeqCst);
        Counted(self.clone())
    }

    /// Waits at most `limit` until nothing is counted; true if nothing is.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.0.load(SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, SeqCst);
    }
}
