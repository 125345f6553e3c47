//! Stand-in for element-hq/lk-jwt-service: turns a Matrix OpenID token into a
//! LiveKit join token.
//!
//! Routing, status codes, headers, body decoding, error bodies, room alias and
//! identity derivation follow the real service (v0.5.0 by default, or HEAD
//! with [`SfuGetShapes::Legacy`]). The deliberate difference is OpenID
//! verification, see [`verify_openid`].

pub mod request;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use livekit_api::access_token::{AccessToken, VideoGrants};
use sha2::{Digest, Sha256};

use crate::cli::Credentials;
use crate::gojson::{encode_string_object, marshal_string_array};
use crate::http::{Reply, Request};
use request::{decode_either, decode_with, AnyRequest, LegacyRequest, OpenIdToken, TokenRequest};

/// MatrixRTC slot used for rooms requested through the legacy shape.
pub const LEGACY_SLOT: &str = "m.call#ROOM";

/// Lifetime of issued join tokens.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Which body shapes `/sfu/get` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SfuGetShapes {
    /// v0.4.0 up to v0.5.0: legacy or MatrixRTC shape; an OpenID failure on a
    /// legacy request is `500 M_LOOKUP_FAILED`.
    Both,
    /// HEAD: legacy shape only; an OpenID failure is `401 M_UNAUTHORIZED`.
    Legacy,
}

impl std::str::FromStr for SfuGetShapes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "both" => Ok(SfuGetShapes::Both),
            "legacy" => Ok(SfuGetShapes::Legacy),
            other => Err(format!(
                "--sfu-get-shapes must be both or legacy, not {other:?}"
            )),
        }
    }
}

/// Service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub credentials: Credentials,
    /// Returned to clients as `url`.
    pub livekit_url: String,
    pub sfu_get_shapes: SfuGetShapes,
}

/// A Matrix-style error answer (`{"errcode": ..., "error": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixError {
    pub status: u16,
    pub errcode: &'static str,
    pub error: String,
}

impl MatrixError {
    pub fn new(status: u16, errcode: &'static str, error: &str) -> Self {
        MatrixError {
            status,
            errcode,
            error: error.to_owned(),
        }
    }

    pub fn not_json() -> Self {
        MatrixError::new(400, "M_NOT_JSON", "Error reading request")
    }

    pub fn bad_json(error: &str) -> Self {
        MatrixError::new(400, "M_BAD_JSON", error)
    }

    pub fn unauthorized() -> Self {
        MatrixError::new(
            401,
            "M_UNAUTHORIZED",
            "The request could not be authorised.",
        )
    }

    pub fn lookup_failed() -> Self {
        MatrixError::new(
            500,
            "M_LOOKUP_FAILED",
            "Failed to look up user info from homeserver",
        )
    }

    pub fn internal() -> Self {
        MatrixError::new(500, "M_UNKNOWN", "Internal Server Error")
    }

    fn body(&self) -> String {
        encode_string_object(&[("errcode", self.errcode), ("error", &self.error)])
    }
}

/// `b64std_nopad(sha256(bytes))`, the hash form used for aliases and identities.
fn hash_b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(Sha256::digest(bytes))
}

/// LiveKit room name for a Matrix room and MatrixRTC slot (v0.4.3+).
pub fn room_alias(room_id: &str, slot_id: &str) -> String {
    hash_b64(marshal_string_array(&[room_id, slot_id]).as_bytes())
}

/// LiveKit identity issued by `/get_token` (v0.4.3+).
pub fn hashed_identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_b64(marshal_string_array(&[user_id, device_id, member_id]).as_bytes())
}

/// LiveKit identity issued by `/sfu/get`: never hashed.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

/// Prefix of the simulated OpenID access tokens.
pub const OPENID_PREFIX: &str = "openid:";

/// Simulated OpenID verification.
///
/// The real service resolves `matrix_server_name` and calls
/// `GET /_matrix/federation/v1/openid/userinfo?access_token=...` on that
/// homeserver, which answers with the token owner's user id. Tests have no
/// homeserver, so the stand-in treats an access token of the form
/// `openid:<matrix user id>` (e.g. `openid:@alice:test.local`) as valid for
/// that user, provided the user id's server part (everything after the first
/// `:`, so a port is part of it) equals `matrix_server_name`, just as a
/// homeserver only vouches for its own users. Anything else is a failed lookup.
pub fn verify_openid(token: &OpenIdToken) -> Option<String> {
    let user = token.access_token.strip_prefix(OPENID_PREFIX)?;
    let (local, server) = user.strip_prefix('@')?.split_once(':')?;
    (!local.is_empty() && !server.is_empty() && server == token.matrix_server_name)
        .then(|| user.to_owned())
}

/// Mints a join token the way the service's `getJoinToken` does.
pub fn join_token(
    credentials: &Credentials,
    alias: &str,
    identity: &str,
) -> Result<String, MatrixError> {
    AccessToken::with_api_key(&credentials.key, &credentials.secret)
        .with_identity(identity)
        .with_grants(VideoGrants {
            room_join: true,
            room: alias.to_owned(),
            can_publish: Some(true),
            can_subscribe: Some(true),
            can_update_own_metadata: Some(true),
            ..Default::default()
        })
        .with_ttl(TOKEN_TTL)
        .to_jwt()
        .map_err(|_| MatrixError::internal())
}

const CORS_HEADERS: [(&str, &str); 4] = [
    ("Content-Type", "application/json"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "POST"),
    (
        "Access-Control-Allow-Headers",
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
    ),
];

fn with_cors(mut reply: Reply) -> Reply {
    for (name, value) in CORS_HEADERS {
        reply = reply.with_header(name, value);
    }
    reply
}

impl Config {
    /// Answers one request.
    pub fn handle(&self, req: &Request) -> Reply {
        match req.path.as_str() {
            "/sfu/get" => with_cors(self.post_endpoint(req, |body| self.sfu_get(body))),
            "/get_token" => with_cors(self.post_endpoint(req, |body| self.get_token(body))),
            "/healthz" => match req.method.as_str() {
                "GET" | "HEAD" => Reply::empty(200),
                _ => Reply::empty(405),
            },
            // Go's http.NotFound.
            _ => Reply::empty(404)
                .with_header("Content-Type", "text/plain; charset=utf-8")
                .with_header("X-Content-Type-Options", "nosniff")
                .with_body("404 page not found\n"),
        }
    }

    fn post_endpoint(
        &self,
        req: &Request,
        process: impl Fn(&[u8]) -> Result<String, MatrixError>,
    ) -> Reply {
        match req.method.as_str() {
            "OPTIONS" => Reply::empty(200),
            "POST" => match process(&req.body) {
                Ok(body) => Reply::empty(200).with_body(body),
                Err(err) => Reply::empty(err.status).with_body(err.body()),
            },
            _ => Reply::empty(405),
        }
    }

    fn success(&self, jwt: &str) -> String {
        encode_string_object(&[("url", &self.livekit_url), ("jwt", jwt)])
    }

    fn sfu_get(&self, body: &[u8]) -> Result<String, MatrixError> {
        match self.sfu_get_shapes {
            SfuGetShapes::Both => match decode_either(body)? {
                AnyRequest::Legacy(req) => self.legacy(&req, MatrixError::lookup_failed()),
                AnyRequest::Token(req) => self.token(&req),
            },
            SfuGetShapes::Legacy => {
                let req = decode_with(body, LegacyRequest::decode)?;
                req.validate()?;
                self.legacy(&req, MatrixError::unauthorized())
            }
        }
    }

    fn get_token(&self, body: &[u8]) -> Result<String, MatrixError> {
        let req = decode_with(body, TokenRequest::decode)?;
        req.validate()?;
        self.token(&req)
    }

    fn legacy(
        &self,
        req: &LegacyRequest,
        lookup_error: MatrixError,
    ) -> Result<String, MatrixError> {
        let user = verify_openid(&req.openid_token).ok_or(lookup_error)?;
        let identity = legacy_identity(&user, &req.device_id);
        let alias = room_alias(&req.room, LEGACY_SLOT);
        let jwt = join_token(&self.credentials, &alias, &identity)?;
        eprintln!("lk-jwt-standin: issued legacy token user={user} room={} alias={alias} identity={identity}", req.room);
        Ok(self.success(&jwt))
    }

    fn token(&self, req: &TokenRequest) -> Result<String, MatrixError> {
        let user = verify_openid(&req.openid_token).ok_or_else(MatrixError::unauthorized)?;
        if req.member.claimed_user_id != user {
            return Err(MatrixError::unauthorized());
        }
        let identity = hashed_identity(&user, &req.member.claimed_device_id, &req.member.id);
        let alias = room_alias(&req.room_id, &req.slot_id);
        let jwt = join_token(&self.credentials, &alias, &identity)?;
        eprintln!(
            "lk-jwt-standin: issued token user={user} room={} slot={} alias={alias} identity={identity}",
            req.room_id, req.slot_id
        );
        Ok(self.success(&jwt))
    }
}

#[cfg(test)]
mod tests;
