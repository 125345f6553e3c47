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
//! Two readers follow those rules:
//!
//! - [`parse_at`] is as strict as lk-jwt-service: it yields a request exactly when the
//!   service would go on to check the OpenID token, and then the same room, slot, device and
//!   member. `make test-oracle` compares it with Go's `encoding/json` on thousands of bodies.
//! - [`parse`] is lenient: it reads the room of either shape on either path and ignores what
//!   it does not need. A body that it reads but the service refuses never yields a token.
//!
//! Go's rules applied here (see [`crate::gojson`]): case-insensitive keys, the last of
//! duplicate keys wins, `null` leaves a field unchanged, a repeated nested object merges
//! into the fields already read, only the first JSON value of the body is read. The strict
//! reader adds Go's type checks: a string field takes only a string, an `int` field only an
//! integer literal within 64 bits (not `"1"`, `1.0`, `1e2` or `1.5`), an object field only
//! an object, and a key that names no field (at any level) refuses the body.

use crate::gojson::{self, key_matches, key_may_match, Value};

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
    /// `device_id` (legacy shape).
    pub device_id: String,
    /// `member.id` (new shape).
    pub member_id: String,
    /// `member.claimed_user_id` (new shape); lk-jwt-service issues a token only when the
    /// OpenID check proves this claim.
    pub claimed_user_id: String,
    /// `member.claimed_device_id` (new shape).
    pub claimed_device_id: String,
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
    /// A key that names no field of the body shape (Go: `json: unknown field`); the key as
    /// read, cut to [`MAX_KEY_IN_ERROR`] characters.
    UnknownField(String),
    /// A field the service requires is missing or empty (lk-jwt-service: `M_BAD_JSON`).
    MissingField(&'static str),
}

/// How much of an unknown key a [`BodyError::UnknownField`] keeps.
pub const MAX_KEY_IN_ERROR: usize = 64;

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
            BodyError::UnknownField(key) => write!(f, "request body has an unknown field {key:?}"),
            BodyError::MissingField(field) => {
                write!(f, "request field `{field}` is missing or empty")
            }
        }
    }
}

/// Reads a token request body leniently: the room of either shape on either path, and the
/// slot, device and member fields the guard uses; other keys are ignored, and keys are
/// matched under the case folding of any Go release ([`key_may_match`]), so no key the
/// service reads is missed. See [`parse_at`] for lk-jwt-service's own strictness.
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

fn read_member(request: &mut TokenRequest, value: &Value) -> Result<(), BodyError> {
    let members = match value {
        Value::Null => return Ok(()),
        Value::Object(members) => members,
        _ => return Err(BodyError::WrongType("member")),
    };
    for (key, value) in members {
        if key_may_match(key, "id") {
            assign_string(&mut request.member_id, value, "member.id")?;
        } else if key_may_match(key, "claimed_user_id") {
            assign_string(
                &mut request.claimed_user_id,
                value,
                "member.claimed_user_id",
            )?;
        } else if key_may_match(key, "claimed_device_id") {
            assign_string(
                &mut request.claimed_device_id,
                value,
                "member.claimed_device_id",
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

fn assign_string(slot: &mut String, value: &Value, field: &'static str) -> Result<(), BodyError> {
    match value {
        Value::String(s) => {
            slot.clone_from(s);
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(BodyError::WrongType(field)),
    }
}

/// The lk-jwt-service endpoint a token request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/sfu/get`: the legacy shape, else the new shape (lk-jwt-service 0.4.0 up to 0.5.0).
    SfuGet,
    /// `/get_token`: the new shape only.
    GetToken,
}

impl Endpoint {
    /// The endpoint's path.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::SfuGet => "/sfu/get",
            Endpoint::GetToken => "/get_token",
        }
    }
}

/// Reads a token request body exactly as lk-jwt-service 0.5.0 reads it at `endpoint`, and
/// refuses it whenever the service would (400 `M_NOT_JSON` or `M_BAD_JSON`).
///
/// Required, as non-empty strings: legacy shape: `room`, `openid_token.access_token`,
/// `openid_token.matrix_server_name`, `device_id`; new shape: `room_id`, `slot_id`,
/// `openid_token.access_token`, `openid_token.matrix_server_name`, `member.id`,
/// `member.claimed_user_id`, `member.claimed_device_id`. `token_type`, `expires_in` and the
/// `delay_*` fields are optional and only type-checked.
///
/// On `/sfu/get` a body that decodes as the legacy shape is judged as such (no second try
/// when a required field is missing: such a body holds no new-shape key, so the new shape
/// would miss `room_id` too). When both decodings fail, the error reported is that of the
/// shape the body seems meant as.
pub fn parse_at(endpoint: Endpoint, body: &[u8]) -> Result<TokenRequest, BodyError> {
    let value = gojson::parse_first_value(body).map_err(BodyError::NotJson)?;
    match endpoint {
        Endpoint::GetToken => decode_top::<NewBody>(&value)?.into_request(),
        Endpoint::SfuGet => match decode_top::<LegacyBody>(&value) {
            Ok(legacy) => legacy.into_request(),
            Err(legacy_error) => match decode_top::<NewBody>(&value) {
                Ok(new) => new.into_request(),
                Err(new_error) => Err(telling_error(legacy_error, new_error)),
            },
        },
    }
}

/// Of the errors of both decodings of a `/sfu/get` body, the one that tells most: that of
/// the shape the body seems meant as. A decoding that stopped at a key of the other shape
/// tells little; a body naming the room both ways is [`BodyError::AmbiguousRoom`].
fn telling_error(legacy_error: BodyError, new_error: BodyError) -> BodyError {
    let has_room_id = is_unknown(&legacy_error, "room_id");
    let has_room = is_unknown(&new_error, "room");
    match (&legacy_error, &new_error) {
        _ if has_room_id && has_room => BodyError::AmbiguousRoom,
        _ if has_room_id => new_error,
        _ if has_room => legacy_error,
        (BodyError::UnknownField(_), _) => new_error,
        _ => legacy_error,
    }
}

fn is_unknown(error: &BodyError, field: &str) -> bool {
    matches!(error, BodyError::UnknownField(key) if key_matches(key, field))
}

/// `openid_token`, in both shapes.
#[derive(Debug, Default)]
struct OpenIdToken {
    access_token: String,
    token_type: String,
    matrix_server_name: String,
    expires_in: i64,
}

/// `member`, in the new shape.
#[derive(Debug, Default)]
struct Member {
    id: String,
    claimed_user_id: String,
    claimed_device_id: String,
}

/// The optional delayed-leave fields, in both shapes.
#[derive(Debug, Default)]
struct Delay {
    id: String,
    timeout: i64,
    cs_api_url: String,
}

/// `{"room", "openid_token", "device_id", "delay_*"}`
#[derive(Debug, Default)]
struct LegacyBody {
    room: String,
    openid_token: OpenIdToken,
    device_id: String,
    delay: Delay,
}

/// `{"room_id", "slot_id", "openid_token", "member", "delay_*"}`
#[derive(Debug, Default)]
struct NewBody {
    room_id: String,
    slot_id: String,
    openid_token: OpenIdToken,
    member: Member,
    delay: Delay,
}

/// Where the value of a key goes, and how Go checks its type there.
enum Target<'a> {
    /// A Go `string`.
    Str(&'a mut String),
    /// A Go `int` (64 bits on the platforms lk-jwt-service is built for).
    Int(&'a mut i64),
    OpenIdToken(&'a mut OpenIdToken),
    Member(&'a mut Member),
}

/// A Go struct: which field, if any, a JSON key selects ([`key_matches`]: an exact match,
/// else Go's case folding; no two fields of these structs fold alike).
trait GoStruct {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)>;
}

impl GoStruct for OpenIdToken {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)> {
        Some(if key_matches(key, "access_token") {
            (
                "openid_token.access_token",
                Target::Str(&mut self.access_token),
            )
        } else if key_matches(key, "token_type") {
            ("openid_token.token_type", Target::Str(&mut self.token_type))
        } else if key_matches(key, "matrix_server_name") {
            (
                "openid_token.matrix_server_name",
                Target::Str(&mut self.matrix_server_name),
            )
        } else if key_matches(key, "expires_in") {
            ("openid_token.expires_in", Target::Int(&mut self.expires_in))
        } else {
            return None;
        })
    }
}

impl GoStruct for Member {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)> {
        Some(if key_matches(key, "id") {
            ("member.id", Target::Str(&mut self.id))
        } else if key_matches(key, "claimed_user_id") {
            (
                "member.claimed_user_id",
                Target::Str(&mut self.claimed_user_id),
            )
        } else if key_matches(key, "claimed_device_id") {
            (
                "member.claimed_device_id",
                Target::Str(&mut self.claimed_device_id),
            )
        } else {
            return None;
        })
    }
}

impl Delay {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)> {
        Some(if key_matches(key, "delay_id") {
            ("delay_id", Target::Str(&mut self.id))
        } else if key_matches(key, "delay_timeout") {
            ("delay_timeout", Target::Int(&mut self.timeout))
        } else if key_matches(key, "delay_cs_api_url") {
            ("delay_cs_api_url", Target::Str(&mut self.cs_api_url))
        } else {
            return None;
        })
    }
}

impl GoStruct for LegacyBody {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)> {
        Some(if key_matches(key, "room") {
            ("room", Target::Str(&mut self.room))
        } else if key_matches(key, "openid_token") {
            ("openid_token", Target::OpenIdToken(&mut self.openid_token))
        } else if key_matches(key, "device_id") {
            ("device_id", Target::Str(&mut self.device_id))
        } else {
            return self.delay.field(key);
        })
    }
}

impl GoStruct for NewBody {
    fn field(&mut self, key: &str) -> Option<(&'static str, Target<'_>)> {
        Some(if key_matches(key, "room_id") {
            ("room_id", Target::Str(&mut self.room_id))
        } else if key_matches(key, "slot_id") {
            ("slot_id", Target::Str(&mut self.slot_id))
        } else if key_matches(key, "openid_token") {
            ("openid_token", Target::OpenIdToken(&mut self.openid_token))
        } else if key_matches(key, "member") {
            ("member", Target::Member(&mut self.member))
        } else {
            return self.delay.field(key);
        })
    }
}

/// `Decode` into a fresh body struct: an object or `null` (which sets nothing); any other
/// JSON value is a type error.
fn decode_top<S: GoStruct + Default>(value: &Value) -> Result<S, BodyError> {
    if !matches!(value, Value::Object(_) | Value::Null) {
        return Err(BodyError::NotAnObject);
    }
    let mut body = S::default();
    decode_into(&mut body, value, "")?;
    Ok(body)
}

/// Go's decoding of a JSON value into a struct: `null` changes nothing, an object sets the
/// fields its keys select (in order, so the last duplicate wins and a repeated nested object
/// merges), anything else is a type error. Go goes on after the first error to report it at
/// the end; the outcome is the same refusal.
fn decode_into<S: GoStruct>(
    target: &mut S,
    value: &Value,
    name: &'static str,
) -> Result<(), BodyError> {
    let members = match value {
        Value::Null => return Ok(()),
        Value::Object(members) => members,
        _ => return Err(BodyError::WrongType(name)),
    };
    for (key, value) in members {
        let Some((field, slot)) = target.field(key) else {
            return Err(BodyError::UnknownField(
                key.chars().take(MAX_KEY_IN_ERROR).collect(),
            ));
        };
        match slot {
            Target::Str(slot) => assign_string(slot, value, field)?,
            Target::Int(slot) => assign_int(slot, value, field)?,
            Target::OpenIdToken(token) => decode_into(token, value, field)?,
            Target::Member(member) => decode_into(member, value, field)?,
        }
    }
    Ok(())
}

/// Go's decoding into an `int` field: `strconv.ParseInt(literal, 10, 64)`, so only an
/// integer literal within 64 bits (`-0` is 0); a fraction or exponent (even `1.0`, `1e2`),
/// an out-of-range number or a non-number is a type error; `null` changes nothing.
fn assign_int(slot: &mut i64, value: &Value, field: &'static str) -> Result<(), BodyError> {
    match value {
        Value::Number(text) => {
            *slot = text.parse().map_err(|_| BodyError::WrongType(field))?;
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(BodyError::WrongType(field)),
    }
}

fn require(value: &str, field: &'static str) -> Result<(), BodyError> {
    if value.is_empty() {
        Err(BodyError::MissingField(field))
    } else {
        Ok(())
    }
}

impl OpenIdToken {
    fn check(&self) -> Result<(), BodyError> {
        require(&self.access_token, "openid_token.access_token")?;
        require(&self.matrix_server_name, "openid_token.matrix_server_name")
    }
}

impl LegacyBody {
    fn into_request(self) -> Result<TokenRequest, BodyError> {
        if self.room.is_empty() {
            return Err(BodyError::NoRoom);
        }
        self.openid_token.check()?;
        require(&self.device_id, "device_id")?;
        Ok(TokenRequest {
            room: self.room,
            shape: Shape::Legacy,
            device_id: self.device_id,
            ..TokenRequest::default()
        })
    }
}

impl NewBody {
    fn into_request(self) -> Result<TokenRequest, BodyError> {
        if self.room_id.is_empty() {
            return Err(BodyError::NoRoom);
        }
        require(&self.slot_id, "slot_id")?;
        self.openid_token.check()?;
        require(&self.member.id, "member.id")?;
        require(&self.member.claimed_user_id, "member.claimed_user_id")?;
        require(&self.member.claimed_device_id, "member.claimed_device_id")?;
        Ok(TokenRequest {
            room: self.room_id,
            shape: Shape::New,
            slot_id: self.slot_id,
            member_id: self.member.id,
            claimed_user_id: self.member.claimed_user_id,
            claimed_device_id: self.member.claimed_device_id,
            ..TokenRequest::default()
        })
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
        assert_eq!(r.member_id, "mem");
        assert_eq!(r.claimed_user_id, "@alice:example.com");
        assert_eq!(r.claimed_device_id, "DEV");
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
        assert_eq!(r.member_id, "m");
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

    // lk-jwt-service's own strictness: `parse_at`.

    use Endpoint::{GetToken, SfuGet};

    const MEMBER: &str =
        r#""member":{"id":"mem","claimed_user_id":"@alice:example.com","claimed_device_id":"DEV"}"#;

    /// `NEW` or `LEGACY` with `from` replaced by `to` (which must occur once).
    fn edit(body: &str, from: &str, to: &str) -> Vec<u8> {
        assert_eq!(body.matches(from).count(), 1, "{from}");
        body.replacen(from, to, 1).into_bytes()
    }

    #[test]
    fn strict_reads_each_shape_where_lk_jwt_service_takes_it() {
        let r = parse_at(SfuGet, LEGACY.as_bytes()).unwrap();
        assert_eq!(
            r,
            TokenRequest {
                room: "!abc:example.com".into(),
                shape: Shape::Legacy,
                device_id: "DEV".into(),
                ..TokenRequest::default()
            }
        );
        assert_eq!(r.slot(), LEGACY_SLOT);
        let expected = TokenRequest {
            room: "!abc".into(),
            shape: Shape::New,
            slot_id: "m.call#ROOM".into(),
            member_id: "mem".into(),
            claimed_user_id: "@alice:example.com".into(),
            claimed_device_id: "DEV".into(),
            ..TokenRequest::default()
        };
        // /sfu/get falls back to the new shape (lk-jwt-service 0.4.0 up to 0.5.0).
        assert_eq!(parse_at(SfuGet, NEW.as_bytes()), Ok(expected.clone()));
        assert_eq!(parse_at(GetToken, NEW.as_bytes()), Ok(expected));
        // /get_token never takes the legacy shape.
        assert_eq!(
            parse_at(GetToken, LEGACY.as_bytes()),
            Err(BodyError::UnknownField("room".into()))
        );
    }

    #[test]
    fn strict_refuses_unknown_fields_at_every_level() {
        for (body, key) in [
            (
                edit(LEGACY, r#""device_id""#, r#""extra":null,"device_id""#),
                "extra",
            ),
            (
                edit(LEGACY, r#""token_type""#, r#""scope":"x","token_type""#),
                "scope",
            ),
            (
                edit(NEW, r#""id":"mem""#, r#""id":"mem","user_id":"@a:x""#),
                "user_id",
            ),
            (
                edit(NEW, r#""slot_id""#, r#""device_id":"D","slot_id""#),
                "device_id",
            ),
        ] {
            assert_eq!(
                parse_at(SfuGet, &body),
                Err(BodyError::UnknownField(key.into()))
            );
            assert!(parse_at(GetToken, &body).is_err());
        }
        // Keys of both shapes: each decoding meets a key of the other one.
        let mixed = edit(LEGACY, r#""device_id""#, r#""room_id":"!b","device_id""#);
        assert_eq!(parse_at(SfuGet, &mixed), Err(BodyError::AmbiguousRoom));
        let mixed = edit(NEW, r#""slot_id""#, r#""device_id":"D","slot_id""#);
        assert_eq!(
            parse_at(SfuGet, &mixed),
            Err(BodyError::UnknownField("device_id".into()))
        );
        // Long keys are cut in the error.
        let long = "k".repeat(1000);
        let body = edit(
            LEGACY,
            r#""device_id""#,
            &format!(r#""{long}":1,"device_id""#),
        );
        assert_eq!(
            parse_at(GetToken, &body),
            Err(BodyError::UnknownField("room".into()))
        );
        let body = edit(NEW, r#""slot_id""#, &format!(r#""{long}":1,"slot_id""#));
        assert_eq!(
            parse_at(GetToken, &body),
            Err(BodyError::UnknownField("k".repeat(MAX_KEY_IN_ERROR)))
        );
    }

    #[test]
    fn strict_matches_keys_with_go_simple_folding() {
        // 'ſ' folds onto 's' and the Kelvin sign onto 'k', at every level.
        let body = edit(NEW, r#""slot_id""#, "\"\u{17f}LOT_ID\"");
        assert_eq!(parse_at(GetToken, &body).unwrap().slot(), "m.call#ROOM");
        let body = edit(
            NEW,
            r#""access_token""#,
            "\"ACCE\u{17f}\u{17f}_TO\u{212a}EN\"",
        );
        assert!(parse_at(GetToken, &body).is_ok());
        let body = edit(NEW, r#""id":"mem""#, r#""\u0049D":"mem""#);
        assert_eq!(parse_at(GetToken, &body).unwrap().member_id, "mem");
        // 'İ' and 'ı' do not fold onto 'i' (Go 1.26, like Go 1.20 and earlier).
        for dotted in ["\u{130}D", "\u{131}d", r"\u0130d"] {
            let body = edit(NEW, r#""id":"mem""#, &format!(r#""{dotted}":"mem""#));
            assert!(
                matches!(parse_at(GetToken, &body), Err(BodyError::UnknownField(_))),
                "{dotted}"
            );
        }
    }

    #[test]
    fn strict_type_checks_like_go() {
        for (body, field) in [
            (edit(LEGACY, r#""!abc:example.com""#, "7"), "room"),
            (edit(LEGACY, r#""DEV""#, "[]"), "device_id"),
            (
                edit(LEGACY, r#""Bearer""#, "true"),
                "openid_token.token_type",
            ),
            (edit(NEW, r#""mem""#, "{}"), "member.id"),
            (edit(NEW, MEMBER, r#""member":[{"id":"mem"}]"#), "member"),
            (edit(NEW, MEMBER, r#""member":"mem""#), "member"),
            (edit(NEW, MEMBER, r#""member":false"#), "member"),
        ] {
            assert_eq!(parse_at(SfuGet, &body), Err(BodyError::WrongType(field)));
        }
        let body = edit(LEGACY, r#""openid_token":{"#, r#""openid_token":1,"x":{"#);
        assert_eq!(
            parse_at(SfuGet, &body),
            Err(BodyError::WrongType("openid_token"))
        );
    }

    #[test]
    fn strict_int_fields_take_only_64_bit_integer_literals() {
        for good in [
            "0",
            "-0",
            "-1",
            "7200",
            "9223372036854775807",
            "-9223372036854775808",
            "null",
        ] {
            let body = edit(LEGACY, "3600", good);
            assert!(parse_at(SfuGet, &body).is_ok(), "{good}");
            let body = edit(
                NEW,
                r#""slot_id""#,
                &format!(r#""delay_timeout":{good},"slot_id""#),
            );
            assert!(parse_at(GetToken, &body).is_ok(), "{good}");
        }
        for bad in [
            "1.0",
            "1.5",
            "1e2",
            "36E2",
            "0.0",
            "9223372036854775808",
            "-9223372036854775809",
            "1e400",
            r#""3600""#,
            "true",
            "[]",
            "{}",
        ] {
            let body = edit(LEGACY, "3600", bad);
            assert_eq!(
                parse_at(SfuGet, &body),
                Err(BodyError::WrongType("openid_token.expires_in")),
                "{bad}"
            );
            let body = edit(
                NEW,
                r#""slot_id""#,
                &format!(r#""delay_timeout":{bad},"slot_id""#),
            );
            assert_eq!(
                parse_at(GetToken, &body),
                Err(BodyError::WrongType("delay_timeout")),
                "{bad}"
            );
        }
    }

    #[test]
    fn strict_null_leaves_fields_and_duplicates_merge() {
        let body = edit(
            LEGACY,
            r#""device_id""#,
            r#""ROOM":null,"openid_token":null,"device_id""#,
        );
        assert_eq!(parse_at(SfuGet, &body).unwrap().room, "!abc:example.com");
        let merged = format!(r#"{MEMBER},"member":null,"Member":{{"ID":"m2"}}"#);
        let body = edit(NEW, MEMBER, &merged);
        assert_eq!(parse_at(GetToken, &body).unwrap().member_id, "m2");
        let body = edit(
            LEGACY,
            r#""device_id""#,
            r#""openid_token":{"access_token":""},"device_id""#,
        );
        assert_eq!(
            parse_at(SfuGet, &body),
            Err(BodyError::MissingField("openid_token.access_token"))
        );
        let body = edit(
            LEGACY,
            r#""device_id""#,
            r#""room":"!b","Room":null,"device_id""#,
        );
        assert_eq!(parse_at(SfuGet, &body).unwrap().room, "!b");
    }

    #[test]
    fn strict_requires_the_fields_lk_jwt_service_requires() {
        assert_eq!(parse_at(SfuGet, b"null"), Err(BodyError::NoRoom));
        assert_eq!(parse_at(GetToken, b"{}"), Err(BodyError::NoRoom));
        assert_eq!(
            parse_at(SfuGet, &edit(LEGACY, r#""!abc:example.com""#, r#""""#)),
            Err(BodyError::NoRoom)
        );
        for (from, field) in [
            (r#""DEV""#, "device_id"),
            (r#""example.com""#, "openid_token.matrix_server_name"),
            (r#""t""#, "openid_token.access_token"),
        ] {
            assert_eq!(
                parse_at(SfuGet, &edit(LEGACY, from, r#""""#)),
                Err(BodyError::MissingField(field))
            );
        }
        // token_type and expires_in are optional.
        let body = edit(LEGACY, r#","token_type":"Bearer""#, "");
        assert!(parse_at(
            SfuGet,
            &edit(
                std::str::from_utf8(&body).unwrap(),
                r#","expires_in":3600"#,
                ""
            )
        )
        .is_ok());
        for (from, field) in [
            (r#""m.call#ROOM""#, "slot_id"),
            (r#""mem""#, "member.id"),
            (r#""@alice:example.com""#, "member.claimed_user_id"),
            (r#""DEV""#, "member.claimed_device_id"),
            (r#""t""#, "openid_token.access_token"),
        ] {
            assert_eq!(
                parse_at(GetToken, &edit(NEW, from, "null")),
                Err(BodyError::MissingField(field))
            );
        }
    }

    #[test]
    fn strict_reads_the_first_value_only_and_refuses_non_objects() {
        let body = format!("{LEGACY} trailing {{\"room\":\"!other\"}}");
        assert_eq!(
            parse_at(SfuGet, body.as_bytes()).unwrap().room,
            "!abc:example.com"
        );
        let body = format!("\u{feff}{LEGACY}");
        assert!(matches!(
            parse_at(SfuGet, body.as_bytes()),
            Err(BodyError::NotJson(_))
        ));
        for body in [&b"[]"[..], b"\"x\"", b"1", b"true"] {
            assert_eq!(parse_at(SfuGet, body), Err(BodyError::NotAnObject));
        }
        assert!(matches!(
            parse_at(GetToken, b""),
            Err(BodyError::NotJson(_))
        ));
    }

    #[test]
    fn strict_decodes_strings_like_go() {
        let (before, after) = LEGACY.split_once("!abc:example.com").unwrap();
        let room = b"!\\ud800\\u0041\xff\\ud83d\\ude00";
        let body = [before.as_bytes(), room, after.as_bytes()].concat();
        let r = parse_at(SfuGet, &body).unwrap();
        assert_eq!(r.room, "!\u{FFFD}A\u{FFFD}\u{1F600}");
    }

    #[test]
    fn no_input_makes_the_readers_panic() {
        // Every truncation and every single-byte change of both shapes.
        let specials = [
            0u8, b'"', b'\\', b'{', b'}', b'[', b':', b',', b'n', b'1', b'-', 0x80, 0xc4, 0xff,
        ];
        for base in [LEGACY.as_bytes(), NEW.as_bytes()] {
            for cut in 0..=base.len() {
                let _ = parse_at(SfuGet, &base[..cut]);
                let _ = parse(&base[..cut]);
            }
            for i in 0..base.len() {
                for &b in &specials {
                    let mut body = base.to_vec();
                    body[i] = b;
                    let _ = parse_at(SfuGet, &body);
                    let _ = parse_at(GetToken, &body);
                    let _ = parse(&body);
                }
            }
        }
    }

    #[test]
    fn endpoints_and_messages() {
        assert_eq!(GetToken.path(), "/get_token");
        assert_eq!(
            BodyError::UnknownField("x".into()).to_string(),
            "request body has an unknown field \"x\""
        );
        assert_eq!(
            BodyError::MissingField("slot_id").to_string(),
            "request field `slot_id` is missing or empty"
        );
        assert_eq!(
            BodyError::WrongType("openid_token.expires_in").to_string(),
            "request field `openid_token.expires_in` has the wrong JSON type"
        );
    }
}
