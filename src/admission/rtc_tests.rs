//! The admission of MatrixRTC requests (Synapse forwarding `.../rtc/livekit/get_token`):
//! decided before lk-jwt-service sees the body.

use super::tests::{counters, dispatched, outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::request::livekit_names::hash_of_strings;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, limit_answer, lookup, ROOM};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SLOT: &str = "m.call#ROOM";

fn alias() -> String {
    room_alias(ROOM, SLOT)
}

fn identity(user: &str, member: &str) -> String {
    hash_of_strings(&[user, member])
}

/// A client-server body for [`ROOM`] and member `member`.
fn body(member: &str) -> Vec<u8> {
    format!(r#"{{"room_id":"{ROOM}","slot_id":"{SLOT}","member_id":"{member}","url":"wss://sfu"}}"#)
        .into_bytes()
}

fn from_synapse(user: &str) -> RtcHeaders {
    RtcHeaders {
        authorization: Some("Bearer hs_secret".to_owned()),
        user_identifier: Some(user.to_owned()),
        origin: None,
    }
}

impl Drive<'_> {
    fn headers(&mut self, headers: RtcHeaders) -> Vec<Effect> {
        let effects = self.admission.on_request_headers(headers, &self.env);
        self.keep(effects)
    }

    /// A client-server request of `user` for member `member`: its headers and its body.
    fn ask(&mut self, user: &str, member: &str) -> Vec<Effect> {
        let mut effects = self.headers(from_synapse(user));
        effects.extend(self.request(&body(member)));
        effects
    }

    fn chunk(&mut self, chunk: &[u8], end: bool) -> Vec<Effect> {
        let effects = self.admission.on_response_chunk(chunk, end, &self.env);
        self.keep(effects)
    }

    /// lk-jwt-service's 200 `{"jwt"}` for this room and identity, read as it passes.
    fn issued(&mut self, room: &str, identity: &str) -> Vec<Effect> {
        let mut effects = self.response_headers(Some(200), false);
        let body = issued(room, identity);
        let (first, rest) = body.split_at(body.len() / 2);
        effects.extend(self.chunk(first, false));
        effects.extend(self.chunk(rest, true));
        effects
    }
}

/// A whole client-server admission of `user` (member `member`) into a room limited to `limit`
/// whose LiveKit room holds `present`; every effect, and the admission (to watch its answer).
fn admit<'a>(
    cfg: &'a Config,
    store: &'a MemoryStore,
    limit: u32,
    present: &[&str],
    user: &str,
    member: &str,
) -> Drive<'a> {
    let mut d = Drive::on(Route::Client, cfg, store, 1_000);
    let effects = d.ask(user, member);
    if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
        d.synapse(Some(200), &limit_answer(limit));
    }
    if d.livekit_call().is_some() && outcome(&d.all).is_none() {
        d.livekit(Some(200), &participants(present));
    }
    d
}

#[test]
fn below_the_limit_the_request_goes_on_before_any_token_exists() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = admit(&cfg, &store, 2, &[], "@a:example.com", "m1");
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
    assert!(!d.all.contains(&Effect::PassResponse));
    assert_eq!(
        d.livekit_call(),
        Some(CallKind::ListParticipants(alias())),
        "LiveKit is asked about the room lk-jwt-service will name"
    );
    assert!(d.admission.watches_response());
    // The token lk-jwt-service issues is the one counted: nothing more to do.
    let effects = d.issued(&alias(), &identity("@a:example.com", "m1"));
    assert_eq!(effects, [Effect::PassResponse]);
    assert!(d.admission.finished());
    assert_eq!(
        counters(&d.all),
        [
            Counter::TokenRequests,
            Counter::SynapseLookups,
            Counter::LivekitLookups,
            Counter::Allowed,
        ]
    );
}

#[test]
fn a_full_room_refuses_a_new_user_before_lk_jwt_service_sees_the_request() {
    let cfg = config("");
    let store = MemoryStore::default();
    let present = [
        identity("@a:example.com", "m1"),
        identity("@b:example.com", "m2"),
    ];
    // The guard learnt who the hashed identities are when it admitted them.
    for (user, member) in [("@a:example.com", "m1"), ("@b:example.com", "m2")] {
        let d = admit(&cfg, &store, 2, &[], user, member);
        assert!(d.all.contains(&Effect::PassRequest));
    }
    let present: Vec<&str> = present.iter().map(String::as_str).collect();
    let d = admit(&cfg, &store, 2, &present, "@c:example.com", "m3");
    assert_eq!(outcome(&d.all), Some(403));
    assert!(d.all.contains(&Effect::Reply(reply::channel_full())));
    assert!(!d.all.contains(&Effect::PassRequest));
    assert!(counters(&d.all).contains(&Counter::Blocked));
    // A present user gets in with another member id (another device).
    let d = admit(&cfg, &store, 2, &present, "@a:example.com", "m9");
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
}

#[test]
fn a_burst_gets_exactly_the_limit() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let users = ["@a:x", "@b:x", "@c:x", "@d:x"];
    // Every request asks before any answer arrives; then the answers come, in order.
    let mut drives: Vec<Drive> = users
        .iter()
        .map(|user| {
            let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
            d.ask(user, "m");
            d
        })
        .collect();
    for d in &mut drives {
        if d.all
            .iter()
            .any(|e| matches!(e, Effect::Dispatch(c) if c.kind == lookup()))
        {
            d.synapse(Some(200), &limit_answer(2));
        } else {
            d.retry();
        }
    }
    let mut admitted = 0;
    for d in &mut drives {
        if d.livekit_call().is_some() && outcome(&d.all).is_none() {
            d.livekit(Some(200), &participants(&[]));
        }
        admitted += usize::from(d.all.contains(&Effect::PassRequest));
    }
    assert_eq!(admitted, 2);
}

#[test]
fn without_the_hs_token_a_request_is_answered_401_and_counted() {
    let json = br#"{"synapse": {"cluster": "s", "admin_token": "syt", "hs_token": "hs_secret"},
                     "livekit": {"cluster": "l", "api_key": "k", "api_secret": "lk_secret"}}"#;
    let Ok(cfg) = Config::parse(json, &|_| None) else {
        panic!("configuration refused")
    };
    let store = MemoryStore::default();
    for (authorization, errcode) in [
        (None, "M_MISSING_TOKEN"),
        (Some("Bearer wrong"), "M_UNKNOWN_TOKEN"),
        (Some("Basic hs_secret"), "M_UNKNOWN_TOKEN"),
    ] {
        let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
        let effects = d.headers(RtcHeaders {
            authorization: authorization.map(str::to_owned),
            ..from_synapse("@a:example.com")
        });
        let Some(Effect::Reply(reply)) = effects.last() else {
            panic!("not answered: {effects:?}");
        };
        assert_eq!(reply.status, 401);
        assert!(reply.body.contains(errcode), "{}", reply.body);
        assert_eq!(
            counters(&effects),
            [Counter::TokenRequests, Counter::Untrusted]
        );
        assert!(d.admission.finished());
    }
    // With it, the request is decided as usual.
    let d = admit(&cfg, &store, 2, &[], "@a:example.com", "m1");
    assert!(d.all.contains(&Effect::PassRequest));
}

#[test]
fn a_refusal_by_lk_jwt_service_gives_the_place_back() {
    let cfg = config("");
    let store = MemoryStore::default();
    // Not joined to the room: lk-jwt-service refuses the token after the guard admitted.
    let mut d = admit(&cfg, &store, 1, &[], "@stranger:example.com", "m");
    assert!(d.all.contains(&Effect::PassRequest));
    let effects = d.response_headers(Some(403), false);
    assert_eq!(
        effects,
        [Effect::Count(Counter::Released), Effect::PassResponse]
    );
    // The one place is free for a member.
    let d = admit(&cfg, &store, 1, &[], "@member:example.com", "m");
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
}

#[test]
fn a_refusal_does_not_free_a_place_a_later_token_of_the_same_user_holds() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut first = admit(&cfg, &store, 1, &[], "@a:example.com", "m1");
    let mut second = admit(&cfg, &store, 1, &[], "@a:example.com", "m2");
    assert!(second.all.contains(&Effect::PassRequest));
    second.issued(&alias(), &identity("@a:example.com", "m2"));
    // The first request is refused after the second got its token.
    assert!(!first
        .response_headers(Some(502), false)
        .contains(&Effect::Count(Counter::Released)));
    let d = admit(&cfg, &store, 1, &[], "@b:example.com", "m");
    assert_eq!(
        outcome(&d.all),
        Some(403),
        "the second token's place was lost"
    );
}

#[test]
fn a_token_for_another_room_or_participant_is_counted() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = admit(&cfg, &store, 2, &[], "@a:example.com", "m1");
    let effects = d.issued("another-room", &identity("@a:example.com", "m1"));
    assert_eq!(
        effects,
        [
            Effect::PassResponse,
            Effect::Count(Counter::TokenMismatches)
        ]
    );
}

#[test]
fn an_unreadable_request_goes_on_undecided_and_its_200_is_answered_503() {
    let cfg = config("");
    let store = MemoryStore::default();
    for (headers, body) in [
        (from_synapse("@a:example.com"), b"{\"room_id\": 1}".to_vec()),
        (from_synapse("@a:example.com"), b"not json".to_vec()),
        (RtcHeaders::default(), body("m1")),
    ] {
        let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
        d.headers(headers);
        let effects = d.request(&body);
        assert_eq!(
            effects,
            [Effect::Count(Counter::TokenRequests), Effect::PassRequest]
        );
        let effects = d.response_headers(Some(200), false);
        assert_eq!(
            effects,
            [
                Effect::Count(Counter::Unreadable),
                Effect::Reply(reply::unreadable_request())
            ]
        );
    }
    // lk-jwt-service's own refusal of such a request passes.
    let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
    d.headers(from_synapse("@a:example.com"));
    d.request(b"{}");
    assert_eq!(d.response_headers(Some(400), false), [Effect::PassResponse]);
}

#[test]
fn a_request_for_another_homeservers_sfu_passes_without_a_lookup() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
    d.headers(from_synapse("@a:example.com"));
    let body = format!(
        r#"{{"room_id":"{ROOM}","slot_id":"{SLOT}","member_id":"m","url":"wss://x","server_name":"other.org"}}"#
    );
    let effects = d.request(body.as_bytes());
    assert_eq!(
        effects,
        [
            Effect::Count(Counter::TokenRequests),
            Effect::Count(Counter::Relayed),
            Effect::PassRequest
        ]
    );
    assert!(d.admission.finished());
}

#[test]
fn a_federation_request_takes_a_place_for_the_remote_user() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = Drive::on(Route::Federation, &cfg, &store, 1_000);
    d.headers(RtcHeaders {
        authorization: Some("Bearer hs".to_owned()),
        user_identifier: None,
        origin: Some("remote.org".to_owned()),
    });
    let body = format!(
        r#"{{"user_id":"@r:remote.org","room_id":"{ROOM}","slot_id":"{SLOT}","member_id":"m","url":"wss://x"}}"#
    );
    d.request(body.as_bytes());
    d.synapse(Some(200), &limit_answer(1));
    d.livekit(Some(200), &participants(&[]));
    assert!(d.all.contains(&Effect::PassRequest));
    let d = admit(&cfg, &store, 1, &[], "@local:example.com", "m");
    assert_eq!(
        outcome(&d.all),
        Some(403),
        "the remote user holds the place"
    );
}

#[test]
fn failures_pass_the_request_open_and_refuse_it_closed() {
    for (mode, expected) in [("open", 200), ("closed", 503)] {
        let cfg = config(&format!(r#", "failure_mode": "{mode}""#));
        let store = MemoryStore::default();
        let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
        d.ask("@a:example.com", "m");
        d.synapse(None, b"");
        assert_eq!(outcome(&d.all), Some(expected), "{mode}");
        assert!(d.admission.finished());
    }
}

#[test]
fn an_answer_before_the_decision_never_passes_a_token() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
    d.ask("@a:example.com", "m");
    let effects = d.response_headers(Some(200), false);
    assert!(effects.contains(&Effect::Reply(reply::unreadable_request())));
    // The limit answer that comes later changes nothing.
    assert!(d.synapse(Some(200), &limit_answer(1)).is_empty());
}

#[test]
fn a_room_without_a_limit_needs_no_watch() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = Drive::on(Route::Client, &cfg, &store, 1_000);
    d.ask("@a:example.com", "m");
    let effects = d.synapse(Some(200), br#"{"state":[]}"#);
    assert_eq!(
        effects,
        [Effect::Count(Counter::Allowed), Effect::PassRequest]
    );
    assert!(d.admission.finished());
}

#[test]
fn a_stream_cut_short_before_its_token_passed_gives_the_place_back() {
    let cfg = config("");
    let store = MemoryStore::default();
    let env = Env::at(&cfg, &store, 2_000);
    // Reset before lk-jwt-service answered, and reset after the 200's headers but before its
    // body ended: neither client holds a token, so neither holds the one place.
    for cut_after_headers in [false, true] {
        let mut d = admit(&cfg, &store, 1, &[], "@stranger:example.com", "m");
        assert!(d.all.contains(&Effect::PassRequest));
        if cut_after_headers {
            d.response_headers(Some(200), false);
            let body = issued(&alias(), &identity("@stranger:example.com", "m"));
            d.chunk(&body[..body.len() / 2], false);
        }
        assert_eq!(
            d.admission.on_stream_end(&env),
            [Effect::Count(Counter::Abandoned)]
        );
        assert!(d.admission.finished());
        let d = admit(&cfg, &store, 1, &[], "@member:example.com", "m");
        assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
        // (The member's request is refused by lk-jwt-service: the place is free again.)
        let mut d = d;
        d.response_headers(Some(401), false);
    }
}

#[test]
fn a_stream_that_ends_once_its_token_passed_keeps_the_place() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = admit(&cfg, &store, 1, &[], "@a:example.com", "m");
    d.issued(&alias(), &identity("@a:example.com", "m"));
    assert!(d.admission.finished());
    let env = Env::at(&cfg, &store, 2_000);
    assert!(d.admission.on_stream_end(&env).is_empty());
    let d = admit(&cfg, &store, 1, &[], "@b:example.com", "m");
    assert_eq!(
        outcome(&d.all),
        Some(403),
        "the token's place was given away"
    );
}

#[test]
fn a_present_identity_never_paired_is_its_requesters_own() {
    // Alice (two devices) and bob were connected before the room had a limit, or before this
    // Envoy started: the guard never paired their hashed identities. The limit is then set to
    // 3. Bob reconnecting with the same member id is bob, not a newcomer.
    let cfg = config("");
    let store = MemoryStore::default();
    let present = [
        identity("@a:example.com", "a1"),
        identity("@a:example.com", "a2"),
        identity("@b:example.com", "b1"),
    ];
    let present: Vec<&str> = present.iter().map(String::as_str).collect();
    let d = admit(&cfg, &store, 3, &present, "@b:example.com", "b1");
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
    // Alice's devices, each asking again for the member id it holds, are alice.
    for member in ["a1", "a2"] {
        let d = admit(&cfg, &store, 3, &present, "@a:example.com", member);
        assert!(
            d.all.contains(&Effect::PassRequest),
            "{member}: {:?}",
            d.all
        );
    }
    // Two people are in the call now that their identities are known: carol gets the third
    // place, and dave is refused.
    let d = admit(&cfg, &store, 3, &present, "@c:example.com", "c1");
    assert!(d.all.contains(&Effect::PassRequest), "{:?}", d.all);
    let d = admit(&cfg, &store, 3, &present, "@d:example.com", "d1");
    assert_eq!(outcome(&d.all), Some(403));
}
