//! A hook's cursor file with `--data-dir`, `DIR/webhook-<hash of URL>.cursor`: the last delivered
//! event id (or `since:<ms>` before the first delivery). The rule it keeps: once [`CursorFile::save`]
//! returns, a crash or power loss leaves the file reading back that cursor or a newer one, never
//! an older one, never nothing; a save cut short by a crash reads back as the cursor before it.
//!
//! Why this format: a hook saves its cursor after every delivery and before the next, so the save
//! is on the delivery path. Writing a new file, syncing it and renaming it over the old one costs
//! a file creation, a full `fsync` (data and inode) and a rename in the journal: several device
//! flushes per delivery (about 1.3–1.7k deliveries/s here, against 5–10k/s in memory). Instead the
//! file is written once at its full size, [`FILE_LEN`] bytes, as two slots each on its own 4 KiB
//! page; each save overwrites the slot the newest one is not in with `pwrite` and then
//! `fdatasync`s. The file's size and blocks never change after it is made, so `fdatasync` has no
//! metadata to write: one small data write and one device flush per delivery, and no allocation
//! (a full disk cannot fail it).
//!
//! Slot: `magic u32 "HWC1" | sequence u64 | text length u8 | text, zero-padded to TEXT_MAX |
//! CRC-32 of all before it u32`, little-endian. Sequence `n` goes to slot `n % 2`. Reading takes
//! the valid slot (magic and checksum right) with the higher sequence: a torn write leaves the
//! slot it was writing invalid (or still holding its older sequence) and the other slot, the
//! previous save, intact. Making the file (the first save, or the first after reading an old one)
//! goes through a temporary file: written in full, synced, renamed over the path, the directory
//! synced.
//!
//! The previous format, the cursor as the whole file's text (written by renaming a new file over
//! the old), is still read: a file that is not exactly [`FILE_LEN`] bytes is taken as that text.
//! Nothing is written in place of it until the next save, which replaces it atomically by the
//! rename above, so an upgrade neither loses nor repeats a delivery.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes between the starts of the two slots: each on its own page, so writing one never
/// rewrites the other's page.
const SLOT_SPAN: usize = 4096;
/// The file's size, always.
pub(super) const FILE_LEN: usize = 2 * SLOT_SPAN;
const MAGIC: u32 = 0x4843_5731; // "HWC1"
/// The longest cursor text a slot holds (`since:` and 20 digits are 26).
const TEXT_MAX: usize = 47;
/// Bytes of a slot in use: magic, sequence, length, text, checksum.
const SLOT_LEN: usize = 4 + 8 + 1 + TEXT_MAX + 4;

/// What a cursor file's bytes hold.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stored {
    /// The slot format: the newest valid slot's sequence number and cursor.
    Slots { seq: u64, text: String },
    /// The previous format: the file's whole text.
    Old(String),
    /// The slot format's size with no valid slot: not written by this module (both slots are
    /// never written at once), so damaged by something else.
    Damaged,
}

/// One slot's bytes.
pub(super) fn encode_slot(seq: u64, text: &str) -> std::io::Result<[u8; SLOT_LEN]> {
    let len = text.len();
    if len > TEXT_MAX {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("a cursor of {len} bytes (at most {TEXT_MAX})"),
        ));
    }
    let mut slot = [0u8; SLOT_LEN];
    slot[..4].copy_from_slice(&MAGIC.to_le_bytes());
    slot[4..12].copy_from_slice(&seq.to_le_bytes());
    slot[12] = len as u8;
    slot[13..13 + len].copy_from_slice(text.as_bytes());
    let sum = crc32fast::hash(&slot[..SLOT_LEN - 4]);
    slot[SLOT_LEN - 4..].copy_from_slice(&sum.to_le_bytes());
    Ok(slot)
}

/// A slot's sequence number and text, if it is whole.
pub(super) fn decode_slot(slot: &[u8]) -> Option<(u64, String)> {
    let slot = slot.get(..SLOT_LEN)?;
    let word = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC || word(SLOT_LEN - 4) != crc32fast::hash(&slot[..SLOT_LEN - 4]) {
        return None;
    }
    let seq = u64::from_le_bytes(slot[4..12].try_into().expect("8 bytes"));
    let len = usize::from(slot[12]);
    let text = std::str::from_utf8(slot.get(13..13 + len)?).ok()?;
    Some((seq, text.to_string()))
}

/// Reads a cursor file's bytes, in either format.
pub(super) fn decode(bytes: &[u8]) -> Stored {
    if bytes.len() != FILE_LEN {
        return Stored::Old(String::from_utf8_lossy(bytes).into_owned());
    }
    [0, SLOT_SPAN]
        .iter()
        .filter_map(|&at| decode_slot(&bytes[at..]))
        .max_by_key(|(seq, _)| *seq)
        .map_or(Stored::Damaged, |(seq, text)| Stored::Slots { seq, text })
}

/// Where slot `seq % 2` starts.
fn offset(seq: u64) -> u64 {
    (seq % 2) * SLOT_SPAN as u64
}

/// A hook's cursor file, and, once it is in the slot format, the open file and its newest
/// sequence number.
#[derive(Debug)]
pub(super) struct CursorFile {
    path: PathBuf,
    open: Option<(File, u64)>,
}

impl CursorFile {
    pub fn new(path: PathBuf) -> CursorFile {
        CursorFile { path, open: None }
    }

    /// The kept cursor's text; `None` when there is no file. A file in the slot format stays open
    /// for the next saves; one in the old format is replaced by the next save.
    pub fn load(&mut self) -> std::io::Result<Option<String>> {
        self.open = None;
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match decode(&bytes) {
            Stored::Slots { seq, text } => {
                let file = OpenOptions::new().write(true).open(&self.path)?;
                self.open = Some((file, seq));
                Ok(Some(text))
            }
            Stored::Old(text) => Ok(Some(text)),
            Stored::Damaged => Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{}: neither slot is valid", self.path.display()),
            )),
        }
    }

    /// Keeps `text` durably: one `pwrite` and one `fdatasync` once the file is in the slot format;
    /// the first save makes the file (written aside, synced, renamed, directory synced). On an
    /// error the sequence does not move on, so the next save rewrites the same slot and the other
    /// one, the last save that succeeded, is never overwritten meanwhile.
    pub fn save(&mut self, text: &str) -> std::io::Result<()> {
        match &mut self.open {
            Some((file, seq)) => {
                let next = *seq + 1;
                file.write_all_at(&encode_slot(next, text)?, offset(next))?;
                file.sync_data()?;
                *seq = next;
                Ok(())
            }
            None => {
                self.open = Some((self.create(text)?, 1));
                Ok(())
            }
        }
    }

    /// Makes the file full-size with `text` in the slot of sequence 1, replacing whatever was at
    /// the path (an old-format file, a damaged one) in one rename.
    fn create(&self, text: &str) -> std::io::Result<File> {
        let mut bytes = vec![0u8; FILE_LEN];
        let at = offset(1) as usize;
        bytes[at..at + SLOT_LEN].copy_from_slice(&encode_slot(1, text)?);
        let tmp = self.path.with_extension("cursor.tmp");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_in(dir: &tempfile::TempDir) -> CursorFile {
        CursorFile::new(dir.path().join("webhook-0123456789abcdef.cursor"))
    }

    fn len(c: &CursorFile) -> u64 {
        std::fs::metadata(&c.path).unwrap().len()
    }

    #[test]
    fn a_slot_round_trips_and_any_changed_byte_spoils_it() {
        let slot = encode_slot(7, "since:1700000000000").unwrap();
        assert_eq!(decode_slot(&slot), Some((7, "since:1700000000000".into())));
        assert_eq!(
            decode_slot(&encode_slot(u64::MAX, "").unwrap()),
            Some((u64::MAX, String::new()))
        );
        for i in 0..SLOT_LEN {
            let mut bad = slot;
            bad[i] ^= 0x10;
            assert_eq!(decode_slot(&bad), None, "byte {i} changed");
        }
        assert_eq!(decode_slot(&[0u8; SLOT_LEN]), None, "never written");
        assert_eq!(decode_slot(&slot[..SLOT_LEN - 1]), None, "short");
        let longest = "9".repeat(TEXT_MAX);
        assert_eq!(
            decode_slot(&encode_slot(1, &longest).unwrap()).unwrap().1,
            longest
        );
        assert!(encode_slot(1, &"9".repeat(TEXT_MAX + 1)).is_err());
    }

    #[test]
    fn saves_round_trip_and_alternate_slots_without_changing_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_in(&dir);
        assert_eq!(c.load().unwrap(), None, "no file yet");
        c.save("since:1700000000000").unwrap();
        assert_eq!(len(&c), FILE_LEN as u64);
        assert_eq!(c.load().unwrap().as_deref(), Some("since:1700000000000"));
        for id in 1..=5u64 {
            c.save(&id.to_string()).unwrap();
            assert_eq!(len(&c), FILE_LEN as u64);
        }
        let bytes = std::fs::read(&c.path).unwrap();
        // Sequence 6 (the fifth save after 1) in slot 0, 5 in slot 1.
        assert_eq!(decode_slot(&bytes[..]), Some((6, "5".into())));
        assert_eq!(decode_slot(&bytes[SLOT_SPAN..]), Some((5, "4".into())));
        // A new reader (a restart) sees the newest, and goes on from its sequence.
        let mut again = file_in(&dir);
        assert_eq!(again.load().unwrap().as_deref(), Some("5"));
        again.save("6").unwrap();
        assert_eq!(file_in(&dir).load().unwrap().as_deref(), Some("6"));
        assert!(!c.path.with_extension("cursor.tmp").exists(), "renamed");
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_and_is_the_next_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_in(&dir);
        c.save("10").unwrap(); // seq 1, slot 1
        c.save("11").unwrap(); // seq 2, slot 0
        // A save of "12" (seq 3, slot 1) torn after its first 20 bytes.
        let whole = encode_slot(3, "12").unwrap();
        let f = OpenOptions::new().write(true).open(&c.path).unwrap();
        f.write_all_at(&whole[..20], SLOT_SPAN as u64).unwrap();
        let mut after = file_in(&dir);
        assert_eq!(after.load().unwrap().as_deref(), Some("11"));
        // The next save goes to the torn slot, not over the valid one.
        after.save("12").unwrap();
        let bytes = std::fs::read(&c.path).unwrap();
        assert_eq!(decode_slot(&bytes[SLOT_SPAN..]), Some((3, "12".into())));
        assert_eq!(decode_slot(&bytes[..]), Some((2, "11".into())));
        // Torn the other way: the newest slot zeroed (as a write of its first sector lost).
        f.write_all_at(&[0u8; SLOT_LEN], SLOT_SPAN as u64).unwrap();
        assert_eq!(file_in(&dir).load().unwrap().as_deref(), Some("11"));
        // The higher sequence wins wherever it is.
        let mut bytes = vec![0u8; FILE_LEN];
        bytes[..SLOT_LEN].copy_from_slice(&encode_slot(9, "b").unwrap());
        bytes[SLOT_SPAN..SLOT_SPAN + SLOT_LEN].copy_from_slice(&encode_slot(8, "a").unwrap());
        assert_eq!(
            decode(&bytes),
            Stored::Slots {
                seq: 9,
                text: "b".into()
            }
        );
        assert_eq!(decode(&vec![0u8; FILE_LEN]), Stored::Damaged);
    }

    #[test]
    fn an_old_format_file_is_read_and_replaced_by_the_next_save() {
        for old in ["41", "41\n", "since:1700000000000"] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = file_in(&dir);
            std::fs::write(&c.path, old).unwrap();
            assert_eq!(decode(old.as_bytes()), Stored::Old(old.into()));
            assert_eq!(c.load().unwrap().as_deref(), Some(old), "read as it was");
            assert_eq!(std::fs::read_to_string(&c.path).unwrap(), old, "untouched");
            c.save("42").unwrap();
            assert_eq!(len(&c), FILE_LEN as u64, "now in the slot format");
            c.save("43").unwrap();
            assert_eq!(file_in(&dir).load().unwrap().as_deref(), Some("43"));
        }
    }

    #[test]
    fn a_damaged_file_is_an_error_and_the_next_save_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = file_in(&dir);
        std::fs::write(&c.path, vec![0u8; FILE_LEN]).unwrap();
        assert_eq!(c.load().unwrap_err().kind(), ErrorKind::InvalidData);
        c.save("since:5").unwrap();
        assert_eq!(file_in(&dir).load().unwrap().as_deref(), Some("since:5"));
    }
}
