//! The durable store's write-ahead log, `DIR/herald.wal`: what makes an acknowledged append cost
//! one `fdatasync` of a few KiB instead of a redb commit. The rule it keeps: a record is on disk
//! before its append is answered, and a record is only overwritten once a durable redb commit
//! holds everything it says, or once its append failed (then before the failure is answered).
//!
//! Why not redb alone: a durable redb commit writes its B-tree pages, then its header, and syncs
//! the file (0.4–1.6 ms here), so 16 publishers with one request in flight each were capped at
//! 10–16k appends/s. redb's non-durable commits (`Durability::None`) cost tens of microseconds
//! but a crash forgets them; this log makes them durable. The file is used as a ring: records
//! follow each other from offset 0; when the next one would not fit, or after
//! [`CHECKPOINT_EVERY`] records, the append commits durably in redb instead and writing starts
//! at offset 0 again. The ring is written full of zeros as the first lap reaches it, a
//! [`GROWTH`] at a time (synced with its new size), so that later records overwrite written
//! blocks and their `fdatasync` has no metadata to write; when the disk has no room for that, the
//! append commits durably in redb instead, as if the ring were full.
//!
//! Record: `magic u32 | body length u32 | CRC-32 of body u32 | body`; body: `first id u64 |
//! published ms u64 | count u32 | lap u64 | (row length u32 | stored row)*`, the rows exactly as
//! redb keeps them. `lap` is a random number drawn for each lap of the ring. Reading stops at the
//! first record that is torn (bad magic, length or checksum), belongs to another lap than the
//! first record, or does not start at the id after the one before it ends: so neither a record
//! left over from an earlier lap nor bytes a publisher put into an event's data (a row is stored
//! verbatim) can pass for a current record. A record whose append then failed is unwritten (its
//! magic zeroed and synced) before the failure is answered, so it is never replayed.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Size of the ring. A record larger than this is not logged; its append commits durably.
pub(super) const CAPACITY: u64 = 8 << 20;
/// Durable redb commits at least this often, so a restart replays a bounded log and redb can
/// reuse the pages of its non-durable commits.
pub(super) const CHECKPOINT_EVERY: u32 = 1024;
/// How much of the ring is zero-filled at a time, during its first lap.
const GROWTH: u64 = 256 << 10;
pub(super) const FILE: &str = "herald.wal";
const MAGIC: u32 = 0x4857_4c31; // "HWL1"
const HEAD: usize = 12;
const BODY_HEAD: usize = 28;

/// One logged append: the events it stored, from id `first` on, all published at `published_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub first: u64,
    pub published_ms: u64,
    pub rows: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub(super) struct Wal {
    file: File,
    /// Zero-filled and synced so far (grows to [`CAPACITY`] during the first lap).
    len: u64,
    /// Where the next record goes.
    pos: u64,
    /// Records written since the last durable commit.
    since_checkpoint: u32,
    /// This lap's number, in every record of it.
    lap: u64,
    /// Where the last record written begins.
    last_at: u64,
    /// Rows in the record being built.
    rows: u32,
    /// The record being built (reused between appends).
    buf: Vec<u8>,
}

impl Wal {
    /// Opens the log in `dir` (creating it empty when missing) and reads the records of its
    /// current lap, in order.
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Vec<Record>)> {
        let path = dir.join(FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if !existed {
            File::open(dir)?.sync_all()?;
        }
        let len = file.metadata()?.len().min(CAPACITY);
        let records = read_records(&file, len)?;
        let wal = Wal {
            file,
            len,
            pos: 0,
            since_checkpoint: 0,
            lap: new_lap(),
            last_at: 0,
            rows: 0,
            buf: Vec::new(),
        };
        Ok((wal, records))
    }

    /// Starts a record for the events from id `first` on, published at `published_ms`.
    pub fn begin(&mut self, first: u64, published_ms: u64) {
        self.buf.clear();
        self.rows = 0;
        self.buf.extend_from_slice(&[0; HEAD]);
        self.buf.extend_from_slice(&first.to_le_bytes());
        self.buf.extend_from_slice(&published_ms.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&self.lap.to_le_bytes());
    }

    /// Adds one stored row to the record begun last.
    pub fn push(&mut self, row: &[u8]) {
        self.buf
            .extend_from_slice(&(row.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(row);
        self.rows += 1;
    }

    /// Whether the record begun last may be logged (the ring has room for it and no checkpoint
    /// is due), or its append must commit durably instead.
    pub fn fits(&self) -> bool {
        // The ring's size also keeps the body length within the header's u32.
        self.since_checkpoint < CHECKPOINT_EVERY && self.pos + self.buf.len() as u64 <= CAPACITY
    }

    /// Writes the record begun last and waits until it is on disk: `Ok(true)`. `Ok(false)`: it
    /// was not written (it does not [`fit`](Self::fits), or the disk has no room to extend the
    /// ring), so its append must commit durably; [`checkpointed`](Self::checkpointed) follows that
    /// commit.
    pub fn log(&mut self) -> std::io::Result<bool> {
        if !self.fits() {
            return Ok(false);
        }
        let end = self.pos + self.buf.len() as u64;
        if end > self.len
            && let Err(e) = self.grow(end)
        {
            tracing::warn!(error = %e, "the write-ahead log cannot grow: this append commits in redb directly");
            return Ok(false);
        }
        let body_len = (self.buf.len() - HEAD) as u32;
        self.buf[HEAD + 16..HEAD + 20].copy_from_slice(&self.rows.to_le_bytes());
        let sum = crc32fast::hash(&self.buf[HEAD..]);
        self.buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
        self.buf[8..12].copy_from_slice(&sum.to_le_bytes());
        self.last_at = self.pos;
        self.pos = end;
        self.since_checkpoint += 1;
        // From here the record may be on disk: a failure must unwrite it (see `unlog`).
        self.file.write_all_at(&self.buf, self.last_at)?;
        self.file.sync_data()?;
        Ok(true)
    }

    /// Unwrites the record written last (its append failed after it was logged, and is answered
    /// as failed): zeroes its magic and syncs, so no reopen or restart replays it. The next
    /// record takes its place.
    pub fn unlog(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&[0; 4], self.last_at)?;
        self.file.sync_data()?;
        self.pos = self.last_at;
        self.since_checkpoint = self.since_checkpoint.saturating_sub(1);
        Ok(())
    }

    /// Zero-fills the ring up to at least `end` (whole [`GROWTH`]s, at most [`CAPACITY`]) and
    /// syncs it with its size. Written, not `fallocate`d: writes into unwritten extents would make
    /// every `fdatasync` commit a metadata change too.
    fn grow(&mut self, end: u64) -> std::io::Result<()> {
        let target = end.div_ceil(GROWTH).saturating_mul(GROWTH).min(CAPACITY);
        let zeros = vec![0u8; GROWTH as usize];
        let mut at = self.len;
        while at < target {
            let n = GROWTH.min(target - at);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.file.sync_all()?;
        self.len = target;
        Ok(())
    }

    /// A durable redb commit now holds every record: the next lap starts at offset 0.
    pub fn checkpointed(&mut self) {
        self.pos = 0;
        self.since_checkpoint = 0;
        self.lap = new_lap();
    }
}

/// A lap number no earlier lap used and no publisher can guess: from the standard library's
/// randomly keyed hasher (seeded by the OS), over the time.
fn new_lap() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The records of the log's current lap (within its first `len` bytes): from offset 0, while
/// each is whole, of the first record's lap, and starts at the id after the one before.
fn read_records(file: &File, len: u64) -> std::io::Result<Vec<Record>> {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut out: Vec<Record> = Vec::new();
    let mut first_lap: Option<u64> = None;
    let mut read = 0u64;
    let mut head = [0u8; HEAD];
    loop {
        if read + HEAD as u64 > len {
            break;
        }
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
        let (magic, sum) = (word(0), word(8));
        let body_len = word(4) as u64;
        if magic != MAGIC || body_len < BODY_HEAD as u64 || read + HEAD as u64 + body_len > len {
            break;
        }
        let mut body = vec![0u8; body_len as usize];
        match reader.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if crc32fast::hash(&body) != sum {
            break;
        }
        let Some((record, record_lap)) = parse(&body) else {
            break;
        };
        if let Some((prev, lap)) = out.last().zip(first_lap)
            && (record.first != prev.first + prev.rows.len() as u64 || record_lap != lap)
        {
            break; // not this lap's next record
        }
        first_lap.get_or_insert(record_lap);
        out.push(record);
        read += HEAD as u64 + body_len;
    }
    Ok(out)
}

fn parse(body: &[u8]) -> Option<(Record, u64)> {
    let u64_at = |i: usize| Some(u64::from_le_bytes(body.get(i..i + 8)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_le_bytes(body.get(i..i + 4)?.try_into().ok()?));
    let first = u64_at(0)?;
    let published_ms = u64_at(8)?;
    let count = u32_at(16)?;
    let lap = u64_at(20)?;
    let mut rows = Vec::with_capacity(count.min(1 << 16) as usize);
    let mut at = BODY_HEAD;
    for _ in 0..count {
        let len = u32_at(at)? as usize;
        rows.push(body.get(at + 4..at + 4 + len)?.to_vec());
        at += 4 + len;
    }
    (at == body.len()).then_some((
        Record {
            first,
            published_ms,
            rows,
        },
        lap,
    ))
}

/// Overwrites bytes of the log in `dir` at `at`: tests damage a log with it.
#[cfg(test)]
pub(super) fn overwrite(dir: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(dir.join(FILE)).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(wal: &mut Wal, first: u64, rows: &[&[u8]]) -> u64 {
        let at = wal.pos;
        wal.begin(first, 7);
        for r in rows {
            wal.push(r);
        }
        assert!(wal.log().unwrap());
        at
    }

    fn firsts(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.first).collect()
    }

    #[test]
    fn records_read_back_in_order_until_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, found) = Wal::open(dir.path()).unwrap();
        assert!(found.is_empty());
        log(&mut wal, 10, &[b"a", b"bb"]);
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            GROWTH,
            "the ring grows a step at a time"
        );
        log(&mut wal, 12, &[b"c"]);
        let third = log(&mut wal, 13, &[b"dd"]);
        drop(wal);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            found[0],
            Record {
                first: 10,
                published_ms: 7,
                rows: vec![b"a".to_vec(), b"bb".to_vec()]
            }
        );
        assert_eq!(firsts(&found), [10, 12, 13]);
        // A torn last record (its body half written) ends the log before it.
        overwrite(dir.path(), third + HEAD as u64 + 2, &[0xff]);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(firsts(&found), [10, 12]);
    }

    #[test]
    fn a_new_lap_ends_where_the_earlier_lap_begins_to_show() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        for first in 0..5 {
            log(&mut wal, first, &[b"old-row"]);
        }
        wal.checkpointed();
        // Same length: the second new record ends exactly where the old second began.
        log(&mut wal, 100, &[b"new-row"]);
        log(&mut wal, 101, &[b"new-row"]);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(firsts(&found), [100, 101], "old records 2..5 are not read");
    }

    #[test]
    fn an_unlogged_record_is_not_read_and_the_next_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        log(&mut wal, 1, &[b"a"]);
        log(&mut wal, 2, &[b"failed"]);
        wal.unlog().unwrap();
        assert_eq!(firsts(&Wal::open(dir.path()).unwrap().1), [1]);
        log(&mut wal, 2, &[b"b"]);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(firsts(&found), [1, 2]);
        assert_eq!(found[1].rows, [b"b".to_vec()]);
    }

    #[test]
    fn a_record_of_another_lap_or_not_next_in_ids_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        log(&mut wal, 1, &[b"a", b"b"]);
        // A gap in ids (as bytes a publisher crafted could claim): not this lap's next record.
        log(&mut wal, 7, &[b"c"]);
        assert_eq!(firsts(&Wal::open(dir.path()).unwrap().1), [1]);
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        log(&mut wal, 1, &[b"a", b"b"]);
        wal.lap ^= 1; // the same ids, but written in another lap
        log(&mut wal, 3, &[b"c"]);
        assert_eq!(firsts(&Wal::open(dir.path()).unwrap().1), [1]);
    }

    #[test]
    fn a_record_too_large_for_the_ring_or_past_the_checkpoint_interval_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.begin(1, 1);
        wal.push(&vec![0u8; CAPACITY as usize]);
        assert!(!wal.fits());
        for i in 0..CHECKPOINT_EVERY as u64 {
            log(&mut wal, i, &[b"r"]);
        }
        wal.begin(5000, 1);
        wal.push(b"r");
        assert!(!wal.fits(), "a checkpoint is due");
        wal.checkpointed();
        assert!(wal.fits());
    }
}
