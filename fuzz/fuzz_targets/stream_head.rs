//! Fuzz target: the lean stream path's request-head reading. Dripped in any pieces, the
//! incremental search for the head's end agrees with a full scan, and only a plain bodiless
//! `GET /events` (JDK's `Content-Length: 0` and `Upgrade: h2c` included) takes the lean path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, head)) = data.split_first() else {
        return;
    };
    herald::fuzzing::check_stream_head(head, usize::from(step));
});
