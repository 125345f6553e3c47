//! The room limit, as Synapse's admin API reports it.
//!
//! `GET /_synapse/admin/v1/rooms/{room}/state?type={limit type}` lists the room's state; the
//! limit is the event of that type with an empty state key. An older Synapse ignores `type`
//! and returns every state event, so the list is always scanned.

use crate::gojson::{self, Value};

/// The path of the state lookup for `room`, the room id percent-encoded as one segment.
pub fn state_path(room: &str, state_type: &str) -> String {
    format!(
        "/_synapse/admin/v1/rooms/{}/state?type={}",
        percent_encode(room),
        percent_encode(state_type)
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a hostile room id such
/// as `!a/../b?c#d` stays inside its path segment.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a state lookup says about a room's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No limit: no event, or a value that is not a positive integer.
    None,
    /// At most this many distinct users.
    MaxUsers(u32),
}

/// Why a state lookup gave no answer the guard can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// No `:status` at all: the call was reset or overflowed.
    NoResponse,
    Status(u32),
    BadBody,
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::NoResponse => f.write_str("Synapse gave no response"),
            LookupError::Status(s) => write!(f, "Synapse answered HTTP {s}"),
            LookupError::BadBody => f.write_str("Synapse's answer is not a state list"),
        }
    }
}

/// Interprets the answer to [`state_path`]. A room Synapse does not know (404) has no limit.
pub fn parse_state_response(
    status: Option<u32>,
    body: &[u8],
    state_type: &str,
) -> Result<Limit, LookupError> {
    match status {
        None => return Err(LookupError::NoResponse),
        Some(200) => {}
        Some(404) if is_not_found(body) => return Ok(Limit::None),
        Some(other) => return Err(LookupError::Status(other)),
    }
    let document = gojson::parse_document(body).map_err(|_| LookupError::BadBody)?;
    let events = document
        .get("state")
        .and_then(Value::as_array)
        .ok_or(LookupError::BadBody)?;
    let event = events.iter().find(|e| {
        e.get("type").and_then(Value::as_str) == Some(state_type)
            && e.get("state_key").and_then(Value::as_str) == Some("")
    });
    Ok(event
        .and_then(|e| e.get("content"))
        .and_then(max_users)
        .map_or(Limit::None, Limit::MaxUsers))
}

/// Only Synapse's own "room not found" means no room; a 404 from a misrouted proxy is a failure.
fn is_not_found(body: &[u8]) -> bool {
    gojson::parse_document(body)
        .ok()
        .is_some_and(|v| v.get("errcode").and_then(Value::as_str) == Some("M_NOT_FOUND"))
}

/// `max_users` as an integer, an integral float or an integral numeric string above zero.
fn max_users(content: &Value) -> Option<u32> {
    let number = match content.get("max_users")? {
        number @ Value::Number(_) => number.as_integral()?,
        Value::String(s) => gojson::integral_value(s.trim())?,
        _ => return None,
    };
    (number >= 1).then(|| u32::try_from(number).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const TYPE: &str = "io.lotus.voice_limit";

    fn answer(content: &str) -> Result<Limit, LookupError> {
        let body = format!(
            r#"{{"state":[{{"type":"m.room.create","state_key":"","content":{{}}}},{{"type":"io.lotus.voice_limit","state_key":"","content":{content}}}]}}"#
        );
        parse_state_response(Some(200), body.as_bytes(), TYPE)
    }

    #[test]
    fn path_encodes_the_room_as_one_segment() {
        assert_eq!(
            state_path("!abc:example.com", TYPE),
            "/_synapse/admin/v1/rooms/%21abc%3Aexample.com/state?type=io.lotus.voice_limit"
        );
        assert_eq!(
            state_path("!a/../b?c#d e", TYPE),
            "/_synapse/admin/v1/rooms/%21a%2F..%2Fb%3Fc%23d%20e/state?type=io.lotus.voice_limit"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn reads_the_limit_in_all_accepted_forms() {
        assert_eq!(answer(r#"{"max_users":3}"#), Ok(Limit::MaxUsers(3)));
        assert_eq!(answer(r#"{"max_users":3.0}"#), Ok(Limit::MaxUsers(3)));
        assert_eq!(answer(r#"{"max_users":"4"}"#), Ok(Limit::MaxUsers(4)));
        assert_eq!(answer(r#"{"max_users":" 5.0 "}"#), Ok(Limit::MaxUsers(5)));
        assert_eq!(
            answer(r#"{"max_users":1e12}"#),
            Ok(Limit::MaxUsers(u32::MAX))
        );
    }

    #[test]
    fn anything_else_means_no_limit() {
        for content in [
            r#"{}"#,
            r#"{"max_users":0}"#,
            r#"{"max_users":-2}"#,
            r#"{"max_users":2.5}"#,
            r#"{"max_users":"two"}"#,
            r#"{"max_users":null}"#,
            r#"{"max_users":[3]}"#,
            r#"{"max_users":true}"#,
            r#"{"max_users":"2.5"}"#,
            r#"{"max_users":""}"#,
        ] {
            assert_eq!(answer(content), Ok(Limit::None), "{content}");
        }
    }

    #[test]
    fn ignores_events_with_a_state_key_or_another_type() {
        let body = br#"{"state":[{"type":"io.lotus.voice_limit","state_key":"x","content":{"max_users":1}},{"type":"other","state_key":"","content":{"max_users":1}}]}"#;
        assert_eq!(parse_state_response(Some(200), body, TYPE), Ok(Limit::None));
    }

    #[test]
    fn unknown_room_means_no_limit_but_other_errors_fail() {
        let not_found = br#"{"errcode":"M_NOT_FOUND","error":"Room not found"}"#;
        assert_eq!(
            parse_state_response(Some(404), not_found, TYPE),
            Ok(Limit::None)
        );
        assert_eq!(
            parse_state_response(Some(404), b"<html>", TYPE),
            Err(LookupError::Status(404))
        );
        assert_eq!(
            parse_state_response(Some(401), b"{}", TYPE),
            Err(LookupError::Status(401))
        );
        assert_eq!(
            parse_state_response(None, b"", TYPE),
            Err(LookupError::NoResponse)
        );
        assert_eq!(
            parse_state_response(Some(200), br#"{"state":[{"#, TYPE),
            Err(LookupError::BadBody)
        );
        assert_eq!(
            parse_state_response(Some(200), b"garbage", TYPE),
            Err(LookupError::BadBody)
        );
    }
}
