//! Snapshots: the state the service holds, so that a restart reads it instead of the whole log,
//! and the log behind it can be deleted. Restart time and disk use are then bounded by the
//! state, not by the history (SPEC §7, issue #7).
//!
//! # What a snapshot holds
//!
//! Everything the dataflow's future depends on, as of a log position `P` (every record before
//! `P` is in it, none after): the configuration and its layout, the log epoch, the dataflow's
//! inputs as they stand (each fragment's current version, each upload membership), every
//! profile's record (its view, statuses and `lastQualificationTime`s: the history), and the
//! *outbox* — the exports made before `P` that had not yet been delivered or dead-lettered.
//!
//! # How one is taken
//!
//! The feeder, at an epoch boundary at position `P`, copies its inputs and configuration and
//! pushes a snapshot epoch; `decide` hands out every record at that epoch; the hand-off, on
//! reaching it (every earlier export is then in the egress), adds the outbox and writes the
//! file. Then the log's segments before `P` are deleted and `acks.log` keeps only the keys
//! that can still come up.
//!
//! # On disk
//!
//! `snapshot.bin`: the magic `SDSNAP01`, the bincode body, and a CRC-32 of the body (LE u32).
//! It is written to `snapshot.bin.tmp`, `fsync`ed, renamed over the old one, and the directory
//! is `fsync`ed: a crash leaves the old snapshot or the new one. A snapshot that does not
//! check out stops the start with an error naming the file (the log behind it is gone, so it
//! cannot be skipped).
//!
//! # A restart
//!
//! The dataflow starts on the snapshot's plan; epoch 0 seeds the records, epoch 1 loads the
//! inputs with empty marks (no event, so nothing is exported: every profile comes back as it
//! was), the outbox goes to the egress (less what `acks.log` says ended), and the feeder reads
//! the log from `P`.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bincode::Options as _;
use serde::{Deserialize, Serialize};
use streamdest_operators::history::Seed;
use streamdest_operators::input::{Fragment, IdKey};
use streamdest_operators::plan::AudienceIdx;

use crate::egress::Export;

use super::layout::Layout;

const MAGIC: &[u8; 8] = b"SDSNAP01";
const FILE: &str = "snapshot.bin";

/// An export made before the snapshot's position and not yet ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub destination: String,
    pub profile: String,
    pub order_keys: Vec<u64>,
    pub epoch: u64,
    pub idempotency_key: String,
    pub payload: Vec<u8>,
}

impl From<&Export> for OutboxEntry {
    fn from(e: &Export) -> Self {
        OutboxEntry {
            destination: e.destination.clone(),
            profile: e.profile.clone(),
            order_keys: e.order_keys.clone(),
            epoch: e.epoch,
            idempotency_key: e.idempotency_key.clone(),
            payload: e.payload.to_vec(),
        }
    }
}

impl From<OutboxEntry> for Export {
    fn from(e: OutboxEntry) -> Self {
        Export {
            destination: e.destination,
            profile: e.profile,
            order_keys: e.order_keys,
            epoch: e.epoch,
            idempotency_key: e.idempotency_key,
            payload: bytes::Bytes::from(e.payload),
        }
    }
}

/// The feeder's part: inputs and configuration at position `position`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inputs {
    /// The first log position not in the snapshot.
    pub position: u64,
    /// The log epoch the next record may take (the sequencer's epoch after the restart).
    pub next_log_epoch: u64,
    /// The configuration as JSON text.
    pub config: String,
    pub layout: Layout,
    pub fragments: Vec<Arc<Fragment>>,
    pub uploads: Vec<(AudienceIdx, IdKey)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub inputs: Inputs,
    pub records: Vec<Seed>,
    pub outbox: Vec<OutboxEntry>,
}

/// A writer that checksums what passes through it.
struct Crc<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that checksums what passes through it.
struct CrcRead<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for CrcRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Writes `snapshot` durably (temporary file, `fsync`, rename, directory `fsync`); returns
/// its size in bytes.
pub fn write(data_dir: &Path, snapshot: &Snapshot) -> anyhow::Result<u64> {
    let target = path(data_dir);
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let file = {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?
    };
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(MAGIC)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let mut crc = Crc {
        inner: out,
        hasher: crc32fast::Hasher::new(),
    };
    bincode::serialize_into(&mut crc, snapshot)
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?;
    let sum = crc.hasher.finalize();
    let mut out = crc.inner;
    out.write_all(&sum.to_le_bytes())
        .and_then(|()| out.flush())
        .with_context(|| format!("writing {}", tmp.display()))?;
    let file = out
        .into_inner()
        .map_err(|e| anyhow!("writing {}: {}", tmp.display(), e.error()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", data_dir.display()))?;
    Ok(size)
}

/// Reads the snapshot, if there is one.
pub fn read(data_dir: &Path) -> anyhow::Result<Option<Snapshot>> {
    let path = path(data_dir);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let len = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    if &magic != MAGIC {
        bail!("{} is not a streamdest snapshot", path.display());
    }
    let mut crc = CrcRead {
        inner: input,
        hasher: crc32fast::Hasher::new(),
    };
    // The same encoding as `bincode::serialize_into`, with no length beyond the file's
    // believed: a damaged length is an error, not an allocation.
    let snapshot: Snapshot = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(len)
        .deserialize_from(&mut crc)
        .map_err(|e| anyhow!("{} is damaged: {e}", path.display()))?;
    let sum = crc.hasher.finalize();
    let mut stored = [0u8; 4];
    crc.inner
        .read_exact(&mut stored)
        .with_context(|| format!("{} is cut short", path.display()))?;
    if u32::from_le_bytes(stored) != sum {
        bail!(
            "{} is damaged: its checksum does not match (the log before it was deleted, so it cannot be skipped; restore it from a backup)",
            path.display()
        );
    }
    Ok(Some(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            inputs: Inputs {
                position: 42,
                next_log_epoch: 9,
                config: "{}".into(),
                layout: Layout::default(),
                fragments: Vec::new(),
                uploads: vec![(1, 77)],
            },
            records: Vec::new(),
            outbox: vec![OutboxEntry {
                destination: "d".into(),
                profile: "email:a".into(),
                order_keys: vec![1, 2],
                epoch: 3,
                idempotency_key: "k".into(),
                payload: b"{}".to_vec(),
            }],
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_damage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read(dir.path()).expect("no snapshot").is_none());
        write(dir.path(), &sample()).expect("write");
        let back = read(dir.path()).expect("read").expect("a snapshot");
        assert_eq!(back.inputs.position, 42);
        assert_eq!(back.inputs.uploads, vec![(1, 77)]);
        assert_eq!(back.outbox, sample().outbox);

        let file = path(dir.path());
        let mut bytes = std::fs::read(&file).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&file, &bytes).expect("write");
        let err = read(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains("snapshot.bin"), "{err}");
    }
}
