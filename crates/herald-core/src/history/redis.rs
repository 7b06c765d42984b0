//! History in a Redis Stream shared by every node of a cluster. Redis assigns the ids (`ms-seq`, so
//! they increase in publish order cluster-wide); Lua scripts make appends with idempotency keys and
//! gap-checked reads atomic. Nodes learn of new events, their own included, by following the stream.
//! With retention rules the stream stays one (reads and the follower are unchanged); each log (the
//! default one, one per rule) lists its entries' ids (`{prefix}:log:N`), and trimming pops a log's
//! oldest and deletes that entry (`XDEL`) by the log's own bounds. `{prefix}:dropped-logs` holds
//! each log's newest dropped id (`N`) and newest dropped broadcast or user event (`Na`).
//! `{prefix}:rules` records the rules the lists were sorted by: a node with other rules does not
//! start while the stream holds entries (see [`RULES`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncConnectionConfig, Script, Value};

use super::row::{decode_body, encode_row};
use super::rules::{counts_for_all, is_end, millis};
use super::{
    Chunk, Gap, History, HistoryError, Interest, ReadFrom, Retention, SharedHistory, Stored,
};
use crate::event::{Event, EventId, Message, now_ms};
use crate::name::Selector;
use crate::redis_link::{Primary, RedisLink};

/// Bits of an [`EventId`] that hold the stream id's sequence part; the rest hold its milliseconds.
const SEQ_BITS: u32 = 20;

/// The Redis stream id of an event id.
pub(crate) fn stream_id(id: EventId) -> String {
    format!("{}-{}", id.0 >> SEQ_BITS, id.0 & ((1 << SEQ_BITS) - 1))
}

/// The event id of a Redis stream id (`ms-seq`).
pub(crate) fn event_id(stream_id: &str) -> Option<EventId> {
    let (ms, seq) = stream_id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    if seq >= 1 << SEQ_BITS || ms >= 1 << (64 - SEQ_BITS) {
        return None;
    }
    Some(EventId((ms << SEQ_BITS) | seq))
}

/// Appends messages in order, job by job; a message whose idempotency key is already claimed with
/// the same payload fingerprint returns the claiming event's id instead. A job holding a message
/// whose key is claimed with another fingerprint appends nothing: each of its messages answers
/// flag 2 (with the claiming id, or 0-0 for the others of the job). Then trims to maxlen and the
/// age cutoff (also called with no messages, for trimming alone), remembering the newest dropped
/// id (Redis 7.0 does not record trims in `max-deleted-entry-id`). KEYS: stream, dropped-marker,
/// key order (a sorted set of the claimed keys by publish ms), key bytes (their counted bytes);
/// ARGV: maxlen, window ms, key prefix, age cutoff ms (0: none), n, then (job size, key,
/// fingerprint, row) per message, the job size set on a job's first message only (0 on the
/// rest), then '1' when a repeat must write (touch its key) so a `WAIT` after it covers the
/// original, then the most keys and the most key bytes kept. A key's value is `id fingerprint`.
/// Claiming a key forgets those past the window, then the oldest while a bound is exceeded
/// (counted as the in-memory store counts them), so the keys stay bounded cluster-wide.
/// With retention rules (the ARGV before the two bounds: `r`, then per message `log:addressed:end`,
/// joined by `,`; per log `maxlen,cutoff,ended` joined by `;`, the log key prefix, the drops hash,
/// and per message its topics joined by tabs, the messages joined by newlines), each new entry is
/// listed in its log, and each log is trimmed instead of the stream. `ended` is for
/// `after-complete` (0: none): a log entry lists its topics (`id a|-<TAB>topic<TAB>…`), an end
/// event (`end` 1) records its id per topic in the log's ends hash (`{prefix}:log:ends:N`), and
/// the log's oldest entry goes once every topic of it ended, after it, at or before `ended` (ms).
/// Returns id, flag pairs (0 new, 1 duplicate, 2 refused).
const APPEND: &str = r#"
local out = {}
local n = tonumber(ARGV[5])
local ruled = ARGV[7 + 4 * n] ~= ''
local msg_logs, msg_topics = {}, {}
if ruled then
  for spec in string.gmatch(ARGV[7 + 4 * n], '[^,]+') do
    if spec ~= 'r' then msg_logs[#msg_logs + 1] = spec end
  end
  for t in string.gmatch(ARGV[11 + 4 * n] .. '\n', '([^\n]*)\n') do msg_topics[#msg_topics + 1] = t end
end
local function newer(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local max_keys, max_bytes = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
local kept = tonumber(redis.call('GET', KEYS[4]) or '0')
local function cost(key) return 2 * #key + 64 end
local function remember(key, id)
  local ms = tonumber(string.match(id, '^(%d+)-'))
  local cutoff = ms - tonumber(ARGV[2])
  local ended = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', cutoff)
  for _, k in ipairs(ended) do
    kept = kept - cost(k)
    redis.call('DEL', ARGV[3] .. k)
  end
  if #ended > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff) end
  if not redis.call('ZSCORE', KEYS[3], key) then
    local count = redis.call('ZCARD', KEYS[3])
    while count > 0 and (count >= max_keys or kept + cost(key) > max_bytes) do
      local oldest = redis.call('ZPOPMIN', KEYS[3])
      kept = kept - cost(oldest[1])
      redis.call('DEL', ARGV[3] .. oldest[1])
      count = count - 1
    end
    kept = kept + cost(key)
  end
  redis.call('ZADD', KEYS[3], ms, key)
end
local function claim(key)
  if key == '' then return false end
  local v = redis.call('GET', ARGV[3] .. key)
  if not v then return false end
  local id, fp = string.match(v, '^(%S+) ?(%S*)$')
  return id, fp
end
local i = 1
while i <= n do
  local size = tonumber(ARGV[2 + 4 * i])
  local refused = false
  local seen = {}
  for j = i, i + size - 1 do
    local key = ARGV[3 + 4 * j]
    local id, fp = claim(key)
    if id and fp ~= '' and fp ~= ARGV[4 + 4 * j] then refused = true end
    if key ~= '' then
      if seen[key] and seen[key] ~= ARGV[4 + 4 * j] then refused = true end
      seen[key] = ARGV[4 + 4 * j]
    end
  end
  for j = i, i + size - 1 do
    local key = ARGV[3 + 4 * j]
    local id, fp = claim(key)
    if refused then
      if id and fp ~= '' and fp ~= ARGV[4 + 4 * j] then
        out[#out + 1] = id
      else
        out[#out + 1] = '0-0'
      end
      out[#out + 1] = 2
    elseif id then
      if ARGV[6 + 4 * n] == '1' then redis.call('PEXPIRE', ARGV[3] .. key, ARGV[2]) end
      out[#out + 1] = id
      out[#out + 1] = 1
    else
      local new = redis.call('XADD', KEYS[1], '*', 'v', '2', 'm', ARGV[5 + 4 * j])
      if ruled then
        local log, addressed, ends = string.match(msg_logs[j], '^(%d+):(%d):(%d)$')
        local topics = msg_topics[j] or ''
        local entry = new
        if topics ~= '' then
          local flag = '-'
          if addressed == '1' then flag = 'a' end
          entry = new .. ' ' .. flag .. '\t' .. topics
          if ends == '1' then
            for t in string.gmatch(topics, '[^\t]+') do
              redis.call('HSET', ARGV[9 + 4 * n] .. 'ends:' .. log, t, new)
            end
          end
        elseif addressed == '1' then
          entry = new .. ' a'
        end
        redis.call('RPUSH', ARGV[9 + 4 * n] .. log, entry)
      end
      if key ~= '' and max_keys > 0 then
        redis.call('SET', ARGV[3] .. key, new .. ' ' .. ARGV[4 + 4 * j], 'PX', ARGV[2])
        remember(key, new)
      end
      out[#out + 1] = new
      out[#out + 1] = 0
    end
  end
  i = i + size
end
if kept < 0 then kept = 0 end
redis.call('SET', KEYS[4], kept)
if ruled then
  local log = 0
  local newest = redis.call('GET', KEYS[2]) or '0-0'
  for spec in string.gmatch(ARGV[8 + 4 * n], '[^;]+') do
    local maxlen, cutoff, ended = string.match(spec, '^(%d+),(%d+),(%d+)$')
    maxlen, cutoff, ended = tonumber(maxlen), tonumber(cutoff), tonumber(ended)
    local key = ARGV[9 + 4 * n] .. log
    local ends = ARGV[9 + 4 * n] .. 'ends:' .. log
    local len = redis.call('LLEN', key)
    while len > 0 do
      local front = redis.call('LINDEX', key, 0)
      local id, addressed, topics = string.match(front, '^(%S+) ?([^\t]*)\t?(.*)$')
      local ms = tonumber(string.match(id, '^(%d+)-'))
      local drop = len > maxlen or (cutoff > 0 and ms < cutoff)
      if not drop and ended > 0 and topics ~= '' then
        drop = true
        for t in string.gmatch(topics, '[^\t]+') do
          local e = redis.call('HGET', ends, t)
          if not e or newer(id, e) or tonumber(string.match(e, '^(%d+)-')) > ended then
            drop = false
            break
          end
        end
      end
      if not drop then break end
      redis.call('LPOP', key)
      redis.call('XDEL', KEYS[1], id)
      for t in string.gmatch(topics, '[^\t]+') do
        if redis.call('HGET', ends, t) == id then redis.call('HDEL', ends, t) end
      end
      local nth = redis.call('HINCRBY', ARGV[10 + 4 * n], 'n', 1)
      redis.call('HSET', ARGV[10 + 4 * n], tostring(log), id .. ' ' .. nth)
      if addressed == 'a' then redis.call('HSET', ARGV[10 + 4 * n], log .. 'a', id .. ' ' .. nth) end
      if newer(id, newest) then newest = id end
      len = len - 1
    end
    log = log + 1
  end
  if newest ~= '0-0' then redis.call('SET', KEYS[2], newest) end
  return out
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local dropped = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  redis.call('SET', KEYS[2], dropped[#dropped][1])
  redis.call('XTRIM', KEYS[1], 'MAXLEN', '=', ARGV[1])
end
if ARGV[4] ~= '0' then
  local older = redis.call('XREVRANGE', KEYS[1], '(' .. ARGV[4] .. '-0', '-', 'COUNT', 1)
  if #older == 1 then
    redis.call('SET', KEYS[2], older[1][1])
    redis.call('XTRIM', KEYS[1], 'MINID', ARGV[4] .. '-0')
  end
end
return out
"#;

/// Lua functions of stream ids (`ms-seq`) that [`READ`] and [`MARK`] start with: `parse` into
/// numbers, `lt` for their order.
const ID_ORDER: &str = r#"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function lt(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
"#;

/// Reads with the gap verdict, atomically. KEYS: stream, dropped-marker, rewound (see [`MARK`]);
/// ARGV: mode (after|since|oldest), position (a stream id, or ms for since), count, then with
/// retention rules the reader's interest (per log `1` when its topics reach it, else `0`: only its
/// dropped broadcasts and user events count), the drops hash, and the drops the reader accepted
/// (the `n` of an earlier read; the hash holds each log's newest drop as `id n`). Returns {gap
/// 0/1, oldest id or '', entries}, with rules a fourth element, that `n`; with rules the oldest id
/// is the first returned, and a gap continues after the position when it was issued. A gap
/// replays from the oldest entry, except a position inside the range the latest failover lost: it
/// goes on after the last entry that survived (the marker first, then what the new primary
/// appended), since nothing of that range is left to replay.
const READ: &str = r#"
local first, last = false, '0-0'
local maxdel = redis.call('GET', KEYS[2]) or '0-0'
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[1])
if ok then
  for i = 1, #info, 2 do
    local k = info[i]
    if k == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
    if k == 'last-generated-id' then last = info[i + 1] end
  end
end
local mode, pos, count = ARGV[1], ARGV[2], ARGV[3]
local function lost_in_failover(pos)
  local rewound = redis.call('GET', KEYS[3])
  if rewound then
    local from, to = string.match(rewound, '^(%S+) (%S+)')
    if lt(from, pos) and not lt(to, pos) then return from end
  end
  return false
end
local gap, resume = 0, false
local interest = ARGV[4] or ''
if interest ~= '' then
  local relevant = '0-0'
  local accepted = tonumber(ARGV[6])
  for l = 0, #interest - 1 do
    local field = tostring(l)
    if string.sub(interest, l + 1, l + 1) ~= '1' then field = l .. 'a' end
    local d = redis.call('HGET', ARGV[5], field)
    if d then
      local id, nth = string.match(d, '^(%S+) (%d+)$')
      if tonumber(nth) > accepted and lt(relevant, id) then relevant = id end
    end
  end
  local known = true
  if mode == 'after' then
    if last == '0-0' or lt(last, pos) then
      gap, known = 1, false
    elseif lt(pos, relevant) then
      gap = 1
    elseif pos ~= last and lt(maxdel, pos) and #redis.call('XRANGE', KEYS[1], pos, pos) == 0 then
      gap, known = 1, false
      resume = lost_in_failover(pos)
    end
  elseif mode == 'since' then
    if relevant ~= '0-0' and parse(relevant) >= tonumber(pos) then gap = 1 end
  end
  local range
  if resume then
    range = redis.call('XRANGE', KEYS[1], '(' .. resume, '+', 'COUNT', count)
  elseif mode == 'oldest' or not known then
    range = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)
  elseif mode == 'after' then
    range = redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', count)
  else
    range = redis.call('XRANGE', KEYS[1], pos .. '-0', '+', 'COUNT', count)
  end
  local oldest = ''
  if #range > 0 then oldest = range[1][1] end
  return {gap, oldest, range, tonumber(redis.call('HGET', ARGV[5], 'n') or '0')}
end
if mode == 'after' then
  if last == '0-0' or lt(last, pos) or lt(pos, maxdel) then
    gap = 1
  elseif first and lt(pos, first) then
    if not (pos == maxdel and maxdel ~= '0-0') then gap = 1 end
  elseif first and #redis.call('XRANGE', KEYS[1], pos, pos) == 0 and pos ~= last then
    gap = 1
    resume = lost_in_failover(pos)
  end
elseif mode == 'since' then
  local dm = parse(maxdel)
  if maxdel ~= '0-0' and dm >= tonumber(pos) then gap = 1 end
end
local range
if resume then
  range = redis.call('XRANGE', KEYS[1], '(' .. resume, '+', 'COUNT', count)
elseif gap == 1 or mode == 'oldest' then
  range = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)
elseif mode == 'after' then
  range = redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', count)
else
  range = redis.call('XRANGE', KEYS[1], pos .. '-0', '+', 'COUNT', count)
end
return {gap, first or '', range}
"#;

/// Writes a rewind marker: the follower of a node found that the stream no longer holds ARGV[1],
/// an event it fanned out (a failover lost the old primary's unreplicated tail). The marker is an
/// entry `rewind = "FROM TO"` (no `m`): the events after FROM, the newest entry that survived,
/// up to TO are gone. Every node's follower meets it and sends `herald.gap` to its streams; a
/// read that crosses it is a gap. Several nodes detect the same loss: one marker per FROM, a new
/// one only when a node fanned out further than the marker says. KEYS: stream, rewound (the
/// latest marker, `FROM TO ID`). Returns {marker id, FROM, TO}.
const MARK: &str = r#"
local to = ARGV[1]
local before = redis.call('XREVRANGE', KEYS[1], to, '-', 'COUNT', 1)
local from = '0-0'
if #before == 1 then from = before[1][1] end
local known = redis.call('GET', KEYS[2])
if known then
  local kfrom, kto, kid = string.match(known, '^(%S+) (%S+) (%S+)$')
  if kfrom == from and not lt(kto, to) then return {kid, kfrom, kto} end
end
local id = redis.call('XADD', KEYS[1], '*', 'v', '2', 'rewind', from .. ' ' .. to)
redis.call('SET', KEYS[2], from .. ' ' .. to .. ' ' .. id)
return {id, from, to}
"#;

/// Records the retention rules the history is kept by, or checks them, atomically. KEYS: the
/// rules (`{prefix}:rules`, [`RetentionRules::specs`](super::RetentionRules::specs)), stream,
/// drops hash, dropped-marker; ARGV: this node's rules, its logs (0 without rules), the log key
/// prefix, [`MAX_RULES`](super::MAX_RULES). Returns {0, ''} when the rules are the recorded ones;
/// {1, recorded} when they differ and the stream holds entries (the node must not start); {2,
/// ''} when the stream holds entries but no rules were recorded (a herald before they were: it
/// takes this node's); {3, recorded or ''} when the stream is empty: this node's rules are
/// recorded, the logs' lists and ends are cleared, and every drop recorded before counts, as
/// the newest of them, against every reader of every new log (a log number may now mean
/// another rule: a gap too many is safe, one too few is not).
const RULES: &str = r#"
local stored = redis.call('GET', KEYS[1])
if stored == ARGV[1] then return {0, ''} end
if redis.call('XLEN', KEYS[2]) > 0 then
  if stored then return {1, stored} end
  redis.call('SET', KEYS[1], ARGV[1])
  return {2, ''}
end
for l = 0, tonumber(ARGV[4]) do
  redis.call('DEL', ARGV[3] .. l, ARGV[3] .. 'ends:' .. l)
end
local newest = redis.call('GET', KEYS[4]) or '0-0'
local drops = redis.call('HGETALL', KEYS[3])
for i = 1, #drops, 2 do
  if drops[i] ~= 'n' then
    local id = string.match(drops[i + 1], '^(%S+)')
    if lt(newest, id) then newest = id end
    redis.call('HDEL', KEYS[3], drops[i])
  end
end
local logs = tonumber(ARGV[2])
if logs > 0 and newest ~= '0-0' then
  local nth = redis.call('HINCRBY', KEYS[3], 'n', 1)
  for l = 0, logs - 1 do
    redis.call('HSET', KEYS[3], tostring(l), newest .. ' ' .. nth, l .. 'a', newest .. ' ' .. nth)
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return {3, stored or ''}
"#;

/// Settings of a Redis-backed history.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`, `rediss://…`, or `redis+sentinel://h1:26379,h2:26379/MASTER[?db=N]`
    /// (`rediss+sentinel://…`; see [`RedisLink::open`]).
    pub url: String,
    /// Prefix of every key, so several hubs can share one Redis.
    pub prefix: String,
    pub retention: Retention,
    pub idempotency_window: Duration,
    /// Most idempotency keys kept in Redis (for the whole cluster); past it the oldest go first.
    pub idempotency_keys: usize,
    /// Most bytes of idempotency keys kept in Redis, counted as the in-memory store counts them.
    pub idempotency_bytes: usize,
    /// Replicas that must acknowledge an append (`WAIT`) before it is acknowledged; 0: none.
    pub replicas: usize,
    /// How long an append waits for those replicas.
    pub wait_timeout: Duration,
}

/// History in a Redis Stream, shared by the nodes of a cluster.
pub struct RedisHistory {
    stream: String,
    /// Holds the newest id dropped by retention.
    dropped: String,
    /// With retention rules: the prefix of each log's list of ids, and the hash of their drops.
    log_prefix: String,
    log_drops: String,
    key_prefix: String,
    /// The claimed keys by publish time, and their counted bytes: the keys' bounds.
    key_order: String,
    key_bytes: String,
    max_keys: usize,
    max_key_bytes: usize,
    prefix: String,
    retention: Retention,
    window_ms: u64,
    replicas: usize,
    wait_timeout: Duration,
    /// For appends and reads; follows the primary through failovers.
    link: RedisLink,
    /// For the blocking `XREAD` that follows the stream: a blocked command must not hold up others.
    follower: tokio::sync::Mutex<Option<Primary>>,
    /// `{prefix}:fence`: the follower's own write, whose replication vouches for what it read.
    fence: String,
    /// `{prefix}:rewound`: the latest rewind marker (see [`MARK`]).
    rewound: String,
    append: Script,
    read: Script,
    mark: Script,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

/// Decodes XRANGE/XREAD entries: `[[id, [field, value, …]], …]`.
/// The row format this herald writes in an entry's `v` field (the `'2'` in `APPEND`), and the only one it reads (an entry
/// without `v` was written before it was versioned, in this same format). A node that meets
/// another version (a newer herald in a rolling upgrade) skips the entry with a gap, never halts.
const ROW_FORMAT: &str = "2";

/// One stream entry.
enum Entry {
    Event(Arc<Event>),
    /// A rewind marker (see [`MARK`]): the events after `after` up to `through` were lost.
    Rewind {
        id: EventId,
        after: Option<EventId>,
        through: EventId,
    },
    /// An entry this herald cannot read, and why.
    Unreadable {
        id: EventId,
        reason: String,
    },
}

/// The entries of a reply. A malformed reply is an error; a malformed entry is only that entry's.
fn entries(v: &Value) -> Result<Vec<Entry>, HistoryError> {
    let bad = |what: &str| HistoryError::Unavailable(format!("unexpected Redis reply: {what}"));
    let Value::Array(items) = v else {
        return Err(bad("entries"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(bad("entry"));
        };
        let [id, Value::Array(fields)] = pair.as_slice() else {
            return Err(bad("entry shape"));
        };
        let sid = text(id).ok_or_else(|| bad("entry id"))?;
        let id = event_id(&sid).ok_or_else(|| bad("entry id"))?;
        out.push(entry(id, fields));
    }
    Ok(out)
}

fn entry(id: EventId, fields: &[Value]) -> Entry {
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
            .and_then(|kv| kv.get(1))
    };
    let unreadable = |reason: String| Entry::Unreadable { id, reason };
    if let Some(v) = field("v").map(|v| text(v).unwrap_or_default())
        && v != ROW_FORMAT
    {
        return unreadable(format!(
            "row format {v:?}; this herald reads format {ROW_FORMAT} (upgrade every node)"
        ));
    }
    if let Some(range) = field("rewind").and_then(text) {
        let lost = range
            .split_once(' ')
            .and_then(|(a, t)| Some((event_id(a)?, event_id(t)?)));
        return match lost {
            Some((after, through)) => Entry::Rewind {
                id,
                after: Some(after).filter(|a| a.0 != 0),
                through,
            },
            None => unreadable(format!("a rewind marker with a bad range {range:?}")),
        };
    }
    let Some(row) = field("m").and_then(bytes) else {
        return unreadable("no `m` field".to_string());
    };
    match decode_body(id.0, row) {
        Ok(mut event) => {
            // Redis's clock stamped the id; that is the publish time every node agrees on.
            event.published_at_ms = id.0 >> SEQ_BITS;
            Entry::Event(Arc::new(event))
        }
        Err(e) => unreadable(e.to_string()),
    }
}

/// A read's chunk from its entries: leading unreadable entries and rewind markers are skipped (and
/// make it a gap); one after readable events ends the chunk there (`cut_short`), for the next read
/// to skip. A read that is a gap already passes over markers: it announced the loss once.
fn chunk_of(gap: Option<Gap>, entries: Vec<Entry>) -> Chunk {
    let announced = gap.is_some();
    let mut chunk = Chunk {
        gap,
        events: Vec::with_capacity(entries.len()),
        cut_short: false,
        skipped: Vec::new(),
        drops: 0,
    };
    for entry in entries {
        match entry {
            Entry::Event(event) => chunk.events.push(event),
            Entry::Rewind { .. } if announced => {}
            _ if !chunk.events.is_empty() => {
                chunk.cut_short = true;
                break;
            }
            Entry::Rewind { id, .. } => chunk.skipped.push(id),
            Entry::Unreadable { id, reason } => {
                tracing::debug!(id = %id, %reason, "unreadable entry skipped by a catch-up");
                chunk.skipped.push(id);
            }
        }
    }
    if !chunk.skipped.is_empty() {
        chunk.gap = Some(Gap {
            oldest: chunk.events.first().map(|e| e.id),
        });
    }
    chunk
}

/// The follower's chunk: events up to the first rewind marker, which (leading) is
/// [`HistoryError::Rewound`]. Unreadable entries are logged (once per node) and skipped with no
/// gap of the follower's own: it goes on after them, and lets every connection learn of them from
/// history (see `publish::follower`).
fn followed(entries: Vec<Entry>) -> Result<Chunk, HistoryError> {
    let mut chunk = Chunk {
        gap: None,
        events: Vec::with_capacity(entries.len()),
        cut_short: false,
        skipped: Vec::new(),
        drops: 0,
    };
    for entry in entries {
        match entry {
            Entry::Event(event) => chunk.events.push(event),
            Entry::Rewind { id, after, through }
                if chunk.events.is_empty() && chunk.skipped.is_empty() =>
            {
                return Err(HistoryError::Rewound {
                    marker: id,
                    after,
                    through,
                });
            }
            Entry::Rewind { .. } => break,
            _ if !chunk.events.is_empty() => {
                chunk.cut_short = true;
                break;
            }
            Entry::Unreadable { id, reason } => {
                tracing::error!(id = %id, %reason, "skipping an unreadable entry of the shared history; readers get a herald.gap there");
                chunk.skipped.push(id);
            }
        }
    }
    Ok(chunk)
}

/// Rules as an error names them: each as `--retention` takes it, or `none`.
fn named(specs: &str) -> String {
    if specs.is_empty() {
        "none".to_string()
    } else {
        specs
            .lines()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Checks this node's rules against those the history under `prefix` is kept by, recording them
/// when there are none yet or the history holds no events (see [`RULES`]). Rules that differ from
/// the recorded ones are [`HistoryError::RulesDiffer`]: each log's list would then mix events
/// sorted by other rules, and nodes would trim one log by different bounds.
async fn record_rules(
    link: &RedisLink,
    prefix: &str,
    rules: &super::RetentionRules,
) -> Result<(), HistoryError> {
    let ours = rules.specs();
    let logs = if rules.is_empty() { 0 } else { rules.logs() };
    let mut conn = link.primary().await.map_err(unavailable)?;
    let (verdict, stored): (u8, String) = Script::new(&format!("{ID_ORDER}{RULES}"))
        .key(format!("{prefix}:rules"))
        .key(format!("{prefix}:events"))
        .key(format!("{prefix}:dropped-logs"))
        .key(format!("{prefix}:dropped"))
        .arg(&ours)
        .arg(logs)
        .arg(format!("{prefix}:log:"))
        .arg(super::MAX_RULES)
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
    match verdict {
        1 => {
            return Err(HistoryError::RulesDiffer {
                prefix: prefix.to_string(),
                stored: named(&stored),
                ours: named(&ours),
            });
        }
        2 if !ours.is_empty() => tracing::warn!(
            rules = %named(&ours),
            "the history in Redis records no retention rules (written by an older herald): recording this node's; every node must have the same"
        ),
        3 if stored != ours && !stored.is_empty() => tracing::info!(
            recorded = %named(&stored),
            rules = %named(&ours),
            "the history in Redis holds no events: recording this node's retention rules in place of the recorded ones"
        ),
        _ => {}
    }
    Ok(())
}

impl RedisHistory {
    /// Connects to Redis (through the sentinels, for a sentinel URL); fails at once when it is
    /// unreachable, so startup reports it.
    pub async fn connect(options: RedisOptions) -> Result<Self, HistoryError> {
        let response_timeout = Duration::from_secs(2).max(options.wait_timeout * 2);
        let link = RedisLink::open(&options.url, response_timeout).map_err(unavailable)?;
        link.check().await.map_err(unavailable)?;
        if options.replicas > 0 {
            let mut conn = link.clone();
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let connected = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_slaves:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if connected < options.replicas {
                tracing::warn!(
                    connected,
                    wanted = options.replicas,
                    "the Redis primary has fewer replicas than --redis-replicas: publishing answers 503 not_replicated until they connect"
                );
            }
        }
        record_rules(&link, &options.prefix, &options.retention.rules).await?;
        Ok(RedisHistory {
            stream: format!("{}:events", options.prefix),
            dropped: format!("{}:dropped", options.prefix),
            log_prefix: format!("{}:log:", options.prefix),
            log_drops: format!("{}:dropped-logs", options.prefix),
            key_prefix: format!("{}:idem:", options.prefix),
            key_order: format!("{}:idem-order", options.prefix),
            key_bytes: format!("{}:idem-bytes", options.prefix),
            max_keys: options.idempotency_keys,
            max_key_bytes: options.idempotency_bytes,
            prefix: options.prefix.clone(),
            retention: options.retention,
            window_ms: options.idempotency_window.as_millis().max(1) as u64,
            replicas: options.replicas,
            wait_timeout: options.wait_timeout,
            link,
            follower: tokio::sync::Mutex::new(None),
            fence: format!("{}:fence", options.prefix),
            rewound: format!("{}:rewound", options.prefix),
            append: Script::new(APPEND),
            read: Script::new(&format!("{ID_ORDER}{READ}")),
            mark: Script::new(&format!("{ID_ORDER}{MARK}")),
        })
    }

    /// The way to the primary, for the cluster's presence and control channel (and anything
    /// else that talks to this Redis: it follows failovers).
    pub fn link(&self) -> RedisLink {
        self.link.clone()
    }

    /// A connection of the follower's own, for its blocking `XREAD`.
    async fn follower_connection(&self) -> Result<Primary, HistoryError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5).max(self.wait_timeout * 2)));
        self.link.dedicated(&config).await.map_err(unavailable)
    }

    /// Waits until `self.replicas` replicas hold every write `conn` made so far (and everything
    /// before it in the primary's replication stream).
    async fn wait_replicas(&self, conn: &mut Primary) -> Result<(), HistoryError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let acked: usize = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(self.wait_timeout.as_millis().max(1) as u64)
            .query_async(conn)
            .await
            .map_err(unavailable)?;
        if acked < self.replicas {
            return Err(HistoryError::NotReplicated {
                wanted: self.replicas,
                acked,
            });
        }
        Ok(())
    }

    /// Events read from the primary may be fanned out only once replicated (a failover must not
    /// take back what streams were given): one write of this node's, then `WAIT` for it.
    async fn fence(&self, conn: &mut Primary) -> Result<(), HistoryError> {
        if self.replicas == 0 {
            return Ok(());
        }
        redis::cmd("INCR")
            .arg(&self.fence)
            .query_async::<i64>(conn)
            .await
            .map_err(unavailable)?;
        self.wait_replicas(conn).await
    }

    /// The prefix of every key, shared by the cluster's presence keys.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A gap-checked read. With replicas to wait for, events are returned only once replicated,
    /// so a replay never shows an event that a failover could take back.
    async fn run_read(
        &self,
        mode: &str,
        pos: String,
        limit: usize,
        interest: Interest,
    ) -> Result<(Option<Gap>, Vec<Entry>, u64), HistoryError> {
        let mut conn = self.link.primary().await.map_err(unavailable)?;
        let flags = if self.retention.rules.is_empty() {
            String::new()
        } else {
            interest.flags(self.retention.rules.logs())
        };
        let reply: Value = self
            .read
            .key(&self.stream)
            .key(&self.dropped)
            .key(&self.rewound)
            .arg(mode)
            .arg(pos)
            .arg(limit)
            .arg(flags)
            .arg(&self.log_drops)
            .arg(interest.accepted())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(parts) = &reply else {
            return Err(unavailable("unexpected read reply"));
        };
        let (gap, oldest, range, drops) = match parts.as_slice() {
            [gap, oldest, range] => (gap, oldest, range, 0),
            [gap, oldest, range, Value::Int(n)] => (gap, oldest, range, *n as u64),
            _ => return Err(unavailable("unexpected read reply")),
        };
        let gap = matches!(gap, Value::Int(1));
        let oldest = text(oldest).and_then(|s| event_id(&s));
        if matches!(range, Value::Array(r) if !r.is_empty()) {
            self.fence(&mut conn).await?;
        }
        Ok((gap.then_some(Gap { oldest }), entries(range)?, drops))
    }

    /// [`Self::run_read`] from where `from` says: the gap verdict, the entries and the drops
    /// count the reader now accepts.
    async fn read_entries(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<(Option<Gap>, Vec<Entry>, u64), HistoryError> {
        match from {
            ReadFrom::Oldest => {
                self.run_read("oldest", String::new(), limit, interest)
                    .await
            }
            ReadFrom::After(id) => self.run_read("after", stream_id(id), limit, interest).await,
            ReadFrom::Since(ms) => {
                self.run_read("since", ms.to_string(), limit, interest)
                    .await
            }
        }
    }

    /// Writes (or finds) the rewind marker for `lost`, an event this node fanned out that the
    /// stream no longer holds (see [`MARK`]), and answers [`HistoryError::Rewound`] with it.
    async fn rewound(&self, lost: EventId) -> HistoryError {
        let mut conn = self.link.clone();
        let reply: Result<(String, String, String), _> = self
            .mark
            .key(&self.stream)
            .key(&self.rewound)
            .arg(stream_id(lost))
            .invoke_async(&mut conn)
            .await;
        let (marker, after, through) = match reply {
            Ok(r) => r,
            Err(e) => return unavailable(e),
        };
        match (event_id(&marker), event_id(&after), event_id(&through)) {
            (Some(marker), Some(after), Some(through)) => HistoryError::Rewound {
                marker,
                after: Some(after).filter(|a| a.0 != 0),
                through,
            },
            _ => unavailable("unexpected rewind marker reply"),
        }
    }
}

#[async_trait]
impl History for RedisHistory {
    async fn append(&self, messages: Vec<Message>) -> Result<Vec<Arc<Event>>, HistoryError> {
        let sizes = [messages.len()];
        let stored = self.append_claiming(messages, &sizes).await?;
        if stored.iter().any(|s| s.refused) {
            return Err(HistoryError::Unavailable(
                "an idempotency key was repeated with another payload".into(),
            ));
        }
        Ok(stored.into_iter().filter_map(|s| s.event).collect())
    }

    async fn read_for(
        &self,
        from: ReadFrom,
        limit: usize,
        interest: Interest,
    ) -> Result<Chunk, HistoryError> {
        let (gap, entries, drops) = self.read_entries(from, limit, interest).await?;
        let mut chunk = chunk_of(gap, entries);
        chunk.drops = drops;
        Ok(chunk)
    }

    fn interest(&self, selectors: &[Selector]) -> Interest {
        self.retention.rules.interest(selectors)
    }

    async fn event(&self, id: EventId) -> Result<Option<Arc<Event>>, HistoryError> {
        let sid = stream_id(id);
        let mut conn = self.link.primary().await.map_err(unavailable)?;
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(&sid)
            .arg(&sid)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(entries(&reply)?.into_iter().find_map(|e| match e {
            Entry::Event(event) => Some(event),
            _ => None,
        }))
    }

    async fn maintain(&self) -> Result<(), HistoryError> {
        // An append of nothing applies the retention limits (the script trims after appending).
        let ages = self.retention.max_age.is_some()
            || self
                .retention
                .rules
                .iter()
                .any(|r| r.keep.max_age.is_some() || r.after_complete.is_some());
        if ages {
            self.append_claiming(Vec::new(), &[]).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl SharedHistory for RedisHistory {
    async fn append_claiming(
        &self,
        messages: Vec<Message>,
        jobs: &[usize],
    ) -> Result<Vec<Stored>, HistoryError> {
        debug_assert_eq!(jobs.iter().sum::<usize>(), messages.len());
        let mut firsts = Vec::with_capacity(messages.len());
        for &size in jobs {
            firsts.push(size);
            firsts.extend(std::iter::repeat_n(0, size.saturating_sub(1)));
        }
        let mut invocation = self.append.key(&self.stream);
        invocation
            .key(&self.dropped)
            .key(&self.key_order)
            .key(&self.key_bytes);
        invocation
            .arg(self.retention.max_events)
            .arg(self.window_ms)
            .arg(&self.key_prefix)
            .arg(self.retention.cutoff_ms(now_ms()).unwrap_or(0))
            .arg(messages.len());
        let mut row = Vec::new();
        for (m, size) in messages.iter().zip(&firsts) {
            row.clear();
            encode_row(&mut row, 0, m)?;
            invocation
                .arg(size)
                .arg(m.idempotency_key.as_deref().unwrap_or(""))
                .arg(format!("{:016x}", m.fingerprint()))
                .arg(row.as_slice());
        }
        // With replicas to wait for, a repeat touches its key, so that `WAIT` covers the original.
        invocation.arg(if self.replicas > 0 { "1" } else { "0" });
        let rules = &self.retention.rules;
        if rules.is_empty() {
            invocation.arg("").arg("").arg("").arg("").arg("");
        } else {
            let after_complete = |log| rules.rule(log).and_then(|r| r.after_complete);
            let mut topics = String::new();
            let logs: Vec<String> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let log = rules.log_of(&m.targets);
                    if i > 0 {
                        topics.push('\n');
                    }
                    // Topics have no control characters (see `name`): tabs and newlines separate.
                    if after_complete(log).is_some() {
                        let names: Vec<&str> =
                            m.targets.topics.iter().map(|t| t.as_str()).collect();
                        topics.push_str(&names.join("\t"));
                    }
                    let a = u8::from(counts_for_all(&m.targets, rules.rule(log)));
                    let end = u8::from(is_end(m.event_type.as_ref()));
                    format!("{log}:{a}:{end}")
                })
                .collect();
            let now = now_ms();
            let bounds: Vec<String> = (0..rules.logs())
                .map(|l| {
                    let b = self.retention.bounds_of(l);
                    let ended =
                        after_complete(l).map_or(0, |a| now.saturating_sub(millis(a)).max(1));
                    format!("{},{},{ended}", b.max_events, b.cutoff_ms(now).unwrap_or(0))
                })
                .collect();
            // `r` first: with rules, even an append of nothing (maintenance) trims the logs.
            invocation
                .arg(format!("r,{}", logs.join(",")))
                .arg(bounds.join(";"))
                .arg(&self.log_prefix)
                .arg(&self.log_drops)
                .arg(topics);
        }
        invocation.arg(self.max_keys).arg(self.max_key_bytes);
        // One connection for the script and its `WAIT`: `WAIT` counts this connection's writes.
        let mut conn = self.link.primary().await.map_err(unavailable)?;
        let reply: Vec<Value> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.wait_replicas(&mut conn).await?;
        if reply.len() != messages.len() * 2 {
            return Err(unavailable("unexpected append reply"));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (m, pair) in messages.into_iter().zip(reply.chunks(2)) {
            let id = text(&pair[0])
                .and_then(|s| event_id(&s))
                .ok_or_else(|| unavailable("unexpected id in append reply"))?;
            let new = matches!(pair[1], Value::Int(0));
            out.push(Stored {
                id,
                event: new.then(|| Arc::new(Event::new(id, m, id.0 >> SEQ_BITS))),
                refused: matches!(pair[1], Value::Int(2)),
            });
        }
        Ok(out)
    }

    async fn follow(&self, after: Option<EventId>, limit: usize) -> Result<Chunk, HistoryError> {
        let mut slot = self.follower.lock().await;
        // The link found another primary (a failover): this connection reads the old one.
        if slot
            .as_ref()
            .is_some_and(|p| p.generation() != self.link.generation())
        {
            *slot = None;
        }
        // After a (re)connection, read once with the gap check, so a trim during an outage is
        // noticed; from then on a blocking XREAD returns whatever follows, one command a wake-up.
        if slot.is_none() {
            // A primary that took over may hold less than this node already fanned out: the tail
            // the old primary had not replicated is gone. This node says so in the stream itself
            // (a rewind marker), for every node: their streams may have wanted those events too.
            if let Some(after) = after {
                let newest = self.newest().await?;
                if newest.is_none_or(|n| n < after) {
                    return Err(self.rewound(after).await);
                }
            }
            let from = after.map_or(ReadFrom::Oldest, ReadFrom::After);
            // (Only replicated events are returned.)
            let (gap, entries, _) = self.read_entries(from, limit, Interest::ALL).await?;
            // The stream holds events older than `after` but not `after` itself: it was replaced
            // (a failover, events appended since), not trimmed.
            if let (Some(after), Some(gap)) = (after, gap)
                && gap.oldest.is_some_and(|o| o < after)
            {
                return Err(self.rewound(after).await);
            }
            if gap.is_some() {
                return Ok(chunk_of(gap, entries));
            }
            let chunk = followed(entries)?;
            if !chunk.events.is_empty() || !chunk.skipped.is_empty() {
                return Ok(chunk);
            }
        }
        if slot.is_none() {
            *slot = Some(self.follower_connection().await?);
        }
        let conn = slot.as_mut().expect("just set");
        let position = after.map_or_else(|| "0-0".to_string(), stream_id);
        let reply: Result<Value, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(limit)
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(position)
            .query_async(conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                *slot = None;
                return Err(unavailable(e));
            }
        };
        // `[[stream, entries]]`, or nil on timeout.
        let events = match &reply {
            Value::Array(streams) => match streams.first() {
                Some(Value::Array(pair)) if pair.len() == 2 => entries(&pair[1])?,
                _ => Vec::new(),
            },
            Value::Map(streams) => match streams.first() {
                Some((_, v)) => entries(v)?,
                None => Vec::new(),
            },
            _ => Vec::new(),
        };
        if !events.is_empty()
            && let Err(e) = self.fence(conn).await
        {
            *slot = None;
            return Err(e);
        }
        followed(events)
    }

    async fn newest(&self) -> Result<Option<EventId>, HistoryError> {
        let mut conn = self.link.clone();
        let reply: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.stream)
            .query_async(&mut conn)
            .await
            .or_else(|e| {
                if e.to_string().contains("no such key") {
                    Ok(Value::Nil)
                } else {
                    Err(unavailable(e))
                }
            })?;
        let pairs: Vec<(String, Value)> = match reply {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| Some((text(&kv[0])?, kv.get(1)?.clone())))
                .collect(),
            Value::Map(items) => items
                .into_iter()
                .filter_map(|(k, v)| Some((text(&k)?, v)))
                .collect(),
            _ => Vec::new(),
        };
        Ok(pairs
            .iter()
            .find(|(k, _)| k == "last-generated-id")
            .and_then(|(_, v)| text(v))
            .and_then(|s| event_id(&s))
            .filter(|id| id.0 != 0))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real `redis-server` on a free port, stopped when dropped. Fails the test when Redis is
    /// not installed: the test command installs it.
    pub(crate) struct RedisServer {
        child: std::process::Child,
        pub(crate) url: String,
        _dir: tempfile::TempDir,
    }

    impl RedisServer {
        pub(crate) fn start() -> RedisServer {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "no", "--dir", dir.path().to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/test installs it)");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            RedisServer {
                child,
                url: format!("redis://127.0.0.1:{port}/0"),
                _dir: dir,
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The options of a test node on `url` with keys under `prefix`: no replicas, the default
    /// idempotency bounds.
    fn options(url: &str, prefix: &str) -> RedisOptions {
        RedisOptions {
            url: url.to_string(),
            prefix: prefix.to_string(),
            retention: Retention::default(),
            idempotency_window: Duration::from_secs(60),
            idempotency_keys: crate::defaults::IDEMPOTENCY_KEYS,
            idempotency_bytes: crate::defaults::IDEMPOTENCY_BYTES,
            replicas: 0,
            wait_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn conformance() {
        let redis = RedisServer::start();
        let n = std::sync::atomic::AtomicUsize::new(0);
        let make = |retention: Retention, _first: u64| {
            let prefix = format!("t{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let url = redis.url.clone();
            async move {
                let h = RedisHistory::connect(RedisOptions {
                    retention,
                    ..options(&url, &prefix)
                })
                .await
                .unwrap();
                Arc::new(h) as Arc<dyn History>
            }
        };
        super::super::conformance::run_without_byte_limit(&make).await;
        super::super::conformance::run_rules(&make).await;
    }

    #[tokio::test]
    async fn keys_are_claimed_once_and_followers_see_every_event() {
        let redis = RedisServer::start();
        let node = || async {
            RedisHistory::connect(options(&redis.url, "claims"))
                .await
                .unwrap()
        };
        let h = node().await;
        assert_eq!(h.newest().await.unwrap(), None);
        let m = |d: &str, k: &str| Message::broadcast().data(d).idempotency_key(k);
        let first = h
            .append_claiming(vec![m("a", "k1"), m("a", "k1"), m("c", "k2")], &[2, 1])
            .await
            .unwrap();
        assert!(first[0].event.is_some() && first[1].event.is_none() && first[2].event.is_some());
        assert_eq!(
            first[1].id, first[0].id,
            "a repeat in the same batch gets the first id"
        );
        let again = h.append_claiming(vec![m("c", "k2")], &[1]).await.unwrap();
        assert_eq!((again[0].id, again[0].event.is_none()), (first[2].id, true));
        // The same key with another payload appends nothing of its job.
        let other = h
            .append_claiming(vec![m("x", "k3"), m("d", "k2")], &[2])
            .await
            .unwrap();
        assert!(other.iter().all(|s| s.refused && s.event.is_none()));
        assert_eq!(other[1].id, first[2].id);
        assert_eq!(h.newest().await.unwrap(), Some(first[2].id));
        let chunk = h.follow(Some(first[0].id), 10).await.unwrap();
        assert_eq!(chunk.events.len(), 1);
        assert_eq!(chunk.events[0].data, "c");
        // Caught up: follow waits for the next event.
        let waiting = tokio::spawn(async move {
            let chunk = h.follow(Some(first[2].id), 10).await.unwrap();
            chunk
                .events
                .iter()
                .map(|e| e.data.clone())
                .collect::<Vec<_>>()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let other = node().await;
        other
            .append(vec![Message::broadcast().data("from another node")])
            .await
            .unwrap();
        assert_eq!(
            waiting.await.unwrap(),
            vec!["from another node".to_string()]
        );
    }

    /// Reproduces (issue 12, defect 5 in a cluster): Redis kept every idempotency key for the whole
    /// window whatever their number, while the in-memory store bounds them. Now claiming a key
    /// forgets the oldest past `idempotency_keys` or `idempotency_bytes`, deleting them from Redis,
    /// and a repeat of a forgotten key publishes again.
    #[tokio::test]
    async fn idempotency_keys_are_bounded_in_redis() {
        let redis = RedisServer::start();
        let node_for = |prefix: &str, window: Duration, keys: usize, bytes: usize| {
            RedisHistory::connect(RedisOptions {
                idempotency_window: window,
                idempotency_keys: keys,
                idempotency_bytes: bytes,
                ..options(&redis.url, prefix)
            })
        };
        let node = |prefix: &str, keys: usize, bytes: usize| {
            node_for(prefix, Duration::from_secs(60), keys, bytes)
        };
        let m = |k: &str| Message::broadcast().data("same").idempotency_key(k);
        let claimed = |h: &RedisHistory, pattern: &str| {
            let link = h.link();
            let pattern = pattern.to_owned();
            async move {
                let mut conn = link.primary().await.unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                keys.len()
            }
        };

        let h = node("count", 3, usize::MAX).await.unwrap();
        for i in 0..5 {
            let s = h
                .append_claiming(vec![m(&format!("k{i}"))], &[1])
                .await
                .unwrap();
            assert!(s[0].event.is_some());
        }
        assert_eq!(
            claimed(&h, "count:idem:*").await,
            3,
            "only the newest 3 keys stay"
        );
        let repeat_newest = h.append_claiming(vec![m("k4")], &[1]).await.unwrap();
        assert!(repeat_newest[0].event.is_none(), "k4 is still remembered");
        let repeat_forgotten = h.append_claiming(vec![m("k0")], &[1]).await.unwrap();
        assert!(
            repeat_forgotten[0].event.is_some(),
            "k0 was forgotten at the bound, so it publishes again"
        );
        assert_eq!(claimed(&h, "count:idem:*").await, 3);
        // Another node sharing the prefix sees the same bounded set.
        let other = node("count", 3, usize::MAX).await.unwrap();
        let on_other = other.append_claiming(vec![m("k0")], &[1]).await.unwrap();
        assert_eq!(
            (on_other[0].event.is_none(), on_other[0].id),
            (true, repeat_forgotten[0].id)
        );

        // Bytes: 256-byte keys cost 2 × 256 + 64 each; room for 10.
        let cost = 2 * 256 + 64;
        let h = node("bytes", usize::MAX, cost * 10).await.unwrap();
        for i in 0..40 {
            h.append_claiming(vec![m(&format!("{i:0>256}"))], &[1])
                .await
                .unwrap();
        }
        assert_eq!(claimed(&h, "bytes:idem:*").await, 10);
        let mut conn = h.link().primary().await.unwrap();
        let kept: usize = redis::cmd("GET")
            .arg("bytes:idem-bytes")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, cost * 10);
        let newest = h
            .append_claiming(vec![m(&format!("{:0>256}", 39))], &[1])
            .await
            .unwrap();
        assert!(
            newest[0].event.is_none(),
            "the newest key is still remembered"
        );

        // Keys past their window leave the order and the byte count at the next claim.
        let h = node_for("window", Duration::from_millis(100), 10, usize::MAX)
            .await
            .unwrap();
        h.append_claiming(vec![m("a")], &[1]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.append_claiming(vec![m("b")], &[1]).await.unwrap();
        let mut conn = h.link().primary().await.unwrap();
        let (order, kept): (Vec<String>, usize) = redis::pipe()
            .cmd("ZRANGE")
            .arg("window:idem-order")
            .arg(0)
            .arg(-1)
            .cmd("GET")
            .arg("window:idem-bytes")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!((order, kept), (vec!["b".to_string()], 2 + 64));
    }

    /// A failover that lost the stream's tail, replayed on one Redis: the stream is put back to a
    /// copy taken after its first event. The first node to find it writes one rewind marker; a
    /// node that never read the tail meets that marker, another that read it finds the same
    /// one; reads from before or inside the lost range are gaps that go on after the marker.
    #[tokio::test]
    async fn a_lost_tail_gets_one_rewind_marker_that_every_follower_meets() {
        let redis = RedisServer::start();
        let node = || async {
            RedisHistory::connect(options(&redis.url, "rw"))
                .await
                .unwrap()
        };
        let (read_all, read_first, read_tail_too) = (node().await, node().await, node().await);
        let m = |d: &str| Message::broadcast().data(d);
        let kept = read_all.append(vec![m("kept")]).await.unwrap()[0].id;
        let mut conn = read_all.link().primary().await.unwrap();
        let copied: bool = redis::cmd("COPY")
            .arg("rw:events")
            .arg("rw:replica")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(copied);
        let lost = read_all.append(vec![m("lost1"), m("lost2")]).await.unwrap();
        let (lost1, lost2) = (lost[0].id, lost[1].id);
        // (So that the marker's id, from the clock, is past the tail's.)
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The replica takes over, without the tail.
        redis::cmd("RENAME")
            .arg("rw:replica")
            .arg("rw:events")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let rewound = |r: Result<Chunk, HistoryError>| match r {
            Err(HistoryError::Rewound {
                marker,
                after,
                through,
            }) => (marker, after, through),
            other => panic!("expected a rewind, got {other:?}"),
        };
        let (marker, after, through) = rewound(read_all.follow(Some(lost2), 10).await);
        assert_eq!((after, through), (Some(kept), lost2));
        assert!(marker > lost2);
        assert_eq!(
            rewound(read_first.follow(Some(kept), 10).await),
            (marker, Some(kept), lost2),
            "a node that never read the tail meets the marker"
        );
        assert_eq!(
            rewound(read_tail_too.follow(Some(lost1), 10).await),
            (marker, Some(kept), lost2),
            "a node that read part of the tail finds the same marker"
        );
        let len: usize = redis::cmd("XLEN")
            .arg("rw:events")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(len, 2, "kept and one marker");
        // Following goes on after the marker.
        let new = read_first.append(vec![m("new")]).await.unwrap()[0].id;
        let chunk = read_first.follow(Some(marker), 10).await.unwrap();
        assert_eq!(chunk.events.iter().map(|e| e.id).collect::<Vec<_>>(), [new]);
        // Reads from before the loss or inside it: one gap, then what follows the marker.
        for from in [kept, lost1, lost2] {
            let chunk = read_all.read(ReadFrom::After(from), 10).await.unwrap();
            assert!(chunk.gap.is_some(), "after {from}");
            assert_eq!(
                chunk.events.iter().map(|e| e.id).collect::<Vec<_>>(),
                [new],
                "after {from}"
            );
        }
        // From the oldest: `kept`, cut short at the marker; the next read is the gap.
        let first = read_all.read(ReadFrom::Oldest, 10).await.unwrap();
        assert_eq!(
            (first.gap, first.events.len(), first.cut_short),
            (None, 1, true)
        );
        let next = read_all.read(ReadFrom::After(kept), 10).await.unwrap();
        assert_eq!(next.skipped, [marker]);
        assert_eq!(read_all.event(marker).await.unwrap().map(|e| e.id), None);
    }

    /// The rules a node starts with are recorded; another node's must match while the history
    /// holds events. On an emptied history new rules are recorded, and what the old logs dropped
    /// still counts against every reader (a log number may now name another rule).
    #[tokio::test]
    async fn rules_are_recorded_and_checked_and_replaced_only_on_an_empty_history() {
        use crate::history::{RetentionRule, RetentionRules};
        use crate::name::Topic;
        let redis = RedisServer::start();
        let ruled = |rules: &[&str], age: Option<Duration>| {
            let global = Retention {
                max_events: 100,
                max_age: None,
                max_bytes: None,
                rules: RetentionRules::default(),
            };
            let rules = rules
                .iter()
                .map(|r| {
                    let mut r = RetentionRule::parse(r, &global).unwrap();
                    r.keep.max_age = age;
                    r
                })
                .collect();
            RedisHistory::connect(RedisOptions {
                retention: Retention {
                    rules: RetentionRules::new(rules).unwrap(),
                    ..global
                },
                ..options(&redis.url, "rules")
            })
        };
        let age = Some(Duration::from_millis(50));
        let h = ruled(&["ai/**:events=5"], age).await.unwrap();
        let ai = |d: &str| Message::to_topic(Topic::new("ai/x").unwrap()).data(d);
        let first = h.append(vec![ai("a"), ai("b")]).await.unwrap()[0].id;
        let err = ruled(&["ai/**:events=6"], age).await.unwrap_err();
        assert!(
            matches!(&err, HistoryError::RulesDiffer { stored, ours, .. }
                if stored == "'ai/**:events=5,age=50ms'" && ours == "'ai/**:events=6,age=50ms'"),
            "{err}"
        );
        let err = ruled(&[], None).await.unwrap_err().to_string();
        assert!(err.contains("this node none"), "{err}");
        // The same rules join.
        ruled(&["ai/**:events=5"], age).await.unwrap();
        // Both events age out: the history is empty, so other rules are recorded.
        tokio::time::sleep(Duration::from_millis(120)).await;
        h.maintain().await.unwrap();
        let h = ruled(&["jobs/*", "ai/**:events=5"], age).await.unwrap();
        let interest = h.interest(&[crate::name::Selector::new("ai/x").unwrap()]);
        let chunk = h
            .read_for(ReadFrom::After(first), 10, interest)
            .await
            .unwrap();
        assert!(
            chunk.gap.is_some(),
            "`b` was dropped after `a`: a reader of ai/x resuming after `a` missed it"
        );
        // Once it holds an event again, the old rules are refused.
        let job = Message::to_topic(Topic::new("jobs/1").unwrap()).data("j");
        h.append(vec![job]).await.unwrap();
        let err = ruled(&["ai/**:events=5"], age).await.unwrap_err();
        assert!(
            matches!(&err, HistoryError::RulesDiffer { stored, .. }
                if stored == "'jobs/*:events=100,age=50ms' 'ai/**:events=5,age=50ms'"),
            "{err}"
        );
    }

    #[test]
    fn ids_map_both_ways() {
        assert_eq!(
            event_id("1700000000000-0"),
            Some(EventId(1_700_000_000_000 << 20))
        );
        let id = event_id("1700000000123-7").unwrap();
        assert_eq!(stream_id(id), "1700000000123-7");
        assert!(event_id("1-1048576").is_none());
        assert!(event_id("x-1").is_none());
        assert!(event_id("5").is_none());
        assert!(event_id("1-2") < event_id("2-0"));
        assert!(event_id("2-0") < event_id("2-1"));
    }
}
