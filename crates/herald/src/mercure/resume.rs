//! Publisher ids to herald ids, so `Last-Event-ID: <publisher id>` resumes by a lookup, not a
//! search of the history. The index is this node's, in memory, and follows whichever store holds
//! the history (memory, `--data-dir`, Redis) the same way: before each lookup it reads the events
//! appended since the last one (`ReadFrom::After` its watermark) and adds the Mercure updates that
//! carry a publisher id. Rules it keeps: an id resolves to its earliest *retained* occurrence (the
//! entries of events retention dropped are pruned, so they answer "unknown", as a search would);
//! each event is read once per process, so a lookup costs the events published since the previous
//! one (amortised one read per published event), and the first lookup after a start reads the
//! retained history once. When the store reports a gap after the watermark (retention overtook it,
//! or a Redis failover rewound the history), the index is rebuilt from the oldest retained event;
//! with retention rules only a dropped Mercure update (or an event every reader counts) is a gap.
//! Memory: one entry per retained update that has a publisher id.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use herald_core::{EventId, HistoryError, Hub, ReadFrom, Selector, Topic};

use super::update::{self, HERALD_TOPIC};

/// Events read per history read.
const CHUNK: usize = 512;

#[derive(Debug, Default)]
struct State {
    /// The newest herald id read; `None`: nothing read yet.
    seen: Option<EventId>,
    /// Herald id → publisher id, for the updates that carry one.
    by_herald: BTreeMap<EventId, Arc<str>>,
    /// Publisher id → its retained occurrences, oldest first.
    by_id: HashMap<Arc<str>, VecDeque<EventId>>,
}

impl State {
    fn add(&mut self, herald: EventId, id: &str) {
        let id: Arc<str> = match self.by_id.get_key_value(id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(id),
        };
        self.by_id.entry(id.clone()).or_default().push_back(herald);
        self.by_herald.insert(herald, id);
    }

    /// Forgets the entries of events older than `oldest` (dropped by retention).
    fn prune_before(&mut self, oldest: EventId) {
        while let Some(entry) = self.by_herald.first_entry() {
            if *entry.key() >= oldest {
                break;
            }
            let (herald, id) = entry.remove_entry();
            if let Some(list) = self.by_id.get_mut(&id) {
                list.retain(|h| *h != herald);
                if list.is_empty() {
                    self.by_id.remove(&id);
                }
            }
        }
    }

    fn clear(&mut self) {
        *self = State::default();
    }
}

/// The index; one per Mercure endpoint.
#[derive(Debug, Default)]
pub struct PublisherIds {
    state: tokio::sync::Mutex<State>,
}

/// Where the history stands after a catch-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Newest {
    /// The newest herald id; `None` when the history is empty.
    pub herald: Option<EventId>,
    /// Its Mercure id when it is an update whose publisher id resolves to it.
    pub mercure: Option<String>,
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: Option<String>,
}

impl PublisherIds {
    /// The herald id `id` names: a hub-made `#<herald id>` at once, a publisher's id by the index
    /// (its earliest retained occurrence). `None`: never published, or dropped by retention.
    pub async fn resolve(&self, hub: &Hub, id: &str) -> Result<Option<EventId>, HistoryError> {
        if let Some(h) = update::herald_id(id) {
            return Ok(Some(h));
        }
        let mut state = self.state.lock().await;
        catch_up(&mut state, hub).await?;
        Ok(state.by_id.get(id).and_then(|l| l.front().copied()))
    }

    /// The newest event now (the cursor of the subscriptions API).
    pub async fn newest(&self, hub: &Hub) -> Result<Newest, HistoryError> {
        let mut state = self.state.lock().await;
        catch_up(&mut state, hub).await?;
        let herald = state.seen;
        let mercure = herald.and_then(|h| {
            let id = state.by_herald.get(&h)?;
            (state.by_id.get(id)?.front() == Some(&h)).then(|| id.to_string())
        });
        Ok(Newest { herald, mercure })
    }

    /// Entries held (for tests and the docs' memory figure).
    #[cfg(test)]
    async fn len(&self) -> usize {
        self.state.lock().await.by_herald.len()
    }
}

/// Reads what was appended since the watermark into the index, pruning what retention dropped.
async fn catch_up(state: &mut State, hub: &Hub) -> Result<(), HistoryError> {
    let topic = Topic::new(HERALD_TOPIC).expect("a valid topic");
    let oldest = hub.read_history(ReadFrom::Oldest, 1).await?;
    match oldest.events.first() {
        Some(first) => state.prune_before(first.id),
        None if oldest.cut_short => {}
        None => {
            state.clear();
            return Ok(());
        }
    }
    let mut from = state.seen.map_or(ReadFrom::Oldest, ReadFrom::After);
    let mut rebuilds = 0;
    // Only Mercure updates are indexed: with retention rules, drops of other events are no gap.
    let mercure = Selector::new(HERALD_TOPIC).expect("a valid selector");
    let mut interest = hub.history_interest(std::slice::from_ref(&mercure));
    loop {
        let chunk = hub.read_history_for(from, CHUNK, interest).await?;
        // Going on after this read, what was dropped before it is no gap (a rebuild too: it
        // starts at each log's oldest event).
        interest = interest.after_drops(chunk.drops);
        // A gap after the watermark that is not unreadable rows passed over: events after it are
        // gone (retention overtook it) or the history was rewound, so the index may not match
        // the store any more. Rebuilt from the oldest event (at most twice per catch-up, so a
        // retention racing the read cannot keep it busy).
        if chunk.gap.is_some()
            && chunk.skipped.is_empty()
            && matches!(from, ReadFrom::After(_))
            && rebuilds < 2
        {
            rebuilds += 1;
            state.clear();
            from = ReadFrom::Oldest;
            continue;
        }
        for event in &chunk.events {
            if event.targets.topics.contains(&topic)
                && let Ok(IdOnly { id: Some(id) }) = serde_json::from_str::<IdOnly>(&event.data)
            {
                state.add(event.id, &id);
            }
        }
        let Some(last) = chunk.events.last().map(|e| e.id) else {
            return Ok(());
        };
        state.seen = Some(last);
        if chunk.events.len() < CHUNK && !chunk.cut_short {
            return Ok(());
        }
        from = ReadFrom::After(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Message, Retention};

    fn update(id: Option<&str>) -> Message {
        let envelope = update::Envelope {
            id: id.map(str::to_string),
            topics: vec!["t".into()],
            r#type: None,
            retry: None,
            private: false,
            data: String::new(),
        };
        Message::to_topic(Topic::new(HERALD_TOPIC).unwrap())
            .private(true)
            .data(serde_json::to_string(&envelope).unwrap())
    }

    #[tokio::test]
    async fn ids_resolve_to_their_earliest_retained_occurrence_and_follow_retention() {
        let hub = Hub::builder()
            .retention(Retention {
                max_events: 4,
                ..Retention::default()
            })
            .build()
            .unwrap();
        let ids = PublisherIds::default();
        assert_eq!(ids.resolve(&hub, "a").await.unwrap(), None);
        assert_eq!(ids.newest(&hub).await.unwrap().herald, None);
        let a = hub.publish(update(Some("a"))).await.unwrap().id;
        let b = hub.publish(update(Some("b"))).await.unwrap().id;
        let a2 = hub.publish(update(Some("a"))).await.unwrap().id;
        assert_eq!(ids.resolve(&hub, "a").await.unwrap(), Some(a));
        assert_eq!(ids.resolve(&hub, "b").await.unwrap(), Some(b));
        assert_eq!(ids.resolve(&hub, "zz").await.unwrap(), None);
        let newest = ids.newest(&hub).await.unwrap();
        assert_eq!(newest.herald, Some(a2));
        assert_eq!(newest.mercure, None, "a resolves to its first occurrence");
        // Read after the watermark only: a new id is found, then retention drops a's first.
        let c = hub.publish(update(Some("c"))).await.unwrap().id;
        assert_eq!(ids.resolve(&hub, "c").await.unwrap(), Some(c));
        assert_eq!(
            ids.newest(&hub).await.unwrap().mercure.as_deref(),
            Some("c")
        );
        hub.publish(update(None)).await.unwrap();
        assert_eq!(ids.resolve(&hub, "a").await.unwrap(), Some(a2));
        assert_eq!(ids.len().await, 3, "a's dropped occurrence is pruned");
        // Retention overtakes the watermark: rebuilt from the oldest retained event.
        for _ in 0..6 {
            hub.publish(update(None)).await.unwrap();
        }
        let d = hub.publish(update(Some("d"))).await.unwrap().id;
        assert_eq!(ids.resolve(&hub, "a").await.unwrap(), None);
        assert_eq!(ids.resolve(&hub, "d").await.unwrap(), Some(d));
        assert_eq!(ids.len().await, 1);
        assert_eq!(ids.resolve(&hub, "#7").await.unwrap(), Some(EventId(7)));
    }
}
