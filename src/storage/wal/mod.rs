//! The write-ahead log: every accepted event batch and control change is appended and
//! `fsync`ed before it is acknowledged, and read back at start to rebuild the state (SPEC §7,
//! issue #7).
//!
//! Records are opaque byte bodies (the caller encodes them). Each gets a **position**: a
//! `u64`, dense (0, 1, 2, … across segments), in the order the writer took the calls.
//!
//! # On disk
//!
//! A directory (the caller's, e.g. `<data-dir>/wal`; created with mode `0700` if missing) of
//! **segments**, each named by the position of its first record, zero-padded to 20 digits:
//! `00000000000000000000.wal`, `00000000000000001742.wal`, … (mode `0600`: records may hold
//! configuration with literal secrets). A segment is a 16-byte header — the magic
//! `SDWAL\0\0\x01` and its first position (`u64` LE, checked against the name) — followed by
//! frames `[len: u32 LE][crc32(body): u32 LE][body]`, one per record, `1 ..= MAX_RECORD`
//! bytes of body (an empty body is refused: a zero length is what a zero-filled tail looks
//! like). Other files in the directory are ignored, except `wal.lock`: one process at a time
//! opens the log (an exclusive `flock`; a second open gets [`WalError::Locked`]).
//!
//! A new segment starts when the current one has reached
//! [`WalOptions::segment_bytes`] (default 64 MiB) and holds at least one record; a call's
//! records always go to one segment, so a segment may exceed the limit by one call. The
//! current segment is `fsync`ed before the next is created; the new one is created with its
//! header, `fsync`ed, and the directory is `fsync`ed, before a record goes to it. So only the
//! **last** segment can ever hold an incomplete write.
//!
//! # Group commit
//!
//! [`Wal::append`] (blocking) and [`Wal::append_async`] (a `'static` future, for tokio tasks)
//! queue the call and wait. One writer thread takes **everything queued**, writes the frames
//! with one positioned write, `fsync`s once (`fdatasync`), and only then completes every call
//! of the group with its range of positions: many concurrent callers share one `fsync`
//! ([`Wal::syncs`] counts them). A call's records are contiguous and in call order; calls get
//! positions in the order the writer took them (queue order), so a call that returned before
//! another was made has the lower positions. To give order a meaning beyond that (e.g. "the
//! position is assigned together with the state change"), the caller holds its own mutex
//! around deciding and appending.
//!
//! **Failures.** An I/O error while writing a group is returned to every call of the group
//! (and to the rest of the batch the writer took): none of them was acknowledged. A failed
//! *write* (disk full, file too large) is cut back: the segment is truncated to its last
//! acknowledged byte, so nothing is ever appended behind a partial frame, and later calls are
//! tried again (they fail while the disk stays full). If that truncation fails, or an `fsync`
//! fails (after which the kernel may have dropped the dirty pages, so a retried `fsync` could
//! succeed without the data), the log stops: every later call gets [`WalError::Failed`]
//! naming the first error; reopening it (a restart) recovers by the rules below. Records of a
//! failed call may still reach the disk and be read back after a restart: a duplicate of
//! something the caller was told failed, never a loss of something acknowledged.
//!
//! # Opening: torn tail or corruption
//!
//! [`Wal::open`] reads every segment in order and checks every frame, so a damaged log fails
//! at start rather than half-way through a replay. (It keeps one segment in memory at a time.)
//! The segments must follow each other: each one's first position is the previous one's plus
//! its record count.
//!
//! In the **last** segment, the first frame that does not check out (at offset `o`) is a
//! **torn tail** — an append cut by a crash before its `fsync` returned, hence never
//! acknowledged — when all of these hold:
//!
//! 1. **no intact frame starts at any offset after `o`** (a plausible length within the file
//!    and a matching CRC-32, searched byte by byte; the search gives up after checksumming
//!    1 GiB, and then the frame is reported corrupt). A crash cuts the one group in flight at
//!    its end; acknowledged records behind a bad frame mean the damage is elsewhere.
//! 2. if the frame is **whole** (its length lies within the file) but its CRC fails, it holds
//!    a **zero-filled 512-byte-aligned block** (or the part of one up to the end of the file):
//!    what a crash leaves when the file's new size reached the disk but some of its blocks did
//!    not. A whole frame with a wrong CRC and no such block is a flipped bit, i.e. corruption.
//! 3. if the length is implausible or runs past the end of the file, the rest of the file is
//!    **not** a whole body for the frame's CRC (which would mean a damaged length field).
//!
//! Incomplete headers, bodies cut short, and zero bytes (or other non-frames) to the end of
//! the file thus count as torn. A torn tail is cut — the segment is truncated at `o` and
//! `fsync`ed; the one truncation the log ever makes of records it read, allowed because those
//! bytes were never acknowledged — with a `tracing::warn!` naming the file and the offset,
//! and it is reported in [`Recovery::torn_tail`]. A last segment whose header is incomplete
//! (or zero) is a segment whose creation was cut: its header is rewritten.
//!
//! Anything else is [`WalError::Corrupt`], naming the segment and the byte offset of the bad
//! frame: a bad frame in a segment that is not the last, a bad frame with an intact frame
//! after it, a bad header, segments that do not follow each other. Nothing is skipped,
//! truncated or rewritten; the log refuses to open until someone looks.
//!
//! Limits of the rule, both on the side of refusing rather than guessing except the last: a
//! crash during which the disk persisted a group's blocks out of order (a later frame of the
//! group whole, an earlier one not) is reported as corruption although nothing acknowledged
//! was lost — the operator, knowing the machine lost power, can truncate the named segment at
//! the named offset; and a flipped bit in the very last record, in a body that happens to hold
//! a zero-filled aligned 512-byte block, is cut as a torn tail (with the warning).
//!
//! # Reading
//!
//! [`Wal::read_from`] yields `(position, body)` from a position to the end of the log as it is
//! when called (records appended later are not seen), checking every frame again. It can be
//! used right after [`Wal::open`], before any append, and alongside appends.
//!
//! # Truncation
//!
//! [`Wal::truncate_before`] deletes, oldest first, the whole segments all of whose records
//! lie before a position (a checkpoint's), never the current segment, then `fsync`s the
//! directory. The first remaining segment's name is the log's start: after a restart,
//! [`Wal::first_position`] (and [`Recovery::first_position`]) is that position — at most the
//! position passed, since segments go whole. A reader must not be reading segments that are
//! being deleted.
//!
//! [`Wal::disk_bytes`] is the sum of the segments' sizes, tracked as they change.

mod reader;
mod segment;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;

pub use reader::WalReader;

use segment::{Break, HEADER_LEN, HeaderState};
use writer::{Queue, Reply, Request, Writer};

/// The largest record body; a frame claiming more is taken for corruption.
pub const MAX_RECORD: u32 = 512 * 1024 * 1024;
/// [`WalOptions::segment_bytes`] by default.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const LOCK_FILE: &str = "wal.lock";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// A new segment starts once the current one has reached this size (and holds a record).
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("write-ahead log segment {segment} is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("write-ahead log {dir}: in use by another process")]
    Locked { dir: PathBuf },
    #[error("write-ahead log {dir}: {path} is not a directory")]
    NotADirectory { dir: PathBuf, path: PathBuf },
    #[error("write-ahead log: record {index} of the call is empty (records have 1 byte or more)")]
    EmptyRecord { index: usize },
    #[error("write-ahead log: record {index} of the call has {len} bytes (at most {max})")]
    RecordTooLarge { index: usize, len: usize, max: u32 },
    #[error("write-ahead log {dir}: position {position} was truncated (the log starts at {first})")]
    Truncated {
        dir: PathBuf,
        position: u64,
        first: u64,
    },
    #[error("write-ahead log {dir}: position {position} is past the end ({next})")]
    PastEnd {
        dir: PathBuf,
        position: u64,
        next: u64,
    },
    #[error("write-ahead log {dir}: stopped after an earlier failure: {cause}")]
    Failed {
        dir: PathBuf,
        #[source]
        cause: Arc<WalError>,
    },
    #[error("write-ahead log {dir}: closed")]
    Closed { dir: PathBuf },
}

/// What [`Wal::open`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The position of the first record in the log (the first segment's name).
    pub first_position: u64,
    /// One past the last record: the next append's first position.
    pub next_position: u64,
    pub segments: usize,
    /// The incomplete write that was cut, if any.
    pub torn_tail: Option<TornTail>,
}

/// An incomplete last write, cut at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// Where the segment now ends.
    pub offset: u64,
    /// How many bytes were cut.
    pub bytes: u64,
    pub reason: String,
}

/// A segment as the log knows it (for reading and truncation).
struct SegmentMeta {
    base: u64,
    path: PathBuf,
    /// Its size; kept current by the writer only when the segment is finished (the current
    /// segment is never deleted, so its stale size is never used).
    bytes: u64,
}

/// What the [`Wal`] handle and the writer thread share.
struct Shared {
    dir: PathBuf,
    queue: Mutex<Queue>,
    wake: Condvar,
    next: AtomicU64,
    first: AtomicU64,
    disk_bytes: AtomicU64,
    syncs: AtomicU64,
    segments: Mutex<Vec<SegmentMeta>>,
    /// Tests: the writer waits this long after work arrives before taking the queue.
    #[cfg(test)]
    test_commit_delay_ms: AtomicU64,
}

/// The write-ahead log. `Send + Sync`: share it behind an `Arc`. Dropping it lets the writer
/// finish the calls already queued, then stops it.
pub struct Wal {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// Holds the `flock` on `wal.lock`.
    _lock: File,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .field("next_position", &self.next_position())
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir`: checks every segment, cuts a torn tail, and starts
    /// the writer thread. See the module documentation for what is torn and what is corrupt.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<(Wal, Recovery), WalError> {
        let dir = dir.as_ref().to_path_buf();
        create_private_dir(&dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        try_lock_exclusive(&lock_file, &lock_path, &dir)?;

        let mut found = segment::list(&dir)?;
        if found.is_empty() {
            let path = dir.join(segment::file_name(0));
            drop(segment::create(&path, 0)?);
            sync_dir(&dir)?;
            found.push((0, path));
        }

        let mut metas = Vec::with_capacity(found.len());
        let mut torn_tail = None;
        let mut next = 0;
        let last = found.len() - 1;
        for (i, (base, path)) in found.iter().enumerate() {
            let (base, is_last) = (*base, i == last);
            let corrupt = |offset: u64, reason: String| WalError::Corrupt {
                segment: path.clone(),
                offset,
                reason,
            };
            let mut data = fs::read(path).map_err(io_err(path))?;
            match segment::check_header(&data, base) {
                HeaderState::Ok => {}
                HeaderState::Torn if is_last => {
                    tracing::warn!(segment = %path.display(), bytes = data.len(), "write-ahead log: the last segment's header is incomplete (its creation was cut); rewriting it");
                    torn_tail = Some(TornTail {
                        segment: path.clone(),
                        offset: 0,
                        bytes: data.len() as u64,
                        reason: "incomplete segment header".into(),
                    });
                    drop(segment::create(path, base)?);
                    data = segment::header(base).to_vec();
                }
                HeaderState::Torn => {
                    return Err(corrupt(0, "incomplete or zero segment header".into()));
                }
                HeaderState::Bad(reason) => return Err(corrupt(0, reason)),
            }
            let scan = segment::scan(&data);
            if let Some((offset, err)) = &scan.bad {
                if !is_last {
                    return Err(corrupt(
                        *offset as u64,
                        format!("{err} (in a segment that is not the last)"),
                    ));
                }
                match segment::classify(&data, *offset, err) {
                    Break::Corrupt(reason) => return Err(corrupt(*offset as u64, reason)),
                    Break::Torn => {
                        let cut = (data.len() - offset) as u64;
                        tracing::warn!(segment = %path.display(), offset = *offset, bytes = cut, reason = %err, "write-ahead log: cutting a torn tail (an append interrupted before its fsync, never acknowledged)");
                        let file = OpenOptions::new()
                            .write(true)
                            .open(path)
                            .map_err(io_err(path))?;
                        file.set_len(*offset as u64).map_err(io_err(path))?;
                        file.sync_all().map_err(io_err(path))?;
                        torn_tail = Some(TornTail {
                            segment: path.clone(),
                            offset: *offset as u64,
                            bytes: cut,
                            reason: err.to_string(),
                        });
                    }
                }
            }
            let end = base + scan.records;
            if let Some((following, _)) = found.get(i + 1)
                && *following != end
            {
                return Err(corrupt(
                    scan.valid_end as u64,
                    format!(
                        "the segment holds {} records (positions {base}..{end}) but the next \
                         segment starts at position {following}",
                        scan.records
                    ),
                ));
            }
            next = end;
            metas.push(SegmentMeta {
                base,
                path: path.clone(),
                bytes: scan.valid_end as u64,
            });
        }

        let first = metas.first().map_or(0, |m| m.base);
        let disk_bytes = metas.iter().map(|m| m.bytes).sum();
        let (current_path, current_len) = match metas.last() {
            Some(m) => (m.path.clone(), m.bytes),
            None => (dir.join(segment::file_name(0)), HEADER_LEN),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&current_path)
            .map_err(io_err(&current_path))?;
        let recovery = Recovery {
            first_position: first,
            next_position: next,
            segments: metas.len(),
            torn_tail,
        };
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            next: AtomicU64::new(next),
            first: AtomicU64::new(first),
            disk_bytes: AtomicU64::new(disk_bytes),
            syncs: AtomicU64::new(0),
            segments: Mutex::new(metas),
            #[cfg(test)]
            test_commit_delay_ms: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            file,
            path: current_path,
            len: current_len,
            next,
            segment_bytes: options.segment_bytes,
            failed: None,
            buf: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run())
            .map_err(io_err(&dir))?;
        tracing::debug!(dir = %dir.display(), first, next, segments = recovery.segments, "write-ahead log opened");
        Ok((
            Wal {
                shared,
                writer: Some(handle),
                _lock: lock_file,
            },
            recovery,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends `records` and returns their positions once they are written and `fsync`ed
    /// (sharing the `fsync` with the calls queued meanwhile). Blocks the thread: from async
    /// code use [`Wal::append_async`]. An empty call returns an empty range.
    pub fn append(&self, records: Vec<Vec<u8>>) -> Result<Range<u64>, WalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(records, Reply::Blocking(tx))?;
        rx.recv().map_err(|_| WalError::Closed {
            dir: self.shared.dir.clone(),
        })?
    }

    /// [`Wal::append`] for async code. The call is queued **when this function is called**
    /// (not when the future is first polled), so the order of calls is the order of
    /// `append_async` calls; the future only waits. Dropping the future does not withdraw the
    /// records.
    pub fn append_async(
        &self,
        records: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Range<u64>, WalError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let submitted = self.submit(records, Reply::Async(tx));
        let dir = self.shared.dir.clone();
        async move {
            submitted?;
            rx.await.map_err(|_| WalError::Closed { dir })?
        }
    }

    fn submit(&self, records: Vec<Vec<u8>>, reply: Reply) -> Result<(), WalError> {
        for (index, body) in records.iter().enumerate() {
            if body.is_empty() {
                return Err(WalError::EmptyRecord { index });
            }
            if body.len() > MAX_RECORD as usize {
                return Err(WalError::RecordTooLarge {
                    index,
                    len: body.len(),
                    max: MAX_RECORD,
                });
            }
        }
        let mut queue = lock(&self.shared.queue);
        if queue.closing {
            return Err(WalError::Closed {
                dir: self.shared.dir.clone(),
            });
        }
        queue.pending.push(Request { records, reply });
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// One past the last durable record: the first position of the next call when no call is
    /// in flight (exact for a caller that serialises its appends).
    pub fn next_position(&self) -> u64 {
        self.shared.next.load(Ordering::Acquire)
    }

    /// The position of the first record still in the log (the first segment's name).
    pub fn first_position(&self) -> u64 {
        self.shared.first.load(Ordering::Acquire)
    }

    /// The sum of the segments' sizes in bytes (tracked, not `stat`ed).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// How many `fsync`s of appended records this handle has made: one per group commit, one
    /// more for each segment finished in the middle of a group. (Creating a segment syncs it
    /// and the directory too; those are not counted.)
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// How many segment files the log has.
    pub fn segments(&self) -> usize {
        lock(&self.shared.segments).len()
    }

    /// The records from `position` (at least [`Wal::first_position`], at most
    /// [`Wal::next_position`]) to the current end of the log.
    pub fn read_from(&self, position: u64) -> Result<WalReader, WalError> {
        let segments = lock(&self.shared.segments);
        let first = segments.first().map_or(0, |m| m.base);
        let next = self.next_position();
        if position < first {
            return Err(WalError::Truncated {
                dir: self.shared.dir.clone(),
                position,
                first,
            });
        }
        if position > next {
            return Err(WalError::PastEnd {
                dir: self.shared.dir.clone(),
                position,
                next,
            });
        }
        // The last segment whose first position is at most `position`.
        let from = segments
            .partition_point(|m| m.base <= position)
            .saturating_sub(1);
        let list = segments[from..]
            .iter()
            .map(|m| (m.base, m.path.clone()))
            .collect();
        Ok(WalReader::new(list, position, next))
    }

    /// Deletes the segments all of whose records are before `position` (never the current
    /// one), oldest first, and `fsync`s the directory. Returns the new first position.
    pub fn truncate_before(&self, position: u64) -> Result<u64, WalError> {
        let mut segments = lock(&self.shared.segments);
        let mut removed = 0;
        let mut result = Ok(());
        while segments.len() > 1 && segments[1].base <= position {
            let seg = &segments[0];
            if let Err(e) = fs::remove_file(&seg.path) {
                result = Err(io_err(&seg.path)(e));
                break;
            }
            tracing::debug!(segment = %seg.path.display(), "write-ahead log: deleted a segment behind the checkpoint");
            self.shared
                .disk_bytes
                .fetch_sub(seg.bytes, Ordering::Relaxed);
            segments.remove(0);
            self.shared.first.store(segments[0].base, Ordering::Release);
            removed += 1;
        }
        let first = segments.first().map_or(0, |m| m.base);
        drop(segments);
        if removed > 0 {
            sync_dir(&self.shared.dir)?;
        }
        result.map(|()| first)
    }

    #[cfg(test)]
    fn set_test_commit_delay_ms(&self, ms: u64) {
        self.shared
            .test_commit_delay_ms
            .store(ms, Ordering::Relaxed);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
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

fn create_private_dir(dir: &Path) -> Result<(), WalError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(WalError::NotADirectory {
                dir: dir.to_path_buf(),
                path: dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    #[allow(unused_mut)]
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn try_lock_exclusive(file: &File, path: &Path, dir: &Path) -> Result<(), WalError> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid, open file descriptor owned by `file`; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Err(WalError::Locked {
            dir: dir.to_path_buf(),
        })
    } else {
        Err(io_err(path)(err))
    }
}

#[cfg(test)]
mod tests;
