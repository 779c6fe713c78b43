//! The record of finished exports: the `Idempotency-Key` of every export that was delivered
//! or dead-lettered, appended to `acks.log` in the data directory.
//!
//! After a restart the dataflow forms the same exports again (the log replays); those whose
//! key is here are not sent again, the others are — with the same key (SPEC §7).
//!
//! Keys are group-committed: a writer thread appends whatever finished meanwhile and
//! `fsync`s, at most every [`FLUSH_EVERY`], so an acknowledgement is durable within a second
//! of the endpoint's answer. A key lost in a crash before its `fsync` means one duplicate
//! delivery, with the same key. The file is one key a line; a torn last line (no newline) is
//! cut at open, and a damaged line can only name a key no export has.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// How long a finished export's key may wait for its `fsync`.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The writing end: cheap to clone.
#[derive(Clone)]
pub struct AckLog {
    tx: Sender<Msg>,
}

enum Msg {
    Key(String),
    /// Writes and syncs what is queued, then answers.
    Flush(Sender<()>),
    /// Keeps only the keys of exports at or after a log position, and the listed ones.
    Compact(u64, HashSet<String>),
}

/// The log position of the event an export's key derives from (`{hash}-{seq:x}`, the position
/// in the high bits of `seq`), if the key has that form.
pub fn key_position(key: &str) -> Option<u64> {
    let seq = key.rsplit_once('-')?.1;
    u64::from_str_radix(seq, 16).ok().map(|s| s >> 24)
}

/// Reads the keys recorded so far and opens the log for appending.
pub fn open(data_dir: &Path) -> anyhow::Result<(AckLog, HashSet<String>)> {
    let path = data_dir.join("acks.log");
    let mut done = HashSet::new();
    // Bytes up to the end of the last whole line.
    let mut whole = 0u64;
    if path.exists() {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // the end, or a torn last line
            }
            whole += n as u64;
            if let Ok(key) = std::str::from_utf8(&line[..line.len() - 1]) {
                done.insert(key.to_owned());
            }
        }
    }
    let file = {
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?
    };
    // A torn last line was never synced whole: cut it, so the next key starts a line.
    if file.metadata().map(|m| m.len()).unwrap_or(0) > whole {
        file.set_len(whole)
            .with_context(|| format!("cutting the torn end of {}", path.display()))?;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("acks".into())
        .spawn(move || writer(file, path, rx))
        .context("starting the acknowledgement writer")?;
    Ok((AckLog { tx }, done))
}

impl AckLog {
    /// Records that the export with `key` finished.
    pub fn record(&self, key: &str) {
        let _ = self.tx.send(Msg::Key(key.to_owned()));
    }

    /// After a snapshot at `position`: forgets the keys of exports made before it, except
    /// `keep` (its outbox). Rewrites the file (temporary file, `fsync`, rename).
    pub fn compact(&self, position: u64, keep: HashSet<String>) {
        let _ = self.tx.send(Msg::Compact(position, keep));
    }

    /// Waits until every key recorded so far is durable.
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

fn writer(mut file: File, path: std::path::PathBuf, rx: Receiver<Msg>) {
    let path = path.as_path();
    let mut buffer = Vec::new();
    let mut waiting: Vec<Sender<()>> = Vec::new();
    let mut compaction = None;
    loop {
        let first = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for msg in first.into_iter().chain(rx.try_iter()) {
            match msg {
                Msg::Key(key) => {
                    buffer.extend_from_slice(key.as_bytes());
                    buffer.push(b'\n');
                }
                Msg::Flush(tx) => waiting.push(tx),
                Msg::Compact(position, keep) => compaction = Some((position, keep)),
            }
        }
        if !buffer.is_empty() {
            let written = file.write_all(&buffer).and_then(|()| file.sync_data());
            if let Err(e) = written {
                tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "could not record finished exports; after a restart they may be sent again (same Idempotency-Key)"
                );
            }
            buffer.clear();
        }
        if let Some((position, keep)) = compaction.take() {
            match compact(path, position, &keep) {
                Ok(f) => file = f,
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not compact"),
            }
        }
        for tx in waiting.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// Rewrites the file without the keys that can no longer come up; returns it opened for
/// appending.
fn compact(path: &Path, position: u64, keep: &HashSet<String>) -> std::io::Result<File> {
    let text = std::fs::read(path)?;
    let tmp = path.with_extension("log.tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = std::io::BufWriter::new(options.open(&tmp)?);
    for line in text.split(|b| *b == b'\n') {
        let Ok(key) = std::str::from_utf8(line) else {
            continue;
        };
        if !key.is_empty()
            && (keep.contains(key) || key_position(key).is_none_or(|p| p >= position))
        {
            out.write_all(line)?;
            out.write_all(b"\n")?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_a_reopen_and_a_torn_line_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (log, done) = open(dir.path()).expect("open");
            assert!(done.is_empty());
            log.record("k1");
            log.record("k2");
            log.flush();
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join("acks.log"))
            .expect("file");
        file.write_all(b"k3-torn").expect("write");
        {
            let (log, done) = open(dir.path()).expect("reopen");
            assert_eq!(done, HashSet::from(["k1".to_string(), "k2".to_string()]));
            log.record("k4");
            log.flush();
        }
        let (_, done) = open(dir.path()).expect("reopen");
        assert!(done.contains("k4") && !done.contains("k3-torn"), "{done:?}");
    }

    #[test]
    fn compaction_keeps_later_keys_and_the_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = |position: u64| format!("00ff-{:x}", position << 24);
        {
            let (log, _) = open(dir.path()).expect("open");
            for p in [1, 5, 9] {
                log.record(&key(p));
            }
            log.flush();
            log.compact(6, HashSet::from([key(1)]));
            log.flush();
            log.record(&key(12));
            log.flush();
        }
        let (_, done) = open(dir.path()).expect("reopen");
        assert_eq!(done, HashSet::from([key(1), key(9), key(12)]));
        assert_eq!(key_position(&key(9)), Some(9));
    }
}
