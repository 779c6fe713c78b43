//! Reading records back (replay at start).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;

use super::segment::{self, FRAME_HEADER};
use super::{MAX_RECORD, WalError, io_err};

/// The records from a position up to the end of the log as it was when the reader was made
/// ([`super::Wal::read_from`]): `(position, body)`, in order. Reads segment by segment
/// through a buffer, checking every frame again. After an error it yields nothing more.
pub struct WalReader {
    /// The segments still to read: first position and path.
    segments: VecDeque<(u64, PathBuf)>,
    current: Option<Current>,
    /// The first position to yield.
    start: u64,
    /// One past the last position to yield.
    end: u64,
    done: bool,
}

struct Current {
    path: PathBuf,
    file: BufReader<File>,
    /// Byte offset of the next frame.
    offset: u64,
    /// Position of the next frame.
    position: u64,
}

impl WalReader {
    pub(super) fn new(segments: Vec<(u64, PathBuf)>, start: u64, end: u64) -> Self {
        WalReader {
            segments: segments.into(),
            current: None,
            start,
            end,
            done: false,
        }
    }

    /// The position of the next record this reader yields (its end once exhausted).
    pub fn position(&self) -> u64 {
        match &self.current {
            Some(c) => c.position.max(self.start),
            None => self.start,
        }
    }

    fn read_next(&mut self) -> Result<Option<(u64, Vec<u8>)>, WalError> {
        loop {
            let position = self.current.as_ref().map(|c| c.position);
            if position.is_some_and(|p| p >= self.end) || self.start >= self.end {
                return Ok(None);
            }
            // Move to the next segment when the current one is done (or none is open yet).
            let switch = match (position, self.segments.front()) {
                (None, _) => true,
                (Some(p), Some((base, _))) => p >= *base,
                (Some(_), None) => false,
            };
            if switch {
                let Some((base, path)) = self.segments.pop_front() else {
                    return Ok(None);
                };
                if let Some(p) = position
                    && p != base
                {
                    return Err(WalError::Corrupt {
                        segment: path,
                        offset: 0,
                        reason: format!(
                            "the segment starts at position {base}, the one before ends at {p}"
                        ),
                    });
                }
                let file = File::open(&path).map_err(io_err(&path))?;
                let mut file = BufReader::with_capacity(256 * 1024, file);
                segment::read_header(&mut file, &path, base)?;
                self.current = Some(Current {
                    path,
                    file,
                    offset: segment::HEADER_LEN,
                    position: base,
                });
                continue;
            }
            let Some(cur) = self.current.as_mut() else {
                return Ok(None);
            };
            let skip = cur.position < self.start;
            let record = cur.next_frame(skip)?;
            cur.position += 1;
            if let Some(body) = record {
                return Ok(Some((cur.position - 1, body)));
            }
        }
    }
}

impl Current {
    /// Reads the next frame: its body, or `None` when `skip` (the body is not read).
    fn next_frame(&mut self, skip: bool) -> Result<Option<Vec<u8>>, WalError> {
        let corrupt = |offset: u64, reason: String| WalError::Corrupt {
            segment: self.path.clone(),
            offset,
            reason,
        };
        let mut header = [0u8; FRAME_HEADER];
        if let Err(e) = self.file.read_exact(&mut header) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(
                    self.offset,
                    format!(
                        "the segment ends before position {} (incomplete or missing frame)",
                        self.position
                    ),
                )
            } else {
                io_err(&self.path)(e)
            });
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD {
            return Err(corrupt(
                self.offset,
                format!("implausible frame length {len}"),
            ));
        }
        let at = self.offset;
        self.offset += FRAME_HEADER as u64 + u64::from(len);
        if skip {
            self.file
                .seek_relative(i64::from(len))
                .map_err(io_err(&self.path))?;
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = self.file.read_exact(&mut body) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(
                    at,
                    format!("a frame of {len} bytes runs past the end of the file"),
                )
            } else {
                io_err(&self.path)(e)
            });
        }
        if crc32fast::hash(&body) != crc {
            return Err(corrupt(
                at,
                format!("checksum mismatch in a frame of {len} bytes"),
            ));
        }
        Ok(Some(body))
    }
}

impl Iterator for WalReader {
    type Item = Result<(u64, Vec<u8>), WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_next() {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
