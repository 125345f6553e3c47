//! The lookup budget (`synapse.max_lookups_per_second`) spent: a room whose limit (or "no
//! limit") was seen within its stale window is decided on it; only a room not seen, or seen
//! longer ago, is answered 429.

use super::tests::{counters, dispatched, outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, legacy_alias, legacy_body, limit_answer, lookup};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// When the limit is first seen.
const SEEN: u64 = 1_000;
/// `limit_cache_ttl_seconds` and `stale_limit_seconds` of [`budget_of_one`], in ms.
const TTL_MS: u64 = 10_000;
const STALE_MS: u64 = 3_600_000;

/// A budget of one lookup a second, an hour of stale window, no list cache (`extra` after;
/// the TTL is 10 s unless it names one).
fn budget_of_one(extra: &str) -> Config {
    let ttl = if extra.contains("limit_cache_ttl_seconds") {
        ""
    } else {
        r#", "limit_cache_ttl_seconds": 10"#
    };
    let mut cfg = config(&format!(
        r#", "participants_cache_ms": 0, "stale_limit_seconds": 3600{ttl}{extra}"#
    ));
    cfg.synapse.max_lookups_per_second = 1;
    cfg
}

/// Synapse answers the room's lookup at [`SEEN`] with `answer`.
fn seen(cfg: &Config, store: &MemoryStore, answer: &[u8]) {
    let mut d = Drive::new(cfg, store, SEEN);
    assert_eq!(
        dispatched(&d.request(&legacy_body("@a:example.com", "D"))).len(),
        1
    );
    d.synapse(Some(200), answer);
}

/// Spends the process's whole budget at `now_ms`.
fn spend(cfg: &Config, store: &MemoryStore, now_ms: u64) {
    while budget::take(store, cfg.synapse.max_lookups_per_second, now_ms) {}
}

/// carol asks at `now_ms`, the budget spent, with alice in the call; the effects of her whole
/// request (the lookups it makes are never answered: none should be made).
fn carol_over_budget(cfg: &Config, store: &MemoryStore, now_ms: u64) -> Vec<Effect> {
    spend(cfg, store, now_ms);
    let mut d = Drive::new(cfg, store, now_ms);
    d.request(&legacy_body("@c:example.com", "D"));
    assert!(
        !dispatched(&d.all).iter().any(|c| c.kind == lookup()),
        "{:?}",
        d.all
    );
    if outcome(&d.all).is_none() {
        d.token(&issued(&legacy_alias(), "@c:example.com:D"));
    }
    if outcome(&d.all).is_none() && d.livekit_call().is_some() {
        d.livekit(Some(200), &participants(&["@alice:example.com:A"]));
    }
    d.all
}

fn assert_decided_on_stale(effects: &[Effect], status: u32) {
    assert_eq!(outcome(effects), Some(status), "{effects:?}");
    let counted = counters(effects);
    assert!(counted.contains(&Counter::StaleOverBudget), "{counted:?}");
    assert!(
        !counted.contains(&Counter::LookupsOverBudget),
        "{counted:?}"
    );
}

fn assert_shed(effects: &[Effect]) {
    assert_eq!(outcome(effects), Some(429), "{effects:?}");
    let counted = counters(effects);
    assert!(counted.contains(&Counter::LookupsOverBudget), "{counted:?}");
    assert!(!counted.contains(&Counter::StaleOverBudget), "{counted:?}");
}

#[test]
fn a_limit_past_its_ttl_decides_under_a_spent_budget_to_the_last_ms_of_its_stale_window() {
    let cfg = budget_of_one("");
    let end = SEEN + TTL_MS + STALE_MS;
    // Just past the TTL, and one ms before the stale window ends: the limit of 1 decides, and
    // alice holds the place.
    for now in [SEEN + TTL_MS, end - 1] {
        let store = MemoryStore::default();
        seen(&cfg, &store, &limit_answer(1));
        assert_decided_on_stale(&carol_over_budget(&cfg, &store, now), 403);
    }
    // With a free place, the stale limit lets carol in.
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(2));
    assert_decided_on_stale(&carol_over_budget(&cfg, &store, end - 1), 200);
    // Once the stale window has ended, the room is one the guard does not know.
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(1));
    assert_shed(&carol_over_budget(&cfg, &store, end));
}

#[test]
fn without_a_fresh_cache_a_limit_seen_stale_limit_seconds_ago_no_longer_decides() {
    // TTL 0: every request asks Synapse while the budget lasts, and a limit seen decides for
    // exactly `stale_limit_seconds` once it is spent.
    let cfg = budget_of_one(r#", "limit_cache_ttl_seconds": 0"#);
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(1));
    assert_decided_on_stale(&carol_over_budget(&cfg, &store, SEEN + STALE_MS - 1), 403);
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(1));
    assert_shed(&carol_over_budget(&cfg, &store, SEEN + STALE_MS));
}

#[test]
fn a_room_known_to_have_no_limit_passes_under_a_spent_budget() {
    let cfg = budget_of_one("");
    let end = SEEN + TTL_MS + STALE_MS;
    let store = MemoryStore::default();
    seen(&cfg, &store, br#"{"state":[]}"#);
    let effects = carol_over_budget(&cfg, &store, end - 1);
    assert_decided_on_stale(&effects, 200);
    assert!(counters(&effects).contains(&Counter::Allowed));
    let store = MemoryStore::default();
    seen(&cfg, &store, br#"{"state":[]}"#);
    assert_shed(&carol_over_budget(&cfg, &store, end));
}

#[test]
fn a_stale_answer_used_under_the_budget_is_served_for_one_ttl() {
    // As after a failed lookup: the next requests within a TTL take it from the cache, and
    // touch the budget no more.
    let cfg = budget_of_one("");
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(1));
    let later = SEEN + 100_000;
    assert_decided_on_stale(&carol_over_budget(&cfg, &store, later), 403);
    let effects = carol_over_budget(&cfg, &store, later + TTL_MS - 1);
    assert_eq!(outcome(&effects), Some(403));
    assert!(counters(&effects).contains(&Counter::LimitCacheHits));
    assert!(!counters(&effects).contains(&Counter::StaleOverBudget));
    // Once the budget refills, the room is looked up again.
    let mut d = Drive::new(&cfg, &store, later + TTL_MS + 1_000);
    d.request(&legacy_body("@c:example.com", "D"));
    assert!(dispatched(&d.all).iter().any(|c| c.kind == lookup()));
}

#[test]
fn no_limit_is_still_not_used_when_synapse_fails() {
    // Only a spent budget takes "no limit" from the stale window: when Synapse fails, a room
    // never seen limited fails per `failure_mode`, as before.
    let cfg = budget_of_one(r#", "failure_mode": "closed""#);
    let store = MemoryStore::default();
    seen(&cfg, &store, br#"{"state":[]}"#);
    let mut d = Drive::new(&cfg, &store, SEEN + TTL_MS);
    d.request(&legacy_body("@c:example.com", "D"));
    d.synapse(Some(502), b"");
    d.token(&issued(&legacy_alias(), "@c:example.com:D"));
    assert_eq!(outcome(&d.all), Some(503), "{:?}", d.all);
    assert!(counters(&d.all).contains(&Counter::FailClosed));
    assert!(!counters(&d.all).contains(&Counter::StaleOverBudget));
}

#[test]
fn a_request_waiting_for_another_lookup_decides_on_the_stale_limit_under_a_spent_budget() {
    // The lookup another request claimed lapses unanswered; the budget is spent when this
    // request would ask itself.
    let cfg = budget_of_one("");
    let store = MemoryStore::default();
    seen(&cfg, &store, &limit_answer(1));
    let now = SEEN + TTL_MS + 5;
    let mut first = Drive::new(&cfg, &store, now);
    assert_eq!(
        dispatched(&first.request(&legacy_body("@a:example.com", "D"))).len(),
        1
    );
    let mut second = Drive::new(&cfg, &store, now);
    assert!(dispatched(&second.request(&legacy_body("@c:example.com", "D"))).is_empty());
    // The claim lapses after the Synapse timeout (1 s); the budget is spent by then.
    let late = now + 1_000;
    spend(&cfg, &store, late);
    second.env = Env::at(&cfg, &store, late);
    second.token(&issued(&legacy_alias(), "@c:example.com:D"));
    if outcome(&second.all).is_none() {
        second.livekit(Some(200), &participants(&["@alice:example.com:A"]));
    }
    assert_decided_on_stale(&second.all, 403);
}
