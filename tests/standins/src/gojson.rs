//! Go `encoding/json` behaviour that lk-jwt-service relies on.
//!
//! The real service decodes request bodies with `json.NewDecoder(body)` plus
//! `DisallowUnknownFields()`, and derives LiveKit names from `json.Marshal`
//! output. A filter in front of it must agree with those rules byte for byte
//! (which key wins, which body is rejected, which alias a room maps to), so
//! the stand-in reproduces them instead of using serde's stricter defaults:
//!
//! * only the first JSON value of the body is read; trailing bytes are ignored;
//! * object keys (after `\uXXXX` unescaping) are matched to struct fields by
//!   exact name first, otherwise by Unicode simple case folding, so `ROOM`,
//!   `Room` and `\u0052oom` all set `room`;
//! * keys are applied in document order, so the last duplicate wins, and a
//!   repeated nested object is merged into the fields set before;
//! * `null` leaves a field untouched; any other type mismatch is an error;
//! * integers must be plain integer literals that fit in 64 bits (`1.0` and
//!   `1e3` are errors);
//! * invalid UTF-8 inside strings becomes U+FFFD, one per bad byte.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A parsed JSON value that keeps object members in document order,
/// duplicates included.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// A number that Go can store in an `int`.
    Int(i64),
    /// Any other number (fractional, exponent, out of 64-bit range).
    OtherNumber,
    Str(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::OtherNumber, Value::Int))
    }

    fn visit_f64<E: de::Error>(self, _v: f64) -> Result<Value, E> {
        Ok(Value::OtherNumber)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Value>()? {
            members.push((key, value));
        }
        Ok(Value::Object(members))
    }
}

/// Why a body could not be decoded into a request struct. The service answers
/// every variant the same way; the distinction only helps logging and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Empty body or a JSON syntax error.
    Syntax(String),
    /// A JSON type that the Go field cannot hold.
    Type(&'static str),
    /// A key that matches no field (`DisallowUnknownFields`).
    UnknownField(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Syntax(msg) => write!(f, "invalid JSON: {msg}"),
            DecodeError::Type(field) => write!(f, "wrong JSON type for field {field}"),
            DecodeError::UnknownField(key) => write!(f, "json: unknown field \"{key}\""),
        }
    }
}

/// Replaces each byte of an invalid UTF-8 sequence with U+FFFD, as Go's
/// decoder does inside strings (outside strings such bytes are a syntax
/// error either way).
pub fn go_lossy_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                return out;
            }
            Err(err) => {
                let (valid, after) = rest.split_at(err.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = err.error_len().unwrap_or(after.len()).max(1);
                for _ in 0..bad.min(after.len()) {
                    out.push(char::REPLACEMENT_CHARACTER);
                }
                rest = after.get(bad..).unwrap_or_default();
            }
        }
    }
}

/// Reads the first JSON value of `body`, like one `json.Decoder.Decode` call.
pub fn parse_first_value(body: &[u8]) -> Result<Value, DecodeError> {
    let text = go_lossy_utf8(body);
    let mut de = serde_json::Deserializer::from_str(&text);
    Value::deserialize(&mut de).map_err(|e| DecodeError::Syntax(e.to_string()))
}

/// Compares one rune of a key with one rune of an (all lower-case ASCII)
/// field name under Unicode simple case folding. Among non-ASCII runes only
/// U+017F (long s) and U+212A (Kelvin sign) fold onto ASCII letters.
fn rune_folds_to(key: char, field: char) -> bool {
    key == field
        || key.eq_ignore_ascii_case(&field)
        || (key == '\u{017F}' && field.eq_ignore_ascii_case(&'s'))
        || (key == '\u{212A}' && field.eq_ignore_ascii_case(&'k'))
}

/// `bytes.EqualFold` for a key against an ASCII field name.
pub fn equal_fold(key: &str, field: &str) -> bool {
    let mut k = key.chars();
    let mut f = field.chars();
    loop {
        match (k.next(), f.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if rune_folds_to(a, b) => {}
            _ => return false,
        }
    }
}

/// Finds the struct field a JSON key sets: an exact match wins, otherwise the
/// first case-folded match in declaration order.
pub fn match_field(key: &str, fields: &[&str]) -> Option<usize> {
    fields
        .iter()
        .position(|f| *f == key)
        .or_else(|| fields.iter().position(|f| equal_fold(key, f)))
}

/// Decodes a JSON object into a Go struct with the given JSON field names.
/// `set` is called once per member, in document order, with the field index.
/// `null` decodes to nothing, as in Go.
pub fn decode_struct(
    value: &Value,
    what: &'static str,
    fields: &[&str],
    mut set: impl FnMut(usize, &Value) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    match value {
        Value::Null => Ok(()),
        Value::Object(members) => {
            for (key, member) in members {
                let idx = match_field(key, fields)
                    .ok_or_else(|| DecodeError::UnknownField(key.clone()))?;
                set(idx, member)?;
            }
            Ok(())
        }
        _ => Err(DecodeError::Type(what)),
    }
}

/// Stores a JSON string into a Go `string` field.
pub fn set_string(value: &Value, field: &'static str, dst: &mut String) -> Result<(), DecodeError> {
    match value {
        Value::Null => Ok(()),
        Value::Str(s) => {
            dst.clone_from(s);
            Ok(())
        }
        _ => Err(DecodeError::Type(field)),
    }
}

/// Stores a JSON number into a Go `int` field.
pub fn set_int(value: &Value, field: &'static str, dst: &mut i64) -> Result<(), DecodeError> {
    match value {
        Value::Null => Ok(()),
        Value::Int(n) => {
            *dst = *n;
            Ok(())
        }
        _ => Err(DecodeError::Type(field)),
    }
}

/// Appends `s` as a JSON string the way Go's `json.Marshal` writes it
/// (HTML-safe: `<`, `>`, `&`, U+2028 and U+2029 are escaped; other non-ASCII
/// stays UTF-8; control characters use the short escapes Go 1.22+ emits).
pub fn push_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `json.Marshal([]string{...})`.
pub fn marshal_string_array(items: &[&str]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_go_string(&mut out, item);
    }
    out.push(']');
    out
}

/// A flat JSON object of string members, as `json.NewEncoder(w).Encode`
/// writes a struct of strings: compact, HTML-safe, newline-terminated.
pub fn encode_string_object(members: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_go_string(&mut out, key);
        out.push(':');
        push_go_string(&mut out, value);
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_duplicates_in_order_and_unescapes_keys() {
        let v = parse_first_value(br#"{"a":1,"\u0061":2,"b":null}"#).unwrap();
        assert_eq!(
            v,
            Value::Object(vec![
                ("a".into(), Value::Int(1)),
                ("a".into(), Value::Int(2)),
                ("b".into(), Value::Null),
            ])
        );
    }

    #[test]
    fn reads_only_the_first_value() {
        assert_eq!(
            parse_first_value(b" {} trailing").unwrap(),
            Value::Object(vec![])
        );
        assert!(parse_first_value(b"").is_err());
        assert!(parse_first_value(b"   ").is_err());
        assert!(parse_first_value(b"{\"a\":}").is_err());
    }

    #[test]
    fn numbers_follow_go_int_rules() {
        let int = |s: &str| parse_first_value(s.as_bytes()).unwrap();
        assert_eq!(int("3600"), Value::Int(3600));
        assert_eq!(int("-5"), Value::Int(-5));
        assert_eq!(int("9223372036854775807"), Value::Int(i64::MAX));
        assert_eq!(int("9223372036854775808"), Value::OtherNumber);
        assert_eq!(int("1.0"), Value::OtherNumber);
        assert_eq!(int("1e3"), Value::OtherNumber);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_per_byte() {
        assert_eq!(go_lossy_utf8(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(go_lossy_utf8(b"a\xe2\x82b"), "a\u{FFFD}\u{FFFD}b");
        assert_eq!(go_lossy_utf8(b"\xed\xa0\x80"), "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(go_lossy_utf8(b"ok \xc3\xa9"), "ok \u{e9}");
        assert_eq!(go_lossy_utf8(b"end\xe2"), "end\u{FFFD}");
    }

    #[test]
    fn field_matching_prefers_exact_then_folds() {
        let fields = ["room", "device_id", "token_type", "slot_id"];
        assert_eq!(match_field("room", &fields), Some(0));
        assert_eq!(match_field("ROOM", &fields), Some(0));
        assert_eq!(match_field("Device_ID", &fields), Some(1));
        assert_eq!(match_field("to\u{212A}en_type", &fields), Some(2));
        assert_eq!(match_field("\u{017F}lot_id", &fields), Some(3));
        assert_eq!(match_field("deviceid", &fields), None);
        assert_eq!(match_field("rooms", &fields), None);
        assert_eq!(match_field("r\u{f6}om", &fields), None);
    }

    #[test]
    fn go_marshal_escapes_html_and_separators() {
        assert_eq!(
            marshal_string_array(&["a<b>&c", "\u{2028}\u{2029}", "é\"\\\n\u{1}\u{8}\u{c}"]),
            "[\"a\\u003cb\\u003e\\u0026c\",\"\\u2028\\u2029\",\"é\\\"\\\\\\n\\u0001\\b\\f\"]"
        );
        assert_eq!(
            encode_string_object(&[("url", "ws://x?a&b"), ("jwt", "t")]),
            "{\"url\":\"ws://x?a\\u0026b\",\"jwt\":\"t\"}\n"
        );
    }
}
