//! Fuzz target: the publish body parsers (JSON and form) never panic, and every message they
//! accept has a target and a valid event type.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    if let Ok((messages, _)) = herald::http::parse_publish_body(body, mode & 1 == 0) {
        for m in messages {
            assert!(!m.targets.is_empty());
        }
    }
});
