//! Retrying a store write for a bounded time.

use std::future::Future;
use std::time::Duration;

/// First pause between attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds, fails with an error `retryable` says no later attempt
/// can avoid, or `within` has passed, pausing 100 ms (doubling up to 5 s) in between. An
/// attempt still under way at the deadline is cut: the answer is then `Err(None)`.
/// Otherwise the last attempt's own error is returned. `what` names the work in the
/// warning logged before each further attempt.
pub(crate) async fn retry_within<T, E, Fut>(
    within: Duration,
    what: &str,
    retryable: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, Option<E>>
where
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Err(_) => return Err(None),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if retryable(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(error = %e, "could not {what}; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Ok(Err(e)) => return Err(Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_what_may_pass_until_it_does_and_stops_at_what_cannot() {
        // Pauses of 0.1, 0.2 and 0.4 s fit in 5 s.
        let tries = AtomicU32::new(0);
        let r: Result<u32, Option<String>> = retry_within(
            Duration::from_secs(5),
            "test",
            |_| true,
            || async {
                match tries.fetch_add(1, Ordering::SeqCst) {
                    0..=2 => Err("down".to_string()),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(r, Ok(3));
        // An error no later attempt avoids ends it at once.
        let tries = AtomicU32::new(0);
        let r: Result<(), Option<String>> = retry_within(
            Duration::from_secs(60),
            "test",
            |e| e != "final",
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("final".to_string())
            },
        )
        .await;
        assert_eq!(r, Err(Some("final".into())));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_with_the_last_error_or_none_when_an_attempt_hangs() {
        let tries = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let r: Result<(), Option<String>> = retry_within(
            Duration::from_millis(500),
            "test",
            |_| true,
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("down".to_string())
            },
        )
        .await;
        assert_eq!(r, Err(Some("down".into())));
        // At 0, 0.1 and 0.3 s (fewer on a slow machine); a fourth would start at 0.7 s.
        // (No fourth attempt: that is what giving up at the deadline means. Its time is
        // checked only against a hang, which a loaded machine cannot cause.)
        assert!((2..=3).contains(&tries.load(Ordering::SeqCst)));
        assert!(started.elapsed() < Duration::from_secs(10));
        let hanging = tokio::time::Instant::now();
        let r: Result<(), Option<String>> = retry_within(
            Duration::from_millis(300),
            "test",
            |_| true,
            std::future::pending::<Result<(), String>>,
        )
        .await;
        assert_eq!(r, Err(None));
        assert!(hanging.elapsed() >= Duration::from_millis(300));
    }
}
