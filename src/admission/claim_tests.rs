//! `/get_token` claims (`member.claimed_user_id`) of another server than the OpenID token's:
//! nothing proves them, so the request is decided as one nobody verified, a stand-in of its
//! OpenID token: a free place only, never exempt, never counted as the user it claims.

use super::tests::{counters, dispatched, outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::request::livekit_names::hash_of_strings;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, limit_answer, lookup, ROOM};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SLOT: &str = "slot-1";

/// A `/get_token` body claiming `user` (device `DEV`, member `member`), with an OpenID token
/// `token` naming `server`.
fn claim(user: &str, member: &str, server: &str, token: &str) -> Vec<u8> {
    format!(
        r#"{{"room_id":"{ROOM}","slot_id":"{SLOT}","openid_token":{{"access_token":"{token}","token_type":"Bearer","matrix_server_name":"{server}","expires_in":3600}},"member":{{"id":"{member}","claimed_user_id":"{user}","claimed_device_id":"DEV"}}}}"#
    )
    .into_bytes()
}

/// The LiveKit identity lk-jwt-service gives the claim of [`claim`].
fn identity(user: &str, member: &str) -> String {
    hash_of_strings(&[user, "DEV", member])
}

/// A power-levels answer naming `user` at 100, everyone else at 0, the limit event at 50.
fn levels_of(user: &str) -> Vec<u8> {
    format!(
        r#"{{"state":[{{"type":"m.room.power_levels","state_key":"","content":{{"users":{{"{user}":100}},"users_default":0,"state_default":50}}}}]}}"#
    )
    .into_bytes()
}

/// `body` decided on the request (or, with `on_response`, on lk-jwt-service's token), in a
/// room limited to `limit` whose LiveKit room holds `present`; a power-level lookup, if made,
/// names `moderator` at 100 (and the room has no version-12 creators).
fn ask<'a>(
    cfg: &'a Config,
    store: &'a MemoryStore,
    limit: u32,
    present: &[&str],
    body: &[u8],
    moderator: &str,
    on_response: Option<&str>,
) -> Drive<'a> {
    let mut d = Drive::new(cfg, store, 1_000);
    if on_response.is_none() {
        d.admission = Admission::deciding(Route::Legacy, DecisionPhase::Request);
    }
    let effects = d.request(body);
    if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
        d.synapse(Some(200), &limit_answer(limit));
    }
    if let Some(identity) = on_response {
        d.token(&issued(&room_alias(ROOM, SLOT), identity));
    }
    if let (Some(kind), None) = (d.livekit_call(), outcome(&d.all)) {
        // Answered here, not with `Drive::livekit`, which answers the power levels itself.
        let list = participants(present);
        let effects = d.admission.on_call_response(kind, Some(200), &list, &d.env);
        d.keep(effects);
    }
    if outcome(&d.all).is_none()
        && dispatched(&d.all)
            .iter()
            .any(|c| matches!(c.kind, CallKind::PowerLookup(_)))
    {
        d.power(Some(200), &levels_of(moderator));
        d.creators(Some(200), br#"{"state":[]}"#);
    }
    d
}

fn guard() -> Config {
    config(r#", "participants_cache_ms": 0"#)
}

/// Both decision phases: `None` on the request, else the token's identity on the response.
fn phases(user: &str, member: &str) -> [Option<String>; 2] {
    [None, Some(identity(user, member))]
}

#[test]
fn a_claim_of_another_server_is_not_counted_as_the_user_it_names() {
    let cfg = guard();
    for phase in phases("@alice:a.org", "m2") {
        let store = MemoryStore::default();
        // alice, proven by a token of her own server, takes the room's one place.
        let alice = claim("@alice:a.org", "m1", "a.org", "alice-token");
        let d = ask(&cfg, &store, 1, &[], &alice, "", None);
        assert_eq!(outcome(&d.all), Some(200));
        // A token of b.org claiming alice is no second device of hers: the room is full.
        let forged = claim("@alice:a.org", "m2", "b.org", "mallory-token");
        let d = ask(&cfg, &store, 1, &[], &forged, "", phase.as_deref());
        assert_eq!(outcome(&d.all), Some(403), "{phase:?} {:?}", d.all);
        assert!(counters(&d.all).contains(&Counter::UnverifiedRequesters));
    }
}

#[test]
fn a_claim_of_another_server_takes_only_a_free_place_and_not_as_that_user() {
    let cfg = guard();
    for phase in phases("@zed:a.org", "m1") {
        let store = MemoryStore::default();
        let bob = "@bob:example.com:BOBDEV";
        // A free place: the claim of b.org's token takes it, as a stand-in of the token.
        let forged = claim("@zed:a.org", "m1", "b.org", "mallory-token");
        let d = ask(&cfg, &store, 2, &[bob], &forged, "", phase.as_deref());
        assert_eq!(outcome(&d.all), Some(200), "{phase:?} {:?}", d.all);
        assert!(counters(&d.all).contains(&Counter::UnverifiedRequesters));
        // zed himself, proven by his own server, is not present: the room is full for him.
        let zed = claim("@zed:a.org", "m2", "a.org", "zed-token");
        let d = ask(&cfg, &store, 2, &[bob], &zed, "", None);
        assert_eq!(outcome(&d.all), Some(403), "{phase:?} {:?}", d.all);
        assert!(!counters(&d.all).contains(&Counter::UnverifiedRequesters));
    }
}

#[test]
fn a_claim_of_another_server_is_never_exempt() {
    let cfg = guard();
    for phase in phases("@mod:a.org", "m1") {
        let store = MemoryStore::default();
        let alice = "@alice:example.com:A";
        let forged = claim("@mod:a.org", "m1", "b.org", "mallory-token");
        let d = ask(
            &cfg,
            &store,
            1,
            &[alice],
            &forged,
            "@mod:a.org",
            phase.as_deref(),
        );
        assert_eq!(outcome(&d.all), Some(403), "{phase:?} {:?}", d.all);
        assert!(!dispatched(&d.all)
            .iter()
            .any(|c| matches!(c.kind, CallKind::PowerLookup(_))));
        assert!(!counters(&d.all).contains(&Counter::ExemptAdmissions));
        // The same moderator, proven by a token of their own server, gets in.
        let store = MemoryStore::default();
        let own = claim("@mod:a.org", "m1", "a.org", "mod-token");
        let d = ask(
            &cfg,
            &store,
            1,
            &[alice],
            &own,
            "@mod:a.org",
            phase.as_deref(),
        );
        assert_eq!(outcome(&d.all), Some(200), "{phase:?} {:?}", d.all);
        assert!(counters(&d.all).contains(&Counter::ExemptAdmissions));
    }
}

#[test]
fn servers_are_compared_as_same_server_compares_them_port_included() {
    // (claimed user, the token's server, trusted)
    let cases = [
        ("@bob:hs.test:8448", "hs.test:8448", true),
        ("@bob:hs.test:8448", "hs.test", false),
        ("@bob:hs.test", "hs.test:8448", false),
        ("@bob:HS.test", "hs.test.", true),
        ("@bob:hs.test", "other.test", false),
        ("bob", "hs.test", false),
    ];
    let cfg = guard();
    for (user, server, trusted) in cases {
        let store = MemoryStore::default();
        let body = claim(user, "m1", server, "t");
        // A free place: either way it is taken, by the claimed user or by a stand-in.
        let d = ask(&cfg, &store, 2, &["@alice:example.com:A"], &body, "", None);
        assert_eq!(outcome(&d.all), Some(200), "{user} {server}");
        assert_eq!(
            counters(&d.all).contains(&Counter::UnverifiedRequesters),
            !trusted,
            "{user} {server}"
        );
    }
}

#[test]
fn a_claim_of_another_server_in_a_room_without_a_limit_passes_uncounted() {
    let cfg = guard();
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 1_000);
    d.admission = Admission::deciding(Route::Legacy, DecisionPhase::Request);
    d.request(&claim("@zed:a.org", "m1", "b.org", "t"));
    d.synapse(Some(200), br#"{"state":[]}"#);
    assert_eq!(outcome(&d.all), Some(200));
    assert!(!counters(&d.all).contains(&Counter::UnverifiedRequesters));
}
