#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;
use crate::state::store::MemoryStore;

const ROOM: &str = "alias";

fn fresh(identities: &[String], taken_ms: u64) -> Participants<'_> {
    Participants::Fresh {
        identities,
        sessions: &[],
        taken_ms,
    }
}

fn question<'a>(
    max_users: u32,
    participants: Participants<'a>,
    requester: &'a str,
    identity: &'a str,
    now_ms: u64,
) -> Request<'a> {
    Request {
        room: ROOM,
        max_users,
        participants,
        requester,
        identity,
        reservation_ms: 30_000,
        list_cache_ms: 0,
        verify_ms: 0,
        doubt_ms: 0,
        releasable: false,
        exempt: false,
        unverified: false,
        now_ms,
    }
}

fn ask(
    store: &MemoryStore,
    max_users: u32,
    participants: &[&str],
    requester: &str,
    identity: &str,
    now_ms: u64,
) -> Verdict {
    let participants: Vec<String> = participants.iter().map(|s| s.to_string()).collect();
    let q = question(
        max_users,
        Participants::Fresh {
            identities: &participants,
            sessions: &[],
            taken_ms: now_ms,
        },
        requester,
        identity,
        now_ms,
    );
    decided(store, &q)
}

/// The decision on a question asked with a fresh list.
fn decided(store: &MemoryStore, q: &Request) -> Verdict {
    match admit(store, q).unwrap() {
        Outcome::Decided(verdict) => verdict,
        Outcome::NeedList => panic!("a fresh list needs no other"),
    }
}

#[test]
fn a_burst_into_an_empty_room_admits_exactly_the_limit() {
    let store = MemoryStore::default();
    let admitted = (0..20)
        .filter(|i| {
            let user = format!("@u{i}:x");
            ask(&store, 3, &[], &user, &format!("{user}:D"), 1000).admitted
        })
        .count();
    assert_eq!(admitted, 3);
}

#[test]
fn a_reserved_user_may_come_back_and_a_refusal_reserves_nothing() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "@a:x:D1", 0).admitted);
    assert!(ask(&store, 1, &[], "@a:x", "@a:x:D2", 1).admitted);
    let refused = ask(&store, 1, &[], "@b:x", "@b:x:D1", 2);
    assert!(!refused.admitted);
    assert_eq!(refused.reserved, 1);
    // bob's refusal left nothing behind: once alice's reservation lapses, bob fits.
    assert!(ask(&store, 1, &[], "@b:x", "@b:x:D1", 30_001).admitted);
}

#[test]
fn an_unverified_requester_only_ever_takes_a_free_place() {
    let store = MemoryStore::default();
    let unverified = |participants: &[&str], stand_in: &str, now_ms: u64| {
        let participants: Vec<String> = participants.iter().map(|s| s.to_string()).collect();
        let q = Request {
            unverified: true,
            exempt: true, // never lets an unverified requester into a full room
            ..question(
                2,
                Participants::Fresh {
                    identities: &participants,
                    sessions: &[],
                    taken_ms: now_ms,
                },
                stand_in,
                "",
                now_ms,
            )
        };
        match admit(&store, &q).unwrap() {
            Outcome::Decided(verdict) => verdict.admitted,
            Outcome::NeedList => panic!("a fresh list was given"),
        }
    };
    // A place free: taken, and held under the stand-in.
    assert!(unverified(&["@a:x:D"], "unverified 1", 0));
    // The same stand-in again, or a present user's name: counted already, so refused.
    assert!(!unverified(&["@a:x:D"], "unverified 1", 1));
    assert!(!unverified(&["@a:x:D"], "@a:x", 2));
    // The room is full (alice and the reservation): a new stand-in is refused too.
    assert!(!unverified(&["@a:x:D"], "unverified 2", 3));
    // A verified present user still gets in.
    assert!(ask(&store, 2, &["@a:x:D"], "@a:x", "@a:x:E", 4).admitted);
    // Once the reservation lapses, the place is free again.
    assert!(unverified(&["@a:x:D"], "unverified 2", 30_001));
}

#[test]
fn a_reservation_ends_when_the_user_shows_up_in_livekit() {
    let store = MemoryStore::default();
    assert!(ask(&store, 2, &[], "@a:x", "@a:x:D1", 0).admitted);
    // alice connected and left again: her place is free at once.
    assert!(ask(&store, 2, &["@a:x:D1"], "@b:x", "@b:x:D1", 10).admitted);
    let v = ask(&store, 2, &[], "@c:x", "@c:x:D1", 20);
    assert!(v.admitted, "{v:?}");
}

#[test]
fn unreserved_places_expire() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "@a:x:D1", 0).admitted);
    assert!(!ask(&store, 1, &[], "@b:x", "@b:x:D1", 29_999).admitted);
    assert!(ask(&store, 1, &[], "@b:x", "@b:x:D1", 30_000).admitted);
}

#[test]
fn hashed_identities_map_back_to_their_users() {
    let store = MemoryStore::default();
    // alice joins with /get_token: a hashed identity.
    assert!(ask(&store, 1, &[], "@a:x", "hashA1", 0).admitted);
    // She is in LiveKit under that hash; her second device is let in, bob is not.
    assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA2", 10).admitted);
    assert!(!ask(&store, 1, &["hashA1", "hashA2"], "@b:x", "hashB1", 20).admitted);
    // Two devices of one user count once.
    let v = ask(&store, 3, &["hashA1", "hashA2"], "@c:x", "hashC1", 30);
    assert_eq!(v.present, 1);
}

#[test]
fn identities_never_seen_count_as_distinct_users() {
    let store = MemoryStore::default();
    let v = ask(&store, 2, &["hashX", "hashY"], "@a:x", "hashA", 0);
    assert_eq!(v.present, 2);
    assert!(!v.admitted);
}

#[test]
fn a_present_identity_is_remembered_beyond_its_token() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "hashA1", 0).admitted);
    // Seen in the room before her token expires, alice stays known after it expired.
    assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA2", 3_000_000).admitted);
    assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA3", 6_000_000).admitted);
    assert!(!ask(&store, 1, &["hashA1"], "@b:x", "hashB1", 6_000_001).admitted);
}

#[test]
fn a_cached_list_serves_until_it_goes_stale() {
    let store = MemoryStore::default();
    let list = vec!["@a:x:D".to_owned()];
    let mut q = question(2, fresh(&list, 0), "@b:x", "@b:x:D", 0);
    q.list_cache_ms = 1000;
    assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
    // On the cached list plus bob's reservation the room is full; a refusal is only ever
    // decided on a fresh list, so carol's needs one.
    let q = question(2, Participants::Cached, "@c:x", "@c:x:D", 500);
    assert_eq!(admit(&store, &q), Ok(Outcome::NeedList));
    let list2 = vec!["@a:x:D".to_owned()];
    let mut q = question(2, fresh(&list2, 500), "@c:x", "@c:x:D", 500);
    q.list_cache_ms = 1000;
    assert!(
        matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if !v.admitted && v.present == 1 && v.reserved == 1)
    );
    // A second user admitted within the cache window is decided on the cache alone.
    let q = question(3, Participants::Cached, "@d:x", "@d:x:D", 600);
    assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
    // Once stale, the cached list is not used.
    let q = question(2, Participants::Cached, "@c:x", "@c:x:D", 1000);
    assert_eq!(admit(&store, &q), Ok(Outcome::NeedList));
}

/// A releasable admission (the MatrixRTC routes) of `requester` at `now_ms`, no one in
/// LiveKit.
fn ask_releasable(store: &MemoryStore, max_users: u32, requester: &str, now_ms: u64) -> Verdict {
    let q = Request {
        releasable: true,
        ..question(max_users, fresh(&[], now_ms), requester, "", now_ms)
    };
    match admit(store, &q) {
        Ok(Outcome::Decided(verdict)) => verdict,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_token_gives_the_place_back() {
    let store = MemoryStore::default();
    assert!(ask_releasable(&store, 1, "@stranger:x", 0).holds);
    assert!(!ask_releasable(&store, 1, "@member:x", 1).admitted);
    assert_eq!(release(&store, ROOM, "@stranger:x", 2), Ok(true));
    assert!(ask_releasable(&store, 1, "@member:x", 3).admitted);
}

#[test]
fn concurrent_refused_requests_leave_no_place_behind() {
    // Two requests of one account, both refused by lk-jwt-service: the place is held while
    // either may still get a token, and free once both are refused.
    let store = MemoryStore::default();
    assert!(ask_releasable(&store, 1, "@hoarder:x", 0).holds);
    assert!(ask_releasable(&store, 1, "@hoarder:x", 1).holds);
    assert_eq!(release(&store, ROOM, "@hoarder:x", 2), Ok(false));
    assert!(!ask_releasable(&store, 1, "@member:x", 3).admitted);
    assert_eq!(release(&store, ROOM, "@hoarder:x", 4), Ok(true));
    assert!(ask_releasable(&store, 1, "@member:x", 5).admitted);
}

#[test]
fn a_refusal_never_frees_the_place_of_a_token_issued_to_the_same_user() {
    let store = MemoryStore::default();
    // Two requests; one gets its token (no release), the other is refused.
    ask_releasable(&store, 1, "@a:x", 0);
    ask_releasable(&store, 1, "@a:x", 1);
    assert_eq!(release(&store, ROOM, "@a:x", 2), Ok(false));
    assert!(!ask_releasable(&store, 1, "@b:x", 3).admitted);
    // An admission decided on an issued token (the legacy routes) pins the place.
    let store = MemoryStore::default();
    ask(&store, 1, &[], "@a:x", "@a:x:D", 0);
    ask_releasable(&store, 1, "@a:x", 1);
    assert_eq!(release(&store, ROOM, "@a:x", 2), Ok(false));
    assert!(!ask_releasable(&store, 1, "@b:x", 3).admitted);
}

#[test]
fn asking_again_dates_the_reservation_but_never_renews_it() {
    let store = MemoryStore::default();
    assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 0).admitted);
    let cas = |store: &MemoryStore| store.get(&BUCKETS.key_for(ROOM)).map(|(_, cas)| cas);
    let before = cas(&store);
    // The same decision in the same millisecond writes nothing.
    assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 0).admitted);
    assert_eq!(cas(&store), before);
    // Asking again dates the reservation anew (only a list taken since counts) ...
    assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 16_000).admitted);
    assert_ne!(cas(&store), before);
    let record = BUCKETS.get(&store, ROOM, 16_000).unwrap();
    assert_eq!(record.r[0].since, 16_000);
    // ... but the place is held from the first admission only: asking is not being there.
    assert!(ask(&store, 2, &["@o:x:D"], "@b:x", "hashB", 30_000).admitted);
}

#[test]
fn a_user_in_the_call_keeps_their_reservation_renewed() {
    let store = MemoryStore::default();
    assert!(ask(&store, 2, &[], "@a:x", "@a:x:D", 0).admitted);
    assert!(ask(&store, 2, &["@a:x:D"], "@a:x", "@a:x:E", 20_000).admitted);
    // alice left; her second device's token was let through at 20 s: she counts until 50 s.
    assert!(ask(&store, 2, &[], "@b:x", "@b:x:D", 40_000).admitted);
    assert!(!ask(&store, 2, &[], "@c:x", "@c:x:D", 40_001).admitted);
}

#[test]
fn state_is_removed_when_nothing_is_left() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "@a:x:D", 0).admitted);
    assert!(ask(&store, 1, &["@a:x:D"], "@a:x", "@a:x:D2", 1).admitted);
    // A list taken since alice's last admission shows her: nothing is reserved any more.
    assert!(!ask(&store, 1, &["@a:x:D"], "@b:x", "@b:x:D", 2).admitted);
    let record = BUCKETS.get(&store, ROOM, 2).unwrap();
    assert!(record.r.is_empty() && record.i.is_empty());
    // What is kept for lists still in flight goes after a minute.
    assert_eq!(BUCKETS.get(&store, ROOM, 2 + MAX_LIST_AGE_MS), None);
}

#[test]
fn one_user_counts_once_whatever_device_ids_they_choose() {
    let store = MemoryStore::default();
    // alice asks with device ids full of colons; lk-jwt-service does not check them.
    for (n, device) in ["a:1", "b:1", "1:z"].iter().enumerate() {
        let identity = format!("@alice:x:{device}");
        let v = ask(&store, 3, &[], "@alice:x", &identity, n as u64);
        assert!(v.admitted);
    }
    let connected = ["@alice:x:a:1", "@alice:x:b:1", "@alice:x:1:z", "@bob:x:D"];
    let v = ask(&store, 3, &connected, "@carol:x", "@carol:x:D", 10);
    assert_eq!(v.present, 2);
    assert!(v.admitted, "{v:?}");
}

#[test]
fn a_user_on_a_server_with_a_port_is_learnt() {
    let store = MemoryStore::default();
    assert!(ask(&store, 2, &[], "@a:x:8448", "@a:x:8448:D", 0).admitted);
    // Without the pairing, `@a:x:8448:D` would read as `@a:x`: the same user as this one.
    let v = ask(&store, 2, &["@a:x:8448:D"], "@a:x", "@a:x:E", 10);
    assert_eq!(v.present, 1);
    assert!(v.admitted);
    let v = ask(&store, 2, &["@a:x:8448:D", "@a:x:E"], "@b:x", "@b:x:D", 20);
    assert_eq!(v.present, 2);
    assert!(!v.admitted);
}

#[test]
fn a_user_whose_server_name_has_a_port_is_recognised_by_an_identity_never_learnt() {
    for (bob, first) in [
        ("@bob:hs.test:8448", "@bob:hs.test:8448:B1"),
        ("@bob:hs.test:8448", "@bob:hs.test:8448:b:1"),
        ("@bob:[::1]:8448", "@bob:[::1]:8448:B1"),
        ("@bob:10.0.0.1:8008", "@bob:10.0.0.1:8008:8448:B1"),
    ] {
        let store = MemoryStore::default();
        // bob connected before the guard saw him: `first` reads as `@bob:hs.test` by name.
        let full = [first, "@a:x:D"];
        let v = ask(&store, 2, &full, bob, &format!("{bob}:B2"), 0);
        assert!(v.admitted, "{first}: {v:?}");
        assert_eq!((v.present, v.reserved), (2, 0), "{first}");
        // A hashed identity of bob's (`/get_token`, MatrixRTC) asks the same.
        let v = ask(&store, 2, &full, bob, "hashOfBob", 10);
        assert!(v.admitted, "{first}: {v:?}");
        assert!(!ask(&store, 2, &full, "@c:x", "@c:x:D", 20).admitted);
        // His first device is learnt as his: alone in the call, he holds one place of two.
        assert!(ask(&store, 2, &[first], "@c:x", "@c:x:D", 30).admitted);
    }
}

#[test]
fn the_port_reading_never_adds_a_user_in_a_full_room() {
    let store = MemoryStore::default();
    // `@bob:hs.test` is in the call on two devices, one of them `8448:B1`: reading that one
    // as `@bob:hs.test:8448`'s would count one user more, so he asks as a newcomer.
    let full = ["@bob:hs.test:8448:B1", "@bob:hs.test:E", "@a:x:D"];
    let v = ask(
        &store,
        2,
        &full,
        "@bob:hs.test:8448",
        "@bob:hs.test:8448:B2",
        0,
    );
    assert_eq!(v.refusal, Some(Refusal::Full));
    assert_eq!(v.present, 2);
    // With a place free he gets in, as one more user.
    let v = ask(
        &store,
        3,
        &full,
        "@bob:hs.test:8448",
        "@bob:hs.test:8448:B2",
        10,
    );
    assert!(v.admitted);
    assert_eq!(v.present, 2);
    assert!(!ask(&store, 3, &full, "@c:x", "@c:x:D", 20).admitted);
}

#[test]
fn every_unseen_device_of_a_user_whose_server_name_has_a_port_is_theirs() {
    let store = MemoryStore::default();
    // Two devices of bob's, neither seen by the guard, both read as `@bob:hs.test` by name.
    let full = ["@bob:hs.test:8448:B1", "@bob:hs.test:8448:B2", "@a:x:D"];
    let v = ask(
        &store,
        2,
        &full,
        "@bob:hs.test:8448",
        "@bob:hs.test:8448:B3",
        0,
    );
    assert!(v.admitted, "{v:?}");
    assert!(!ask(&store, 2, &full, "@c:x", "@c:x:D", 10).admitted);
    // Both are learnt as his: without alice, carol gets the second place.
    let bob = ["@bob:hs.test:8448:B1", "@bob:hs.test:8448:B2"];
    assert!(ask(&store, 2, &bob, "@c:x", "@c:x:D", 20).admitted);
}

#[test]
fn unseen_devices_past_the_cap_never_refuse_the_user_whose_server_name_has_a_port() {
    let store = MemoryStore::default();
    let mut full: Vec<String> = (0..2 * MAX_IDENTITIES_PER_USER)
        .map(|n| format!("@bob:hs.test:8448:B{n}"))
        .collect();
    full.push("@a:x:D".to_owned());
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    for n in 0..3 {
        let device = format!("@bob:hs.test:8448:N{n}");
        let v = ask(&store, 2, &full, "@bob:hs.test:8448", &device, n * 10);
        assert!(v.admitted, "{v:?}");
    }
    assert!(!ask(&store, 2, &full, "@c:x", "@c:x:D", 100).admitted);
}

#[test]
fn an_identity_whose_server_may_end_in_a_port_is_learnt_whoever_it_names() {
    let store = MemoryStore::default();
    // `@bob:hs.test` asks with the device id `8448:B1`: the identity is learnt as his, so
    // `@bob:hs.test:8448` cannot claim it.
    assert!(ask(&store, 2, &[], "@bob:hs.test", "@bob:hs.test:8448:B1", 0).admitted);
    let full = ["@bob:hs.test:8448:B1", "@a:x:D"];
    let v = ask(
        &store,
        2,
        &full,
        "@bob:hs.test:8448",
        "@bob:hs.test:8448:B2",
        10,
    );
    assert_eq!(v.refusal, Some(Refusal::Full));
    assert!(ask(&store, 2, &full, "@bob:hs.test", "@bob:hs.test:E", 20).admitted);
}

#[test]
fn identities_per_user_are_capped_oldest_unconnected_first() {
    let store = MemoryStore::default();
    for n in 0..(MAX_IDENTITIES_PER_USER as u64 + 4) {
        assert!(ask(&store, 1, &[], "@a:x", &format!("hashA{n}"), n).admitted);
    }
    let record: RoomRecord = BUCKETS.get(&store, ROOM, 100).unwrap();
    assert_eq!(record.i.len(), MAX_IDENTITIES_PER_USER);
    // The newest identities are the ones kept.
    let last = format!("hashA{}", MAX_IDENTITIES_PER_USER + 3);
    assert!(!ask(&store, 1, &[&last], "@b:x", "hashB", 200).admitted);
}

#[test]
fn a_user_with_every_device_slot_connected_is_refused_another() {
    let store = MemoryStore::default();
    let connected: Vec<String> = (0..MAX_IDENTITIES_PER_USER)
        .map(|n| format!("hashA{n}"))
        .collect();
    for (n, identity) in connected.iter().enumerate() {
        assert!(ask(&store, 1, &[], "@a:x", identity, n as u64).admitted);
    }
    // Every learnt identity is connected: a further one has no place.
    let listed: Vec<&str> = connected.iter().map(String::as_str).collect();
    let participants: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    let q = question(
        1,
        Participants::Fresh {
            identities: &participants,
            sessions: &[],
            taken_ms: 100,
        },
        "@a:x",
        "hashAnew",
        100,
    );
    let Ok(Outcome::Decided(verdict)) = admit(&store, &q) else {
        panic!("no decision")
    };
    assert!(!verdict.admitted && verdict.refusal == Some(Refusal::TooManyDevices));
    // Another user still gets the place the room has.
    let q = question(
        2,
        Participants::Fresh {
            identities: &participants,
            sessions: &[],
            taken_ms: 101,
        },
        "@b:x",
        "hashB",
        101,
    );
    assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
}

#[test]
fn a_pairing_is_kept_a_day_at_most_past_its_last_sighting() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "hashA", 0).admitted);
    // Never seen connected (no list since): still known the next day's morning.
    let late = MAX_PAIRING_MS - 1;
    assert!(ask(&store, 1, &["hashA"], "@a:x", "hashB", late).admitted);
    let record: RoomRecord = BUCKETS.get(&store, ROOM, late).unwrap();
    assert!(record.i.iter().all(|p| p.until <= late + MAX_PAIRING_MS));
    // Seen then, and nobody looks for a day: forgotten, and it counts as a user of its own.
    let gone = late + MAX_PAIRING_MS;
    assert!(!ask(&store, 1, &["hashA"], "@a:x", "hashC", gone).admitted);
}

/// A decision on a list taken at `taken_ms`, at `now_ms`.
fn ask_on(
    store: &MemoryStore,
    max_users: u32,
    list: &[&str],
    taken_ms: u64,
    requester: &str,
    now_ms: u64,
) -> Outcome {
    let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    let identity = format!("{requester}:D");
    let q = question(
        max_users,
        fresh(&list, taken_ms),
        requester,
        &identity,
        now_ms,
    );
    admit(store, &q).unwrap()
}

fn admitted(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Decided(v) if v.admitted)
}

#[test]
fn a_list_taken_before_a_connection_never_undoes_what_a_newer_list_showed() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 2, &[], 0, "@b:x", 0)));
    // bob connects at 8; a list taken at 10 shows him and ends his reservation.
    assert!(admitted(ask_on(&store, 2, &["@b:x:D"], 10, "@c:x", 12)));
    // A list taken at 5, before bob connected, arrives last: bob still counts.
    let late = ask_on(&store, 2, &[], 5, "@d:x", 15);
    assert!(
        matches!(&late, Outcome::Decided(v) if !v.admitted && v.reserved == 2),
        "{late:?}"
    );
}

#[test]
fn a_list_asked_for_before_an_admission_never_ends_its_reservation() {
    let store = MemoryStore::default();
    // alice is in the call with D1 and gets a token for a second device at 10.
    assert!(admitted(ask_on(&store, 2, &["@a:x:D1"], 10, "@a:x", 10)));
    // A list asked for at 5 shows D1: it says nothing of the token of 10.
    assert!(admitted(ask_on(&store, 2, &["@a:x:D1"], 5, "@b:x", 12)));
    // D1 leaves; the second device has not connected yet: alice and bob hold the room.
    assert!(!admitted(ask_on(&store, 2, &[], 20, "@c:x", 20)));
}

#[test]
fn a_list_taken_before_a_reservation_lapsed_still_counts_its_user() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@b:x", 0)));
    // bob connected at 29.5 s; a list taken at 29 s cannot show it.
    assert!(!admitted(ask_on(&store, 1, &[], 29_000, "@c:x", 30_005)));
    // One taken after the reservation's end can.
    assert!(admitted(ask_on(&store, 1, &[], 30_000, "@c:x", 30_006)));
}

#[test]
fn a_list_older_than_a_minute_is_asked_for_again() {
    let store = MemoryStore::default();
    let outcome = ask_on(&store, 2, &[], 0, "@a:x", MAX_LIST_AGE_MS);
    assert_eq!(outcome, Outcome::NeedList);
    assert!(admitted(ask_on(&store, 2, &[], 1, "@a:x", MAX_LIST_AGE_MS)));
}

#[test]
fn a_list_too_long_to_cache_leaves_no_older_list_in_force() {
    let store = MemoryStore::default();
    let cached = |requester: &str, now_ms: u64| {
        let identity = format!("{requester}:D");
        let mut q = question(2, Participants::Cached, requester, &identity, now_ms);
        q.list_cache_ms = 1000;
        admit(&store, &q).unwrap()
    };
    let empty: Vec<String> = Vec::new();
    let mut q = question(2, fresh(&empty, 0), "@b:x", "@b:x:D", 0);
    q.list_cache_ms = 1000;
    assert!(admitted(admit(&store, &q).unwrap()));
    // bob connected, with more devices than a list the guard caches.
    let long: Vec<String> = (0..=MAX_CACHED_LIST)
        .map(|n| format!("@b:x:D{n}"))
        .collect();
    let mut q = question(2, fresh(&long, 10), "@c:x", "@c:x:D", 10);
    q.list_cache_ms = 1000;
    assert!(admitted(admit(&store, &q).unwrap()));
    // The empty list of 0 is not used as if bob had never come.
    assert_eq!(cached("@d:x", 20), Outcome::NeedList);
    assert!(!admitted(ask_on(&store, 2, &[], 5, "@d:x", 21)));
}

#[test]
fn an_older_list_never_replaces_a_newer_cached_one() {
    let store = MemoryStore::default();
    let with_cache = |list: &[&str], taken_ms: u64, requester: &str, now_ms: u64| {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        let identity = format!("{requester}:D");
        let mut q = question(3, fresh(&list, taken_ms), requester, &identity, now_ms);
        q.list_cache_ms = 1000;
        admit(&store, &q).unwrap()
    };
    assert!(admitted(with_cache(&["@a:x:D"], 10, "@b:x", 10)));
    assert!(admitted(with_cache(&[], 5, "@c:x", 12)));
    let record = BUCKETS.get(&store, ROOM, 12).unwrap();
    assert_eq!(record.p.map(|p| p.taken), Some(10));
}

#[test]
fn a_room_limited_above_any_count_cap_is_never_let_through_unchecked() {
    let store = MemoryStore::default();
    let mut admitted_users = 0;
    let refusal = loop {
        let user = format!("@u{admitted_users}:x");
        match ask_on(&store, 100_000, &[], 0, &user, 1) {
            Outcome::Decided(v) if v.admitted => admitted_users += 1,
            Outcome::Decided(v) => break v.refusal,
            Outcome::NeedList => panic!("a fresh list was given"),
        }
    };
    // The room's record holds several hundred reservations, then says it cannot.
    assert!(admitted_users >= 300, "{admitted_users}");
    assert_eq!(refusal, Some(Refusal::AtCapacity));
    // Users already counted still get in.
    assert!(admitted(ask_on(&store, 100_000, &[], 0, "@u0:x", 2)));
}

#[test]
fn a_call_of_many_hashed_identities_is_never_refused_while_it_has_space() {
    let store = MemoryStore::default();
    let mut connected: Vec<String> = Vec::new();
    for n in 0..300 {
        let user = format!("@u{n}:x");
        let identity = format!("hash{n}");
        let q = question(300, fresh(&connected, n), &user, &identity, n);
        let verdict = admit(&store, &q).unwrap();
        assert!(admitted(verdict.clone()), "user {n}: {verdict:?}");
        connected.push(identity);
    }
    let q = question(300, fresh(&connected, 400), "@late:x", "hashLate", 400);
    assert!(
        matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.refusal == Some(Refusal::Full))
    );
}

#[test]
fn a_connected_identity_is_remembered_after_a_quiet_hour() {
    let store = MemoryStore::default();
    assert!(ask(&store, 1, &[], "@a:x", "hashA1", 0).admitted);
    assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA1", 10).admitted);
    // Nobody asks for two hours; alice is still in the call and adds a device.
    let later = 2 * 3600 * 1000;
    assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA2", later).admitted);
    assert!(!ask(&store, 1, &["hashA1"], "@b:x", "hashB", later + 1).admitted);
}

#[test]
fn an_identity_that_left_and_came_back_is_remembered_after_a_quiet_hour() {
    let store = MemoryStore::default();
    assert!(ask(&store, 2, &[], "@a:x", "hashA1", 0).admitted);
    assert!(ask(&store, 2, &["hashA1"], "@a:x", "hashA1", 10).admitted);
    // A newer list shows her gone; she comes back on that device (its token is still valid).
    assert!(ask(&store, 2, &[], "@b:x", "hashB", 20).admitted);
    let record = BUCKETS.get(&store, ROOM, 20).unwrap();
    let a1 = record.i.iter().find(|p| p.identity == digest("hashA1"));
    assert_eq!(
        a1.map(|p| (p.seen, p.until)),
        Some((0, 10 + MAX_PAIRING_MS))
    );
    // Nobody asks for two hours; she is still in the call and adds a device.
    let later = 2 * 3600 * 1000;
    assert!(ask(&store, 2, &["hashA1", "hashB"], "@a:x", "hashA2", later).admitted);
    assert!(!ask(&store, 2, &["hashA1", "hashB"], "@c:x", "hashC", later + 1).admitted);
}

#[test]
fn a_user_whose_reservation_lapsed_may_not_take_the_last_place() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@h:x", 0)));
    // The hoarder never connects and asks again when the reservation lapses.
    let again = ask_on(&store, 1, &[], 30_001, "@h:x", 30_001);
    assert!(matches!(again, Outcome::Decided(v) if v.refusal == Some(Refusal::Cooling)));
    assert!(admitted(ask_on(&store, 1, &[], 30_002, "@legit:x", 30_002)));
    // With a place to spare the hoarder may come; once cooled down, to the last place too.
    assert!(admitted(ask_on(&store, 3, &[], 30_003, "@h:x", 30_003)));
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@h:x", 0)));
    assert!(!admitted(ask_on(&store, 1, &[], 30_001, "@h:x", 30_001)));
    assert!(admitted(ask_on(&store, 1, &[], 60_000, "@h:x", 60_000)));
    // A second lapse cools twice as long.
    assert!(!admitted(ask_on(&store, 1, &[], 90_000, "@h:x", 90_000)));
    assert!(!admitted(ask_on(&store, 1, &[], 149_999, "@h:x", 149_999)));
    assert!(admitted(ask_on(&store, 1, &[], 150_000, "@h:x", 150_000)));
}

#[test]
fn hoarders_asking_again_leave_a_legitimate_user_a_place() {
    let store = MemoryStore::default();
    let hoarders = ["@h1:x", "@h2:x", "@h3:x"];
    for h in hoarders {
        assert!(admitted(ask_on(&store, 3, &[], 0, h, 0)));
    }
    assert!(!admitted(ask_on(&store, 3, &[], 1, "@legit:x", 1)));
    // Their reservations lapse; they ask again at once, and one of them is left out.
    let back: Vec<bool> = hoarders
        .iter()
        .map(|h| admitted(ask_on(&store, 3, &[], 30_001, h, 30_001)))
        .collect();
    assert_eq!(back, [true, true, false]);
    assert!(admitted(ask_on(&store, 3, &[], 30_002, "@legit:x", 30_002)));
}

#[test]
fn a_user_seen_in_the_call_is_not_held_to_cooling() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@a:x", 0)));
    // alice connected, and her reservation lapsed before a list said so.
    assert!(!admitted(ask_on(
        &store,
        1,
        &["@a:x:D"],
        40_000,
        "@b:x",
        40_000
    )));
    assert!(admitted(ask_on(&store, 1, &[], 50_000, "@a:x", 50_000)));
}

#[test]
fn a_clock_that_goes_back_keeps_every_place_counted() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 2, &[], 100_000, "@a:x", 100_000)));
    assert!(admitted(ask_on(
        &store,
        2,
        &["@a:x:D"],
        100_010,
        "@b:x",
        100_010
    )));
    // The clock steps back ten seconds: a list "taken" then still counts alice.
    assert!(!admitted(ask_on(&store, 2, &[], 90_000, "@c:x", 90_000)));
}

#[test]
fn a_full_bucket_refuses_and_never_lets_through() {
    struct Refusing;
    impl SharedStore for Refusing {
        fn get(&self, _: &str) -> Option<(Vec<u8>, u32)> {
            Some((b"[]".to_vec(), 1))
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::Full)
        }
    }
    let empty: Vec<String> = Vec::new();
    let q = question(5, fresh(&empty, 0), "@a:x", "@a:x:D", 0);
    assert!(matches!(
        admit(&Refusing, &q),
        Ok(Outcome::Decided(v)) if !v.admitted && v.refusal == Some(Refusal::AtCapacity)
    ));
}

#[test]
fn a_user_listed_only_by_an_older_list_is_looked_for_again_in_a_full_room() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@f:x", 0)));
    // f connects; a list taken at 20 (f gone) gives the place to a.
    assert!(!admitted(ask_on(&store, 1, &["@f:x:D"], 10, "@g:x", 11)));
    assert!(admitted(ask_on(&store, 1, &[], 20, "@a:x", 21)));
    // f's own request was asked about at 15, while f was there: not enough to let f back in.
    assert_eq!(
        ask_on(&store, 1, &["@f:x:D"], 15, "@f:x", 22),
        Outcome::NeedList
    );
    assert!(!admitted(ask_on(&store, 1, &[], 23, "@f:x", 23)));
}

#[test]
fn a_user_counted_only_for_a_list_that_may_predate_them_is_looked_for_again_when_it_matters() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 2, &[], 0, "@f:x", 0)));
    assert!(admitted(ask_on(&store, 2, &["@f:x:D"], 10, "@a:x", 12)));
    // A list of 5 does not show f, who may have connected since. As a newcomer f would get a
    // free place as well: no list can change the answer, and none is asked for.
    assert!(admitted(ask_on(&store, 2, &[], 5, "@f:x", 13)));
    // h's reservation lapsed (at 30 s) after the list of 5 was taken. In the call, h would get
    // in; as a newcomer, h may not take the last place while cooling: a list is to say which.
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 1, &[], 0, "@h:x", 0)));
    assert_eq!(ask_on(&store, 1, &[], 5, "@h:x", 30_001), Outcome::NeedList);
    let fresh = ask_on(&store, 1, &[], 30_002, "@h:x", 30_002);
    assert!(matches!(fresh, Outcome::Decided(v) if v.refusal == Some(Refusal::Cooling)));
}

/// Ended calls leave records behind for a day (pairings, lapses) that only make the guard
/// kinder: a bucket full of them still takes a new room, while a bucket full of live
/// reservations refuses (`AtCapacity`) rather than forget one.
#[test]
fn a_bucket_full_of_ended_calls_takes_new_rooms() {
    let store = MemoryStore::default();
    let bucket = BUCKETS.key_for("!first:x");
    let rooms: Vec<String> = (0..)
        .map(|i| format!("!r{i}:x"))
        .filter(|room| BUCKETS.key_for(room) == bucket)
        .take(400)
        .collect();
    let nobody: Vec<String> = Vec::new();
    let join = |room: &str, user: &str, now_ms: u64| {
        // A hashed identity, as on `/get_token`: the record pairs it with its user.
        let identity = format!("hashed{user}{room}");
        let mut q = question(5, fresh(&nobody, now_ms), user, &identity, now_ms);
        q.room = room;
        decided(&store, &q)
    };
    let first: Vec<Verdict> = rooms.iter().map(|room| join(room, "@a:x", 0)).collect();
    let admitted = first.iter().filter(|v| v.admitted).count();
    assert!((50..400).contains(&admitted), "{admitted} rooms fit");
    assert!(first
        .iter()
        .all(|v| v.admitted || v.refusal == Some(Refusal::AtCapacity)));
    assert!(store.byte_count() <= 32 * 1024);
    // Nobody connected: once no list taken before the reservations ended can be decided on,
    // the rooms refused then take the places of those records.
    let later = 30_000 + MAX_LIST_AGE_MS;
    let refused_then = rooms.iter().zip(&first).filter(|(_, v)| !v.admitted);
    for (room, _) in refused_then {
        let verdict = join(room, "@b:x", later);
        assert!(verdict.admitted, "{room}: {verdict:?}");
    }
    assert!(store.byte_count() <= 32 * 1024);
}

/// Found by the generated interleavings: bob, admitted at 0, is in the call at 20,000, leaves,
/// and is admitted again at 20,001 on a list that no longer shows him; the list of 20,000 is
/// decided on only after that. His latest admission starts a run of its own (he was in the
/// call since his first), so it holds his place for a full reservation time.
#[test]
fn an_admission_after_being_in_the_call_holds_a_full_reservation_time_whatever_the_order() {
    let store = MemoryStore::default();
    assert!(admitted(ask_on(&store, 2, &[], 0, "@b:x", 0)));
    assert!(admitted(ask_on(&store, 2, &[], 20_001, "@b:x", 20_001)));
    // alice's request, decided on the list taken when she asked (it shows bob).
    assert!(admitted(ask_on(
        &store,
        2,
        &["@b:x:D"],
        20_000,
        "@a:x",
        20_001
    )));
    // Past his first reservation time, within his second: bob is not a lapsed hoarder.
    let again = ask_on(&store, 2, &[], 40_001, "@b:x", 40_001);
    assert!(
        matches!(again, Outcome::Decided(ref v) if v.admitted),
        "{again:?}"
    );
}

#[test]
fn only_a_token_issued_to_its_user_lapses_into_cooling() {
    // A place taken in the victim's name by a request that never brought a token (still in
    // flight when its time ran out, or one lk-jwt-service never answered): no cooling.
    let store = MemoryStore::default();
    assert!(ask_releasable(&store, 1, "@victim:x", 0).admitted);
    assert!(admitted(ask_on(
        &store,
        1,
        &[],
        30_001,
        "@victim:x",
        30_001
    )));
    // The same admission once its token passed to the client: its lapse cools the user.
    let store = MemoryStore::default();
    assert!(ask_releasable(&store, 1, "@h:x", 0).admitted);
    assert_eq!(
        issued(&store, ROOM, "@h:x", None, 10, 30_000),
        Ok(Issued::Pinned)
    );
    let again = ask_on(&store, 1, &[], 30_001, "@h:x", 30_001);
    assert!(matches!(again, Outcome::Decided(v) if v.refusal == Some(Refusal::Cooling)));
    // A pinned place is given back by no refusal or abandoned request.
    let store = MemoryStore::default();
    assert!(ask_releasable(&store, 1, "@a:x", 0).admitted);
    assert!(ask_releasable(&store, 1, "@a:x", 1).admitted);
    assert_eq!(
        issued(&store, ROOM, "@a:x", None, 2, 30_000),
        Ok(Issued::Pinned)
    );
    assert_eq!(release(&store, ROOM, "@a:x", 3), Ok(false));
    assert!(!ask_releasable(&store, 1, "@b:x", 4).admitted);
}

#[test]
fn a_stand_in_takes_on_its_owners_cooling_when_its_place_is_rekeyed() {
    let store = MemoryStore::default();
    let stand_in = "unverified remote";
    // The stand-in of remote asks with alice in the room (limit 2: the last place).
    let ask_last_place = |now_ms: u64| {
        let list = vec!["@a:x:D".to_owned()];
        let mut q = question(2, fresh(&list, now_ms), stand_in, "", now_ms);
        q.releasable = true;
        q.unverified = true;
        match admit(&store, &q) {
            Ok(Outcome::Decided(verdict)) => verdict,
            other => panic!("{other:?}"),
        }
    };
    let rekey = |now_ms: u64| issued(&store, ROOM, stand_in, Some("@m:remote"), now_ms, 30_000);
    // Mallory's first token: her place, which lapses unused at 30,001.
    assert!(ask_last_place(0).admitted);
    assert_eq!(rekey(1), Ok(Issued::Rekeyed));
    // Her next fresh token is decided as the stand-in, which knows nothing of her yet.
    assert!(ask_last_place(30_001).admitted);
    assert_eq!(rekey(30_002), Ok(Issued::Rekeyed));
    // Once that one lapses too, the stand-in cools as she does (a second strike, 60 s).
    let refused = ask_last_place(60_002);
    assert_eq!(refused.refusal, Some(Refusal::Cooling), "{refused:?}");
    assert_eq!(ask_last_place(120_000).refusal, Some(Refusal::Cooling));
    assert!(ask_last_place(120_001).admitted);
}
