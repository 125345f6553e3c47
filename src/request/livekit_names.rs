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

use std::cell::RefCell;

use crate::request::gojson::write_string;
use crate::state::memo::{self, Memo};

/// `b64std_nopad(sha256(json.Marshal([room, slot])))`: the LiveKit room of a Matrix call.
pub fn room_alias(room: &str, slot: &str) -> String {
    // The room's length first: no other pair of strings gives the same text.
    let pair = format!("{}:{room}{slot}", room.len());
    memo::named(&ALIASES, &pair, |_| hash_of_strings(&[room, slot]))
}

thread_local! {
    /// Aliases by the (room, slot) they name: a call's alias is asked for on each of its
    /// requests.
    static ALIASES: RefCell<Memo<String>> = RefCell::new(Memo::default());
}

/// `b64std_nopad(sha256(json.Marshal(items)))`, lk-jwt-service's naming hash. Besides the
/// alias, it names a `/get_token` participant: `[user, device, member_id]`. The guard never
/// recomputes that identity (it learns identities from the tokens it sees).
pub fn hash_of_strings(items: &[&str]) -> String {
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

/// The Matrix user a `/sfu/get` identity `<user id>:<device id>` starts with, read with the
/// Matrix user-id grammar: `@localpart:server_name`, where the server name is a hostname, an
/// IPv4 address or an `[IPv6]` literal. Anything that does not start that way (hashed
/// `/get_token` identities) is returned whole: it counts as its own user unless the guard
/// learnt who it belongs to.
///
/// lk-jwt-service does not check device ids, so a device id may hold colons (`@a:x:b:1`):
/// everything after the server name is the device's, and one user's devices all read as that
/// user. The one ambiguity is a server name with a port (`@a:x:8448:DEV`), which reads as
/// `@a:x` here and as `@a:x:8448` in [`port_reading`]; for the requester the guard knows
/// better (see [`requester_of_identity`]) and learns the pairing, and a participant whose
/// token the guard never saw is read as the user asking when that user is the port reading
/// ([`crate::occupancy`]).
pub fn matrix_user_of_identity(identity: &str) -> &str {
    user_prefix_len(identity).map_or(identity, |len| &identity[..len])
}

/// The other user a `/sfu/get` identity may name: `@a:x:8448:DEV` is `@a:x`'s device
/// `8448:DEV` or `@a:x:8448`'s device `DEV` (a server name may end in a port, 1 to 65535).
/// `Some("@a:x:8448")` when what follows the user of [`matrix_user_of_identity`] is a port and
/// a colon; `None` otherwise (no port, or a hashed identity). Both users are of one host name,
/// `x`: only whoever runs `x` can give either of them an account.
pub fn port_reading(identity: &str) -> Option<&str> {
    let len = user_prefix_len(identity)?;
    let rest = identity[len..].strip_prefix(':')?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if rest.as_bytes().get(digits) != Some(&b':') || !(1..=5).contains(&digits) {
        return None;
    }
    match rest[..digits].parse::<u16>() {
        Ok(port) if port > 0 => Some(&identity[..len + 1 + digits]),
        _ => None,
    }
}

/// The length of the `@localpart:server_name` prefix of `identity`, if it has one.
fn user_prefix_len(identity: &str) -> Option<usize> {
    let rest = identity.strip_prefix('@')?;
    let colon = rest.find(':')?;
    if colon == 0 {
        return None; // empty localpart
    }
    let server = &rest[colon + 1..];
    let host_len = if server.starts_with('[') {
        server.find(']')? + 1
    } else {
        server
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
            .count()
    };
    if host_len == 0 {
        return None;
    }
    match server.as_bytes().get(host_len) {
        None | Some(b':') => Some(1 + colon + 1 + host_len),
        Some(_) => None, // not a server name
    }
}

/// The verified Matrix user behind the identity lk-jwt-service issued for a `/sfu/get`
/// request: it writes `<verified user>:<device_id>`, and the request says which device id,
/// so no guessing is needed whatever the device id holds.
pub fn requester_of_identity<'a>(identity: &'a str, device_id: &str) -> &'a str {
    identity
        .strip_suffix(device_id)
        .and_then(|rest| rest.strip_suffix(':'))
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| matrix_user_of_identity(identity))
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
    fn reduces_identities_to_users() {
        let cases = [
            ("@alice:example.com:DEVICE", "@alice:example.com"),
            // Device ids may hold colons: still one user.
            ("@alice:example.com:a:1", "@alice:example.com"),
            ("@alice:example.com:1:z", "@alice:example.com"),
            ("@alice:example.com::", "@alice:example.com"),
            // A port reads as the device's (the documented ambiguity).
            ("@alice:example.com:8448:DEVICE", "@alice:example.com"),
            ("@alice:[::1]:DEVICE", "@alice:[::1]"),
            ("@alice:10.0.0.1:D:E", "@alice:10.0.0.1"),
            ("@alice:example.com", "@alice:example.com"),
            ("J+T45tGr/x", "J+T45tGr/x"),
            ("@nocolon", "@nocolon"),
            ("@:x:D", "@:x:D"),
            ("@a:x/y:D", "@a:x/y:D"),
            ("@a:[::1", "@a:[::1"),
            ("", ""),
        ];
        for (identity, user) in cases {
            assert_eq!(matrix_user_of_identity(identity), user, "{identity}");
        }
    }

    #[test]
    fn identities_whose_server_may_end_in_a_port_have_a_second_reading() {
        let cases = [
            ("@bob:hs.test:8448:DEV", Some("@bob:hs.test:8448")),
            ("@bob:hs.test:8448:", Some("@bob:hs.test:8448")),
            // A device id with colons after the port: still the port's user.
            ("@bob:hs.test:8448:a:1", Some("@bob:hs.test:8448")),
            ("@bob:hs.test:1:z", Some("@bob:hs.test:1")),
            ("@bob:[::1]:8448:DEV", Some("@bob:[::1]:8448")),
            ("@bob:[2001:db8::1]:443:D:E", Some("@bob:[2001:db8::1]:443")),
            ("@bob:10.0.0.1:8008:DEV", Some("@bob:10.0.0.1:8008")),
            ("@bob:hs.test:65535:D", Some("@bob:hs.test:65535")),
            // Not a port: none.
            ("@bob:hs.test:DEV", None),
            ("@bob:hs.test:8448", None),
            ("@bob:hs.test:65536:D", None),
            ("@bob:hs.test:0:D", None),
            ("@bob:hs.test:123456:D", None),
            ("@bob:hs.test::D", None),
            ("@bob:hs.test:84a8:D", None),
            ("@bob:[::1]:DEV", None),
            ("J+T45tGr/x:8448:D", None),
            ("@:x:8448:D", None),
            ("", None),
        ];
        for (identity, user) in cases {
            assert_eq!(port_reading(identity), user, "{identity}");
        }
    }

    #[test]
    fn the_requester_is_the_identity_without_its_device() {
        assert_eq!(
            requester_of_identity("@a:example.com:8448:DEV", "DEV"),
            "@a:example.com:8448"
        );
        assert_eq!(
            requester_of_identity("@a:example.com:1:z", "1:z"),
            "@a:example.com"
        );
        assert_eq!(requester_of_identity("@a:x:", ""), "@a:x");
        // An identity that does not end with the device falls back to the grammar.
        assert_eq!(requester_of_identity("@a:x:OTHER", "DEV"), "@a:x");
    }
}
