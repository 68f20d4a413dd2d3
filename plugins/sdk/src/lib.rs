//! Write a Sluice transform plugin as a trait impl and one macro line:
//!
//! ```ignore
//! use sluice_plugin_sdk::{export_plugin, Plugin, Record, Value};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     fn configure(_config: Value) -> Result<Self, String> {
//!         Ok(Upper)
//!     }
//!     fn transform(&mut self, mut record: Record) -> Result<Vec<Record>, String> {
//!         if let Some(name) = record["name"].as_str() {
//!             let upper = name.to_uppercase();
//!             record["name"] = upper.into();
//!         }
//!         Ok(vec![record])
//!     }
//! }
//!
//! export_plugin!(Upper);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is a
//! component implementing `plugins/sdk/wit/transform.wit`. The SDK hides the bindings and the
//! record encoding (JSON text, MongoDB relaxed extended JSON).

// The generated bindings name this crate by its absolute path, also from inside it.
extern crate self as sluice_plugin_sdk;

use std::cell::{OnceCell, RefCell};
use std::ops::{Deref, DerefMut};

pub use serde_json::{self, json, Map, Value};

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub mod bindings {
    super::__wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::sluice_plugin_sdk::bindings",
        runtime_path: "::sluice_plugin_sdk::__wit_bindgen::rt",
    });
}

/// One record: a JSON object (MongoDB relaxed extended JSON), used as a [`Value`].
///
/// The text the host sent is parsed only when the plugin first looks at the record, and a
/// record the plugin never changed goes back as exactly that text, so the host keeps its
/// original document without decoding anything. Reading (`record["a"]`, `record.get`)
/// does not count as a change; any mutable access (`record["a"] = ..`, `get_mut`,
/// `as_object_mut`) does, even if it writes the same value.
#[derive(Clone, Debug)]
pub struct Record {
    /// The text as received, while the record is unchanged.
    text: Option<String>,
    value: OnceCell<Value>,
}

thread_local! {
    /// Why the text of a record read during the current `transform` call did not parse.
    static PARSE_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

impl Record {
    /// A record made by the plugin (for fan-out, or to replace an input).
    pub fn new(value: Value) -> Self {
        Self {
            text: None,
            value: OnceCell::from(value),
        }
    }

    /// A record as the host sent it, parsed on first use.
    #[doc(hidden)]
    pub fn from_text(text: String) -> Self {
        Self {
            text: Some(text),
            value: OnceCell::new(),
        }
    }

    /// True while no mutable access happened: the record goes back byte for byte.
    pub fn is_unchanged(&self) -> bool {
        self.text.is_some()
    }

    /// The record as a plain [`Value`].
    pub fn into_value(mut self) -> Value {
        self.force();
        self.value.take().unwrap_or(Value::Null)
    }

    /// The record as the host receives it.
    #[doc(hidden)]
    pub fn into_text(self) -> String {
        match self.text {
            Some(text) => text,
            None => self.value.get().map(Value::to_string).unwrap_or_default(),
        }
    }

    fn force(&self) -> &Value {
        self.value.get_or_init(|| {
            let text = self.text.as_deref().unwrap_or("null");
            serde_json::from_str(text).unwrap_or_else(|e| {
                PARSE_ERROR.with(|slot| *slot.borrow_mut() = Some(e.to_string()));
                Value::Null
            })
        })
    }
}

impl From<Value> for Record {
    fn from(value: Value) -> Self {
        Self::new(value)
    }
}

impl Deref for Record {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.force()
    }
}

impl DerefMut for Record {
    fn deref_mut(&mut self) -> &mut Value {
        self.force();
        self.text = None;
        self.value.get_mut().expect("parsed just above")
    }
}

/// A transform plugin.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the operator's config (a JSON object); an error refuses it.
    /// Called once per instance, and the host builds instances often (each load, calls
    /// that overlap, after a failure): keep it cheap.
    fn configure(config: Value) -> Result<Self, String>;

    /// Transforms one record into zero (drop), one or several records, or fails it with
    /// a reason. Other records of the batch are not affected by a returned `Err`; a panic
    /// traps the whole call (WebAssembly has no unwinding) and fails the batch.
    fn transform(&mut self, record: Record) -> Result<Vec<Record>, String>;
}

#[doc(hidden)]
pub fn __configure<P: Plugin>(config: &str) -> Result<P, String> {
    let value: Value = if config.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?
    };
    P::configure(value)
}

#[doc(hidden)]
pub fn __transform<P: Plugin>(
    plugin: Option<&mut P>,
    batch: Vec<String>,
) -> Vec<Result<Vec<String>, String>> {
    let Some(plugin) = plugin else {
        return batch
            .iter()
            .map(|_| Err("the plugin was not configured".to_string()))
            .collect();
    };
    batch
        .into_iter()
        .map(|text| {
            let out = plugin.transform(Record::from_text(text));
            if let Some(e) = PARSE_ERROR.with(|slot| slot.borrow_mut().take()) {
                return Err(format!("record is not JSON: {e}"));
            }
            Ok(out?.into_iter().map(Record::into_text).collect())
        })
        .collect()
}

/// Exports a [`Plugin`] implementation as the component's `configure` and `transform`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        struct __SluicePluginExport;

        thread_local! {
            static __SLUICE_PLUGIN: ::std::cell::RefCell<Option<$plugin>> =
                const { ::std::cell::RefCell::new(None) };
        }

        impl $crate::bindings::Guest for __SluicePluginExport {
            fn configure(config: String) -> Result<(), String> {
                let plugin = $crate::__configure::<$plugin>(&config)?;
                __SLUICE_PLUGIN.with(|slot| *slot.borrow_mut() = Some(plugin));
                Ok(())
            }

            fn transform(batch: Vec<String>) -> Vec<Result<Vec<String>, String>> {
                __SLUICE_PLUGIN.with(|slot| $crate::__transform(slot.borrow_mut().as_mut(), batch))
            }
        }

        $crate::bindings::__export_plugin_world!(__SluicePluginExport);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tag;

    impl Plugin for Tag {
        fn configure(_: Value) -> Result<Self, String> {
            Ok(Tag)
        }
        fn transform(&mut self, mut record: Record) -> Result<Vec<Record>, String> {
            match record["kind"].as_str() {
                Some("drop") => Ok(Vec::new()),
                Some("tag") => {
                    record["tagged"] = true.into();
                    Ok(vec![record])
                }
                Some("fan") => Ok(vec![record.clone(), Record::new(json!({"n": 2}))]),
                Some("fail") => Err("asked to fail".into()),
                _ => Ok(vec![record]),
            }
        }
    }

    fn run(batch: &[&str]) -> Vec<Result<Vec<String>, String>> {
        __transform(
            Some(&mut Tag),
            batch.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn unchanged_records_go_back_as_the_text_they_came_as() {
        // Spacing and number spelling a re-print would change survive a read.
        let text = r#"{"kind": "keep",  "n": 1.50}"#;
        assert_eq!(run(&[text]), vec![Ok(vec![text.to_string()])]);
        let fanned = run(&[r#"{"kind":"fan"}"#]);
        assert_eq!(
            fanned,
            vec![Ok(vec![
                r#"{"kind":"fan"}"#.to_string(),
                r#"{"n":2}"#.to_string()
            ])]
        );
    }

    #[test]
    fn changed_records_are_printed_and_errors_stay_per_record() {
        let out = run(&[
            r#"{"kind":"tag"}"#,
            r#"{"kind":"drop"}"#,
            r#"{"kind":"fail"}"#,
        ]);
        assert_eq!(
            out[0],
            Ok(vec![r#"{"kind":"tag","tagged":true}"#.to_string()])
        );
        assert_eq!(out[1], Ok(Vec::new()));
        assert_eq!(out[2], Err("asked to fail".to_string()));
    }

    #[test]
    fn a_record_that_is_not_json_fails_alone() {
        let out = run(&["{nope", r#"{"kind":"keep"}"#]);
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .starts_with("record is not JSON"));
        assert_eq!(out[1], Ok(vec![r#"{"kind":"keep"}"#.to_string()]));
    }

    #[test]
    fn a_never_read_record_is_not_parsed() {
        let r = Record::from_text("{not even json".into());
        assert!(r.is_unchanged());
        assert_eq!(r.into_text(), "{not even json");
        assert!(PARSE_ERROR.with(|s| s.borrow().is_none()));
    }
}
