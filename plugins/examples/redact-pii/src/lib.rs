//! Replaces personal data with salted SHA-256 digests (hex): `email` anywhere at the top
//! level or in `properties`, and `metadata.ipAddress`. Equal inputs give equal digests, so
//! joins and distinct counts still work; the salt keeps them from being reversed by
//! hashing known addresses.
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
        if let Some(text) = slot.as_str() {
            *slot = Value::String(self.digest(text));
        }
    }

    /// The redaction itself (also used natively by the benchmark).
    pub fn apply(&self, mut record: Value) -> Value {
        self.redact_in_place(&mut record);
        record
    }

    /// Redacts `record` where it stands.
    pub fn redact_in_place(&self, record: &mut Value) {
        self.redact(&mut record["email"]);
        if record["properties"].is_object() {
            self.redact(&mut record["properties"]["email"]);
        }
        if record["metadata"].is_object() {
            self.redact(&mut record["metadata"]["ipAddress"]);
        }
        // Indexing created nulls where fields were absent: drop them again.
        if let Some(obj) = record.as_object_mut() {
            obj.retain(|k, v| !(k == "email" && v.is_null()));
            for key in ["properties", "metadata"] {
                if let Some(inner) = obj.get_mut(key).and_then(Value::as_object_mut) {
                    inner.retain(|k, v| !((k == "email" || k == "ipAddress") && v.is_null()));
                }
            }
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
        self.redact_in_place(&mut record);
        Ok(vec![record])
    }
}

export_plugin!(RedactPii);
