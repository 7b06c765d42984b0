//! Presence and control as the HTTP layer asks for them: who is online, how many connections a
//! user has, closing a user's streams, the counters, and entries a layer above shares with the
//! other nodes (Mercure's active subscriptions). One trait, answered by this node's [`Hub`]
//! alone, or across every node of a cluster by `Cluster` (feature `redis`), so callers never branch
//! on the mode.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::fanout::Stats;
use crate::hub::Hub;
use crate::name::UserId;

/// A cluster-wide query failed: the other nodes' shares could not be read (Redis unreachable).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster state unavailable: {0}")]
    Unavailable(String),
}

/// Online users: how many in all, and one page of them with their connection counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    pub count: usize,
    /// Sorted by id.
    pub page: Vec<(String, usize)>,
}

/// Told the entries a dead node shared (see [`Presence::share`]), by the one node that reaps it.
/// Its future's `Err` (say, the hook could not publish) keeps the entries: the reaper calls it
/// again with them on a later pass, so what it does must bear a repeat.
pub type PeerGone = Arc<
    dyn Fn(Vec<(String, String)>) -> futures_util::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// Presence and control, for this node or for every node.
#[async_trait]
pub trait Presence: Send + Sync + std::fmt::Debug {
    /// The online users after `after` (sorted by id), at most `limit`, and how many there are.
    async fn online(&self, after: Option<&UserId>, limit: usize) -> Result<Online, ClusterError>;
    /// Open connections of `user`.
    async fn connections(&self, user: &UserId) -> Result<usize, ClusterError>;
    /// Ends `user`'s streams with `herald.close` (and blocks new ones for `block`); returns how
    /// many streams that was.
    async fn close(
        &self,
        user: &UserId,
        reason: &str,
        block: Option<Duration>,
    ) -> Result<usize, ClusterError>;
    /// The counters.
    async fn totals(&self) -> Result<Stats, ClusterError>;
    /// Every selector open streams hold, with their stream counts, sorted by selector.
    async fn subscriptions(&self) -> Result<Vec<(String, usize)>, ClusterError>;
    /// Each live node's id with its connections; `None` for a single node.
    async fn nodes(&self) -> Result<Option<Vec<(String, usize)>>, ClusterError> {
        Ok(None)
    }
    /// Shares entries of this node's with the other nodes, as `(key, value)`: `Some` sets one,
    /// `None` removes it; with `replace`, these are all of them (the others are removed). The
    /// caller keeps its own entries; a single node has no one to tell.
    async fn share(
        &self,
        _entries: &[(String, Option<String>)],
        _replace: bool,
    ) -> Result<(), ClusterError> {
        Ok(())
    }
    /// The entries the other live nodes share, as `(key, value)`.
    async fn shared_by_peers(&self) -> Result<Vec<(String, String)>, ClusterError> {
        Ok(Vec::new())
    }
    /// Calls `gone` with the entries of each node found dead, on the one node that reaps it.
    fn on_peer_gone(&self, _gone: PeerGone) {}
}

/// This node alone: never fails.
#[async_trait]
impl Presence for Hub {
    async fn online(&self, after: Option<&UserId>, limit: usize) -> Result<Online, ClusterError> {
        Ok(Online {
            count: self.stats().users,
            page: self
                .users(after, limit)
                .into_iter()
                .map(|(u, n)| (u.as_str().to_string(), n))
                .collect(),
        })
    }

    async fn connections(&self, user: &UserId) -> Result<usize, ClusterError> {
        Ok(self.connections_of(user))
    }

    async fn close(
        &self,
        user: &UserId,
        reason: &str,
        block: Option<Duration>,
    ) -> Result<usize, ClusterError> {
        Ok(self.close_user(user, reason, block))
    }

    async fn totals(&self) -> Result<Stats, ClusterError> {
        Ok(self.stats())
    }

    async fn subscriptions(&self) -> Result<Vec<(String, usize)>, ClusterError> {
        Ok(Hub::subscriptions(self)
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), n))
            .collect())
    }
}
