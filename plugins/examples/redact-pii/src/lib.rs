//! Replaces personal data with salted SHA-256 digests (hex): `email` anywhere at the top
//! level or in `properties`, and `metadata.ipAddress`. Equal inputs give equal digests, so
//! joins and distinct counts still work; the salt keeps them from being reversed by
//! hashing known addresses. A value that is not a string (a list of addresses, a number,
//! an object) is replaced by the digest of its JSON text, so no shape of it gets through;
//! a null stays null.
//!
//! Config: `{"salt": "..."}` (required, at least 16 characters).

use sha2::{Digest, Sha256};
use sluice_plugin_sdk::{export_plugin, Plugin, Record, Value};

pub struct RedactPii {
    salt: String,
}

impl RedactPii {
    pub fn new(salt: &str) -> Self {
        RedactPii {
            salt: salt.to_string(),
        }
    }

    pub fn digest(&self, value: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        h.update(value.as_bytes());
        format!("{:x}", h.finalize())
    }

    fn redact(&self, slot: &mut Value) {
        let digest = match &*slot {
            Value::Null => return,
            Value::String(text) => self.digest(text),
            other => self.digest(&other.to_string()),
        };
        *slot = Value::String(digest);
    }

    /// The redaction itself (also used natively by the benchmark).
    pub fn apply(&self, mut record: Value) -> Value {
        self.redact_in_place(&mut record);
        record
    }

    /// Whether `record` has a field [`Self::redact_in_place`] changes.
    pub fn holds_pii(record: &Value) -> bool {
        let text = |v: Option<&Value>| v.is_some_and(|v| !v.is_null());
        text(record.get("email"))
            || text(record.get("properties").and_then(|p| p.get("email")))
            || text(record.get("metadata").and_then(|m| m.get("ipAddress")))
    }

    /// Redacts `record` where it stands. Fields that are absent stay absent, and a null
    /// stays null.
    pub fn redact_in_place(&self, record: &mut Value) {
        if let Some(v) = record.get_mut("email") {
            self.redact(v);
        }
        if let Some(v) = record
            .get_mut("properties")
            .and_then(|p| p.get_mut("email"))
        {
            self.redact(v);
        }
        if let Some(v) = record
            .get_mut("metadata")
            .and_then(|m| m.get_mut("ipAddress"))
        {
            self.redact(v);
        }
    }
}

impl Plugin for RedactPii {
    fn configure(config: Value) -> Result<Self, String> {
        match config.get("salt").and_then(Value::as_str) {
            Some(s) if s.len() >= 16 => Ok(RedactPii::new(s)),
            _ => Err("`salt` is required: a string of at least 16 characters".into()),
        }
    }

    fn transform(&mut self, mut record: Record) -> Result<Vec<Record>, String> {
        // Looked at first, changed only when there is something to redact: a record the
        // plugin does not change goes back as the text it came as, and the host keeps it
        // without decoding it (a mutable access counts as a change).
        if Self::holds_pii(&record) {
            self.redact_in_place(&mut record);
        }
        Ok(vec![record])
    }
}

export_plugin!(RedactPii);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::json;

    #[test]
    fn no_shape_of_an_address_gets_through() {
        let r = RedactPii::new("a salt of sixteen+");
        for email in [
            json!("a@x.example"),
            json!(["a@x.example", "b@x.example"]),
            json!({ "work": "a@x.example" }),
            json!(123),
        ] {
            let record =
                json!({ "email": email.clone(), "properties": { "email": email.clone() } });
            assert!(RedactPii::holds_pii(&record), "{record}");
            let out = r.apply(record);
            for v in [&out["email"], &out["properties"]["email"]] {
                let digest = v.as_str().unwrap_or_else(|| panic!("{out}"));
                assert_eq!(digest.len(), 64, "{out}");
                assert!(!digest.contains('@'), "{out}");
            }
        }
        // A null stays null; a record without the fields is not touched.
        let out = r.apply(json!({ "email": null, "name": "n" }));
        assert_eq!(out, json!({ "email": null, "name": "n" }));
        assert!(!RedactPii::holds_pii(&json!({ "email": null })));
    }
}
