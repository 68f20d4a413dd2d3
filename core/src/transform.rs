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
}

/// A batch-at-a-time record transform (a WASM plugin or a native one).
pub trait Transform: Send + Sync {
    /// The name used in errors, logs and metrics.
    fn name(&self) -> &str;

    /// Transforms one batch; see the module docs for the contract.
    fn apply(&self, batch: Vec<Record>) -> Result<Vec<Record>, TransformError>;

    /// Takes the records this transform failed under a dead-letter policy since the last
    /// call, each with its reason. The pipeline stores them.
    fn take_dead_letters(&self) -> Vec<(Record, String)> {
        Vec::new()
    }
}

/// A record a transform failed, kept instead of stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub transform: String,
    pub reason: String,
    pub record: Record,
}

/// Takes the dead letters of every transform in `chain`.
pub fn take_dead_letters(chain: &[std::sync::Arc<dyn Transform>]) -> Vec<DeadLetter> {
    chain
        .iter()
        .flat_map(|t| {
            t.take_dead_letters()
                .into_iter()
                .map(|(record, reason)| DeadLetter {
                    transform: t.name().to_string(),
                    reason,
                    record,
                })
        })
        .collect()
}

/// Runs `batch` through each transform in order.
pub fn apply_chain(
    chain: &[std::sync::Arc<dyn Transform>],
    mut batch: Vec<Record>,
) -> Result<Vec<Record>, TransformError> {
    for t in chain {
        if batch.is_empty() {
            break;
        }
        batch = t.apply(batch)?;
    }
    Ok(batch)
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
        fn apply(&self, batch: Vec<Record>) -> Result<Vec<Record>, TransformError> {
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
        fn apply(&self, _: Vec<Record>) -> Result<Vec<Record>, TransformError> {
            Err(TransformError {
                name: "fail".into(),
                reason: "always".into(),
            })
        }
    }

    #[test]
    fn chain_applies_in_order_and_stops_at_an_error() {
        let batch: Vec<Record> = (0..4).map(|n| bson::doc! { "n": n }).collect();
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(DropOdd)];
        assert_eq!(apply_chain(&chain, batch.clone()).unwrap().len(), 2);
        let chain: Vec<Arc<dyn Transform>> = vec![Arc::new(DropOdd), Arc::new(Fail)];
        let err = apply_chain(&chain, batch).unwrap_err();
        assert_eq!(err.to_string(), "transform `fail` failed: always");
    }
}
