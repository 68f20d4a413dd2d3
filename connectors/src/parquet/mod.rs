//! MongoDB documents to Parquet: explicit Arrow schemas (column names are constants), a
//! generic document-to-`RecordBatch` encoder, and a part writer that flushes row groups by
//! size and splits files at a target size, so memory stays bounded whatever the export.

mod encode;
mod schema;
mod writer;

pub use arrow::record_batch::RecordBatch;
pub use encode::{
    encode, encode_counted, encode_exact, fits, inexact_values, EncodeError, Unfitting,
};
pub use schema::{
    columns, daily_schema, event_schema, schema_description, schema_of, uncovered_field,
    user_schema, ColKind, ColumnSpec, TableSpec, DAILY_TABLE, EVENT_TABLE, USER_TABLE,
};
pub use writer::{hash_file, LocalPart, PartWriter, PartWriterOptions};
