//! Counts SSE events in a byte stream without allocating: an event is a block of lines ending in a
//! blank line that holds at least one `data` field. Line endings are LF (what the servers send).
//! `Parser` also keeps the first bytes of each event's first data value, for timestamps.

#[derive(Debug, Default)]
pub struct Counter {
    pub events: u64,
    line_len: usize,
    line_is_data: bool,
    block_has_data: bool,
}

impl Counter {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if self.line_len == 0 {
                    if self.block_has_data {
                        self.events += 1;
                    }
                    self.block_has_data = false;
                } else if self.line_is_data {
                    self.block_has_data = true;
                }
                self.line_len = 0;
                self.line_is_data = false;
                continue;
            }
            if self.line_len < 5 {
                let want = b"data:"[self.line_len];
                self.line_is_data = (self.line_len == 0 || self.line_is_data) && b == want;
            }
            self.line_len += 1;
        }
    }
}

/// Bytes of the first data value kept per event.
pub const PREFIX: usize = 40;

/// Like `Counter`, and calls back once per event with the start of its first `data` value
/// (after `data:` and one optional space), copied into a fixed array: no allocation.
#[derive(Debug)]
pub struct Parser {
    line_len: usize,
    line_is_data: bool,
    block_has_data: bool,
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Whether the data line being read is the block's first (the one whose prefix is kept).
    capturing: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            line_len: 0,
            line_is_data: false,
            block_has_data: false,
            prefix: [0; PREFIX],
            prefix_len: 0,
            capturing: false,
        }
    }
}

impl Parser {
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&[u8])) {
        for &b in bytes {
            if b == b'\n' {
                if self.line_len == 0 {
                    if self.block_has_data {
                        on_event(&self.prefix[..self.prefix_len]);
                    }
                    self.block_has_data = false;
                    self.prefix_len = 0;
                } else if self.line_is_data {
                    self.block_has_data = true;
                }
                self.line_len = 0;
                self.line_is_data = false;
                self.capturing = false;
                continue;
            }
            if self.line_len < 5 {
                let want = b"data:"[self.line_len];
                self.line_is_data = (self.line_len == 0 || self.line_is_data) && b == want;
                if self.line_len == 4 && self.line_is_data && !self.block_has_data {
                    self.capturing = true;
                }
            } else if self.capturing
                && !(self.line_len == 5 && b == b' ')
                && self.prefix_len < PREFIX
            {
                self.prefix[self.prefix_len] = b;
                self.prefix_len += 1;
            }
            self.line_len += 1;
        }
    }
}

/// Reads the number after `tag` in `prefix` (e.g. `t` in `t1712345 s7 xxx`).
pub fn field(prefix: &[u8], tag: u8) -> Option<u64> {
    let mut i = 0;
    while i < prefix.len() {
        if prefix[i] == tag && (i == 0 || prefix[i - 1] == b' ') {
            let mut v = 0u64;
            let mut any = false;
            for &d in &prefix[i + 1..] {
                if !d.is_ascii_digit() {
                    break;
                }
                v = v * 10 + u64::from(d - b'0');
                any = true;
            }
            return any.then_some(v);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_not_comments() {
        let mut c = Counter::default();
        let input = b"retry: 3000\n: herald\n\nid: 1\ndata: a\n\n:\n\nid: 2\nevent: x\ndata: b\ndata: c\n\n";
        for chunk in input.chunks(3) {
            c.feed(chunk);
        }
        assert_eq!(c.events, 2);
    }

    #[test]
    fn parser_keeps_first_data_prefix() {
        let mut p = Parser::default();
        let mut seen = Vec::new();
        let input =
            b"retry: 3000\n: hi\n\nid: 1\ndata: t123 s4 xxxx\ndata: other\n\n:\n\ndata:t9 s10\n\n";
        for chunk in input.chunks(2) {
            p.feed(chunk, |pre| seen.push(pre.to_vec()));
        }
        assert_eq!(seen, vec![b"t123 s4 xxxx".to_vec(), b"t9 s10".to_vec()]);
        assert_eq!(field(&seen[0], b't'), Some(123));
        assert_eq!(field(&seen[0], b's'), Some(4));
        assert_eq!(field(&seen[1], b's'), Some(10));
        assert_eq!(field(b"xxxx", b's'), None);
    }
}
