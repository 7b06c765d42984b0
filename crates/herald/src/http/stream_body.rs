//! The decoder of a streaming publish body: `text/event-stream` events or `application/x-ndjson`
//! lines, fed in chunks split anywhere. It hands out each part as soon as its last line has
//! arrived, counts lines so an error can name its line, and bounds what it holds: no line and no
//! event may exceed `--max-body`. It validates event types and `retry` as `POST /publish` does;
//! NDJSON lines are parsed by the caller (they are `POST /publish` messages).

use herald_core::EventType;

use super::ApiError;
use super::publish::{event_type, retry};
use crate::error_code::ErrorCode;

/// What the body holds, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `text/event-stream`
    Sse,
    /// `application/x-ndjson`
    Ndjson,
}

impl Kind {
    /// The streaming kind of a content type's essence, if it is one.
    pub(crate) fn of(essence: &str) -> Option<Kind> {
        match essence {
            "text/event-stream" => Some(Kind::Sse),
            "application/x-ndjson" | "application/jsonl" => Some(Kind::Ndjson),
            _ => None,
        }
    }
}

/// One complete part of the body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// An SSE event: its `event:`, its `data:` lines joined by LF, its `retry:`.
    Event {
        event_type: Option<EventType>,
        data: String,
        retry_ms: Option<u32>,
    },
    /// One NDJSON line (not empty), with its line number.
    Json { line: u64, text: String },
}

/// A refused line: the error names it in its message.
#[derive(Debug)]
pub(crate) struct LineError {
    pub line: u64,
    pub error: ApiError,
}

#[derive(Debug)]
pub(crate) struct Decoder {
    kind: Kind,
    max: usize,
    /// The unfinished last line.
    partial: Vec<u8>,
    /// The previous chunk ended in CR: a leading LF belongs to it.
    skip_lf: bool,
    /// Lines completed so far.
    lines: u64,
    /// The SSE event being read.
    data: Option<String>,
    event_type: Option<EventType>,
    retry_ms: Option<u32>,
    /// Lines of the event being read (0: none), and the bytes of its data.
    event_lines: u64,
    event_bytes: usize,
}

impl Decoder {
    pub(crate) fn new(kind: Kind, max: usize) -> Self {
        Decoder {
            kind,
            max,
            partial: Vec::new(),
            skip_lf: false,
            lines: 0,
            data: None,
            event_type: None,
            retry_ms: None,
            event_lines: 0,
            event_bytes: 0,
        }
    }

    /// Decodes `chunk`, pushing every part it completes to `out`. On an error, `out` holds the
    /// parts before the bad line and the decoder must not be fed again.
    pub(crate) fn feed(&mut self, chunk: &[u8], out: &mut Vec<Part>) -> Result<(), LineError> {
        let mut bytes = chunk;
        if self.skip_lf && !bytes.is_empty() {
            self.skip_lf = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line = if self.partial.is_empty() {
                self.line(&bytes[..end], out)
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(&bytes[..end]);
                self.line(&whole, out)
            };
            line?;
            if bytes[end] == b'\r' {
                match bytes.get(end + 1) {
                    Some(b'\n') => bytes = &bytes[end + 2..],
                    Some(_) => bytes = &bytes[end + 1..],
                    None => {
                        self.skip_lf = true;
                        bytes = &[];
                    }
                }
            } else {
                bytes = &bytes[end + 1..];
            }
        }
        if self.partial.len() + bytes.len() > self.max {
            return Err(self.too_large(self.lines + 1, "line"));
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// The body has ended: an NDJSON last line without its newline counts; an SSE event without
    /// its blank line is refused (it may not be whole).
    pub(crate) fn finish(&mut self, out: &mut Vec<Part>) -> Result<(), LineError> {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(&last, out)?;
        }
        if self.kind == Kind::Sse && self.event_lines > 0 {
            let line = self.lines;
            return Err(LineError {
                line,
                error: ApiError::new(
                    ErrorCode::InvalidStream,
                    format!(
                        "line {line}: the body ended inside an event (an event ends with a blank line); it was not published"
                    ),
                ),
            });
        }
        Ok(())
    }

    fn too_large(&self, line: u64, what: &str) -> LineError {
        LineError {
            line,
            error: ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "line {line}: the {what} is larger than {} bytes (--max-body applies to each event)",
                    self.max
                ),
            ),
        }
    }

    fn line(&mut self, raw: &[u8], out: &mut Vec<Part>) -> Result<(), LineError> {
        self.lines += 1;
        let n = self.lines;
        if raw.len() > self.max {
            return Err(self.too_large(n, "line"));
        }
        let invalid = |code: ErrorCode, why: String| LineError {
            line: n,
            error: ApiError::new(code, format!("line {n}: {why}")),
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            return Err(invalid(
                if self.kind == Kind::Sse {
                    ErrorCode::InvalidStream
                } else {
                    ErrorCode::InvalidJson
                },
                "is not valid UTF-8".into(),
            ));
        };
        if self.kind == Kind::Ndjson {
            if !text.trim().is_empty() {
                out.push(Part::Json {
                    line: n,
                    text: text.to_string(),
                });
            }
            return Ok(());
        }
        if text.is_empty() {
            self.event_lines = 0;
            self.event_bytes = 0;
            let event_type = self.event_type.take();
            let retry_ms = self.retry_ms.take();
            // As in a browser: an event without data is not dispatched.
            if let Some(data) = self.data.take() {
                out.push(Part::Event {
                    event_type,
                    data,
                    retry_ms,
                });
            }
            return Ok(());
        }
        if text.starts_with(':') {
            return Ok(()); // a comment
        }
        self.event_lines += 1;
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text, ""),
        };
        match field {
            "data" => {
                self.event_bytes += value.len() + 1;
                if self.event_bytes > self.max {
                    return Err(self.too_large(n, "event"));
                }
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
            "event" => {
                self.event_type = Some(event_type(value).map_err(|e| invalid(e.code, e.message))?);
            }
            "retry" => {
                self.retry_ms = Some(retry(value).map_err(|e| invalid(e.code, e.message))?);
            }
            // herald assigns its own ids; a producer's are dropped.
            "id" => {}
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(invalid(
                    ErrorCode::InvalidStream,
                    format!(
                        "unknown field '{shown}' (an SSE line is data:, event:, id:, retry: or a :comment)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(input: &[u8], max: usize) -> (Vec<Part>, Option<LineError>) {
        let mut d = Decoder::new(Kind::Sse, max);
        let mut out = Vec::new();
        let err = d
            .feed(input, &mut out)
            .and_then(|()| d.finish(&mut out))
            .err();
        (out, err)
    }

    fn data(parts: &[Part]) -> Vec<&str> {
        parts
            .iter()
            .map(|p| match p {
                Part::Event { data, .. } => data.as_str(),
                Part::Json { text, .. } => text.as_str(),
            })
            .collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole_and_in_order() {
        let input = b": hi\r\nevent: token\r\ndata: a\r\ndata: b\r\nid: 9\r\n\r\ndata: c\r\r";
        for cut in 0..input.len() {
            let mut d = Decoder::new(Kind::Sse, 1000);
            let mut out = Vec::new();
            d.feed(&input[..cut], &mut out).unwrap();
            d.feed(&input[cut..], &mut out).unwrap();
            d.finish(&mut out).unwrap();
            assert_eq!(data(&out), ["a\nb", "c"], "cut at {cut}");
            let Part::Event { event_type, .. } = &out[0] else {
                panic!()
            };
            assert_eq!(event_type.as_ref().map(|t| t.as_str()), Some("token"));
        }
    }

    #[test]
    fn an_event_is_handed_out_when_its_blank_line_arrives() {
        let mut d = Decoder::new(Kind::Sse, 1000);
        let mut out = Vec::new();
        d.feed(b"data: one\n", &mut out).unwrap();
        assert!(out.is_empty());
        d.feed(b"\n", &mut out).unwrap();
        assert_eq!(data(&out), ["one"]);
    }

    #[test]
    fn errors_name_their_line_and_keep_the_parts_before() {
        let (out, err) = sse(b"data: a\n\nfoo: bar\n\n", 1000);
        assert_eq!(data(&out), ["a"]);
        let err = err.unwrap();
        assert_eq!((err.line, err.error.code), (3, ErrorCode::InvalidStream));
        assert!(
            err.error.message.starts_with("line 3:"),
            "{}",
            err.error.message
        );

        let (out, err) = sse(b"data: a\n\nevent: herald.x\ndata: b\n\n", 1000);
        assert_eq!(out.len(), 1);
        assert_eq!(err.unwrap().error.code, ErrorCode::InvalidEvent);

        let (_, err) = sse(b"data: \xff\n\n", 1000);
        assert_eq!(err.unwrap().error.code, ErrorCode::InvalidStream);

        let (out, err) = sse(b"data: a\n\ndata: half", 1000);
        assert_eq!(out.len(), 1);
        let err = err.unwrap();
        assert_eq!((err.line, err.error.code), (3, ErrorCode::InvalidStream));
    }

    #[test]
    fn max_body_bounds_each_event_and_each_line() {
        let (out, err) = sse(b"data: 12345\n\ndata: 123456\ndata: 123456\n\n", 12);
        assert_eq!(data(&out), ["12345"]);
        let err = err.unwrap();
        assert_eq!((err.line, err.error.code), (4, ErrorCode::PayloadTooLarge));
        // A line that never ends is refused before it grows past the bound.
        let mut d = Decoder::new(Kind::Sse, 16);
        let mut out = Vec::new();
        d.feed(b"data: 0123456789", &mut out).unwrap();
        assert!(d.feed(b"0123456789", &mut out).is_err());
    }

    #[test]
    fn ndjson_lines_are_handed_out_with_their_numbers() {
        let mut d = Decoder::new(Kind::Ndjson, 1000);
        let mut out = Vec::new();
        d.feed(b"{\"data\":1}\r\n\n{\"da", &mut out).unwrap();
        d.feed(b"ta\":2}", &mut out).unwrap();
        d.finish(&mut out).unwrap();
        assert_eq!(
            out,
            [
                Part::Json {
                    line: 1,
                    text: "{\"data\":1}".into()
                },
                Part::Json {
                    line: 3,
                    text: "{\"data\":2}".into()
                }
            ]
        );
    }
}
