//! Durable history in an embedded redb database (`DIR/herald.redb`) with a write-ahead log in
//! front of it (`DIR/herald.wal`, see `wal.rs`): each append is one redb transaction holding its
//! events, the retention trim and the counters, and is answered only once it is on disk (its log
//! record synced, or the transaction itself committed durably), so a crash loses nothing that was
//! acknowledged and never leaves a half-applied append: opening replays the logged appends redb
//! had not made durable. Blocking I/O runs off the runtime.
//! Every row carries a checksum: a damaged row is reported at startup, skipped by reads (readers
//! get a `herald.gap` in its place and everything else), and `herald check` finds and repairs it.
//! With retention rules, every event stays in the one `events` table (reads scan it in id order,
//! as without rules), and an index per log (`log_index`: log, id) lets each log trim its own
//! oldest events by its own bounds; `logs` holds each log's counters and newest drops. The index
//! is rebuilt when the file was last opened with other rules (events then go to the log the new
//! rules give them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::row::{decode_body, decode_row, encode_checked_row, lost_row, published_at};
use super::rules::{Drop, Dropped, counts_for_all, ends_stream, millis};
use super::wal::{self, Record, Wal};
use super::{
    Chunk, Gap, History, HistoryError, Interest, ReadFrom, Retention, continues, fresh_base,
};
use crate::event::{Event, EventId, Message, now_ms};
use crate::name::Selector;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// With retention rules: each log's events, by (log, id).
const LOG_INDEX: TableDefinition<(u64, u64), ()> = TableDefinition::new("log_index");
/// With retention rules: each log's [`LogMeta`].
const LOGS: TableDefinition<u64, [u64; 8]> = TableDefinition::new("logs");
/// With `after-complete` rules: (log, topic) -> [id, ms] of the topic's newest end event.
const ENDS: TableDefinition<(u64, &str), [u64; 2]> = TableDefinition::new("ends");
/// The rules the log index was built for: `"selectors"` -> the rules' selectors, one a line.
const RULES: TableDefinition<&str, &str> = TableDefinition::new("rules");
const FILE: &str = "herald.redb";
/// Version of the row and meta layout below; a file with another one is refused. Format 2 added
/// the private bit to a row's flags byte; format 3 put a CRC-32 before every row. A format-1 or -2
/// file is rewritten as format 3 when opened (in one transaction), so an older herald refuses it.
const FORMAT: u64 = 3;
const FORMAT_WITHOUT_CHECKSUM: u64 = 2;
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
    #[error(
        "{path} cannot be opened (corrupt or unreadable): {reason}. `herald check --repair` mends damaged rows, not a file redb itself cannot open (a damaged page found after an unclean stop): restore it from a backup, or move it aside to start with an empty history"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("data dir {0} is a file, not a folder: give a folder (it is created if missing)")]
    NotADir(PathBuf),
}

/// What [`DurableHistory::check`] found in a data dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Rows read.
    pub rows: u64,
    /// Ids of rows whose checksum or layout is wrong (before a repair).
    pub damaged: Vec<u64>,
    /// Ids of rows a past repair marked as lost.
    pub lost: Vec<u64>,
    /// Damaged rows replaced by lost-markers in this check.
    pub repaired: u64,
}

/// History kept on disk; survives restarts and crashes.
#[derive(Debug)]
pub struct DurableHistory {
    path: PathBuf,
    retention: Retention,
    /// `None` after a failed write: redb refuses further writes on a handle that saw an I/O error,
    /// so the next append reopens the file (which also recovers it and replays the log).
    db: Mutex<Option<Arc<Store>>>,
    /// Set when an append failed after its log record was written and the record could not be
    /// unwritten: whether it is published is then decided by the next start (which replays it),
    /// so appending stops until then rather than replay it behind a failure's answer.
    unsettled: Arc<AtomicBool>,
}

/// The redb file and its write-ahead log, opened together.
#[derive(Debug)]
struct Store {
    db: Database,
    /// Taken by each append for its whole transaction (appends are one at a time anyway).
    wal: Mutex<Wal>,
}

impl Store {
    /// Opens the log beside `db` and replays into `db` what it holds that `db` lost.
    fn attach(db: Database, dir: &Path, retention: &Retention) -> Result<Store, String> {
        let (wal, records) = Wal::open(dir).map_err(|e| format!("{}: {e}", wal::FILE))?;
        let replayed = replay(&db, retention, records).map_err(|e| e.to_string())?;
        if replayed > 0 {
            tracing::info!(
                events = replayed,
                "replayed appends from the write-ahead log that the redb file had not yet made durable"
            );
        }
        Ok(Store {
            db,
            wal: Mutex::new(wal),
        })
    }
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
    /// With retention rules: events dropped so far, by any log (see `Chunk::drops`).
    drops: u64,
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
            drops: get("drops")?,
        })
    }

    fn store(&self, table: &mut redb::Table<&'static str, u64>) -> Result<(), redb::StorageError> {
        table.insert("first_issued", self.first_issued)?;
        table.insert("next", self.next)?;
        table.insert("count", self.count)?;
        table.insert("bytes", self.bytes)?;
        table.insert("dropped_at_plus1", self.dropped_at_plus1)?;
        table.insert("last_published_ms", self.last_published_ms)?;
        if self.drops > 0 {
            table.insert("drops", self.drops)?;
        }
        Ok(())
    }
}

/// One log's counters, with retention rules (in `LOGS`; ids and times 0: none).
#[derive(Debug, Clone, Copy, Default)]
struct LogMeta {
    count: u64,
    bytes: u64,
    dropped: Dropped,
}

impl LogMeta {
    fn load(
        table: &impl ReadableTable<u64, [u64; 8]>,
        log: u64,
    ) -> Result<LogMeta, redb::StorageError> {
        let Some(v) = table.get(log)? else {
            return Ok(LogMeta::default());
        };
        let [
            count,
            bytes,
            any_id,
            any_ms,
            any_nth,
            addr_id,
            addr_ms,
            addr_nth,
        ] = v.value();
        let drop = |id: u64, at_ms: u64, nth: u64| (id != 0).then_some(Drop { id, at_ms, nth });
        Ok(LogMeta {
            count,
            bytes,
            dropped: Dropped {
                any: drop(any_id, any_ms, any_nth),
                addressed: drop(addr_id, addr_ms, addr_nth),
            },
        })
    }

    fn store(
        &self,
        table: &mut redb::Table<u64, [u64; 8]>,
        log: u64,
    ) -> Result<(), redb::StorageError> {
        let none = Drop {
            id: 0,
            at_ms: 0,
            nth: 0,
        };
        let any = self.dropped.any.unwrap_or(none);
        let addr = self.dropped.addressed.unwrap_or(none);
        table.insert(
            log,
            [
                self.count, self.bytes, any.id, any.at_ms, any.nth, addr.id, addr.at_ms, addr.nth,
            ],
        )?;
        Ok(())
    }
}

/// The rules' selectors, one a line: what the log index was built for.
fn signature(retention: &Retention) -> String {
    retention
        .rules
        .iter()
        .map(|r| r.topics.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rebuilds the log index for `retention`'s rules when it was built for others: every event goes
/// to the log these rules give it (an unreadable row to the default log). Nothing to do when the
/// rules are the ones the index was built for.
fn index_for_rules(db: &Database, retention: &Retention) -> Result<(), String> {
    let wanted = signature(retention);
    {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let built = match txn.open_table(RULES) {
            Ok(t) => t
                .get("selectors")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.to_string()),
        };
        if built.unwrap_or_default() == wanted {
            return Ok(());
        }
    }
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.delete_table(LOG_INDEX).map_err(|e| e.to_string())?;
    txn.delete_table(LOGS).map_err(|e| e.to_string())?;
    txn.delete_table(ENDS).map_err(|e| e.to_string())?;
    {
        let events = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
        let mut index = txn.open_table(LOG_INDEX).map_err(|e| e.to_string())?;
        let mut logs = txn.open_table(LOGS).map_err(|e| e.to_string())?;
        let mut ends = txn.open_table(ENDS).map_err(|e| e.to_string())?;
        let mut metas = vec![LogMeta::default(); retention.rules.logs()];
        if !retention.rules.is_empty() {
            for entry in events.iter().map_err(|e| e.to_string())? {
                let (k, v) = entry.map_err(|e| e.to_string())?;
                let (id, row) = (k.value(), v.value());
                let event = decode_row(id, row).ok();
                let log = event
                    .as_ref()
                    .map_or(0, |e| retention.rules.log_of(&e.targets));
                index
                    .insert((log as u64, id), ())
                    .map_err(|e| e.to_string())?;
                metas[log].count += 1;
                metas[log].bytes += row.len() as u64 + ROW_OVERHEAD;
                if let Some(e) = &event {
                    note_end(&mut ends, retention, log, e).map_err(|e| e.to_string())?;
                }
            }
            for (log, meta) in metas.iter().enumerate() {
                meta.store(&mut logs, log as u64)
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut rules = txn.open_table(RULES).map_err(|e| e.to_string())?;
        rules
            .insert("selectors", wanted.as_str())
            .map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Records `event` as its topics' end in `log`, when it ends their streams and the log's rule has
/// `after-complete`.
fn note_end(
    ends: &mut redb::Table<(u64, &'static str), [u64; 2]>,
    retention: &Retention,
    log: usize,
    event: &Event,
) -> Result<(), redb::StorageError> {
    let keeps_ends = retention
        .rules
        .rule(log)
        .is_some_and(|r| r.after_complete.is_some());
    if keeps_ends && ends_stream(event) {
        for t in &event.targets.topics {
            ends.insert(
                (log as u64, t.as_str()),
                [event.id.0, event.published_at_ms],
            )?;
        }
    }
    Ok(())
}

/// The oldest event of `log` when a bound drops it now: `over` (its count or bytes bound is
/// exceeded), its age, or its stream's end longer than `after-complete` ago. Reads the row only
/// when a bound could drop it (`over`, or the log has an age or `after-complete` bound), and
/// decodes it only when it goes or to check `after-complete` (for a log with ends recorded), so
/// an append that exceeds no bound costs each log nothing, or one row lookup with an age bound.
fn droppable_front(
    events: &impl ReadableTable<u64, &'static [u8]>,
    index: &impl ReadableTable<(u64, u64), ()>,
    ends: &impl ReadableTable<(u64, &'static str), [u64; 2]>,
    retention: &Retention,
    log: usize,
    now: u64,
    over: bool,
) -> Result<Option<Front>, redb::StorageError> {
    let keep = retention.bounds_of(log);
    let after = retention.rules.rule(log).and_then(|r| r.after_complete);
    if !over && keep.max_age.is_none() && after.is_none() {
        return Ok(None);
    }
    let Some(first) = index
        .range((log as u64, 0)..=(log as u64, u64::MAX))?
        .next()
    else {
        return Ok(None);
    };
    let id = first?.0.value().1;
    #[cfg(test)]
    tests::FRONT_ROWS.with(|n| n.set(n.get() + 1));
    let Some(row) = events.get(id)? else {
        return Ok(Some(Front {
            id,
            at: 0,
            len: 0,
            event: None,
        }));
    };
    let row = row.value();
    let at = published_at(row).unwrap_or(0);
    let aged = keep.cutoff_ms(now).is_some_and(|c| at < c);
    let may_have_ended = !over
        && !aged
        && after.is_some()
        && ends
            .range((log as u64, "")..(log as u64 + 1, ""))?
            .next()
            .is_some();
    if !over && !aged && !may_have_ended {
        return Ok(None);
    }
    #[cfg(test)]
    tests::FRONT_DECODES.with(|n| n.set(n.get() + 1));
    let event = decode_row(id, row).ok();
    let ended = match (&event, after) {
        (Some(e), Some(after)) if may_have_ended && !e.targets.topics.is_empty() => {
            let mut all = true;
            for t in &e.targets.topics {
                let end = ends.get((log as u64, t.as_str()))?.map(|v| v.value());
                all &= end.is_some_and(|[end_id, end_ms]| {
                    end_id >= id && end_ms.saturating_add(millis(after)) <= now
                });
            }
            all
        }
        _ => false,
    };
    if !over && !aged && !ended {
        return Ok(None);
    }
    Ok(Some(Front {
        id,
        at,
        len: row.len() as u64,
        event,
    }))
}

/// A log's oldest event, as [`droppable_front`] found it.
struct Front {
    id: u64,
    at: u64,
    len: u64,
    /// `None` for an unreadable row (counted as addressed when dropped: any reader may miss it).
    event: Option<Event>,
}

/// Drops the oldest events of each log while one of its bounds is exceeded.
fn trim_logs(
    txn: &redb::WriteTransaction,
    events: &mut redb::Table<u64, &'static [u8]>,
    meta: &mut Meta,
    retention: &Retention,
    now: u64,
) -> Result<(), HistoryError> {
    let mut index = txn.open_table(LOG_INDEX).map_err(unavailable)?;
    let mut logs = txn.open_table(LOGS).map_err(unavailable)?;
    let mut ends = txn.open_table(ENDS).map_err(unavailable)?;
    for log in 0..retention.rules.logs() {
        let keep = retention.bounds_of(log);
        let mut counters = LogMeta::load(&logs, log as u64).map_err(unavailable)?;
        let before = (counters.count, counters.dropped);
        loop {
            let over = counters.count > keep.max_events as u64
                || keep.max_bytes.is_some_and(|m| counters.bytes > m);
            let Some(front) = droppable_front(&*events, &index, &ends, retention, log, now, over)
                .map_err(unavailable)?
            else {
                break;
            };
            events.remove(front.id).map_err(unavailable)?;
            index.remove((log as u64, front.id)).map_err(unavailable)?;
            counters.count = counters.count.saturating_sub(1);
            counters.bytes = counters.bytes.saturating_sub(front.len + ROW_OVERHEAD);
            meta.count = meta.count.saturating_sub(1);
            meta.bytes = meta.bytes.saturating_sub(front.len + ROW_OVERHEAD);
            meta.dropped_at_plus1 = meta.dropped_at_plus1.max(front.at + 1);
            let counts_for_all = front
                .event
                .as_ref()
                .is_none_or(|e| counts_for_all(&e.targets, retention.rules.rule(log)));
            meta.drops += 1;
            counters
                .dropped
                .record(front.id, front.at, meta.drops, counts_for_all);
            if let Some(e) = &front.event {
                for t in &e.targets.topics {
                    let key = (log as u64, t.as_str());
                    let ends_here = ends
                        .get(key)
                        .map_err(unavailable)?
                        .is_some_and(|v| v.value()[0] == front.id);
                    if ends_here {
                        ends.remove(key).map_err(unavailable)?;
                    }
                }
            }
        }
        if (counters.count, counters.dropped) != before {
            counters.store(&mut logs, log as u64).map_err(unavailable)?;
        }
    }
    Ok(())
}

/// Whether some log's oldest event is past its age or `after-complete` (maintenance then writes).
fn any_log_expired(db: &Database, retention: &Retention, now: u64) -> Result<bool, HistoryError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let events = txn.open_table(EVENTS).map_err(unavailable)?;
    let index = txn.open_table(LOG_INDEX).map_err(unavailable)?;
    let ends = txn.open_table(ENDS).map_err(unavailable)?;
    for log in 0..retention.rules.logs() {
        if droppable_front(&events, &index, &ends, retention, log, now, false)
            .map_err(unavailable)?
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The tables an append writes, open in its transaction.
struct Writer<'t> {
    events: redb::Table<'t, u64, &'static [u8]>,
    meta_table: redb::Table<'t, &'static str, u64>,
    meta: Meta,
    ruled: Option<RuledTables<'t>>,
}

/// With retention rules: the log index, the stream ends, and what each log gained (events, bytes).
struct RuledTables<'t> {
    index: redb::Table<'t, (u64, u64), ()>,
    ends: redb::Table<'t, (u64, &'static str), [u64; 2]>,
    added: Vec<(u64, u64)>,
}

impl<'t> Writer<'t> {
    fn open(txn: &'t redb::WriteTransaction, retention: &Retention) -> Result<Self, HistoryError> {
        let events = txn.open_table(EVENTS).map_err(unavailable)?;
        let meta_table = txn.open_table(META).map_err(unavailable)?;
        let meta = Meta::load(&meta_table).map_err(unavailable)?;
        let ruled = if retention.rules.is_empty() {
            None
        } else {
            Some(RuledTables {
                index: txn.open_table(LOG_INDEX).map_err(unavailable)?,
                ends: txn.open_table(ENDS).map_err(unavailable)?,
                added: vec![(0, 0); retention.rules.logs()],
            })
        };
        Ok(Writer {
            events,
            meta_table,
            meta,
            ruled,
        })
    }

    /// Stores `event` (whose id is `meta.next`) as `row`.
    fn insert(
        &mut self,
        retention: &Retention,
        row: &[u8],
        event: &Event,
    ) -> Result<(), HistoryError> {
        debug_assert_eq!(event.id.0, self.meta.next);
        self.events
            .insert(self.meta.next, row)
            .map_err(unavailable)?;
        let stored = row.len() as u64 + ROW_OVERHEAD;
        self.meta.bytes += stored;
        self.meta.count += 1;
        if let Some(RuledTables { index, ends, added }) = self.ruled.as_mut() {
            let log = retention.rules.log_of(&event.targets);
            index
                .insert((log as u64, self.meta.next), ())
                .map_err(unavailable)?;
            note_end(ends, retention, log, event).map_err(unavailable)?;
            added[log].0 += 1;
            added[log].1 += stored;
        }
        self.meta.next += 1;
        Ok(())
    }

    /// Updates the logs' counters, trims by retention as of `trim_at` (`None`: not now) and
    /// stores the counters.
    fn finish(
        mut self,
        txn: &'t redb::WriteTransaction,
        retention: &Retention,
        trim_at: Option<u64>,
    ) -> Result<(), HistoryError> {
        if let Some(RuledTables { index, ends, added }) = self.ruled.take() {
            drop((index, ends));
            let mut logs = txn.open_table(LOGS).map_err(unavailable)?;
            for (log, (count, bytes)) in added.into_iter().enumerate() {
                if count > 0 {
                    let mut m = LogMeta::load(&logs, log as u64).map_err(unavailable)?;
                    m.count += count;
                    m.bytes += bytes;
                    m.store(&mut logs, log as u64).map_err(unavailable)?;
                }
            }
            drop(logs);
            if let Some(now) = trim_at {
                trim_logs(txn, &mut self.events, &mut self.meta, retention, now)?;
            }
        } else if let Some(now) = trim_at {
            let cutoff = retention.cutoff_ms(now);
            trim(&mut self.events, &mut self.meta, retention, cutoff)?;
        }
        self.meta.store(&mut self.meta_table).map_err(unavailable)
    }
}

/// Stores, in one durable transaction, the logged appends `db` does not hold: those from its next
/// id on (a durable commit holds every append before it). Returns how many events it stored.
/// It trims nothing: the opener's retention may not be the server's (`herald check`), and the
/// next append or maintenance trims by the server's.
///
/// A log that does not continue `db`'s ids (a `herald.redb` restored from a backup beside a newer
/// log) is not replayed, but its ids are not reused: a lost-marker at its last id takes the
/// place of the events between, so a reader resuming from one of them gets a `herald.gap`.
fn replay(db: &Database, retention: &Retention, records: Vec<Record>) -> Result<u64, HistoryError> {
    let txn = db.begin_write().map_err(unavailable)?;
    let mut replayed = 0;
    let mut skipped_to = None;
    {
        let mut writer = Writer::open(&txn, retention)?;
        let logged_end = records
            .last()
            .map(|r| (r.first + r.rows.len() as u64, r.published_ms));
        for record in records {
            if record.first < writer.meta.next {
                continue;
            }
            if record.first > writer.meta.next {
                skipped_to = logged_end;
                break;
            }
            let now = record.published_ms.max(writer.meta.last_published_ms);
            writer.meta.last_published_ms = now;
            for row in &record.rows {
                let event = decode_row(writer.meta.next, row)?;
                writer.insert(retention, row, &event)?;
                replayed += 1;
            }
        }
        if let Some((end, published_ms)) = skipped_to {
            tracing::warn!(
                next = writer.meta.next,
                logged_through = end - 1,
                "the write-ahead log does not continue herald.redb (restored from a backup?): its events are not replayed, ids go on after them, and readers of the ids between get a herald.gap"
            );
            writer.meta.next = end - 1;
            let marker = Event::new(EventId(end - 1), Message::broadcast(), published_ms);
            writer.insert(retention, &lost_row(published_ms), &marker)?;
        }
        if replayed == 0 && skipped_to.is_none() {
            drop(writer);
            txn.abort().map_err(unavailable)?;
            return Ok(0);
        }
        writer.finish(&txn, retention, None)?;
    }
    txn.commit().map_err(unavailable)?;
    Ok(replayed)
}

/// An append whose record may be in the log failed: unwrites the record, so that it is answered
/// as failed and stays so (a reopen or restart would replay it otherwise). If even that fails,
/// marks the store unsettled: no more appends until a restart decides.
fn settle(wal: &mut Wal, unsettled: &AtomicBool, failure: HistoryError) -> HistoryError {
    if let Err(e) = wal.unlog() {
        tracing::error!(error = %e, "a failed append's write-ahead log record could not be unwritten: appends stop until herald restarts, which publishes it");
        unsettled.store(true, Ordering::Relaxed);
    }
    failure
}

/// Tests make an append fail after its record was logged (`tests::FAIL_AFTER_LOG`).
#[cfg_attr(not(test), allow(unused_variables))]
fn fail_after_log(logged: bool) -> Result<(), HistoryError> {
    #[cfg(test)]
    if logged && tests::FAIL_AFTER_LOG.swap(false, Ordering::Relaxed) {
        return Err(unavailable("test failure"));
    }
    Ok(())
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
        if dir.is_file() {
            return Err(OpenError::NotADir(dir.to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE);
        let existed = path.exists();
        // A log without its redb file is one a user left when deleting the history: its records
        // are older than the fresh store's ids, so replay skips them.
        let foreign = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(Result::ok)
            .any(|entry| entry.file_name() != wal::FILE);
        if !existed && foreign {
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
                Some(FORMAT_WITHOUT_PRIVATE | FORMAT_WITHOUT_CHECKSUM) => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| corrupt(&path, e))?;
                    let mut events = txn.open_table(EVENTS).map_err(|e| corrupt(&path, e))?;
                    add_checksums(&mut events).map_err(|e| corrupt(&path, e))?;
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
                        drops: 0,
                    };
                    fresh.store(&mut meta).map_err(|e| corrupt(&path, e))?;
                }
            }
            txn.open_table(EVENTS).map_err(|e| corrupt(&path, e))?;
        }
        txn.commit().map_err(|e| corrupt(&path, e))?;
        if existed {
            let report = scan(&db, false).map_err(|e| corrupt(&path, e))?;
            if !report.damaged.is_empty() {
                tracing::error!(
                    path = %path.display(),
                    damaged = report.damaged.len(),
                    ids = %id_list(&report.damaged),
                    "damaged event rows: readers get a herald.gap in their place; run `herald check --data-dir {} --repair`",
                    dir.display()
                );
            }
            if !report.lost.is_empty() {
                tracing::warn!(
                    path = %path.display(),
                    lost = report.lost.len(),
                    "rows marked lost by a past repair: readers get a herald.gap in their place"
                );
            }
        }
        index_for_rules(&db, &retention).map_err(|e| corrupt(&path, e))?;
        let store = Store::attach(db, dir, &retention).map_err(|e| corrupt(&path, e))?;
        Ok(DurableHistory {
            path,
            retention,
            db: Mutex::new(Some(Arc::new(store))),
            unsettled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Verifies every row of the history in `dir` (a herald must not be running on it); with
    /// `repair`, replaces each damaged row by a lost-marker, so readers skip it with a gap and a
    /// restart reports it no more. Also checks the file's own structure.
    pub fn check(dir: &Path, repair: bool) -> Result<CheckReport, OpenError> {
        let path = dir.join(FILE);
        if !path.is_file() {
            return Err(OpenError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no herald.redb in it"),
            });
        }
        // Opening migrates an older format and refuses a foreign file, as a start would.
        drop(Self::open(dir, Retention::default())?);
        let mut db = open_file(&path)?;
        let mut report = scan(&db, false).map_err(|e| corrupt(&path, e))?;
        if repair {
            if !report.damaged.is_empty() {
                report.repaired = scan(&db, true)
                    .map_err(|e| corrupt(&path, e))?
                    .damaged
                    .len() as u64;
            }
            // Then redb's own page checksums: the rewritten rows are on fresh pages by now.
            db.check_integrity().map_err(|e| corrupt(&path, e))?;
        }
        Ok(report)
    }

    fn handle(&self) -> Result<Arc<Store>, HistoryError> {
        if self.unsettled.load(Ordering::Relaxed) {
            return Err(HistoryError::Unavailable(
                "an append failed after its write-ahead log record was written, and the record could not be unwritten: restart herald (the restart publishes that append)".into(),
            ));
        }
        let mut slot = self.db.lock();
        if let Some(store) = slot.as_ref() {
            return Ok(store.clone());
        }
        let db = open_file(&self.path).map_err(unavailable)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let store = Arc::new(Store::attach(db, dir, &self.retention).map_err(unavailable)?);
        tracing::info!(path = %self.path.display(), "history store reopened");
        *slot = Some(store.clone());
        Ok(store)
    }

    /// Drops our handle after a write failure so the next append reopens the file.
    fn poison(&self, db: &Arc<Store>) {
        let mut slot = self.db.lock();
        if slot.as_ref().is_some_and(|d| Arc::ptr_eq(d, db)) {
            *slot = None;
        }
    }

    fn append_blocking(
        store: &Store,
        retention: &Retention,
        messages: Vec<Message>,
        unsettled: &AtomicBool,
    ) -> Result<Vec<Arc<Event>>, HistoryError> {
        let mut wal = store.wal.lock();
        let mut txn = store.db.begin_write().map_err(unavailable)?;
        let mut out = Vec::with_capacity(messages.len());
        {
            let mut writer = Writer::open(&txn, retention)?;
            let now = now_ms().max(writer.meta.last_published_ms);
            writer.meta.last_published_ms = now;
            wal.begin(writer.meta.next, now);
            let mut row = Vec::new();
            for message in messages {
                row.clear();
                encode_checked_row(&mut row, now, &message)?;
                let event = Event::new(EventId(writer.meta.next), message, now);
                writer.insert(retention, &row, &event)?;
                wal.push(&row);
                out.push(Arc::new(event));
            }
            writer.finish(&txn, retention, Some(now))?;
        }
        // Logged: the record on disk makes the append durable, redb's commit need not be. Not
        // logged (the ring is full, a checkpoint is due, the record is too large, or the disk has
        // no room to extend the ring): the commit is durable itself, and holds every record
        // before it.
        let logged = wal
            .log()
            .map_err(|e| settle(&mut wal, unsettled, unavailable(e)))?;
        let committed = if logged {
            txn.set_durability(Durability::None).map_err(unavailable)
        } else {
            Ok(())
        }
        .and_then(|()| fail_after_log(logged))
        .and_then(|()| txn.commit().map_err(unavailable));
        if let Err(e) = committed {
            return Err(if logged {
                settle(&mut wal, unsettled, e)
            } else {
                e
            });
        }
        if !logged {
            wal.checkpointed();
        }
        Ok(out)
    }

    fn read_blocking(
        db: &Database,
        retention: &Retention,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError> {
        let txn = db.begin_read().map_err(unavailable)?;
        let events = txn.open_table(EVENTS).map_err(unavailable)?;
        let meta = Meta::load(&txn.open_table(META).map_err(unavailable)?).map_err(unavailable)?;
        let oldest = events.first().map_err(unavailable)?.map(|(k, _)| k.value());
        let (gap, start) = if retention.rules.is_empty() {
            Self::verdict(&events, &meta, oldest, from)?
        } else {
            let logs = txn.open_table(LOGS).map_err(unavailable)?;
            let mut drops = Vec::with_capacity(retention.rules.logs());
            for log in 0..retention.rules.logs() {
                let m = LogMeta::load(&logs, log as u64).map_err(unavailable)?;
                drops.extend(m.dropped.against(interest, log));
            }
            let knows = |a: u64| {
                meta.next != meta.first_issued
                    && a.saturating_add(1) >= meta.first_issued
                    && a < meta.next
            };
            // What follows a gap starts at the oldest retained event the read asked for.
            match from {
                ReadFrom::Oldest => (None, oldest),
                ReadFrom::After(a) if knows(a.0) => {
                    let start = events
                        .range(a.0 + 1..)
                        .map_err(unavailable)?
                        .next()
                        .transpose()
                        .map_err(unavailable)?
                        .map(|(k, _)| k.value());
                    let gap = drops.iter().any(|d| d.id > a.0);
                    (
                        gap.then_some(Gap {
                            oldest: start.map(EventId),
                        }),
                        start,
                    )
                }
                ReadFrom::After(_) => (
                    Some(Gap {
                        oldest: oldest.map(EventId),
                    }),
                    oldest,
                ),
                ReadFrom::Since(at) => {
                    let start = first_published_at_or_after(&events, oldest, meta.next, at)?;
                    let gap = drops.iter().any(|d| d.at_ms >= at);
                    (
                        gap.then_some(Gap {
                            oldest: start.map(EventId),
                        }),
                        start,
                    )
                }
            }
        };
        let mut chunk = Self::scan_from(&events, gap, start, limit)?;
        chunk.drops = meta.drops;
        Ok(chunk)
    }

    /// The gap verdict and the first id to read, without retention rules (one log, ids consecutive).
    fn verdict(
        events: &impl ReadableTable<u64, &'static [u8]>,
        meta: &Meta,
        oldest: Option<u64>,
        from: ReadFrom,
    ) -> Result<(Option<Gap>, Option<u64>), HistoryError> {
        Ok(match from {
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
                        first_published_at_or_after(events, oldest, meta.next, at)?,
                    )
                }
            }
        })
    }

    /// Up to `limit` events from `start` on, skipping unreadable rows at the start (a gap).
    fn scan_from(
        events: &impl ReadableTable<u64, &'static [u8]>,
        gap: Option<Gap>,
        start: Option<u64>,
        limit: usize,
    ) -> Result<Chunk, HistoryError> {
        let mut out = Vec::new();
        let mut gap = gap;
        let mut cut_short = false;
        let mut skipped = Vec::new();
        if let Some(start) = start {
            for entry in events.range(start..).map_err(unavailable)? {
                if out.len() == limit {
                    break;
                }
                let (k, v) = entry.map_err(unavailable)?;
                match decode_row(k.value(), v.value()) {
                    Ok(event) => out.push(Arc::new(event)),
                    // Damaged after good events: stop before it; the next read reports the gap.
                    Err(_) if !out.is_empty() => {
                        cut_short = true;
                        break;
                    }
                    Err(_) => skipped.push(EventId(k.value())),
                }
            }
        }
        if !skipped.is_empty() {
            // The read begins with damaged rows: readers learn of a gap and get what follows.
            gap = Some(Gap {
                oldest: out.first().map(|e| e.id),
            });
        }
        Ok(Chunk {
            gap,
            events: out,
            cut_short,
            skipped,
            drops: 0,
        })
    }

    fn maintain_blocking(db: &Database, retention: &Retention) -> Result<(), HistoryError> {
        if !retention.rules.is_empty() {
            let now = now_ms();
            if !any_log_expired(db, retention, now)? {
                return Ok(());
            }
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut events = txn.open_table(EVENTS).map_err(unavailable)?;
                let mut meta_table = txn.open_table(META).map_err(unavailable)?;
                let mut meta = Meta::load(&meta_table).map_err(unavailable)?;
                trim_logs(&txn, &mut events, &mut meta, retention, now)?;
                meta.store(&mut meta_table).map_err(unavailable)?;
            }
            return txn.commit().map_err(unavailable);
        }
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
        // The first event at or after `mid` (with retention rules, ids leave holes).
        let found = events
            .range(mid..)
            .map_err(unavailable)?
            .next()
            .transpose()
            .map_err(unavailable)?;
        let t = match found {
            Some((k, v)) if k.value() < hi => {
                published_at(v.value()).ok_or_else(|| HistoryError::Corrupt {
                    id: k.value(),
                    reason: "short row".into(),
                })?
            }
            _ => u64::MAX,
        };
        if t < at {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok((lo < next).then_some(lo))
}

/// Rewrites every format-1/2 row as a stored (checksummed) row; a row that does not decode is
/// marked lost.
fn add_checksums(events: &mut redb::Table<u64, &'static [u8]>) -> Result<(), redb::StorageError> {
    let mut rows = Vec::new();
    for entry in events.iter()? {
        let (k, v) = entry?;
        let body = v.value();
        let row = if decode_body(k.value(), body).is_ok() {
            let mut row = crc32fast::hash(body).to_le_bytes().to_vec();
            row.extend_from_slice(body);
            row
        } else {
            lost_row(
                body.get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default())),
            )
        };
        rows.push((k.value(), row));
    }
    for (id, row) in rows {
        events.insert(id, row.as_slice())?;
    }
    Ok(())
}

/// Reads every row; with `repair`, replaces each damaged one by a lost-marker in one transaction.
fn scan(db: &Database, repair: bool) -> Result<CheckReport, String> {
    let mut report = CheckReport::default();
    {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let events = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
        for entry in events.iter().map_err(|e| e.to_string())? {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            report.rows += 1;
            match decode_row(k.value(), v.value()) {
                Ok(_) => {}
                Err(HistoryError::Lost { .. }) => report.lost.push(k.value()),
                Err(_) => report.damaged.push(k.value()),
            }
        }
    }
    if repair && !report.damaged.is_empty() {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut events = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
            let mut meta_table = txn.open_table(META).map_err(|e| e.to_string())?;
            let mut meta = Meta::load(&meta_table).map_err(|e| e.to_string())?;
            for id in &report.damaged {
                let old_len = events
                    .get(*id)
                    .map_err(|e| e.to_string())?
                    .map_or(0, |v| v.value().len());
                let at = events
                    .get(*id)
                    .map_err(|e| e.to_string())?
                    .and_then(|v| published_at(v.value()))
                    .filter(|at| *at <= meta.last_published_ms)
                    .unwrap_or(0);
                let row = lost_row(at);
                meta.bytes = meta.bytes.saturating_sub(old_len as u64) + row.len() as u64;
                events
                    .insert(*id, row.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            meta.store(&mut meta_table).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
    }
    Ok(report)
}

/// Ids as a short list for a log line: the first few, then how many more.
fn id_list(ids: &[u64]) -> String {
    let mut s: Vec<String> = ids.iter().take(10).map(u64::to_string).collect();
    if ids.len() > 10 {
        s.push(format!("and {} more", ids.len() - 10));
    }
    s.join(", ")
}

#[async_trait]
impl History for DurableHistory {
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError> {
        let db = self.handle()?;
        let retention = self.retention.clone();
        let result = tokio::task::spawn_blocking({
            let db = db.clone();
            let unsettled = self.unsettled.clone();
            move || Self::append_blocking(&db, &retention, messages, &unsettled)
        })
        .await
        .map_err(unavailable)?;
        if let Err(e) = &result {
            tracing::error!(error = %e, "history append failed");
            // Only a store error makes redb refuse the handle; a message it cannot hold does not.
            if matches!(e, HistoryError::Unavailable(_)) {
                self.poison(&db);
            }
        }
        result
    }

    async fn read_for(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError> {
        let db = self.handle()?;
        let retention = self.retention.clone();
        tokio::task::spawn_blocking(move || {
            Self::read_blocking(&db.db, &retention, from, limit, interest)
        })
        .await
        .map_err(unavailable)?
    }

    fn interest(&self, selectors: &[Selector]) -> Interest {
        self.retention.rules.interest(selectors)
    }

    async fn maintain(&self) -> Result<(), HistoryError> {
        let db = self.handle()?;
        let retention = self.retention.clone();
        let result = tokio::task::spawn_blocking({
            let db = db.clone();
            move || Self::maintain_blocking(&db.db, &retention)
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
    use super::super::row::encode_row;
    use super::*;
    use crate::name::{EventType, Topic, UserId};

    /// Makes the next logged append fail after its record was written (once).
    pub(super) static FAIL_AFTER_LOG: AtomicBool = AtomicBool::new(false);

    thread_local! {
        /// Log fronts whose row an append (on this thread) looked up, and those it decoded.
        pub(super) static FRONT_ROWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        pub(super) static FRONT_DECODES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

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
            let h = DurableHistory::open_starting_at(dir.path(), retention.clone(), 50).unwrap();
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

    /// Closing the store (dropping it: a clean stop) leaves every append in herald.redb, so the
    /// log is not needed to open it: redb's own close makes its non-durable commits durable.
    #[tokio::test]
    async fn a_clean_close_leaves_everything_in_the_redb_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
            h.append(vec![Message::broadcast().data("a")])
                .await
                .unwrap();
            h.append(vec![Message::broadcast().data("b")])
                .await
                .unwrap();
        }
        std::fs::remove_file(dir.path().join(wal::FILE)).unwrap();
        let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        let all = h.read(ReadFrom::Oldest, 10).await.unwrap();
        let data: Vec<&str> = all.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a", "b"]);
    }

    /// A crash (power loss) forgets redb's non-durable commits; their log records bring them back,
    /// with their ids, and a torn last record is an append that was never answered.
    #[tokio::test]
    async fn appends_the_redb_file_lost_are_replayed_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention::default();
        let db_file = dir.path().join(FILE);
        let saved = dir.path().join("saved.redb");
        {
            let h = DurableHistory::open_starting_at(dir.path(), retention.clone(), 100).unwrap();
            h.append(vec![Message::broadcast().data("a")])
                .await
                .unwrap();
        }
        std::fs::copy(&db_file, &saved).unwrap();
        let appended = {
            let h = DurableHistory::open(dir.path(), retention.clone()).unwrap();
            let mut ids = Vec::new();
            for data in ["b", "c", "d"] {
                ids.push(
                    h.append(vec![Message::broadcast().data(data)])
                        .await
                        .unwrap()[0]
                        .id,
                );
            }
            ids
        };
        let log = std::fs::read(dir.path().join(wal::FILE)).unwrap();
        // The redb file as it was before b, c and d: what a power loss leaves when only their log
        // records reached the disk.
        std::fs::copy(&saved, &db_file).unwrap();
        {
            let h = DurableHistory::open(dir.path(), retention.clone()).unwrap();
            let c = h.read(ReadFrom::After(EventId(100)), 10).await.unwrap();
            let got: Vec<(EventId, &str)> =
                c.events.iter().map(|e| (e.id, e.data.as_str())).collect();
            assert_eq!(
                got,
                vec![(appended[0], "b"), (appended[1], "c"), (appended[2], "d")]
            );
            let next = h
                .append(vec![Message::broadcast().data("e")])
                .await
                .unwrap();
            assert_eq!(
                next[0].id.0,
                appended[2].0 + 1,
                "ids go on after the replayed"
            );
        }
        // Again, with d's record torn (the crash came while it was being written).
        std::fs::copy(&saved, &db_file).unwrap();
        std::fs::write(dir.path().join(wal::FILE), &log).unwrap();
        let record_len =
            |at: usize| 12 + u32::from_le_bytes(log[at + 4..at + 8].try_into().unwrap()) as usize;
        let d_record = record_len(0) + record_len(record_len(0));
        wal::overwrite(dir.path(), d_record as u64 + 30, &[0xee]);
        let h = DurableHistory::open(dir.path(), retention).unwrap();
        let c = h.read(ReadFrom::After(EventId(100)), 10).await.unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["b", "c"]);
    }

    /// A herald.redb restored from a backup beside a newer log: the log's records do not continue
    /// its ids. They are not replayed (ids would go missing between), and their ids are not
    /// reused: a reader resuming from one of them gets a gap, and new ids follow the log's.
    #[tokio::test]
    async fn a_log_that_does_not_continue_the_file_is_not_replayed_nor_its_ids_reused() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention::default();
        let db_file = dir.path().join(FILE);
        let saved = dir.path().join("saved.redb");
        let open = || DurableHistory::open(dir.path(), retention.clone()).unwrap();
        let a = open()
            .append(vec![Message::broadcast().data("a")])
            .await
            .unwrap();
        std::fs::copy(&db_file, &saved).unwrap();
        let b = open()
            .append(vec![Message::broadcast().data("b")])
            .await
            .unwrap();
        // A new start writes its first record at offset 0: the log now holds c alone.
        let c = open()
            .append(vec![Message::broadcast().data("c")])
            .await
            .unwrap();
        std::fs::copy(&saved, &db_file).unwrap();
        let h = open();
        let from_a = h.read(ReadFrom::After(a[0].id), 10).await.unwrap();
        assert!(
            from_a.events.is_empty(),
            "c is not replayed after a missing b"
        );
        let from_b = h.read(ReadFrom::After(b[0].id), 10).await.unwrap();
        assert!(from_b.gap.is_some(), "a reader of b is told of the gap");
        let next = h
            .append(vec![Message::broadcast().data("d")])
            .await
            .unwrap();
        assert!(next[0].id > c[0].id, "no id is given twice");
        let from_a = h.read(ReadFrom::After(a[0].id), 10).await.unwrap();
        let data: Vec<&str> = from_a.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["d"]);
        assert!(
            from_a.gap.is_some(),
            "a reader of a is told of the gap before d"
        );
    }

    /// An append that fails after its record was logged is answered as failed and stays failed:
    /// its record is unwritten, so neither a reopen nor a restart publishes it behind the answer.
    #[tokio::test]
    async fn an_append_that_fails_after_its_record_was_logged_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention::default();
        let db_file = dir.path().join(FILE);
        let saved = dir.path().join("saved.redb");
        let h = DurableHistory::open(dir.path(), retention.clone()).unwrap();
        let one = |data: &str| vec![Message::broadcast().data(data.to_owned())];
        h.append(one("a")).await.unwrap();
        let b = h.append(one("b")).await.unwrap();
        FAIL_AFTER_LOG.store(true, Ordering::Relaxed);
        assert!(h.append(one("lost")).await.is_err());
        // The failure closed the store (a and b durable in redb, `lost` logged after them); the
        // next append reopens it, which reads the log.
        std::fs::copy(&db_file, &saved).unwrap();
        let c = h.append(one("c")).await.unwrap();
        assert_eq!(c[0].id.0, b[0].id.0 + 1, "the failed append took no id");
        drop(h);
        // A power loss: redb as it was before c; the log brings c back, and nothing else.
        std::fs::copy(&saved, &db_file).unwrap();
        let h = DurableHistory::open(dir.path(), retention).unwrap();
        let all = h.read(ReadFrom::Oldest, 10).await.unwrap();
        let data: Vec<&str> = all.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a", "b", "c"]);
    }

    /// Replaying trims nothing: `herald check` opens the store with default retention, which must
    /// not drop what the server's retention keeps.
    #[tokio::test]
    async fn replay_trims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db_file = dir.path().join(FILE);
        let saved = dir.path().join("saved.redb");
        let wide = Retention::default();
        {
            let h = DurableHistory::open(dir.path(), wide.clone()).unwrap();
            h.append(vec![Message::broadcast().data("a")])
                .await
                .unwrap();
        }
        std::fs::copy(&db_file, &saved).unwrap();
        {
            let h = DurableHistory::open(dir.path(), wide).unwrap();
            for i in 0..5 {
                h.append(vec![Message::broadcast().data(format!("{i}"))])
                    .await
                    .unwrap();
            }
        }
        std::fs::copy(&saved, &db_file).unwrap();
        let narrow = Retention {
            max_events: 2,
            ..Retention::default()
        };
        let h = DurableHistory::open(dir.path(), narrow).unwrap();
        let all = h.read(ReadFrom::Oldest, 10).await.unwrap();
        assert_eq!(all.events.len(), 6, "replayed, not trimmed");
        h.append(vec![Message::broadcast().data("next")])
            .await
            .unwrap();
        let all = h.read(ReadFrom::Oldest, 10).await.unwrap();
        assert_eq!(all.events.len(), 2, "the next append trims");
    }

    /// Issue 12: after a restart under a wall clock stepped an hour back, ids continue past the
    /// last stored one (the fresh base the clock gives is not used) and publish times do not go
    /// backwards.
    #[tokio::test]
    async fn ids_continue_after_a_restart_under_a_stepped_back_clock() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention::default();
        let a = {
            let h = DurableHistory::open(dir.path(), retention.clone()).unwrap();
            h.append(vec![Message::broadcast().data("a")])
                .await
                .unwrap()
        };
        let _back = crate::clock::step_this_thread(-3_600_000);
        assert!(
            fresh_base() + 3_000_000_000 < a[0].id.0,
            "the clock is stepped"
        );
        let h = DurableHistory::open(dir.path(), retention).unwrap();
        let b = h
            .append(vec![Message::broadcast().data("b")])
            .await
            .unwrap();
        assert_eq!(b[0].id.0, a[0].id.0 + 1);
        assert!(b[0].published_at_ms >= a[0].published_at_ms);
        let c = h.read(ReadFrom::After(a[0].id), 10).await.unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!((c.gap, data), (None, vec!["b"]));
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

    #[test]
    fn rows_round_trip() {
        let mut m = Message::to_topic(Topic::new("a/b").unwrap())
            .user(UserId::new("ü").unwrap())
            .data("x\ny")
            .event(EventType::new("t").unwrap())
            .idempotency_key("k");
        m.targets.broadcast = true;
        let mut row = Vec::new();
        encode_checked_row(&mut row, 1234, &m).unwrap();
        assert_eq!(published_at(&row), Some(1234));
        let e = decode_row(9, &row).unwrap();
        assert_eq!(e.targets, m.targets);
        assert_eq!(
            (e.data.as_str(), e.published_at_ms, e.retry_ms),
            ("x\ny", 1234, None)
        );
        assert_eq!(e.idempotency_key.as_deref(), Some("k"));
        for cut in 0..row.len() {
            // A cut row fails its checksum; the body decoder never panics on a cut either.
            assert!(decode_row(9, &row[..cut]).is_err());
            let _ = decode_body(9, &row[4..cut.max(4)]);
        }
    }

    /// Flips one byte of the stored row `id` (as a disk or a stray write would).
    fn damage(dir: &Path, id: u64) {
        let db = Database::create(dir.join(FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            let mut row = events.get(id).unwrap().unwrap().value().to_vec();
            let last = row.len() - 1;
            row[last] ^= 0x01; // still valid UTF-8: only the checksum can tell
            events.insert(id, row.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    fn ids(chunk: &Chunk) -> Vec<u64> {
        chunk.events.iter().map(|e| e.id.0).collect()
    }

    /// Reproduces issue 12 (defect 8): one damaged row made every read through it fail (or,
    /// with valid UTF-8, went unnoticed); the good events of the same chunk were withheld too.
    /// Now readers get everything else, and a gap where the damaged row was.
    #[tokio::test]
    async fn a_damaged_row_is_skipped_with_a_gap_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = DurableHistory::open_starting_at(dir.path(), Retention::default(), 1).unwrap();
            let batch = (1..=5).map(|i| Message::broadcast().data(format!("e{i}")));
            h.append(batch.collect()).await.unwrap();
        }
        damage(dir.path(), 3);
        let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        let first = h.read(ReadFrom::Oldest, 100).await.unwrap();
        assert_eq!(
            (first.gap, ids(&first), first.cut_short),
            (None, vec![1, 2], true)
        );
        let next = h.read(ReadFrom::After(EventId(2)), 100).await.unwrap();
        assert_eq!(next.gap.map(|g| g.oldest), Some(Some(EventId(4))));
        assert_eq!((ids(&next), next.cut_short), (vec![4, 5], false));
        assert_eq!(next.skipped, vec![EventId(3)]);
        // Appends go on.
        h.append(vec![Message::broadcast().data("e6")])
            .await
            .unwrap();
        drop(h);

        let report = DurableHistory::check(dir.path(), false).unwrap();
        assert_eq!(
            (report.rows, report.damaged.clone(), report.repaired),
            (6, vec![3], 0)
        );
        let report = DurableHistory::check(dir.path(), true).unwrap();
        assert_eq!((report.damaged.clone(), report.repaired), (vec![3], 1));
        let report = DurableHistory::check(dir.path(), false).unwrap();
        assert_eq!((report.damaged.len(), report.lost.clone()), (0, vec![3]));
        // A repaired row is still a gap to readers.
        let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        let next = h.read(ReadFrom::After(EventId(2)), 100).await.unwrap();
        assert_eq!(
            (next.gap.map(|g| g.oldest), ids(&next)),
            (Some(Some(EventId(4))), vec![4, 5, 6])
        );
    }

    /// A file written by the previous format (rows without checksums) is read as it was.
    #[tokio::test]
    async fn a_format_2_file_gains_checksums_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("format", FORMAT_WITHOUT_CHECKSUM).unwrap();
                Meta {
                    first_issued: 7,
                    next: 9,
                    count: 2,
                    bytes: 100,
                    dropped_at_plus1: 0,
                    last_published_ms: 5,
                    drops: 0,
                }
                .store(&mut meta)
                .unwrap();
                let mut events = txn.open_table(EVENTS).unwrap();
                let mut row = Vec::new();
                encode_row(&mut row, 5, &Message::broadcast().data("old")).unwrap();
                events.insert(7, row.as_slice()).unwrap();
                events.insert(8, &b"\x01"[..]).unwrap(); // unreadable already
            }
            txn.commit().unwrap();
        }
        let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
        assert_eq!(c.events[0].data.as_str(), "old");
        assert_eq!((ids(&c), c.cut_short), (vec![7], true));
        drop(h);
        assert_eq!(
            DurableHistory::check(dir.path(), false).unwrap().lost,
            vec![8]
        );
    }

    /// Reproduces issue 12 (defect 11): more than 65,535 topics were written as a u16 count, so
    /// an acknowledged message became unreadable. The store now refuses it, writing nothing.
    #[tokio::test]
    async fn a_message_the_row_cannot_hold_is_refused_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
        let mut m = Message::broadcast().data("wide");
        m.targets.topics = (0..70_000)
            .map(|i| Topic::new(&format!("t{i}")).unwrap())
            .collect();
        let err = h.append(vec![m]).await.unwrap_err();
        assert!(matches!(err, HistoryError::Unstorable(_)), "{err}");
        h.append(vec![Message::broadcast().data("next")])
            .await
            .unwrap();
        let c = h.read(ReadFrom::Oldest, 10).await.unwrap();
        assert_eq!(c.events.len(), 1);
        assert_eq!(
            DurableHistory::check(dir.path(), false)
                .map(|r| r.rows)
                .ok(),
            None,
            "in use"
        );
    }

    /// Retention rules given to a file written without them: the stored events are sorted into
    /// the rules' logs when it opens, so the rule keeps its topic's older events too.
    #[tokio::test]
    async fn rules_given_later_sort_the_stored_events() {
        let dir = tempfile::tempdir().unwrap();
        let to = |t: &str, d: String| Message::to_topic(Topic::new(t).unwrap()).data(d);
        {
            let h = DurableHistory::open(dir.path(), Retention::default()).unwrap();
            for i in 0..5 {
                h.append(vec![
                    to("ai/a", format!("a{i}")),
                    to("news", format!("n{i}")),
                ])
                .await
                .unwrap();
            }
        }
        let global = Retention {
            max_events: 3,
            ..Retention::default()
        };
        let rule = super::super::RetentionRule::parse("ai/**:events=100", &global).unwrap();
        let ruled = Retention {
            rules: super::super::RetentionRules::new(vec![rule]).unwrap(),
            ..global
        };
        let h = DurableHistory::open(dir.path(), ruled).unwrap();
        h.append(vec![to("news", "n5".into())]).await.unwrap();
        let c = h.read(ReadFrom::Oldest, 100).await.unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a0", "a1", "a2", "a3", "n3", "a4", "n4", "n5"]);
    }

    /// An append with rules reads a log's oldest row only when a bound could drop it: never for
    /// a log under its count and bytes with no age or `after-complete`, without decoding it for
    /// an age bound it is within, and decoding it for `after-complete` only once an end is known.
    #[tokio::test]
    async fn an_append_reads_a_logs_oldest_row_only_when_a_bound_could_drop_it() {
        let dir = tempfile::tempdir().unwrap();
        let global = Retention {
            max_events: 3,
            ..Retention::default()
        };
        let rules = [
            "ai/**:events=100",
            "jobs/*:age=1h",
            "done/*:after-complete=1h",
        ]
        .iter()
        .map(|r| super::super::RetentionRule::parse(r, &global).unwrap())
        .collect();
        let ruled = Retention {
            rules: super::super::RetentionRules::new(rules).unwrap(),
            ..global
        };
        let h = DurableHistory::open(dir.path(), ruled).unwrap();
        let store = h.handle().unwrap();
        let to = |t: &str, d: &str| Message::to_topic(Topic::new(t).unwrap()).data(d);
        // (Runs on this thread, which the counters are of.)
        let append = |messages: Vec<Message>| {
            FRONT_ROWS.with(|n| n.set(0));
            FRONT_DECODES.with(|n| n.set(0));
            DurableHistory::append_blocking(
                &store,
                &h.retention,
                messages,
                &AtomicBool::new(false),
            )
            .unwrap();
            (
                FRONT_ROWS.with(|n| n.get()),
                FRONT_DECODES.with(|n| n.get()),
            )
        };
        append(vec![
            to("news", "n0"),
            to("ai/a", "a0"),
            to("jobs/1", "j0"),
            to("done/1", "d0"),
        ]);
        assert_eq!(
            append(vec![to("ai/a", "a1"), to("news", "n1")]),
            (2, 0),
            "only the age and after-complete logs look at their oldest row, decoding nothing"
        );
        assert_eq!(
            append(vec![to("news", "n2"), to("news", "n3")]),
            (3, 1),
            "the default log is over its 3 events: its oldest is decoded as it goes"
        );
        append(vec![to("done/1", "").event(EventType::complete())]);
        assert_eq!(
            append(vec![to("ai/a", "a2")]),
            (2, 1),
            "an end is known: the after-complete log's oldest is decoded to check it"
        );
        let c = h.read(ReadFrom::Oldest, 100).await.unwrap();
        let data: Vec<&str> = c.events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a0", "j0", "d0", "a1", "n1", "n2", "n3", "", "a2"]);
    }

    /// Reproduces issue 12 (weak spot): `--data-dir` naming a file answered "File exists".
    #[test]
    fn a_data_dir_that_is_a_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = DurableHistory::open(&file, Retention::default()).unwrap_err();
        assert!(matches!(err, OpenError::NotADir(_)));
        assert!(err.to_string().contains("is a file, not a folder"), "{err}");
    }
}
