//! The dead-letter store: exports that still failed after their retries (SPEC §4).
//!
//! # On disk
//!
//! One file, `deadletters.log`, in the data directory: an 8-byte magic header followed by
//! frames `[len: u32 LE][crc32(body): u32 LE][body: JSON record]`. Records are
//! `put` (a whole entry), `update` (attempts, last status, error and response body after a
//! failed redrive) and `remove` (delivered on redrive). Fields added since the first format
//! (`tls`, `lastResponseBody`) are optional in records, so older logs still load. Every append is `fsync`ed before the call returns;
//! [`DeadLetterStore::put_batch`] writes many entries with one `fsync` (the egress batches
//! what fails while the previous `fsync` runs, so an outage is not throttled by the disk).
//!
//! The live entries (payloads included) are also kept in memory, indexed by id: the store is
//! sized for failures to be re-driven, not for the whole stream — a long outage of a busy
//! destination costs about the payload plus ~0.5 KiB per entry.
//!
//! # Never losing an entry
//!
//! **The log is never truncated or rewritten in place.** Every rewrite — compaction, the
//! clean-up after corruption, even the creation of a new log — writes a temporary file
//! (`deadletters.log.tmp`), `fsync`s it, renames it over `deadletters.log` and `fsync`s the
//! directory, so a crash leaves either the old log or the new one, whole.
//!
//! **Reading skips damage and resynchronises.** A frame that does not check out (a length
//! that is implausible or runs past the end of the file, a checksum mismatch, a body that is
//! not a record) is skipped, and reading resumes at the next offset where an intact frame
//! starts: the first offset after the bad one whose length is plausible (2 bytes ..
//! 512 MiB, within the file), whose body starts with `{`, whose CRC-32 matches and whose body
//! decodes as a record. Bodies are JSON text (control characters escaped, payloads base64),
//! so no offset inside a body has a plausible length — the top byte of the little-endian
//! length would have to be a control character — and the scan is fast; a false match would
//! also need a CRC-32 match and a decodable record. So a flipped byte costs exactly the
//! record it hit: intact records before *and after* it are kept. Each skipped stretch is a
//! [`Damage`]: its byte offset, length and reason, logged (path and offset) and returned by
//! [`DeadLetterStore::damage`].
//!
//! Two kinds of damage:
//!
//! - **corrupt** — anything but the case below. When the store is opened for writing, the
//!   original log is first kept as `deadletters.log.corrupt-<unix-ms>` (a hard link, or a
//!   copy where links are not supported; the open fails if neither can be made), then the
//!   intact entries are rewritten to a clean log by the rename above (on a full disk that
//!   rewrite waits: the log is left as it is and every append first retries it). The corrupt
//!   bytes are never deleted: the copy holds them for inspection. A corrupt `remove` or `update` record
//!   means an entry may come back or show its previous attempts: redrive resends it with the
//!   same `Idempotency-Key`.
//! - **torn tail** — an incomplete last frame (a header cut short, or a body shorter than its
//!   length and not itself a complete record), or zero bytes to the end: an append that was
//!   interrupted before its `fsync` returned, which was therefore never acknowledged. It is
//!   ignored (with a warning) and, when the store is opened for writing, dropped by the
//!   rename-based rewrite, without a copy.
//!
//! A failed append (disk full, file too large, I/O error) is not cut back either: the bytes it
//! wrote may stay as a torn tail, and the next append first rewrites the log from memory
//! (temporary file + rename) so that nothing is ever appended behind a torn frame. While the
//! disk stays full that rewrite fails too and so does the append. What is acknowledged is
//! exactly what a reader finds: when a group commit fails part-way, the frames written whole
//! before the failure are `fsync`ed and reported stored, the others not
//! ([`PartialBatch`]). The egress keeps the exports the store could not take in memory and
//! reports them ([`crate::egress::Egress::unstored`]). (Should the `fsync` itself fail after a
//! complete write, the entries are reported not stored although their frames may reach the
//! disk: a later reader may find them — a duplicate, never a loss.)
//!
//! `streamdest dead-letters list` prints the entries that could be read and then, when it
//! skipped corrupt records, names the file and the byte offsets on standard error and exits
//! with status **2** (a torn tail only warns and exits 0: nothing acknowledged was lost).
//!
//! # The data directory
//!
//! [`DeadLetterStore::open`] creates the directory (for `replay`, which defaults to
//! `./streamdest-data`). [`DeadLetterStore::open_existing`] and
//! [`DeadLetterStore::open_read_only`] (the `dead-letters` commands) fail with
//! [`StoreError::NoDataDir`] when it does not exist: a mistyped `--data-dir` is an error, not
//! an empty store. A directory without a log is an empty store.
//!
//! # Secrets
//!
//! An entry keeps what a re-send needs, the destination's auth included, *as configured*: a
//! secret given as `{"env":"VAR"}` is stored as that reference (the value is read from the
//! environment at redrive), but a secret written literally in the configuration is stored
//! literally. The log file (and its temporary and corrupt copies) is therefore created with
//! mode `0600` (directory `0700` when the store creates it). `lastError` texts are built by the
//! egress from status codes and transport error kinds only and never contain a secret;
//! `lastResponseBody` is the endpoint's own answer (its first KiB), never anything we sent;
//! nothing in this module prints a secret or an entry's contents (the
//! [`Secret`](crate::secret::Secret) type redacts itself in `Debug`).
//!
//! # Concurrency
//!
//! One process writes: [`DeadLetterStore::open`] takes an exclusive advisory lock
//! (`flock`) on `deadletters.lock`. [`DeadLetterStore::open_read_only`] takes no lock and never
//! modifies the files (for `dead-letters list` beside a running service); it may see an
//! append in progress as a torn tail.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::{Auth, Delivery, Tls};

const LOG_FILE: &str = "deadletters.log";
const LOCK_FILE: &str = "deadletters.lock";
const MAGIC: &[u8; 8] = b"SDDLQ\0\0\x01";
const FRAME_HEADER: usize = 8;
/// The shortest body a frame can have (`{}`); shorter lengths are taken for corruption.
const MIN_RECORD: u32 = 2;
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
    /// The destination's TLS files (absolute paths), read again at each redrive; absent in
    /// entries stored before TLS settings existed (the system's trust store then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
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
    /// The first KiB (lossy UTF-8) of the last attempt's response body; `None` when that
    /// attempt got no response or an empty body.
    pub last_response_body: Option<String>,
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
    /// The first KiB of the last attempt's response body (see [`NewDeadLetter`]); absent in
    /// entries stored before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_response_body: Option<String>,
    /// Unix ms when the entry was first stored.
    pub stored_at_ms: i64,
    /// Unix ms of the last change (put or update).
    pub updated_at_ms: i64,
}

impl DeadLetter {
    /// The payload as a JSON value (a string when it is not valid JSON).
    pub fn payload_json(&self) -> serde_json::Value {
        payload_json(&self.payload)
    }

    /// The `dead-letters list` object (SPEC §5): `destination`, `profile`, `attempts`,
    /// `lastStatus`, `lastError`, `lastResponseBody` (`null` when none), `payload`, then `entry` (the id `redrive --entry` and
    /// `purge --entry` take), `idempotencyKey`, `firstFailedAt` (when it was stored) and
    /// `lastFailedAt` (its last failed delivery or redrive), RFC 3339 UTC, in that order.
    pub fn list_json(&self) -> serde_json::Value {
        let mut v = list_json(
            &self.destination.id,
            &self.profile,
            self.attempts,
            self.last_status,
            &self.last_error,
            self.last_response_body.as_deref(),
            &self.payload,
        );
        if let Some(obj) = v.as_object_mut() {
            obj.insert("entry".into(), self.id.into());
            obj.insert("idempotencyKey".into(), self.idempotency_key.clone().into());
            obj.insert("firstFailedAt".into(), rfc3339(self.stored_at_ms).into());
            obj.insert("lastFailedAt".into(), rfc3339(self.updated_at_ms).into());
        }
        v
    }
}

/// Unix ms as RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Which entries `dead-letters redrive|purge` act on: all conditions that are set must hold
/// (`entries` empty means any id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub destination: Option<String>,
    /// Entry ids; an entry matches when its id is one of them.
    pub entries: Vec<u64>,
    /// `"namespace:id"`.
    pub profile: Option<String>,
}

impl DeadLetterFilter {
    /// Only a destination (or nothing).
    pub fn destination(destination: Option<&str>) -> DeadLetterFilter {
        DeadLetterFilter {
            destination: destination.map(str::to_string),
            ..DeadLetterFilter::default()
        }
    }

    /// `true` when it matches every entry.
    pub fn is_empty(&self) -> bool {
        self.destination.is_none() && self.entries.is_empty() && self.profile.is_none()
    }

    pub fn matches(&self, entry: &DeadLetter) -> bool {
        self.destination
            .as_deref()
            .is_none_or(|d| entry.destination.id == d)
            && (self.entries.is_empty() || self.entries.contains(&entry.id))
            && self.profile.as_deref().is_none_or(|p| entry.profile == p)
    }
}

impl NewDeadLetter {
    /// The same object as [`DeadLetter::list_json`], for an entry that is not (yet) stored.
    pub fn list_json(&self) -> serde_json::Value {
        list_json(
            &self.destination.id,
            &self.profile,
            self.attempts,
            self.last_status,
            &self.last_error,
            self.last_response_body.as_deref(),
            &self.payload,
        )
    }
}

fn payload_json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    })
}

fn list_json(
    destination: &str,
    profile: &str,
    attempts: u32,
    last_status: Option<u16>,
    last_error: &str,
    last_response_body: Option<&str>,
    payload: &[u8],
) -> serde_json::Value {
    serde_json::json!({
        "destination": destination,
        "profile": profile,
        "attempts": attempts,
        "lastStatus": last_status,
        "lastError": last_error,
        "lastResponseBody": last_response_body,
        "payload": payload_json(payload),
    })
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
    #[error("data directory {path} does not exist (no dead-letter store there)")]
    NoDataDir { path: PathBuf },
    #[error("data directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "dead-letter store {path}: the log has corrupt records and a copy of it could not be \
         kept as {copy} before rewriting it: {source}"
    )]
    Preserve {
        path: PathBuf,
        copy: PathBuf,
        source: io::Error,
    },
    #[error("dead-letter store: cannot encode a record: {0}")]
    Encode(#[source] serde_json::Error),
}

/// [`DeadLetterStore::put_batch`] failed: `stored` (a prefix of the batch, possibly empty) is
/// in the store, the other entries are not.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} of the batch stored)", stored.len())]
pub struct PartialBatch {
    pub stored: Vec<DeadLetter>,
    #[source]
    pub error: StoreError,
}

/// A stretch of the log that is not an intact frame, found when the log was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset in the log of the first skipped byte.
    pub offset: u64,
    /// How many bytes were skipped (up to the next intact frame or the end of the file).
    pub bytes: u64,
    pub kind: DamageKind,
    /// What was wrong with the frame at `offset`.
    pub reason: &'static str,
}

/// See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Records were lost: reported, skipped, kept in a copy when the log is rewritten.
    Corrupt,
    /// An incomplete last frame: an interrupted, never acknowledged append.
    TornTail,
}

impl Damage {
    pub fn is_corrupt(&self) -> bool {
        self.kind == DamageKind::Corrupt
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DamageKind::Corrupt => write!(
                f,
                "corrupt record at byte offset {} ({}; {} bytes skipped)",
                self.offset, self.reason, self.bytes
            ),
            DamageKind::TornTail => write!(
                f,
                "incomplete last record at byte offset {} ({}; {} bytes ignored)",
                self.offset, self.reason, self.bytes
            ),
        }
    }
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
        /// Absent in updates written before response bodies were kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_response_body: Option<String>,
        updated_at_ms: i64,
    },
    Remove {
        id: u64,
    },
}

struct Inner {
    /// `None` for a read-only store. Positioned at the end of the log.
    file: Option<File>,
    /// Held for the store's lifetime (the `flock` goes with it).
    _lock: Option<File>,
    entries: BTreeMap<u64, DeadLetter>,
    next_id: u64,
    /// Length of the log (where the next append goes, unless `tail_dirty`).
    len: u64,
    /// Bytes of the frames of live entries (their puts and updates).
    live_bytes: u64,
    /// Per live entry, the bytes of its frames.
    frame_sizes: BTreeMap<u64, u64>,
    /// What reading the log skipped.
    damage: Vec<Damage>,
    /// Where the corrupt original was kept when the log was rewritten on open.
    preserved: Option<PathBuf>,
    /// An append failed and may have left a partial frame: rewrite before appending again.
    tail_dirty: bool,
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
    /// Opens the store in `dir` for reading and writing, creating the directory and the log
    /// when missing. Fails with [`StoreError::Locked`] while another process has it open.
    /// A log with damage is rewritten clean (see the module documentation).
    pub fn open(dir: impl AsRef<Path>) -> Result<DeadLetterStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        create_private_dir(&dir)?;
        Self::open_writer(dir)
    }

    /// [`Self::open`], but the directory must exist ([`StoreError::NoDataDir`] otherwise);
    /// a directory without a log is an empty store.
    pub fn open_existing(dir: impl AsRef<Path>) -> Result<DeadLetterStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        require_dir(&dir)?;
        Self::open_writer(dir)
    }

    fn open_writer(dir: PathBuf) -> Result<DeadLetterStore, StoreError> {
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
        let (mut inner, data) = match read_log(&path)? {
            // New, or torn while its header was written: nothing in it. Created by a rewrite.
            None => (empty_inner(), None),
            Some(data) => (parse_log(&path, &data)?, Some(data)),
        };
        inner._lock = Some(lock);
        report_damage(&path, &inner.damage);
        if let Some(data) = &data
            && inner.damage.iter().any(Damage::is_corrupt)
        {
            // Before anything replaces the log: its corrupt bytes are never deleted.
            let copy = preserve_copy(&dir, &path, data)?;
            tracing::error!(
                path = %path.display(),
                copy = %copy.display(),
                entries = inner.entries.len(),
                "the dead-letter log has corrupt records: kept the original as the copy; the log \
                 is rewritten with the intact entries"
            );
            inner.preserved = Some(copy);
        }
        if data.is_some() {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let end = file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
            // Damage, or grown since it was read (impossible under the lock): never append
            // behind it, rewrite first.
            inner.tail_dirty = !inner.damage.is_empty() || end != inner.len;
            inner.file = Some(file);
        }
        let store = DeadLetterStore {
            dir,
            inner: Mutex::new(inner),
        };
        {
            let mut inner = store.lock();
            if data.is_none() {
                // A new log, created whole by the rename.
                store.compact_locked(&mut inner)?;
            } else if inner.tail_dirty || needs_compaction(&inner) {
                // On a full disk the rewrite waits: the log stays as it is (readable, never
                // modified in place) and every append first retries the rewrite.
                if let Err(error) = store.compact_locked(&mut inner) {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "could not rewrite the dead-letter log now; it is left as it is and \
                         rewritten before the next write"
                    );
                }
            }
        }
        Ok(store)
    }

    /// Opens the store for reading only: no lock, nothing written. The directory must exist
    /// ([`StoreError::NoDataDir`] otherwise); a directory without a log is an empty store.
    /// Damage is logged and returned by [`Self::damage`].
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<DeadLetterStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        require_dir(&dir)?;
        let path = dir.join(LOG_FILE);
        let inner = match read_log(&path)? {
            None => empty_inner(),
            Some(data) => {
                let inner = parse_log(&path, &data)?;
                report_damage(&path, &inner.damage);
                inner
            }
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

    /// The log file, `deadletters.log` in [`Self::dir`].
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// What reading the log on open skipped (empty for an intact log), in file order.
    pub fn damage(&self) -> Vec<Damage> {
        self.lock().damage.clone()
    }

    /// Where the corrupt original log was kept when [`Self::open`] rewrote it.
    pub fn preserved_copy(&self) -> Option<PathBuf> {
        self.lock().preserved.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory index consistent with the log
        // (appends update it only after the fsync), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an entry durably and returns it with its id.
    pub fn put(&self, letter: NewDeadLetter) -> Result<DeadLetter, StoreError> {
        let mut entries = self
            .put_batch(vec![letter])
            .map_err(|partial| partial.error)?;
        entries
            .pop()
            .ok_or_else(|| StoreError::Encode(serde::ser::Error::custom("empty batch")))
    }

    /// Stores several entries with one write and one `fsync` (group commit). On failure
    /// ([`PartialBatch`]) the entries whose frames were written whole before the write
    /// failed, and then `fsync`ed, are stored — a prefix, possibly empty — and the others are
    /// not: what is acknowledged is exactly what a reader of the log finds.
    pub fn put_batch(&self, letters: Vec<NewDeadLetter>) -> Result<Vec<DeadLetter>, PartialBatch> {
        let failed = |error| PartialBatch {
            stored: Vec::new(),
            error,
        };
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let now = now_ms();
        let mut id = inner.next_id;
        let mut frames = Vec::new();
        let mut ends = Vec::with_capacity(letters.len());
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
                last_response_body: letter.last_response_body,
                stored_at_ms: now,
                updated_at_ms: now,
            };
            let before = frames.len();
            encode_frame_into(&Record::Put(Box::new(entry.clone())), &mut frames)
                .map_err(failed)?;
            ends.push(frames.len());
            stored.push((entry, (frames.len() - before) as u64));
            id += 1;
        }
        let (complete, error) = match self.append(&mut inner, &frames, &ends) {
            Ok(_) => (stored.len(), None),
            Err((complete, error)) => (complete, Some(error)),
        };
        stored.truncate(complete);
        // Ids of frames that may be in a torn tail are not given out again.
        inner.next_id = id;
        let mut out = Vec::with_capacity(stored.len());
        for (entry, size) in stored {
            inner.live_bytes += size;
            inner.frame_sizes.insert(entry.id, size);
            inner.entries.insert(entry.id, entry.clone());
            out.push(entry);
        }
        match error {
            None => Ok(out),
            Some(error) => Err(PartialBatch { stored: out, error }),
        }
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

    /// The entries that `filter` matches, oldest first.
    pub fn list_matching(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        let inner = self.lock();
        inner
            .entries
            .values()
            .filter(|e| filter.matches(e))
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

    /// Records a failed redrive: the new attempt total and the last status, error and
    /// response body. Returns `false` when no such entry exists.
    pub fn update(
        &self,
        id: u64,
        attempts: u32,
        last_status: Option<u16>,
        last_error: &str,
        last_response_body: Option<&str>,
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
            last_response_body: last_response_body.map(str::to_string),
            updated_at_ms,
        };
        let size = self.append_record(&mut inner, &record)?;
        if let Some(e) = inner.entries.get_mut(&id) {
            e.attempts = attempts;
            e.last_status = last_status;
            e.last_error = last_error.to_string();
            e.last_response_body = last_response_body.map(str::to_string);
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

    /// Removes the entries `filter` matches (`dead-letters purge`): their `remove` records
    /// are appended with one `fsync`, then the log is rewritten without them (compaction),
    /// so the purged payloads and settings leave the disk. Returns how many were removed.
    /// When the append fails part-way, the removes written whole are durable and applied,
    /// and the error is returned; when only the compaction fails, the removal stands (the
    /// next compaction drops the records) and the error is returned.
    pub fn purge(&self, filter: &DeadLetterFilter) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        if inner.file.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.log_path(),
            });
        }
        let ids: Vec<u64> = inner
            .entries
            .values()
            .filter(|e| filter.matches(e))
            .map(|e| e.id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut frames = Vec::new();
        let mut ends = Vec::with_capacity(ids.len());
        for id in &ids {
            encode_frame_into(&Record::Remove { id: *id }, &mut frames)?;
            ends.push(frames.len());
        }
        let (done, error) = match self.append(&mut inner, &frames, &ends) {
            Ok(_) => (ids.len(), None),
            Err((done, error)) => (done, Some(error)),
        };
        for id in &ids[..done] {
            inner.entries.remove(id);
            if let Some(size) = inner.frame_sizes.remove(id) {
                inner.live_bytes = inner.live_bytes.saturating_sub(size);
            }
        }
        if let Some(error) = error {
            return Err(error);
        }
        self.compact_locked(&mut inner)?;
        Ok(done)
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

    fn append_record(&self, inner: &mut Inner, record: &Record) -> Result<u64, StoreError> {
        let frame = encode_frame(record)?;
        self.append(inner, &frame, &[frame.len()])
            .map_err(|(_, error)| error)
    }

    /// Appends whole frames (frame `i` ends at `ends[i]` in `frames`) and fsyncs. A failure
    /// leaves the log as it is — never cut back in place — and marks it for a rewrite before
    /// the next append; it returns how many frames were nevertheless written whole and made
    /// durable (then part of the log), with the error.
    fn append(
        &self,
        inner: &mut Inner,
        frames: &[u8],
        ends: &[usize],
    ) -> Result<u64, (usize, StoreError)> {
        let path = self.log_path();
        if inner.file.is_none() {
            return Err((0, StoreError::ReadOnly { path }));
        }
        if inner.tail_dirty {
            self.compact_locked(inner).map_err(|e| (0, e))?;
        }
        let Some(file) = inner.file.as_mut() else {
            return Err((0, StoreError::ReadOnly { path }));
        };
        let mut written = 0;
        let failure = loop {
            if written == frames.len() {
                break None;
            }
            match file.write(&frames[written..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        let Some(error) = failure else {
            if let Err(e) = file.sync_data() {
                // Nothing is acknowledged; the next append rewrites the log from memory.
                inner.tail_dirty = true;
                return Err((0, io_err(&path)(e)));
            }
            inner.len += frames.len() as u64;
            return Ok(frames.len() as u64);
        };
        // A full disk or a file-size limit: the frames before the failure point are whole.
        // They are in the log now; made durable, they are stored. The rest of the last one
        // is a torn tail, replaced by the rewrite before the next append.
        inner.tail_dirty = true;
        let complete = ends.iter().take_while(|end| **end <= written).count();
        if complete > 0 && file.sync_data().is_ok() {
            inner.len += ends[complete - 1] as u64;
            return Err((complete, io_err(&path)(error)));
        }
        Err((0, io_err(&path)(error)))
    }

    /// Rewrites the log from the entries in memory: temporary file, `fsync`, rename over the
    /// log, directory `fsync`. The old log is never modified.
    fn compact_locked(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let path = self.log_path();
        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(MAGIC);
        let mut sizes = BTreeMap::new();
        for entry in inner.entries.values() {
            let before = buf.len();
            encode_frame_into(&Record::Put(Box::new(entry.clone())), &mut buf)?;
            sizes.insert(entry.id, (buf.len() - before) as u64);
        }
        let file = match write_synced(&tmp, &buf) {
            Ok(file) => file,
            Err(e) => {
                // Free what it took (a full disk), leave the log alone.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        // The handle on the temporary file is now the log's, positioned at its end.
        let len = buf.len() as u64;
        inner.file = Some(file);
        inner.len = len;
        inner.tail_dirty = false;
        inner.live_bytes = sizes.values().sum();
        inner.frame_sizes = sizes;
        sync_dir(&self.dir)?;
        tracing::debug!(path = %path.display(), bytes = len, entries = inner.entries.len(), "rewrote the dead-letter log");
        Ok(())
    }
}

/// Creates `path` (mode `0600`, replacing a leftover) with `data`, `fsync`ed; the handle is
/// open for reading and writing, positioned at the end.
fn write_synced(path: &Path, data: &[u8]) -> Result<File, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut file = private_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(data).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(file)
}

/// Keeps the log as it is now as `deadletters.log.corrupt-<unix-ms>` (a hard link: no space
/// and no copying; else a copy of `data`, which is its content), durably.
fn preserve_copy(dir: &Path, path: &Path, data: &[u8]) -> Result<PathBuf, StoreError> {
    let stamp = now_ms();
    let mut n = 0u32;
    loop {
        let name = if n == 0 {
            format!("{LOG_FILE}.corrupt-{stamp}")
        } else {
            format!("{LOG_FILE}.corrupt-{stamp}-{n}")
        };
        let copy = dir.join(name);
        let failed = |source: io::Error| StoreError::Preserve {
            path: path.to_path_buf(),
            copy: copy.clone(),
            source,
        };
        match fs::hard_link(path, &copy) {
            Ok(()) => {
                sync_dir(dir)?;
                return Ok(copy);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(failed(e)),
            Err(_) => {
                let written = private_options()
                    .write(true)
                    .create_new(true)
                    .open(&copy)
                    .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()));
                match written {
                    Ok(()) => {
                        sync_dir(dir)?;
                        return Ok(copy);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::AlreadyExists {
                            let _ = fs::remove_file(&copy);
                        }
                        return Err(failed(e));
                    }
                }
            }
        }
    }
}

fn report_damage(path: &Path, damage: &[Damage]) {
    for d in damage {
        match d.kind {
            DamageKind::Corrupt => tracing::error!(
                path = %path.display(),
                offset = d.offset,
                bytes = d.bytes,
                reason = d.reason,
                "corrupt record in the dead-letter log skipped; the intact records before and after it are kept"
            ),
            DamageKind::TornTail => tracing::warn!(
                path = %path.display(),
                offset = d.offset,
                bytes = d.bytes,
                "ignoring an incomplete last record in the dead-letter log (an interrupted append)"
            ),
        }
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
        damage: Vec::new(),
        preserved: None,
        tail_dirty: false,
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

/// The log's bytes; `None` when there is no log or it holds only a prefix of the header
/// (torn while it was created): an empty store.
fn read_log(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(data) if data.len() < MAGIC.len() && MAGIC.starts_with(&data) => Ok(None),
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Why the bytes at an offset are not an intact frame.
struct BadFrame {
    reason: &'static str,
    /// The frame is cut short by the end of the file.
    incomplete: bool,
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

/// The intact frame at `pos` (`pos < data.len()`): its record and size.
fn frame_at(data: &[u8], pos: usize) -> Result<(Record, usize), BadFrame> {
    let rest = &data[pos..];
    if rest.len() < FRAME_HEADER {
        return Err(BadFrame {
            reason: "frame header cut short",
            incomplete: true,
        });
    }
    let len = u32_at(rest, 0);
    let crc = u32_at(rest, 4);
    if !(MIN_RECORD..=MAX_RECORD).contains(&len) {
        return Err(BadFrame {
            reason: "implausible record length",
            incomplete: false,
        });
    }
    let len = len as usize;
    if rest.len() - FRAME_HEADER < len {
        return Err(BadFrame {
            reason: "record length runs past the end of the file",
            incomplete: true,
        });
    }
    let body = &rest[FRAME_HEADER..FRAME_HEADER + len];
    if crc32fast::hash(body) != crc {
        return Err(BadFrame {
            reason: "checksum mismatch",
            incomplete: false,
        });
    }
    match serde_json::from_slice(body) {
        Ok(record) => Ok((record, FRAME_HEADER + len)),
        Err(_) => Err(BadFrame {
            reason: "undecodable record",
            incomplete: false,
        }),
    }
}

/// The first offset at or after `from` where an intact frame starts (module documentation).
fn resync(data: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + FRAME_HEADER + MIN_RECORD as usize <= data.len() {
        let len = u32_at(data, at);
        if (MIN_RECORD..=MAX_RECORD).contains(&len)
            && data.len() - at - FRAME_HEADER >= len as usize
            && data[at + FRAME_HEADER] == b'{'
            && frame_at(data, at).is_ok()
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Reads the log: every intact frame applied, every stretch between them a [`Damage`].
fn parse_log(path: &Path, data: &[u8]) -> Result<Inner, StoreError> {
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(StoreError::BadHeader {
            path: path.to_path_buf(),
        });
    }
    let mut inner = empty_inner();
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let bad = match frame_at(data, pos) {
            Ok((record, size)) => {
                apply(&mut inner, record, size as u64);
                pos += size;
                continue;
            }
            Err(bad) => bad,
        };
        if let Some(next) = resync(data, pos + 1) {
            inner.damage.push(Damage {
                offset: pos as u64,
                bytes: (next - pos) as u64,
                kind: DamageKind::Corrupt,
                reason: bad.reason,
            });
            pos = next;
            continue;
        }
        let tail = &data[pos..];
        // A torn append leaves a prefix of a frame (or, on some file systems, zeros). A body
        // that is a whole record is not a prefix: its length field is what was damaged.
        let whole_body = tail.len() > FRAME_HEADER
            && serde_json::from_slice::<Record>(&tail[FRAME_HEADER..]).is_ok();
        let torn = (bad.incomplete && !whole_body) || tail.iter().all(|b| *b == 0);
        inner.damage.push(Damage {
            offset: pos as u64,
            bytes: tail.len() as u64,
            kind: if torn {
                DamageKind::TornTail
            } else {
                DamageKind::Corrupt
            },
            reason: if torn {
                "an interrupted append"
            } else {
                bad.reason
            },
        });
        break;
    }
    inner.len = data.len() as u64;
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
            last_response_body,
            updated_at_ms,
        } => {
            if let Some(e) = inner.entries.get_mut(&id) {
                e.attempts = attempts;
                e.last_status = last_status;
                e.last_error = last_error;
                e.last_response_body = last_response_body;
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

/// `dir` must be an existing directory.
fn require_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(StoreError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NoDataDir {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(io_err(dir)(e)),
    }
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
            tls: None,
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
            last_response_body: None,
        }
    }

    #[test]
    fn tls_settings_are_kept_and_old_entries_without_them_still_load() {
        // As stored before destinations had TLS settings.
        let old = r#"{"id":"d1","requestUrl":"https://x/","headers":[],"auth":{"type":"none"},
                      "delivery":{"maxRetries":2,"timeoutMs":2000,"maxInFlight":256,
                                  "retryOn":[503]}}"#;
        let settings: DestinationSettings = serde_json::from_str(old).unwrap();
        assert_eq!(settings.tls, None);
        // No `tls` key is written for a destination without TLS settings.
        assert!(
            serde_json::to_value(&settings)
                .unwrap()
                .get("tls")
                .is_none()
        );
        let with_tls = DestinationSettings {
            tls: Some(Tls {
                ca_file: Some("/etc/x/ca.pem".into()),
                client_cert_file: None,
                client_key_file: None,
            }),
            ..settings
        };
        let json = serde_json::to_value(&with_tls).unwrap();
        assert_eq!(json["tls"], serde_json::json!({"caFile": "/etc/x/ca.pem"}));
        let back: DestinationSettings = serde_json::from_value(json).unwrap();
        assert_eq!(back, with_tls);
    }

    #[test]
    fn put_list_remove_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetterStore::open(dir.path()).unwrap();
        let a = store.put(letter("email:a")).unwrap();
        let b = store.put(letter("email:b")).unwrap();
        assert!(b.id > a.id);
        assert!(store.update(b.id, 6, None, "timeout", None).unwrap());
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

    /// The byte ranges of the frames of an intact log.
    fn frames(path: &Path) -> Vec<(usize, usize)> {
        let data = fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut pos = MAGIC.len();
        while pos < data.len() {
            let end = pos + FRAME_HEADER + u32_at(&data, pos) as usize;
            out.push((pos, end));
            pos = end;
        }
        out
    }

    fn profiles(store: &DeadLetterStore) -> Vec<String> {
        store.list(None).into_iter().map(|e| e.profile).collect()
    }

    fn corrupt_copies(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("deadletters.log.corrupt-")
            })
            .count()
    }

    fn five(dir: &Path) -> Vec<(usize, usize)> {
        let store = DeadLetterStore::open(dir).unwrap();
        for p in ["p:1", "p:2", "p:3", "p:4", "p:5"] {
            store.put(letter(p)).unwrap();
        }
        drop(store);
        frames(&dir.join(LOG_FILE))
    }

    #[test]
    fn a_corrupt_record_costs_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let frames = five(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        data[frames[2].0 + FRAME_HEADER + 5] ^= 0x08;
        fs::write(&path, &data).unwrap();
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert_eq!(profiles(&ro), ["p:1", "p:2", "p:4", "p:5"]);
        assert_eq!(
            ro.damage(),
            [Damage {
                offset: frames[2].0 as u64,
                bytes: (frames[2].1 - frames[2].0) as u64,
                kind: DamageKind::Corrupt,
                reason: "checksum mismatch",
            }]
        );
        assert_eq!(fs::read(&path).unwrap(), data, "a reader writes nothing");
    }

    #[test]
    fn implausible_lengths_resynchronise_too() {
        for (at, mask, reason) in [
            (3, 0x80, "implausible record length"),
            (2, 0x01, "checksum mismatch"),
            (0, 0xff, "checksum mismatch"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let frames = five(dir.path());
            let path = dir.path().join(LOG_FILE);
            let mut data = fs::read(&path).unwrap();
            data[frames[1].0 + at] ^= mask;
            fs::write(&path, &data).unwrap();
            let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
            assert_eq!(profiles(&ro), ["p:1", "p:3", "p:4", "p:5"], "byte {at}");
            let damage = ro.damage();
            assert_eq!(damage.len(), 1, "{damage:?}");
            assert_eq!(damage[0].offset, frames[1].0 as u64);
            assert!(damage[0].is_corrupt());
            // A length grown past the next frame makes the checksum fail; one past the end
            // of the file says so.
            assert!(
                damage[0].reason == reason
                    || damage[0].reason == "record length runs past the end of the file",
                "byte {at}: {damage:?}"
            );
        }
    }

    #[test]
    fn a_torn_tail_is_dropped_by_a_rename_without_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let frames = five(dir.path());
        let path = dir.path().join(LOG_FILE);
        let data = fs::read(&path).unwrap();
        // An append cut short: the first half of a copy of the last frame.
        let (start, end) = frames[4];
        let mut torn = data.clone();
        torn.extend_from_slice(&data[start..start + (end - start) / 2]);
        fs::write(&path, &torn).unwrap();
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.len(), 5);
        let damage = ro.damage();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].kind, DamageKind::TornTail);
        assert_eq!(damage[0].offset, data.len() as u64);

        let store = DeadLetterStore::open(dir.path()).unwrap();
        assert_eq!(
            corrupt_copies(dir.path()),
            0,
            "a torn tail is not corruption"
        );
        assert_eq!(fs::read(&path).unwrap(), data, "rewritten without the tail");
        store.put(letter("p:6")).unwrap();
        drop(store);
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert!(ro.damage().is_empty());
        assert_eq!(ro.len(), 6);
    }

    #[test]
    fn zeros_at_the_end_are_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        five(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        data.extend_from_slice(&[0; 4096]);
        fs::write(&path, &data).unwrap();
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.len(), 5);
        assert_eq!(ro.damage()[0].kind, DamageKind::TornTail);
    }

    #[test]
    fn a_damaged_length_on_the_last_record_is_corruption_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let frames = five(dir.path());
        let path = dir.path().join(LOG_FILE);
        let mut data = fs::read(&path).unwrap();
        // The length now runs past the end of the file, but the body is a whole record.
        data[frames[4].0 + 1] ^= 0x10;
        fs::write(&path, &data).unwrap();
        let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.len(), 4);
        assert!(ro.damage()[0].is_corrupt(), "{:?}", ro.damage());
        drop(ro);
        let store = DeadLetterStore::open(dir.path()).unwrap();
        let copy = store.preserved_copy().expect("a copy");
        assert_eq!(fs::read(copy).unwrap(), data);
        assert_eq!(store.len(), 4);
    }

    #[test]
    fn a_log_torn_while_it_was_created_is_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        fs::write(&path, &MAGIC[..3]).unwrap();
        assert!(
            DeadLetterStore::open_read_only(dir.path())
                .unwrap()
                .is_empty()
        );
        let store = DeadLetterStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        assert_eq!(fs::read(&path).unwrap(), MAGIC);
        store.put(letter("p:1")).unwrap();
        drop(store);
        assert_eq!(DeadLetterStore::open(dir.path()).unwrap().len(), 1);
        // Not a prefix of the header: refused, not replaced.
        fs::write(&path, b"SDX").unwrap();
        assert!(matches!(
            DeadLetterStore::open(dir.path()),
            Err(StoreError::BadHeader { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"SDX");
    }

    #[test]
    fn missing_data_dirs_are_errors_except_for_open() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = DeadLetterStore::open_read_only(&missing).unwrap_err();
        assert!(matches!(err, StoreError::NoDataDir { .. }), "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(matches!(
            DeadLetterStore::open_existing(&missing),
            Err(StoreError::NoDataDir { .. })
        ));
        assert!(!missing.exists());
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            DeadLetterStore::open_read_only(&file),
            Err(StoreError::NotADirectory { .. })
        ));
        DeadLetterStore::open(&missing).unwrap();
        assert!(missing.is_dir());
        assert!(DeadLetterStore::open_existing(&missing).unwrap().is_empty());
    }
}
