//! The room limit, as Synapse's admin API reports it.
//!
//! `GET /_synapse/admin/v1/rooms/{room}/state?type={limit type}` lists the room's state; the
//! limit is the event of that type with an empty state key. An older Synapse ignores `type`
//! and returns every state event, so the list is always scanned.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

use crate::json::{self, Scalar};
use crate::upstream::{CallError, Request, Service};

/// The path of the state lookup for `room`, the room id percent-encoded as one segment.
pub fn state_path(room: &str, state_type: &str) -> String {
    format!(
        "/_synapse/admin/v1/rooms/{}/state?type={}",
        percent_encode(room),
        percent_encode(state_type)
    )
}

/// Everything but RFC 3986 unreserved characters is escaped.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The state lookup of `room`'s limit event, with the admin token.
pub fn state_request(room: &str, state_type: &str, admin_token: &str) -> Request {
    Request {
        method: "GET",
        path: state_path(room, state_type),
        headers: vec![("authorization".into(), format!("Bearer {admin_token}"))],
        body: Vec::new(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a hostile room id such
/// as `!a/../b?c#d` stays inside its path segment.
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// What a state lookup says about a room's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No limit: no event, or a value that is not a positive integer.
    None,
    /// At most this many distinct users.
    MaxUsers(u32),
}

/// Interprets the answer to [`state_path`]. A room Synapse does not know (404) has no limit.
pub fn parse_state_response(
    status: Option<u32>,
    body: &[u8],
    state_type: &str,
) -> Result<Limit, CallError> {
    match status {
        None => return Err(CallError::NoResponse(Service::Synapse)),
        Some(200) => {}
        Some(404) if is_not_found(body) => return Ok(Limit::None),
        Some(other) => return Err(CallError::Status(Service::Synapse, other)),
    }
    let answer: StateAnswer = json::object(body).ok_or(CallError::BadBody(Service::Synapse))?;
    let event = answer
        .state
        .iter()
        .find(|e| e.kind.as_str() == Some(state_type) && e.state_key.as_str() == Some(""));
    Ok(event
        .and_then(|e| max_users(&e.content.max_users))
        .map_or(Limit::None, Limit::MaxUsers))
}

/// The admin API's state list; of each event only what identifies the limit event is typed,
/// so events of any shape are read (and skipped).
#[derive(Deserialize)]
struct StateAnswer {
    state: Vec<StateEvent>,
}

#[derive(Deserialize)]
struct StateEvent {
    #[serde(rename = "type", default)]
    kind: Scalar,
    #[serde(default)]
    state_key: Scalar,
    #[serde(default)]
    content: Content,
}

/// An event's content; of the limit event only `max_users` is read.
#[derive(Deserialize, Default)]
struct Content {
    #[serde(default)]
    max_users: Scalar,
}

/// Only Synapse's own "room not found" means no room; a 404 from a misrouted proxy is a failure.
fn is_not_found(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct ErrorAnswer {
        errcode: Option<String>,
    }
    json::object::<ErrorAnswer>(body)
        .is_some_and(|answer| answer.errcode.as_deref() == Some("M_NOT_FOUND"))
}

/// `max_users` as an integer, an integral float or an integral numeric string above zero.
fn max_users(value: &Scalar) -> Option<u32> {
    let number = match value {
        Scalar::Text(s) => integral_value(s.trim())?,
        number => number.as_whole_number()?,
    };
    (number >= 1).then(|| u32::try_from(number).unwrap_or(u32::MAX))
}

/// The value of a number written in JSON's grammar (here: a numeric string), when it is a
/// whole number that is not negative; read exactly, saturating at `u64::MAX`.
pub fn integral_value(text: &str) -> Option<u64> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let negative = text.starts_with('-');
    let (mantissa, exponent) = match text.trim_start_matches('-').split_once(['e', 'E']) {
        Some((m, e)) => (m, e.strip_prefix('+').unwrap_or(e).parse::<i64>().ok()?),
        None => (text.trim_start_matches('-'), 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty()
        || !(int_part.bytes().chain(frac_part.bytes())).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = digits × 10^shift
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let shift = exponent.checked_sub(frac_part.len() as i64)?;
    let (kept, dropped) = if shift >= 0 {
        (digits, "")
    } else {
        let cut = digits.len().saturating_sub(shift.unsigned_abs() as usize);
        digits.split_at(cut)
    };
    if dropped.bytes().any(|b| b != b'0') {
        return None; // a fraction
    }
    if kept.is_empty() {
        return Some(0);
    }
    if negative {
        return None;
    }
    let mut value: u64 = 0;
    for b in kept.bytes() {
        value = value.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    for _ in 0..shift.max(0) {
        if value == u64::MAX {
            break;
        }
        value = value.saturating_mul(10);
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const TYPE: &str = "io.lotus.voice_limit";

    fn answer(content: &str) -> Result<Limit, CallError> {
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
            Err(CallError::Status(Service::Synapse, 404))
        );
        assert_eq!(
            parse_state_response(Some(401), b"{}", TYPE),
            Err(CallError::Status(Service::Synapse, 401))
        );
        assert_eq!(
            parse_state_response(None, b"", TYPE),
            Err(CallError::NoResponse(Service::Synapse))
        );
        assert_eq!(
            parse_state_response(Some(200), br#"{"state":[{"#, TYPE),
            Err(CallError::BadBody(Service::Synapse))
        );
        assert_eq!(
            parse_state_response(Some(200), b"garbage", TYPE),
            Err(CallError::BadBody(Service::Synapse))
        );
    }

    #[test]
    fn integral_values_are_read_exactly() {
        for (text, expected) in [
            ("3", Some(3)),
            ("3.0", Some(3)),
            ("3.000", Some(3)),
            ("3e0", Some(3)),
            ("0.3e1", Some(3)),
            ("30e-1", Some(3)),
            ("1E2", Some(100)),
            ("2.5e1", Some(25)),
            ("0", Some(0)),
            ("-0", Some(0)),
            ("0.0", Some(0)),
            ("1e400", Some(u64::MAX)),
            ("99999999999999999999999", Some(u64::MAX)),
            ("2.5", None),
            ("25e-1", None),
            ("-2", None),
            ("1e-400", None),
            ("abc", None),
            ("", None),
            (".5", None),
            ("1.", Some(1)),
        ] {
            assert_eq!(integral_value(text), expected, "{text}");
        }
    }
}
