//! The two JWT jobs of the guard: reading the claims of the token lk-jwt-service issued
//! (no verification needed: it came straight from the issuer over the upstream connection),
//! and minting the short-lived HS256 admin token LiveKit's server API demands.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use serde::{Deserialize, Serialize};

use crate::request::json::{self, Scalar};

/// The claims of an issued join token that the guard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinClaims {
    /// `video.room`: the LiveKit room (alias) the token admits to.
    pub room: String,
    /// `sub`: the LiveKit participant identity.
    pub identity: String,
    /// `exp`, seconds since the epoch (0 when absent).
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsError {
    /// Not three dot-separated parts.
    NotAJwt,
    /// The payload is not base64url.
    BadEncoding,
    /// The payload is not the JSON object expected.
    BadPayload,
    /// `video.room` is missing or empty.
    NoRoom,
}

impl std::fmt::Display for ClaimsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClaimsError::NotAJwt => "issued token is not a JWT",
            ClaimsError::BadEncoding => "issued token payload is not base64url",
            ClaimsError::BadPayload => "issued token payload is not a JSON claims object",
            ClaimsError::NoRoom => "issued token has no video.room claim",
        })
    }
}

/// The claims read; any JSON is accepted in each (a claim of an unexpected type reads as
/// absent), other claims are skipped.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    video: Grant,
    #[serde(default)]
    sub: Scalar,
    #[serde(default)]
    exp: Scalar,
}

#[derive(Deserialize, Default)]
struct Grant {
    #[serde(default)]
    room: Scalar,
}

/// Reads the claims of a join token without checking its signature.
pub fn join_claims(token: &str) -> Result<JoinClaims, ClaimsError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ClaimsError::NotAJwt);
    };
    // Some encoders pad; base64url in JWTs is unpadded by definition.
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| ClaimsError::BadEncoding)?;
    let claims: Claims = json::object(&bytes).ok_or(ClaimsError::BadPayload)?;
    let room = claims.video.room.as_str().unwrap_or_default();
    if room.is_empty() {
        return Err(ClaimsError::NoRoom);
    }
    let expires_at = claims.exp.as_whole_number().unwrap_or(0);
    let identity = claims.sub.as_str().unwrap_or_default();
    Ok(JoinClaims {
        room: room.to_owned(),
        identity: identity.to_owned(),
        expires_at,
    })
}

/// How long an admin token lives. One token serves one call; a short life limits replay.
pub const ADMIN_TOKEN_TTL_SECONDS: u64 = 60;
/// Backdating `nbf` absorbs small clock differences between Envoy and LiveKit.
pub const ADMIN_TOKEN_CLOCK_SKEW_SECONDS: u64 = 10;

/// Mints the HS256 token that lets the guard list the participants of one LiveKit room:
/// `iss` = API key, `video.roomAdmin` for exactly that `room`, valid for a minute.
pub fn admin_token(api_key: &str, api_secret: &str, room: &str, now: u64) -> String {
    const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    #[derive(Serialize)]
    struct AdminClaims<'a> {
        iss: &'a str,
        nbf: u64,
        exp: u64,
        video: AdminGrant<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct AdminGrant<'a> {
        room_admin: bool,
        room: &'a str,
    }
    let payload = serde_json::to_string(&AdminClaims {
        iss: api_key,
        nbf: now.saturating_sub(ADMIN_TOKEN_CLOCK_SKEW_SECONDS),
        exp: now.saturating_add(ADMIN_TOKEN_TTL_SECONDS),
        video: AdminGrant {
            room_admin: true,
            room,
        },
    })
    .unwrap_or_default();
    let mut token = URL_SAFE_NO_PAD.encode(HEADER);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(payload));
    let signature = hs256(api_secret.as_bytes(), token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

fn hs256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn encode(payload: &str) -> String {
        format!(
            "eyJhbGciOiJIUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn reads_room_identity_and_expiry() {
        let claims = join_claims(&encode(
            r#"{"sub":"@a:x:DEV","exp":1700003600,"video":{"room":"AbC+/","roomJoin":true}}"#,
        ))
        .unwrap();
        assert_eq!(claims.room, "AbC+/");
        assert_eq!(claims.identity, "@a:x:DEV");
        assert_eq!(claims.expires_at, 1_700_003_600);
    }

    #[test]
    fn rejects_malformed_tokens() {
        assert_eq!(join_claims("abc"), Err(ClaimsError::NotAJwt));
        assert_eq!(join_claims("a.b.c.d"), Err(ClaimsError::NotAJwt));
        assert_eq!(join_claims("a.!!!.c"), Err(ClaimsError::BadEncoding));
        assert_eq!(join_claims(&encode("[1,2]")), Err(ClaimsError::BadPayload));
        assert_eq!(
            join_claims(&encode(r#"{"sub":"x"}"#)),
            Err(ClaimsError::NoRoom)
        );
        assert_eq!(
            join_claims(&encode(r#"{"video":{"room":""}}"#)),
            Err(ClaimsError::NoRoom)
        );
    }

    #[test]
    fn hs256_matches_rfc4231_vector() {
        // RFC 4231, test case 2.
        let mac = hs256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn admin_token_matches_known_vector() {
        // Computed independently with Python's hmac and base64 modules.
        assert_eq!(
            admin_token("devkey", "secret", "room1", 1_700_000_000),
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJpc3MiOiJkZXZrZXkiLCJuYmYiOjE2OTk5OTk5OTAsImV4cCI6MTcwMDAwMDA2MCwidmlkZW8iOnsicm9vbUFkbWluIjp0cnVlLCJyb29tIjoicm9vbTEifX0.\
             zlAcygNgFldlcAkbH8c4E4dBJaqK8kLWL4q820AfLqg"
        );
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn admin_token_is_accepted_by_the_livekit_sdk() {
        use livekit_api::access_token::TokenVerifier;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = admin_token("devkey", "s3cret-s3cret", "O8437W3+jmzMVjoIP3tNwbm", now);
        let claims = TokenVerifier::with_api_key("devkey", "s3cret-s3cret")
            .verify(&token)
            .unwrap();
        assert!(claims.video.room_admin);
        assert_eq!(claims.video.room, "O8437W3+jmzMVjoIP3tNwbm");
        assert!(TokenVerifier::with_api_key("devkey", "other")
            .verify(&token)
            .is_err());
    }
}
