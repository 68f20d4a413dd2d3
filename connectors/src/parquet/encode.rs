//! Documents to a `RecordBatch`, column by column, following a [`TableSpec`].

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Array, Float64Builder, Int64Array,
    Int64Builder, ListArray, ListBuilder, StringArray, StringBuilder, StructArray,
    TimestampMicrosecondBuilder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::Field;
use arrow::record_batch::RecordBatch;
use bson::{Bson, Document};

use super::schema::{
    columns, revenue_fields, schema_of, top_page_fields, ColKind, ColumnSpec, TableSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("column `{column}`: {message}")]
    Value { column: String, message: String },
    #[error("cannot build the record batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// Follows a dotted path through sub-documents.
fn lookup<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    match sluice_core::model::at_path(doc, path)? {
        Bson::Null | Bson::Undefined => None,
        v => Some(v),
    }
}

fn as_i64(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(_) | Bson::Int64(_) => sluice_core::model::int_of(v),
        // A whole double in range only: 3.7 is not silently 3, nor 1e20 i64::MAX.
        Bson::Double(x)
            if x.is_finite()
                && x.fract() == 0.0
                && (-9.223_372_036_854_775e18..9.223_372_036_854_775e18).contains(x) =>
        {
            Some(*x as i64)
        }
        _ => None,
    }
}

fn as_f64(v: &Bson) -> Option<f64> {
    sluice_core::model::number_of(v)
}

fn as_text(v: &Bson) -> String {
    match v {
        Bson::String(s) => s.clone(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` string.
fn date32(text: &str) -> Option<i32> {
    let d = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((d - epoch).num_days()).ok()
}

fn missing(spec: &ColumnSpec) -> EncodeError {
    EncodeError::Value {
        column: spec.name.to_string(),
        message: format!("`{}` is missing or of the wrong type", spec.path),
    }
}

/// Values present in a document but of a type their column cannot hold: written as null
/// (or refused where the column is required), and said in the log once per batch, never
/// silently.
#[derive(Default)]
struct Mismatches {
    /// Values the column could not take (written as null, or `false` for a flag).
    count: u64,
    example: Option<String>,
    /// Values of another type written after a conversion (a number as text, `"true"`
    /// as a flag).
    converted: u64,
    converted_example: Option<String>,
}

impl Mismatches {
    fn note(&mut self, v: Option<&Bson>, converted: bool) {
        if let (Some(v), false) = (v, converted) {
            self.count += 1;
            self.example
                .get_or_insert_with(|| v.clone().into_relaxed_extjson().to_string());
        }
    }

    fn note_converted(&mut self, v: &Bson) {
        self.converted += 1;
        self.converted_example
            .get_or_insert_with(|| v.clone().into_relaxed_extjson().to_string());
    }
}

/// A flag written as a string or a number by another tool, where the meaning is plain:
/// `"true"`/`"false"` (any case) and 1/0.
fn as_flag(v: &Bson) -> Option<bool> {
    match v {
        Bson::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Bson::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Bson::Int32(1) | Bson::Int64(1) => Some(true),
        Bson::Int32(0) | Bson::Int64(0) => Some(false),
        Bson::Double(x) if *x == 1.0 => Some(true),
        Bson::Double(x) if *x == 0.0 => Some(false),
        _ => None,
    }
}

/// A date, or an RFC 3339 string (as an import may store one).
fn as_datetime(v: &Bson) -> Option<bson::DateTime> {
    match v {
        Bson::DateTime(d) => Some(*d),
        Bson::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| bson::DateTime::from_millis(t.timestamp_millis())),
        _ => None,
    }
}

/// How values that do not fit their column are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// Written as null (or as text, for a string column), with a warning.
    Lenient,
    /// Refused: what is written must hold each value whole, as ARCHIVE, which deletes
    /// what it wrote, needs. Only dates are timestamps, only strings strings, only whole
    /// numbers integers, only booleans flags.
    Exact,
}

/// One column of `docs`, and the values that did not fit it as they were (to be said in
/// the log once the whole batch is encoded: see [`report`]).
fn column(
    spec: &ColumnSpec,
    docs: &[Document],
    fit: Fit,
) -> Result<(ArrayRef, Mismatches), EncodeError> {
    let mut odd = Mismatches::default();
    let array = column_values(spec, docs, &mut odd, fit)?;
    if odd.count > 0 && fit == Fit::Exact {
        return Err(EncodeError::Value {
            column: spec.name.to_string(),
            message: format!(
                "`{}` holds {} ({} value(s) of a type the column does not hold exactly)",
                spec.path,
                odd.example.as_deref().unwrap_or("?"),
                odd.count
            ),
        });
    }
    Ok((array, odd))
}

/// Says in the log what in a column did not fit it as it was.
fn report(spec: &ColumnSpec, odd: &Mismatches) {
    if odd.count > 0 {
        // A flag the column must hold (`metadata.bot`) is false when it cannot be read.
        let written_as = if spec.kind == ColKind::Bool && !spec.nullable {
            "false"
        } else {
            "null"
        };
        tracing::warn!(
            column = spec.name,
            path = spec.path,
            count = odd.count,
            example = odd.example.as_deref().unwrap_or(""),
            "values of another type than the column's were exported as {written_as}"
        );
    }
    if odd.converted > 0 {
        tracing::warn!(
            column = spec.name,
            path = spec.path,
            count = odd.converted,
            example = odd.converted_example.as_deref().unwrap_or(""),
            "values of another type than the column's were converted to it"
        );
    }
}

fn column_values(
    spec: &ColumnSpec,
    docs: &[Document],
    odd: &mut Mismatches,
    fit: Fit,
) -> Result<ArrayRef, EncodeError> {
    let n = docs.len();
    let values = docs.iter().map(|d| lookup(d, spec.path));
    let check = |present: bool| {
        if !present && !spec.nullable {
            Err(missing(spec))
        } else {
            Ok(())
        }
    };
    Ok(match spec.kind {
        ColKind::Str | ColKind::Json => {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            for v in values {
                check(v.is_some())?;
                match v {
                    Some(v) if spec.kind == ColKind::Json => {
                        b.append_value(v.clone().into_relaxed_extjson().to_string())
                    }
                    Some(v) => {
                        let text = matches!(v, Bson::String(_));
                        match fit {
                            Fit::Exact => odd.note(Some(v), text),
                            Fit::Lenient if !text => odd.note_converted(v),
                            Fit::Lenient => {}
                        }
                        b.append_value(as_text(v))
                    }
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        ColKind::TimestampMicros => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
            for v in values {
                let date = match (v, fit) {
                    // A string read as a date would come back as a date.
                    (Some(Bson::String(_)), Fit::Exact) => None,
                    _ => v.and_then(as_datetime),
                };
                odd.note(v, date.is_some());
                if let (Some(v @ Bson::String(_)), Some(_)) = (v, date) {
                    odd.note_converted(v);
                }
                check(date.is_some())?;
                let t = match date {
                    // Microseconds overflow i64 beyond about the year 294,000.
                    Some(d) => Some(d.timestamp_millis().checked_mul(1000).ok_or_else(|| {
                        EncodeError::Value {
                            column: spec.name.to_string(),
                            message: format!(
                                "`{}` is out of the representable range: {d}",
                                spec.path
                            ),
                        }
                    })?),
                    None => None,
                };
                b.append_option(t);
            }
            Arc::new(b.finish())
        }
        ColKind::Int64 => {
            let mut b = Int64Builder::with_capacity(n);
            for v in values {
                let x = v.and_then(as_i64).or_else(|| match fit {
                    // A number another writer stored as text or a decimal (`"25"`): an
                    // integer's text exactly, past 2^53 too.
                    Fit::Lenient => match v {
                        Some(Bson::String(text)) => text.trim().parse().ok(),
                        _ => None,
                    }
                    .or_else(|| {
                        v.and_then(sluice_core::model::stored_number)
                            .and_then(|x| as_i64(&Bson::Double(x)))
                    }),
                    Fit::Exact => None,
                });
                odd.note(v, x.is_some());
                if let (
                    Some(v @ (Bson::Double(_) | Bson::String(_) | Bson::Decimal128(_))),
                    Some(_),
                    Fit::Lenient,
                ) = (v, x, fit)
                {
                    odd.note_converted(v);
                }
                check(x.is_some())?;
                b.append_option(x);
            }
            Arc::new(b.finish())
        }
        ColKind::Float64 => {
            let mut b = Float64Builder::with_capacity(n);
            for v in values {
                let x = v.and_then(as_f64).or_else(|| match fit {
                    Fit::Lenient => {
                        let x = v.and_then(sluice_core::model::stored_number);
                        if let (Some(v), Some(_)) = (v, x) {
                            odd.note_converted(v);
                        }
                        x
                    }
                    Fit::Exact => None,
                });
                odd.note(v, x.is_some());
                check(x.is_some())?;
                b.append_option(x);
            }
            Arc::new(b.finish())
        }
        ColKind::Bool => {
            let mut b = BooleanBuilder::with_capacity(n);
            for v in values {
                let x = match (v.and_then(Bson::as_bool), v, fit) {
                    (None, Some(v), Fit::Lenient) => {
                        let x = as_flag(v);
                        if x.is_some() {
                            odd.note_converted(v);
                        }
                        x
                    }
                    (x, _, _) => x,
                };
                odd.note(v, x.is_some());
                match (x, spec.nullable) {
                    (Some(x), _) => b.append_value(x),
                    // A flag absent from the document is false (e.g. `metadata.bot`).
                    (None, false) => b.append_value(false),
                    (None, true) => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        ColKind::StrList => {
            let mut b = ListBuilder::new(StringBuilder::new());
            for v in values {
                match v {
                    Some(list @ Bson::Array(items)) => {
                        let mut converted = false;
                        for item in items {
                            match item {
                                // A null item is null, not the text "null".
                                Bson::Null | Bson::Undefined => b.values().append_null(),
                                Bson::String(s) => b.values().append_value(s),
                                _ => {
                                    converted = true;
                                    b.values().append_value(as_text(item))
                                }
                            }
                        }
                        if converted {
                            odd.note_converted(list);
                        }
                        b.append(true);
                    }
                    // A single tag written as a string is a list of one.
                    Some(one @ Bson::String(text)) => {
                        odd.note_converted(one);
                        b.values().append_value(text);
                        b.append(true);
                    }
                    Some(other) => {
                        odd.note(Some(other), false);
                        check(false)?;
                        b.append(false);
                    }
                    None => {
                        check(false)?;
                        b.append(false);
                    }
                }
            }
            Arc::new(b.finish())
        }
        ColKind::Date => {
            let mut b = Date32Builder::with_capacity(n);
            for v in values {
                let x = v.and_then(Bson::as_str).and_then(date32);
                odd.note(v, x.is_some());
                check(x.is_some())?;
                b.append_option(x);
            }
            Arc::new(b.finish())
        }
        ColKind::TopPages => top_pages(spec, docs)?,
        ColKind::Revenue => revenue(spec, docs)?,
        ColKind::RevenueMicros => Arc::new(
            docs.iter()
                .map(sluice_core::model::stored_revenue_micros)
                .collect::<Int64Array>(),
        ),
        ColKind::PurchaseNumber => Arc::new(
            docs.iter()
                .map(|d| purchase_value(d, spec).and_then(as_f64))
                .collect::<Float64Array>(),
        ),
        ColKind::PurchaseStr => Arc::new(
            docs.iter()
                .map(|d| purchase_value(d, spec).and_then(Bson::as_str))
                .collect::<StringArray>(),
        ),
    })
}

/// A PURCHASE event's value at the column's path.
fn purchase_value<'a>(doc: &'a Document, spec: &ColumnSpec) -> Option<&'a Bson> {
    let purchase = doc.get_str(sluice_core::model::event_fields::EVENT_TYPE)
        == Ok(sluice_core::model::EventType::Purchase.as_str());
    purchase.then(|| lookup(doc, spec.path)).flatten()
}

fn top_pages(spec: &ColumnSpec, docs: &[Document]) -> Result<ArrayRef, EncodeError> {
    struct_list(spec, docs, top_page_fields(), |items| {
        vec![
            Arc::new(StringArray::from_iter(
                items.iter().map(|p| p.get_str(columns::PAGE_URL).ok()),
            )),
            Arc::new(Int64Array::from_iter_values(
                items.iter().map(|p| count(p, columns::VIEWS)),
            )),
            Arc::new(Int64Array::from_iter_values(
                items.iter().map(|p| count(p, columns::UNIQUE_USERS)),
            )),
        ]
    })
}

fn revenue(spec: &ColumnSpec, docs: &[Document]) -> Result<ArrayRef, EncodeError> {
    struct_list(spec, docs, revenue_fields(), |items| {
        vec![
            Arc::new(StringArray::from_iter(
                items.iter().map(|r| r.get_str(columns::CURRENCY).ok()),
            )),
            Arc::new(Int64Array::from_iter_values(
                items.iter().map(|r| count(r, columns::PURCHASES)),
            )),
            Arc::new(Float64Array::from_iter_values(items.iter().map(|r| {
                count(r, columns::REVENUE_MICROS) as f64 / sluice_core::aggregate::REVENUE_SCALE
            }))),
            Arc::new(Int64Array::from_iter_values(
                items.iter().map(|r| count(r, columns::REVENUE_MICROS)),
            )),
        ]
    })
}

/// A whole number of `doc` at `key`, `0` when it is missing or not one.
fn count(doc: &Document, key: &str) -> i64 {
    doc.get(key).and_then(as_i64).unwrap_or(0)
}

/// A list of structs (`fields`) per document, from the array of documents at the
/// column's path; `arrays` builds the struct's columns from every document's items.
fn struct_list(
    spec: &ColumnSpec,
    docs: &[Document],
    fields: arrow::datatypes::Fields,
    arrays: impl FnOnce(&[&Document]) -> Vec<ArrayRef>,
) -> Result<ArrayRef, EncodeError> {
    let mut items = Vec::new();
    let mut offsets = vec![0i32];
    let mut present = Vec::with_capacity(docs.len());
    for d in docs {
        match lookup(d, spec.path) {
            Some(Bson::Array(list)) => {
                for item in list {
                    items.push(item.as_document().ok_or_else(|| missing(spec))?);
                }
                present.push(true);
            }
            None if spec.nullable => present.push(false),
            _ => return Err(missing(spec)),
        }
        offsets.push(i32::try_from(items.len()).map_err(|_| missing(spec))?);
    }
    let nulls = present
        .contains(&false)
        .then(|| arrow::buffer::NullBuffer::from(present));
    let values = StructArray::try_new(fields.clone(), arrays(&items), None)?;
    let field = Arc::new(Field::new(
        "item",
        arrow::datatypes::DataType::Struct(fields),
        false,
    ));
    Ok(Arc::new(ListArray::try_new(
        field,
        OffsetBuffer::new(offsets.into()),
        Arc::new(values),
        nulls,
    )?))
}

/// Encodes `docs` as one record batch of `table`. A value of another type than its
/// column's is written as null (as text for a string column), with a warning.
pub fn encode(table: &TableSpec, docs: &[Document]) -> Result<RecordBatch, EncodeError> {
    encode_fit(table, docs, Fit::Lenient, true).map(|(batch, _)| batch)
}

/// Values of another type than their column's in an encoded batch, over every column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unfitting {
    /// Written as null (or `false` for a flag the column must hold).
    pub nulled: u64,
    /// Written after a conversion (a number as text, `"true"` as a flag).
    pub converted: u64,
}

/// [`encode`], with how many values did not fit their columns as they were: what a
/// reader of the files is told besides the log.
pub fn encode_counted(
    table: &TableSpec,
    docs: &[Document],
) -> Result<(RecordBatch, Unfitting), EncodeError> {
    encode_fit(table, docs, Fit::Lenient, true)
}

/// Whether `doc` can be a row of `table` (as [`encode`] takes it), saying nothing in the
/// log: to find the documents that fail a batch without a warning per document.
pub fn fits(table: &TableSpec, doc: &Document) -> Result<(), EncodeError> {
    encode_fit(table, std::slice::from_ref(doc), Fit::Lenient, false).map(|_| ())
}

/// [`encode`], refusing any value the batch would not hold exactly (a double in an
/// integer column, a number in a string column, a string in a timestamp column): for
/// ARCHIVE, which deletes what it wrote.
pub fn encode_exact(table: &TableSpec, docs: &[Document]) -> Result<RecordBatch, EncodeError> {
    encode_fit(table, docs, Fit::Exact, true).map(|(batch, _)| batch)
}

/// Each column of `table` whose value in `doc` [`encode_exact`] would refuse, as a kind
/// (the column's path and the type of what it holds, or that a required column has
/// nothing) and the value: for ARCHIVE to name every such value of a day in one run. It
/// encodes the document a column at a time, so is for documents a batch failed on.
pub fn inexact_values(table: &TableSpec, doc: &Document) -> Vec<(String, String)> {
    table
        .columns
        .iter()
        .filter(|spec| column(spec, std::slice::from_ref(doc), Fit::Exact).is_err())
        .map(|spec| match lookup(doc, spec.path) {
            None => (format!("no `{}`", spec.path), "nothing".to_string()),
            Some(v) => {
                let mut value = v.clone().into_relaxed_extjson().to_string();
                if value.len() > 80 {
                    let cut = (0..=77)
                        .rev()
                        .find(|i| value.is_char_boundary(*i))
                        .unwrap_or(0);
                    value.truncate(cut);
                    value.push_str("...");
                }
                (format!("`{}` holding {}", spec.path, type_words(v)), value)
            }
        })
        .collect()
}

/// What a value is, in words for an error message.
fn type_words(v: &Bson) -> String {
    match v {
        Bson::Double(_) => "a double".into(),
        Bson::String(_) => "text".into(),
        Bson::Document(_) => "an object".into(),
        Bson::Array(_) => "an array".into(),
        Bson::Boolean(_) => "a boolean".into(),
        Bson::Int32(_) => "a 32-bit integer".into(),
        Bson::Int64(_) => "a 64-bit integer".into(),
        Bson::Decimal128(_) => "a decimal".into(),
        Bson::DateTime(_) => "a date".into(),
        Bson::ObjectId(_) => "an ObjectId".into(),
        Bson::Binary(_) => "binary data".into(),
        other => format!("a BSON {:?}", other.element_type()),
    }
}

/// The batch; what did not fit as it was is said in the log (when `report`) only once
/// every column is encoded, so a batch that fails logs nothing twice when its good
/// documents are encoded again.
fn encode_fit(
    table: &TableSpec,
    docs: &[Document],
    fit: Fit,
    report_odd: bool,
) -> Result<(RecordBatch, Unfitting), EncodeError> {
    let columns = table
        .columns
        .iter()
        .map(|c| column(c, docs, fit).map_err(|e| name_the_row(e, c, docs, fit)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut arrays = Vec::with_capacity(columns.len());
    let mut unfitting = Unfitting::default();
    for (spec, (array, odd)) in table.columns.iter().zip(columns) {
        if report_odd {
            report(spec, &odd);
        }
        unfitting.nulled += odd.count;
        unfitting.converted += odd.converted;
        arrays.push(array);
    }
    Ok((RecordBatch::try_new(schema_of(table), arrays)?, unfitting))
}

/// Adds to a column error which document caused it (its `eventId`, `visitorId`, `date`
/// or `_id`): found by encoding the column one document at a time, on the error path only.
fn name_the_row(err: EncodeError, spec: &ColumnSpec, docs: &[Document], fit: Fit) -> EncodeError {
    let EncodeError::Value {
        column: name,
        message,
    } = err
    else {
        return err;
    };
    let culprit = docs
        .iter()
        .find(|d| column(spec, std::slice::from_ref(*d), fit).is_err());
    let Some(d) = culprit else {
        return EncodeError::Value {
            column: name,
            message,
        };
    };
    let id = ["eventId", "visitorId", "date", "_id"]
        .iter()
        .find_map(|k| d.get(*k).map(|v| format!("{k} {}", as_text(v))))
        .unwrap_or_else(|| "a document without an id".into());
    EncodeError::Value {
        column: name,
        message: format!("{message} (in the document with {id})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::schema::{DAILY_TABLE, EVENT_TABLE, USER_TABLE};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::TimestampMicrosecondType;
    use bson::doc;

    #[test]
    fn column_errors_name_the_document_and_far_dates_fail_cleanly() {
        let ok = doc! {
            "eventId": "fine", "userId": "u", "sessionId": "s", "eventType": "CLICK",
            "timestamp": bson::DateTime::from_millis(1_700_000_000_000),
        };
        let mut missing = ok.clone();
        missing.insert("eventId", "no-session");
        missing.remove("sessionId");
        let err = encode(&EVENT_TABLE, &[ok.clone(), missing])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sessionId") && err.contains("eventId no-session"),
            "{err}"
        );
        let mut far = ok.clone();
        far.insert("eventId", "far");
        far.insert("timestamp", bson::DateTime::from_millis(1i64 << 62));
        let err = encode(&EVENT_TABLE, &[ok, far]).unwrap_err().to_string();
        assert!(
            err.contains("out of the representable range") && err.contains("eventId far"),
            "{err}"
        );
    }

    #[test]
    fn values_converted_to_their_column_are_counted_for_the_log() {
        let docs = vec![doc! {
            "visitorId": "v", "tags": "vip", "segments": [1, "b"],
            "firstSeen": "2026-01-01T00:00:00Z", "lastSeen": bson::DateTime::from_millis(0),
            "totalSessions": 3.0, "totalEvents": 5, "firstName": 123,
        }];
        let converted = |name: &str| {
            let spec = USER_TABLE.columns.iter().find(|c| c.name == name).unwrap();
            column(spec, &docs, Fit::Lenient).unwrap().1.converted
        };
        for name in [
            "tags",
            "segments",
            "firstSeen",
            "totalSessions",
            "firstName",
        ] {
            assert_eq!(converted(name), 1, "{name}");
        }
        // Values of the column's own type are not conversions.
        for name in ["lastSeen", "totalEvents", "visitorId"] {
            assert_eq!(converted(name), 0, "{name}");
        }
    }

    #[test]
    fn profile_fields_an_import_wrote_loosely_are_read_where_it_is_unambiguous() {
        let docs = vec![doc! {
            "visitorId": "v", "tags": "vip", "firstSeen": "2026-01-01T00:00:00Z",
            "totalSessions": 3.0, "totalEvents": 2.5, "segments": 7,
        }];
        let b = encode(&USER_TABLE, &docs).unwrap();
        let tags = b.column_by_name("tags").unwrap().as_list::<i32>().value(0);
        assert_eq!(
            tags.as_string::<i32>().value(0),
            "vip",
            "a string is a list of one"
        );
        let seen = b
            .column_by_name("firstSeen")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(
            seen.value(0),
            1_767_225_600_000_000,
            "an RFC 3339 string is a time"
        );
        let int = |name: &str| {
            b.column_by_name(name)
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .clone()
        };
        assert_eq!(
            int("totalSessions").value(0),
            3,
            "a whole double is an integer"
        );
        assert!(int("totalEvents").is_null(0), "2.5 is not silently 2");
        assert!(b.column_by_name("segments").unwrap().is_null(0));

        // Out of range is null, not saturated; a null tag is null, not "null".
        let docs = vec![doc! { "visitorId": "w", "totalEvents": 1e20, "tags": ["a", Bson::Null] }];
        let b = encode(&USER_TABLE, &docs).unwrap();
        let events = b
            .column_by_name("totalEvents")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert!(events.is_null(0), "1e20 is no i64");
        let tags = b.column_by_name("tags").unwrap().as_list::<i32>().value(0);
        let tags = tags.as_string::<i32>();
        assert_eq!((tags.value(0), tags.is_null(1)), ("a", true));
    }

    #[test]
    fn a_profile_without_exact_revenue_has_it_from_its_total() {
        // Another writer's profile holds only `totalRevenue`.
        let docs = vec![
            doc! { "visitorId": "sluice", "totalRevenue": 1.0, "totalRevenueMicros": 5_i64 },
            doc! { "visitorId": "legacy", "totalRevenue": 120.5 },
            doc! { "visitorId": "none" },
            doc! { "visitorId": "text", "totalRevenue": "99.99" },
        ];
        let (b, unfitting) = encode_counted(&USER_TABLE, &docs).unwrap();
        let micros = b
            .column_by_name("totalRevenueMicros")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let values: Vec<Option<i64>> = (0..4)
            .map(|i| micros.is_valid(i).then(|| micros.value(i)))
            .collect();
        assert_eq!(values, [Some(5), Some(120_500_000), None, Some(99_990_000)]);
        // The text total is read in its own column too, counted as converted there.
        let totals = b
            .column_by_name("totalRevenue")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(totals.value(3), 99.99);
        assert_eq!(
            unfitting,
            Unfitting {
                nulled: 0,
                converted: 1
            }
        );

        // Counts another writer stored as text or decimals are read (converted, as
        // ARCHIVE's exact encoding refuses them); text that is no whole number is not.
        let docs = vec![doc! { "visitorId": "odd", "totalEvents": "25",
        "totalPurchases": "2".parse::<bson::Decimal128>().unwrap(), "totalSessions": "2.5" }];
        let (b, unfitting) = encode_counted(&USER_TABLE, &docs).unwrap();
        let int = |name: &str| {
            let c = b
                .column_by_name(name)
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .clone();
            c.is_valid(0).then(|| c.value(0))
        };
        assert_eq!(
            (
                int("totalEvents"),
                int("totalPurchases"),
                int("totalSessions")
            ),
            (Some(25), Some(2), None)
        );
        assert_eq!(
            unfitting,
            Unfitting {
                nulled: 1,
                converted: 2
            }
        );
    }

    #[test]
    fn plain_flags_are_read_and_every_conversion_is_counted() {
        let spec = |name: &str| EVENT_TABLE.columns.iter().find(|c| c.name == name).unwrap();
        let docs = vec![
            doc! { "metadata": { "bot": "TRUE" }, "pageUrl": 42 },
            doc! { "metadata": { "bot": 1 }, "pageUrl": "/a" },
            doc! { "metadata": { "bot": "maybe" } },
            doc! { "metadata": { "bot": 0.0 } },
            doc! { "metadata": { "bot": true } },
        ];
        // A flag another tool wrote as text or a number is read where its meaning is
        // plain, counted as converted; one that cannot be read is false, and counted.
        let mut odd = Mismatches::default();
        let bot = column_values(spec("bot"), &docs, &mut odd, Fit::Lenient).unwrap();
        let bot = bot.as_boolean();
        assert_eq!(
            (0..5).map(|i| bot.value(i)).collect::<Vec<_>>(),
            [true, true, false, false, true]
        );
        assert_eq!((odd.count, odd.converted), (1, 3));
        assert_eq!(odd.example.as_deref(), Some("\"maybe\""));
        // Under Exact (ARCHIVE) nothing but a boolean is a flag.
        let mut odd = Mismatches::default();
        column_values(spec("bot"), &docs, &mut odd, Fit::Exact).unwrap();
        assert_eq!((odd.count, odd.converted), (4, 0));
        // A number in a string column is written as its text, and counted.
        let mut odd = Mismatches::default();
        let url = column_values(spec("pageUrl"), &docs, &mut odd, Fit::Lenient).unwrap();
        assert_eq!(url.as_string::<i32>().value(0), "42");
        assert_eq!((odd.count, odd.converted), (0, 1));
        assert_eq!(odd.converted_example.as_deref(), Some("42"));
    }

    #[test]
    fn events_encode_with_flattened_metadata_and_json_properties() {
        let t = bson::DateTime::from_millis(1_700_000_000_123);
        let docs = vec![
            doc! {
                "eventId": "e1", "userId": "u", "sessionId": "s", "eventType": "PURCHASE",
                "timestamp": t, "properties": { "amount": 9.5, "tags": ["a"] },
                "metadata": { "device": "mobile", "bot": true }, "duration": 12,
            },
            doc! { "eventId": "e2", "userId": "u", "sessionId": "s", "eventType": "CLICK", "timestamp": t },
        ];
        let batch = encode(&EVENT_TABLE, &docs).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let ts = batch
            .column_by_name("timestamp")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_700_000_000_123_000);
        let props = batch
            .column_by_name("properties")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(props.value(0), r#"{"amount":9.5,"tags":["a"]}"#);
        assert!(props.is_null(1));
        let bot = batch.column_by_name("bot").unwrap().as_boolean();
        assert!(bot.value(0) && !bot.value(1));
        assert_eq!(
            batch
                .column_by_name("device")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "mobile"
        );
    }

    #[test]
    fn a_purchase_s_amount_and_currency_have_typed_columns_other_events_none() {
        let t = bson::DateTime::from_millis(1_700_000_000_000);
        let ev = |id: &str, kind: &str, props: Document| {
            doc! { "eventId": id, "userId": "u", "sessionId": "s", "eventType": kind,
            "timestamp": t, "properties": props }
        };
        let docs = vec![
            ev(
                "p1",
                "PURCHASE",
                doc! { "amount": 19.99, "currency": "EUR" },
            ),
            // An import may store an integer; a string amount is no number.
            ev("p2", "PURCHASE", doc! { "amount": 20_i64 }),
            ev("p3", "PURCHASE", doc! { "amount": "lots", "currency": 5 }),
            ev("c1", "CLICK", doc! { "amount": 3.0, "currency": "USD" }),
        ];
        let (batch, unfitting) = encode_counted(&EVENT_TABLE, &docs).unwrap();
        let amount = batch
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        let currency = batch.column_by_name("currency").unwrap().as_string::<i32>();
        let amounts: Vec<Option<f64>> = (0..4)
            .map(|i| amount.is_valid(i).then(|| amount.value(i)))
            .collect();
        let currencies: Vec<Option<&str>> = (0..4)
            .map(|i| currency.is_valid(i).then(|| currency.value(i)))
            .collect();
        assert_eq!(amounts, [Some(19.99), Some(20.0), None, None]);
        assert_eq!(currencies, [Some("EUR"), None, None, None]);
        // Copies of values `properties` holds whole: nothing is counted as unfitting.
        assert_eq!(unfitting, Unfitting::default());
        // ARCHIVE's exact encoding takes them too.
        assert!(encode_exact(&EVENT_TABLE, &docs).is_ok());
    }

    #[test]
    fn a_missing_required_field_names_the_column() {
        let err = encode(&EVENT_TABLE, &[doc! { "eventId": "e1" }]).unwrap_err();
        assert!(err.to_string().contains("`userId`"), "{err}");
    }

    #[test]
    fn daily_rows_carry_lists_of_top_pages_and_revenue() {
        let docs = vec![doc! {
            "date": "2026-11-25", "events": 10, "uniqueUsers": 3, "uniqueSessions": 4, "pageViews": 6,
            "topPages": [ { "pageUrl": "/", "views": 4, "uniqueUsers": 2 }, { "pageUrl": "/a", "views": 2, "uniqueUsers": 1 } ],
            "purchases": 3,
            "revenue": [ { "currency": null, "purchases": 1, "revenueMicros": 5_i64 },
                         { "currency": "EUR", "purchases": 2, "revenueMicros": 19_990_000_i64 } ],
        }];
        let batch = encode(&DAILY_TABLE, &docs).unwrap();
        let dates = batch
            .column_by_name("date")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        assert_eq!(dates.value(0), 20782); // days from 1970-01-01 to 2026-11-25
        let pages = batch.column_by_name("topPages").unwrap().as_list::<i32>();
        assert_eq!(pages.value(0).len(), 2);
        // Revenue per currency: the double written from the exact micros.
        let revenue = batch.column_by_name("revenue").unwrap().as_list::<i32>();
        let entries = revenue.value(0);
        let entries = entries.as_struct();
        let currency = entries
            .column_by_name("currency")
            .unwrap()
            .as_string::<i32>();
        assert!(currency.is_null(0));
        assert_eq!(currency.value(1), "EUR");
        let doubles = entries
            .column_by_name("revenue")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!((doubles.value(0), doubles.value(1)), (0.000005, 19.99));
        // Rows that lack them (a plugin's own, built before they were columns) have them
        // null; top pages, which every version has, are required.
        let mut bare = docs[0].clone();
        bare.remove("revenue");
        bare.remove("purchases");
        let batch = encode(&DAILY_TABLE, &[bare.clone(), docs[0].clone()]).unwrap();
        let revenue = batch.column_by_name("revenue").unwrap().as_list::<i32>();
        assert!(revenue.is_null(0) && revenue.is_valid(1));
        assert_eq!(revenue.value(1).len(), 2);
        assert!(batch.column_by_name("purchases").unwrap().is_null(0));
        bare.remove("topPages");
        let err = encode(&DAILY_TABLE, &[bare]).unwrap_err().to_string();
        assert!(err.contains("`topPages`"), "{err}");
    }
}
