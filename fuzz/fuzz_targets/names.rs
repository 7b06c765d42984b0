//! Fuzz target: topic, selector, user id and event type parsing never panic, and what they accept
//! keeps their promises (a topic matches itself, a selector covers itself, no line breaks).
#![no_main]

use herald_core::{EventType, Selector, Topic, UserId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Topic::new(s) {
        assert!(Selector::from(t.clone()).matches(&t));
    }
    if let Ok(sel) = Selector::new(s) {
        assert!(sel.covers(&sel));
        if let Ok(t) = Topic::new(s) {
            assert!(sel.matches(&t));
        }
    }
    if UserId::new(s).is_ok() {
        assert!(!s.contains('/') && !s.chars().any(char::is_control));
    }
    if EventType::new(s).is_ok() {
        assert!(!s.contains(['\r', '\n', '\0']));
    }
});
