//! The admission's walk on the legacy routes, decided on lk-jwt-service's answer; the
//! drivers the other tests share.

use super::*;
use crate::config::Config;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, legacy_alias, legacy_body, limit_answer, lookup, ROOM};
use std::time::Duration;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn legacy_token(user: &str, device: &str) -> Vec<u8> {
    issued(&legacy_alias(), &format!("{user}:{device}"))
}

pub(super) fn participants(identities: &[&str]) -> Vec<u8> {
    let list: Vec<String> = identities
        .iter()
        .map(|i| format!(r#"{{"identity":"{i}","state":"ACTIVE"}}"#))
        .collect();
    format!(r#"{{"participants":[{}]}}"#, list.join(",")).into_bytes()
}

pub(super) fn dispatched(effects: &[Effect]) -> Vec<&HttpCall> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(call) => Some(call),
            _ => None,
        })
        .collect()
}

pub(super) fn counters(effects: &[Effect]) -> Vec<Counter> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Count(c) => Some(*c),
            _ => None,
        })
        .collect()
}

pub(super) fn outcome(effects: &[Effect]) -> Option<u32> {
    effects.iter().find_map(|e| match e {
        Effect::PassResponse | Effect::PassRequest => Some(200),
        Effect::Reply(r) => Some(r.status),
        _ => None,
    })
}

/// One admission driven event by event as the host drives it. Each step returns the
/// effects it caused; `all` keeps every effect in order.
pub(super) struct Drive<'a> {
    pub(super) env: Env<'a>,
    pub(super) admission: Admission,
    pub(super) all: Vec<Effect>,
}

impl<'a> Drive<'a> {
    pub(super) fn new(config: &'a Config, store: &'a MemoryStore, now_ms: u64) -> Drive<'a> {
        Drive::on(Route::Legacy, config, store, now_ms)
    }

    pub(super) fn on(
        route: Route,
        config: &'a Config,
        store: &'a MemoryStore,
        now_ms: u64,
    ) -> Drive<'a> {
        Drive {
            env: Env::at(config, store, now_ms),
            admission: Admission::for_route(route),
            all: Vec::new(),
        }
    }

    pub(super) fn keep(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        self.all.extend(effects.iter().cloned());
        effects
    }

    /// The request body, read whole.
    pub(super) fn request(&mut self, body: &[u8]) -> Vec<Effect> {
        let effects = self.admission.on_request_body(body, &self.env);
        self.keep(effects)
    }

    /// Synapse's answer to the limit lookup.
    pub(super) fn synapse(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
        let effects = self
            .admission
            .on_call_response(lookup(), status, body, &self.env);
        self.keep(effects)
    }

    pub(super) fn response_headers(
        &mut self,
        status: Option<u32>,
        end_of_stream: bool,
    ) -> Vec<Effect> {
        let effects = self
            .admission
            .on_response_headers(status, end_of_stream, &self.env);
        self.keep(effects)
    }

    pub(super) fn response_body(&mut self, body: &[u8]) -> Vec<Effect> {
        let effects = self.admission.on_response_body(body, &self.env);
        self.keep(effects)
    }

    /// lk-jwt-service's 200 with this body: its headers, then its body.
    pub(super) fn token(&mut self, body: &[u8]) -> Vec<Effect> {
        let mut effects = self.response_headers(Some(200), false);
        effects.extend(self.response_body(body));
        effects
    }

    /// The last `ListParticipants` call made, if any.
    pub(super) fn livekit_call(&self) -> Option<CallKind> {
        dispatched(&self.all)
            .into_iter()
            .rev()
            .find(|c| matches!(c.kind, CallKind::ListParticipants(_)))
            .map(|c| c.kind.clone())
    }

    /// LiveKit's answer to the last `ListParticipants` call. A refusal it leads to asks
    /// for the room's power levels: they are answered too, with nobody privileged.
    pub(super) fn livekit(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
        let Some(kind) = self.livekit_call() else {
            panic!("LiveKit was not asked: {:?}", self.all)
        };
        let effects = self
            .admission
            .on_call_response(kind, status, body, &self.env);
        let mut effects = self.keep(effects);
        if dispatched(&effects)
            .iter()
            .any(|c| matches!(c.kind, CallKind::PowerLookup(_)))
        {
            effects.extend(self.power(Some(200), br#"{"state":[]}"#));
            effects.extend(self.creators(Some(200), br#"{"state":[]}"#));
        }
        effects
    }

    /// Synapse's answer to the power-level lookup.
    pub(super) fn power(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
        let kind = CallKind::PowerLookup(ROOM.to_owned());
        let effects = self
            .admission
            .on_call_response(kind, status, body, &self.env);
        self.keep(effects)
    }

    /// Synapse's answer to the creators lookup.
    pub(super) fn creators(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
        let kind = CallKind::CreatorsLookup(ROOM.to_owned());
        let effects = self
            .admission
            .on_call_response(kind, status, body, &self.env);
        self.keep(effects)
    }

    pub(super) fn retry(&mut self) -> Vec<Effect> {
        let effects = self.admission.retry(&self.env);
        self.keep(effects)
    }
}

/// A whole legacy admission of `user` (device `DEV`) into a room limited to `limit` whose
/// LiveKit room holds `present`, each service asked only if the guard asks; every effect.
fn admit(
    cfg: &Config,
    store: &MemoryStore,
    limit: u32,
    present: &[&str],
    user: &str,
) -> Vec<Effect> {
    let mut d = Drive::new(cfg, store, 1_000);
    let effects = d.request(&legacy_body(user, "DEV"));
    if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
        d.synapse(Some(200), &limit_answer(limit));
    }
    d.token(&legacy_token(user, "DEV"));
    if d.livekit_call().is_some() && outcome(&d.all).is_none() {
        d.livekit(Some(200), &participants(present));
    }
    d.all
}

#[test]
fn limit_lookup_is_a_bearer_get_on_the_admin_state_api() {
    let cfg = config("");
    let store = MemoryStore::default();
    let effects = Drive::new(&cfg, &store, 0).request(&legacy_body("@a:example.com", "D"));
    let calls = dispatched(&effects);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "synapse");
    assert_eq!(calls[0].timeout, Duration::from_millis(1000));
    assert_eq!(
        calls[0].headers,
        [
            (":method".into(), "GET".into()),
            (
                ":path".into(),
                "/_synapse/admin/v1/rooms/%21room%3Aexample.com/state?type=io.lotus.voice_limit"
                    .into()
            ),
            (":authority".into(), "synapse".into()),
            ("authorization".into(), "Bearer syt_admin".into()),
        ]
    );
    assert_eq!(
        counters(&effects),
        [Counter::TokenRequests, Counter::SynapseLookups]
    );
}

#[test]
fn below_the_limit_the_token_passes() {
    let cfg = config("");
    let effects = admit(
        &cfg,
        &MemoryStore::default(),
        2,
        &["@a:example.com:D1"],
        "@b:example.com",
    );
    assert_eq!(outcome(&effects), Some(200));
    assert!(counters(&effects).contains(&Counter::Allowed));
}

#[test]
fn a_full_room_refuses_a_new_user_with_403() {
    let cfg = config("");
    let effects = admit(
        &cfg,
        &MemoryStore::default(),
        2,
        &[
            "@a:example.com:D1",
            "@a:example.com:D2",
            "@b:example.com:D1",
        ],
        "@c:example.com",
    );
    assert_eq!(outcome(&effects), Some(403));
    assert!(counters(&effects).contains(&Counter::Blocked));
    let Some(Effect::Reply(reply)) = effects.iter().find(|e| matches!(e, Effect::Reply(_))) else {
        panic!("no reply")
    };
    assert_eq!(
        reply.body,
        r#"{"errcode":"M_FORBIDDEN","error":"This voice channel is full."}"#
    );
    assert!(reply
        .headers
        .contains(&("access-control-allow-origin", "*")));
    assert!(effects.iter().any(|e| matches!(e, Effect::LogRefusal(line)
        if line.starts_with("room !room:example.com: refused @c:example.com: 2 users present"))));
}

#[test]
fn a_present_user_gets_in_with_another_device() {
    let cfg = config("");
    let effects = admit(
        &cfg,
        &MemoryStore::default(),
        1,
        &["@a:example.com:D1"],
        "@a:example.com",
    );
    assert_eq!(outcome(&effects), Some(200));
}

#[test]
fn the_livekit_query_runs_early_under_the_predicted_alias() {
    // Without the list cache; with it, the cached list is read when deciding instead.
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 0);
    d.request(&legacy_body("@a:example.com", "D"));
    // The Synapse answer arrives while lk-jwt-service still works: LiveKit is asked now.
    let effects = d.synapse(Some(200), &limit_answer(2));
    let calls = dispatched(&effects);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].kind, CallKind::ListParticipants(legacy_alias()));
    assert_eq!(
        calls[0].body,
        livekit::list_participants_body(&legacy_alias())
    );
    let auth = &calls[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1;
    assert!(auth.starts_with("Bearer ey"));
    // Its answer is ready before the token: the decision needs no further call.
    assert!(d.livekit(Some(200), &participants(&[])).is_empty());
    assert!(d.response_headers(Some(200), false).is_empty());
    let effects = d.response_body(&legacy_token("@a:example.com", "D"));
    assert_eq!(dispatched(&effects).len(), 0);
    assert_eq!(outcome(&effects), Some(200));
}

#[test]
fn a_token_for_another_alias_is_checked_again() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 0);
    d.request(&legacy_body("@c:example.com", "D"));
    d.synapse(Some(200), &limit_answer(1));
    d.livekit(Some(200), &participants(&[]));
    // An lk-jwt-service older than 0.4.3 names the LiveKit room differently.
    let effects = d.token(&issued(ROOM, "@c:example.com:D"));
    let calls = dispatched(&effects);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].kind, CallKind::ListParticipants(ROOM.into()));
    assert_eq!(outcome(&effects), None);
    let effects = d.livekit(Some(200), &participants(&["@a:example.com:X"]));
    assert_eq!(outcome(&effects), Some(403));
}

#[test]
fn a_fresh_participant_list_is_reused_when_configured() {
    let cfg = config(r#", "participants_cache_ms": 1000"#);
    let store = MemoryStore::default();
    let first = admit(&cfg, &store, 3, &["@a:example.com:D1"], "@b:example.com");
    assert_eq!(outcome(&first), Some(200));
    // The next admission into the same room within a second asks LiveKit nothing;
    // bob's reservation and alice's cached presence fill two of three places.
    let mut c = Drive::new(&cfg, &store, 1_500);
    c.request(&legacy_body("@c:example.com", "DEV"));
    c.token(&legacy_token("@c:example.com", "DEV"));
    assert!(dispatched(&c.all).is_empty(), "{:?}", c.all);
    assert!(counters(&c.all).contains(&Counter::LivekitCacheHits));
    assert_eq!(outcome(&c.all), Some(200));
    // A third new user finds the room full on the cache, but a refusal is decided on a
    // fresh list: LiveKit is asked, and still lists alice.
    let mut d = Drive::new(&cfg, &store, 1_500);
    d.request(&legacy_body("@d:example.com", "DEV"));
    d.token(&legacy_token("@d:example.com", "DEV"));
    assert_eq!(outcome(&d.all), None);
    assert_eq!(dispatched(&d.all).len(), 1);
    let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
    assert_eq!(outcome(&effects), Some(403));
}

#[test]
fn with_the_list_cache_a_late_limit_answer_still_decides() {
    let cfg = config(r#", "participants_cache_ms": 1000"#);
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 0);
    d.request(&legacy_body("@a:example.com", "D"));
    // The token is held before Synapse answers.
    assert!(d.response_headers(Some(200), false).is_empty());
    assert!(d
        .response_body(&legacy_token("@a:example.com", "D"))
        .is_empty());
    // No list is cached yet, so the limit answer leads to a LiveKit call...
    let effects = d.synapse(Some(200), &limit_answer(2));
    assert_eq!(dispatched(&effects).len(), 1, "{effects:?}");
    // ...and its answer to the decision.
    let effects = d.livekit(Some(200), &participants(&[]));
    assert_eq!(outcome(&effects), Some(200));
}

#[test]
fn a_token_for_a_request_never_read_is_refused_in_both_modes() {
    for mode in [
        "",
        r#", "failure_mode": "open""#,
        r#", "failure_mode": "closed""#,
    ] {
        let cfg = config(mode);
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        assert!(d.response_headers(Some(200), false).is_empty());
        let effects = d.response_body(&issued("x", "y"));
        assert_eq!(outcome(&effects), Some(503), "{mode}");
        assert_eq!(counters(&effects), [Counter::Unreadable]);
    }
}

#[test]
fn no_limit_passes_at_the_headers_and_is_cached() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut a = Drive::new(&cfg, &store, 0);
    a.request(&legacy_body("@a:example.com", "D"));
    assert!(dispatched(&a.synapse(Some(200), br#"{"state":[]}"#)).is_empty());
    assert_eq!(
        a.response_headers(Some(200), false),
        [Effect::Count(Counter::Allowed), Effect::PassResponse]
    );
    // The next request within the TTL uses the cache.
    let effects = Drive::new(&cfg, &store, 0).request(&legacy_body("@b:example.com", "D"));
    assert_eq!(
        counters(&effects),
        [Counter::TokenRequests, Counter::LimitCacheHits]
    );
    assert!(dispatched(&effects).is_empty());
}

#[test]
fn concurrent_cold_requests_share_one_lookup() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut first = Drive::new(&cfg, &store, 0);
    let mut second = Drive::new(&cfg, &store, 0);
    let body = legacy_body("@a:example.com", "D");
    assert_eq!(dispatched(&first.request(&body)).len(), 1);
    assert!(dispatched(&second.request(&body)).is_empty());
    // The second token arrives before the first lookup's answer: it waits for it.
    assert_eq!(
        second.token(&legacy_token("@b:example.com", "D")),
        [Effect::AwaitSharedLimit]
    );
    assert_eq!(second.retry(), [Effect::AwaitSharedLimit]);
    first.synapse(Some(200), &limit_answer(5));
    // The answer is shared: the second request goes straight to LiveKit (or its list).
    let effects = second.retry();
    assert!(!counters(&effects).contains(&Counter::SynapseLookups));
    assert!(!counters(&effects).contains(&Counter::LimitCacheHits));
    let calls = dispatched(&effects);
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0].kind, CallKind::ListParticipants(_)));
}

#[test]
fn a_flood_of_new_rooms_spends_the_lookup_budget_and_is_answered_429() {
    let json =
        br#"{"synapse": {"cluster": "synapse", "admin_token": "t", "max_lookups_per_second": 2},
        "livekit": {"cluster": "livekit", "api_key": "k", "api_secret": "s"}}"#;
    let cfg = Config::parse(json, &|_| None).unwrap();
    let store = MemoryStore::default();
    // Room 0 is ROOM, the others new ids.
    let body = |n: usize| {
        let room = if n == 0 {
            ROOM.to_owned()
        } else {
            format!("!flood{n}:example.com")
        };
        String::from_utf8_lossy(&legacy_body("@a:example.com", "D")).replace(ROOM, &room)
    };
    let mut first = Drive::new(&cfg, &store, 0);
    assert_eq!(dispatched(&first.request(body(0).as_bytes())).len(), 1);
    assert_eq!(
        dispatched(&Drive::new(&cfg, &store, 0).request(body(1).as_bytes())).len(),
        1
    );
    let shed = Drive::new(&cfg, &store, 0).request(body(2).as_bytes());
    assert!(dispatched(&shed).is_empty());
    assert_eq!(outcome(&shed), Some(429));
    assert!(counters(&shed).contains(&Counter::LookupsOverBudget));
    // Its claim was given back: once the budget refills, the room is looked up.
    let later = Drive::new(&cfg, &store, 500).request(body(2).as_bytes());
    assert_eq!(dispatched(&later).len(), 1);
    // A room whose limit is known takes nothing from the spent budget.
    first.synapse(Some(200), &limit_answer(5));
    let known = Drive::new(&cfg, &store, 500).request(body(0).as_bytes());
    assert!(counters(&known).contains(&Counter::LimitCacheHits));
    assert_ne!(outcome(&known), Some(429));
}

#[test]
fn a_lapsed_or_failed_shared_lookup_is_redone() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut first = Drive::new(&cfg, &store, 0);
    let mut second = Drive::new(&cfg, &store, 0);
    let body = legacy_body("@a:example.com", "D");
    first.request(&body);
    second.request(&body);
    first.synapse(Some(502), b"");
    let effects = second.token(&legacy_token("@b:example.com", "D"));
    assert_eq!(dispatched(&effects)[0].kind, lookup());
}

#[test]
fn other_upstream_answers_pass_untouched() {
    let cfg = config("");
    let store = MemoryStore::default();
    for status in [Some(400), Some(401), Some(500), None] {
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(&legacy_body("@a:example.com", "D"));
        assert_eq!(d.response_headers(status, false), [Effect::PassResponse]);
        assert!(d.synapse(Some(200), &limit_answer(1)).is_empty());
    }
}

type Answer<'a> = (Option<u32>, &'a [u8]);

/// What LiveKit answers for a room nobody is in (even one it never created).
const EMPTY_ROOM: &[u8] = br#"{"participants":[]}"#;

fn failing(cfg: &Config, synapse: Answer, livekit: Answer, token: Vec<u8>) -> Vec<Effect> {
    let store = MemoryStore::default();
    let mut d = Drive::new(cfg, &store, 0);
    d.request(&legacy_body("@a:example.com", "D"));
    d.synapse(synapse.0, synapse.1);
    d.token(&token);
    if d.livekit_call().is_some() && outcome(&d.all).is_none() {
        d.livekit(livekit.0, livekit.1);
    }
    d.all
}

#[test]
fn every_failure_fails_open_by_default_and_closed_on_request() {
    let ok_limit = limit_answer(1);
    let token = legacy_token("@a:example.com", "D");
    let cases: Vec<(Answer, Answer, Vec<u8>)> = vec![
        ((None, b""), (Some(200), EMPTY_ROOM), token.clone()),
        ((Some(500), b"{}"), (Some(200), EMPTY_ROOM), token.clone()),
        (
            (Some(200), b"garbage"),
            (Some(200), EMPTY_ROOM),
            token.clone(),
        ),
        ((Some(200), &ok_limit), (None, b""), token.clone()),
        ((Some(200), &ok_limit), (Some(401), b"{}"), token.clone()),
        // A 200 that is not a participant list is no empty room.
        ((Some(200), &ok_limit), (Some(200), b"{}"), token.clone()),
        (
            (Some(200), &ok_limit),
            (Some(200), b"{\"participants\":[{"),
            token.clone(),
        ),
        (
            (Some(200), &ok_limit),
            (Some(200), EMPTY_ROOM),
            b"{\"url\":\"x\"}".to_vec(),
        ),
        (
            (Some(200), &ok_limit),
            (Some(200), EMPTY_ROOM),
            b"{\"jwt\":\"not-a-jwt\"}".to_vec(),
        ),
    ];
    let open = config("");
    let closed = config(r#", "failure_mode": "closed""#);
    for (synapse, livekit, token) in cases {
        let effects = failing(&open, synapse, livekit, token.clone());
        assert_eq!(outcome(&effects), Some(200), "{synapse:?} {livekit:?}");
        assert!(counters(&effects).contains(&Counter::FailOpen));
        let effects = failing(&closed, synapse, livekit, token);
        assert_eq!(outcome(&effects), Some(503), "{synapse:?} {livekit:?}");
        assert!(counters(&effects).contains(&Counter::FailClosed));
    }
}

#[test]
fn an_unreadable_body_that_still_gets_a_token_is_refused_in_both_modes() {
    for mode in [
        r#", "failure_mode": "open""#,
        r#", "failure_mode": "closed""#,
    ] {
        let cfg = config(mode);
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        assert!(dispatched(&d.request(b"{\"room\":5}")).is_empty());
        assert!(d.response_headers(Some(200), false).is_empty());
        let effects = d.response_body(&issued("x", "y"));
        let Some(Effect::Reply(reply)) = effects.iter().find(|e| matches!(e, Effect::Reply(_)))
        else {
            panic!("no reply: {effects:?}")
        };
        assert_eq!(reply, &reply::unreadable_request());
        assert_eq!(counters(&effects), [Counter::Unreadable]);
    }
}

#[test]
fn a_200_without_body_cannot_be_held() {
    let cfg = config("");
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 0);
    d.request(&legacy_body("@a:example.com", "D"));
    let effects = d.response_headers(Some(200), true);
    assert_eq!(outcome(&effects), Some(200));
    assert!(counters(&effects).contains(&Counter::FailOpen));
}

#[test]
fn new_shape_requester_is_the_verified_claimed_user() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let body = br#"{"room_id":"!room:example.com","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"member":{"id":"m1","claimed_user_id":"@a:example.com","claimed_device_id":"D2"}}"#;
    let alias = room_alias(ROOM, "m.call#ROOM");
    let mut d = Drive::new(&cfg, &store, 0);
    d.request(body);
    d.synapse(Some(200), &limit_answer(1));
    d.token(&issued(&alias, "hashedIdentityOfD2"));
    // alice is present under her /sfu/get identity: her second device is let in.
    assert_eq!(d.livekit_call(), Some(CallKind::ListParticipants(alias)));
    let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
    assert_eq!(outcome(&effects), Some(200));
}

#[test]
fn a_limit_seen_before_is_enforced_while_synapse_fails() {
    for mode in ["", r#", "failure_mode": "closed""#] {
        let cfg = config(mode);
        let store = MemoryStore::default();
        let first = admit(&cfg, &store, 1, &["@a:example.com:D1"], "@b:example.com");
        assert_eq!(outcome(&first), Some(403));
        // An hour later the cached limit has long expired and Synapse is down.
        let mut d = Drive::new(&cfg, &store, 3_000_000);
        d.request(&legacy_body("@c:example.com", "D"));
        d.synapse(Some(502), b"");
        d.token(&legacy_token("@c:example.com", "D"));
        let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
        assert_eq!(outcome(&effects), Some(403), "{mode}");
        let mut all = counters(&effects);
        all.extend(counters(&d.synapse(None, b"")));
        assert!(!all.contains(&Counter::FailOpen));
    }
}

#[test]
fn a_stale_limit_is_counted() {
    let cfg = config("");
    let store = MemoryStore::default();
    admit(&cfg, &store, 2, &[], "@a:example.com");
    let mut d = Drive::new(&cfg, &store, 3_000_000);
    d.request(&legacy_body("@c:example.com", "D"));
    let effects = d.synapse(None, b"");
    assert!(counters(&effects).contains(&Counter::StaleLimits));
    // A room first seen while Synapse is down still fails per failure_mode.
    let effects = failing(
        &cfg,
        (Some(502), b""),
        (Some(200), EMPTY_ROOM),
        legacy_token("@a:example.com", "D"),
    );
    assert!(counters(&effects).contains(&Counter::FailOpen));
}

#[test]
fn impossible_room_ids_cost_no_lookup() {
    let cfg = config("");
    let store = MemoryStore::default();
    let long = format!("!{}", "a".repeat(255));
    for room in ["no-sigil", "!", "!a\\u0000b", long.as_str()] {
        let body = format!(
            r#"{{"room":"{room}","openid_token":{{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600}},"device_id":"D"}}"#
        );
        let mut d = Drive::new(&cfg, &store, 0);
        assert!(dispatched(&d.request(body.as_bytes())).is_empty(), "{room}");
        assert_eq!(
            d.response_headers(Some(200), false),
            [Effect::Count(Counter::Allowed), Effect::PassResponse]
        );
    }
    assert!(is_possible_room_id(
        "!CsjFU1jpgnkbcyiklV6jftoSxphXpFoiYYAjBb8VbZ8"
    ));
    assert!(is_possible_room_id(&long[..255]));
}

#[test]
fn a_lookup_answer_is_kept_when_its_request_has_gone() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut gone = Drive::new(&cfg, &store, 0);
    gone.request(&legacy_body("@a:example.com", "D"));
    drop(gone);
    // Another request for the room waits for that lookup...
    let mut waiting = Drive::new(&cfg, &store, 0);
    assert!(dispatched(&waiting.request(&legacy_body("@b:example.com", "D"))).is_empty());
    // ...whose answer the host settles without the request that asked.
    let env = Env::at(&cfg, &store, 0);
    lookup::settle_orphaned(&lookup(), Some(200), &limit_answer(4), &env);
    let effects = waiting.token(&legacy_token("@b:example.com", "D"));
    let calls = dispatched(&effects);
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0].kind, CallKind::ListParticipants(_)));
}

#[test]
fn log_lines_clip_untrusted_text() {
    assert_eq!(clip("!short"), "!short");
    let text = "é".repeat(10_000);
    let clipped = clip(&text);
    assert!(clipped.len() < 300);
    assert!(clipped.ends_with("(20000 bytes)"));
}
