use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

fn small(segment_bytes: u64) -> WalOptions {
    WalOptions { segment_bytes }
}

/// A record body that says where it came from, of a length that varies.
fn body(tag: u64, i: u64) -> Vec<u8> {
    let mut b = format!("record {tag}/{i}:").into_bytes();
    b.extend(std::iter::repeat_n(
        b'x',
        ((tag * 7 + i * 13) % 40) as usize,
    ));
    b
}

fn read_all(wal: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    wal.read_from(from)
        .expect("reader")
        .collect::<Result<Vec<_>, _>>()
        .expect("read back")
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    segment::list(dir)
        .expect("list")
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn files_size(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).expect("stat").len())
        .sum()
}

/// Byte offsets of the frames of a segment.
fn frame_offsets(path: &Path) -> Vec<u64> {
    let data = fs::read(path).expect("read");
    let mut off = HEADER_LEN as usize;
    let mut out = Vec::new();
    while off < data.len() {
        out.push(off as u64);
        off = segment::check_frame(&data, off).expect("intact frame");
    }
    out
}

fn flip_byte(path: &Path, offset: u64) {
    let mut data = fs::read(path).expect("read");
    data[offset as usize] ^= 0x40;
    fs::write(path, data).expect("write");
}

/// Appends `calls` calls of 1..=3 records each; returns every record by position.
fn fill(wal: &Wal, calls: u64) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for c in 0..calls {
        let records: Vec<Vec<u8>> = (0..=(c % 3)).map(|i| body(c, i)).collect();
        let n = records.len() as u64;
        let start = wal.next_position();
        let range = wal.append(records.clone()).expect("append");
        assert_eq!(range, start..start + n);
        all.extend(records);
    }
    all
}

#[test]
fn append_reopen_and_read_back_across_segments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wal");
    let (wal, recovery) = Wal::open(&dir, small(200)).expect("open");
    assert_eq!(recovery.first_position, 0);
    assert_eq!(recovery.next_position, 0);
    assert_eq!(recovery.torn_tail, None);
    assert!(dir.join("00000000000000000000.wal").is_file());
    assert_eq!(wal.append(Vec::new()).expect("empty call"), 0..0);
    let all = fill(&wal, 60);
    assert_eq!(wal.next_position(), all.len() as u64);
    assert!(wal.segments() > 5, "{} segments", wal.segments());
    assert_eq!(wal.disk_bytes(), files_size(&dir));
    // Each segment is named after its first record's position.
    let firsts: Vec<u64> = read_all(&wal, 0).iter().map(|(p, _)| *p).collect();
    for path in segment_files(&dir) {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let base = segment::parse_name(name).expect("segment name");
        assert!(firsts.contains(&base));
    }
    drop(wal);

    let (wal, recovery) = Wal::open(&dir, small(200)).expect("reopen");
    assert_eq!(recovery.next_position, all.len() as u64);
    assert_eq!(recovery.segments, segment_files(&dir).len());
    assert_eq!(recovery.torn_tail, None);
    assert_eq!(wal.disk_bytes(), files_size(&dir));
    // Readable right after open, from the start and from the middle of a segment.
    let back = read_all(&wal, 0);
    assert_eq!(back.len(), all.len());
    for (i, (pos, b)) in back.iter().enumerate() {
        assert_eq!(*pos, i as u64);
        assert_eq!(b, &all[i]);
    }
    for from in [1, 17, all.len() as u64 - 1, all.len() as u64] {
        let part = read_all(&wal, from);
        assert_eq!(part.len() as u64, all.len() as u64 - from);
        assert!(part.iter().all(|(p, b)| *b == all[*p as usize]));
    }
    assert!(matches!(
        wal.read_from(all.len() as u64 + 1),
        Err(WalError::PastEnd { .. })
    ));
    // Appends continue the positions.
    let more = wal.append(vec![b"after".to_vec()]).expect("append");
    assert_eq!(more, all.len() as u64..all.len() as u64 + 1);
    assert_eq!(
        read_all(&wal, more.start),
        vec![(more.start, b"after".to_vec())]
    );
    assert_eq!(wal.disk_bytes(), files_size(&dir));
}

#[test]
fn bad_records_are_refused_and_the_directory_is_locked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), WalOptions::default()).expect("open");
    assert!(matches!(
        wal.append(vec![b"a".to_vec(), Vec::new()]),
        Err(WalError::EmptyRecord { index: 1 })
    ));
    assert_eq!(wal.next_position(), 0);
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(wal);
    Wal::open(tmp.path(), WalOptions::default()).expect("open after drop");
}

#[test]
fn concurrent_appends_share_fsyncs() {
    const THREADS: u64 = 8;
    const CALLS: u64 = 25;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), WalOptions::default()).expect("open");
    let wal = Arc::new(wal);
    // Let calls pile up while the writer is busy, as a slow disk would.
    wal.set_test_commit_delay_ms(2);
    let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let wal = Arc::clone(&wal);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut ranges = Vec::new();
                for c in 0..CALLS {
                    let records: Vec<Vec<u8>> =
                        (0..1 + (c % 4)).map(|i| body(t * 1000 + c, i)).collect();
                    let range = wal.append(records.clone()).expect("append");
                    assert_eq!(range.end - range.start, records.len() as u64);
                    ranges.push((range, records));
                }
                ranges
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        let ranges = h.join().expect("thread");
        // One thread's calls are sequential: increasing positions.
        assert!(ranges.windows(2).all(|w| w[0].0.end <= w[1].0.start));
        results.extend(ranges);
    }
    let calls = THREADS * CALLS;
    let total: u64 = results.iter().map(|(r, _)| r.end - r.start).sum();
    assert_eq!(wal.next_position(), total);
    // Dense and disjoint: every position exactly once.
    let mut seen = BTreeSet::new();
    for (r, _) in &results {
        for p in r.clone() {
            assert!(seen.insert(p), "position {p} twice");
        }
    }
    assert_eq!(seen.len() as u64, total);
    assert_eq!(seen.last().copied(), Some(total - 1));
    // Shared fsyncs.
    let syncs = wal.syncs();
    eprintln!("{syncs} fsyncs for {calls} calls");
    assert!(syncs < calls / 2, "{syncs} fsyncs for {calls} calls");
    // Each call's records are contiguous and in call order.
    let back = read_all(&wal, 0);
    for (r, records) in &results {
        for (i, p) in r.clone().enumerate() {
            assert_eq!(back[p as usize].1, records[i]);
        }
    }
}

#[test]
fn async_append_from_tokio_tasks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), small(1024)).expect("open");
    let wal = Arc::new(wal);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            // The future is 'static: it can be spawned without the handle.
            let fut = wal.append_async(vec![body(t, 0), body(t, 1)]);
            tasks.push(tokio::spawn(async move { (t, fut.await) }));
        }
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("task"));
        }
        out
    });
    let mut ranges: Vec<(u64, Range<u64>)> = results
        .into_iter()
        .map(|(t, r)| (t, r.expect("append_async")))
        .collect();
    ranges.sort_by_key(|(_, r)| r.start);
    // Queued when called: call order is position order.
    for (i, (t, r)) in ranges.iter().enumerate() {
        assert_eq!(*t, i as u64);
        assert_eq!(*r, 2 * i as u64..2 * i as u64 + 2);
    }
    let back = read_all(&wal, 0);
    assert_eq!(back.len(), 32);
    assert_eq!(back[5].1, body(2, 1));
}

/// Opens, appends `calls` calls, closes; returns the records and the last segment.
fn log_with(dir: &Path, options: WalOptions, calls: u64) -> (Vec<Vec<u8>>, PathBuf) {
    let (wal, _) = Wal::open(dir, options).expect("open");
    let all = fill(&wal, calls);
    drop(wal);
    let last = segment_files(dir).pop().expect("a segment");
    (all, last)
}

#[test]
fn torn_tail_cut_mid_frame_is_cut_and_appends_continue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (all, last) = log_with(tmp.path(), small(300), 30);
    let offsets = frame_offsets(&last);
    let last_frame = *offsets.last().expect("frames");
    let len = fs::metadata(&last).expect("stat").len();
    // Cut inside the last frame's body.
    OpenOptions::new()
        .write(true)
        .open(&last)
        .and_then(|f| f.set_len(len - 3))
        .expect("cut");

    let (wal, recovery) = Wal::open(tmp.path(), small(300)).expect("reopen");
    let torn = recovery.torn_tail.expect("torn tail");
    assert_eq!(torn.segment, last);
    assert_eq!(torn.offset, last_frame);
    assert_eq!(torn.bytes, len - 3 - last_frame);
    assert_eq!(fs::metadata(&last).expect("stat").len(), last_frame);
    let n = all.len() as u64 - 1;
    assert_eq!(recovery.next_position, n);
    assert_eq!(wal.disk_bytes(), files_size(tmp.path()));
    let r = wal.append(vec![b"new".to_vec()]).expect("append");
    assert_eq!(r, n..n + 1);
    drop(wal);

    let (wal, recovery) = Wal::open(tmp.path(), small(300)).expect("reopen");
    assert_eq!(recovery.torn_tail, None);
    let back = read_all(&wal, 0);
    assert_eq!(back.len() as u64, n + 1);
    assert_eq!(
        back[..n as usize]
            .iter()
            .map(|(_, b)| b.clone())
            .collect::<Vec<_>>(),
        all[..n as usize]
    );
    assert_eq!(back[n as usize].1, b"new");
    drop(wal);
    // A frame header cut short: 5 of its 8 bytes.
    let last = segment_files(tmp.path()).pop().expect("segment");
    let mut f = OpenOptions::new().append(true).open(&last).expect("open");
    f.write_all(&[7, 0, 0, 0, 1]).expect("write");
    drop(f);
    let (wal, recovery) = Wal::open(tmp.path(), small(300)).expect("reopen");
    assert_eq!(recovery.torn_tail.expect("torn").bytes, 5);
    assert_eq!(wal.next_position(), n + 1);
}

#[test]
fn trailing_zeros_are_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (all, last) = log_with(tmp.path(), WalOptions::default(), 10);
    let len = fs::metadata(&last).expect("stat").len();
    let mut f = OpenOptions::new().append(true).open(&last).expect("open");
    f.write_all(&[0u8; 4096]).expect("zeros");
    drop(f);
    let (wal, recovery) = Wal::open(tmp.path(), WalOptions::default()).expect("reopen");
    let torn = recovery.torn_tail.expect("torn tail");
    assert_eq!((torn.offset, torn.bytes), (len, 4096));
    assert_eq!(fs::metadata(&last).expect("stat").len(), len);
    assert_eq!(wal.next_position(), all.len() as u64);
    let r = wal.append(vec![b"next".to_vec()]).expect("append");
    assert_eq!(r.start, all.len() as u64);
    drop(wal);
    let (wal, recovery) = Wal::open(tmp.path(), WalOptions::default()).expect("reopen");
    assert_eq!(recovery.torn_tail, None);
    assert_eq!(read_all(&wal, 0).len(), all.len() + 1);
}

#[test]
fn a_whole_last_frame_with_a_zero_block_is_a_torn_tail() {
    // The file's new size reached the disk, one block of the last write did not.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), WalOptions::default()).expect("open");
    wal.append(vec![b"first".to_vec()]).expect("append");
    wal.append(vec![vec![b'y'; 3000]]).expect("append");
    drop(wal);
    let last = segment_files(tmp.path()).pop().expect("segment");
    let victim = frame_offsets(&last)[1];
    let mut data = fs::read(&last).expect("read");
    data[1024..1536].fill(0);
    fs::write(&last, &data).expect("write");
    let (wal, recovery) = Wal::open(tmp.path(), WalOptions::default()).expect("reopen");
    let torn = recovery.torn_tail.expect("torn tail");
    assert_eq!(torn.offset, victim);
    assert_eq!(wal.next_position(), 1);
    assert_eq!(read_all(&wal, 0), vec![(0, b"first".to_vec())]);
}

#[test]
fn a_segment_whose_creation_was_cut_gets_its_header_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (all, _) = log_with(tmp.path(), WalOptions::default(), 5);
    let n = all.len() as u64;
    let path = tmp.path().join(segment::file_name(n));
    fs::write(&path, &segment::header(n)[..5]).expect("partial header");
    let (wal, recovery) = Wal::open(tmp.path(), WalOptions::default()).expect("reopen");
    assert_eq!(recovery.torn_tail.expect("torn").segment, path);
    assert_eq!(recovery.segments, 2);
    assert_eq!(wal.append(vec![b"x".to_vec()]).expect("append"), n..n + 1);
    assert_eq!(read_all(&wal, 0).len() as u64, n + 1);
}

#[test]
fn flipped_byte_mid_segment_is_corrupt_at_the_frame() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, last) = log_with(tmp.path(), WalOptions::default(), 10);
    let offsets = frame_offsets(&last);
    let victim = offsets[4];
    flip_byte(&last, victim + 8 + 3);
    let size = fs::metadata(&last).expect("stat").len();
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(e @ WalError::Corrupt { .. }) => {
            let WalError::Corrupt {
                segment, offset, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(segment, &last);
            assert_eq!(*offset, victim);
            let text = e.to_string();
            assert!(text.contains(&last.display().to_string()), "{text}");
            assert!(text.contains(&format!("offset {victim}")), "{text}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Nothing was cut.
    assert_eq!(fs::metadata(&last).expect("stat").len(), size);

    // A flipped length byte (the frame now runs past the end) is corrupt too.
    flip_byte(&last, victim + 8 + 3);
    flip_byte(&last, offsets[2] + 2);
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, offsets[2]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::metadata(&last).expect("stat").len(), size);
}

#[test]
fn flipped_byte_in_the_last_record_is_corrupt_not_torn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, last) = log_with(tmp.path(), WalOptions::default(), 6);
    let victim = *frame_offsets(&last).last().expect("frames");
    flip_byte(&last, victim + 8);
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, victim),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Its length made larger: the rest of the file is still a whole body for the CRC.
    flip_byte(&last, victim + 8);
    flip_byte(&last, victim + 1);
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, victim),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn flipped_byte_in_a_segment_that_is_not_the_last_is_corrupt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, _) = log_with(tmp.path(), small(200), 40);
    let files = segment_files(tmp.path());
    assert!(files.len() > 3);
    let first = &files[0];
    // Its last frame: nothing after it in that segment.
    let victim = *frame_offsets(first).last().expect("frames");
    flip_byte(first, victim + 9);
    match Wal::open(tmp.path(), small(200)) {
        Err(WalError::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(&segment, first);
            assert_eq!(offset, victim);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Cut short instead: still corrupt, not a torn tail.
    flip_byte(first, victim + 9);
    let len = fs::metadata(first).expect("stat").len();
    OpenOptions::new()
        .write(true)
        .open(first)
        .and_then(|f| f.set_len(len - 2))
        .expect("cut");
    assert!(matches!(
        Wal::open(tmp.path(), small(200)),
        Err(WalError::Corrupt { .. })
    ));
    assert_eq!(fs::metadata(first).expect("stat").len(), len - 2);
}

#[test]
fn truncate_before_deletes_old_segments_and_the_start_survives_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), small(200)).expect("open");
    let all = fill(&wal, 60);
    let n = all.len() as u64;
    let before = segment_files(tmp.path());
    assert!(before.len() > 5);
    let checkpoint = n / 2;
    let first = wal.truncate_before(checkpoint).expect("truncate");
    assert!(first <= checkpoint && first > 0, "first {first}");
    assert_eq!(wal.first_position(), first);
    let after = segment_files(tmp.path());
    assert!(after.len() < before.len());
    assert_eq!(after[0], tmp.path().join(segment::file_name(first)));
    assert_eq!(wal.disk_bytes(), files_size(tmp.path()));
    assert!(matches!(
        wal.read_from(first - 1),
        Err(WalError::Truncated { .. })
    ));
    // Nothing more to delete below the same checkpoint.
    assert_eq!(wal.truncate_before(checkpoint).expect("again"), first);
    drop(wal);

    let (wal, recovery) = Wal::open(tmp.path(), small(200)).expect("reopen");
    assert_eq!(recovery.first_position, first);
    assert_eq!(wal.first_position(), first);
    assert_eq!(recovery.next_position, n);
    let back = read_all(&wal, first);
    assert_eq!(back.len() as u64, n - first);
    assert!(back.iter().all(|(p, b)| *b == all[*p as usize]));

    // Never the current segment.
    let r = wal.append(vec![b"x".to_vec()]).expect("append");
    let first = wal.truncate_before(u64::MAX).expect("truncate all");
    assert_eq!(segment_files(tmp.path()).len(), 1);
    assert_eq!(wal.disk_bytes(), files_size(tmp.path()));
    assert!(first <= r.start);
    drop(wal);
    let (wal, recovery) = Wal::open(tmp.path(), small(200)).expect("reopen");
    assert_eq!(recovery.first_position, first);
    assert_eq!(read_all(&wal, first).last().map(|(p, _)| *p), Some(r.start));
}
