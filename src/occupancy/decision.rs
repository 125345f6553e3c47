//! The admission rule itself.

use std::collections::BTreeSet;

/// Whether a token must be refused: a requester already in the room (another device, a
/// rejoin) is always let in; otherwise the room must hold fewer than `limit` distinct users.
pub fn should_block(limit: u32, present_users: &BTreeSet<&str>, requester: &str) -> bool {
    if !requester.is_empty() && present_users.contains(requester) {
        return false;
    }
    present_users.len() >= limit as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn users<'a>(names: &[&'a str]) -> BTreeSet<&'a str> {
        names.iter().copied().collect()
    }

    #[test]
    fn below_the_limit_is_allowed() {
        assert!(!should_block(2, &users(&["@a:x"]), "@b:x"));
        assert!(!should_block(1, &users(&[]), "@b:x"));
    }

    #[test]
    fn at_or_above_the_limit_is_blocked() {
        assert!(should_block(2, &users(&["@a:x", "@b:x"]), "@c:x"));
        assert!(should_block(1, &users(&["@a:x", "@b:x"]), "@c:x"));
    }

    #[test]
    fn present_users_are_always_let_back_in() {
        assert!(!should_block(2, &users(&["@a:x", "@b:x"]), "@a:x"));
        assert!(!should_block(1, &users(&["@a:x", "@b:x", "@c:x"]), "@c:x"));
    }

    #[test]
    fn an_unknown_requester_never_matches() {
        assert!(should_block(1, &users(&[""]), ""));
    }
}
