//! Who a legacy `/sfu/get` request is from, learnt as lk-jwt-service learns it: the OpenID
//! token in its body is shown to the userinfo endpoint of the homeserver that issued it.
//!
//! The guard can only ask its own homeserver (the `synapse` cluster). Synapse vouches only for
//! tokens it issued, to users of its own server: a token of another homeserver is unknown to
//! it. With `synapse.server_name` configured, only tokens naming that server are shown to
//! Synapse at all. OpenID tokens are not used up by being checked: lk-jwt-service's own check
//! of the same token still succeeds.

use crate::request::rtc_request::{same_server, server_of};
use crate::upstream::call::Request;
use crate::upstream::synapse::percent_encode;

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=...`: no other credential.
pub fn userinfo_request(access_token: &str) -> Request {
    Request {
        method: "GET",
        path: format!(
            "/_matrix/federation/v1/openid/userinfo?access_token={}",
            percent_encode(access_token)
        ),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

/// What the homeserver said of an OpenID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Userinfo {
    /// The token is this user's.
    User(String),
    /// Synapse does not vouch for the token as a user of the server it names (the reason): a
    /// token of another homeserver, or no valid token at all.
    Unknown(String),
}

/// Reads the userinfo answer for a token naming `server_name`. An answer that says nothing
/// usable (no answer, a server error, a body without a user) is an error: the check failed.
pub fn parse_userinfo(
    status: Option<u32>,
    body: &[u8],
    server_name: &str,
) -> Result<Userinfo, String> {
    match status {
        Some(200) => {}
        Some(status @ (401 | 403 | 404)) => {
            return Ok(Userinfo::Unknown(format!(
                "Synapse does not know the OpenID token (HTTP {status})"
            )))
        }
        Some(status) => return Err(format!("Synapse's userinfo answered HTTP {status}")),
        None => return Err("Synapse's userinfo gave no response".to_owned()),
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        sub: String,
    }
    let answer: Answer = crate::request::json::object(body)
        .ok_or_else(|| "Synapse's userinfo answer names no user".to_owned())?;
    match server_of(&answer.sub) {
        Some(server) if same_server(server, server_name) => Ok(Userinfo::User(answer.sub)),
        // lk-jwt-service asks the server the token names, not ours.
        Some(_) => Ok(Userinfo::Unknown(format!(
            "the OpenID token is of a user of another server than it names ({})",
            crate::request::text::clip(&answer.sub)
        ))),
        None => Err("Synapse's userinfo answer names no user".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_token_stays_inside_the_query_value() {
        let request = userinfo_request("a&b=c d/?#");
        assert_eq!(
            request.path,
            "/_matrix/federation/v1/openid/userinfo?access_token=a%26b%3Dc%20d%2F%3F%23"
        );
        assert!(request.headers.is_empty());
    }

    #[test]
    fn answers() {
        let user = |body: &str| parse_userinfo(Some(200), body.as_bytes(), "example.com");
        assert_eq!(
            user(r#"{"sub":"@alice:example.com"}"#),
            Ok(Userinfo::User("@alice:example.com".into()))
        );
        assert_eq!(
            user(r#"{"sub":"@alice:Example.COM."}"#),
            Ok(Userinfo::User("@alice:Example.COM.".into()))
        );
        assert!(matches!(
            user(r#"{"sub":"@alice:other.org"}"#),
            Ok(Userinfo::Unknown(_))
        ));
        assert!(user(r#"{"sub":"alice"}"#).is_err());
        assert!(user(r#"{"user":"@alice:example.com"}"#).is_err());
        assert!(user("not json").is_err());
        assert!(matches!(
            parse_userinfo(Some(401), b"{}", "example.com"),
            Ok(Userinfo::Unknown(_))
        ));
        assert!(parse_userinfo(Some(502), b"", "example.com").is_err());
        assert!(parse_userinfo(None, b"", "example.com").is_err());
    }
}
