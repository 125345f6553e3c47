//! Who asks for which call on the MatrixRTC routes ([`crate::request::route`]), read from what Synapse
//! forwards: the headers it sets and the client's (or remote homeserver's) JSON body.
//!
//! - Client-server: body `{"room_id", "slot_id", "member_id", "url", "server_name"?}`; the
//!   requester is `X-Matrix-User-Identifier`, set by Synapse after authenticating the client
//!   (Synapse drops a client's own copy of that header).
//! - Federation: body `{"user_id", "url", "room_id", "slot_id", "member_id"}`; the remote
//!   homeserver is `X-Matrix-Origin`, set by Synapse after checking its signature, and the
//!   user must be one of its users.
//!
//! lk-jwt-service names the participant `b64(sha256(json [user_id, member_id]))` and the
//! LiveKit room `b64(sha256(json [room_id, slot_id]))`, so the guard knows both before the
//! token exists. Bodies are read as serde reads a struct: keys exactly as spelt, unknown keys
//! ignored, a duplicate key, a wrong type or trailing data make the body unreadable. The
//! member id is `member_id`, or `member.id` in the bodies of versions before 0.8.

use serde::de::{self, IgnoredAny, MapAccess};
use serde::{Deserialize, Deserializer};

use crate::request::json::{self, FromObject};
use crate::request::livekit_names::{hash_of_strings, room_alias};
use crate::request::route::Route;

/// The headers of a MatrixRTC request the guard reads (as received; `None` when absent or not
/// UTF-8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtcHeaders {
    pub authorization: Option<String>,
    pub user_identifier: Option<String>,
    pub origin: Option<String>,
}

/// What a readable MatrixRTC token request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A token for our SFU.
    Local(RtcRequest),
    /// A client-server request naming another homeserver in `server_name`: lk-jwt-service
    /// relays it there, and the token (if any) is for that server's SFU.
    Remote { server_name: String },
}

/// A token request for our SFU, with the names lk-jwt-service will give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcRequest {
    pub room: String,
    pub slot_id: String,
    /// The Matrix user asking, as Synapse vouched for it.
    pub user: String,
    /// The LiveKit room.
    pub alias: String,
    /// The participant identity of the token.
    pub identity: String,
}

/// Why a MatrixRTC request cannot be decided on. lk-jwt-service refuses each of these, so
/// none should ever get a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcError {
    /// Not a JSON object serde reads into the route's body.
    Body,
    /// A required body field is missing or empty.
    Missing(&'static str),
    /// `X-Matrix-User-Identifier` (client-server) or `X-Matrix-Origin` (federation) is missing.
    NoHeader(&'static str),
    /// The requester is not a Matrix user id.
    NotAUser,
    /// A federation request for a user of another server than the one asking.
    ForeignUser,
}

impl std::fmt::Display for RtcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RtcError::Body => f.write_str("request body is not the route's JSON object"),
            RtcError::Missing(field) => write!(f, "request body has no `{field}`"),
            RtcError::NoHeader(name) => write!(f, "request has no {name} header"),
            RtcError::NotAUser => f.write_str("the requester is not a Matrix user id"),
            RtcError::ForeignUser => {
                f.write_str("the federation request's user_id is not of the asking server")
            }
        }
    }
}

/// The fields of a MatrixRTC body the guard reads, as serde reads a struct: exact keys, unknown
/// keys skipped, a duplicate key or a wrong type an error.
#[derive(Default)]
struct Body {
    room_id: Option<String>,
    slot_id: Option<String>,
    member_id: Option<String>,
    /// `{"id"}` in the bodies of versions before 0.8.
    member: Option<Member>,
    /// Federation only.
    user_id: Option<String>,
    /// Client-server only.
    server_name: Option<String>,
}

#[derive(Default)]
struct Member {
    id: Option<String>,
}

impl FromObject for Body {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut body = Body::default();
        let mut seen = [false; 6];
        while let Some(key) = map.next_key::<String>()? {
            let field = match key.as_str() {
                "room_id" => 0,
                "slot_id" => 1,
                "member_id" => 2,
                "member" => 3,
                "user_id" => 4,
                "server_name" => 5,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if std::mem::replace(&mut seen[field], true) {
                return Err(de::Error::custom("duplicate field"));
            }
            match field {
                0 => body.room_id = map.next_value()?,
                1 => body.slot_id = map.next_value()?,
                2 => body.member_id = map.next_value()?,
                3 => body.member = map.next_value()?,
                4 => body.user_id = map.next_value()?,
                _ => body.server_name = map.next_value()?,
            }
        }
        Ok(body)
    }
}

impl FromObject for Member {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut member = Member::default();
        let mut seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "id" {
                if std::mem::replace(&mut seen, true) {
                    return Err(de::Error::custom("duplicate field"));
                }
                member.id = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(member)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        json::lenient(deserializer)
    }
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        json::lenient(deserializer)
    }
}

/// Reads a MatrixRTC token request of `route` (not [`Route::Legacy`]).
pub fn parse(route: Route, headers: &RtcHeaders, body: &[u8]) -> Result<Asked, RtcError> {
    let body: Body = json::object(body).ok_or(RtcError::Body)?;
    let required = |value: Option<String>, field| {
        value
            .filter(|v| !v.is_empty())
            .ok_or(RtcError::Missing(field))
    };
    let room = required(body.room_id, "room_id")?;
    let slot_id = required(body.slot_id, "slot_id")?;
    let member_id = required(
        body.member_id.or(body.member.and_then(|m| m.id)),
        "member_id",
    )?;
    let user = match route {
        Route::Federation => {
            let origin = headers
                .origin
                .as_deref()
                .ok_or(RtcError::NoHeader("X-Matrix-Origin"))?;
            let user = required(body.user_id, "user_id")?;
            if server_of(&user).ok_or(RtcError::NotAUser)? != origin {
                return Err(RtcError::ForeignUser);
            }
            user
        }
        _ => {
            let user = headers
                .user_identifier
                .clone()
                .ok_or(RtcError::NoHeader("X-Matrix-User-Identifier"))?;
            let ours = server_of(&user).ok_or(RtcError::NotAUser)?;
            if let Some(server_name) = body.server_name.filter(|s| !s.is_empty()) {
                if !same_server(&server_name, ours) {
                    return Ok(Asked::Remote { server_name });
                }
            }
            user
        }
    };
    Ok(Asked::Local(RtcRequest {
        alias: room_alias(&room, &slot_id),
        identity: hash_of_strings(&[&user, &member_id]),
        room,
        slot_id,
        user,
    }))
}

/// The server name of a Matrix user id `@localpart:server` (which may hold a port).
pub fn server_of(user: &str) -> Option<&str> {
    let (localpart, server) = user.strip_prefix('@')?.split_once(':')?;
    let plausible = !localpart.is_empty()
        && !server.is_empty()
        && user.len() <= 255
        && !user.chars().any(|c| c.is_control() || c.is_whitespace());
    plausible.then_some(server)
}

/// Whether `server_name` may name our own server, whose users are `ours`: compared without
/// regard to ASCII case or a trailing dot, so that no spelling lk-jwt-service might take for
/// its own server passes as another's unchecked.
pub fn same_server(server_name: &str, ours: &str) -> bool {
    let plain = |s: &str| s.trim().trim_end_matches('.').to_ascii_lowercase();
    plain(server_name) == plain(ours)
}

/// Whether `authorization` is `Bearer <token>` with the expected token, compared in constant
/// time (the scheme without regard to case).
pub fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let Some((scheme, given)) = authorization.and_then(|a| a.split_once(' ')) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    let mut difference = given.len() ^ token.len();
    for (i, expected) in token.iter().enumerate() {
        difference |= usize::from(given.get(i).copied().unwrap_or(0) ^ expected);
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn client(user: &str) -> RtcHeaders {
        RtcHeaders {
            user_identifier: Some(user.to_owned()),
            ..RtcHeaders::default()
        }
    }

    fn local(asked: Result<Asked, RtcError>) -> RtcRequest {
        match asked {
            Ok(Asked::Local(request)) => request,
            other => panic!("not a local request: {other:?}"),
        }
    }

    const BODY: &str =
        r#"{"room_id":"!r:example.com","slot_id":"m.call#ROOM","member_id":"m1","url":"wss://x"}"#;

    #[test]
    fn a_client_request_names_the_header_user_and_lk_jwt_service_names() {
        let request = local(parse(
            Route::Client,
            &client("@a:example.com"),
            BODY.as_bytes(),
        ));
        assert_eq!(request.user, "@a:example.com");
        assert_eq!(request.room, "!r:example.com");
        assert_eq!(request.alias, room_alias("!r:example.com", "m.call#ROOM"));
        assert_eq!(request.identity, hash_of_strings(&["@a:example.com", "m1"]));
    }

    #[test]
    fn the_identity_is_the_documented_hash() {
        // b64std_nopad(sha256('["@alice:example.com","memberABC"]'))
        use base64::Engine;
        use sha2::Digest;
        let expected = base64::engine::general_purpose::STANDARD_NO_PAD.encode(
            sha2::Sha256::digest(br#"["@alice:example.com","memberABC"]"#),
        );
        let body = r#"{"room_id":"!r","slot_id":"s","member_id":"memberABC","url":"u"}"#;
        let request = local(parse(
            Route::Client,
            &client("@alice:example.com"),
            body.as_bytes(),
        ));
        assert_eq!(request.identity, expected);
    }

    #[test]
    fn the_member_object_of_older_versions_is_read() {
        let body = r#"{"room_id":"!r","slot_id":"s","member":{"id":"m2"},"url":"u"}"#;
        let request = local(parse(Route::Client, &client("@a:x"), body.as_bytes()));
        assert_eq!(request.identity, hash_of_strings(&["@a:x", "m2"]));
    }

    #[test]
    fn a_federation_request_names_the_body_user_of_the_origin() {
        let headers = RtcHeaders {
            origin: Some("remote.example:8448".to_owned()),
            ..RtcHeaders::default()
        };
        let body = |user: &str| {
            format!(
                r#"{{"user_id":"{user}","room_id":"!r","slot_id":"s","member_id":"m","url":"u"}}"#
            )
        };
        let request = local(parse(
            Route::Federation,
            &headers,
            body("@b:remote.example:8448").as_bytes(),
        ));
        assert_eq!(request.user, "@b:remote.example:8448");
        assert_eq!(
            parse(
                Route::Federation,
                &headers,
                body("@b:other.example").as_bytes()
            ),
            Err(RtcError::ForeignUser)
        );
        assert_eq!(
            parse(
                Route::Federation,
                &RtcHeaders::default(),
                body("@b:x").as_bytes()
            ),
            Err(RtcError::NoHeader("X-Matrix-Origin"))
        );
        // A client-server header on a federation request is not the requester.
        assert_eq!(
            parse(Route::Federation, &client("@b:x"), body("@b:x").as_bytes()),
            Err(RtcError::NoHeader("X-Matrix-Origin"))
        );
    }

    #[test]
    fn another_servers_name_is_a_remote_request_and_ours_in_any_case_is_local() {
        let with = |server: &str| {
            format!(
                r#"{{"room_id":"!r","slot_id":"s","member_id":"m","url":"u","server_name":"{server}"}}"#
            )
        };
        let user = client("@a:example.com");
        assert_eq!(
            parse(Route::Client, &user, with("other.org").as_bytes()),
            Ok(Asked::Remote {
                server_name: "other.org".to_owned()
            })
        );
        for ours in ["example.com", "EXAMPLE.com", "example.com.", ""] {
            local(parse(Route::Client, &user, with(ours).as_bytes()));
        }
    }

    #[test]
    fn unreadable_requests_say_why() {
        let user = client("@a:x");
        for (body, error) in [
            ("", RtcError::Body),
            ("[]", RtcError::Body),
            (r#"{"room_id":1}"#, RtcError::Body),
            (
                r#"{"room_id":"!a","room_id":"!b","slot_id":"s","member_id":"m"}"#,
                RtcError::Body,
            ),
            (
                r#"{"room_id":"!a","slot_id":"s","member_id":"m"} x"#,
                RtcError::Body,
            ),
            (
                r#"{"slot_id":"s","member_id":"m"}"#,
                RtcError::Missing("room_id"),
            ),
            (
                r#"{"room_id":"","slot_id":"s","member_id":"m"}"#,
                RtcError::Missing("room_id"),
            ),
            (
                r#"{"room_id":"!a","member_id":"m"}"#,
                RtcError::Missing("slot_id"),
            ),
            (
                r#"{"room_id":"!a","slot_id":"s"}"#,
                RtcError::Missing("member_id"),
            ),
            (
                r#"{"Room_Id":"!a","slot_id":"s","member_id":"m"}"#,
                RtcError::Missing("room_id"),
            ),
        ] {
            assert_eq!(
                parse(Route::Client, &user, body.as_bytes()),
                Err(error),
                "{body}"
            );
        }
        assert_eq!(
            parse(Route::Client, &RtcHeaders::default(), BODY.as_bytes()),
            Err(RtcError::NoHeader("X-Matrix-User-Identifier"))
        );
        for not_a_user in ["a:x", "@:x", "@a", "@a:", "@a b:x"] {
            assert_eq!(
                parse(Route::Client, &client(not_a_user), BODY.as_bytes()),
                Err(RtcError::NotAUser),
                "{not_a_user}"
            );
        }
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        assert!(bearer_matches(Some("Bearer hs_secret"), "hs_secret"));
        assert!(bearer_matches(Some("bearer hs_secret"), "hs_secret"));
        for wrong in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer hs_secre"),
            Some("Bearer hs_secretx"),
            Some("Basic hs_secret"),
            Some("hs_secret"),
        ] {
            assert!(!bearer_matches(wrong, "hs_secret"), "{wrong:?}");
        }
    }
}
