//! An archive's eventIds (with each event's time), spooled to a file instead of held in
//! memory: a day of 30 million events would need gigabytes as a list of strings. Written by the blocking
//! encoder thread in the order the rows were read, read back in chunks for the deletion,
//! and removed with the spool.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

/// The files and folders runs of this process are writing in the work folder, each
/// removed by what holds it when dropped; [`remove_held`] removes those a process exiting
/// would leave (the blocking thread encoding a day is not waited for, so what it holds is
/// never dropped).
static HELD: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

pub(crate) fn hold(path: &Path) {
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_path_buf());
}

pub(crate) fn release(path: &Path) {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
}

/// Removes what runs of this process still hold in the work folder (part folders, id
/// spools): for a process about to exit without unwinding its runs (a SIGTERM stops them
/// mid-stage), which would otherwise leave them until a later run's sweep a day on.
pub fn remove_held() {
    let held: Vec<PathBuf> = HELD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .collect();
    for path in held {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// eventIds with their event's time (epoch ms, if it has one), one JSON `[ms, "id"]` per
/// line (an id may hold any character).
#[derive(Debug)]
pub struct IdSpool {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    count: u64,
}

impl IdSpool {
    /// A new, empty spool at `path` (replacing any file there).
    pub fn create(path: PathBuf) -> io::Result<Self> {
        let file = File::create(&path)?;
        hold(&path);
        Ok(Self {
            path,
            out: Some(BufWriter::with_capacity(256 * 1024, file)),
            count: 0,
        })
    }

    pub fn push(&mut self, id: &str, at_ms: Option<i64>) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("the id spool is already finished"))?;
        serde_json::to_writer(&mut *out, &(at_ms, id))?;
        out.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }

    /// Flushes what was pushed; nothing more may be.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        Ok(())
    }

    /// How many ids were pushed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads the ids back, in the order pushed (after [`IdSpool::finish`]).
    pub fn chunks(&self) -> io::Result<IdChunks> {
        if self.out.is_some() {
            return Err(io::Error::other("the id spool is still being written"));
        }
        Ok(IdChunks {
            lines: BufReader::with_capacity(256 * 1024, File::open(&self.path)?),
        })
    }
}

impl Drop for IdSpool {
    fn drop(&mut self) {
        self.out = None;
        let _ = std::fs::remove_file(&self.path);
        release(&self.path);
    }
}

/// A spool read back.
#[derive(Debug)]
pub struct IdChunks {
    lines: BufReader<File>,
}

impl IdChunks {
    /// Up to `n` ids with their times; none once all were read.
    pub fn next_chunk(&mut self, n: usize) -> io::Result<Vec<(Option<i64>, String)>> {
        let mut ids = Vec::with_capacity(n.min(16_384));
        let mut line = String::new();
        while ids.len() < n {
            line.clear();
            if self.lines.read_line(&mut line)? == 0 {
                break;
            }
            ids.push(serde_json::from_str(line.trim_end_matches('\n'))?);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_in_order_in_chunks_and_the_file_goes_with_the_spool() {
        let path = std::env::temp_dir().join(format!("sluice-spool-{}.ids", std::process::id()));
        let mut spool = IdSpool::create(path.clone()).unwrap();
        let ids: Vec<(Option<i64>, String)> = (0..25)
            .map(|i| (Some(1_700_000_000_000 + i), format!("evt-{i}")))
            .chain([
                (None, "with\nnewline".to_string()),
                (Some(-5), "quote\"é".to_string()),
            ])
            .collect();
        for (at, id) in &ids {
            spool.push(id, *at).unwrap();
        }
        assert!(spool.chunks().is_err(), "not readable while written");
        spool.finish().unwrap();
        assert!(spool.push("late", None).is_err());
        assert_eq!(spool.count(), 27);
        let mut chunks = spool.chunks().unwrap();
        let mut back = Vec::new();
        loop {
            let chunk = chunks.next_chunk(10).unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 10);
            back.extend(chunk);
        }
        assert_eq!(back, ids);
        assert!(path.exists());
        drop(chunks);
        drop(spool);
        assert!(!path.exists(), "removed with the spool");
    }
}
