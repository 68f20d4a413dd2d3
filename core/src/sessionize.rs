//! Sessions for events that arrive without a `sessionId` (SDKs that keep no session): a
//! visitor's events more than the inactivity gap apart belong to different sessions.
//!
//! The rule is applied per write batch against the visitor's sessions already stored: an
//! event joins the stored or new session whose time span, widened by the gap on both
//! sides, contains it (the earliest such session if several do), and otherwise opens a new
//! session whose id is derived from the visitor and the event's time (a UUID v5), so the
//! same events replayed in the same order get the same ids. Events are taken in time order
//! within a batch, so out-of-order delivery inside a batch does not matter; across
//! batches, an event arriving before earlier ones simply widens its session backwards.
//! The one order-dependent case: an event arriving late that bridges two sessions already
//! stored joins the earlier one; stored sessions are never merged.

/// A session's time span, in epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub session_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5c1e_7a3d_9b40_4e8a_a1f2_0d6c_3b7e_9f15);

/// The id of the session a visitor opens at `start_ms`.
pub fn session_id(visitor: &str, start_ms: i64) -> String {
    let name = format!("{visitor}\u{0}{start_ms}");
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// Assigns a session to each of `times` (one visitor's events, any order); `spans` holds
/// the visitor's known sessions and is widened / extended in place. Returns the session
/// ids in the order of `times`.
pub fn assign(visitor: &str, times: &[i64], spans: &mut Vec<Span>, gap_ms: i64) -> Vec<String> {
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by_key(|&i| times[i]);
    let mut ids = vec![String::new(); times.len()];
    for i in order {
        let t = times[i];
        let found = spans
            .iter_mut()
            .filter(|s| s.start_ms - gap_ms <= t && t <= s.end_ms + gap_ms)
            .min_by(|a, b| (a.start_ms, &a.session_id).cmp(&(b.start_ms, &b.session_id)));
        match found {
            Some(span) => {
                span.start_ms = span.start_ms.min(t);
                span.end_ms = span.end_ms.max(t);
                ids[i] = span.session_id.clone();
            }
            None => {
                let id = session_id(visitor, t);
                ids[i] = id.clone();
                spans.push(Span {
                    session_id: id,
                    start_ms: t,
                    end_ms: t,
                });
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const GAP: i64 = 30 * MIN;

    fn groups(times: &[i64], ids: &[String]) -> Vec<Vec<i64>> {
        let mut by: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
        for (t, id) in times.iter().zip(ids) {
            by.entry(id.as_str()).or_default().push(*t);
        }
        let mut out: Vec<Vec<i64>> = by
            .into_values()
            .map(|mut v| {
                v.sort();
                v
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_gap_longer_than_the_timeout_starts_a_new_session() {
        let times = [0, 10 * MIN, 39 * MIN, 70 * MIN, 75 * MIN];
        let ids = assign("v", &times, &mut Vec::new(), GAP);
        assert_eq!(
            groups(&times, &ids),
            vec![vec![0, 10 * MIN, 39 * MIN], vec![70 * MIN, 75 * MIN]]
        );
        // The gap is exclusive of exactly 30 minutes: 39 -> 70 is 31 minutes.
        assert_ne!(ids[2], ids[3]);
    }

    #[test]
    fn any_delivery_order_in_separate_batches_gives_the_same_sessions() {
        let times = [0, 5 * MIN, 20 * MIN, 90 * MIN, 100 * MIN, 200 * MIN];
        let expected = groups(&times, &assign("v", &times, &mut Vec::new(), GAP));
        // Deliver one event per batch in several orders, carrying the spans along as the
        // store would.
        for order in [[5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2], [2, 5, 0, 4, 1, 3]] {
            let mut spans = Vec::new();
            let mut ids = vec![String::new(); times.len()];
            for i in order {
                ids[i] = assign("v", &[times[i]], &mut spans, GAP).remove(0);
            }
            assert_eq!(groups(&times, &ids), expected, "order {order:?}");
        }
    }

    #[test]
    fn ids_are_deterministic_and_per_visitor() {
        let a = assign("v", &[1_000, 2_000], &mut Vec::new(), GAP);
        let b = assign("v", &[2_000, 1_000], &mut Vec::new(), GAP);
        assert_eq!(a[0], b[1]);
        assert_eq!(a[0], session_id("v", 1_000));
        assert_ne!(session_id("v", 1_000), session_id("w", 1_000));
    }

    #[test]
    fn joins_a_stored_session_within_the_gap() {
        let mut spans = vec![Span {
            session_id: "stored".into(),
            start_ms: 100 * MIN,
            end_ms: 110 * MIN,
        }];
        let ids = assign("v", &[80 * MIN, 135 * MIN, 200 * MIN], &mut spans, GAP);
        assert_eq!(ids[0], "stored");
        assert_eq!(ids[1], "stored");
        assert_ne!(ids[2], "stored");
        assert_eq!(spans[0].start_ms, 80 * MIN);
    }
}
