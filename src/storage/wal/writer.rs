//! The writer thread: group commit (see the module documentation of [`super`]).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use super::segment::{self, HEADER_LEN};
use super::{Shared, WalError, io_err, lock, sync_dir};

pub(super) type AppendResult = Result<Range<u64>, WalError>;

/// Where the writer sends a call's result.
pub(super) enum Reply {
    Blocking(mpsc::SyncSender<AppendResult>),
    Async(tokio::sync::oneshot::Sender<AppendResult>),
}

impl Reply {
    fn send(self, result: AppendResult) {
        // A caller that stopped waiting (a dropped future) is no error: its records are
        // durable or not all the same.
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// One `append` call.
pub(super) struct Request {
    pub records: Vec<Vec<u8>>,
    pub reply: Reply,
}

/// What callers hand the writer, under [`Shared::queue`].
#[derive(Default)]
pub(super) struct Queue {
    pub pending: Vec<Request>,
    /// Set when the [`super::Wal`] is dropped: the writer finishes what is pending and exits.
    pub closing: bool,
}

pub(super) struct Writer {
    pub shared: Arc<Shared>,
    /// The current (last) segment, written with positioned writes at `len`.
    pub file: File,
    pub path: PathBuf,
    /// Bytes of the current segment that are written and `fsync`ed.
    pub len: u64,
    /// The position of the next record.
    pub next: u64,
    pub segment_bytes: u64,
    /// Set after a failure that leaves the file in an unknown state: every later call fails.
    pub failed: Option<WalError>,
    /// Frames of the chunk being committed.
    pub buf: Vec<u8>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let _close = CloseOnExit(Arc::clone(&self.shared));
        loop {
            let batch = {
                let mut q = lock(&self.shared.queue);
                while q.pending.is_empty() && !q.closing {
                    q = self
                        .shared
                        .wake
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if q.pending.is_empty() {
                    return;
                }
                #[cfg(test)]
                {
                    let delay = self.shared.test_commit_delay_ms.load(Ordering::Relaxed);
                    if delay > 0 {
                        drop(q);
                        std::thread::sleep(std::time::Duration::from_millis(delay));
                        q = lock(&self.shared.queue);
                    }
                }
                std::mem::take(&mut q.pending)
            };
            self.commit(batch);
        }
    }

    /// Writes a group: the calls in order, each call's frames contiguous; one `fsync` per
    /// segment touched; then completes every call.
    fn commit(&mut self, batch: Vec<Request>) {
        let mut chunk: Vec<(Reply, Range<u64>)> = Vec::with_capacity(batch.len());
        self.buf.clear();
        let mut next = self.next;
        let mut requests = batch.into_iter();
        while let Some(request) = requests.next() {
            if let Some(cause) = &self.failed {
                let err = self.failed_error(cause);
                fail_all(chunk.drain(..).map(|(reply, _)| reply), &err);
                request.reply.send(Err(err.clone()));
                fail_all(requests.map(|r| r.reply), &err);
                return;
            }
            let buffered = self.buf.len() as u64;
            let has_records = self.len > HEADER_LEN || buffered > 0;
            if !request.records.is_empty()
                && has_records
                && self.len + buffered >= self.segment_bytes
            {
                let step = self.flush(&mut chunk, next).and_then(|()| self.roll());
                if let Err(err) = step {
                    request.reply.send(Err(err.clone()));
                    fail_all(requests.map(|r| r.reply), &err);
                    return;
                }
            }
            let n = request.records.len() as u64;
            for body in &request.records {
                segment::encode_frame(&mut self.buf, body);
            }
            chunk.push((request.reply, next..next + n));
            next += n;
        }
        // The error has gone to every call of the chunk.
        let _ = self.flush(&mut chunk, next);
    }

    fn failed_error(&self, cause: &WalError) -> WalError {
        WalError::Failed {
            dir: self.shared.dir.clone(),
            cause: Arc::new(cause.clone()),
        }
    }

    /// Writes and `fsync`s the buffered frames, then completes the calls of `chunk` (whose
    /// records end before `next`): all with their ranges, or all with the error.
    fn flush(&mut self, chunk: &mut Vec<(Reply, Range<u64>)>, next: u64) -> Result<(), WalError> {
        if !self.buf.is_empty() {
            if let Err(e) = self.file.write_all_at(&self.buf, self.len) {
                let err = io_err(&self.path)(e);
                tracing::error!(segment = %self.path.display(), offset = self.len, error = %err, "write-ahead log: append failed");
                // Nothing of the chunk was acknowledged: cut what may have been written, so
                // the next append does not go behind a partial frame.
                if let Err(e) = self.file.set_len(self.len) {
                    let cut = io_err(&self.path)(e);
                    tracing::error!(segment = %self.path.display(), offset = self.len, error = %cut, "write-ahead log: cannot cut a failed append; no further appends");
                    self.failed = Some(cut);
                }
                self.buf.clear();
                fail_all(chunk.drain(..).map(|(reply, _)| reply), &err);
                return Err(err);
            }
            if let Err(e) = self.file.sync_data() {
                let err = io_err(&self.path)(e);
                tracing::error!(segment = %self.path.display(), error = %err, "write-ahead log: fsync failed; no further appends");
                // After a failed fsync the kernel may have dropped the dirty pages: retrying
                // could report success for data that never reached the disk.
                self.failed = Some(err.clone());
                self.buf.clear();
                fail_all(chunk.drain(..).map(|(reply, _)| reply), &err);
                return Err(err);
            }
            let written = self.buf.len() as u64;
            self.len += written;
            self.buf.clear();
            self.shared.syncs.fetch_add(1, Ordering::Relaxed);
            self.shared.disk_bytes.fetch_add(written, Ordering::Relaxed);
        }
        self.next = next;
        self.shared.next.store(next, Ordering::Release);
        for (reply, range) in chunk.drain(..) {
            reply.send(Ok(range));
        }
        Ok(())
    }

    /// Starts a new segment at `self.next` (the current one is `fsync`ed and complete).
    fn roll(&mut self) -> Result<(), WalError> {
        let base = self.next;
        let path = self.shared.dir.join(segment::file_name(base));
        let file = segment::create(&path, base)?;
        sync_dir(&self.shared.dir)?;
        {
            let mut segments = lock(&self.shared.segments);
            if let Some(last) = segments.last_mut() {
                last.bytes = self.len;
            }
            segments.push(super::SegmentMeta {
                base,
                path: path.clone(),
                bytes: HEADER_LEN,
            });
        }
        self.shared
            .disk_bytes
            .fetch_add(HEADER_LEN, Ordering::Relaxed);
        tracing::debug!(segment = %path.display(), "write-ahead log: new segment");
        self.file = file;
        self.path = path;
        self.len = HEADER_LEN;
        Ok(())
    }
}

/// However the writer ends (a panic included), later calls fail with [`WalError::Closed`]
/// rather than wait forever: the queue is closed and what is pending is dropped.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let pending = {
            let mut q = lock(&self.0.queue);
            q.closing = true;
            std::mem::take(&mut q.pending)
        };
        drop(pending);
    }
}

fn fail_all(replies: impl Iterator<Item = Reply>, err: &WalError) {
    for reply in replies {
        reply.send(Err(err.clone()));
    }
}
