//! The rules that keep `sessions` and `users` equal to a recomputation from `events`.
//!
//! Aggregates are folded from the *newly stored* events of a batch into the current
//! document. Every rule is order-independent (min / max over a total order, integer sums),
//! so shuffled, late or replayed deliveries give the same documents as one ordered pass.

use bson::DateTime;

use crate::model::{Event, EventKey, EventType, Session, SessionStatus, User};

/// Revenue is summed in millionths so the total does not depend on arrival order.
pub const REVENUE_SCALE: f64 = 1_000_000.0;

/// Converts an amount to integer millionths (rounded half away from zero).
pub fn revenue_micros(amount: f64) -> i64 {
    (amount * REVENUE_SCALE).round() as i64
}

fn key(e: &Event) -> EventKey {
    EventKey {
        timestamp: e.timestamp,
        event_id: e.event_id.clone(),
    }
}

/// Whether an event counts as a page view of its session.
pub fn is_page_view(e: &Event) -> bool {
    matches!(e.event_type, EventType::PageView | EventType::ScreenView)
}

/// Folds newly stored `events` (all of one session) into the session document.
///
/// `existing` is the stored document, or `None` for a session seen for the first time.
/// `events` must not be empty and must not contain events already folded in.
pub fn fold_session(existing: Option<Session>, events: &[&Event], now: DateTime) -> Session {
    let existing = existing.map(with_keys_of_its_own);
    let first = events
        .iter()
        .min_by_key(|e| key(e))
        .expect("fold_session needs at least one event"); // caller groups non-empty slices
    let mut s = existing.unwrap_or_else(|| Session {
        id: None,
        session_id: first.session_id.clone(),
        user_id: first.user_id.clone(),
        status: SessionStatus::Active,
        start_time: first.timestamp,
        end_time: first.timestamp,
        duration: 0,
        page_views: 0,
        events: 0,
        entry_page: None,
        exit_page: None,
        device: None,
        browser: None,
        os: None,
        country: None,
        region: None,
        city: None,
        ip_address: None,
        user_agent: None,
        first_event: None,
        entry_event: None,
        exit_event: None,
        created_at: now,
        updated_at: now,
    });
    let ended = s.end_time;
    for e in events {
        let k = key(e);
        s.events += 1;
        if is_page_view(e) {
            s.page_views += 1;
        }
        if e.timestamp < s.start_time {
            s.start_time = e.timestamp;
        }
        if e.timestamp > s.end_time {
            s.end_time = e.timestamp;
        }
        if s.first_event.as_ref().is_none_or(|f| k < *f) {
            // A session belongs to the visitor of its earliest event, whatever arrived first.
            s.user_id = e.user_id.clone();
            let m = &e.metadata;
            s.device = m.device.clone();
            s.browser = m.browser.clone();
            s.os = m.os.clone();
            s.country = m.country.clone();
            s.region = m.region.clone();
            s.city = m.city.clone();
            s.ip_address = m.ip_address.clone();
            s.user_agent = m.user_agent.clone();
            s.first_event = Some(k.clone());
        }
        if let Some(page) = &e.page_url {
            if s.entry_event.as_ref().is_none_or(|f| k < *f) {
                s.entry_page = Some(page.clone());
                s.entry_event = Some(k.clone());
            }
            if s.exit_event.as_ref().is_none_or(|l| k > *l) {
                s.exit_page = Some(page.clone());
                s.exit_event = Some(k);
            }
        }
    }
    // A session that goes on after the sweeper expired it (a client keeping its
    // sessionId through a long pause) is active again; the sweeper expires it once it
    // is idle again. A late event inside its span leaves it as it was. (ENDED, which
    // Sluice does not write, is another writer's word for it.)
    if s.end_time > ended && matches!(s.status, SessionStatus::Expired | SessionStatus::Ended) {
        s.status = SessionStatus::Active;
    }
    s.duration = s.end_time.timestamp_millis() - s.start_time.timestamp_millis();
    s.updated_at = now;
    s
}

/// A session another writer stored (as the design document has it: no ordering keys)
/// keeps what it says: its device, location and entry page are taken as those of an
/// event at its `startTime`, its exit page as that of one at its `endTime`. So only an
/// event before its start changes the former, and only one from its end on the latter,
/// where without keys the first new event would replace them all. A session Sluice
/// stored always has its first event's key, and page keys when it has pages.
fn with_keys_of_its_own(mut s: Session) -> Session {
    let at = |timestamp| EventKey {
        timestamp,
        event_id: String::new(),
    };
    if s.first_event.is_none() {
        s.first_event = Some(at(s.start_time));
    }
    if s.entry_event.is_none() && s.entry_page.is_some() {
        s.entry_event = Some(at(s.start_time));
    }
    if s.exit_event.is_none() && s.exit_page.is_some() {
        s.exit_event = Some(at(s.end_time));
    }
    s
}

/// `sluice_user_revenue_saturated_total`.
pub fn count_revenue_saturated(n: u64) {
    crate::metrics::count(
        "sluice_user_revenue_saturated_total",
        "Purchases not added to a user's totalRevenue because it is at its maximum (about 9.2e12).",
        &[],
        n,
    );
}

/// Folds newly stored `events` (all of one visitor) into the user document.
///
/// `new_sessions` is how many sessions this batch gave the visitor: sessions it created,
/// plus sessions whose owner became the visitor, minus those it stopped owning.
pub fn fold_user(
    existing: Option<User>,
    visitor_id: &str,
    events: &[&Event],
    new_sessions: i64,
    now: DateTime,
) -> User {
    let mut u = existing.unwrap_or_else(|| User {
        id: None,
        visitor_id: visitor_id.to_string(),
        email: None,
        first_name: None,
        last_name: None,
        attributes: bson::Document::new(),
        first_seen: events.iter().map(|e| e.timestamp).min().unwrap_or(now),
        last_seen: events.iter().map(|e| e.timestamp).max().unwrap_or(now),
        total_sessions: 0,
        total_events: 0,
        total_purchases: 0,
        total_revenue: 0.0,
        total_revenue_micros: 0,
        tags: Vec::new(),
        segments: Vec::new(),
        created_at: now,
        updated_at: now,
    });
    for e in events {
        u.first_seen = u.first_seen.min(e.timestamp);
        u.last_seen = u.last_seen.max(e.timestamp);
        // Saturating: input validation bounds each amount so a total cannot overflow in
        // practice, and an aggregate must never be the reason a write fails.
        u.total_events = u.total_events.saturating_add(1);
        if e.event_type == EventType::Purchase {
            u.total_purchases = u.total_purchases.saturating_add(1);
            if let Some(amount) = e.purchase_amount() {
                u.total_revenue_micros =
                    match u.total_revenue_micros.checked_add(revenue_micros(amount)) {
                        Some(total) => total,
                        // About 9.2e12 in the purchase currency: said where an operator
                        // looks, not only held at the maximum.
                        None => {
                            count_revenue_saturated(1);
                            i64::MAX
                        }
                    };
            }
        }
    }
    u.total_sessions = u.total_sessions.saturating_add(new_sessions);
    u.total_revenue = u.total_revenue_micros as f64 / REVENUE_SCALE;
    u.updated_at = now;
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventMetadata;

    fn ev(id: &str, ts: i64, t: EventType, page: Option<&str>, device: &str) -> Event {
        Event {
            id: None,
            event_id: id.into(),
            user_id: "v1".into(),
            session_id: "s1".into(),
            event_type: t,
            timestamp: DateTime::from_millis(ts),
            properties: if t == EventType::Purchase {
                bson::doc! { "amount": 0.1 }
            } else {
                bson::Document::new()
            },
            metadata: EventMetadata {
                device: Some(device.into()),
                ..Default::default()
            },
            page_url: page.map(str::to_string),
            referrer: None,
            duration: None,
            created_at: DateTime::from_millis(0),
            updated_at: DateTime::from_millis(0),
        }
    }

    fn strip_times(mut s: Session) -> Session {
        s.created_at = DateTime::from_millis(0);
        s.updated_at = DateTime::from_millis(0);
        s
    }

    #[test]
    fn a_session_belongs_to_its_earliest_events_visitor_whatever_arrived_first() {
        let anon = ev("a", 1000, EventType::PageView, Some("/"), "desktop");
        let mut login = ev("b", 2000, EventType::Login, None, "desktop");
        login.user_id = "known".into();
        let now = DateTime::from_millis(10_000);
        let later_first = fold_session(Some(fold_session(None, &[&login], now)), &[&anon], now);
        let in_order = fold_session(Some(fold_session(None, &[&anon], now)), &[&login], now);
        assert_eq!(later_first.user_id, "v1");
        assert_eq!(in_order.user_id, "v1");
    }

    #[test]
    fn session_fold_is_independent_of_arrival_order() {
        let events = [
            ev("a", 1000, EventType::PageView, Some("/home"), "desktop"),
            ev("b", 5000, EventType::Click, None, "mobile"),
            ev("c", 3000, EventType::PageView, Some("/p/1"), "tablet"),
            ev("d", 9000, EventType::Purchase, Some("/checkout"), "mobile"),
        ];
        let now = DateTime::from_millis(10_000);
        let in_order: Vec<&Event> = events.iter().collect();
        let one_pass = strip_times(fold_session(None, &in_order, now));

        // Late delivery: the last two arrive first, in a separate batch.
        let late = fold_session(None, &[&events[3], &events[1]], now);
        let merged = strip_times(fold_session(Some(late), &[&events[2], &events[0]], now));
        assert_eq!(one_pass, merged);
        assert_eq!(merged.entry_page.as_deref(), Some("/home"));
        assert_eq!(merged.exit_page.as_deref(), Some("/checkout"));
        assert_eq!(merged.device.as_deref(), Some("desktop"));
        assert_eq!(merged.duration, 8000);
        assert_eq!((merged.events, merged.page_views), (4, 2));
    }

    #[test]
    fn an_expired_session_that_goes_on_is_active_again_and_a_late_event_leaves_it() {
        let now = DateTime::from_millis(10_000_000);
        let mut s = fold_session(None, &[&ev("a", 1000, EventType::PageView, None, "x")], now);
        s.status = SessionStatus::Expired;
        let late = fold_session(
            Some(s.clone()),
            &[&ev("b", 500, EventType::Click, None, "x")],
            now,
        );
        assert_eq!(late.status, SessionStatus::Expired);
        let resumed = fold_session(
            Some(s),
            &[&ev("c", 4_000_000, EventType::Click, None, "x")],
            now,
        );
        assert_eq!(resumed.status, SessionStatus::Active);
    }

    #[test]
    fn a_session_another_writer_stored_keeps_its_pages_device_and_place() {
        let now = DateTime::from_millis(10_000_000);
        let at = DateTime::from_millis;
        // As the design document's writer stores one: no ordering keys.
        let legacy = Session {
            id: None,
            session_id: "s1".into(),
            user_id: "v1".into(),
            status: SessionStatus::Ended,
            start_time: at(1000),
            end_time: at(5000),
            duration: 4000,
            page_views: 2,
            events: 3,
            entry_page: Some("/".into()),
            exit_page: Some("/b".into()),
            device: Some("mobile".into()),
            browser: Some("Safari".into()),
            os: Some("iOS".into()),
            country: Some("FR".into()),
            region: None,
            city: Some("Paris".into()),
            ip_address: None,
            user_agent: None,
            first_event: None,
            entry_event: None,
            exit_event: None,
            created_at: at(1000),
            updated_at: at(5000),
        };
        // Inside its span: counted, nothing else changes.
        let inside = fold_session(
            Some(legacy.clone()),
            &[&ev(
                "in",
                3000,
                EventType::PageView,
                Some("/mid"),
                "desktop",
            )],
            now,
        );
        assert_eq!(
            (inside.entry_page.as_deref(), inside.exit_page.as_deref()),
            (Some("/"), Some("/b"))
        );
        assert_eq!(inside.device.as_deref(), Some("mobile"));
        assert_eq!(inside.country.as_deref(), Some("FR"));
        assert_eq!((inside.events, inside.page_views), (4, 3));
        assert_eq!(inside.status, SessionStatus::Ended);
        // After its end: the exit page moves, the rest stays, and it goes on.
        let after = fold_session(
            Some(legacy.clone()),
            &[&ev(
                "after",
                6000,
                EventType::PageView,
                Some("/new"),
                "desktop",
            )],
            now,
        );
        assert_eq!(
            (after.entry_page.as_deref(), after.exit_page.as_deref()),
            (Some("/"), Some("/new"))
        );
        assert_eq!(after.device.as_deref(), Some("mobile"));
        assert_eq!(after.city.as_deref(), Some("Paris"));
        assert_eq!(
            (after.status, after.duration),
            (SessionStatus::Active, 5000)
        );
        // Before its start: the entry page and the device are the earlier event's.
        let before = fold_session(
            Some(legacy),
            &[&ev(
                "early",
                500,
                EventType::PageView,
                Some("/late"),
                "desktop",
            )],
            now,
        );
        assert_eq!(
            (before.entry_page.as_deref(), before.exit_page.as_deref()),
            (Some("/late"), Some("/b"))
        );
        assert_eq!(before.device.as_deref(), Some("desktop"));
        assert_eq!(before.start_time, at(500));
    }

    #[test]
    fn equal_timestamps_are_ordered_by_event_id() {
        let a = ev("a", 1000, EventType::PageView, Some("/a"), "x");
        let b = ev("b", 1000, EventType::PageView, Some("/b"), "y");
        let s1 = fold_session(None, &[&a, &b], DateTime::from_millis(0));
        let s2 = fold_session(None, &[&b, &a], DateTime::from_millis(0));
        assert_eq!(s1.entry_page.as_deref(), Some("/a"));
        assert_eq!(s1.exit_page.as_deref(), Some("/b"));
        assert_eq!(s1, s2);
    }

    #[test]
    fn revenue_sums_exactly_whatever_the_order() {
        let p: Vec<Event> = (0..10)
            .map(|i| ev(&format!("p{i}"), i, EventType::Purchase, None, "x"))
            .collect();
        let refs: Vec<&Event> = p.iter().collect();
        let mut u = fold_user(None, "v1", &refs[..3], 1, DateTime::from_millis(0));
        u = fold_user(Some(u), "v1", &refs[3..], 0, DateTime::from_millis(0));
        assert_eq!(u.total_purchases, 10);
        assert_eq!(u.total_revenue, 1.0, "0.1 ten times must be exactly 1.0");
        assert_eq!(u.total_sessions, 1);
        assert_eq!(u.first_seen, DateTime::from_millis(0));
        assert_eq!(u.last_seen, DateTime::from_millis(9));
    }

    #[test]
    fn user_totals_saturate_instead_of_overflowing() {
        let mut buy = ev("b1", 1_000, EventType::Purchase, None, "desktop");
        buy.properties.insert("amount", 1e9);
        let mut before = fold_user(None, "v", &[&buy], 1, DateTime::from_millis(0));
        before.total_revenue_micros = i64::MAX - 1;
        let mut again = buy.clone();
        again.event_id = "b2".into();
        let after = fold_user(Some(before), "v", &[&again], 0, DateTime::from_millis(0));
        assert_eq!(after.total_revenue_micros, i64::MAX);
        assert_eq!(after.total_purchases, 2);
        // Counted where an operator looks.
        let metrics = crate::metrics::render();
        assert!(
            metrics.lines().any(
                |l| l.starts_with("sluice_user_revenue_saturated_total ") && !l.ends_with(" 0")
            ),
            "{metrics}"
        );
    }
}
