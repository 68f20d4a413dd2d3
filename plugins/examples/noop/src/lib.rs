//! Returns every record unchanged: the baseline for measuring the plugin boundary.

use sluice_plugin_sdk::{export_plugin, Plugin, Record, Value};

pub struct Noop;

impl Plugin for Noop {
    fn configure(_config: Value) -> Result<Self, String> {
        Ok(Noop)
    }

    fn transform(&mut self, record: Record) -> Result<Vec<Record>, String> {
        Ok(vec![record])
    }
}

export_plugin!(Noop);
