//! Segment files: names, the header, frames, and the scan that recovery runs over a segment
//! (see the module documentation of [`super`] for the format and the torn-tail rule).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{MAX_RECORD, WalError, io_err, private_options};

/// The first 8 bytes of every segment.
pub(super) const MAGIC: &[u8; 8] = b"SDWAL\0\0\x01";
/// Magic plus the segment's first position (`u64` LE).
pub(super) const HEADER_LEN: u64 = 16;
/// `[len: u32 LE][crc32(body): u32 LE]`.
pub(super) const FRAME_HEADER: usize = 8;
/// Every file of the directory named like this is a segment; other files are ignored.
const SUFFIX: &str = ".wal";
/// File-system blocks that a crash leaves unwritten read back as zeros, in whole blocks of at
/// least this size: the signature of a cut write inside a whole-length frame.
const ZERO_BLOCK: usize = 512;
/// How many body bytes the search for an intact frame after a bad one may checksum before it
/// gives up (and the bad frame is reported as corrupt rather than cut).
const SEARCH_BUDGET: u64 = 1 << 30;

/// `00000000000000000042.wal` for the segment whose first record is position 42.
pub(super) fn file_name(base: u64) -> String {
    format!("{base:020}{SUFFIX}")
}

pub(super) fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

pub(super) fn header(base: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    h
}

/// The segments of `dir`, sorted by first position.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(base) = name.to_str().and_then(parse_name) {
            out.push((base, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(base, _)| *base);
    Ok(out)
}

/// Creates (or replaces: only ever a leftover of a failed roll, which holds no record) the
/// segment whose first position is `base`, with its header, `fsync`ed. The caller syncs the
/// directory.
pub(super) fn create(path: &Path, base: u64) -> Result<File, WalError> {
    let mut file = private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(&header(base)).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(file)
}

/// Appends one frame for `body` (at most [`MAX_RECORD`] bytes, checked by the caller).
pub(super) fn encode_frame(buf: &mut Vec<u8>, body: &[u8]) {
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf.extend_from_slice(body);
}

pub(super) enum HeaderState {
    Ok,
    /// Shorter than a header and a prefix of the expected one, or zeros only: a segment
    /// whose creation was cut by a crash.
    Torn,
    Bad(String),
}

pub(super) fn check_header(data: &[u8], base: u64) -> HeaderState {
    let expected = header(base);
    if data.len() < expected.len() {
        if data == &expected[..data.len()] || data.iter().all(|&b| b == 0) {
            return HeaderState::Torn;
        }
        return HeaderState::Bad(format!("incomplete segment header ({} bytes)", data.len()));
    }
    if data.iter().all(|&b| b == 0) {
        return HeaderState::Torn;
    }
    if &data[..8] != MAGIC {
        return HeaderState::Bad("not a write-ahead log segment (bad magic)".into());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[8..16]);
    let found = u64::from_le_bytes(b);
    if found != base {
        return HeaderState::Bad(format!(
            "the header says the segment starts at position {found}, its name says {base}"
        ));
    }
    HeaderState::Ok
}

/// Why a frame does not check out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum FrameError {
    /// Fewer than 8 bytes left in the file.
    Incomplete,
    ZeroLength,
    TooLong(u32),
    PastEnd(u32),
    /// The frame is whole (its length lies within the file) but its body fails the CRC.
    Checksum(u32),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Incomplete => write!(f, "incomplete frame header"),
            FrameError::ZeroLength => write!(f, "frame length 0"),
            FrameError::TooLong(len) => write!(f, "implausible frame length {len}"),
            FrameError::PastEnd(len) => {
                write!(f, "a frame of {len} bytes runs past the end of the file")
            }
            FrameError::Checksum(len) => write!(f, "checksum mismatch in a frame of {len} bytes"),
        }
    }
}

fn u32_at(data: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[off..off + 4]);
    u32::from_le_bytes(b)
}

/// Checks the frame at `off`; returns the offset just after it.
pub(super) fn check_frame(data: &[u8], off: usize) -> Result<usize, FrameError> {
    if data.len() - off < FRAME_HEADER {
        return Err(FrameError::Incomplete);
    }
    let len = u32_at(data, off);
    if len == 0 {
        return Err(FrameError::ZeroLength);
    }
    if len > MAX_RECORD {
        return Err(FrameError::TooLong(len));
    }
    let body = off + FRAME_HEADER;
    let end = body + len as usize;
    if end > data.len() {
        return Err(FrameError::PastEnd(len));
    }
    if crc32fast::hash(&data[body..end]) != u32_at(data, off + 4) {
        return Err(FrameError::Checksum(len));
    }
    Ok(end)
}

/// The intact frames at the start of a segment, and the first frame that is not.
pub(super) struct Scan {
    pub records: u64,
    /// The offset just after the last intact frame.
    pub valid_end: usize,
    pub bad: Option<(usize, FrameError)>,
}

/// Walks the frames of a whole segment (`data` starts with its header) until the end or the
/// first frame that does not check out.
pub(super) fn scan(data: &[u8]) -> Scan {
    let mut off = HEADER_LEN as usize;
    let mut records = 0;
    while off < data.len() {
        match check_frame(data, off) {
            Ok(end) => {
                records += 1;
                off = end;
            }
            Err(e) => {
                return Scan {
                    records,
                    valid_end: off,
                    bad: Some((off, e)),
                };
            }
        }
    }
    Scan {
        records,
        valid_end: off,
        bad: None,
    }
}

/// What a bad frame in the last segment is.
pub(super) enum Break {
    /// The remains of an append cut before its `fsync`: cut here.
    Torn,
    Corrupt(String),
}

/// Classifies the first bad frame of the **last** segment (at `off`, failing with `err`). The
/// rule is documented in the module documentation ("Torn tail or corruption").
pub(super) fn classify(data: &[u8], off: usize, err: &FrameError) -> Break {
    let body = off + FRAME_HEADER;
    match err {
        FrameError::Checksum(len) => {
            if !has_zero_block(data, body, body + *len as usize) {
                return Break::Corrupt(format!(
                    "{err}, with no zero-filled block in it: damage, not a cut write"
                ));
            }
        }
        FrameError::ZeroLength | FrameError::TooLong(_) | FrameError::PastEnd(_) => {
            // A damaged length in front of a body that is whole to the end of the file.
            if data.len() > body && crc32fast::hash(&data[body..]) == u32_at(data, off + 4) {
                return Break::Corrupt(format!(
                    "{err}, but the rest of the file is a whole record for its checksum: \
                     a damaged length field"
                ));
            }
        }
        FrameError::Incomplete => {}
    }
    match intact_frame_after(data, off + 1) {
        Search::None => Break::Torn,
        Search::Found(at) => Break::Corrupt(format!(
            "{err}, and an intact frame follows at byte offset {at}"
        )),
        Search::GaveUp => Break::Corrupt(format!(
            "{err}; intact frames after it could not be ruled out (search budget exhausted)"
        )),
    }
}

/// Whether a zero-filled, 512-byte-aligned block of the file (or the part of one up to the end
/// of the file) lies in `body..end`.
fn has_zero_block(data: &[u8], body: usize, end: usize) -> bool {
    let mut b = body.div_ceil(ZERO_BLOCK) * ZERO_BLOCK;
    while b < end {
        let block_end = (b + ZERO_BLOCK).min(data.len());
        if data[b..block_end].iter().all(|&x| x == 0) {
            return true;
        }
        b += ZERO_BLOCK;
    }
    false
}

enum Search {
    None,
    Found(usize),
    GaveUp,
}

/// Looks for an intact frame starting at any offset from `from` on.
fn intact_frame_after(data: &[u8], from: usize) -> Search {
    let mut budget = SEARCH_BUDGET;
    let mut p = from;
    while p + FRAME_HEADER < data.len() {
        let len = u32_at(data, p);
        let end = p + FRAME_HEADER + len as usize;
        if len != 0 && len <= MAX_RECORD && end <= data.len() {
            if budget < u64::from(len) {
                return Search::GaveUp;
            }
            budget -= u64::from(len);
            if crc32fast::hash(&data[p + FRAME_HEADER..end]) == u32_at(data, p + 4) {
                return Search::Found(p);
            }
        }
        p += 1;
    }
    Search::None
}

/// Reads a segment's header from an open file (the reader's check).
pub(super) fn read_header(
    reader: &mut impl io::Read,
    path: &Path,
    base: u64,
) -> Result<(), WalError> {
    let mut h = [0u8; HEADER_LEN as usize];
    reader.read_exact(&mut h).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WalError::Corrupt {
                segment: path.to_path_buf(),
                offset: 0,
                reason: "incomplete segment header".into(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    match check_header(&h, base) {
        HeaderState::Ok => Ok(()),
        HeaderState::Torn => Err(WalError::Corrupt {
            segment: path.to_path_buf(),
            offset: 0,
            reason: "zero-filled segment header".into(),
        }),
        HeaderState::Bad(reason) => Err(WalError::Corrupt {
            segment: path.to_path_buf(),
            offset: 0,
            reason,
        }),
    }
}
