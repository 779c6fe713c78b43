//! The dead-letter store: exports that still failed after their retries (SPEC §4).
//!
//! # On disk
//!
//! One file, `deadletters.log`, in the data directory: an 8-byte magic header followed by
//! frames `[len: u32 LE][crc32(body): u32 LE][body: JSON record]`. Records are
//! `put` (a whole entry), `update` (attempts, last status and error after a failed redrive)
//! and `remove` (delivered on redrive). Every append is `fsync`ed before the call returns;
//! [`DeadLetterStore::put_batch`] writes many entries with one `fsync` (the egress batches
//! what fails while the previous `fsync` runs, so an outage is not throttled by the disk).
//!
//! The live entries (payloads included) are also kept in memory, indexed by id: the store is
//! sized for failures to be re-driven, not for the whole stream — a long outage of a busy
//! destination costs about the payload plus ~0.5 KiB per entry.
//!
//! On open the log is replayed; a torn or corrupt tail (short frame, absurd length, checksum
//! mismatch, undecodable body) ends the replay, is logged, and — when the store is opened for
//! writing — truncated away, so that later appends are not hidden behind it. When removed or
//! superseded records outweigh live ones the log is compacted (rewritten to a temporary file,
//! `fsync`ed, renamed over the old one, directory `fsync`ed).
//!
//! # Secrets
//!
//! An entry keeps what a re-send needs, the destination's auth included, *as configured*: a
//! secret given as `{"env":"VAR"}` is stored as that reference (the value is read from the
//! environment at redrive), but a secret written literally in the configuration is stored
//! literally. The log file is therefore created with mode `0600` (directory `0700` when the
//! store creates it). `lastError` texts are built by the egress from status codes and
//! transport error kinds only and never contain a secret; nothing in this module prints a
//! secret (the [`Secret`](crate::secret::Secret) type redacts itself in `Debug`).
//!
//! # Concurrency
//!
//! One process writes: [`DeadLetterStore::open`] takes an exclusive advisory lock
//! (`flock`) on `deadletters.lock`. [`DeadLetterStore::open_read_only`] takes no lock and never
//! modifies the files (for `dead-letters list` beside a running service).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::{Auth, Delivery};

const LOG_FILE: &str = "deadletters.log";
const LOCK_FILE: &str = "deadletters.lock";
const MAGIC: &[u8; 8] = b"SDDLQ\0\0\x01";
const FRAME_HEADER: usize = 8;
/// A frame longer than this is taken for corruption.
const MAX_RECORD: u32 = 512 * 1024 * 1024;
/// Compaction runs when the log is larger than this and mostly garbage.
const COMPACT_MIN_BYTES: u64 = 1024 * 1024;

/// What a re-send needs to know about the destination (no config needed at redrive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationSettings {
    /// The destination's id.
    pub id: String,
    /// The endpoint with the query parameters appended.
    pub request_url: String,
    /// The validated custom headers, in order.
    pub headers: Vec<(String, String)>,
    /// The auth as configured (secrets literal or env references).
    pub auth: Auth,
    pub delivery: Delivery,
}

/// An entry to store; [`DeadLetterStore::put`] gives it an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub destination: DestinationSettings,
    /// `"namespace:id"`.
    pub profile: String,
    pub epoch: u64,
    pub idempotency_key: String,
    /// The JSON payload as sent.
    pub payload: Bytes,
    pub attempts: u32,
    /// `None` when no response was received (connection error, timeout, token fetch failure).
    pub last_status: Option<u16>,
    pub last_error: String,
}

/// A stored dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Unique within the store, increasing in insertion order.
    pub id: u64,
    pub destination: DestinationSettings,
    pub profile: String,
    pub epoch: u64,
    pub idempotency_key: String,
    #[serde(with = "payload_b64")]
    pub payload: Bytes,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: String,
    /// Unix ms when the entry was first stored.
    pub stored_at_ms: i64,
    /// Unix ms of the last change (put or update).
    pub updated_at_ms: i64,
}

impl DeadLetter {
    /// The payload as a JSON value (a string when it is not valid JSON).
    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.payload).into_owned())
        })
    }

    /// The `dead-letters list` object (SPEC §5): `destination`, `profile`, `attempts`,
    /// `lastStatus`, `lastError`, `payload`, in that order.
    pub fn list_json(&self) -> serde_json::Value {
        serde_json::json!({
            "destination": self.destination.id,
            "profile": self.profile,
            "attempts": self.attempts,
            "lastStatus": self.last_status,
            "lastError": self.last_error,
            "payload": self.payload_json(),
        })
    }
}

/// A failure of the store. Texts name paths and I/O errors, never entry contents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("dead-letter store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("dead-letter store {path}: not a dead-letter log (bad header)")]
    BadHeader { path: PathBuf },
    #[error("dead-letter store {path}: in use by another process")]
    Locked { path: PathBuf },
    #[error("dead-letter store {path}: opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("dead-letter store: cannot encode a record: {0}")]
    Encode(#[source] serde_json::Error),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
enum Record {
    Put(Box<DeadLetter>),
    #[serde(rename_all = "camelCase")]
    Update {
        id: u64,
        attempts: u32,
        last_status: Option<u16>,
        last_error: String,
        updated_at_ms: i64,
    },
    Remove {
        id: u64,
    },
}

struct Inner {
    /// `None` for a read-only store.
    file: Option<File>,
    /// Held for the store's lifetime (the `flock` goes with it).
    _lock: Option<File>,
    entries: BTreeMap<u64, DeadLetter>,
    next_id: u64,
    /// Length of the valid log.
    len: u64,
    /// Bytes of the frames of live entries (their puts and updates).
    live_bytes: u64,
    /// Per live entry, the bytes of its frames.
    frame_sizes: BTreeMap<u64, u64>,
}

/// The durable, append-only dead-letter log. Cheap to share behind an `Arc`; methods block
/// on disk I/O (`fsync`), so async callers should use `spawn_blocking`.
pub struct DeadLetterStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DeadLetterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl DeadLetterStore {
    /// Opens (creating it when missing) the store in `dir` for reading and writing.
    /// Fails with [`StoreError::Locked`] while another process has it open.
    pub fn open(dir: impl AsRef<Path>) -> Result<DeadLetterStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        create_private_dir(&dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        try_lock_exclusive(&lock, &lock_path)?;

        let path = dir.join(LOG_FILE);
        let mut file = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let created = file.metadata().map_err(io_err(&path))?.len() < MAGIC.len() as u64;
        if created {
            // New (or torn during creation, before the header was complete): start afresh.
            file.set_len(0).map_err(io_err(&path))?;
            file.write_all(MAGIC).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            sync_dir(&dir)?;
        }
        let mut inner = replay(&path, &mut file)?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        if file_len > inner.len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = file_len - inner.len,
                "dead-letter log has a torn or corrupt tail; truncating it"
            );
            file.set_len(inner.len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        file.seek(SeekFrom::Start(inner.len))
            .map_err(io_err(&path))?;
        inner.file = Some(file);
        inner._lock = Some(lock);
        let store = DeadLetterStore {
            dir,
            inner: Mutex::new(inner),
        };
        {
            let mut inner = store.lock();
            if needs_compaction(&inner) {
                store.compact_locked(&mut inner)?;
            }
        }
        Ok(store)
    }

    /// Opens the store for reading only: no lock, nothing written, a missing store is empty.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<DeadLetterStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(LOG_FILE);
        let inner = match File::open(&path) {
            Ok(mut file) => {
                if file.metadata().map_err(io_err(&path))?.len() < MAGIC.len() as u64 {
                    empty_inner()
                } else {
                    replay(&path, &mut file)?
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => empty_inner(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(DeadLetterStore {
            dir,
            inner: Mutex::new(inner),
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory index consistent with the log
        // (appends update it only after the fsync), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an entry durably and returns it with its id.
    pub fn put(&self, letter: NewDeadLetter) -> Result<DeadLetter, StoreError> {
        let mut entries = self.put_batch(vec![letter])?;
        entries
            .pop()
            .ok_or_else(|| StoreError::Encode(serde::ser::Error::custom("empty batch")))
    }

    /// Stores several entries with one write and one `fsync` (group commit), all or none.
    pub fn put_batch(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<DeadLetter>, StoreError> {
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let now = now_ms();
        let mut id = inner.next_id;
        let mut frames = Vec::new();
        let mut stored = Vec::with_capacity(letters.len());
        for letter in letters {
            let entry = DeadLetter {
                id,
                destination: letter.destination,
                profile: letter.profile,
                epoch: letter.epoch,
                idempotency_key: letter.idempotency_key,
                payload: letter.payload,
                attempts: letter.attempts,
                last_status: letter.last_status,
                last_error: letter.last_error,
                stored_at_ms: now,
                updated_at_ms: now,
            };
            let before = frames.len();
            encode_frame_into(&Record::Put(Box::new(entry.clone())), &mut frames)?;
            stored.push((entry, (frames.len() - before) as u64));
            id += 1;
        }
        self.append(&mut inner, &frames)?;
        inner.next_id = id;
        let mut out = Vec::with_capacity(stored.len());
        for (entry, size) in stored {
            inner.live_bytes += size;
            inner.frame_sizes.insert(entry.id, size);
            inner.entries.insert(entry.id, entry.clone());
            out.push(entry);
        }
        Ok(out)
    }

    /// The entries, oldest first, of one destination or of all.
    pub fn list(&self, destination: Option<&str>) -> Vec<DeadLetter> {
        let inner = self.lock();
        inner
            .entries
            .values()
            .filter(|e| destination.is_none_or(|d| e.destination.id == d))
            .cloned()
            .collect()
    }

    /// One entry.
    pub fn get(&self, id: u64) -> Option<DeadLetter> {
        self.lock().entries.get(&id).cloned()
    }

    /// How many entries the store holds.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a failed redrive: the new attempt total and the last status and error.
    /// Returns `false` when no such entry exists.
    pub fn update(
        &self,
        id: u64,
        attempts: u32,
        last_status: Option<u16>,
        last_error: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if !inner.entries.contains_key(&id) {
            return Ok(false);
        }
        let updated_at_ms = now_ms();
        let record = Record::Update {
            id,
            attempts,
            last_status,
            last_error: last_error.to_string(),
            updated_at_ms,
        };
        let size = self.append_record(&mut inner, &record)?;
        if let Some(e) = inner.entries.get_mut(&id) {
            e.attempts = attempts;
            e.last_status = last_status;
            e.last_error = last_error.to_string();
            e.updated_at_ms = updated_at_ms;
        }
        // Superseded updates are counted as live until the next compaction: a harmless
        // overestimate that only makes compaction a little lazier.
        inner.live_bytes += size;
        *inner.frame_sizes.entry(id).or_insert(0) += size;
        if needs_compaction(&inner) {
            self.compact_locked(&mut inner)?;
        }
        Ok(true)
    }

    /// Removes an entry (delivered). Returns `false` when no such entry exists.
    pub fn remove(&self, id: u64) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if !inner.entries.contains_key(&id) {
            return Ok(false);
        }
        self.append_record(&mut inner, &Record::Remove { id })?;
        inner.entries.remove(&id);
        if let Some(size) = inner.frame_sizes.remove(&id) {
            inner.live_bytes = inner.live_bytes.saturating_sub(size);
        }
        if needs_compaction(&inner) {
            self.compact_locked(&mut inner)?;
        }
        Ok(true)
    }

    /// Rewrites the log with only the live entries.
    pub fn compact(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.file.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.log_path(),
            });
        }
        self.compact_locked(&mut inner)
    }

    /// Appends one record and fsyncs; on failure the log is cut back to its previous length.
    fn append_record(&self, inner: &mut Inner, record: &Record) -> Result<u64, StoreError> {
        let frame = encode_frame(record)?;
        self.append(inner, &frame)
    }

    /// Appends whole frames and fsyncs; on failure the log is cut back to its previous length.
    fn append(&self, inner: &mut Inner, frame: &[u8]) -> Result<u64, StoreError> {
        let path = self.log_path();
        let start = inner.len;
        let Some(file) = inner.file.as_mut() else {
            return Err(StoreError::ReadOnly { path });
        };
        let result = file.write_all(frame).and_then(|()| file.sync_data());
        if let Err(e) = result {
            // Do not leave a partial frame for later appends to hide behind.
            let _ = file.set_len(start);
            let _ = file.seek(SeekFrom::Start(start));
            return Err(io_err(&path)(e));
        }
        inner.len = start + frame.len() as u64;
        Ok(frame.len() as u64)
    }

    fn compact_locked(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let path = self.log_path();
        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut out = private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(MAGIC);
        let mut sizes = BTreeMap::new();
        for entry in inner.entries.values() {
            let frame = encode_frame(&Record::Put(Box::new(entry.clone())))?;
            sizes.insert(entry.id, frame.len() as u64);
            buf.extend_from_slice(&frame);
        }
        out.write_all(&buf).map_err(io_err(&tmp))?;
        out.sync_all().map_err(io_err(&tmp))?;
        drop(out);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = buf.len() as u64;
        file.seek(SeekFrom::Start(len)).map_err(io_err(&path))?;
        inner.file = Some(file);
        inner.len = len;
        inner.live_bytes = sizes.values().sum();
        inner.frame_sizes = sizes;
        tracing::debug!(path = %path.display(), bytes = len, entries = inner.entries.len(), "compacted dead-letter log");
        Ok(())
    }
}

fn needs_compaction(inner: &Inner) -> bool {
    inner.file.is_some()
        && inner.len > COMPACT_MIN_BYTES
        && inner.len > 2 * inner.live_bytes + MAGIC.len() as u64
}

fn empty_inner() -> Inner {
    Inner {
        file: None,
        _lock: None,
        entries: BTreeMap::new(),
        next_id: 1,
        len: MAGIC.len() as u64,
        live_bytes: 0,
        frame_sizes: BTreeMap::new(),
    }
}

fn encode_frame(record: &Record) -> Result<Vec<u8>, StoreError> {
    let mut frame = Vec::new();
    encode_frame_into(record, &mut frame)?;
    Ok(frame)
}

fn encode_frame_into(record: &Record, frame: &mut Vec<u8>) -> Result<(), StoreError> {
    let body = serde_json::to_vec(record).map_err(StoreError::Encode)?;
    frame.reserve(FRAME_HEADER + body.len());
    // Bodies are far below 4 GiB (payloads are single JSON objects); guard anyway.
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= MAX_RECORD)
        .ok_or_else(|| StoreError::Encode(serde::ser::Error::custom("record too large")))?;
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(())
}

/// Replays the log; `inner.len` is the end of the last good frame.
fn replay(path: &Path, file: &mut File) -> Result<Inner, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(io_err(path))?;
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(StoreError::BadHeader {
            path: path.to_path_buf(),
        });
    }
    let mut inner = empty_inner();
    let mut pos = MAGIC.len();
    let mut garbage_reason = None;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.len() < FRAME_HEADER {
            garbage_reason = Some("short frame header");
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_RECORD || rest.len() - FRAME_HEADER < len as usize {
            garbage_reason = Some("frame longer than the file");
            break;
        }
        let body = &rest[FRAME_HEADER..FRAME_HEADER + len as usize];
        if crc32fast::hash(body) != crc {
            garbage_reason = Some("checksum mismatch");
            break;
        }
        let record: Record = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => {
                garbage_reason = Some("undecodable record");
                break;
            }
        };
        let size = (FRAME_HEADER + len as usize) as u64;
        apply(&mut inner, record, size);
        pos += FRAME_HEADER + len as usize;
    }
    if let Some(reason) = garbage_reason {
        tracing::warn!(path = %path.display(), offset = pos, reason, "ignoring the dead-letter log's tail");
    }
    inner.len = pos as u64;
    Ok(inner)
}

fn apply(inner: &mut Inner, record: Record, size: u64) {
    match record {
        Record::Put(entry) => {
            let entry = *entry;
            inner.next_id = inner.next_id.max(entry.id + 1);
            if let Some(old) = inner.frame_sizes.insert(entry.id, size) {
                inner.live_bytes = inner.live_bytes.saturating_sub(old);
            }
            inner.live_bytes += size;
            inner.entries.insert(entry.id, entry);
        }
        Record::Update {
            id,
            attempts,
            last_status,
            last_error,
            updated_at_ms,
        } => {
            if let Some(e) = inner.entries.get_mut(&id) {
                e.attempts = attempts;
                e.last_status = last_status;
                e.last_error = last_error;
                e.updated_at_ms = updated_at_ms;
                inner.live_bytes += size;
                *inner.frame_sizes.entry(id).or_insert(0) += size;
            }
        }
        Record::Remove { id } => {
            inner.entries.remove(&id);
            if let Some(old) = inner.frame_sizes.remove(&id) {
                inner.live_bytes = inner.live_bytes.saturating_sub(old);
            }
        }
    }
}

fn private_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    #[allow(unused_mut)]
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(unix)]
fn try_lock_exclusive(file: &File, path: &Path) -> Result<(), StoreError> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid, open file descriptor owned by `file`; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Err(StoreError::Locked {
            path: path.to_path_buf(),
        })
    } else {
        Err(io_err(path)(err))
    }
}

#[cfg(not(unix))]
fn try_lock_exclusive(_file: &File, _path: &Path) -> Result<(), StoreError> {
    Ok(())
}

mod payload_b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(payload: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(payload))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DestinationSettings {
        DestinationSettings {
            id: "d1".into(),
            request_url: "http://127.0.0.1:1/x?a=b".into(),
            headers: vec![("x-a".into(), "1".into())],
            auth: Auth::None,
            delivery: Delivery::default(),
        }
    }

    fn letter(profile: &str) -> NewDeadLetter {
        NewDeadLetter {
            destination: settings(),
            profile: profile.into(),
            epoch: 3,
            idempotency_key: format!("key-{profile}"),
            payload: Bytes::from_static(br#"{"a":1}"#),
            attempts: 3,
            last_status: Some(503),
            last_error: "HTTP 503 Service Unavailable".into(),
        }
    }

    #[test]
    fn put_list_remove_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).unwrap();
        let a = store.put(letter("email:a")).unwrap();
        let b = store.put(letter("email:b")).unwrap();
        assert!(b.id > a.id);
        assert!(store.update(b.id, 6, None, "timeout").unwrap());
        assert!(store.remove(a.id).unwrap());
        assert!(!store.remove(a.id).unwrap());
        drop(store);
        let store = DeadLetterStore::open(dir.path()).unwrap();
        let all = store.list(None);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].profile, "email:b");
        assert_eq!(all[0].attempts, 6);
        assert_eq!(all[0].last_status, None);
        assert!(store.list(Some("other")).is_empty());
        let c = store.put(letter("email:c")).unwrap();
        assert!(c.id > b.id, "ids are never reused");
    }

    #[test]
    fn second_writer_is_refused_but_reader_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).unwrap();
        store.put(letter("email:a")).unwrap();
        assert!(matches!(
            DeadLetterStore::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.len(), 1);
        assert!(matches!(ro.remove(1), Err(StoreError::ReadOnly { .. })));
    }

    #[test]
    fn compaction_keeps_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).unwrap();
        let mut big = letter("email:x");
        big.payload = Bytes::from(format!("\"{}\"", "x".repeat(64 * 1024)));
        let keep = store.put(letter("email:keep")).unwrap();
        for _ in 0..40 {
            let e = store.put(big.clone()).unwrap();
            store.remove(e.id).unwrap();
        }
        let size = fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(
            size < COMPACT_MIN_BYTES + 200 * 1024,
            "log was compacted: {size}"
        );
        drop(store);
        let store = DeadLetterStore::open(dir.path()).unwrap();
        assert_eq!(
            store.list(None).iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![keep.id]
        );
    }
}
