//! The contract between sources, transforms and sinks.
//!
//! A [`Transform`] receives a whole batch and returns, for each input record, zero or more
//! output records (filtering and fan-out are both allowed), in input order. It must be
//! deterministic for a given config and input, so a rerun of a job gives the same output.
//! A transform error fails the batch, never the process; what happens next (fail the run,
//! skip the batch, dead-letter the records) is the pipeline's policy.

/// What flows between stages: a BSON document, exactly as MongoDB stores it.
pub type Record = bson::Document;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transform `{name}` failed: {reason}")]
pub struct TransformError {
    pub name: String,
    pub reason: String,
    /// The same input would fail the same way: the transform rejected a record, trapped
    /// or hit a limit on it. `false` for failures of the moment (a deadline under load) or
    /// of setup (a plugin that cannot load), which say nothing about the records.
    pub caused_by_input: bool,
}

/// A batch-at-a-time record transform (a WASM plugin or a native one).
pub trait Transform: Send + Sync {
    /// The name used in errors, logs and metrics.
    fn name(&self) -> &str;

    /// Transforms one batch; see the module docs for the contract. Records the transform
    /// fails under a dead-letter policy go to `call.letters`, those it drops under
    /// skip-batch to `call.skipped`, each with its reason: they belong to this call, so
    /// calls running at once (requests of the tracking endpoint sharing a transform)
    /// never take each other's. When the call fails, what it put aside is discarded by
    /// the caller (the batch will be retried or the run fails).
    fn apply(&self, batch: Vec<Record>, call: &mut Call) -> Result<Vec<Record>, TransformError>;
}

/// One call of a transform besides its batch: the caller's time limit, and the records
/// the call put aside instead of returning them.
#[derive(Debug, Default)]
pub struct Call {
    /// When the caller needs an answer by: a transform that narrows a failing batch down
    /// (a call per part) stops narrowing then, whatever its own budget. `None`: the
    /// transform's own budget alone.
    pub until: Option<std::time::Instant>,
    /// Records failed under the dead-letter policy, with the reason.
    pub letters: Vec<(Record, String)>,
    /// Records dropped under the skip-batch policy, with the reason.
    pub skipped: Vec<(Record, String)>,
}

impl Call {
    pub fn until(until: Option<std::time::Instant>) -> Self {
        Call {
            until,
            ..Call::default()
        }
    }
}

/// What a plugin's trap adds to its reason for the operator: the last line the call wrote
/// to stderr (a Rust panic's message), then `)`.
pub const STDERR_NOTE: &str = " (last stderr line: ";

/// A failure's `reason` as a tracking client may read it: without what the plugin wrote
/// to stderr, which can be any debug output (a salt, a record of another visitor). The
/// whole reason stays in the log and in `dead_letters`.
pub fn client_reason(reason: &str) -> &str {
    reason.split_once(STDERR_NOTE).map_or(reason, |(r, _)| r)
}

/// A record a transform failed, kept instead of stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub transform: String,
    pub reason: String,
    pub record: Record,
}

/// What a chain made of a batch.
#[derive(Debug, Default)]
pub struct Applied {
    pub records: Vec<Record>,
    /// The records a transform failed under the dead-letter policy; the pipeline stores
    /// them.
    pub dead_letters: Vec<DeadLetter>,
    /// The records a transform dropped under the skip-batch policy (as it received them,
    /// with the reason); the pipeline counts and reports them, and stores nothing of them.
    pub skipped: Vec<DeadLetter>,
}

impl Applied {
    /// A batch no transform looked at.
    pub fn untouched(records: Vec<Record>) -> Self {
        Applied {
            records,
            ..Applied::default()
        }
    }
}

/// Runs `batch` through each transform in order.
pub fn apply_chain(
    chain: &[std::sync::Arc<dyn Transform>],
    batch: Vec<Record>,
) -> Result<Applied, TransformError> {
    apply_chain_until(chain, batch, None)
}

/// [`apply_chain`], each call told the caller's time limit (see [`Call::until`]).
fn apply_chain_until(
    chain: &[std::sync::Arc<dyn Transform>],
    mut batch: Vec<Record>,
    until: Option<std::time::Instant>,
) -> Result<Applied, TransformError> {
    let mut out = Applied::default();
    for t in chain {
        if batch.is_empty() {
            break;
        }
        let mut call = Call::until(until);
        batch = t.apply(batch, &mut call)?;
        out.dead_letters.extend(set_aside(t.name(), call.letters));
        out.skipped.extend(set_aside(t.name(), call.skipped));
    }
    out.records = batch;
    Ok(out)
}

fn set_aside(
    transform: &str,
    records: Vec<(Record, String)>,
) -> impl Iterator<Item = DeadLetter> + '_ {
    records.into_iter().map(move |(record, reason)| DeadLetter {
        transform: transform.to_string(),
        reason,
        record,
    })
}

/// What [`apply_chain_isolating`] made of a batch.
#[derive(Debug, Default)]
pub struct Isolated {
    /// The chain's output for every record that passed it.
    pub records: Vec<Record>,
    /// Each record the chain fails on its own: its index in the input, and the error.
    pub failed: Vec<(usize, TransformError)>,
    /// The records a transform failed under the dead-letter policy.
    pub dead_letters: Vec<DeadLetter>,
    /// The records a transform dropped under the skip-batch policy.
    pub skipped: Vec<DeadLetter>,
}

/// Runs `batch` through the chain and, when the chain fails because of its input, finds
/// the records that make it fail: the batch is split in halves, and halves of halves,
/// until each failing record is alone. The others pass as usual. A failure that says
/// nothing about the input (a deadline, a plugin that cannot load) is returned as is.
///
/// For a pipeline with no run to fail (the tracking endpoint): one bad record must not
/// hold back the good ones, nor be retried forever by a client told to resend.
///
/// The narrowing stops once it has spent `budget` (each part costs a call, and a plugin
/// that fails slowly could otherwise cost a deadline per record), the narrowing inside
/// each transform's calls included: the batch then fails with an error that is not the
/// input's, so nothing is stored and the client resends, rather than good records being
/// rejected with the bad ones.
pub fn apply_chain_isolating(
    chain: &[std::sync::Arc<dyn Transform>],
    batch: Vec<Record>,
    budget: std::time::Duration,
) -> Result<Isolated, TransformError> {
    let mut out = Isolated::default();
    let until = std::time::Instant::now() + budget;
    isolate(chain, batch, 0, until, &mut out)?;
    out.failed.sort_by_key(|(index, _)| *index);
    Ok(out)
}

fn isolate(
    chain: &[std::sync::Arc<dyn Transform>],
    batch: Vec<Record>,
    offset: usize,
    until: std::time::Instant,
    out: &mut Isolated,
) -> Result<(), TransformError> {
    // A copy is kept only when there is something to split.
    let len = batch.len();
    let retry = (len > 1).then(|| batch.clone());
    match apply_chain_until(chain, batch, Some(until)) {
        Ok(applied) => {
            out.records.extend(applied.records);
            out.dead_letters.extend(applied.dead_letters);
            out.skipped.extend(applied.skipped);
        }
        Err(e) if !e.caused_by_input => return Err(e),
        Err(e) => match retry {
            None => out.failed.push((offset, e)),
            Some(mut second) if std::time::Instant::now() < until => {
                let first: Vec<Record> = second.drain(..second.len() / 2).collect();
                let split = first.len();
                isolate(chain, first, offset, until, out)?;
                isolate(chain, second, offset + split, until, out)?;
            }
            Some(_) => {
                return Err(TransformError {
                    reason: format!(
                        "{} (finding which of {len} records fail ran out of time)",
                        e.reason
                    ),
                    caused_by_input: false,
                    ..e
                })
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct DropOdd;
    impl Transform for DropOdd {
        fn name(&self) -> &str {
            "drop-odd"
        }
        fn apply(&self, batch: Vec<Record>, _: &mut Call) -> Result<Vec<Record>, TransformError> {
            Ok(batch
                .into_iter()
                .filter(|d| d.get_i32("n").map(|n| n % 2 == 0).unwrap_or(true))
                .collect())
        }
    }

    struct Fail;
    impl Transform for Fail {
        fn name(&self) -> &str {
            "fail"
        }
        fn apply(&self, _: Vec<Record>, _: &mut Call) -> Result<Vec<Record>, TransformError> {
            Err(TransformError {
                name: "fail".into(),
                reason: "always".into(),
                caused_by_input: false,
            })
        }
    }

    /// Fails any batch holding a record with `bad: true`.
    struct RejectBad;
    impl Transform for RejectBad {
        fn name(&self) -> &str {
            "reject-bad"
        }
        fn apply(&self, batch: Vec<Record>, _: &mut Call) -> Result<Vec<Record>, TransformError> {
            match batch
                .iter()
                .position(|d| d.get_bool("bad").unwrap_or(false))
            {
                Some(i) => Err(TransformError {
                    name: "reject-bad".into(),
                    reason: format!("record {i} is bad"),
                    caused_by_input: true,
                }),
                None => Ok(batch),
            }
        }
    }

    /// Skips records with `skip: true`, and notes the time limit it was given.
    struct SkipMarked(std::sync::Mutex<Vec<Option<std::time::Instant>>>);
    impl Transform for SkipMarked {
        fn name(&self) -> &str {
            "skip-marked"
        }
        fn apply(
            &self,
            batch: Vec<Record>,
            call: &mut Call,
        ) -> Result<Vec<Record>, TransformError> {
            self.0.lock().unwrap().push(call.until);
            let (skipped, kept): (Vec<Record>, Vec<Record>) = batch
                .into_iter()
                .partition(|d| d.get_bool("skip").unwrap_or(false));
            call.skipped
                .extend(skipped.into_iter().map(|d| (d, "marked".to_string())));
            Ok(kept)
        }
    }

    #[test]
    fn skipped_records_are_handed_back_and_an_isolating_caller_s_limit_reaches_each_call() {
        let batch: Vec<Record> = (0..4)
            .map(|n| bson::doc! { "n": n, "skip": n == 1 })
            .collect();
        let t = Arc::new(SkipMarked(Default::default()));
        let chain: Vec<Arc<dyn Transform>> = vec![t.clone()];
        let applied = apply_chain(&chain, batch.clone()).unwrap();
        assert_eq!(applied.records.len(), 3);
        assert_eq!(applied.skipped.len(), 1);
        assert_eq!(applied.skipped[0].transform, "skip-marked");
        assert_eq!(applied.skipped[0].record, batch[1]);
        assert!(applied.dead_letters.is_empty());

        let budget = std::time::Duration::from_secs(60);
        let started = std::time::Instant::now();
        let isolated = apply_chain_isolating(&chain, batch, budget).unwrap();
        assert_eq!(isolated.skipped.len(), 1);
        let seen = t.0.lock().unwrap().clone();
        assert_eq!(seen[0], None, "a plain chain sets no limit");
        let until = seen[1].expect("the isolating caller's limit");
        assert!(until >= started + budget && until <= std::time::Instant::now() + budget);
    }

    #[test]
    fn chain_applies_in_order_and_stops_at_an_error() {
        let batch: Vec<Record> = (0..4).map(|n| bson::doc! { "n": n }).collect();
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(DropOdd)];
        assert_eq!(apply_chain(&chain, batch.clone()).unwrap().records.len(), 2);
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(DropOdd), Arc::new(Fail)];
        let err = apply_chain(&chain, batch).unwrap_err();
        assert_eq!(err.to_string(), "transform `fail` failed: always");
    }

    #[test]
    fn isolating_finds_each_failing_record_and_passes_the_rest() {
        let bad = [3usize, 4, 9];
        let batch: Vec<Record> = (0..10)
            .map(|n| bson::doc! { "n": n as i32, "bad": bad.contains(&n) })
            .collect();
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(DropOdd), Arc::new(RejectBad)];
        let budget = std::time::Duration::from_secs(60);
        let out = apply_chain_isolating(&chain, batch.clone(), budget).unwrap();
        let failed: Vec<usize> = out.failed.iter().map(|(i, _)| *i).collect();
        // 3 and 9 are odd: DropOdd removes them before RejectBad sees them.
        assert_eq!(failed, vec![4]);
        assert_eq!(out.failed[0].1.reason, "record 0 is bad");
        let kept: Vec<i32> = out
            .records
            .iter()
            .map(|d| d.get_i32("n").unwrap())
            .collect();
        assert_eq!(kept, vec![0, 2, 6, 8]);

        // A failure that is not the input's is not narrowed down.
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(Fail)];
        let err = apply_chain_isolating(&chain, batch.clone(), budget).unwrap_err();
        assert!(!err.caused_by_input);

        // With its budget spent, the narrowing stops: the batch fails, but not as its
        // input's fault, so its good records are not rejected with the bad ones.
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(RejectBad)];
        let err = apply_chain_isolating(&chain, batch, std::time::Duration::ZERO).unwrap_err();
        assert!(!err.caused_by_input);
        assert!(err.reason.contains("ran out of time"), "{err}");
    }
}
