//! The claims of the join token lk-jwt-service returns (read, not verified, by the filter).
//!
//! The first byte chooses how the rest is used:
//! - `0 mod 3`: the whole token, as text (invalid UTF-8 replaced);
//! - `1 mod 3`: the claims JSON, wrapped as `header.base64url(rest).signature`, so that every
//!   input reaches the payload decoder;
//! - `2 mod 3`: the same with a padded payload (`=`), which some encoders write.

#![no_main]

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use voice_limit_guard::upstream::jwt::{join_claims, ClaimsError, JoinClaims};

const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
const SIGNATURE: &str = "c2lnbmF0dXJl";

fn check(claims: &Result<JoinClaims, ClaimsError>) {
    if let Ok(claims) = claims {
        assert!(!claims.room.is_empty(), "claims accepted without a room");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            check(&join_claims(&token));
        }
        mode => {
            let payload = if mode == 1 {
                URL_SAFE_NO_PAD.encode(rest)
            } else {
                URL_SAFE.encode(rest)
            };
            let claims = join_claims(&format!("{HEADER}.{payload}.{SIGNATURE}"));
            check(&claims);
            assert!(
                !matches!(
                    claims,
                    Err(ClaimsError::NotAJwt) | Err(ClaimsError::BadEncoding)
                ),
                "a well-formed token was refused: {claims:?}"
            );
        }
    }
});
