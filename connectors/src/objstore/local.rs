//! A local folder as an object store: keys are relative paths; writes go to a temporary
//! name and are renamed into place, so a reader never sees half a file.

use std::path::{Path, PathBuf};

use super::{ObjectInfo, StorageError};

const BACKEND: &str = "local";

#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

/// Flushes `tmp` to disk, renames it to `target` and flushes the folder, so a file in
/// place survives a power cut: ARCHIVE deletes events once their file is in place, and
/// without the flushes a crash could leave it empty or missing after the delete.
async fn durably_rename(tmp: &Path, target: &Path) -> std::io::Result<()> {
    let (tmp, target) = (tmp.to_path_buf(), target.to_path_buf());
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        if let Some(folder) = target.parent() {
            std::fs::File::open(folder)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A temporary file this old in a folder being written to was left by a write that
/// died (a process killed mid-copy): removed. A write in progress is far younger.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `name` is a temporary file of [`LocalDir::place`] (`.NAME.tmp-PID-N`) written
/// by another process than this one (this process's writes are its own business).
fn foreign_temp(name: &str) -> bool {
    let Some((_, tail)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
        return false;
    };
    let Some((pid, n)) = tail.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(pid) && digits(n) && pid != std::process::id().to_string()
}

/// Removes the temporary files of dead writes from `folder` (best effort), once per
/// folder per process: files named as [`foreign_temp`] says, untouched for
/// [`STALE_TEMP`]. Readers skip them, but a file of a killed copy, as large as a part,
/// stays for ever otherwise.
async fn sweep_stale_temps(folder: &Path) {
    static SWEPT: std::sync::Mutex<Option<std::collections::HashSet<PathBuf>>> =
        std::sync::Mutex::new(None);
    let first = SWEPT
        .lock()
        .map(|mut swept| {
            swept
                .get_or_insert_with(Default::default)
                .insert(folder.to_path_buf())
        })
        .unwrap_or(false);
    if !first {
        return;
    }
    let folder = folder.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            return;
        };
        for entry in entries.flatten() {
            if !foreign_temp(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= STALE_TEMP);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(file = %entry.path().display(), "removed the temporary file of a write that died");
            }
        }
    })
    .await;
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// An error of `operation` on `key`, said with its path (the folder's, for `""`), as
    /// an S3 error names its URL.
    fn fail(
        &self,
        key: &str,
        operation: &'static str,
        message: impl std::fmt::Display,
    ) -> StorageError {
        StorageError::op(BACKEND, &self.url(key), operation, message)
    }

    /// The folder exists, or is created (see [`super::ObjectStore::check`]).
    pub async fn check(&self) -> Result<(), StorageError> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| self.fail("", "create the destination folder", e))
    }

    /// The key's path, absolute (a relative destination is read from the working
    /// folder, which a later reader of `export_jobs` does not know).
    pub fn url(&self, key: &str) -> String {
        let path = self.path(key);
        std::path::absolute(&path)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// `file://` and the key's absolute path, as is: not percent-encoded, as Hadoop's
    /// `Path` (Hive's symlink input format, Trino, Athena) reads a line, and as the S3
    /// lines are written. A path that cannot be made absolute (the working folder is
    /// gone) is written as it is, without the scheme.
    pub fn file_uri(&self, key: &str) -> String {
        let path = self.path(key);
        match std::path::absolute(&path) {
            Ok(abs) => format!("file://{}", abs.display()),
            Err(_) => path.display().to_string(),
        }
    }

    async fn place(
        &self,
        key: &str,
        write: impl AsyncFnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), StorageError> {
        let target = self.path(key);
        let err = |op, e: std::io::Error| self.fail(key, op, e);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| err("create folder", e))?;
            sweep_stale_temps(parent).await;
        }
        // Hidden (a leading `.`) while it is written, so readers listing the folder (Spark,
        // pyarrow, DuckDB globs) never take a half-written file for a part.
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Unique per write, so two writes of one key (two processes, or two tasks of one)
        // never share a temporary file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = target.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
        let placed = match write(&tmp).await {
            Ok(()) => durably_rename(&tmp, &target)
                .await
                .map_err(|e| err("flush and rename into place", e)),
            Err(e) => Err(err("write", e)),
        };
        if placed.is_err() {
            // A failed write leaves no temporary file behind (best effort).
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        placed
    }

    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.place(key, async |tmp: &Path| {
            tokio::fs::copy(path, tmp).await.map(|_| ())
        })
        .await
    }

    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.place(key, async move |tmp: &Path| {
            tokio::fs::write(tmp, bytes).await
        })
        .await
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        tokio::fs::read(self.path(key))
            .await
            .map_err(|e| self.fail(key, "read", e))
    }

    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let source = self.path(from);
        self.place(to, async |tmp: &Path| {
            tokio::fs::copy(&source, tmp).await.map(|_| ())
        })
        .await
    }

    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.fail(key, "stat", e)),
        }
    }

    pub async fn sha256(&self, key: &str) -> Result<Option<(u64, String)>, StorageError> {
        let path = self.path(key);
        match tokio::task::spawn_blocking(move || crate::parquet::hash_file(&path)).await {
            Ok(Ok(found)) => Ok(Some(found)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Ok(Err(e)) => Err(self.fail(key, "read", e)),
            Err(e) => Err(self.fail(key, "read", e)),
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.fail(prefix, "list", e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| self.fail(prefix, "list", e))?
            {
                let path = entry.path();
                let meta = entry
                    .metadata()
                    .await
                    .map_err(|e| self.fail(prefix, "list", e))?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().replace('\\', "/");
                let hidden = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if key.starts_with(prefix) && !hidden {
                    out.push(ObjectInfo {
                        key,
                        size: meta.len(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for key in keys {
            let path = self.path(key);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.fail(key, "delete", e)),
            }
            // Folders are implicit in an object store: remove the ones left empty.
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == self.root || tokio::fs::remove_dir(d).await.is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-localdir-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_write_removes_the_temporary_files_of_dead_writes_in_its_folder() {
        let root = scratch();
        let dir = root.join("EVENT_DATA/dt=2026-01-01");
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join(".part-a.parquet.tmp-123-4");
        let young = dir.join(".part-b.parquet.tmp-123-5");
        let hidden = dir.join(".notes.tmp-old");
        let own = dir.join(format!(".part-c.parquet.tmp-{}-9", std::process::id()));
        for f in [&old, &young, &hidden, &own] {
            std::fs::write(f, b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for f in [&old, &hidden, &own] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        let l = LocalDir::new(&root);
        l.put_bytes("EVENT_DATA/dt=2026-01-01/_SUCCESS", Vec::new())
            .await
            .unwrap();
        assert!(!old.exists(), "a dead write's file is removed");
        assert!(young.exists(), "a write that may be in progress is not");
        assert!(hidden.exists(), "nor another hidden file");
        assert!(own.exists(), "nor one of this process's writes");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn file_uris_are_absolute_and_not_encoded() {
        let l = LocalDir::new("/data/lake out");
        assert_eq!(
            l.file_uri("EVENT_DATA/dt=2026-11-24/part-1.parquet"),
            "file:///data/lake out/EVENT_DATA/dt=2026-11-24/part-1.parquet"
        );
        // A relative destination is taken from the working directory, as it is written.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            LocalDir::new("./out").file_uri("k"),
            format!("file://{}/out/k", cwd.display())
        );
        // So are the paths recorded in `export_jobs`.
        assert_eq!(
            LocalDir::new("out").url("USER_DATA"),
            format!("{}/out/USER_DATA", cwd.display())
        );
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn writes_land_whole_under_their_key_and_failed_ones_leave_nothing() {
        let root = scratch();
        let store = LocalDir::new(&root);
        // Many writes of one key at once: each goes through a temporary file of its own,
        // so the file in place is one of them, whole.
        let bodies: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 64 * 1024]).collect();
        let writes = bodies
            .iter()
            .map(|b| store.put_bytes("p/part.parquet", b.clone()));
        for r in futures_util::future::join_all(writes).await {
            r.unwrap();
        }
        let placed = store.get_bytes("p/part.parquet").await.unwrap();
        assert!(bodies.contains(&placed), "a whole body of one write");
        assert_eq!(names(&root.join("p")), ["part.parquet"]);
        // A copy from a file that is not there fails and leaves no hidden temporary file.
        let err = store
            .put_file("p/other.parquet", &root.join("missing"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("other.parquet"), "{err}");
        assert_eq!(names(&root.join("p")), ["part.parquet"]);
        let _ = std::fs::remove_dir_all(root);
    }
}
