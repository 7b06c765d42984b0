//! Fuzz target: the incremental SSE parser (`herald sub`'s) reads any bytes fed in pieces of any
//! size exactly as it reads them in one piece, and `herald sub` prints each event it dispatches as
//! one line whose only control characters are its two tab separators.
#![no_main]

use herald::client::format_event;
use herald_core::sse_parser::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let mut whole = Parser::default();
    let at_once = whole.feed(stream);
    let mut pieces = Parser::default();
    let mut dripped = Vec::new();
    for piece in stream.chunks(usize::from(step).max(1)) {
        dripped.extend(pieces.feed(piece));
    }
    assert_eq!(at_once, dripped);
    assert_eq!(
        (whole.retry_ms, whole.comments),
        (pieces.retry_ms, pieces.comments)
    );
    for event in &at_once {
        let line = format_event(event);
        assert_eq!(line.matches('\t').count(), 2, "{line:?}");
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\t'),
            "{line:?}"
        );
    }
});
