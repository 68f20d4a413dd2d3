//! Object storage for export files: S3 (any S3-compatible store) or a local folder.
//!
//! Both backends share one contract: `put_*` makes an object visible whole or not at all
//! (S3 objects are atomic; local files are written aside and renamed), keys are relative to
//! the destination's root, and `list` returns every key under a prefix.

mod local;
mod s3;

use std::path::Path;

pub use local::LocalDir;
pub use s3::{S3Settings, S3Store};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{backend} `{key}`: {operation}: {message}")]
    Op {
        backend: &'static str,
        key: String,
        operation: &'static str,
        message: String,
    },
}

impl StorageError {
    pub(crate) fn op(
        backend: &'static str,
        key: &str,
        operation: &'static str,
        message: impl std::fmt::Display,
    ) -> Self {
        StorageError::Op {
            backend,
            key: key.to_string(),
            operation,
            message: message.to_string(),
        }
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// A destination for export files.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    Local(LocalDir),
    S3(S3Store),
}

impl ObjectStore {
    /// Where a key ends up, for reports (`s3://bucket/prefix/key` or a path).
    pub fn url(&self, key: &str) -> String {
        match self {
            ObjectStore::Local(l) => l.url(key),
            ObjectStore::S3(s) => s.url(key),
        }
    }

    /// A key as a full URI a reader can open from anywhere (symlink manifests):
    /// `s3://bucket/prefix/key`, or `file:///absolute/path` for a folder, whatever the
    /// working directory of the reader (a relative destination is made absolute).
    pub fn uri(&self, key: &str) -> String {
        match self {
            ObjectStore::Local(l) => l.file_uri(key),
            ObjectStore::S3(s) => s.url(key),
        }
    }

    /// Uploads a local file (multipart with checksums for large files on S3).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        match self {
            ObjectStore::Local(l) => l.put_file(key, path).await,
            ObjectStore::S3(s) => s.put_file(key, path).await,
        }
    }

    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        match self {
            ObjectStore::Local(l) => l.put_bytes(key, bytes).await,
            ObjectStore::S3(s) => s.put_bytes(key, bytes).await,
        }
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        match self {
            ObjectStore::Local(l) => l.get_bytes(key).await,
            ObjectStore::S3(s) => s.get_bytes(key).await,
        }
    }

    /// Copies an object within the store (staging to published).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        match self {
            ObjectStore::Local(l) => l.copy(from, to).await,
            ObjectStore::S3(s) => s.copy(from, to).await,
        }
    }

    /// Size of an object, or `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match self {
            ObjectStore::Local(l) => l.head(key).await,
            ObjectStore::S3(s) => s.head(key).await,
        }
    }

    /// Size and hex SHA-256 of an object's content as the store returns it (streamed, not
    /// held in memory), or `None` when it does not exist: what ARCHIVE checks before it
    /// deletes the events a file holds.
    pub async fn sha256(&self, key: &str) -> Result<Option<(u64, String)>, StorageError> {
        match self {
            ObjectStore::Local(l) => l.sha256(key).await,
            ObjectStore::S3(s) => s.sha256(key).await,
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        match self {
            ObjectStore::Local(l) => l.list(prefix).await,
            ObjectStore::S3(s) => s.list(prefix).await,
        }
    }

    /// Whether the destination answers before a run reads anything: S3 lists one key of
    /// the root (credentials, the bucket, the endpoint), a local folder is created. A run
    /// that would fail at its first upload fails at once, not after reading its data.
    pub async fn check(&self) -> Result<(), StorageError> {
        match self {
            ObjectStore::Local(l) => l.check().await,
            ObjectStore::S3(s) => s.check().await,
        }
    }

    /// Deletes keys; deleting a missing key is not an error.
    pub async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        match self {
            ObjectStore::Local(l) => l.delete(keys).await,
            ObjectStore::S3(s) => s.delete(keys).await,
        }
    }
}
