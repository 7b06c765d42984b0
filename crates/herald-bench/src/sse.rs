//! Counts SSE events in a byte stream without allocating: an event is a block of lines ending in a
//! blank line that holds at least one `data` field. Line endings are LF (what the servers send).

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
}
