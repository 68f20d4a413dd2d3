//! Returns every record unchanged: the baseline for measuring the plugin boundary.

use sluice_plugin_sdk::{export_plugin, Plugin, Value};

pub struct Noop;

impl Plugin for Noop {
    fn configure(_config: Value) -> Result<Self, String> {
        Ok(Noop)
    }

    fn transform(&mut self, record: Value) -> Result<Vec<Value>, String> {
        Ok(vec![record])
    }
}

export_plugin!(Noop);
