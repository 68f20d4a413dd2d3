//! Converts PURCHASE amounts to one currency with a rate table from the config, keeping the
//! original amount and currency in `originalAmount` / `originalCurrency`.
//!
//! Config: `{"target": "EUR", "rates": {"USD": 0.92, "GBP": 1.17}}` (units of `target`
//! per unit of each currency). A purchase in a currency without a rate fails with that
//! reason, so it is never silently mixed in.

use sluice_plugin_sdk::{export_plugin, Map, Plugin, Record, Value};

pub struct CurrencyNormalize {
    target: String,
    rates: Map<String, Value>,
}

impl Plugin for CurrencyNormalize {
    fn configure(config: Value) -> Result<Self, String> {
        let target = config["target"]
            .as_str()
            .ok_or("`target` (a currency code) is required")?
            .to_string();
        let rates = config["rates"]
            .as_object()
            .cloned()
            .ok_or("`rates` (an object of currency: rate) is required")?;
        if let Some((k, _)) = rates
            .iter()
            .find(|(_, v)| !v.as_f64().is_some_and(|r| r > 0.0))
        {
            return Err(format!("rate of `{k}` must be a positive number"));
        }
        Ok(CurrencyNormalize { target, rates })
    }

    fn transform(&mut self, mut record: Record) -> Result<Vec<Record>, String> {
        if record["eventType"] != "PURCHASE" {
            return Ok(vec![record]);
        }
        // Read before anything is written: a purchase without an amount and a currency
        // passes unchanged (indexing mutably would add a null `properties` to it).
        let amount = &record["properties"]["amount"];
        let Some(currency) = record["properties"]["currency"]
            .as_str()
            .map(str::to_string)
        else {
            return Ok(vec![record]);
        };
        if amount.is_null() || currency == self.target {
            return Ok(vec![record]);
        }
        // An amount of another form (a Decimal128 comes as `{"$numberDecimal": ".."}`, a
        // text) fails the record rather than pass unconverted in a foreign currency.
        let Some(amount) = amount.as_f64() else {
            return Err(format!("`properties.amount` is not a number: {amount}"));
        };
        let rate = self
            .rates
            .get(&currency)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("no rate for `{currency}`"))?;
        // An object: its amount and currency were read from it.
        let props = &mut record["properties"];
        props["originalAmount"] = amount.into();
        props["originalCurrency"] = currency.into();
        props["amount"] = ((amount * rate * 100.0).round() / 100.0).into();
        props["currency"] = self.target.clone().into();
        Ok(vec![record])
    }
}

export_plugin!(CurrencyNormalize);
