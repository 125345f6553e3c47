//! A token body reader exactly as strict as lk-jwt-service 0.5.0: the test-side model of the
//! service that the filter's lenient reader ([`token_request::parse`]) is checked against.
//!
//! lk-jwt-service decodes a body with Go's `json.Decoder`, `DisallowUnknownFields()` and
//! `Decode` into the struct of a body shape, then checks that the required fields are set.
//! [`parse_at`] follows those rules: it yields a request exactly when the service would go
//! on to check the OpenID token, and then the same room, slot, device and member. On top of
//! the rules the lenient reader shares ([`gojson`]), it applies Go's type checks: a string
//! field takes only a string, an `int` field only an integer literal within 64 bits (not
//! `"1"`, `1.0`, `1e2` or `1.5`), an object field only an object, and a key that names no
//! field (at any level) refuses the body.
//!
//! `tests/differential.rs` compares it with Go's `encoding/json` (`tests/oracle`) body by
//! body; the `token_body` fuzz target requires the lenient reader to read what it accepts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use voice_limit_guard::request::gojson::{self, key_matches, Value};
use voice_limit_guard::request::secret::Secret;
use voice_limit_guard::request::token_request::{
    assign_string, BodyError, OpenId, Shape, TokenRequest, LEGACY_SLOT,
};

/// What lk-jwt-service reads from a body it accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrictRequest {
    pub room: String,
    pub shape: Shape,
    /// `slot_id` (new shape); the legacy shape always uses [`LEGACY_SLOT`].
    pub slot_id: String,
    /// `device_id` (legacy shape).
    pub device_id: String,
    /// `member.id` (new shape).
    pub member_id: String,
    /// `member.claimed_user_id` (new shape).
    pub claimed_user_id: String,
    /// `member.claimed_device_id` (new shape).
    pub claimed_device_id: String,
    /// `openid_token.access_token` and `.matrix_server_name` (both shapes).
    pub access_token: String,
    pub matrix_server_name: String,
}

impl StrictRequest {
    /// The slot lk-jwt-service hashes into the LiveKit room alias.
    pub fn slot(&self) -> &str {
        match self.shape {
            Shape::Legacy => LEGACY_SLOT,
            Shape::New => &self.slot_id,
        }
    }

    /// What the filter's reader must read from the same body: the fields the guard uses.
    pub fn as_read_by_filter(&self) -> TokenRequest {
        TokenRequest {
            room: self.room.clone(),
            shape: self.shape,
            slot_id: self.slot_id.clone(),
            device_id: self.device_id.clone(),
            claimed_user_id: self.claimed_user_id.clone(),
            claimed_device_id: self.claimed_device_id.clone(),
            member_id: self.member_id.clone(),
            openid: OpenId {
                access_token: Secret::new(self.access_token.clone()),
                matrix_server_name: self.matrix_server_name.clone(),
            },
        }
    }
}

/// Why lk-jwt-service refuses a body (400 `M_NOT_JSON` or `M_BAD_JSON`): what the filter's
/// reader also refuses, or a strictness of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrictError {
    Body(BodyError),
    /// A key that names no field of the body shape (Go: `json: unknown field`); the key as
    /// read, cut to [`MAX_KEY_IN_ERROR`] characters.
    UnknownField(String),
    /// A field the service requires is missing or empty (lk-jwt-service: `M_BAD_JSON`).
    MissingField(&'static str),
}

/// How much of an unknown key a [`StrictError::UnknownField`] keeps.
pub const MAX_KEY_IN_ERROR: usize = 64;

impl From<BodyError> for StrictError {
    fn from(error: BodyError) -> Self {
        StrictError::Body(error)
    }
}

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StrictError::Body(error) => error.fmt(f),
            StrictError::UnknownField(key) => {
                write!(f, "request body has an unknown field {key:?}")
            }
            StrictError::MissingField(field) => {
                write!(f, "request field `{field}` is missing or empty")
            }
        }
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
pub fn parse_at(endpoint: Endpoint, body: &[u8]) -> Result<StrictRequest, StrictError> {
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
fn telling_error(legacy_error: StrictError, new_error: StrictError) -> StrictError {
    let has_room_id = is_unknown(&legacy_error, "room_id");
    let has_room = is_unknown(&new_error, "room");
    match (&legacy_error, &new_error) {
        _ if has_room_id && has_room => BodyError::AmbiguousRoom.into(),
        _ if has_room_id => new_error,
        _ if has_room => legacy_error,
        (StrictError::UnknownField(_), _) => new_error,
        _ => legacy_error,
    }
}

fn is_unknown(error: &StrictError, field: &str) -> bool {
    matches!(error, StrictError::UnknownField(key) if key_matches(key, field))
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
fn decode_top<S: GoStruct + Default>(value: &Value) -> Result<S, StrictError> {
    if !matches!(value, Value::Object(_) | Value::Null) {
        return Err(BodyError::NotAnObject.into());
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
) -> Result<(), StrictError> {
    let members = match value {
        Value::Null => return Ok(()),
        Value::Object(members) => members,
        _ => return Err(BodyError::WrongType(name).into()),
    };
    for (key, value) in members {
        let Some((field, slot)) = target.field(key) else {
            return Err(StrictError::UnknownField(
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
fn assign_int(slot: &mut i64, value: &Value, field: &'static str) -> Result<(), StrictError> {
    match value {
        Value::Number(text) => {
            *slot = text.parse().map_err(|_| BodyError::WrongType(field))?;
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(BodyError::WrongType(field).into()),
    }
}

fn require(value: &str, field: &'static str) -> Result<(), StrictError> {
    if value.is_empty() {
        Err(StrictError::MissingField(field))
    } else {
        Ok(())
    }
}

impl OpenIdToken {
    fn check(&self) -> Result<(), StrictError> {
        require(&self.access_token, "openid_token.access_token")?;
        require(&self.matrix_server_name, "openid_token.matrix_server_name")
    }
}

impl LegacyBody {
    fn into_request(self) -> Result<StrictRequest, StrictError> {
        if self.room.is_empty() {
            return Err(BodyError::NoRoom.into());
        }
        self.openid_token.check()?;
        require(&self.device_id, "device_id")?;
        Ok(StrictRequest {
            room: self.room,
            shape: Shape::Legacy,
            device_id: self.device_id,
            access_token: self.openid_token.access_token,
            matrix_server_name: self.openid_token.matrix_server_name,
            ..StrictRequest::default()
        })
    }
}

impl NewBody {
    fn into_request(self) -> Result<StrictRequest, StrictError> {
        if self.room_id.is_empty() {
            return Err(BodyError::NoRoom.into());
        }
        require(&self.slot_id, "slot_id")?;
        self.openid_token.check()?;
        require(&self.member.id, "member.id")?;
        require(&self.member.claimed_user_id, "member.claimed_user_id")?;
        require(&self.member.claimed_device_id, "member.claimed_device_id")?;
        Ok(StrictRequest {
            room: self.room_id,
            shape: Shape::New,
            slot_id: self.slot_id,
            device_id: String::new(),
            member_id: self.member.id,
            claimed_user_id: self.member.claimed_user_id,
            claimed_device_id: self.member.claimed_device_id,
            access_token: self.openid_token.access_token,
            matrix_server_name: self.openid_token.matrix_server_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voice_limit_guard::request::token_request::parse;

    const LEGACY: &str = r#"{"room":"!abc:example.com","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"device_id":"DEV"}"#;
    const NEW: &str = r#"{"room_id":"!abc","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"member":{"id":"mem","claimed_user_id":"@alice:example.com","claimed_device_id":"DEV"}}"#;

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
            StrictRequest {
                room: "!abc:example.com".into(),
                shape: Shape::Legacy,
                device_id: "DEV".into(),
                access_token: "t".into(),
                matrix_server_name: "example.com".into(),
                ..StrictRequest::default()
            }
        );
        assert_eq!(r.slot(), LEGACY_SLOT);
        let expected = StrictRequest {
            room: "!abc".into(),
            shape: Shape::New,
            slot_id: "m.call#ROOM".into(),
            device_id: String::new(),
            member_id: "mem".into(),
            claimed_user_id: "@alice:example.com".into(),
            claimed_device_id: "DEV".into(),
            access_token: "t".into(),
            matrix_server_name: "example.com".into(),
        };
        // /sfu/get falls back to the new shape (lk-jwt-service 0.4.0 up to 0.5.0).
        assert_eq!(parse_at(SfuGet, NEW.as_bytes()), Ok(expected.clone()));
        assert_eq!(parse_at(GetToken, NEW.as_bytes()), Ok(expected));
        // /get_token never takes the legacy shape.
        assert_eq!(
            parse_at(GetToken, LEGACY.as_bytes()),
            Err(StrictError::UnknownField("room".into()))
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
                Err(StrictError::UnknownField(key.into()))
            );
            assert!(parse_at(GetToken, &body).is_err());
        }
        // Keys of both shapes: each decoding meets a key of the other one.
        let mixed = edit(LEGACY, r#""device_id""#, r#""room_id":"!b","device_id""#);
        assert_eq!(
            parse_at(SfuGet, &mixed),
            Err(BodyError::AmbiguousRoom.into())
        );
        let mixed = edit(NEW, r#""slot_id""#, r#""device_id":"D","slot_id""#);
        assert_eq!(
            parse_at(SfuGet, &mixed),
            Err(StrictError::UnknownField("device_id".into()))
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
            Err(StrictError::UnknownField("room".into()))
        );
        let body = edit(NEW, r#""slot_id""#, &format!(r#""{long}":1,"slot_id""#));
        assert_eq!(
            parse_at(GetToken, &body),
            Err(StrictError::UnknownField("k".repeat(MAX_KEY_IN_ERROR)))
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
                matches!(parse_at(GetToken, &body), Err(StrictError::UnknownField(_))),
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
            assert_eq!(
                parse_at(SfuGet, &body),
                Err(BodyError::WrongType(field).into())
            );
        }
        let body = edit(LEGACY, r#""openid_token":{"#, r#""openid_token":1,"x":{"#);
        assert_eq!(
            parse_at(SfuGet, &body),
            Err(BodyError::WrongType("openid_token").into())
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
                Err(BodyError::WrongType("openid_token.expires_in").into()),
                "{bad}"
            );
            let body = edit(
                NEW,
                r#""slot_id""#,
                &format!(r#""delay_timeout":{bad},"slot_id""#),
            );
            assert_eq!(
                parse_at(GetToken, &body),
                Err(BodyError::WrongType("delay_timeout").into()),
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
            Err(StrictError::MissingField("openid_token.access_token"))
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
        assert_eq!(parse_at(SfuGet, b"null"), Err(BodyError::NoRoom.into()));
        assert_eq!(parse_at(GetToken, b"{}"), Err(BodyError::NoRoom.into()));
        assert_eq!(
            parse_at(SfuGet, &edit(LEGACY, r#""!abc:example.com""#, r#""""#)),
            Err(BodyError::NoRoom.into())
        );
        for (from, field) in [
            (r#""DEV""#, "device_id"),
            (r#""example.com""#, "openid_token.matrix_server_name"),
            (r#""t""#, "openid_token.access_token"),
        ] {
            assert_eq!(
                parse_at(SfuGet, &edit(LEGACY, from, r#""""#)),
                Err(StrictError::MissingField(field))
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
                Err(StrictError::MissingField(field))
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
            Err(StrictError::Body(BodyError::NotJson(_)))
        ));
        for body in [&b"[]"[..], b"\"x\"", b"1", b"true"] {
            assert_eq!(parse_at(SfuGet, body), Err(BodyError::NotAnObject.into()));
        }
        assert!(matches!(
            parse_at(GetToken, b""),
            Err(StrictError::Body(BodyError::NotJson(_)))
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
            StrictError::UnknownField("x".into()).to_string(),
            "request body has an unknown field \"x\""
        );
        assert_eq!(
            StrictError::MissingField("slot_id").to_string(),
            "request field `slot_id` is missing or empty"
        );
        assert_eq!(
            BodyError::WrongType("openid_token.expires_in").to_string(),
            "request field `openid_token.expires_in` has the wrong JSON type"
        );
    }
}
