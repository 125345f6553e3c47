//! How lk-jwt-service names LiveKit rooms and participants, and how the guard maps
//! participant identities back to Matrix users.
//!
//! lk-jwt-service 0.4.3 and later derive both names by hashing a compact JSON array with
//! SHA-256 and encoding it as unpadded standard base64. The guard recomputes the room name
//! (alias) from the request so it can ask LiveKit who is in the room while lk-jwt-service
//! is still working; the alias in the issued token stays authoritative.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::gojson::write_string;

/// `b64std_nopad(sha256(json.Marshal([room, slot])))`: the LiveKit room of a Matrix call.
pub fn room_alias(room: &str, slot: &str) -> String {
    hash_of_string_array(&[room, slot])
}

/// `b64std_nopad(sha256(json.Marshal([user, device, member_id])))`: the LiveKit identity
/// lk-jwt-service 0.4.3+ gives a `/get_token` participant.
pub fn hashed_identity(user: &str, device: &str, member_id: &str) -> String {
    hash_of_string_array(&[user, device, member_id])
}

fn hash_of_string_array(items: &[&str]) -> String {
    let mut json = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        write_string(&mut json, item);
    }
    json.push(']');
    STANDARD_NO_PAD.encode(Sha256::digest(json.as_bytes()))
}

/// Reduces a LiveKit identity to the Matrix user behind it, when the identity says so.
///
/// `/sfu/get` identities are `<user id>:<device id>`. A user id is `@localpart:server` and the
/// server name may carry a port (`@a:example.com:8448`), so the device is what follows the
/// LAST colon, provided at least one colon remains in the user part. Identities that do not
/// start with `@` (hashed `/get_token` identities) are returned unchanged: each counts as its
/// own user unless the guard learnt who it belongs to.
pub fn matrix_user_of_identity(identity: &str) -> &str {
    if !identity.starts_with('@') {
        return identity;
    }
    match identity.rfind(':') {
        Some(last) if identity[..last].contains(':') => &identity[..last],
        _ => identity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn alias_matches_lk_jwt_service_vector() {
        assert_eq!(
            room_alias("!roomid:example.com", "slot1234"),
            "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
        );
    }

    #[test]
    fn identity_matches_lk_jwt_service_vector() {
        assert_eq!(
            hashed_identity("@alice:example.com", "DEVICE123", "memberABC"),
            "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
        );
    }

    #[test]
    fn reduces_identities_to_users() {
        assert_eq!(
            matrix_user_of_identity("@alice:example.com:DEVICE"),
            "@alice:example.com"
        );
        assert_eq!(
            matrix_user_of_identity("@alice:example.com:8448:DEVICE"),
            "@alice:example.com:8448"
        );
        assert_eq!(
            matrix_user_of_identity("@alice:example.com"),
            "@alice:example.com"
        );
        assert_eq!(matrix_user_of_identity("J+T45tGr/x"), "J+T45tGr/x");
        assert_eq!(matrix_user_of_identity("@nocolon"), "@nocolon");
        assert_eq!(matrix_user_of_identity(""), "");
    }
}
