//! Write a Sluice transform plugin as a trait impl and one macro line:
//!
//! ```ignore
//! use sluice_plugin_sdk::{export_plugin, Plugin, Value};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     fn configure(_config: Value) -> Result<Self, String> {
//!         Ok(Upper)
//!     }
//!     fn transform(&mut self, mut record: Value) -> Result<Vec<Value>, String> {
//!         if let Some(name) = record["name"].as_str() {
//!             record["name"] = name.to_uppercase().into();
//!         }
//!         Ok(vec![record])
//!     }
//! }
//!
//! export_plugin!(Upper);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is a
//! component implementing `plugins/wit/transform.wit`. The SDK hides the bindings and the
//! record encoding (JSON text, MongoDB relaxed extended JSON).

// The generated bindings name this crate by its absolute path, also from inside it.
extern crate self as sluice_plugin_sdk;

pub use serde_json::{self, json, Map, Value};

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub mod bindings {
    super::__wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "::sluice_plugin_sdk::bindings",
        runtime_path: "::sluice_plugin_sdk::__wit_bindgen::rt",
    });
}

/// A transform plugin.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from the operator's config (a JSON object); an error refuses it.
    fn configure(config: Value) -> Result<Self, String>;

    /// Transforms one record into zero (drop), one or several records, or fails it with
    /// a reason. Other records of the batch are not affected by a failure.
    fn transform(&mut self, record: Value) -> Result<Vec<Value>, String>;
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
            let record: Value =
                serde_json::from_str(&text).map_err(|e| format!("record is not JSON: {e}"))?;
            let out = plugin.transform(record)?;
            Ok(out.iter().map(Value::to_string).collect())
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
