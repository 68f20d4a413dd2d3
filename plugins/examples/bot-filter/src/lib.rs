//! Drops events whose user agent is a crawler or a headless browser.
//!
//! Config: `{"extra_markers": ["my-monitor"]}` (optional, lower-case substrings).

use sluice_plugin_sdk::{export_plugin, Plugin, Record, Value};

const MARKERS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "headlesschrome",
    "phantomjs",
    "lighthouse",
    "python-requests",
];

pub struct BotFilter {
    extra: Vec<String>,
}

impl BotFilter {
    pub fn is_bot(&self, user_agent: &str) -> bool {
        let ua = user_agent.to_ascii_lowercase();
        MARKERS.iter().any(|m| ua.contains(m)) || self.extra.iter().any(|m| ua.contains(m.as_str()))
    }
}

impl Plugin for BotFilter {
    fn configure(config: Value) -> Result<Self, String> {
        let extra = match config.get("extra_markers") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v.as_str() {
                    Some(m) if m.trim().is_empty() => Err("`extra_markers` may not hold an empty marker (it would match every user agent and drop every event)"),
                    Some(m) => Ok(m.to_ascii_lowercase()),
                    None => Err("`extra_markers` must be strings"),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`extra_markers` must be an array of strings".into()),
        };
        Ok(BotFilter { extra })
    }

    fn transform(&mut self, record: Record) -> Result<Vec<Record>, String> {
        let ua = record["metadata"]["userAgent"].as_str().unwrap_or("");
        if record["metadata"]["bot"] == Value::Bool(true) || self.is_bot(ua) {
            return Ok(Vec::new());
        }
        Ok(vec![record])
    }
}

export_plugin!(BotFilter);
