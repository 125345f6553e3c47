//! Moderators in a full room: the power levels, looked up only when the room is full.

use super::tests::{counters, dispatched, outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, legacy_alias, legacy_body, limit_answer, lookup};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// Synapse's answer with a power-levels event of this content.
fn power_answer(content: &str) -> Vec<u8> {
    format!(r#"{{"state":[{{"type":"m.room.power_levels","state_key":"","content":{content}}}]}}"#)
        .into_bytes()
}

/// Synapse's answer with a create event of this room version and sender.
fn create_answer(version: &str, sender: &str) -> Vec<u8> {
    format!(
        r#"{{"state":[{{"type":"m.room.create","state_key":"","sender":"{sender}","content":{{"room_version":"{version}","additional_creators":["@co:example.com"]}}}}]}}"#
    )
    .into_bytes()
}

const LEVELS: &str = r#"{"users":{"@mod:example.com":50,"@admin:example.com":100,"@vip:example.com":20},
    "users_default":0,"state_default":50}"#;

/// `user` (device `D`) asks for a token of a room limited to 1 that alice is in, at `now_ms`;
/// the power-level lookup, if asked, is answered with `levels` (`None`: Synapse fails).
fn ask_full_room(
    cfg: &Config,
    store: &MemoryStore,
    user: &str,
    levels: Option<&str>,
    now_ms: u64,
) -> Vec<Effect> {
    ask_room_limited_by(&limit_answer(1), cfg, store, user, levels, now_ms)
}

/// [`ask_full_room`] with Synapse's answer for the limit event.
fn ask_room_limited_by(
    limit: &[u8],
    cfg: &Config,
    store: &MemoryStore,
    user: &str,
    levels: Option<&str>,
    now_ms: u64,
) -> Vec<Effect> {
    let mut d = Drive::new(cfg, store, now_ms);
    let effects = d.request(&legacy_body(user, "D"));
    if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
        d.synapse(Some(200), limit);
    }
    d.token(&issued(&legacy_alias(), &format!("{user}:D")));
    let kind = d.livekit_call();
    let effects = match kind {
        Some(kind) => {
            let effects = d.admission.on_call_response(
                kind,
                Some(200),
                &participants(&["@alice:example.com:A"]),
                &d.env,
            );
            d.keep(effects)
        }
        None => Vec::new(),
    };
    if dispatched(&effects)
        .iter()
        .any(|c| matches!(c.kind, CallKind::PowerLookup(_)))
    {
        match levels {
            Some(content) => d.power(Some(200), &power_answer(content)),
            None => d.power(Some(502), b""),
        };
        d.creators(Some(200), &create_answer("10", "@creator:example.com"));
    }
    d.all
}

#[test]
fn a_moderator_gets_into_a_full_room_and_then_counts() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let effects = ask_full_room(&cfg, &store, "@mod:example.com", Some(LEVELS), 1_000);
    assert_eq!(outcome(&effects), Some(200));
    assert_eq!(
        counters(&effects),
        [
            Counter::TokenRequests,
            Counter::SynapseLookups,
            Counter::LivekitLookups,
            Counter::PowerLevelLookups,
            Counter::PowerLevelLookups,
            Counter::ExemptAdmissions,
            Counter::Allowed
        ]
    );
    // The moderator holds a place: others are refused while they are in, and the cached
    // levels serve the next refusal without asking Synapse.
    let effects = ask_full_room(&cfg, &store, "@vip:example.com", Some(LEVELS), 2_000);
    assert_eq!(outcome(&effects), Some(403));
    assert!(!counters(&effects).contains(&Counter::PowerLevelLookups));
}

#[test]
fn below_the_level_to_set_the_limit_is_refused() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    for user in ["@vip:example.com", "@nobody:example.com"] {
        let effects = ask_full_room(&cfg, &MemoryStore::default(), user, Some(LEVELS), 1_000);
        assert_eq!(outcome(&effects), Some(403), "{user}");
        assert!(!counters(&effects).contains(&Counter::ExemptAdmissions));
    }
}

#[test]
fn the_limit_event_names_the_threshold_else_the_configuration_else_the_room() {
    let content = r#"{"users":{"@mod:example.com":50,"@mod2:example.com":50},
        "events":{"io.lotus.voice_limit":75}}"#;
    let limit = |level: &str| {
        format!(
            r#"{{"state":[{{"type":"io.lotus.voice_limit","state_key":"","content":{{"max_users":1{level}}}}}]}}"#
        )
    };
    for (event_level, configured, expected) in [
        ("", "", 403),                              // 75 needed to set the limit
        ("", r#", "exempt_power_level": 50"#, 200), // the configured level
        (r#","exempt_power_level":50"#, "", 200),   // the event's level
        (r#","exempt_power_level":"50""#, "", 200), // as old rooms write it
        (
            r#","exempt_power_level":60"#,
            r#", "exempt_power_level": 50"#,
            403,
        ), // the event wins
        (r#","exempt_power_level":"high""#, "", 403), // not a level: the room's
    ] {
        let cfg = config(&format!(r#", "participants_cache_ms": 0{configured}"#));
        let store = MemoryStore::default();
        let limit = limit(event_level).into_bytes();
        let effects =
            ask_room_limited_by(&limit, &cfg, &store, "@mod:example.com", Some(content), 1);
        assert_eq!(
            outcome(&effects),
            Some(expected),
            "{event_level} {configured}"
        );
        // The level is kept with the cached limit: another moderator's request reads it there.
        let effects = ask_full_room(&cfg, &store, "@mod2:example.com", Some(content), 2);
        assert_eq!(
            outcome(&effects),
            Some(expected),
            "cached: {event_level} {configured}"
        );
    }
}

#[test]
fn a_room_where_everyone_may_set_the_limit_exempts_nobody() {
    let content = r#"{"users":{"@mod:example.com":50},"users_default":50,"state_default":50}"#;
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let effects = ask_full_room(
        &cfg,
        &MemoryStore::default(),
        "@mod:example.com",
        Some(content),
        1,
    );
    assert_eq!(outcome(&effects), Some(403));
}

#[test]
fn rooms_with_space_never_ask_for_power_levels() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let mut d = Drive::new(&cfg, &store, 1);
    d.request(&legacy_body("@b:example.com", "D"));
    d.synapse(Some(200), &limit_answer(2));
    d.token(&issued(&legacy_alias(), "@b:example.com:D"));
    d.livekit(Some(200), &participants(&["@alice:example.com:A"]));
    assert_eq!(outcome(&d.all), Some(200));
    assert!(!counters(&d.all).contains(&Counter::PowerLevelLookups));
}

#[test]
fn a_failed_lookup_never_lifts_the_limit_and_levels_seen_before_are_kept() {
    for mode in [
        "",
        r#", "failure_mode": "open""#,
        r#", "failure_mode": "closed""#,
    ] {
        let cfg = config(&format!(r#", "participants_cache_ms": 0{mode}"#));
        let store = MemoryStore::default();
        // Synapse fails the power-level lookup: nobody is exempt, whatever the mode.
        let effects = ask_full_room(&cfg, &store, "@mod:example.com", None, 1_000);
        assert_eq!(outcome(&effects), Some(403), "{mode}");
        assert!(!counters(&effects).contains(&Counter::FailOpen));
        // Levels seen once are kept through a later outage (past their TTL).
        ask_full_room(&cfg, &store, "@nobody:example.com", Some(LEVELS), 2_000);
        let effects = ask_full_room(&cfg, &store, "@mod:example.com", None, 60_000);
        assert_eq!(outcome(&effects), Some(200), "{mode}");
        assert!(!counters(&effects).contains(&Counter::FailOpen));
    }
}

#[test]
fn concurrent_refusals_share_one_power_lookup() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let store = MemoryStore::default();
    let full = participants(&["@alice:example.com:A"]);
    let mut drives: Vec<Drive> = ["@x:example.com", "@mod:example.com"]
        .iter()
        .map(|user| {
            let mut d = Drive::new(&cfg, &store, 1_000);
            let effects = d.request(&legacy_body(user, "D"));
            if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
                d.synapse(Some(200), &limit_answer(1));
            } else {
                d.retry();
            }
            d.token(&issued(&legacy_alias(), &format!("{user}:D")));
            d
        })
        .collect();
    let mut asked = 0;
    for d in &mut drives {
        let Some(kind) = d.livekit_call() else {
            panic!("LiveKit not asked")
        };
        let effects = d.admission.on_call_response(kind, Some(200), &full, &d.env);
        let effects = d.keep(effects);
        asked += dispatched(&effects)
            .iter()
            .filter(|c| matches!(c.kind, CallKind::PowerLookup(_)))
            .count();
    }
    assert_eq!(asked, 1, "one power-level lookup for the room");
    drives[0].power(Some(200), &power_answer(LEVELS));
    drives[0].creators(Some(200), br#"{"state":[]}"#);
    assert_eq!(outcome(&drives[0].all), Some(403));
    // The other request finds the answer in the shared cache when it looks again.
    drives[1].retry();
    assert_eq!(outcome(&drives[1].all), Some(200));
}

#[test]
fn the_creators_of_a_version_12_room_get_in_and_those_of_older_rooms_by_their_level() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    for (version, user, expected) in [
        ("12", "@creator:example.com", 200),
        ("12", "@co:example.com", 200),
        ("12", "@nobody:example.com", 403),
        ("10", "@creator:example.com", 403),
    ] {
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 1_000);
        d.request(&legacy_body(user, "D"));
        d.synapse(Some(200), &limit_answer(1));
        d.token(&issued(&legacy_alias(), &format!("{user}:D")));
        let Some(kind) = d.livekit_call() else {
            panic!("LiveKit not asked")
        };
        let full = participants(&["@alice:example.com:A"]);
        let effects = d.admission.on_call_response(kind, Some(200), &full, &d.env);
        let effects = d.keep(effects);
        let asked: Vec<_> = dispatched(&effects)
            .iter()
            .map(|c| c.kind.clone())
            .collect();
        assert!(asked.contains(&CallKind::CreatorsLookup(crate::test_support::ROOM.into())));
        assert!(asked.contains(&CallKind::PowerLookup(crate::test_support::ROOM.into())));
        d.power(Some(200), br#"{"state":[]}"#);
        d.creators(Some(200), &create_answer(version, "@creator:example.com"));
        assert_eq!(outcome(&d.all), Some(expected), "{version} {user}");
    }
}

/// Whether `user` gets into a full room (limited to 1, alice in it) whose limit event is
/// `limit`, power levels `levels` and create event of room version `version`, under `cfg`.
fn exempt_at_boundary(cfg: &Config, limit: &[u8], levels: &str, version: &str, user: &str) -> bool {
    let store = MemoryStore::default();
    let mut d = Drive::new(cfg, &store, 1_000);
    d.request(&legacy_body(user, "D"));
    d.synapse(Some(200), limit);
    d.token(&issued(&legacy_alias(), &format!("{user}:D")));
    let Some(kind) = d.livekit_call() else {
        panic!("LiveKit not asked")
    };
    let full = participants(&["@alice:example.com:A"]);
    let effects = d.admission.on_call_response(kind, Some(200), &full, &d.env);
    d.keep(effects);
    d.power(Some(200), &power_answer(levels));
    d.creators(Some(200), &create_answer(version, "@creator:example.com"));
    match outcome(&d.all) {
        Some(200) => {
            assert!(counters(&d.all).contains(&Counter::ExemptAdmissions));
            true
        }
        Some(403) => false,
        other => panic!("{user}: {other:?} {:?}", d.all),
    }
}

/// Synapse's answer with the limit event naming its own `exempt_power_level`.
fn limit_naming_level(level: i64) -> Vec<u8> {
    format!(r#"{{"state":[{{"type":"io.lotus.voice_limit","state_key":"","content":{{"max_users":1,"exempt_power_level":{level}}}}}]}}"#)
        .into_bytes()
}

/// Users at 60, 59, 50, 49, 30, 29, 11 and 10 (`@l<level>`), the default `default`, the
/// limit event sent at 60.
fn levels_around(default: i64) -> String {
    let users: Vec<String> = [60, 59, 50, 49, 30, 29, 11, 10]
        .iter()
        .map(|l| format!(r#""@l{l}:example.com":{l}"#))
        .collect();
    format!(
        r#"{{"users":{{{}}},"users_default":{default},"events":{{"io.lotus.voice_limit":60}},"state_default":50}}"#,
        users.join(",")
    )
}

fn at(level: i64) -> String {
    format!("@l{level}:example.com")
}

#[test]
fn the_level_to_send_the_limit_event_exempts_at_that_level_and_not_one_below() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let levels = levels_around(0);
    assert!(exempt_at_boundary(
        &cfg,
        &limit_answer(1),
        &levels,
        "10",
        &at(60)
    ));
    assert!(!exempt_at_boundary(
        &cfg,
        &limit_answer(1),
        &levels,
        "10",
        &at(59)
    ));
    // No entry for the limit event: `state_default` is the level.
    let by_state_default =
        r#"{"users":{"@l50:example.com":50,"@l49:example.com":49},"state_default":50}"#;
    assert!(exempt_at_boundary(
        &cfg,
        &limit_answer(1),
        by_state_default,
        "10",
        &at(50)
    ));
    assert!(!exempt_at_boundary(
        &cfg,
        &limit_answer(1),
        by_state_default,
        "10",
        &at(49)
    ));
}

#[test]
fn the_limit_events_own_level_exempts_at_that_level_and_not_one_below() {
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let levels = levels_around(0);
    // The event's level, below and above the room's 60, and over a configured one.
    for (cfg, threshold) in [
        (cfg.clone(), 30),
        (cfg.clone(), 11),
        (
            config(r#", "participants_cache_ms": 0, "exempt_power_level": 50"#),
            30,
        ),
        (
            config(r#", "participants_cache_ms": 0, "exempt_power_level": 11"#),
            30,
        ),
    ] {
        let limit = limit_naming_level(threshold);
        assert!(exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "10",
            &at(threshold)
        ));
        assert!(!exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "10",
            &at(threshold - 1)
        ));
    }
}

#[test]
fn the_configured_level_exempts_at_that_level_and_not_one_below() {
    let levels = levels_around(0);
    for threshold in [50, 30, 11] {
        let cfg = config(&format!(
            r#", "participants_cache_ms": 0, "exempt_power_level": {threshold}"#
        ));
        let limit = limit_answer(1);
        assert!(exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "10",
            &at(threshold)
        ));
        assert!(!exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "10",
            &at(threshold - 1)
        ));
    }
}

#[test]
fn users_at_the_default_level_are_never_exempt_and_one_above_may_be() {
    // A threshold at or below the default: only users above the default get in.
    let levels = levels_around(10);
    for cfg in [
        config(r#", "participants_cache_ms": 0, "exempt_power_level": 10"#),
        config(r#", "participants_cache_ms": 0, "exempt_power_level": 5"#),
    ] {
        let limit = limit_answer(1);
        assert!(exempt_at_boundary(&cfg, &limit, &levels, "10", &at(11)));
        assert!(!exempt_at_boundary(&cfg, &limit, &levels, "10", &at(10)));
        // Not named in `users`: at the default.
        assert!(!exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "10",
            "@nobody:example.com"
        ));
    }
    // The same with the limit event's level.
    let cfg = config(r#", "participants_cache_ms": 0"#);
    let limit = limit_naming_level(10);
    assert!(exempt_at_boundary(&cfg, &limit, &levels, "10", &at(11)));
    assert!(!exempt_at_boundary(&cfg, &limit, &levels, "10", &at(10)));
}

#[test]
fn the_creators_of_a_version_12_room_are_exempt_at_any_threshold() {
    let levels = levels_around(0);
    for (cfg, limit) in [
        (config(r#", "participants_cache_ms": 0"#), limit_answer(1)),
        (
            config(r#", "participants_cache_ms": 0"#),
            limit_naming_level(i64::MAX),
        ),
        (
            config(&format!(
                r#", "participants_cache_ms": 0, "exempt_power_level": {}"#,
                i64::MAX
            )),
            limit_answer(1),
        ),
    ] {
        assert!(exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "12",
            "@creator:example.com"
        ));
        assert!(exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "12",
            "@co:example.com"
        ));
        assert!(!exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "11",
            "@creator:example.com"
        ));
        assert!(!exempt_at_boundary(
            &cfg,
            &limit,
            &levels,
            "12",
            "@nobody:example.com"
        ));
    }
}
