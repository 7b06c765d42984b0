//! Mercure topic matchers: which update topics a subscription (or a token's grant) names. Exact
//! strings, the `*` wildcard, v0.x URI Templates (RFC 6570, levels 1–4, read as patterns the way
//! the Mercure hub reads them) and draft-08 URL Patterns (`:name` groups, `*`). A pattern is
//! compiled once into pieces and matched by a table over (piece, position), so a hostile pattern
//! costs at most pieces × length², never exponential backtracking.

use std::fmt;

/// Longest pattern accepted, in bytes.
pub const PATTERN_MAX: usize = 2048;
/// Most variables in one pattern.
const PIECES_MAX: usize = 64;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {PATTERN_MAX} bytes")]
    TooLong,
    #[error("contains a control or format character")]
    ControlChar,
    #[error("has an unclosed or nested '{{'")]
    Unclosed,
    #[error("has an empty or invalid expression '{0}'")]
    BadExpression(String),
    #[error("has more than {PIECES_MAX} variables")]
    TooManyVariables,
    #[error("uses URL Pattern syntax this hub does not support ('{0}')")]
    Unsupported(char),
}

/// Characters a variable may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// RFC 3986 unreserved and pct-encoded: a simple `{var}` expansion (`,` between list items).
    Unreserved,
    /// Unreserved, reserved and pct-encoded: `{+var}`, `{#var}`.
    Reserved,
    /// Anything but `/`, `?` and `#`: a URL Pattern `:name` group.
    Segment,
    /// Anything: URL Pattern `*`.
    Any,
}

impl Class {
    fn allows(self, c: char) -> bool {
        let unreserved = c.is_ascii_alphanumeric() || "-._~%".contains(c) || !c.is_ascii();
        match self {
            Class::Unreserved => unreserved || c == ',',
            Class::Reserved => unreserved || ":/?#[]@!$&'()*+,;=".contains(c),
            Class::Segment => !matches!(c, '/' | '?' | '#'),
            Class::Any => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    /// `prefix` (the operator's first character, if any) then at least `min` characters of
    /// `class`; with `optional`, the whole piece may also expand to nothing (undefined variable).
    Var {
        prefix: Option<char>,
        class: Class,
        /// Separator characters an exploded or listed expansion may also contain.
        extra: &'static str,
        optional: bool,
        min: usize,
    },
}

/// A compiled pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    pieces: Vec<Piece>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

/// Checks what every pattern and topic shares: non-empty, bounded, no control or format character.
pub fn check_text(s: &str) -> Result<(), PatternError> {
    if s.is_empty() {
        return Err(PatternError::Empty);
    }
    if s.len() > PATTERN_MAX {
        return Err(PatternError::TooLong);
    }
    if s.chars().any(is_control_or_format) {
        return Err(PatternError::ControlChar);
    }
    Ok(())
}

/// C0, C1, DEL and the common Unicode format characters (general category Cf).
pub fn is_control_or_format(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{AD}' | '\u{600}'..='\u{605}' | '\u{61C}' | '\u{6DD}' | '\u{70F}'
            | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

impl Pattern {
    /// An RFC 6570 URI Template read as a pattern: each expression matches what its expansion
    /// could produce (`{var}` a run of unreserved characters, `{+var}`/`{#var}` reserved ones too,
    /// `{/var}`, `{.var}`, `{;var}`, `{?var}`, `{&var}` with their prefixes; `*` explodes).
    pub fn uri_template(source: &str) -> Result<Self, PatternError> {
        check_text(source)?;
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(PatternError::Unclosed);
            }
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(PatternError::Unclosed)?;
            let expr = &after[..close];
            if expr.contains('{') {
                return Err(PatternError::Unclosed);
            }
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(template_expression(expr)?);
            rest = &after[close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Self::new(source, pieces)
    }

    /// A URL Pattern (the WHATWG syntax draft-08 uses) over the whole topic string: `:name`
    /// matches one or more characters up to the next `/`, `?` or `#`; `:name?` may be absent
    /// (with the `/` before it); `*` matches anything. Regular-expression groups `( )` and
    /// `{ }` groups are refused as unsupported rather than read wrongly.
    pub fn url_pattern(source: &str) -> Result<Self, PatternError> {
        check_text(source)?;
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, escaped)) => literal.push(escaped),
                    None => return Err(PatternError::BadExpression("\\".into())),
                },
                ':' if chars
                    .peek()
                    .is_some_and(|(_, n)| n.is_alphabetic() || *n == '_' || *n == '$') =>
                {
                    while chars
                        .peek()
                        .is_some_and(|(_, n)| n.is_alphanumeric() || *n == '_' || *n == '$')
                    {
                        chars.next();
                    }
                    let optional = chars.peek().is_some_and(|(_, n)| *n == '?');
                    if optional {
                        chars.next();
                    }
                    if matches!(chars.peek(), Some((_, '+' | '*'))) {
                        return Err(PatternError::Unsupported(chars.peek().map_or('+', |p| p.1)));
                    }
                    // `/:name?` drops its `/` when absent: the slash belongs to the piece.
                    let prefix = if optional && literal.ends_with('/') {
                        literal.pop();
                        Some('/')
                    } else {
                        None
                    };
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Var {
                        prefix,
                        class: Class::Segment,
                        extra: "",
                        optional,
                        min: 1,
                    });
                }
                '*' => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Var {
                        prefix: None,
                        class: Class::Any,
                        extra: "",
                        optional: false,
                        min: 0,
                    });
                }
                '(' | ')' | '{' | '}' => return Err(PatternError::Unsupported(c)),
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Self::new(source, pieces)
    }

    fn new(source: &str, pieces: Vec<Piece>) -> Result<Self, PatternError> {
        if pieces.len() > PIECES_MAX * 2 {
            return Err(PatternError::TooManyVariables);
        }
        Ok(Pattern {
            source: source.to_string(),
            pieces,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The literal text every topic this pattern matches starts with ("" when it starts with a
    /// variable).
    pub fn literal_prefix(&self) -> &str {
        match self.pieces.first() {
            Some(Piece::Literal(l)) => l,
            _ => "",
        }
    }

    /// Whether the whole of `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let chars: Vec<char> = topic.chars().collect();
        let n = chars.len();
        // reach[p]: the pieces so far can end exactly at position p.
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        for piece in &self.pieces {
            let mut next = vec![false; n + 1];
            for start in (0..=n).filter(|&p| reach[p]) {
                match piece {
                    Piece::Literal(lit) => {
                        let mut p = start;
                        let mut ok = true;
                        for lc in lit.chars() {
                            if chars.get(p) != Some(&lc) {
                                ok = false;
                                break;
                            }
                            p += 1;
                        }
                        if ok {
                            next[p] = true;
                        }
                    }
                    Piece::Var {
                        prefix,
                        class,
                        extra,
                        optional,
                        min,
                    } => {
                        if *optional {
                            next[start] = true;
                        }
                        let mut p = start;
                        if let Some(pc) = prefix {
                            if chars.get(p) != Some(pc) {
                                continue;
                            }
                            p += 1;
                        }
                        let body = p;
                        if p - body >= *min {
                            next[p] = true;
                        }
                        while p < n && (class.allows(chars[p]) || extra.contains(chars[p])) {
                            p += 1;
                            if p - body >= *min {
                                next[p] = true;
                            }
                        }
                    }
                }
            }
            reach = next;
        }
        reach[n]
    }
}

/// One `{...}` expression of a URI Template.
fn template_expression(expr: &str) -> Result<Piece, PatternError> {
    let bad = || PatternError::BadExpression(expr.to_string());
    let (op, vars) = match expr.chars().next() {
        Some(c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&')) => (Some(c), &expr[1..]),
        Some(c @ ('=' | ',' | '!' | '@' | '|')) => {
            return Err(PatternError::BadExpression(c.into()));
        }
        Some(_) => (None, expr),
        None => return Err(bad()),
    };
    let names: Vec<&str> = vars.split(',').collect();
    let mut explode = names.len() > 1;
    for name in &names {
        let (name, modifier) = match name.find([':', '*']) {
            Some(i) => (&name[..i], &name[i..]),
            None => (*name, ""),
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '%');
        let valid_modifier = modifier.is_empty()
            || modifier == "*"
            || (modifier.len() > 1
                && modifier.len() <= 5
                && modifier.starts_with(':')
                && modifier[1..].chars().all(|c| c.is_ascii_digit()));
        if !valid_name || !valid_modifier {
            return Err(bad());
        }
        explode |= modifier == "*";
    }
    let class = match op {
        Some('+' | '#') => Class::Reserved,
        _ => Class::Unreserved,
    };
    // What separates items of a list or an exploded value, per operator.
    let extra = match op {
        _ if !explode => match op {
            Some(';' | '?' | '&') => "=",
            _ => "",
        },
        Some('.') => ".",
        Some('/') => "/",
        Some(';') => ";=",
        Some('?' | '&') => "&=",
        _ => ",",
    };
    let prefix = match op {
        Some('+') | None => None,
        other => other,
    };
    Ok(Piece::Var {
        prefix,
        class,
        extra,
        // An operator's expression may expand to nothing (an undefined variable drops its
        // prefix too); a bare `{var}` stands for a value, so it needs one character.
        optional: prefix.is_some(),
        min: usize::from(prefix.is_none()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(p: &str) -> Pattern {
        Pattern::uri_template(p).unwrap()
    }
    fn u(p: &str) -> Pattern {
        Pattern::url_pattern(p).unwrap()
    }

    #[test]
    fn uri_templates_match_what_they_could_expand_to() {
        let books = t("https://example.com/books/{id}");
        assert!(books.matches("https://example.com/books/1"));
        assert!(books.matches("https://example.com/books/abc-%20x"));
        assert!(!books.matches("https://example.com/books/1/reviews"));
        assert!(!books.matches("https://example.com/books/"));
        assert!(!books.matches("https://example.com/users/1"));
        let two = t("https://example.com/{a}/x/{b}");
        assert!(two.matches("https://example.com/1/x/2"));
        assert!(!two.matches("https://example.com/1/y/2"));
        let reserved = t("https://example.com/{+path}");
        assert!(reserved.matches("https://example.com/a/b/c?d=1"));
        let segments = t("https://example.com{/seg*}");
        assert!(segments.matches("https://example.com/a/b"));
        assert!(segments.matches("https://example.com"));
        let query = t("https://example.com/s{?q,lang}");
        assert!(query.matches("https://example.com/s?q=x&lang=en"));
        assert!(query.matches("https://example.com/s"));
        let fragment = t("https://example.com/p{#frag}");
        assert!(fragment.matches("https://example.com/p#a/b"));
        let label = t("https://{sub}.example.com/{.ext}");
        assert!(label.matches("https://api.example.com/.json"));
        assert!(t("no-variables").matches("no-variables"));
        assert!(!t("no-variables").matches("no-variable"));
    }

    #[test]
    fn bad_uri_templates_are_refused() {
        for bad in [
            "{",
            "a{b",
            "a}b",
            "{}",
            "{a{b}}",
            "{=x}",
            "{a b}",
            "{a:99999}",
        ] {
            assert!(Pattern::uri_template(bad).is_err(), "{bad}");
        }
        assert_eq!(Pattern::uri_template(""), Err(PatternError::Empty));
        assert_eq!(
            Pattern::uri_template("a\u{7}b"),
            Err(PatternError::ControlChar)
        );
        assert_eq!(
            Pattern::uri_template("a\u{200B}b"),
            Err(PatternError::ControlChar)
        );
    }

    #[test]
    fn url_patterns_match_named_groups_and_wildcards() {
        let p = u("https://example.net/foo/:random");
        assert!(p.matches("https://example.net/foo/abc123"));
        assert!(!p.matches("https://example.net/foo/"));
        assert!(!p.matches("https://example.net/foo/a/b"));
        assert!(!p.matches("https://example.net/bar/abc"));
        let two = u("https://example.com/users/:user/books/:id");
        assert!(two.matches("https://example.com/users/42/books/7"));
        let star = u("https://example.com/users/42/*");
        assert!(star.matches("https://example.com/users/42/books/7"));
        assert!(star.matches("https://example.com/users/42/"));
        assert!(!star.matches("https://example.com/users/43/x"));
        let optional = u("https://example.com/books/:id?");
        assert!(optional.matches("https://example.com/books"));
        assert!(optional.matches("https://example.com/books/1"));
        assert!(u("https\\://x").matches("https://x"));
        assert_eq!(
            Pattern::url_pattern("https://x/(\\d+)"),
            Err(PatternError::Unsupported('('))
        );
    }

    #[test]
    fn hostile_patterns_stay_polynomial() {
        let pattern = "{a}".repeat(60) + "!";
        let p = Pattern::uri_template(&pattern).unwrap();
        assert!(!p.matches(&"a".repeat(2000)));
        let p = Pattern::url_pattern(&"*a".repeat(60)).unwrap();
        assert!(!p.matches(&"a".repeat(59)));
    }
}
