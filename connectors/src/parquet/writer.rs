//! Record batches to local Parquet part files: zstd, row groups flushed by size, files
//! split at a target size. Parts are then uploaded and deleted, so local disk and memory
//! hold at most one part and one row group.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct PartWriterOptions {
    /// A part file is closed once it reaches about this size.
    pub target_file_bytes: u64,
    /// A row group is flushed once its encoded size in memory reaches this.
    pub row_group_bytes: usize,
    pub zstd_level: i32,
}

impl Default for PartWriterOptions {
    fn default() -> Self {
        Self {
            target_file_bytes: 128 * 1024 * 1024,
            row_group_bytes: 32 * 1024 * 1024,
            zstd_level: 3,
        }
    }
}

/// A finished local part file.
#[derive(Debug, Clone)]
pub struct LocalPart {
    pub index: usize,
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

struct Open {
    writer: ArrowWriter<File>,
    path: PathBuf,
    rows: u64,
}

/// Writes batches into `dir/part-NNNNN.parquet` files, rolling over at the target size.
pub struct PartWriter {
    schema: SchemaRef,
    dir: PathBuf,
    options: PartWriterOptions,
    open: Option<Open>,
    next_index: usize,
}

impl PartWriter {
    pub fn new(schema: SchemaRef, dir: &Path, options: PartWriterOptions) -> Self {
        Self {
            schema,
            dir: dir.to_path_buf(),
            options,
            open: None,
            next_index: 0,
        }
    }

    fn properties(&self) -> Result<WriterProperties, ParquetError> {
        Ok(WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(
                self.options.zstd_level,
            )?))
            .set_max_row_group_bytes(Some(self.options.row_group_bytes))
            .set_max_row_group_row_count(Some(1 << 20))
            // `created_by` stays the library's own (`parquet-rs version X`): it names what
            // wrote the bytes, which readers key their workarounds on, and parquet-java
            // parses it (an unparsable one makes Spark, Hive and Flink ignore string
            // statistics, PARQUET-251). Sluice's version is the `sluice.version` entry.
            // The schema's metadata (`sluice.table`) as plain key-value entries of the
            // file too: the Arrow writer keeps it only inside its base64 `ARROW:schema`
            // entry, which Spark, Trino or DuckDB's `parquet_kv_metadata` do not decode.
            .set_key_value_metadata(Some(self.key_values()))
            .build())
    }

    fn key_values(&self) -> Vec<KeyValue> {
        let mut entries: Vec<KeyValue> = self
            .schema
            .metadata()
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        entries.push(KeyValue::new(
            "sluice.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ));
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }

    /// Appends a batch; returns a part when the current file reached its target size.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<Option<LocalPart>, ParquetError> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        if self.open.is_none() {
            let path = self
                .dir
                .join(format!("part-{:05}.parquet", self.next_index));
            let file = File::create(&path)?;
            let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(self.properties()?))?;
            self.open = Some(Open {
                writer,
                path,
                rows: 0,
            });
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(None); // just opened above
        };
        open.writer.write(batch)?;
        open.rows += batch.num_rows() as u64;
        let size = open.writer.bytes_written() as u64 + open.writer.in_progress_size() as u64;
        if size >= self.options.target_file_bytes {
            return self.close_current();
        }
        Ok(None)
    }

    /// Closes the last part, if any rows are pending.
    pub fn finish(mut self) -> Result<Option<LocalPart>, ParquetError> {
        self.close_current()
    }

    fn close_current(&mut self) -> Result<Option<LocalPart>, ParquetError> {
        let Some(open) = self.open.take() else {
            return Ok(None);
        };
        open.writer.close()?;
        let (bytes, sha256) = hash_file(&open.path)?;
        let part = LocalPart {
            index: self.next_index,
            path: open.path,
            rows: open.rows,
            bytes,
            sha256,
        };
        self.next_index += 1;
        Ok(Some(part))
    }
}

/// Size and hex SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String), std::io::Error> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, format!("{:x}", hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::{encode, event_schema, EVENT_TABLE};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn docs(n: usize) -> Vec<bson::Document> {
        (0..n)
            .map(|i| {
                bson::doc! {
                    "eventId": format!("e{i}"), "userId": format!("u{}", i % 97),
                    "sessionId": format!("s{}", i % 301), "eventType": "PAGE_VIEW",
                    "timestamp": bson::DateTime::from_millis(1_700_000_000_000 + i as i64),
                    "pageUrl": format!("/p/{}", i * 7919 % 1000),
                    "properties": { "r": (i * 31) as i64 },
                }
            })
            .collect()
    }

    #[test]
    fn files_split_at_the_target_size_and_read_back_whole() {
        let dir = std::env::temp_dir().join(format!("sluice-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = PartWriterOptions {
            target_file_bytes: 64 * 1024,
            row_group_bytes: 16 * 1024,
            zstd_level: 1,
        };
        let mut w = PartWriter::new(event_schema(), &dir, options);
        let mut parts = Vec::new();
        let all = docs(20_000);
        for chunk in all.chunks(1000) {
            if let Some(p) = w.write(&encode(&EVENT_TABLE, chunk).unwrap()).unwrap() {
                parts.push(p);
            }
        }
        parts.extend(w.finish().unwrap());
        assert!(
            parts.len() > 1,
            "expected several parts, got {}",
            parts.len()
        );
        let mut rows = 0;
        for p in &parts {
            let file = File::open(&p.path).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
            let meta = reader.metadata().clone();
            assert!(meta.num_row_groups() >= 1);
            // The library's own, in the `<app> version <semver>` form parquet-java
            // parses (otherwise it ignores string statistics, PARQUET-251).
            let created_by = meta.file_metadata().created_by().unwrap();
            assert!(
                created_by.starts_with("parquet-rs version ")
                    && created_by["parquet-rs version ".len()..]
                        .split('.')
                        .all(|n| n.parse::<u32>().is_ok()),
                "{created_by}"
            );
            let version = meta
                .file_metadata()
                .key_value_metadata()
                .unwrap()
                .iter()
                .find(|kv| kv.key == "sluice.version")
                .and_then(|kv| kv.value.clone());
            assert_eq!(version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
            // Readers that do not decode `ARROW:schema` find the table's name and
            // version as a plain key-value entry.
            let table = meta
                .file_metadata()
                .key_value_metadata()
                .unwrap()
                .iter()
                .find(|kv| kv.key == "sluice.table")
                .and_then(|kv| kv.value.clone());
            assert_eq!(table.as_deref(), Some("events/v4"));
            let n: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
            assert_eq!(n as u64, p.rows);
            assert_eq!(std::fs::metadata(&p.path).unwrap().len(), p.bytes);
            rows += n;
        }
        assert_eq!(rows, 20_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
