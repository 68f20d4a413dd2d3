//! Compiled components kept on disk, so a process loads a plugin it loaded before without
//! compiling it again. A component built with an interpreter inside (componentize-py,
//! componentize-js) takes tens of seconds and about half a gigabyte to compile; every
//! `sluice` command and every `serve` start paid that before.
//!
//! - An entry is named by the component's SHA-256 and the engine's compatibility hash
//!   (wasmtime's version and the settings that shape its code, fuel metering among them),
//!   so a new build, a new Sluice or other settings never read an old entry.
//! - An entry is machine code the process runs as it is. It ends with the SHA-256 of what
//!   precedes it, checked before use (a torn or damaged file is compiled again, never
//!   run); and the folder and its entries are used only when they belong to the user
//!   Sluice runs as and nobody else may write them. A folder others can write is not
//!   used, with a warning.
//! - Written to a temporary name and renamed, so concurrent processes never read a half
//!   entry. Entries untouched for [`MAX_AGE`] go, then the least recently used beyond
//!   [`MAX_BYTES`] in all.
//! - The cache is an optimisation: any failure to read or write it is logged and the
//!   component compiled as without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Entries not used for this long are removed.
const MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most the entries may take in all; the least recently used beyond it are removed.
const MAX_BYTES: u64 = 2 << 30;
/// A temporary file this old was left by a process that died while writing.
const STALE_TEMP: Duration = Duration::from_secs(3600);
const TRAILER: usize = 32;

/// Where a load's compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompiledFrom {
    /// This process compiled or read it for an earlier load.
    Memory,
    /// Read from the compile cache.
    Disk,
    /// Compiled by this load, taking this long.
    Compiled(Duration),
}

impl std::fmt::Display for CompiledFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompiledFrom::Memory => f.write_str("loaded earlier in this process"),
            CompiledFrom::Disk => f.write_str("read from the compile cache"),
            CompiledFrom::Compiled(d) => write!(f, "compiled in {:.1} s", d.as_secs_f64()),
        }
    }
}

pub(crate) struct CompileCache {
    dir: PathBuf,
    /// The engine's compatibility hash, in hex.
    tag: String,
}

impl CompileCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        // The hasher's output is only stable within one build of Sluice, and a new build
        // is a new wasmtime as far as the entries go; the version keeps builds apart.
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Self {
            dir,
            tag: format!("{:016x}", h.finish()),
        }
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!(
            "{}-{}.cwasm",
            sha256.to_ascii_lowercase(),
            self.tag
        ))
    }

    /// The component compiled from the bytes with this SHA-256, if an entry holds it.
    pub(crate) fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        use std::io::Read;
        let path = self.entry(sha256);
        if self.folder_refused() {
            return None;
        }
        // What is checked is the file opened, not a path that could be swapped between
        // the check and the read: whoever could replace the folder could not make a file
        // that belongs to this user.
        let mut options = std::fs::File::options();
        // Read only: a cache baked into a read-only image, or made read-only, is read.
        options.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
        let mut file = match options.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(entry = %path.display(), "compile cache: {e}; compiling it again");
                return None;
            }
        };
        if let Err(why) = file.metadata().map_err(|e| e.to_string()).and_then(|m| {
            if m.is_file() {
                trusted(&m)
            } else {
                Err("is not a file".into())
            }
        }) {
            warn_once(&path, &format!("compile cache entry `{}` not used: it {why}; compiling it again and replacing it", path.display()));
            return None;
        }
        let mut bytes = Vec::new();
        if let Err(e) = file.read_to_end(&mut bytes) {
            tracing::warn!(entry = %path.display(), "compile cache: {e}; compiling it again");
            return None;
        }
        let Some(code) = checked(&bytes) else {
            tracing::warn!(entry = %path.display(), "compile cache: the entry is damaged (its checksum does not match); compiling it again");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        // SAFETY: the bytes are what `Component::serialize` wrote for this engine's
        // settings (the name carries their hash, and wasmtime checks its own header and
        // settings again), intact (the trailer's SHA-256), read from a file of this user
        // that nobody else may write.
        match unsafe { Component::deserialize(engine, code) } {
            Ok(c) => {
                // Used now: the age and size limits keep what is in use.
                // (Opened again for it: the entry was opened read-only.)
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(entry = %path.display(), "compile cache: the entry does not load ({e:#}); compiling it again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Whether the folder cannot be used: missing (silently), or not this user's alone
    /// (said once).
    fn folder_refused(&self) -> bool {
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            return true;
        };
        match trusted(&meta) {
            Ok(()) => false,
            Err(why) => {
                warn_once(
                    &self.dir,
                    &format!(
                        "compile cache `{}` not used: it {why}; plugins are compiled at every load",
                        self.dir.display()
                    ),
                );
                true
            }
        }
    }

    /// [`CompileCache::put`], unless an entry is there already.
    pub(crate) fn put_if_absent(&self, sha256: &str, component: &Component) {
        if !self.entry(sha256).exists() {
            self.put(sha256, component);
        }
    }

    /// Keeps `component` (compiled from the bytes with this SHA-256) for later loads.
    pub(crate) fn put(&self, sha256: &str, component: &Component) {
        match self.write(sha256, component) {
            // Only a folder this process wrote to is pruned: one it refused may be
            // someone else's.
            Ok(true) => self.prune(&self.entry(sha256)),
            Ok(false) => {}
            Err(e) => warn_once(
                &self.dir,
                &format!(
                    "compile cache `{}`: not written ({e:#}): plugins are compiled at every load; point `[plugins] compile_cache` at a folder Sluice may write, or set it to \"\"",
                    self.dir.display()
                ),
            ),
        }
    }

    /// Whether an entry was written (not when the folder cannot hold one).
    fn write(&self, sha256: &str, component: &Component) -> anyhow::Result<bool> {
        // Only the cache folder itself is made: a command run where the plugin folder
        // does not exist (`plugin test --wasm` anywhere) leaves no folders behind.
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(dir = %self.dir.display(), "compile cache: its parent folder does not exist; not written");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        if self.folder_refused() {
            return Ok(false);
        }
        let mut bytes = component.serialize()?;
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        let temp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), rand_suffix()));
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut options = std::fs::File::options();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, self.entry(sha256))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written?;
        Ok(true)
    }

    /// Removes entries unused for [`MAX_AGE`], then the least recently used beyond
    /// [`MAX_BYTES`] (never `keep`), and temporary files left by dead writers.
    fn prune(&self, keep: &Path) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let age = |m: &std::fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default()
        };
        let mut entries = Vec::new();
        for e in read.filter_map(Result::ok) {
            let (path, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            let Ok(meta) = e.metadata() else { continue };
            if name.starts_with(".tmp-") {
                if age(&meta) > STALE_TEMP {
                    let _ = std::fs::remove_file(&path);
                }
            } else if name.ends_with(".cwasm") && path != keep {
                if age(&meta) > MAX_AGE {
                    let _ = std::fs::remove_file(&path);
                } else {
                    entries.push((age(&meta), meta.len(), path));
                }
            }
        }
        let kept = std::fs::metadata(keep).map(|m| m.len()).unwrap_or(0);
        let mut total = kept + entries.iter().map(|(_, len, _)| len).sum::<u64>();
        // Oldest first.
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, len, path) in entries {
            if total <= MAX_BYTES {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// The code of an entry whose trailer is the SHA-256 of the rest.
fn checked(bytes: &[u8]) -> Option<&[u8]> {
    let split = bytes.len().checked_sub(TRAILER)?;
    let (code, sum) = bytes.split_at(split);
    (Sha256::digest(code).as_slice() == sum).then_some(code)
}

/// Whether a file or folder belongs to the user this process runs as, and nobody else
/// may write it: an entry is run as machine code, so one another user could have written
/// is not used.
#[cfg(unix)]
fn trusted(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "belongs to uid {}, not to the user Sluice runs as (uid {me}): `chown` it to that user, or point `[plugins] compile_cache` at a folder of that user's",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "may be written by other users (mode {:o}): `chmod go-w` it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn trusted(_: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// A folder or entry that is not used is said once per process.
fn warn_once(path: &Path, message: &str) {
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.iter().any(|p| p == path) {
        said.push(path.to_path_buf());
        tracing::warn!("{message}");
    }
}

fn rand_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_used_only_with_its_checksum() {
        let mut bytes = b"machine code".to_vec();
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        assert_eq!(checked(&bytes), Some(&b"machine code"[..]));
        bytes[3] ^= 1;
        assert_eq!(checked(&bytes), None);
        assert_eq!(checked(&bytes[..10]), None);
    }
}
