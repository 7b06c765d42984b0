//! Presence events: a user's first stream anywhere makes herald publish `herald.presence`
//! `{"user","online":true,"connections","generation"}` to `$presence/{user}`; their last stream
//! closing, and the grace passing without a new one, publishes the `online: false` one. The rule it
//! keeps: one event per transition, with a generation that grows with every transition of that
//! user. This node's side (its connections, the grace timers) lives here; *whether* a change is a
//! transition, and its generation, is decided by a [`Ledger`]: [`LocalLedger`] on a single node,
//! the cluster's Redis ledger (in `cluster.rs`) across nodes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::event::{Event, Message};
use crate::history::ReadFrom;
use crate::hub::{Hub, WeakHub};
use crate::name::{EventType, Topic, UserId};
use crate::presence::ClusterError;

pub use crate::name::PRESENCE_EVENT;
/// The first segment of presence topics: `$presence/{user}`.
pub const PRESENCE_TOPIC: &str = "$presence";

/// A transition to announce: the user's generation after it, and their connections then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub generation: u64,
    pub connections: usize,
}

/// Decides which changes are transitions. Each method is called by one task, in the order of the
/// changes on this node.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// This node now holds `local` connections of `user` (the cluster pushes it at once).
    async fn count(&self, _user: &UserId, _local: usize) -> Result<(), ClusterError> {
        Ok(())
    }
    /// `user` opened their first stream on this node: the transition, when they were offline
    /// everywhere.
    async fn online(&self, user: &UserId, local: usize)
    -> Result<Option<Transition>, ClusterError>;
    /// `user`'s last stream on this node closed a grace ago: the transition, when no node holds
    /// one of their streams now.
    async fn offline(&self, user: &UserId) -> Result<Option<Transition>, ClusterError>;
}

/// One node alone: the online users and one generation counter. The counter starts above every
/// generation an earlier run of the same history can have used (see [`recover`]).
#[derive(Debug, Default)]
pub struct LocalLedger {
    online: Mutex<HashSet<UserId>>,
    generation: AtomicU64,
}

impl LocalLedger {
    /// Users announced online (by an earlier run) and the generation to count on from.
    pub fn new(online: impl IntoIterator<Item = UserId>, generation: u64) -> Self {
        LocalLedger {
            online: Mutex::new(online.into_iter().collect()),
            generation: AtomicU64::new(generation),
        }
    }
}

#[async_trait]
impl Ledger for LocalLedger {
    async fn online(
        &self,
        user: &UserId,
        local: usize,
    ) -> Result<Option<Transition>, ClusterError> {
        if !self.online.lock().insert(user.clone()) {
            return Ok(None);
        }
        Ok(Some(Transition {
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            connections: local,
        }))
    }

    async fn offline(&self, user: &UserId) -> Result<Option<Transition>, ClusterError> {
        if !self.online.lock().remove(user) {
            return Ok(None);
        }
        Ok(Some(Transition {
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            connections: 0,
        }))
    }
}

/// What an earlier run left in the history: the users whose last presence event says online (the
/// run ended before their offline event), and a generation above every one it used.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub online: Vec<UserId>,
    pub generation: u64,
}

/// Reads the whole history once for presence events. The generation floor is the newest event id:
/// every transition of a run publishes one event, and a run counts on from the newest id at its
/// start, so no earlier generation exceeds the newest id.
pub async fn recover(hub: &Hub) -> Recovered {
    let mut last: HashMap<UserId, bool> = HashMap::new();
    let mut newest = 0;
    let mut generation = 0;
    let mut from = ReadFrom::Oldest;
    loop {
        let chunk = match hub.history().read(from, 1024).await {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!(error = %e, "presence: the history could not be read at start");
                break;
            }
        };
        let Some(end) = chunk.events.last().map(|e| e.id) else {
            break;
        };
        let full = chunk.events.len() == 1024 || chunk.cut_short;
        for event in &chunk.events {
            newest = newest.max(event.id.0);
            if let Some((user, online, g)) = presence_of(event) {
                generation = generation.max(g);
                last.insert(user, online);
            }
        }
        if !full {
            break;
        }
        from = ReadFrom::After(end);
    }
    let mut online: Vec<UserId> = last
        .into_iter()
        .filter_map(|(u, on)| on.then_some(u))
        .collect();
    online.sort();
    Recovered {
        online,
        generation: generation.max(newest),
    }
}

/// The user, online flag and generation of a presence event.
fn presence_of(event: &Event) -> Option<(UserId, bool, u64)> {
    if event.event_type.as_ref().map(EventType::as_str) != Some(PRESENCE_EVENT) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(event.data.as_str()).ok()?;
    let user = UserId::new(v["user"].as_str()?).ok()?;
    Some((user, v["online"].as_bool()?, v["generation"].as_u64()?))
}

/// The topic of `user`'s presence events; `None` for a user id no topic segment can hold (`*`).
pub fn presence_topic(user: &UserId) -> Option<Topic> {
    Topic::new(&format!("{PRESENCE_TOPIC}/{user}")).ok()
}

/// Starts announcing `hub`'s users' transitions, as `ledger` decides them, `grace` after a last
/// close. `left_online` are users an earlier run announced online: they go offline after the
/// grace unless they connect. Returns `false` when the hub already announces presence.
pub fn start(
    hub: &Hub,
    ledger: Arc<dyn Ledger>,
    grace: Duration,
    left_online: Vec<UserId>,
) -> bool {
    let Some(changes) = hub.watch_users() else {
        return false;
    };
    tokio::spawn(run(hub.downgrade(), changes, ledger, grace, left_online));
    true
}

/// On a single node: recovers what an earlier run of the history left online, then announces.
pub async fn start_local(hub: &Hub, grace: Duration) -> bool {
    let recovered = recover(hub).await;
    if !recovered.online.is_empty() {
        tracing::info!(
            users = recovered.online.len(),
            "presence: users the previous run left online go offline after the grace unless they connect"
        );
    }
    let ledger = Arc::new(LocalLedger::new(
        recovered.online.iter().cloned(),
        recovered.generation,
    ));
    start(hub, ledger, grace, recovered.online)
}

/// Grace timers: the users whose last local stream closed, by deadline.
#[derive(Default)]
struct Graces {
    due: BTreeSet<(Instant, UserId)>,
    of: HashMap<UserId, Instant>,
}

impl Graces {
    fn set(&mut self, user: UserId, at: Instant) {
        self.cancel(&user);
        self.due.insert((at, user.clone()));
        self.of.insert(user, at);
    }
    fn cancel(&mut self, user: &UserId) {
        if let Some(at) = self.of.remove(user) {
            self.due.remove(&(at, user.clone()));
        }
    }
    fn next(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }
    fn pop_due(&mut self, now: Instant) -> Option<UserId> {
        let (at, _) = self.due.first()?;
        if *at > now {
            return None;
        }
        let (_, user) = self.due.pop_first()?;
        self.of.remove(&user);
        Some(user)
    }
}

async fn run(
    hub: WeakHub,
    mut changes: mpsc::UnboundedReceiver<UserId>,
    ledger: Arc<dyn Ledger>,
    grace: Duration,
    left_online: Vec<UserId>,
) {
    // Users this node answers for: with a stream here, or in their grace after the last one.
    let mut here: HashSet<UserId> = HashSet::new();
    let mut graces = Graces::default();
    let start = Instant::now();
    for user in left_online {
        here.insert(user.clone());
        graces.set(user, start + grace);
    }
    loop {
        let next = graces.next();
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            change = changes.recv() => {
                let Some(first) = change else { return };
                let Some(hub) = hub.upgrade() else { return };
                // A burst (a node's clients reconnecting) is taken at once, each user once: the
                // count is read now, so older changes of the same user add nothing.
                let mut users = vec![first];
                while users.len() < BURST {
                    match changes.try_recv() {
                        Ok(user) => users.push(user),
                        Err(_) => break,
                    }
                }
                users.sort();
                users.dedup();
                for user in users {
                    change_of(&hub, &*ledger, &mut here, &mut graces, grace, user).await;
                }
            }
            () = due => {
                let Some(hub) = hub.upgrade() else { return };
                while let Some(user) = graces.pop_due(Instant::now()) {
                    if hub.connections_of(&user) > 0 {
                        continue;
                    }
                    match ledger.offline(&user).await {
                        Ok(t) => {
                            here.remove(&user);
                            if let Some(t) = t {
                                announce(&hub, &user, false, t).await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%user, error = %e, "presence: offline not recorded, trying again");
                            graces.set(user, Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
        }
    }
}

/// Most changes taken from the channel at once.
const BURST: usize = 1024;

/// One user's connections on this node changed: record it, and announce them online when it is
/// their first stream here (the ledger says whether it is their first anywhere), or start their
/// grace when it was their last.
async fn change_of(
    hub: &Hub,
    ledger: &dyn Ledger,
    here: &mut HashSet<UserId>,
    graces: &mut Graces,
    grace: Duration,
    user: UserId,
) {
    let local = hub.connections_of(&user);
    if let Err(e) = ledger.count(&user, local).await {
        tracing::warn!(%user, error = %e, "presence: pushing a change failed");
    }
    if local > 0 {
        graces.cancel(&user);
        if !here.contains(&user) {
            match ledger.online(&user, local).await {
                Ok(t) => {
                    here.insert(user.clone());
                    if let Some(t) = t {
                        announce(hub, &user, true, t).await;
                    }
                }
                // Not marked here: the user's next change tries again.
                Err(e) => tracing::warn!(%user, error = %e, "presence: online not recorded"),
            }
        }
    } else if here.contains(&user) {
        graces.set(user, Instant::now() + grace);
    }
}

/// Publishes one presence event.
pub(crate) async fn announce(hub: &Hub, user: &UserId, online: bool, t: Transition) {
    let Some(topic) = presence_topic(user) else {
        tracing::debug!(%user, "presence: this user id cannot be a topic segment");
        return;
    };
    let data = serde_json::json!({
        "user": user.as_str(),
        "online": online,
        "connections": t.connections,
        "generation": t.generation,
    });
    let message = Message::to_topic(topic)
        .event(EventType::reserved(PRESENCE_EVENT))
        .data(data.to_string());
    if let Err(e) = hub.commit(vec![message]).await {
        tracing::warn!(%user, online, error = %e, "presence: the event could not be published");
    }
}
