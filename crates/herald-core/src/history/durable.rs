//! Durable history in an embedded redb database (`DIR/herald.redb`): each append is one fsynced
//! transaction holding its events, the retention trim and the counters, so a crash loses nothing
//! that was acknowledged and never leaves a half-applied append. Blocking I/O runs off the runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::row::{decode_row, encode_row, published_at};
use super::{Chunk, Gap, History, HistoryError, ReadFrom, Retention, continues, fresh_base};
use crate::event::{Event, EventId, Message, now_ms};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FILE: &str = "herald.redb";
/// Version of the row and meta layout below; a file with another one is refused. Format 2 added
/// the private bit to a row's flags byte; a format-1 file is read as is (its rows have no private
/// bit) and marked format 2, so an older herald, which would ignore the bit, refuses it.
const FORMAT: u64 = 2;
const FORMAT_WITHOUT_PRIVATE: u64 = 1;
/// Stored bytes counted per event on top of its row, for `max_bytes` (keys and B-tree overhead).
const ROW_OVERHEAD: u64 = 32;

/// Why a data directory could not be opened. Startup stops on it; nothing in DIR is overwritten.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use data dir {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data dir {0} is not empty and holds no herald data: give an empty or missing folder, or one herald wrote"
    )]
    Foreign(PathBuf),
    #[error("{0} is not a herald data file (no herald metadata in it); refusing to touch it")]
    NotHerald(PathBuf),
    #[error("{path} was written in format {found}; this herald reads format {FORMAT}")]
    Format { path: PathBuf, found: u64 },
    #[error("{0} is in use by another herald process")]
    InUse(PathBuf),
    #[error("{path} cannot be opened (corrupt or unreadable): {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// History kept on disk; survives restarts and crashes.
#[derive(Debug)]
pub struct DurableHistory {
    path: PathBuf,
    retention: Retention,
    /// `None` after a failed write: redb refuses further writes on a handle that saw an I/O error,
    /// so the next append reopens the file (which also recovers it).
    db: Mutex<Option<Arc<Database>>>,
}

/// Counters kept in the meta table, updated in the same transaction as the events.
#[derive(Debug, Clone, Copy)]
struct Meta {
    first_issued: u64,
    next: u64,
    count: u64,
    bytes: u64,
    /// Publish time of the newest dropped event, plus one (0: none dropped).
    dropped_at_plus1: u64,
    last_published_ms: u64,
}

impl Meta {
    fn load(table: &impl ReadableTable<&'static str, u64>) -> Result<Meta, redb::StorageError> {
        let get = |k: &str| -> Result<u64, redb::StorageError> {
            Ok(table.get(k)?.map(|v| v.value()).unwrap_or(0))
        };
        Ok(Meta {
            first_issued: get("first_issued")?,
            next: get("next")?,
            count: get("count")?,
            bytes: get("bytes")?,
            dropped_at_plus1: get("dropped_at_plus1")?,
            last_published_ms: get("last_published_ms")?,
        })
    }

    fn store(&self, table: &mut redb::Table<&'static str, u64>) -> Result<(), redb::StorageError> {
        table.insert("first_issued", self.first_issued)?;
        table.insert("next", self.next)?;
        table.insert("count", self.count)?;
        table.insert("bytes", self.bytes)?;
        table.insert("dropped_at_plus1", self.dropped_at_plus1)?;
        table.insert("last_published_ms", self.last_published_ms)?;
        Ok(())
    }
}

fn unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

impl DurableHistory {
    /// Opens (or creates) the history in `dir`. Fast on a large history: reads only the counters.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, OpenError> {
        Self::open_starting_at(dir, retention, fresh_base())
    }

    /// As [`open`](Self::open); a fresh store gives its first event id `first`.
    pub fn open_starting_at(
        dir: &Path,
        retention: Retention,
        first: u64,
    ) -> Result<Self, OpenError> {
        let io = |source| OpenError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE);
        let existed = path.exists();
        if !existed && std::fs::read_dir(dir).map_err(io)?.next().is_some() {
            return Err(OpenError::Foreign(dir.to_owned()));
        }
        let db = open_file(&path)?;
        let txn = db.begin_write().map_err(|e| corrupt(&path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| corrupt(&path, e))?;
            let format = meta
                .get("format")
                .map_err(|e| corrupt(&path, e))?
                .map(|v| v.value());
            match format {
                Some(FORMAT) => {}
                Some(FORMAT_WITHOUT_PRIVATE) => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| corrupt(&path, e))?;
                }
                Some(found) => return Err(OpenError::Format { path, found }),
                None if existed => return Err(OpenError::NotHerald(path)),
                None => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| corrupt(&path, e))?;
                    let fresh = Meta {
                        first_issued: first,
                        next: first,
                        count: 0,
                        bytes: 0,
                        dropped_at_plus1: 0,
                        last_published_ms: 0,
                    };
                    fresh.store(&mut meta).map_err(|e| corrupt(&path, e))?;
                }
            }
            txn.open_table(EVENTS).map_err(|e| corrupt(&path, e))?;
        }
        txn.commit().map_err(|e| corrupt(&path, e))?;
        Ok(DurableHistory {
            path,
            retention,
            db: Mutex::new(Some(Arc::new(db))),
        })
    }

    fn handle(&self) -> Result<Arc<Database>, HistoryError> {
        let mut slot = self.db.lock();
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let db = Arc::new(open_file(&self.path).map_err(unavailable)?);
        tracing::info!(path = %self.path.display(), "history store reopened");
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Drops our handle after a write failure so the next append reopens the file.
    fn poison(&self, db: &Arc<Database>) {
        let mut slot = self.db.lock();
        if slot.as_ref().is_some_and(|d| Arc::ptr_eq(d, db)) {
            *slot = None;
        }
    }

    fn append_blocking(
        db: &Database,
        retention: &Retention,
        messages: Vec<Message>,
    ) -> Result<Vec<Arc<Event>>, HistoryError> {
        let txn = db.begin_write().map_err(unavailable)?;
        let mut out = Vec::with_capacity(messages.len());
        {
            let mut events = txn.open_table(EVENTS).map_err(unavailable)?;
            let mut meta_table = txn.open_table(META).map_err(unavailable)?;
            let mut meta = Meta::load(&meta_table).map_err(unavailable)?;
            let now = now_ms().max(meta.last_published_ms);
            meta.last_published_ms = now;
            let mut row = Vec::new();
            for message in messages {
                row.clear();
                encode_row(&mut row, now, &message);
                events
                    .insert(meta.next, row.as_slice())
                    .map_err(unavailable)?;
                meta.bytes += row.len() as u64 + ROW_OVERHEAD;
                meta.count += 1;
                out.push(Arc::new(Event::new(EventId(meta.next), message, now)));
                meta.next += 1;
            }
            let cutoff = retention.cutoff_ms(now);
            trim(&mut events, &mut meta, retention, cutoff)?;
            meta.store(&mut meta_table).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(out)
    }

    fn read_blocking(db: &Database, from: ReadFrom, limit: usize) -> Result<Chunk, HistoryError> {
        let txn = db.begin_read().map_err(unavailable)?;
        let events = txn.open_table(EVENTS).map_err(unavailable)?;
        let meta = Meta::load(&txn.open_table(META).map_err(unavailable)?).map_err(unavailable)?;
        let oldest = events.first().map_err(unavailable)?.map(|(k, _)| k.value());
        let (gap, start) = match from {
            ReadFrom::Oldest => (None, oldest),
            ReadFrom::After(a) => {
                if continues(a.0, meta.first_issued, meta.next, oldest) {
                    (None, Some(a.0 + 1))
                } else {
                    (
                        Some(Gap {
                            oldest: oldest.map(EventId),
                        }),
                        oldest,
                    )
                }
            }
            ReadFrom::Since(at) => {
                if meta.dropped_at_plus1 > at {
                    (
                        Some(Gap {
                            oldest: oldest.map(EventId),
                        }),
                        oldest,
                    )
                } else {
                    (
                        None,
                        first_published_at_or_after(&events, oldest, meta.next, at)?,
                    )
                }
            }
        };
        let mut out = Vec::new();
        if let Some(start) = start {
            for entry in events.range(start..).map_err(unavailable)?.take(limit) {
                let (k, v) = entry.map_err(unavailable)?;
                out.push(Arc::new(decode_row(k.value(), v.value())?));
            }
        }
        Ok(Chunk { gap, events: out })
    }

    fn maintain_blocking(db: &Database, retention: &Retention) -> Result<(), HistoryError> {
        let Some(cutoff) = retention.cutoff_ms(now_ms()) else {
            return Ok(());
        };
        // Look first, so an idle hub does not write (and fsync) every period.
        let stale = {
            let txn = db.begin_read().map_err(unavailable)?;
            let events = txn.open_table(EVENTS).map_err(unavailable)?;
            match events.first().map_err(unavailable)? {
                Some((_, v)) => published_at(v.value()).is_some_and(|p| p < cutoff),
                None => false,
            }
        };
        if !stale {
            return Ok(());
        }
        let txn = db.begin_write().map_err(unavailable)?;
        {
            let mut events = txn.open_table(EVENTS).map_err(unavailable)?;
            let mut meta_table = txn.open_table(META).map_err(unavailable)?;
            let mut meta = Meta::load(&meta_table).map_err(unavailable)?;
            trim(&mut events, &mut meta, retention, Some(cutoff))?;
            meta.store(&mut meta_table).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)
    }
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn open_file(path: &Path) -> Result<Database, OpenError> {
    match Database::create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(OpenError::InUse(path.to_owned())),
        Err(e) => Err(corrupt(path, e)),
    }
}

/// Drops the oldest events while any retention limit is exceeded.
fn trim(
    events: &mut redb::Table<u64, &'static [u8]>,
    meta: &mut Meta,
    retention: &Retention,
    cutoff: Option<u64>,
) -> Result<(), HistoryError> {
    loop {
        let over_count = meta.count > retention.max_events as u64;
        let over_bytes = retention.max_bytes.is_some_and(|m| meta.bytes > m);
        if !over_count && !over_bytes && cutoff.is_none() {
            return Ok(());
        }
        let oldest = events
            .first()
            .map_err(unavailable)?
            .map(|(k, v)| (k.value(), published_at(v.value()), v.value().len()));
        let Some((id, at, len)) = oldest else {
            return Ok(());
        };
        let aged = cutoff.is_some_and(|c| at.is_some_and(|a| a < c));
        if !over_count && !over_bytes && !aged {
            return Ok(());
        }
        events.remove(id).map_err(unavailable)?;
        meta.count -= 1;
        meta.bytes = meta.bytes.saturating_sub(len as u64 + ROW_OVERHEAD);
        meta.dropped_at_plus1 = meta.dropped_at_plus1.max(at.unwrap_or(0) + 1);
    }
}

/// Binary search over the retained ids (consecutive) for the first event published at or after `at`.
fn first_published_at_or_after(
    events: &impl ReadableTable<u64, &'static [u8]>,
    oldest: Option<u64>,
    next: u64,
    at: u64,
) -> Result<Option<u64>, HistoryError> {
    let Some(mut lo) = oldest else {
        return Ok(None);
    };
    let mut hi = next;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let t = match events.get(mid).map_err(unavailable)? {
            Some(v) => published_at(v.value()).ok_or_else(|| HistoryError::Corrupt {
                id: mid,
                reason: "short row".into(),
            })?,
            None => u64::MAX,
        };
        if t < at {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok((lo < next).then_some(lo))
}

#[async_trait]
impl History for DurableHistory {
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError> {
        let db = self.handle()?;
        let retention = self.retention;
        let result = tokio::task::spawn_blocking({
            let db = db.clone();
            move || Self::append_blocking(&db, &retention, messages)
        })
        .await
        .map_err(unavailable)?;
        if let Err(e) = &result {
            tracing::error!(error = %e, "history append failed");
            self.poison(&db);
        }
        result
    }

    async fn read(&self, from: ReadFrom, limit: usize) -> Result<Chunk, HistoryError> {
        let db = self.handle()?;
        tokio::task::spawn_blocking(move || Self::read_blocking(&db, from, limit))
            .await
            .map_err(unavailable)?
    }

    async fn maintain(&self) -> Result<(), HistoryError> {
        let db = self.handle()?;
        let retention = self.retention;
        let result = tokio::task::spawn_blocking({
            let db = db.clone();
            move || Self::maintain_blocking(&db, &retention)
        })
        .await
        .map_err(unavailable)?;
        if result.is_err() {
            self.poison(&db);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let root = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        super::super::conformance::run(|retention, first| {
            let dir = root.path().join(
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            );
            async move {
                Arc::new(DurableHistory::open_starting_at(&dir, retention, first).unwrap())
                    as Arc<dyn History>
            }
        })
        .await;
    }

    #[tokio::test]
    async fn survives_reopen_and_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention::default();
        let first = {
            let h = DurableHistory::open_starting_at(dir.path(), retention, 50).unwrap();
            h.append(vec![
                Message::broadcast().data("a"),
                Message::broadcast().data("b"),
            ])
            .await
            .unwrap()
        };
        let h = DurableHistory::open(dir.path(), retention).unwrap();
        let next = h
            .append(vec![Message::broadcast().data("c")])
            .await
            .unwrap();
        assert_eq!(first[0].id, EventId(50));
        assert_eq!(next[0].id, EventId(52), "ids continue after a restart");
        let c = h.read(ReadFrom::After(EventId(50)), 10).await.unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!((c.gap, data), (None, vec!["b", "c"]));
    }

    #[test]
    fn refuses_foreign_dirs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            DurableHistory::open(dir.path(), Retention::default()),
            Err(OpenError::Foreign(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), vec![0x42; 8192]).unwrap();
        let err = DurableHistory::open(dir.path(), Retention::default()).unwrap_err();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join(FILE)).unwrap(),
            vec![0x42; 8192],
            "untouched"
        );
    }

    #[test]
    fn a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        assert!(matches!(
            DurableHistory::open(dir.path(), Retention::default()),
            Err(OpenError::InUse(_))
        ));
    }
}
