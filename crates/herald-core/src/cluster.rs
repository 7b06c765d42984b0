//! Cluster-wide presence and control through Redis. Each node reports its users and counters every
//! second under keys that expire with it (a dead node's share vanishes within seconds); closing a
//! user travels to every node on a pub/sub channel. This node's own share is always read live.

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
use crate::presence::{ClusterError, Online, Presence};
use crate::redis_link::RedisLink;

const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A node whose last report is older than this is gone.
const NODE_TTL_MS: u64 = 5_000;

/// This node's view of the cluster.
pub struct Cluster {
    hub: Hub,
    node: String,
    prefix: String,
    /// Every command goes to the current primary (see [`RedisLink`]).
    conn: RedisLink,
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
    /// reporting this hub's presence and listening for control messages, on `store`'s Redis.
    pub fn start(hub: Hub, store: &RedisHistory) -> Arc<Cluster> {
        let (conn, prefix) = (store.link(), store.prefix());
        let node = format!("{:016x}", rand_id());
        tracing::info!(node, "joined the cluster");
        let cluster = Arc::new(Cluster {
            hub,
            node,
            prefix: prefix.to_string(),
            conn,
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REPORT_EVERY);
            loop {
                tick.tick().await;
                let Some(cluster) = weak.upgrade() else { break };
                if let Err(e) = cluster.report().await {
                    tracing::debug!(error = %e, "presence report failed");
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
        let users = self.hub.users(None, usize::MAX);
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
        pipe.pexpire(&users_key, NODE_TTL_MS as i64)
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
            .pexpire(&stats_key, NODE_TTL_MS as i64)
            .ignore()
            .zadd(self.nodes_key(), &self.node, now)
            .ignore()
            .zrembyscore(self.nodes_key(), 0, now.saturating_sub(NODE_TTL_MS))
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// The other live nodes.
    async fn peers(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.conn.clone();
        let since = now_ms().saturating_sub(NODE_TTL_MS);
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
