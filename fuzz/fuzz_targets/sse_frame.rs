//! Fuzz target: whatever the data, event type and retry, a WHATWG parser reads an encoded frame
//! back as exactly one event with exactly that data (line breaks as LF), id and type.
#![no_main]

use herald_core::EventType;
use herald_core::event::{EventId, encode_frame};
use herald_core::sse_parser::Parser;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    id: u64,
    event: Option<String>,
    retry: Option<u32>,
    data: String,
    /// Where to split the frame between two `feed` calls.
    split: usize,
}

fuzz_target!(|input: Input| {
    let event = input.event.as_deref().and_then(|e| EventType::new(e).ok());
    let frame = encode_frame(
        Some(EventId(input.id)),
        event.as_ref().map(EventType::as_str),
        input.retry,
        &input.data,
    );
    let mut parser = Parser::default();
    let at = input.split % (frame.len() + 1);
    let mut events = parser.feed(&frame[..at]);
    events.extend(parser.feed(&frame[at..]));
    assert_eq!(events.len(), 1, "exactly one event");
    let e = &events[0];
    assert_eq!(e.data, input.data.replace("\r\n", "\n").replace('\r', "\n"));
    assert_eq!(e.id.as_deref(), Some(input.id.to_string().as_str()));
    let expected = event.as_ref().map_or("message", EventType::as_str);
    assert_eq!(e.event_type, expected);
});
