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
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // A torn last line was never synced whole: cut it, so the next key starts a line.
    if file.metadata().map(|m| m.len()).unwrap_or(0) > whole {
        file.set_len(whole)
            .with_context(|| format!("cutting the torn end of {}", path.display()))?;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("acks".into())
        .spawn(move || writer(file, &path, rx))
        .context("starting the acknowledgement writer")?;
    Ok((AckLog { tx }, done))
}

impl AckLog {
    /// Records that the export with `key` finished.
    pub fn record(&self, key: &str) {
        let _ = self.tx.send(Msg::Key(key.to_owned()));
    }

    /// Waits until every key recorded so far is durable.
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

fn writer(mut file: File, path: &Path, rx: Receiver<Msg>) {
    let mut buffer = Vec::new();
    let mut waiting: Vec<Sender<()>> = Vec::new();
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
        for tx in waiting.drain(..) {
            let _ = tx.send(());
        }
    }
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
}
