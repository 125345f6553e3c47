//! What a token request asks for, read the way lk-jwt-service reads it.
//!
//! lk-jwt-service decodes a body with Go's `json.Decoder`, `DisallowUnknownFields()` and
//! `Decode` into the struct of a body shape, then checks that the required fields are set:
//!
//! - `/get_token` takes the new shape (`room_id`, `slot_id`, `openid_token`, `member`);
//! - `/sfu/get` (0.4.0 up to 0.5.0) decodes the legacy shape (`room`, `openid_token`,
//!   `device_id`) and, only if that decoding fails, the new shape.
//!
//! Both shapes also take the optional `delay_id`, `delay_timeout` and `delay_cs_api_url`.
//!
//! [`parse`] reads leniently: the room of either shape on either path, and the few fields the
//! guard uses; it ignores what it does not need. A body that it reads but the service refuses
//! never yields a token, so the guard need not be stricter than that. Go's rules applied here
//! (see [`crate::request::gojson`]): case-insensitive keys, the last of duplicate keys wins, `null`
//! leaves a field unchanged, a repeated nested object merges into the fields already read,
//! only the first JSON value of the body is read.
//!
//! `make test-oracle` checks it against Go's `encoding/json` on thousands of bodies, next to
//! a reader as strict as lk-jwt-service (`tests/strict_token`): on every body the service
//! accepts, [`parse`] must read the same room, shape, slot, device and claimed user.

use crate::request::gojson::{self, key_may_match, Value};
use crate::request::secret::Secret;

/// lk-jwt-service's slot for the legacy `/sfu/get` shape.
pub const LEGACY_SLOT: &str = "m.call#ROOM";

/// The fields of a token request body that the guard uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Matrix room id.
    pub room: String,
    /// Which body shape named the room.
    pub shape: Shape,
    /// `slot_id` (new shape); the legacy shape always uses [`LEGACY_SLOT`].
    pub slot_id: String,
    /// `device_id` (legacy shape): the requester's LiveKit identity is `<user>:<device_id>`.
    pub device_id: String,
    /// `member.claimed_user_id` (new shape); lk-jwt-service issues a token only when the
    /// OpenID check proves this claim.
    pub claimed_user_id: String,
    /// `member.claimed_device_id` and `member.id` (new shape): with the verified user, they
    /// name the participant lk-jwt-service 0.4.3+ issues the token for.
    pub claimed_device_id: String,
    pub member_id: String,
    /// The OpenID token lk-jwt-service checks against `matrix_server_name`'s userinfo.
    pub openid: OpenId,
}

/// `openid_token`'s fields that say who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenId {
    pub access_token: Secret,
    pub matrix_server_name: String,
}

impl Default for OpenId {
    fn default() -> Self {
        OpenId {
            access_token: Secret::new(String::new()),
            matrix_server_name: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Shape {
    /// `{"room", "openid_token", "device_id"}`
    #[default]
    Legacy,
    /// `{"room_id", "slot_id", "openid_token", "member"}`
    New,
}

impl TokenRequest {
    /// The slot lk-jwt-service hashes into the LiveKit room alias.
    pub fn slot(&self) -> &str {
        match self.shape {
            Shape::Legacy => LEGACY_SLOT,
            Shape::New => &self.slot_id,
        }
    }
}

/// Why no room could be read from a body. lk-jwt-service refuses all of these with a 400,
/// so they matter only if it unexpectedly issues a token anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    NotJson(gojson::SyntaxError),
    NotAnObject,
    /// A field holds a JSON value of another type than the field's (Go: type error).
    WrongType(&'static str),
    /// Neither `room` nor `room_id` holds a non-empty string.
    NoRoom,
    /// Both `room` and `room_id` are present.
    AmbiguousRoom,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::NotJson(e) => write!(f, "request body is not JSON ({e})"),
            BodyError::NotAnObject => f.write_str("request body is not a JSON object"),
            BodyError::WrongType(field) => {
                write!(f, "request field `{field}` has the wrong JSON type")
            }
            BodyError::NoRoom => f.write_str("request body names no room"),
            BodyError::AmbiguousRoom => {
                f.write_str("request body names the room both as `room` and `room_id`")
            }
        }
    }
}

/// Reads a token request body leniently: the room of either shape on either path, and the
/// slot, device and claimed user the guard uses; other keys are ignored, and keys are
/// matched under the case folding of any Go release ([`key_may_match`]), so no key the
/// service reads is missed.
pub fn parse(body: &[u8]) -> Result<TokenRequest, BodyError> {
    let value = gojson::parse_first_value(body).map_err(BodyError::NotJson)?;
    let members = match value {
        Value::Object(members) => members,
        // Go decodes `null` into a struct as a no-op: every field stays empty.
        Value::Null => return Err(BodyError::NoRoom),
        _ => return Err(BodyError::NotAnObject),
    };
    let mut request = TokenRequest::default();
    let mut legacy_room = None;
    let mut new_room = None;
    for (key, value) in &members {
        if key_may_match(key, "room") {
            assign(&mut legacy_room, value, "room")?;
        } else if key_may_match(key, "room_id") {
            assign(&mut new_room, value, "room_id")?;
        } else if key_may_match(key, "slot_id") {
            assign_string(&mut request.slot_id, value, "slot_id")?;
        } else if key_may_match(key, "device_id") {
            assign_string(&mut request.device_id, value, "device_id")?;
        } else if key_may_match(key, "member") {
            read_member(&mut request, value)?;
        } else if key_may_match(key, "openid_token") {
            read_openid(&mut request.openid, value)?;
        }
    }
    let (room, shape) = match (legacy_room, new_room) {
        (Some(_), Some(_)) => return Err(BodyError::AmbiguousRoom),
        (Some(room), None) => (room, Shape::Legacy),
        (None, Some(room)) => (room, Shape::New),
        (None, None) => return Err(BodyError::NoRoom),
    };
    if room.is_empty() {
        return Err(BodyError::NoRoom);
    }
    request.room = room;
    request.shape = shape;
    Ok(request)
}

/// The members of a struct-valued field (`member`, `openid_token`): Go's `null` leaves the
/// struct as it is (no members), a repeated object merges into it, anything else is a type
/// error naming `field`.
fn struct_members<'v>(
    value: &'v Value,
    field: &'static str,
) -> Result<&'v [(String, Value)], BodyError> {
    match value {
        Value::Null => Ok(&[]),
        Value::Object(members) => Ok(members),
        _ => Err(BodyError::WrongType(field)),
    }
}

fn read_member(request: &mut TokenRequest, value: &Value) -> Result<(), BodyError> {
    for (key, value) in struct_members(value, "member")? {
        let (field, name) = if key_may_match(key, "claimed_user_id") {
            (&mut request.claimed_user_id, "member.claimed_user_id")
        } else if key_may_match(key, "claimed_device_id") {
            (&mut request.claimed_device_id, "member.claimed_device_id")
        } else if key_may_match(key, "id") {
            (&mut request.member_id, "member.id")
        } else {
            continue;
        };
        assign_string(field, value, name)?;
    }
    Ok(())
}

fn read_openid(openid: &mut OpenId, value: &Value) -> Result<(), BodyError> {
    for (key, value) in struct_members(value, "openid_token")? {
        if key_may_match(key, "access_token") {
            let mut token = openid.access_token.expose().to_owned();
            assign_string(&mut token, value, "openid_token.access_token")?;
            openid.access_token = Secret::new(token);
        } else if key_may_match(key, "matrix_server_name") {
            assign_string(
                &mut openid.matrix_server_name,
                value,
                "openid_token.matrix_server_name",
            )?;
        }
    }
    Ok(())
}

/// Go semantics for a string field that may appear several times: the last string wins,
/// `null` changes nothing, and the field counts as present once its key appeared.
fn assign(slot: &mut Option<String>, value: &Value, field: &'static str) -> Result<(), BodyError> {
    let current = slot.get_or_insert_with(String::new);
    assign_string(current, value, field)
}

/// Go's decoding into a string field: a string replaces it, `null` leaves it, anything else
/// is a type error naming `field`.
pub fn assign_string(
    slot: &mut String,
    value: &Value,
    field: &'static str,
) -> Result<(), BodyError> {
    match value {
        Value::String(s) => {
            slot.clone_from(s);
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(BodyError::WrongType(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LEGACY: &str = r#"{"room":"!abc:example.com","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"device_id":"DEV"}"#;
    const NEW: &str = r#"{"room_id":"!abc","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"member":{"id":"mem","claimed_user_id":"@alice:example.com","claimed_device_id":"DEV"}}"#;

    #[test]
    fn reads_legacy_shape() {
        let r = parse(LEGACY.as_bytes()).unwrap();
        assert_eq!(r.room, "!abc:example.com");
        assert_eq!(r.shape, Shape::Legacy);
        assert_eq!(r.device_id, "DEV");
        assert_eq!(r.slot(), "m.call#ROOM");
    }

    #[test]
    fn reads_new_shape() {
        let r = parse(NEW.as_bytes()).unwrap();
        assert_eq!(r.room, "!abc");
        assert_eq!(r.shape, Shape::New);
        assert_eq!(r.slot(), "m.call#ROOM");
        assert_eq!(r.claimed_user_id, "@alice:example.com");
        assert_eq!(r.claimed_device_id, "DEV");
        assert_eq!(r.member_id, "mem");
        assert_eq!(r.openid.access_token.expose(), "t");
        assert_eq!(r.openid.matrix_server_name, "example.com");
    }

    #[test]
    fn the_openid_token_is_read_as_go_reads_it_and_never_shown() {
        let r = parse(
            br#"{"room":"!r","openid_token":{"access_token":"a","MATRIX_server_name":"x"},"openid_token":{"Access_Token":"b"},"openid_token":null}"#,
        )
        .unwrap();
        assert_eq!(r.openid.access_token.expose(), "b");
        assert_eq!(r.openid.matrix_server_name, "x");
        assert!(!format!("{r:?}").contains("\"b\""));
        assert_eq!(
            parse(br#"{"room":"!r","openid_token":"t"}"#),
            Err(BodyError::WrongType("openid_token"))
        );
    }

    #[test]
    fn keys_match_case_insensitively_and_last_wins() {
        let r = parse(br#"{"room":"!a","ROOM":"!b","Room":null}"#).unwrap();
        assert_eq!(r.room, "!b");
        let r = parse(br#"{"R\u006fom_ID":"!x","room_id":"!y"}"#).unwrap();
        assert_eq!(r.room, "!y");
        assert_eq!(r.shape, Shape::New);
        // Go folds U+017F LATIN SMALL LETTER LONG S onto 's'.
        let r = parse("{\"room_id\":\"!r\",\"\u{17f}lot_id\":\"s2\"}".as_bytes()).unwrap();
        assert_eq!(r.slot(), "s2");
    }

    #[test]
    fn repeated_member_objects_merge() {
        let r = parse(
            br#"{"room_id":"!r","member":{"claimed_user_id":"@a:x"},"member":{"id":"m"},"member":null}"#,
        )
        .unwrap();
        assert_eq!(r.claimed_user_id, "@a:x");
    }

    #[test]
    fn trailing_data_is_ignored_like_go_decoder() {
        let r = parse(br#"{"room":"!real"}{"room":"!other"}"#).unwrap();
        assert_eq!(r.room, "!real");
    }

    #[test]
    fn invalid_utf8_elsewhere_does_not_hide_the_room() {
        let r = parse(b"{\"room\":\"!r\",\"device_id\":\"\xff\xfe\"}").unwrap();
        assert_eq!(r.room, "!r");
        assert_eq!(r.device_id, "\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(matches!(parse(b"nope"), Err(BodyError::NotJson(_))));
        assert_eq!(parse(b"[]"), Err(BodyError::NotAnObject));
        assert_eq!(parse(b"null"), Err(BodyError::NoRoom));
        assert_eq!(parse(b"{}"), Err(BodyError::NoRoom));
        assert_eq!(parse(br#"{"room":""}"#), Err(BodyError::NoRoom));
        assert_eq!(parse(br#"{"room":null}"#), Err(BodyError::NoRoom));
        assert_eq!(parse(br#"{"room":7}"#), Err(BodyError::WrongType("room")));
        assert_eq!(
            parse(br#"{"room":"!a","room_id":"!b"}"#),
            Err(BodyError::AmbiguousRoom)
        );
        assert_eq!(
            parse(br#"{"room_id":"!a","member":[]}"#),
            Err(BodyError::WrongType("member"))
        );
    }

    #[test]
    fn hostile_room_ids_are_kept_verbatim() {
        let r = parse(br#"{"room":"!a/../b?c#d%2F"}"#).unwrap();
        assert_eq!(r.room, "!a/../b?c#d%2F");
    }

    #[test]
    fn lenient_reader_matches_keys_under_any_go_folding() {
        // Go 1.26 calls "room_İd" an unknown field; releases folding with
        // ToUpper(ToLower(r)) read it as room_id. The lenient reader must not miss it.
        let r = parse("{\"room_\u{130}d\":\"!r\"}".as_bytes()).unwrap();
        assert_eq!(r.room, "!r");
        assert_eq!(r.shape, Shape::New);
    }
}
