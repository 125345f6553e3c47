//! Room affinity: the edge role of the module.
//!
//! A guard's state (reservations, learnt identities, the limit cache) lives in one Envoy
//! process, so with several guard replicas a burst spread over them admits up to one room's
//! free places per replica. An edge filter in front of the replicas reads each token request's
//! room the way lk-jwt-service reads it and names it in a request header; a route whose
//! `hash_policy` hashes that header onto a `RING_HASH` or `MAGLEV` cluster then sends every
//! token request of a room to the same replica, and that replica's guard sees the whole room.

use crate::request::token_request;
use crate::state::store;

/// The header value for a token request body: a digest of the Matrix room id lk-jwt-service
/// will read from it, or `None` when the body names no room the guard can read (such a
/// request goes to any replica, whose guard answers it as unreadable).
///
/// Every LiveKit room of a Matrix room (the legacy shape's and each `/get_token` slot's) gets
/// the same key, so all of them meet one guard. The digest keeps client-chosen bytes out of
/// the header (a room id may hold anything a header value may not) and gives every room the
/// same short length.
pub fn room_key(body: &[u8]) -> Option<String> {
    let request = token_request::parse(body).ok()?;
    Some(store::digest(&request.room))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LEGACY: &str = r#"{"room": "!a:example.org", "device_id": "D",
        "openid_token": {"access_token": "t", "matrix_server_name": "example.org"}}"#;
    const NEW: &str = r#"{"room_id": "!a:example.org", "slot_id": "m.call#ROOM",
        "member": {"id": "m", "claimed_user_id": "@u:example.org", "claimed_device_id": "D"},
        "openid_token": {"access_token": "t", "matrix_server_name": "example.org"}}"#;

    #[test]
    fn both_shapes_of_one_room_get_one_key() {
        let key = room_key(LEGACY.as_bytes()).unwrap();
        assert_eq!(room_key(NEW.as_bytes()), Some(key.clone()));
        let other_slot = NEW.replace("m.call#ROOM", "m.call#other");
        assert_eq!(room_key(other_slot.as_bytes()), Some(key.clone()));
        let other_room = LEGACY.replace("!a:", "!b:");
        assert_ne!(room_key(other_room.as_bytes()), Some(key));
    }

    #[test]
    fn the_key_is_the_room_lk_jwt_service_reads() {
        // Go's decoder: keys matched case-insensitively, the last duplicate wins.
        let crafted = r#"{"room": "!decoy:example.org", "ROOM": "!a:example.org",
            "device_id": "D", "openid_token": {}}"#;
        assert_eq!(room_key(crafted.as_bytes()), room_key(LEGACY.as_bytes()));
    }

    #[test]
    fn keys_are_header_safe_whatever_the_room() {
        for room in [
            "!a:b",
            "!\u{7f}\r\n\u{0}x:y",
            &"!".repeat(10_000),
            "!ä€😀:example.org",
        ] {
            let body = serde_json::json!({"room": room, "device_id": "D"}).to_string();
            let key = room_key(body.as_bytes()).unwrap();
            assert_eq!(key.len(), 16);
            assert!(key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }

    #[test]
    fn unreadable_bodies_have_no_key() {
        for body in [
            "",
            "not json",
            "[]",
            "null",
            r#"{"device_id": "D"}"#,
            r#"{"room": 1}"#,
        ] {
            assert_eq!(room_key(body.as_bytes()), None, "{body}");
        }
        let both = r#"{"room": "!a:b", "room_id": "!a:b"}"#;
        assert_eq!(room_key(both.as_bytes()), None);
    }
}
