//! Cluster-wide presence and control through Redis. Each node writes a change of its users'
//! connection counts to Redis as it happens (so every node sees it at once), and reports its users
//! and counters periodically, which keeps it alive: a node whose report is older than the TTL is
//! dead, and the first survivor to notice takes its users offline (once: a script moves the node
//! to the reaping set, and only that claimer reaps; a reaping that fails part-way is retried on a
//! later pass). Presence transitions (`herald.presence`) are decided by
//! Lua scripts over the same keys, so exactly one node announces each one, with a generation from
//! one cluster-wide `INCR`. Closing a user travels to every node on a pub/sub channel. Entries a
//! layer above shares (Mercure's active subscriptions) are one hash per node, written as they
//! change and handed to the reaper's [`PeerGone`] hooks when the node dies. This node's own share
//! is always read live.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::json;

use crate::event::now_ms;
use crate::fanout::Stats;
use crate::history::RedisHistory;
use crate::hub::Hub;
use crate::name::UserId;
use crate::presence::{ClusterError, Online, PeerGone, Presence};
use crate::presence_events::{self, Ledger, Transition};
use crate::redis_link::RedisLink;

/// A node whose last report is older than this many report intervals (and at least 5 s) is gone.
const TTL_REPORTS: u32 = 5;
/// A node's users stay readable this long after its last write, for the survivor that reaps it.
const USERS_KEEP_MS: i64 = 86_400_000;

/// Takes or renews the lease KEYS[1] for this node (ARGV[1]) for ARGV[2] ms: 1 while it holds it.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
";

/// Claims dead node ARGV[1] for reaping: moves it from the live set KEYS[1] to the reaping set
/// KEYS[2] with the deadline ARGV[3], or takes it there once its deadline passed (ARGV[2]: now).
/// A node whose last report is newer than ARGV[4] (the dead cutoff) is alive, whatever it was:
/// it is not claimed, and leaves the reaping set. 1: this caller reaps it.
const CLAIM: &str = r"
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) > tonumber(ARGV[4]) then
  redis.call('ZREM', KEYS[2], ARGV[1]) return 0
end
if seen then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) return 1
end
local lapses = redis.call('ZSCORE', KEYS[2], ARGV[1])
if lapses and tonumber(lapses) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) return 1
end
return 0
";

/// Marks `user` online unless it is; then the cluster-wide generation. KEYS: presence, generation.
const ONLINE: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 0 then return false end
return redis.call('INCR', KEYS[2])
";

/// Marks `user` offline if it is online and no live node holds one of its streams; then the
/// generation. KEYS: presence, generation, nodes; ARGV: user, live since (ms), key prefix.
const OFFLINE: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[2], '+inf')) do
  local c = redis.call('HGET', ARGV[3] .. ':node:' .. n .. ':users', ARGV[1])
  if c and tonumber(c) > 0 then return false end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('INCR', KEYS[2])
";

/// This node's view of the cluster.
pub struct Cluster {
    hub: Hub,
    keys: Keys,
    node: String,
    prefix: String,
    /// Every command goes to the current primary (see [`RedisLink`]).
    conn: RedisLink,
    node_ttl_ms: u64,
    /// Held while this node's users are written (a report or a pushed change), so a report's
    /// snapshot never overwrites a newer change.
    writing: Arc<tokio::sync::Mutex<()>>,
    /// Told of the shared entries of each node this one reaps.
    gone: parking_lot::Mutex<Vec<PeerGone>>,
}

/// The Redis keys of one node and of the cluster's presence.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    node: String,
}

impl Keys {
    fn users(&self, node: &str) -> String {
        format!("{}:node:{node}:users", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn presence(&self) -> String {
        format!("{}:presence", self.prefix)
    }
    fn generation(&self) -> String {
        format!("{}:presence:generation", self.prefix)
    }
    fn shared(&self, node: &str) -> String {
        format!("{}:node:{node}:shared", self.prefix)
    }
    /// Dead nodes claimed by a survivor and not reaped yet, scored by when a claim lapses.
    fn reaping(&self) -> String {
        format!("{}:reaping", self.prefix)
    }
}

/// Decides presence transitions for every node (see [`ONLINE`], [`OFFLINE`]); pushes this node's
/// counts as they change.
struct RedisLedger {
    hub: crate::hub::WeakHub,
    keys: Keys,
    conn: RedisLink,
    node_ttl_ms: u64,
    writing: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait::async_trait]
impl Ledger for RedisLedger {
    async fn count(&self, user: &UserId, _local: usize) -> Result<(), ClusterError> {
        let Some(hub) = self.hub.upgrade() else {
            return Ok(());
        };
        let _writing = self.writing.lock().await;
        // Read under the lock: whatever was written before holds an older count.
        let local = hub.connections_of(user);
        let key = self.keys.users(&self.keys.node);
        let mut pipe = redis::pipe();
        if local == 0 {
            pipe.hdel(&key, user.as_str()).ignore();
        } else {
            pipe.hset(&key, user.as_str(), local).ignore();
        }
        pipe.pexpire(&key, USERS_KEEP_MS).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn online(
        &self,
        user: &UserId,
        local: usize,
    ) -> Result<Option<Transition>, ClusterError> {
        let mut conn = self.conn.clone();
        let generation: Option<u64> = redis::Script::new(ONLINE)
            .key(self.keys.presence())
            .key(self.keys.generation())
            .arg(user.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(generation.map(|generation| Transition {
            generation,
            connections: local,
        }))
    }

    async fn offline(&self, user: &UserId) -> Result<Option<Transition>, ClusterError> {
        offline(&self.keys, &self.conn, self.node_ttl_ms, user).await
    }
}

/// Runs [`OFFLINE`] for `user`.
async fn offline(
    keys: &Keys,
    conn: &RedisLink,
    node_ttl_ms: u64,
    user: &UserId,
) -> Result<Option<Transition>, ClusterError> {
    let mut conn = conn.clone();
    let generation: Option<u64> = redis::Script::new(OFFLINE)
        .key(keys.presence())
        .key(keys.generation())
        .key(keys.nodes())
        .arg(user.as_str())
        .arg(now_ms().saturating_sub(node_ttl_ms))
        .arg(&keys.prefix)
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(generation.map(|generation| Transition {
        generation,
        connections: 0,
    }))
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(e.to_string())
}

impl Cluster {
    /// Joins the cluster whose shared history is `store` (the one `hub` was built with): starts
    /// reporting this hub's presence every `report_every` (`1s` is a good value) and
    /// listening for control messages, on `store`'s Redis. With `presence_grace`, it announces
    /// presence transitions (`herald.presence`) for the whole cluster, with the others.
    pub fn start(
        hub: Hub,
        store: &RedisHistory,
        report_every: Duration,
        presence_grace: Option<Duration>,
    ) -> Arc<Cluster> {
        let (conn, prefix) = (store.link(), store.prefix());
        let node = format!("{:016x}", rand_id());
        tracing::info!(node, "joined the cluster");
        let node_ttl_ms = (report_every * TTL_REPORTS)
            .max(Duration::from_secs(5))
            .as_millis() as u64;
        let keys = Keys {
            prefix: prefix.to_string(),
            node: node.clone(),
        };
        let writing = Arc::new(tokio::sync::Mutex::new(()));
        if let Some(grace) = presence_grace {
            let ledger = RedisLedger {
                hub: hub.downgrade(),
                keys: keys.clone(),
                conn: conn.clone(),
                node_ttl_ms,
                writing: writing.clone(),
            };
            presence_events::start(&hub, Arc::new(ledger), grace, Vec::new());
        }
        let cluster = Arc::new(Cluster {
            hub,
            keys,
            node,
            prefix: prefix.to_string(),
            conn,
            node_ttl_ms,
            writing,
            gone: parking_lot::Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(report_every);
            loop {
                tick.tick().await;
                let Some(cluster) = weak.upgrade() else { break };
                if let Err(e) = cluster.report().await {
                    tracing::debug!(error = %e, "presence report failed");
                }
                if let Err(e) = cluster.reap().await {
                    tracing::debug!(error = %e, "reaping dead nodes failed");
                }
            }
        });
        tokio::spawn(listen(Arc::downgrade(&cluster), cluster.conn.clone()));
        cluster
    }

    fn key(&self, node: &str, what: &str) -> String {
        format!("{}:node:{node}:{what}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn control_channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Writes this node's users and counters, refreshing their expiry.
    async fn report(&self) -> Result<(), ClusterError> {
        let _writing = self.writing.lock().await;
        let users = self.hub.users(None, usize::MAX);
        let selectors = self.hub.subscriptions();
        let s = self.hub.stats();
        let now = now_ms();
        let users_key = self.key(&self.node, "users");
        let stats_key = self.key(&self.node, "stats");
        let mut pipe = redis::pipe();
        pipe.atomic().del(&users_key).ignore();
        for chunk in users.chunks(1000) {
            let fields: Vec<(&str, usize)> = chunk.iter().map(|(u, n)| (u.as_str(), *n)).collect();
            pipe.hset_multiple(&users_key, &fields).ignore();
        }
        let selectors_key = self.key(&self.node, "selectors");
        pipe.del(&selectors_key).ignore();
        for chunk in selectors.chunks(1000) {
            let fields: Vec<(&str, usize)> = chunk.iter().map(|(s, n)| (s.as_str(), *n)).collect();
            pipe.hset_multiple(&selectors_key, &fields).ignore();
        }
        pipe.pexpire(&selectors_key, self.node_ttl_ms as i64)
            .ignore();
        pipe.pexpire(self.keys.shared(&self.node), USERS_KEEP_MS)
            .ignore();
        pipe.pexpire(&users_key, USERS_KEEP_MS)
            .ignore()
            .hset_multiple(
                &stats_key,
                &[
                    ("connections", s.connections as u64),
                    ("topics", s.topics as u64),
                    ("published", s.published),
                    ("delivered", s.delivered),
                    ("replayed", s.replayed),
                    ("gaps", s.gaps),
                    ("lagging", s.lagging as u64),
                    ("aged", s.aged),
                    ("rewinds", s.rewinds),
                ],
            )
            .ignore()
            .pexpire(&stats_key, self.node_ttl_ms as i64)
            .ignore()
            .zadd(self.nodes_key(), &self.node, now)
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// Takes the lease `name` for `ttl`, or renews it: true while this node holds it (one node of
    /// the cluster does a job at a time, such as delivering a webhook). A holder that stops
    /// renewing loses it after `ttl`.
    pub async fn hold_lease(&self, name: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let mut conn = self.conn.clone();
        let held: i64 = redis::Script::new(LEASE)
            .key(format!("{}:lease:{name}", self.prefix))
            .arg(&self.node)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    /// A small value the cluster keeps under `name` (a webhook's cursor).
    pub async fn load(&self, name: &str) -> Result<Option<String>, ClusterError> {
        let mut conn = self.conn.clone();
        conn.get(format!("{}:kept:{name}", self.prefix))
            .await
            .map_err(unavailable)
    }

    /// Keeps `value` under `name`; with `only_new`, only if nothing is kept there yet.
    pub async fn keep(&self, name: &str, value: &str, only_new: bool) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let key = format!("{}:kept:{name}", self.prefix);
        if only_new {
            conn.set_nx::<_, _, ()>(key, value).await
        } else {
            conn.set::<_, _, ()>(key, value).await
        }
        .map_err(unavailable)
    }

    /// Takes offline the users of nodes whose last report is older than the TTL and hands their
    /// shared entries to the [`PeerGone`] hooks. Each dead node is claimed by one survivor (the
    /// [`CLAIM`] script moves it from the live set to the reaping set with a deadline); the
    /// [`OFFLINE`] script then decides per user (they may hold streams on live nodes), so each
    /// offline event is published once. A claimed node whose reaping fails part-way (Redis, a
    /// hook) is finished as far as it goes and left in the reaping set (released at once when
    /// Redis answers, else at its deadline), so a later pass, here or on another survivor, does
    /// it again: a dead node's users and shares are never dropped unreaped.
    async fn reap(&self) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        let cutoff = now.saturating_sub(self.node_ttl_ms);
        let mut candidates: Vec<String> = conn
            .zrangebyscore(self.nodes_key(), 0, cutoff)
            .await
            .map_err(unavailable)?;
        let stalled: Vec<String> = conn
            .zrangebyscore(self.keys.reaping(), 0, now)
            .await
            .map_err(unavailable)?;
        candidates.extend(stalled);
        let mut failed = None;
        for node in candidates {
            let claimed: i64 = redis::Script::new(CLAIM)
                .key(self.nodes_key())
                .key(self.keys.reaping())
                .arg(&node)
                .arg(now)
                .arg(now + self.node_ttl_ms.max(5_000))
                .arg(cutoff)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if claimed == 0 {
                continue;
            }
            match self.reap_node(&node).await {
                Ok(()) => {
                    conn.zrem::<_, _, ()>(self.keys.reaping(), &node)
                        .await
                        .map_err(unavailable)?;
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, "reaping a dead node failed part-way: retried on a later pass");
                    // Released for the next pass (if Redis answers; else at the deadline).
                    let _ = conn
                        .zadd::<_, _, _, ()>(self.keys.reaping(), &node, 0)
                        .await;
                    failed = Some(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Reaps one claimed dead node: its users offline, its shared entries to the hooks. Both are
    /// attempted whatever the other's fate; what succeeded is deleted, the rest kept for a retry.
    async fn reap_node(&self, node: &str) -> Result<(), ClusterError> {
        let users = self.reap_users(node).await;
        let shared = self.reap_shared(node).await;
        users.and(shared)
    }

    async fn reap_users(&self, node: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let users_key = self.keys.users(node);
        let users: BTreeMap<String, usize> = conn.hgetall(&users_key).await.map_err(unavailable)?;
        tracing::info!(
            node,
            users = users.len(),
            "a node is gone: taking its users offline"
        );
        let mut failed = None;
        for user in users.keys().filter_map(|u| UserId::new(u).ok()) {
            // This node may hold the user's streams itself: its own grace timer decides then.
            if self.hub.connections_of(&user) > 0 {
                continue;
            }
            match offline(&self.keys, &self.conn, self.node_ttl_ms, &user).await {
                Ok(Some(t)) => presence_events::announce(&self.hub, &user, false, t).await,
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        conn.del::<_, ()>(&users_key).await.map_err(unavailable)
    }

    async fn reap_shared(&self, node: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let shared_key = self.keys.shared(node);
        let shared: Vec<(String, String)> = conn.hgetall(&shared_key).await.map_err(unavailable)?;
        if !shared.is_empty() {
            let hooks = self.gone.lock().clone();
            let mut failed = None;
            for hook in hooks {
                if let Err(e) = hook(shared.clone()).await {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                return Err(ClusterError::Unavailable(e));
            }
        }
        conn.del::<_, ()>(&shared_key).await.map_err(unavailable)
    }

    /// The other live nodes.
    async fn peers(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.conn.clone();
        let since = now_ms().saturating_sub(self.node_ttl_ms);
        let nodes: Vec<String> = conn
            .zrangebyscore(self.nodes_key(), since, "+inf")
            .await
            .map_err(unavailable)?;
        Ok(nodes.into_iter().filter(|n| *n != self.node).collect())
    }

    /// Every online user with connection counts summed over the nodes.
    async fn all_users(&self) -> Result<BTreeMap<String, usize>, ClusterError> {
        let mut merged: BTreeMap<String, usize> = self
            .hub
            .users(None, usize::MAX)
            .into_iter()
            .map(|(u, n)| (u.as_str().to_string(), n))
            .collect();
        let peers = self.peers().await?;
        if peers.is_empty() {
            return Ok(merged);
        }
        let mut pipe = redis::pipe();
        for p in &peers {
            pipe.hgetall(self.key(p, "users"));
        }
        let mut conn = self.conn.clone();
        let shares: Vec<BTreeMap<String, usize>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        for share in shares {
            for (user, n) in share {
                *merged.entry(user).or_default() += n;
            }
        }
        Ok(merged)
    }

    /// `(count of online users, the page after `after`)`, cluster-wide.
    async fn users(
        &self,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<(usize, Vec<(String, usize)>), ClusterError> {
        let all = self.all_users().await?;
        let lower = after.map(|u| u.as_str().to_string());
        let page = all
            .iter()
            .filter(|(u, _)| lower.as_ref().is_none_or(|l| *u > l))
            .take(limit)
            .map(|(u, n)| (u.clone(), *n))
            .collect();
        Ok((all.len(), page))
    }

    /// Connections of `user` on every node.
    async fn connections_of(&self, user: &UserId) -> Result<usize, ClusterError> {
        Ok(self.hub.connections_of(user) + self.remote_connections_of(user).await?)
    }

    async fn remote_connections_of(&self, user: &UserId) -> Result<usize, ClusterError> {
        let peers = self.peers().await?;
        if peers.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for p in &peers {
            pipe.hget(self.key(p, "users"), user.as_str());
        }
        let mut conn = self.conn.clone();
        let counts: Vec<Option<usize>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(counts.into_iter().flatten().sum())
    }

    /// Counters summed over the nodes (each node counts the publishes it accepted and the
    /// deliveries it made; `topics` is the largest any node has).
    /// Also each live node's id with its connections (this node first, then the others as they
    /// last reported).
    async fn stats(&self) -> Result<(Stats, Vec<(String, usize)>), ClusterError> {
        let mut total = self.hub.stats();
        let mut nodes = vec![(self.node.clone(), total.connections)];
        total.users = self.all_users().await?.len();
        let peers = self.peers().await?;
        if peers.is_empty() {
            return Ok((total, nodes));
        }
        let mut pipe = redis::pipe();
        for p in &peers {
            pipe.hgetall(self.key(p, "stats"));
        }
        let mut conn = self.conn.clone();
        let shares: Vec<BTreeMap<String, u64>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        for (peer, s) in peers.into_iter().zip(shares) {
            let get = |k: &str| s.get(k).copied().unwrap_or(0);
            nodes.push((peer, get("connections") as usize));
            total.connections += get("connections") as usize;
            total.topics = total.topics.max(get("topics") as usize);
            total.published += get("published");
            total.delivered += get("delivered");
            total.replayed += get("replayed");
            total.gaps += get("gaps");
            total.lagging += get("lagging") as usize;
            total.aged += get("aged");
            total.rewinds += get("rewinds");
        }
        Ok((total, nodes))
    }

    /// Ends `user`'s streams on every node (and blocks new ones for `block`). Returns how many
    /// streams that was: this node's, plus the other nodes' last reported counts.
    async fn close_user(
        &self,
        user: &UserId,
        reason: &str,
        block: Option<Duration>,
    ) -> Result<usize, ClusterError> {
        let remote = self.remote_connections_of(user).await?;
        let message = json!({
            "op": "close",
            "from": self.node,
            "user": user.as_str(),
            "reason": reason,
            "block_ms": block.map(|b| b.as_millis() as u64),
        });
        let mut conn = self.conn.clone();
        conn.publish::<_, _, ()>(self.control_channel(), message.to_string())
            .await
            .map_err(unavailable)?;
        Ok(self.hub.close_user(user, reason, block) + remote)
    }

    fn apply(&self, payload: &str) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(payload) else {
            tracing::warn!("ignoring an unreadable control message");
            return;
        };
        if msg["from"].as_str() == Some(self.node.as_str()) || msg["op"] != "close" {
            return;
        }
        let Some(user) = msg["user"].as_str().and_then(|u| UserId::new(u).ok()) else {
            return;
        };
        let reason = msg["reason"].as_str().unwrap_or("closed");
        let block = msg["block_ms"].as_u64().map(Duration::from_millis);
        let closed = self.hub.close_user(&user, reason, block);
        tracing::debug!(%user, closed, "closed by another node");
    }
}

impl Cluster {
    /// Selectors with stream counts summed over the nodes: this node's live, the others' as
    /// they last reported (every `--cluster-report`).
    async fn all_subscriptions(&self) -> Result<Vec<(String, usize)>, ClusterError> {
        let mut merged: BTreeMap<String, usize> = self
            .hub
            .subscriptions()
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect();
        let peers = self.peers().await?;
        if !peers.is_empty() {
            let mut pipe = redis::pipe();
            for p in &peers {
                pipe.hgetall(self.key(p, "selectors"));
            }
            let mut conn = self.conn.clone();
            let shares: Vec<BTreeMap<String, usize>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            for share in shares {
                for (selector, n) in share {
                    *merged.entry(selector).or_default() += n;
                }
            }
        }
        Ok(merged.into_iter().collect())
    }
}

/// Every node: this one's share read live, the others' from their last reports.
#[async_trait::async_trait]
impl Presence for Cluster {
    async fn online(&self, after: Option<&UserId>, limit: usize) -> Result<Online, ClusterError> {
        let (count, page) = self.users(after, limit).await?;
        Ok(Online { count, page })
    }

    async fn connections(&self, user: &UserId) -> Result<usize, ClusterError> {
        self.connections_of(user).await
    }

    async fn close(
        &self,
        user: &UserId,
        reason: &str,
        block: Option<Duration>,
    ) -> Result<usize, ClusterError> {
        self.close_user(user, reason, block).await
    }

    async fn totals(&self) -> Result<Stats, ClusterError> {
        Ok(self.stats().await?.0)
    }

    async fn nodes(&self) -> Result<Option<Vec<(String, usize)>>, ClusterError> {
        Ok(Some(self.stats().await?.1))
    }

    async fn subscriptions(&self) -> Result<Vec<(String, usize)>, ClusterError> {
        self.all_subscriptions().await
    }

    async fn share(
        &self,
        entries: &[(String, Option<String>)],
        replace: bool,
    ) -> Result<(), ClusterError> {
        let shared = self.keys.shared(&self.node);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if replace {
            pipe.del(&shared).ignore();
        }
        for (key, value) in entries {
            match value {
                Some(v) => pipe.hset(&shared, key, v).ignore(),
                None => pipe.hdel(&shared, key).ignore(),
            };
        }
        pipe.pexpire(&shared, USERS_KEEP_MS).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn shared_by_peers(&self) -> Result<Vec<(String, String)>, ClusterError> {
        let peers = self.peers().await?;
        if peers.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for p in &peers {
            pipe.hgetall(self.keys.shared(p));
        }
        let mut conn = self.conn.clone();
        let shares: Vec<Vec<(String, String)>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(shares.into_iter().flatten().collect())
    }

    fn on_peer_gone(&self, gone: PeerGone) {
        self.gone.lock().push(gone);
    }
}

/// Listens for control messages; resubscribes after Redis comes back, and on the new primary
/// after a failover (a generation change of the link).
async fn listen(cluster: std::sync::Weak<Cluster>, link: RedisLink) {
    loop {
        let channel = match cluster.upgrade() {
            Some(c) => c.control_channel(),
            None => return,
        };
        match link.pubsub().await {
            Ok((generation, mut pubsub)) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    let mut check = tokio::time::interval(Duration::from_millis(500));
                    loop {
                        tokio::select! {
                            msg = messages.next() => {
                                let Some(msg) = msg else { break };
                                let Some(cluster) = cluster.upgrade() else {
                                    return;
                                };
                                if let Ok(payload) = msg.get_payload::<String>() {
                                    cluster.apply(&payload);
                                }
                            }
                            _ = check.tick() => {
                                if link.generation() != generation {
                                    break;
                                }
                                if cluster.strong_count() == 0 {
                                    return;
                                }
                            }
                        }
                    }
                }
                // The connection ended: the primary may be gone; look for it afresh.
                link.drop_generation(generation);
            }
            Err(e) => tracing::debug!(error = %e, "control channel unavailable"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A node id: time and process id, unique enough to tell nodes apart.
fn rand_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::RedisServer;

    async fn claim(conn: &mut redis::aio::MultiplexedConnection, node: &str, now: u64) -> i64 {
        redis::Script::new(CLAIM)
            .key("nodes")
            .key("reaping")
            .arg(node)
            .arg(now)
            .arg(now + 5_000)
            .arg(now - 1_000)
            .invoke_async(conn)
            .await
            .unwrap()
    }

    /// Review finding: a node whose reaping failed and that reported again (alive after a Redis
    /// or network hiccup) was claimed and reaped anyway, its users taken offline under it.
    #[tokio::test]
    async fn a_node_that_reported_again_is_not_claimed() {
        let redis = RedisServer::start();
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let now = 1_000_000u64;
        // Dead (last report before the cutoff): claimed once.
        conn.zadd::<_, _, _, ()>("nodes", "dead", now - 2_000)
            .await
            .unwrap();
        assert_eq!(claim(&mut conn, "dead", now).await, 1);
        assert_eq!(claim(&mut conn, "dead", now).await, 0, "claimed once");
        // Its reaping failed (released at once), and then it reported again: alive.
        conn.zadd::<_, _, _, ()>("reaping", "dead", 0)
            .await
            .unwrap();
        conn.zadd::<_, _, _, ()>("nodes", "dead", now)
            .await
            .unwrap();
        assert_eq!(claim(&mut conn, "dead", now).await, 0, "alive again");
        let reaping: Option<f64> = conn.zscore("reaping", "dead").await.unwrap();
        assert_eq!(reaping, None, "it left the reaping set");
        let live: Option<f64> = conn.zscore("nodes", "dead").await.unwrap();
        assert!(live.is_some(), "it stays live");
        // A released claim of a node that stays silent is taken again.
        conn.zadd::<_, _, _, ()>("nodes", "silent", now - 2_000)
            .await
            .unwrap();
        assert_eq!(claim(&mut conn, "silent", now).await, 1);
        conn.zadd::<_, _, _, ()>("reaping", "silent", 0)
            .await
            .unwrap();
        assert_eq!(claim(&mut conn, "silent", now).await, 1);
    }
}
