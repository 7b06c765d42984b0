//! An incremental `text/event-stream` parser following the WHATWG HTML spec (§9.2.6).
//! Used by the `herald sub` client and by tests; it accepts input in chunks split anywhere.

/// One dispatched event as a browser's `EventSource` would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id in force when this event was dispatched (`None` if never set).
    pub id: Option<String>,
    /// `message` unless an `event:` field set another type.
    pub event_type: String,
    pub data: String,
}

/// Feeds bytes in, gets dispatched events out. Also exposes `retry` and comment lines.
#[derive(Debug, Default)]
pub struct Parser {
    pending: Vec<u8>,
    /// The previous chunk ended in CR: a leading LF in the next chunk belongs to it.
    skip_lf: bool,
    data: String,
    event_type: String,
    last_id: Option<String>,
    /// The most recent valid `retry:` value in milliseconds.
    pub retry_ms: Option<u64>,
    /// How many comment lines (starting with `:`) were seen.
    pub comments: u64,
}

impl Parser {
    /// Parses as much of `chunk` as forms whole lines and returns the events it completes.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut bytes = chunk;
        if self.skip_lf {
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
            if !chunk.is_empty() {
                self.skip_lf = false;
            }
        }
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\n' || b == b'\r' {
                let line: Vec<u8> = if self.pending.is_empty() {
                    bytes[start..i].to_vec()
                } else {
                    let mut l = std::mem::take(&mut self.pending);
                    l.extend_from_slice(&bytes[start..i]);
                    l
                };
                self.line(&line, &mut out);
                if b == b'\r' {
                    if i + 1 < bytes.len() {
                        if bytes[i + 1] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.skip_lf = true;
                    }
                }
                start = i + 1;
            }
            i += 1;
        }
        self.pending.extend_from_slice(&bytes[start..]);
        out
    }

    fn line(&mut self, raw: &[u8], out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(raw);
        if line.is_empty() {
            if !self.data.is_empty() {
                let mut data = std::mem::take(&mut self.data);
                data.pop();
                let event_type = std::mem::take(&mut self.event_type);
                out.push(SseEvent {
                    id: self.last_id.clone(),
                    event_type: if event_type.is_empty() {
                        "message".to_string()
                    } else {
                        event_type
                    },
                    data,
                });
            } else {
                self.event_type.clear();
            }
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.find(':') {
            Some(pos) => {
                let v = &line[pos + 1..];
                (&line[..pos], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        match field {
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "event" => self.event_type = value.to_string(),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_comments_and_retry() {
        let mut p = Parser::default();
        let ev = p.feed(b"retry: 3000\n:hello\n\nid: 1\nevent: x\ndata: a\ndata:b\n\n");
        assert_eq!(p.retry_ms, Some(3000));
        assert_eq!(p.comments, 1);
        assert_eq!(
            ev,
            vec![SseEvent {
                id: Some("1".into()),
                event_type: "x".into(),
                data: "a\nb".into()
            }]
        );
    }

    #[test]
    fn split_anywhere_including_between_cr_and_lf() {
        let input = b"id: 5\r\ndata: one\r\ndata: two\r\n\r\ndata: three\r\r";
        for cut in 0..input.len() {
            let mut p = Parser::default();
            let mut ev = p.feed(&input[..cut]);
            ev.extend(p.feed(&input[cut..]));
            assert_eq!(ev.len(), 2, "cut at {cut}");
            assert_eq!(ev[0].data, "one\ntwo");
            assert_eq!(ev[1].data, "three");
            assert_eq!(ev[1].id.as_deref(), Some("5"));
        }
    }

    proptest::proptest! {
        /// Any bytes, fed in pieces of any size, parse as they do in one piece (also the `sse_stream`
        /// fuzz target).
        #[test]
        fn pieces_parse_as_the_whole(
            stream in proptest::collection::vec(
                proptest::sample::select(b"data:id:event:retry: x1\r\n\xc3\xa9".to_vec()),
                0..200,
            ),
            step in 1usize..16,
        ) {
            let mut whole = Parser::default();
            let at_once = whole.feed(&stream);
            let mut pieces = Parser::default();
            let mut dripped = Vec::new();
            for piece in stream.chunks(step) {
                dripped.extend(pieces.feed(piece));
            }
            proptest::prop_assert_eq!(at_once, dripped);
            proptest::prop_assert_eq!(
                (whole.retry_ms, whole.comments),
                (pieces.retry_ms, pieces.comments)
            );
        }
    }

    #[test]
    fn empty_data_dispatches_but_no_data_does_not() {
        let mut p = Parser::default();
        assert_eq!(p.feed(b"event: x\n\n").len(), 0);
        let ev = p.feed(b"data\n\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "");
        assert_eq!(ev[0].event_type, "message");
    }
}
