//! Fuzz target: `Last-Event-ID` and `since=` parsing never panic; an id that parses prints back
//! as the same digits, without leading zeros.
#![no_main]

use herald_core::EventId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(id) = EventId::parse(s) {
        let digits = s.trim_start_matches('0');
        assert_eq!(id.to_string(), if digits.is_empty() { "0" } else { digits });
    }
    let _ = herald_core::duration::parse_duration(s);
    let _ = herald::http::parse_since(s);
});
