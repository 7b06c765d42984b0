//! The selector index: a trie over topic segments that finds every subscriber whose selector
//! matches a published topic in time proportional to the topic's depth, not to the subscriber count.

use std::sync::Arc;

use super::subscriber::Subscriber;
use crate::name::{Selector, Topic};

#[derive(Debug, Default)]
pub(crate) struct SelectorIndex {
    root: Node,
    /// How many distinct selectors have at least one subscriber.
    distinct: usize,
}

/// One trie node: 80 bytes, with nothing allocated until it has children or subscribers, and
/// its literal children in a sorted vector sized to fit (a chain of single children, as a deep
/// selector makes, costs one small allocation per segment, not a hash table).
#[derive(Debug, Default)]
struct Node {
    literal: Vec<(Box<str>, Node)>,
    star: Option<Box<Node>>,
    /// Subscribers whose selector ends at this node.
    here: Vec<Arc<Subscriber>>,
    /// Subscribers whose selector ends with `**` after this node (one or more further segments).
    rest: Vec<Arc<Subscriber>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.here.is_empty()
            && self.rest.is_empty()
            && self.literal.is_empty()
            && self.star.is_none()
    }
}

impl Node {
    fn find(&self, seg: &str) -> Result<usize, usize> {
        self.literal.binary_search_by(|(k, _)| (**k).cmp(seg))
    }

    fn child(&self, seg: &str) -> Option<&Node> {
        self.find(seg).ok().map(|i| &self.literal[i].1)
    }

    fn child_mut(&mut self, seg: &str) -> Option<&mut Node> {
        self.find(seg).ok().map(|i| &mut self.literal[i].1)
    }

    fn child_or_insert(&mut self, seg: &str) -> &mut Node {
        let i = match self.find(seg) {
            Ok(i) => i,
            Err(i) => {
                self.literal.reserve_exact(1);
                self.literal.insert(i, (seg.into(), Node::default()));
                i
            }
        };
        &mut self.literal[i].1
    }

    fn remove_child(&mut self, seg: &str) {
        if let Ok(i) = self.find(seg) {
            self.literal.remove(i);
            if self.literal.capacity() > 2 * self.literal.len() {
                self.literal.shrink_to_fit();
            }
        }
    }
}

impl SelectorIndex {
    pub(crate) fn insert(&mut self, selector: &Selector, sub: &Arc<Subscriber>) {
        let mut node = &mut self.root;
        let mut segs = selector.segments().peekable();
        while let Some(seg) = segs.next() {
            if seg == "**" && segs.peek().is_none() {
                if node.rest.is_empty() {
                    self.distinct += 1;
                }
                node.rest.push(sub.clone());
                return;
            }
            node = if seg == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.child_or_insert(seg)
            };
        }
        if node.here.is_empty() {
            self.distinct += 1;
        }
        node.here.push(sub.clone());
    }

    /// An equal `Selector` an open stream already holds, if any: a new stream takes it instead of
    /// keeping its own copy of the same text (many streams share few selectors). Each
    /// subscriber's selectors are sorted, so the holder's copy is found by a binary search.
    pub(crate) fn shared(&self, selector: &Selector) -> Option<Selector> {
        let mut node = &self.root;
        let mut segs = selector.segments().peekable();
        let mut rest = false;
        while let Some(seg) = segs.next() {
            if seg == "**" && segs.peek().is_none() {
                rest = true;
                break;
            }
            node = if seg == "*" {
                node.star.as_deref()?
            } else {
                node.child(seg)?
            };
        }
        let holders = if rest { &node.rest } else { &node.here };
        let holder = holders.first()?;
        let i = holder.selectors.binary_search(selector).ok()?;
        Some(holder.selectors[i].clone())
    }

    pub(crate) fn remove(&mut self, selector: &Selector, sub: &Arc<Subscriber>) {
        let segs: Vec<&str> = selector.segments().collect();
        if remove_at(&mut self.root, &segs, sub) {
            self.distinct -= 1;
        }
    }

    pub(crate) fn distinct(&self) -> usize {
        self.distinct
    }

    /// Calls `f` for each subscriber of each selector matching `topic` (a subscriber with several
    /// matching selectors is seen several times; the caller de-duplicates).
    pub(crate) fn for_each_match(&self, topic: &Topic, f: &mut impl FnMut(&Arc<Subscriber>)) {
        let segs: Vec<&str> = topic.segments().collect();
        if topic.is_reserved() {
            // A first-level `*` or `**` never matches a reserved topic (see `Selector::matches`).
            if let Some((first, tail)) = segs.split_first()
                && let Some(child) = self.root.child(first)
            {
                visit(child, tail, f);
            }
            return;
        }
        visit(&self.root, &segs, f);
    }
}

fn visit(node: &Node, segs: &[&str], f: &mut impl FnMut(&Arc<Subscriber>)) {
    let Some((first, tail)) = segs.split_first() else {
        node.here.iter().for_each(&mut *f);
        return;
    };
    node.rest.iter().for_each(&mut *f);
    if let Some(child) = node.child(first) {
        visit(child, tail, f);
    }
    if let Some(star) = &node.star {
        visit(star, tail, f);
    }
}

fn remove_from(list: &mut Vec<Arc<Subscriber>>, sub: &Arc<Subscriber>) -> bool {
    match list.iter().position(|s| Arc::ptr_eq(s, sub)) {
        Some(i) => {
            list.swap_remove(i);
            if list.capacity() > 8 && list.len() < list.capacity() / 4 {
                list.shrink_to(list.len() * 2);
            }
            list.is_empty()
        }
        None => false,
    }
}

/// Removes `sub` from the selector's list; prunes emptied nodes. True when the list became empty.
fn remove_at(node: &mut Node, segs: &[&str], sub: &Arc<Subscriber>) -> bool {
    match segs {
        [] => remove_from(&mut node.here, sub),
        ["**"] => remove_from(&mut node.rest, sub),
        [first, tail @ ..] => {
            if *first == "*" {
                let Some(star) = node.star.as_deref_mut() else {
                    return false;
                };
                let emptied = remove_at(star, tail, sub);
                if star.is_empty() {
                    node.star = None;
                }
                emptied
            } else {
                let Some(child) = node.child_mut(first) else {
                    return false;
                };
                let emptied = remove_at(child, tail, sub);
                if child.is_empty() {
                    node.remove_child(first);
                }
                emptied
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(key: usize) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(
            key,
            None,
            Vec::new(),
            Default::default(),
            None,
            None,
        ))
    }

    fn matches(index: &SelectorIndex, topic: &str) -> Vec<usize> {
        let mut keys = Vec::new();
        index.for_each_match(&Topic::new(topic).unwrap(), &mut |s| keys.push(s.key));
        keys.sort();
        keys
    }

    #[test]
    fn trie_agrees_with_selector_matching() {
        let selectors = [
            "chat",
            "chat/*",
            "chat/**",
            "chat/a",
            "*/a",
            "*",
            "**",
            "*/*/**",
            "chat/*/b",
            "x/y/z",
            "$presence/*",
            "$presence/**",
            "$presence/a",
        ];
        let topics = [
            "chat",
            "chat/a",
            "chat/a/b",
            "chat/b",
            "x/a",
            "x/y/z",
            "q",
            "chat/a/b/c",
            "$presence/a",
            "$presence/b/c",
            "$presence",
        ];
        let mut index = SelectorIndex::default();
        let subs: Vec<_> = (0..selectors.len()).map(sub).collect();
        for (s, sel) in subs.iter().zip(selectors) {
            index.insert(&Selector::new(sel).unwrap(), s);
        }
        assert_eq!(index.distinct(), selectors.len());
        for topic in topics {
            let t = Topic::new(topic).unwrap();
            let expected: Vec<usize> = selectors
                .iter()
                .enumerate()
                .filter(|(_, s)| Selector::new(s).unwrap().matches(&t))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(matches(&index, topic), expected, "topic {topic}");
        }
        for (s, sel) in subs.iter().zip(selectors) {
            index.remove(&Selector::new(sel).unwrap(), s);
        }
        assert_eq!(index.distinct(), 0);
        assert!(index.root.is_empty(), "all nodes pruned");
    }

    /// Reproduces (issue 12, defect 3): a trie node held a hash table, so each segment of a deep
    /// selector cost ~0.5 KB and 31 selectors of 125 segments ~2 MB per idle stream.
    #[test]
    fn nodes_are_small() {
        assert!(
            std::mem::size_of::<Node>() <= 80,
            "{}",
            std::mem::size_of::<Node>()
        );
        let mut index = SelectorIndex::default();
        let deep = Selector::new(&vec!["s"; 32].join("/")).unwrap();
        index.insert(&deep, &sub(1));
        let mut node = &index.root;
        while let Some((_, child)) = node.literal.first() {
            assert_eq!(
                node.literal.capacity(),
                1,
                "a single child is allocated to fit"
            );
            node = child;
        }
    }

    /// A new stream shares the text of a selector another stream holds, wildcards included.
    #[test]
    fn equal_selectors_are_shared() {
        let mut index = SelectorIndex::default();
        for (key, text) in ["news/*", "chat/**", "a/b"].into_iter().enumerate() {
            let selector = Selector::new(text).unwrap();
            assert!(index.shared(&selector).is_none());
            let holder = Arc::new(Subscriber::new(
                key,
                None,
                vec![selector.clone()],
                Default::default(),
                None,
                None,
            ));
            index.insert(&selector, &holder);
            let asked = Selector::new(text).unwrap();
            let shared = index.shared(&asked).expect("shared");
            assert_eq!(shared, asked);
            assert!(std::ptr::eq(shared.as_str(), selector.as_str()));
        }
        assert!(index.shared(&Selector::new("news").unwrap()).is_none());
        assert!(index.shared(&Selector::new("a/*").unwrap()).is_none());
    }

    #[test]
    fn distinct_counts_selectors_not_subscribers() {
        let mut index = SelectorIndex::default();
        let (a, b) = (sub(1), sub(2));
        let sel = Selector::new("news/**").unwrap();
        index.insert(&sel, &a);
        index.insert(&sel, &b);
        assert_eq!(index.distinct(), 1);
        index.remove(&sel, &a);
        assert_eq!(index.distinct(), 1);
        assert_eq!(matches(&index, "news/x"), vec![2]);
        index.remove(&sel, &b);
        assert_eq!(index.distinct(), 0);
    }
}
