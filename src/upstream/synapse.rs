//! The room limit, as Synapse's admin API reports it.
//!
//! `GET /_synapse/admin/v1/rooms/{room}/state?type={limit type}` lists the room's state; the
//! limit is the event of that type with an empty state key. An older Synapse ignores `type`
//! and returns every state event, so the list is always scanned.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::{IgnoredAny, MapAccess};
use serde::{Deserialize, Deserializer};

use crate::request::json::{self, FromObject, Scalar};
use crate::state::store::digest;
use crate::upstream::call::{CallError, Request, Service};

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
    /// At most this many distinct users; the power level that lets a user into the full room
    /// when the event names one (`exempt_power_level`).
    MaxUsers(u32, Option<i64>),
}

/// Interprets the answer to [`state_path`]. A room Synapse does not know (404) has no limit.
pub fn parse_state_response(
    status: Option<u32>,
    body: &[u8],
    state_type: &str,
) -> Result<Limit, CallError> {
    let Some(event) = state_event(status, body, state_type)? else {
        return Ok(Limit::None);
    };
    let exempt_level = level(&event.content.exempt_power_level);
    Ok(max_users(&event.content.max_users)
        .map_or(Limit::None, |max| Limit::MaxUsers(max, exempt_level)))
}

/// The event of `state_type` with an empty state key in a state answer; `None` when there is
/// none, or Synapse does not know the room.
fn state_event(
    status: Option<u32>,
    body: &[u8],
    state_type: &str,
) -> Result<Option<StateEvent>, CallError> {
    match status {
        None => return Err(CallError::NoResponse(Service::Synapse)),
        Some(200) => {}
        Some(404) if is_not_found(body) => return Ok(None),
        Some(other) => return Err(CallError::Status(Service::Synapse, other)),
    }
    let answer: StateAnswer = json::object(body).ok_or(CallError::BadBody(Service::Synapse))?;
    Ok(answer
        .state
        .into_iter()
        .find(|e| e.kind.as_str() == Some(state_type) && e.state_key.as_str() == Some("")))
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
    sender: Scalar,
    #[serde(default)]
    content: Content,
}

/// Users above a room's default level kept per room: the highest levels first. A room with more
/// privileged users than this has the lowest of them treated as default (so never exempt).
pub const MAX_PRIVILEGED: usize = 64;

/// What the guard keeps of a room's `m.room.power_levels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerLevels {
    /// The level needed to send the limit event: `events[<limit type>]`, else `state_default`
    /// (50 when the event names none; 0 without a power-levels event, as the spec says).
    pub send_level: i64,
    /// `users_default` (0 when absent).
    pub users_default: i64,
    /// (digest of the user id, level) of the users above `users_default`, highest first.
    pub users: Vec<(String, i64)>,
}

impl PowerLevels {
    /// Whether `user` may come into the room when it is full: at the level needed to set the
    /// limit (or `threshold`, when configured) and above the room's default level (so a room
    /// where everyone may set the limit exempts nobody).
    pub fn exempts(&self, user: &str, threshold: Option<i64>) -> bool {
        let level = self.level_of(user);
        level >= threshold.unwrap_or(self.send_level) && level > self.users_default
    }

    /// `user`'s level in the room.
    pub fn level_of(&self, user: &str) -> i64 {
        let user = digest(user);
        self.users
            .iter()
            .find(|(known, _)| *known == user)
            .map_or(self.users_default, |(_, level)| *level)
    }
}

/// The lookup of `room`'s create event, with the admin token.
pub fn create_request(room: &str, admin_token: &str) -> Request {
    state_request(room, "m.room.create", admin_token)
}

/// The room's creators where they hold unlimited power outside `m.room.power_levels` (room
/// version 12 and later: the create event's sender and `additional_creators`), as power levels
/// in which they stand above any threshold and nobody else above the default. Other room
/// versions, and rooms Synapse does not know, have none.
pub fn parse_creators(status: Option<u32>, body: &[u8]) -> Result<PowerLevels, CallError> {
    let mut creators = PowerLevels {
        send_level: i64::MAX,
        users_default: i64::MIN,
        users: Vec::new(),
    };
    let Some(event) = state_event(status, body, "m.room.create")? else {
        return Ok(creators);
    };
    if !creators_have_unlimited_power(&event.content.room_version) {
        return Ok(creators);
    }
    let sender = event.sender.as_str().map(str::to_owned);
    let named = sender.into_iter().chain(event.content.additional_creators);
    creators.users = named
        .map(|user| (digest(&user), i64::MAX))
        .take(MAX_PRIVILEGED)
        .collect();
    Ok(creators)
}

/// Room version 12 and later, and the versions that previewed it (`org.matrix.hydra.*`).
fn creators_have_unlimited_power(version: &Scalar) -> bool {
    let Some(version) = version.as_str() else {
        return false;
    };
    version.starts_with("org.matrix.hydra.") || version.parse::<u32>().is_ok_and(|v| v >= 12)
}

/// The lookup of `room`'s power levels, with the admin token.
pub fn power_levels_request(room: &str, admin_token: &str) -> Request {
    state_request(room, "m.room.power_levels", admin_token)
}

/// Interprets the answer to [`power_levels_request`]. A room Synapse does not know, or one
/// without a power-levels event, has nobody above the default. Values that are not integers
/// (nor integral strings, which old room versions allowed) are ignored, as is a `users` or
/// `events` that is not an object: a malformed event makes nobody exempt.
pub fn parse_power_levels(
    status: Option<u32>,
    body: &[u8],
    limit_type: &str,
) -> Result<PowerLevels, CallError> {
    let Some(event) = state_event(status, body, "m.room.power_levels")? else {
        return Ok(PowerLevels::default());
    };
    let content = event.content;
    let users_default = level(&content.users_default).unwrap_or(0);
    let send_level = content
        .events
        .0
        .iter()
        .find(|(kind, _)| kind == limit_type)
        .and_then(|(_, value)| level(value))
        .or_else(|| level(&content.state_default))
        .unwrap_or(50);
    let mut users: Vec<(String, i64)> = content
        .users
        .0
        .iter()
        .filter_map(|(user, value)| Some((digest(user), level(value)?)))
        .filter(|(_, level)| *level > users_default)
        .collect();
    users.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    users.truncate(MAX_PRIVILEGED);
    Ok(PowerLevels {
        send_level,
        users_default,
        users,
    })
}

/// A power level: an integer, an integral float, or an integral numeric string; negative
/// levels read as -1 (below every level that can matter here).
fn level(value: &Scalar) -> Option<i64> {
    let whole = match value {
        Scalar::Negative => return Some(-1),
        Scalar::Text(text) => {
            let text = text.trim();
            if let Some(magnitude) = text.strip_prefix('-') {
                return integral_value(magnitude).map(|_| -1);
            }
            integral_value(text)?
        }
        number => number.as_whole_number()?,
    };
    Some(i64::try_from(whole).unwrap_or(i64::MAX))
}

/// The fields of a state event's content the guard reads: `max_users` and
/// `exempt_power_level` of the limit event, the levels of the power-levels event. One type for
/// all, so the module holds one reader.
#[derive(Default)]
struct Content {
    max_users: Scalar,
    exempt_power_level: Scalar,
    users: ScalarMap,
    users_default: Scalar,
    events: ScalarMap,
    state_default: Scalar,
    /// `m.room.create`'s.
    room_version: Scalar,
    additional_creators: Vec<String>,
}

impl FromObject for Content {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut content = Content::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "max_users" => content.max_users = map.next_value()?,
                "exempt_power_level" => content.exempt_power_level = map.next_value()?,
                "users" => content.users = map.next_value()?,
                "events" => content.events = map.next_value()?,
                "users_default" => content.users_default = map.next_value()?,
                "state_default" => content.state_default = map.next_value()?,
                "room_version" => content.room_version = map.next_value()?,
                "additional_creators" => content.additional_creators = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(content)
    }
}

/// A JSON object of scalars.
#[derive(Default)]
struct ScalarMap(Vec<(String, Scalar)>);

impl FromObject for ScalarMap {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Scalar>()? {
            entries.push(entry);
        }
        Ok(ScalarMap(entries))
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        json::lenient(deserializer)
    }
}

impl<'de> Deserialize<'de> for ScalarMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        json::lenient(deserializer)
    }
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

    fn levels(content: &str) -> PowerLevels {
        let body = format!(
            r#"{{"state":[{{"type":"m.room.power_levels","state_key":"","content":{content}}}]}}"#
        );
        parse_power_levels(Some(200), body.as_bytes(), TYPE).unwrap()
    }

    #[test]
    fn power_levels_give_each_users_level_and_the_level_to_set_the_limit() {
        let pl = levels(
            r#"{"users":{"@mod:x":50,"@admin:x":100,"@low:x":-5,"@str:x":"75"},"users_default":0,
                "events":{"io.lotus.voice_limit":60},"state_default":50}"#,
        );
        assert_eq!(pl.send_level, 60);
        assert_eq!(pl.level_of("@admin:x"), 100);
        assert_eq!(pl.level_of("@mod:x"), 50);
        assert_eq!(pl.level_of("@str:x"), 75, "old room versions allow strings");
        assert_eq!(pl.level_of("@low:x"), 0, "kept only above the default");
        assert_eq!(pl.level_of("@anyone:x"), 0);
        // Without an entry for the limit event, state_default; without that, 50.
        assert_eq!(levels(r#"{"state_default":30}"#).send_level, 30);
        assert_eq!(levels(r#"{}"#).send_level, 50);
        assert_eq!(levels(r#"{"users_default":10}"#).level_of("@a:x"), 10);
    }

    #[test]
    fn exempt_exactly_from_the_threshold_and_only_above_the_default() {
        let pl = levels(
            r#"{"users":{"@l60:x":60,"@l59:x":59,"@l30:x":30,"@l29:x":29,"@l11:x":11},
                "users_default":10,"events":{"io.lotus.voice_limit":60}}"#,
        );
        // The room's level to send the limit event.
        assert!(pl.exempts("@l60:x", None));
        assert!(!pl.exempts("@l59:x", None));
        // A threshold named by the limit event or the configuration.
        assert!(pl.exempts("@l30:x", Some(30)));
        assert!(!pl.exempts("@l29:x", Some(30)));
        // At the default, never; one above, from a threshold at or below it.
        assert!(pl.exempts("@l11:x", Some(10)));
        assert!(!pl.exempts("@anyone:x", Some(10)));
        assert!(!pl.exempts("@anyone:x", Some(9)));
        assert!(pl.exempts("@l11:x", Some(11)));
        assert!(!pl.exempts("@l11:x", Some(12)));
    }

    #[test]
    fn a_version_12_rooms_creators_are_exempt_at_any_threshold_and_nobody_else() {
        let body = br#"{"state":[{"type":"m.room.create","state_key":"","sender":"@c:x","content":{"room_version":"12"}}]}"#;
        let creators = parse_creators(Some(200), body).unwrap();
        for threshold in [None, Some(i64::MAX), Some(i64::MIN), Some(0)] {
            assert!(creators.exempts("@c:x", threshold), "{threshold:?}");
            assert!(!creators.exempts("@other:x", threshold), "{threshold:?}");
        }
    }

    #[test]
    fn malformed_power_levels_make_nobody_exempt_and_fail_nothing() {
        for content in [
            r#"{"users":[1,2],"events":"x","users_default":"high"}"#,
            r#"{"users":{"@a:x":{"level":100}},"users_default":null}"#,
            r#"{"users":{"@a:x":true}}"#,
            r#""not an object""#,
        ] {
            let pl = levels(content);
            assert_eq!(pl.level_of("@a:x"), 0, "{content}");
        }
        // No power-levels event, an unknown room: nobody above the default.
        let none = parse_power_levels(Some(200), br#"{"state":[]}"#, TYPE).unwrap();
        assert_eq!(none, PowerLevels::default());
        let gone = br#"{"errcode":"M_NOT_FOUND","error":"Room not found"}"#;
        assert_eq!(
            parse_power_levels(Some(404), gone, TYPE),
            Ok(PowerLevels::default())
        );
        assert!(parse_power_levels(Some(500), b"", TYPE).is_err());
        assert!(parse_power_levels(None, b"", TYPE).is_err());
    }

    #[test]
    fn only_the_highest_privileged_users_are_kept() {
        let users: Vec<String> = (0..MAX_PRIVILEGED + 10)
            .map(|i| format!(r#""@u{i}:x":{}"#, 10 + i))
            .collect();
        let pl = levels(&format!(r#"{{"users":{{{}}}}}"#, users.join(",")));
        assert_eq!(pl.users.len(), MAX_PRIVILEGED);
        assert_eq!(
            pl.level_of(&format!("@u{}:x", MAX_PRIVILEGED + 9)),
            10 + MAX_PRIVILEGED as i64 + 9
        );
        assert_eq!(pl.level_of("@u0:x"), 0);
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
        assert_eq!(answer(r#"{"max_users":3}"#), Ok(Limit::MaxUsers(3, None)));
        assert_eq!(answer(r#"{"max_users":3.0}"#), Ok(Limit::MaxUsers(3, None)));
        assert_eq!(answer(r#"{"max_users":"4"}"#), Ok(Limit::MaxUsers(4, None)));
        assert_eq!(
            answer(r#"{"max_users":" 5.0 "}"#),
            Ok(Limit::MaxUsers(5, None))
        );
        assert_eq!(
            answer(r#"{"max_users":1e12}"#),
            Ok(Limit::MaxUsers(u32::MAX, None))
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
