//! The legacy routes (`/get_token`, `/sfu/get`) decided on the request (`decision_phase:
//! request`, the default): before lk-jwt-service sees the body, with the requester the body
//! claims (`/get_token`) or the one Synapse names for its OpenID token (`/sfu/get`).

use super::tests::{counters, dispatched, outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::request::livekit_names::hash_of_strings;
use crate::state::store::MemoryStore;
use crate::state::store::SharedStore;
use crate::test_support::{config, issued, legacy_alias, legacy_body, limit_answer, lookup, ROOM};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SLOT: &str = "slot-1";

/// A `/get_token` body of `user` (device `DEV`, member `member`) for [`ROOM`].
fn get_token_body(user: &str, member: &str) -> Vec<u8> {
    format!(
        r#"{{"room_id":"{ROOM}","slot_id":"{SLOT}","openid_token":{{"access_token":"openid:{user}","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600}},"member":{{"id":"{member}","claimed_user_id":"{user}","claimed_device_id":"DEV"}}}}"#
    )
    .into_bytes()
}

/// A configuration whose homeserver is `example.com`, with `extra` keys.
fn ours(extra: &str) -> Config {
    let mut cfg = config(extra);
    cfg.synapse.server_name = Some("example.com".to_owned());
    cfg
}

fn userinfo(user: &str) -> Vec<u8> {
    format!(r#"{{"sub":"{user}"}}"#).into_bytes()
}

impl Drive<'_> {
    /// Synapse's answer to the userinfo lookup.
    fn userinfo(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
        let effects = self
            .admission
            .on_call_response(CallKind::Userinfo, status, body, &self.env);
        self.keep(effects)
    }

    /// lk-jwt-service's answer headers, then (for a 200) its token, read as it passes.
    fn answered(&mut self, status: u32, room: &str, identity: &str) -> Vec<Effect> {
        let mut effects = self.response_headers(Some(status), false);
        if status == 200 {
            let effects_of_body =
                self.admission
                    .on_response_chunk(&issued(room, identity), true, &self.env);
            effects.extend(self.keep(effects_of_body));
        }
        effects
    }
}

/// A legacy-route admission decided on the request.
fn on_request<'a>(cfg: &'a Config, store: &'a MemoryStore) -> Drive<'a> {
    let mut d = Drive::new(cfg, store, 1_000);
    d.admission = Admission::deciding(Route::Legacy, DecisionPhase::Request);
    d
}

/// A legacy request with `body`, decided on the request, into a room limited to `limit`
/// whose LiveKit room holds `present`; Synapse's userinfo (if asked) names `verified`.
fn ask<'a>(
    cfg: &'a Config,
    store: &'a MemoryStore,
    limit: u32,
    present: &[&str],
    body: &[u8],
    verified: &str,
) -> Drive<'a> {
    let mut d = on_request(cfg, store);
    let effects = d.request(body);
    if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
        d.synapse(Some(200), &limit_answer(limit));
    }
    if dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo)
    {
        d.userinfo(Some(200), &userinfo(verified));
    }
    if d.livekit_call().is_some() && outcome(&d.all).is_none() {
        d.livekit(Some(200), &participants(present));
    }
    d
}

#[test]
fn get_token_is_decided_on_the_claimed_user_before_lk_jwt_service_sees_it() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let alias = room_alias(ROOM, SLOT);
    let bob = "@bob:example.com:BOBDEV";
    let mut d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &get_token_body("@a:example.com", "m1"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(200));
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
    assert_eq!(
        d.livekit_call(),
        Some(CallKind::ListParticipants(alias.clone()))
    );
    assert!(!dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo));
    // lk-jwt-service issues the token counted: nothing more to do.
    let identity = hash_of_strings(&["@a:example.com", "DEV", "m1"]);
    assert_eq!(d.answered(200, &alias, &identity), [Effect::PassResponse]);
    assert!(d.admission.finished());

    // The room is full (bob and alice's place): carol is refused before any token exists.
    let d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &get_token_body("@c:example.com", "m2"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(403));
    assert!(!d.all.contains(&Effect::PassRequest));
    // Alice with another member id is already counted.
    let d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &get_token_body("@a:example.com", "m3"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(200));
}

#[test]
fn sfu_get_asks_synapse_who_the_openid_token_belongs_to_only_for_limited_rooms() {
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let bob = "@bob:example.com:BOBDEV";
    let body = legacy_body("@a:example.com", "ADEV");
    let mut d = ask(&cfg, &store, 2, &[bob], &body, "@a:example.com");
    assert_eq!(outcome(&d.all), Some(200));
    let asked = dispatched(&d.all);
    let call = asked.iter().find(|c| c.kind == CallKind::Userinfo).unwrap();
    assert_eq!(call.cluster, "synapse");
    assert!(call.headers.contains(&(
        ":path".to_owned(),
        "/_matrix/federation/v1/openid/userinfo?access_token=openid%3A%40a%3Aexample.com"
            .to_owned()
    )));
    assert!(counters(&d.all).contains(&Counter::OpenidLookups));
    // The token is never in the admission's debug form.
    assert!(!format!("{:?}", d.admission).contains("openid:@a"));
    let identity = "@a:example.com:ADEV";
    assert_eq!(
        d.answered(200, &legacy_alias(), identity),
        [Effect::PassResponse]
    );

    // Full: carol's token is hers (Synapse says so), refused; bob's second device gets in.
    let carol = legacy_body("@c:example.com", "CDEV");
    let d = ask(&cfg, &store, 2, &[bob], &carol, "@c:example.com");
    assert_eq!(outcome(&d.all), Some(403));
    let bob_again = legacy_body("@bob:example.com", "OTHER");
    let d = ask(&cfg, &store, 2, &[bob], &bob_again, "@bob:example.com");
    assert_eq!(outcome(&d.all), Some(200));

    // A room without a limit costs no OpenID lookup.
    let unlimited = MemoryStore::default();
    let mut d = on_request(&cfg, &unlimited);
    d.request(&body);
    d.synapse(Some(200), br#"{"state":[]}"#);
    assert_eq!(outcome(&d.all), Some(200));
    assert!(!dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo));
}

/// A `/sfu/get` body whose OpenID token names `server`.
fn body_naming(server: &str, token: &str, device: &str) -> Vec<u8> {
    format!(
        r#"{{"room":"{ROOM}","openid_token":{{"access_token":"{token}","token_type":"Bearer","matrix_server_name":"{server}","expires_in":3600}},"device_id":"{device}"}}"#
    )
    .into_bytes()
}

#[test]
fn a_requester_nobody_verified_only_ever_takes_a_free_place() {
    // `synapse.server_name` is example.com: a token of remote.org is not shown to Synapse.
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let bob = "@bob:remote.org:BOBDEV";
    let body = body_naming("remote.org", "t1", "X");
    let d = ask(&cfg, &store, 2, &[bob], &body, "");
    assert_eq!(outcome(&d.all), Some(200), "a free place is taken");
    assert!(!dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo));
    // The same token again (whoever it turns out to be): the room is full, refused.
    let d = ask(&cfg, &store, 2, &[bob], &body, "");
    assert_eq!(outcome(&d.all), Some(403));
    // Bob's own `/sfu/get` is not recognised either: nobody vouches for it.
    let d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &body_naming("remote.org", "t2", "Y"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(403));
    // `/get_token` still is: lk-jwt-service proves the claim.
    let d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &get_token_body("@bob:remote.org", "m"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(200));
}

#[test]
fn without_a_server_name_synapse_is_asked_and_a_token_it_does_not_know_is_unverified() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let bob = "@bob:example.com:BOBDEV";
    // A token Synapse does not know (another homeserver's): a free place only, and there is
    // none.
    let mut d = on_request(&cfg, &store);
    d.request(&body_naming("remote.org", "t", "Z"));
    d.synapse(Some(200), &limit_answer(1));
    d.userinfo(Some(401), br#"{"errcode":"M_UNKNOWN_TOKEN"}"#);
    d.livekit(Some(200), &participants(&[bob]));
    assert_eq!(outcome(&d.all), Some(403));
    // Synapse names a user of another server than the token does: not vouched for either.
    let mut d = on_request(&cfg, &store);
    d.request(&body_naming("remote.org", "t", "Z"));
    d.userinfo(Some(200), &userinfo("@bob:example.com"));
    d.livekit(Some(200), &participants(&[bob]));
    assert_eq!(outcome(&d.all), Some(403));
    // Synapse vouches for bob's own token: his second device gets into the full room.
    let body = legacy_body("@bob:example.com", "W");
    let d = ask(&cfg, &store, 1, &[bob], &body, "@bob:example.com");
    assert_eq!(outcome(&d.all), Some(200));
}

#[test]
fn a_failed_openid_check_still_enforces_the_limit_in_either_failure_mode() {
    let bob = "@bob:example.com:BOBDEV";
    for mode in ["open", "closed"] {
        for (present, expected) in [(&[][..], 200), (&[bob][..], 403)] {
            let cfg = ours(&format!(
                r#", "participants_cache_ms": 0, "failure_mode": "{mode}""#
            ));
            let store = MemoryStore::default();
            let mut d = on_request(&cfg, &store);
            d.request(&legacy_body("@bob:example.com", "ADEV"));
            d.synapse(Some(200), &limit_answer(1));
            d.userinfo(None, b"");
            d.livekit(Some(200), &participants(present));
            // Even bob's own second device: nobody could say it is his.
            assert_eq!(outcome(&d.all), Some(expected), "{mode} {present:?}");
            assert!(counters(&d.all).contains(&Counter::UnverifiedRequesters));
        }
    }
}

#[test]
fn a_refusal_by_lk_jwt_service_gives_the_place_back() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut d = ask(
        &cfg,
        &store,
        1,
        &[],
        &get_token_body("@a:example.com", "m1"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(200));
    // lk-jwt-service refuses alice (her OpenID token is not hers, say): her place is free.
    let effects = d.answered(401, "", "");
    assert_eq!(counters(&effects), [Counter::Released]);
    let d = ask(
        &cfg,
        &store,
        1,
        &[],
        &get_token_body("@b:example.com", "m2"),
        "",
    );
    assert_eq!(outcome(&d.all), Some(200));
}

#[test]
fn an_unreadable_body_goes_on_and_a_200_for_it_is_never_passed() {
    let cfg = config("");
    let store = MemoryStore::default();
    for body in [&b"{not json"[..], br#"{"room_id":"!r","slot_id":"s"}"#] {
        let mut d = on_request(&cfg, &store);
        let effects = d.request(body);
        assert_eq!(
            effects,
            [Effect::Count(Counter::TokenRequests), Effect::PassRequest]
        );
        assert_eq!(outcome(&d.response_headers(Some(200), false)), Some(503));
    }
}

#[test]
fn a_body_past_the_size_bound_is_answered_413_with_cors_and_never_read() {
    for route in [Route::Legacy, Route::Client] {
        let mut admission = Admission::deciding(route, DecisionPhase::Request);
        let effects = admission.on_request_too_large();
        assert_eq!(
            counters(&effects),
            [Counter::TokenRequests, Counter::OversizedRequests]
        );
        let Some(Effect::Reply(reply)) = effects.last() else {
            panic!("no reply: {effects:?}");
        };
        assert_eq!(reply.status, 413);
        assert!(reply.body.contains("M_TOO_LARGE"));
        assert!(reply
            .headers
            .contains(&("access-control-allow-origin", "*")));
        assert!(admission.finished());
    }
}

#[test]
fn who_an_openid_token_belongs_to_is_asked_once() {
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let userinfo_calls = |d: &Drive| {
        dispatched(&d.all)
            .iter()
            .filter(|c| c.kind == CallKind::Userinfo)
            .count()
    };
    let body = legacy_body("@a:example.com", "ADEV");
    let d = ask(&cfg, &store, 3, &[], &body, "@a:example.com");
    assert_eq!((outcome(&d.all), userinfo_calls(&d)), (Some(200), 1));
    // The same token again: known, no call.
    let d = ask(&cfg, &store, 3, &[], &body, "@a:example.com");
    assert_eq!((outcome(&d.all), userinfo_calls(&d)), (Some(200), 0));
    assert!(counters(&d.all).contains(&Counter::OpenidCacheHits));
    // Another token (bob's) is asked about; one Synapse did not know is never kept.
    let bob = legacy_body("@bob:example.com", "BDEV");
    let d = ask(&cfg, &store, 3, &[], &bob, "@bob:example.com");
    assert_eq!(userinfo_calls(&d), 1);
    for _ in 0..2 {
        let mut d = on_request(&cfg, &store);
        d.request(&body_naming("example.com", "unknown-token", "X"));
        d.userinfo(Some(401), b"{}");
        assert_eq!(userinfo_calls(&d), 1);
    }
    // The bucket holds alice as the answer, and nothing of her token.
    let key =
        crate::request::livekit_names::hash_of_strings(&["example.com", "openid:@a:example.com"]);
    let bucket = crate::admission::limit_cache::OPENID_USERS
        .buckets
        .key_for(&key);
    let (bytes, _) = store.get(&bucket).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("@a:example.com") && !text.contains("openid:"),
        "{text}"
    );
}

#[test]
fn a_token_read_on_the_response_is_never_shown_to_synapse() {
    // Decided on the response, a token whose identity names nobody is decided as it always
    // was: no userinfo lookup, no stand-in.
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 1_000);
    d.request(&legacy_body("@a:example.com", "ADEV"));
    d.synapse(Some(200), &limit_answer(2));
    d.token(&issued(&legacy_alias(), ""));
    if outcome(&d.all).is_none() && d.livekit_call().is_some() {
        d.livekit(Some(200), &participants(&[]));
    }
    assert!(!dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo));
    assert!(!counters(&d.all).contains(&Counter::UnverifiedRequesters));
}

#[test]
fn with_the_lookup_budget_spent_an_openid_token_is_not_shown_and_takes_only_a_free_place() {
    let mut cfg = ours(r#", "participants_cache_ms": 0"#);
    cfg.synapse.max_lookups_per_second = 2;
    let store = MemoryStore::default();
    let bob = "@bob:example.com:BOBDEV";
    // The limit lookup and alice's OpenID check spend the budget; alice gets the last place.
    let d = ask(
        &cfg,
        &store,
        2,
        &[bob],
        &legacy_body("@a:example.com", "ADEV"),
        "@a:example.com",
    );
    assert_eq!(outcome(&d.all), Some(200));
    assert!(counters(&d.all).contains(&Counter::OpenidLookups));
    // carol's token is not shown to Synapse within the same second: unverified, and no place is
    // free for her.
    let carol = legacy_body("@c:example.com", "CDEV");
    let d = ask(&cfg, &store, 2, &[bob], &carol, "@c:example.com");
    assert!(!dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo));
    let counted = counters(&d.all);
    assert!(counted.contains(&Counter::LookupsOverBudget));
    assert!(counted.contains(&Counter::UnverifiedRequesters));
    assert_eq!(outcome(&d.all), Some(403));
}

/// A `/sfu/get` of remote.org (whose OpenID tokens nobody here verifies) with a fresh token,
/// answered with lk-jwt-service's token for `identity`; the counters of its answer.
fn remote_token<'a>(
    cfg: &'a Config,
    store: &'a MemoryStore,
    present: &[&str],
    token: &str,
    device: &str,
    identity: &str,
) -> (Drive<'a>, Vec<Counter>) {
    let mut d = ask(
        cfg,
        store,
        3,
        present,
        &body_naming("remote.org", token, device),
        "",
    );
    if outcome(&d.all) != Some(200) {
        return (d, Vec::new());
    }
    let effects = d.answered(200, &legacy_alias(), identity);
    (d, counters(&effects))
}

#[test]
fn fresh_openid_tokens_of_one_account_hold_one_place() {
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let alice = "@a:example.com:AD";
    // Mallory, an account of remote.org, mints a fresh OpenID token per request: each token's
    // place becomes mallory's once lk-jwt-service issued the token.
    for (token, device) in [("t1", "D1"), ("t2", "D2"), ("t3", "D3")] {
        let identity = format!("@mallory:remote.org:{device}");
        let (d, counted) = remote_token(&cfg, &store, &[alice], token, device, &identity);
        assert_eq!(outcome(&d.all), Some(200), "{token}");
        assert_eq!(counted, [Counter::Rekeyed], "{token}");
    }
    // Alice and mallory hold two of three places: bob gets the third, carol is refused.
    let d = ask(
        &cfg,
        &store,
        3,
        &[alice],
        &legacy_body("@bob:example.com", "BD"),
        "@bob:example.com",
    );
    assert_eq!(outcome(&d.all), Some(200));
    let d = ask(
        &cfg,
        &store,
        3,
        &[alice],
        &legacy_body("@c:example.com", "CD"),
        "@c:example.com",
    );
    assert_eq!(outcome(&d.all), Some(403));
}

#[test]
fn a_token_naming_a_user_of_another_server_than_it_was_checked_with_keeps_its_stand_in() {
    let cfg = ours(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    // remote.org vouched for a user of example.com: the place is not moved to that user (whose
    // own reservation it would pin, and whose cooling it could start).
    let (_, counted) = remote_token(&cfg, &store, &[], "t1", "D1", "@a:example.com:D1");
    assert!(counted.is_empty(), "{counted:?}");
    // The stand-in keeps its place: another remote.org request finds it taken.
    let (d, _) = remote_token(
        &cfg,
        &store,
        &["@x:example.com:X"],
        "t2",
        "D2",
        "@m:remote.org:D2",
    );
    assert_eq!(outcome(&d.all), Some(403));
}
