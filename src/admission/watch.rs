//! The token lk-jwt-service issues for a request the guard admitted before it answered
//! ([`crate::admission`]: every MatrixRTC request, and legacy ones with `decision_phase: request`),
//! read as it passes to the client (never held):
//! does it admit the participant the guard counted into the room it counted them in?
//!
//! The guard derived both names from the request the way lk-jwt-service documents it. A token
//! for another room or identity means lk-jwt-service names things differently than the guard
//! expects (a version the guard does not know): the admission may have counted the wrong
//! room, so every such token is counted and logged for the operator.

use crate::upstream::jwt;

/// The largest answer body read; lk-jwt-service's `{"jwt": ...}` is well under 4 KiB.
const MAX_BODY: usize = 64 * 1024;

/// The names the admission counted, and the answer body read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub room: String,
    pub identity: String,
    body: Vec<u8>,
    too_long: bool,
}

impl Watch {
    pub fn new(room: String, identity: String) -> Watch {
        Watch {
            room,
            identity,
            body: Vec::new(),
            too_long: false,
        }
    }

    /// Keeps a part of the answer body (up to 64 KiB in all).
    pub fn read(&mut self, chunk: &[u8]) {
        if self.body.len() + chunk.len() > MAX_BODY {
            self.too_long = true;
            self.body = Vec::new();
        }
        if !self.too_long {
            self.body.extend_from_slice(chunk);
        }
    }

    /// Once the whole answer body is read: why the token is not the one counted, if it is not.
    pub fn mismatch(&self) -> Option<String> {
        self.claims().err()
    }

    /// Once the whole answer body is read: the token's claims when it is the one counted,
    /// else why not.
    pub fn claims(&self) -> Result<jwt::JoinClaims, String> {
        if self.too_long {
            return Err(format!("the 200's body is over {MAX_BODY} bytes"));
        }
        let claims = issued_token(&self.body)
            .and_then(|token| jwt::join_claims(&token).map_err(|e| e.to_string()))?;
        if claims.room != self.room {
            return Err(format!(
                "the token admits to LiveKit room {:?}, not {:?}",
                crate::request::text::clip(&claims.room),
                self.room
            ));
        }
        // An empty identity: the guard could not know it (a requester nobody verified).
        if !self.identity.is_empty() && claims.identity != self.identity {
            return Err(format!(
                "the token names participant {:?}, not {:?}",
                crate::request::text::clip(&claims.identity),
                self.identity
            ));
        }
        Ok(claims)
    }
}

/// The `jwt` of lk-jwt-service's 200 body.
pub fn issued_token(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Issued {
        jwt: String,
    }
    crate::request::json::object::<Issued>(body)
        .map(|issued| issued.jwt)
        .ok_or_else(|| "lk-jwt-service's 200 carries no {\"jwt\": ...} body".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::issued;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn read_whole(watch: &mut Watch, body: &[u8]) {
        for chunk in body.chunks(7) {
            watch.read(chunk);
        }
    }

    #[test]
    fn the_token_counted_matches_however_it_arrives() {
        let mut watch = Watch::new("alias".into(), "ident".into());
        read_whole(&mut watch, &issued("alias", "ident"));
        assert_eq!(watch.mismatch(), None);
    }

    #[test]
    fn another_room_or_participant_is_a_mismatch() {
        for (room, identity, says) in [
            ("other", "ident", "LiveKit room"),
            ("alias", "other", "participant"),
        ] {
            let mut watch = Watch::new("alias".into(), "ident".into());
            read_whole(&mut watch, &issued(room, identity));
            let reason = watch.mismatch().unwrap_or_default();
            assert!(reason.contains(says), "{reason}");
        }
    }

    #[test]
    fn an_identity_the_guard_could_not_know_is_not_compared() {
        let mut watch = Watch::new("alias".into(), String::new());
        read_whole(&mut watch, &issued("alias", "@bob:remote.org:DEV"));
        assert_eq!(watch.mismatch(), None);
        let mut watch = Watch::new("alias".into(), String::new());
        read_whole(&mut watch, &issued("other", "@bob:remote.org:DEV"));
        assert!(watch.mismatch().is_some());
    }

    #[test]
    fn an_unreadable_or_oversized_answer_is_a_mismatch() {
        let mut watch = Watch::new("alias".into(), "ident".into());
        watch.read(b"{\"jwt\":\"not a token\"}");
        assert!(watch.mismatch().is_some());
        let mut watch = Watch::new("alias".into(), "ident".into());
        watch.read(&vec![b' '; MAX_BODY]);
        watch.read(&issued("alias", "ident"));
        assert!(watch.mismatch().unwrap_or_default().contains("bytes"));
    }
}
