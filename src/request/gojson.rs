//! A JSON reader that sees a request body exactly as lk-jwt-service's Go decoder does.
//!
//! The guard must read the Matrix room from a token request the same way lk-jwt-service
//! (`encoding/json` with a `json.Decoder`) reads it, otherwise a crafted body could name one
//! room to the guard and another to the token issuer. `serde_json` disagrees with Go on
//! several points that matter here, so this small reader implements Go's rules instead:
//!
//! - only the first JSON value is read; whatever follows it is ignored (`Decoder.Decode`),
//! - invalid UTF-8 inside strings and lone `\uD800`-style surrogates become U+FFFD instead of
//!   failing,
//! - duplicate keys are all kept in document order (the caller applies "last one wins"),
//! - keys are matched to field names case-insensitively with Go's folding (see [`key_matches`]).
//!
//! Values are kept as a small tree; bodies are tiny (a few hundred bytes) and nesting is capped.
//!
//! serde_json reads everything else (see [`crate::request::json`]). It cannot read this part: it
//! rejects invalid UTF-8 and lone surrogates, errors on duplicate struct fields, reads a whole
//! document rather than the first value, and matches keys exactly. [`write_string`] is kept
//! for the same reason on the writing side: the LiveKit alias is a hash of bytes written with
//! Go's `json.Marshal` escaping (`<`, `>`, `&`, U+2028, U+2029), which serde_json does not do.

/// Deepest nesting accepted. lk-jwt-service's request structs are at most two levels deep,
/// so anything deeper fails Go's type checks too (and the token request is refused).
const MAX_DEPTH: usize = 32;

/// A JSON value as Go's decoder would see it; objects keep every key in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number's literal text, exactly as written (Go's grammar); callers convert it the
    /// way the Go type they stand for would (see `token_request` for `int` fields).
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

/// Why a body could not be read as JSON at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub offset: usize,
    pub what: &'static str,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.offset)
    }
}

/// Reads the first JSON value of `input`, ignoring anything after it, like `json.Decoder.Decode`.
pub fn parse_first_value(input: &[u8]) -> Result<Value, SyntaxError> {
    let mut reader = Reader { input, pos: 0 };
    reader.skip_whitespace();
    reader.value(0)
}

/// Appends `s` as a JSON string, escaped as Go's `json.Marshal` (Go 1.22+) does: quotes,
/// backslashes and control characters (`\n`, `\r`, `\t`, `\b`, `\f` short, the others as
/// `\u00XX`), and also `<`, `>`, `&`, U+2028 and U+2029; other non-ASCII stays UTF-8.
pub fn write_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    // Runs of characters written as they are go in whole.
    let mut plain_from = 0;
    for (at, c) in s.char_indices() {
        // The short escape, or `None` for `\uXXXX`.
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            // Go 1.22 and later write these two short forms too.
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' | '\u{0}'..='\u{1f}' => None,
            _ => continue,
        };
        out.push_str(&s[plain_from..at]);
        plain_from = at + c.len_utf8();
        match short {
            Some(escape) => out.push_str(escape),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u");
                let code = c as u32;
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((code >> shift) & 0xf) as usize] as char);
                }
            }
        }
    }
    out.push_str(&s[plain_from..]);
    out.push('"');
}

/// Whether a JSON object key selects the Go struct field whose JSON name is `field`
/// (an ASCII name), as `encoding/json` decides it. Go prefers an exact match, then falls
/// back to a case-insensitive match under Unicode simple case folding (`bytes.EqualFold`:
/// each rune is replaced by the smallest rune of its `unicode.SimpleFold` orbit). Besides
/// ASCII letters, exactly two runes fold onto ASCII letters that way: U+017F 'ſ' (onto 'S')
/// and U+212A 'K' Kelvin sign (onto 'K'). U+0130 'İ' and U+0131 'ı' do not fold onto 'I'.
///
/// This is the rule of Go up to 1.20 and again of current releases (checked with 1.26).
/// Some releases in between folded each rune with `unicode.ToUpper(unicode.ToLower(r))`,
/// which also turns 'İ' and 'ı' into 'I'; [`key_may_match`] covers both rules.
pub fn key_matches(key: &str, field: &str) -> bool {
    key == field || folded_equal(key, field, fold_rune)
}

/// Whether a key selects the field `field` under the folding of ANY Go release: the rule of
/// [`key_matches`] or the `ToUpper(ToLower(r))` rule, which also folds U+0130 'İ' and U+0131
/// 'ı' onto 'I'. A lenient reader that ignores unknown keys uses this, so that it never misses
/// a key the service's decoder reads, whichever Go built the service.
pub fn key_may_match(key: &str, field: &str) -> bool {
    key_matches(key, field) || folded_equal(key, field, fold_rune_upper_lower)
}

fn folded_equal(key: &str, field: &str, fold: fn(char) -> char) -> bool {
    let mut folded = key.chars().map(fold);
    let mut expected = field.chars().map(|c| c.to_ascii_uppercase());
    loop {
        match (folded.next(), expected.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Simple case folding, as far as it reaches ASCII.
fn fold_rune(c: char) -> char {
    match c {
        'a'..='z' => c.to_ascii_uppercase(),
        '\u{017F}' => 'S',
        '\u{212A}' => 'K',
        _ => c,
    }
}

/// `unicode.ToUpper(unicode.ToLower(r))`, as far as it reaches ASCII.
fn fold_rune_upper_lower(c: char) -> char {
    match c {
        '\u{0130}' | '\u{0131}' => 'I',
        _ => fold_rune(c),
    }
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError {
            offset: self.pos,
            what,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect_literal(&mut self, literal: &[u8], value: Value) -> Result<Value, SyntaxError> {
        if self.input[self.pos..].starts_with(literal) {
            self.pos += literal.len();
            Ok(value)
        } else {
            Err(self.error("invalid literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nesting too deep"));
        }
        match self.peek() {
            None => Err(self.error("unexpected end of input")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.expect_literal(b"true", Value::Bool(true)),
            Some(b'f') => self.expect_literal(b"false", Value::Bool(false)),
            Some(b'n') => self.expect_literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("invalid character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.pos += 1; // '{'
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected object key"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':' after object key"));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value(depth + 1)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("expected ',' or '}' in object")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_whitespace();
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']' in array")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Go's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("invalid number"));
            }
        }
        let text = String::from_utf8_lossy(&self.input[start..self.pos]).into_owned();
        Ok(Value::Number(text))
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let digits = self
            .input
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.error("truncated \\u escape"))?;
        let mut code = 0u32;
        for &d in digits {
            let v = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.error("invalid \\u escape"))?;
            code = code * 16 + v;
        }
        self.pos += 4;
        Ok(code)
    }

    /// A string, decoded the way Go's `unquote` does it.
    fn string(&mut self) -> Result<String, SyntaxError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            let Some(byte) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            match byte {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.pos += 1;
                    self.escape(&mut out)?;
                }
                0x00..=0x1f => return Err(self.error("control character in string")),
                0x20..=0x7f => {
                    // A run of plain ASCII is taken whole.
                    let run = self.input[self.pos..]
                        .iter()
                        .take_while(|b| matches!(b, 0x20..=0x7f) && !matches!(b, b'"' | b'\\'))
                        .count();
                    let end = self.pos + run;
                    out.push_str(
                        std::str::from_utf8(&self.input[self.pos..end]).unwrap_or_default(),
                    );
                    self.pos = end;
                }
                _ => self.utf8_rune(&mut out),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), SyntaxError> {
        let Some(kind) = self.peek() else {
            return Err(self.error("unterminated escape"));
        };
        self.pos += 1;
        let simple = match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                out.push(self.surrogate_aware(first));
                return Ok(());
            }
            _ => return Err(self.error("invalid escape")),
        };
        out.push(simple);
        Ok(())
    }

    /// Go joins a high surrogate with an immediately following `\uDC00..\uDFFF` escape;
    /// any other surrogate becomes U+FFFD, and the following escape is read on its own.
    fn surrogate_aware(&mut self, first: u32) -> char {
        if (0xD800..0xDC00).contains(&first) && self.input[self.pos..].starts_with(b"\\u") {
            let saved = self.pos;
            self.pos += 2;
            if let Ok(second) = self.hex4() {
                if (0xDC00..0xE000).contains(&second) {
                    let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                    return char::from_u32(code).unwrap_or('\u{FFFD}');
                }
            }
            self.pos = saved;
        }
        char::from_u32(first).unwrap_or('\u{FFFD}')
    }

    /// One multi-byte UTF-8 rune; an invalid byte becomes U+FFFD and is skipped alone,
    /// as Go's `utf8.DecodeRune` does.
    fn utf8_rune(&mut self, out: &mut String) {
        let lead = self.input[self.pos];
        let width = match lead {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 0,
        };
        let decoded = self
            .input
            .get(self.pos..self.pos + width)
            .filter(|_| width > 0)
            .and_then(|bytes| std::str::from_utf8(bytes).ok());
        match decoded {
            Some(text) => {
                out.push_str(text);
                self.pos += width;
            }
            None => {
                out.push('\u{FFFD}');
                self.pos += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(input: &[u8]) -> Value {
        parse_first_value(input).unwrap()
    }

    #[test]
    fn reads_only_the_first_value() {
        assert_eq!(
            parse(br#"{"a":"1"} {"a":"2"} trailing garbage"#),
            Value::Object(vec![("a".into(), Value::String("1".into()))])
        );
    }

    #[test]
    fn keeps_duplicate_keys_in_order() {
        let Value::Object(members) = parse(br#"{"k":"1","K":"2","k":null}"#) else {
            panic!("not an object")
        };
        let keys: Vec<_> = members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k", "K", "k"]);
    }

    #[test]
    fn decodes_escapes_in_keys_and_values() {
        assert_eq!(
            parse(br#"{"r\u006fom":"\u0041\n\/"}"#),
            Value::Object(vec![("room".into(), Value::String("A\n/".into()))])
        );
    }

    #[test]
    fn joins_surrogate_pairs_and_replaces_lone_surrogates() {
        assert_eq!(
            parse(br#""\ud83d\ude00""#),
            Value::String("\u{1F600}".into())
        );
        assert_eq!(parse(br#""\ud800x""#), Value::String("\u{FFFD}x".into()));
        assert_eq!(parse(br#""\udc00""#), Value::String("\u{FFFD}".into()));
        assert_eq!(
            parse(br#""\ud800\u0041""#),
            Value::String("\u{FFFD}A".into())
        );
    }

    #[test]
    fn replaces_each_invalid_utf8_byte() {
        assert_eq!(
            parse(b"\"a\xffb\xe2\x82c\""),
            Value::String("a\u{FFFD}b\u{FFFD}\u{FFFD}c".into())
        );
        assert_eq!(parse("\"é€\"".as_bytes()), Value::String("é€".into()));
        // An encoded surrogate is invalid UTF-8: three replacement characters.
        assert_eq!(
            parse(b"\"\xed\xa0\x80\""),
            Value::String("\u{FFFD}\u{FFFD}\u{FFFD}".into())
        );
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\" 1}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":\"\x01\"}",
            b"{\"a\":\"\\x\"}",
            b"{'a':1}",
            b"[1,]",
            b"nul",
        ] {
            assert!(parse_first_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn caps_nesting() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse_first_value(deep.as_bytes()).is_err());
    }

    #[test]
    fn numbers_follow_go_grammar() {
        assert_eq!(parse(b"-0.5e+3"), Value::Number("-0.5e+3".into()));
        assert_eq!(parse(b"12 "), Value::Number("12".into()));
    }

    #[test]
    fn written_strings_read_back_and_escape_like_go() {
        let mut out = String::new();
        write_string(&mut out, "a<b>&\"\\\u{2028}é\u{1}\n\u{8}\u{c}");
        assert_eq!(out, r#""a\u003cb\u003e\u0026\"\\\u2028é\u0001\n\b\f""#);
        assert_eq!(
            parse(out.as_bytes()),
            Value::String("a<b>&\"\\\u{2028}é\u{1}\n\u{8}\u{c}".into())
        );
    }

    #[test]
    fn key_matching_follows_go_folding() {
        assert!(key_matches("room", "room"));
        assert!(key_matches("ROOM", "room"));
        assert!(key_matches("Room_Id", "room_id"));
        assert!(key_matches("\u{017F}lot_id", "slot_id"));
        assert!(key_matches("openid_to\u{212A}en", "openid_token"));
        assert!(key_matches(
            "ACCE\u{017F}\u{017F}_TO\u{212A}EN",
            "access_token"
        ));
        // Simple folding keeps 'İ' and 'ı' apart from 'I' (Go 1.26: "unknown field").
        assert!(!key_matches("\u{0130}d", "id"));
        assert!(!key_matches("\u{0131}D", "id"));
        assert!(!key_matches("open\u{0131}d_to\u{212A}en", "openid_token"));
        assert!(!key_matches("roomid", "room_id"));
        assert!(!key_matches("room ", "room"));
        assert!(!key_matches("r\u{00F6}om", "room"));
        assert!(!key_matches("\u{212A}", "s"));
        assert!(!key_matches("room\u{FFFD}", "room"));
    }

    #[test]
    fn key_may_match_covers_every_go_folding() {
        assert!(key_may_match("ROOM", "room"));
        assert!(key_may_match("\u{017F}lot_id", "slot_id"));
        assert!(key_may_match("\u{0130}d", "id"));
        assert!(key_may_match("\u{0131}D", "id"));
        assert!(key_may_match("open\u{0131}d_to\u{212A}en", "openid_token"));
        assert!(!key_may_match("roomid", "room_id"));
        assert!(!key_may_match("\u{0130}", "j"));
    }
}
