#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;
use crate::occupancy::{admit, Outcome, Participants, Refusal, Request, Verdict};
use crate::state::store::MemoryStore;

const ROOM: &str = "alias";
const VERIFY_MS: u64 = 60_000;

/// A question decided on the room's view (or whatever else the record holds).
fn on_record<'a>(requester: &'a str, identity: &'a str, now_ms: u64) -> Request<'a> {
    Request {
        room: ROOM,
        max_users: 2,
        participants: Participants::Cached,
        requester,
        identity,
        reservation_ms: 30_000,
        list_cache_ms: 0,
        verify_ms: VERIFY_MS,
        doubt_ms: 0,
        now_ms,
        releasable: false,
        exempt: false,
        unverified: false,
    }
}

fn ask(store: &MemoryStore, requester: &str, identity: &str, now_ms: u64) -> Option<Verdict> {
    match admit(store, &on_record(requester, identity, now_ms)).unwrap() {
        Outcome::Decided(verdict) => Some(verdict),
        Outcome::NeedList => None,
    }
}

/// Decides with a list taken now, which verifies the view.
fn ask_listing(
    store: &MemoryStore,
    listed: &[&str],
    requester: &str,
    identity: &str,
    now_ms: u64,
) -> Verdict {
    let identities: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    let sessions: Vec<Session> = vec![Session::at(1); listed.len()];
    let mut q = on_record(requester, identity, now_ms);
    q.participants = Participants::Fresh {
        identities: &identities,
        sessions: &sessions,
        taken_ms: now_ms,
    };
    match admit(store, &q).unwrap() {
        Outcome::Decided(verdict) => verdict,
        Outcome::NeedList => panic!("a fresh list needs no other"),
    }
}

fn event(
    store: &MemoryStore,
    identity: &str,
    session: u64,
    presence: Presence,
    now: u64,
) -> Applied {
    let event = RoomEvent::Participant {
        identity: identity.to_owned(),
        session: session.into(),
        presence,
    };
    observe(store, ROOM, &event, now).unwrap()
}

#[test]
fn a_verified_view_decides_refusals_without_a_list() {
    let store = MemoryStore::default();
    let v = ask_listing(&store, &["@a:x:D", "@b:x:D"], "@c:x", "@c:x:D", 1_000);
    assert_eq!(v.refusal, Some(Refusal::Full));
    assert!(!v.on_view);
    let v = ask(&store, "@c:x", "@c:x:D", 5_000).expect("decided on the view");
    assert_eq!((v.refusal, v.on_view), (Some(Refusal::Full), true));
    // A user in the call comes in with another device on the view as well.
    let v = ask(&store, "@a:x", "@a:x:E", 6_000).unwrap();
    assert!(v.admitted && v.on_view);
    // Past the verify time the view is asked for again.
    assert_eq!(ask(&store, "@c:x", "@c:x:D", 1_000 + VERIFY_MS), None);
}

#[test]
fn a_join_ends_the_reservation_and_a_leave_frees_the_place_at_once() {
    let store = MemoryStore::default();
    // The room is limited to two: alice is admitted on an empty list.
    assert!(ask_listing(&store, &[], "@alice:x", "H-alice", 1_000).admitted);
    // Her client connects with the token.
    assert_eq!(
        event(&store, "H-alice", 1_500, Presence::Joined, 1_600),
        Applied::Changed
    );
    assert!(ask(&store, "@bob:x", "H-bob", 2_000).unwrap().admitted);
    event(&store, "H-bob", 2_100, Presence::Joined, 2_200);
    let carol = ask(&store, "@carol:x", "H-carol", 3_000).unwrap();
    assert_eq!((carol.refusal, carol.on_view), (Some(Refusal::Full), true));
    // Alice leaves: her place is free as soon as the event is here.
    event(&store, "H-alice", 1_500, Presence::Left, 10_000);
    let carol = ask(&store, "@carol:x", "H-carol", 10_001).unwrap();
    assert!(carol.admitted && carol.on_view);
}

#[test]
fn a_session_older_than_the_admission_does_not_end_its_reservation() {
    let store = MemoryStore::default();
    assert!(ask_listing(&store, &[], "@alice:x", "H-alice", 5_000).admitted);
    // A session of the same identity that began before the admission (a late event).
    event(&store, "H-alice", 4_000, Presence::Joined, 5_100);
    event(&store, "H-alice", 4_000, Presence::Left, 5_200);
    assert!(ask(&store, "@bob:x", "H-bob", 6_000).unwrap().admitted);
    // Alice's token is still to be used: she keeps her place.
    let carol = ask(&store, "@carol:x", "H-carol", 7_000).unwrap();
    assert_eq!(carol.refusal, Some(Refusal::Full));
}

#[test]
fn events_in_any_order_leave_a_session_that_ended_gone() {
    let store = MemoryStore::default();
    ask_listing(&store, &[], "@alice:x", "@alice:x:D", 1_000);
    // The leave arrives before the join of the same session (a retry that overtook it).
    event(&store, "@bob:x:D", 1_100, Presence::Left, 1_200);
    assert_eq!(
        event(&store, "@bob:x:D", 1_100, Presence::Joined, 1_300),
        Applied::Known
    );
    let v = ask(&store, "@carol:x", "@carol:x:D", 2_000).unwrap();
    assert!(v.admitted, "bob is not in the call");
    // A replayed join of a session that ended changes nothing either.
    event(&store, "@dave:x:D", 1_500, Presence::Joined, 2_100);
    event(&store, "@dave:x:D", 1_500, Presence::Left, 2_200);
    assert_eq!(
        event(&store, "@dave:x:D", 1_500, Presence::Joined, 2_300),
        Applied::Known
    );
}

#[test]
fn a_list_taken_before_an_event_arrived_does_not_undo_it() {
    let store = MemoryStore::default();
    ask_listing(&store, &[], "@alice:x", "@alice:x:D", 1_000);
    event(&store, "@bob:x:D", 4_800, Presence::Joined, 5_000);
    // A list asked for at 4,900 (before bob's event arrived) is decided on at 5,100.
    let identities = vec!["@alice:x:D".to_owned()];
    let mut q = on_record("@carol:x", "@carol:x:D", 5_100);
    let sessions = [Session::at(1_100)];
    q.participants = Participants::Fresh {
        identities: &identities,
        sessions: &sessions,
        taken_ms: 4_900,
    };
    assert!(matches!(admit(&store, &q).unwrap(), Outcome::Decided(v) if !v.admitted));
    let dave = ask(&store, "@dave:x", "@dave:x:D", 6_000).unwrap();
    assert_eq!((dave.refusal, dave.on_view), (Some(Refusal::Full), true));
}

#[test]
fn a_late_leave_of_an_earlier_session_does_not_hide_a_participant_a_list_showed() {
    let store = MemoryStore::default();
    // The list shows bob in his second session (joined at 3,000).
    let identities = vec!["@bob:x:D".to_owned()];
    let mut q = on_record("@alice:x", "@alice:x:D", 4_000);
    let sessions = [Session::at(3_000)];
    q.participants = Participants::Fresh {
        identities: &identities,
        sessions: &sessions,
        taken_ms: 4_000,
    };
    assert!(matches!(admit(&store, &q).unwrap(), Outcome::Decided(v) if v.admitted));
    // The leave of his first session arrives late.
    assert_eq!(
        event(&store, "@bob:x:D", 2_000, Presence::Left, 4_500),
        Applied::Known
    );
    let carol = ask(&store, "@carol:x", "@carol:x:D", 5_000).unwrap();
    assert_eq!(carol.refusal, Some(Refusal::Full));
}

#[test]
fn a_lapsed_reservation_counts_on_the_view_until_a_list_or_an_event_says_more() {
    let store = MemoryStore::default();
    let mut first = on_record("@alice:x", "@alice:x:D", 1_000);
    first.participants = Participants::Fresh {
        identities: &[],
        sessions: &[],
        taken_ms: 1_000,
    };
    first.verify_ms = 120_000;
    assert!(matches!(admit(&store, &first).unwrap(), Outcome::Decided(v) if v.admitted));
    let mut bob = on_record("@bob:x", "@bob:x:D", 1_100);
    bob.verify_ms = 120_000;
    assert!(matches!(admit(&store, &bob).unwrap(), Outcome::Decided(v) if v.admitted));
    event(&store, "@bob:x:D", 1_200, Presence::Joined, 1_300);
    // Alice's reservation ended at 31,000 unseen; her participant_joined may be on its way
    // (LiveKit takes up to 45 s): a refusal on the view would rest on her, so a list is asked.
    let mut carol = on_record("@carol:x", "@carol:x:D", 50_000);
    carol.verify_ms = 120_000;
    assert_eq!(admit(&store, &carol).unwrap(), Outcome::NeedList);
    // Her event arrives: she is in the call, and carol is refused on the view.
    event(&store, "@alice:x:D", 20_000, Presence::Joined, 50_001);
    carol.now_ms = 50_002;
    assert!(
        matches!(admit(&store, &carol).unwrap(), Outcome::Decided(v) if !v.admitted && v.on_view)
    );
}

#[test]
fn unguarded_rooms_and_finished_rooms() {
    let store = MemoryStore::default();
    let before = store.byte_count();
    assert_eq!(
        event(&store, "@a:x:D", 1, Presence::Joined, 10),
        Applied::NotGuarded
    );
    assert_eq!(store.byte_count(), before);
    ask_listing(&store, &["@a:x:D", "@b:x:D"], "@c:x", "@c:x:D", 1_000);
    assert!(ask(&store, "@c:x", "@c:x:D", 2_000).is_some());
    assert_eq!(
        observe(&store, ROOM, &RoomEvent::Finished, 2_500).unwrap(),
        Applied::Changed
    );
    // Nothing is known of the room now but what a list says.
    assert_eq!(ask(&store, "@c:x", "@c:x:D", 3_000), None);
}

#[test]
fn a_leave_heard_before_its_join_ends_the_reservation_of_the_session() {
    let store = MemoryStore::default();
    assert!(ask_listing(&store, &["@alice:x:D"], "@bob:x", "H-bob", 1_000).admitted);
    // Bob's session (after his admission) ended; its join arrives last.
    event(&store, "H-bob", 1_500, Presence::Left, 3_000);
    event(&store, "H-bob", 1_500, Presence::Joined, 3_100);
    let carol = ask(&store, "@carol:x", "H-carol", 4_000).unwrap();
    assert!(carol.admitted && carol.on_view);
}

#[test]
fn a_view_past_the_rooms_budget_is_dropped_and_the_room_asked_again() {
    let store = MemoryStore::default();
    ask_listing(&store, &["@a:x:D", "@b:x:D"], "@c:x", "@c:x:D", 1_000);
    for n in 0..2_000u64 {
        event(
            &store,
            &format!("flood-{n}"),
            n + 1,
            Presence::Joined,
            2_000 + n,
        );
    }
    let record = crate::occupancy::BUCKETS.get(&store, ROOM, 5_000);
    assert!(record.map_or(0, |r| r.size()) <= crate::occupancy::ROOM_BUDGET);
    assert_eq!(
        ask(&store, "@c:x", "@c:x:D", 5_000),
        None,
        "no view: a list is asked for"
    );
}

#[test]
fn a_departure_the_view_heard_of_since_holds_no_place() {
    let store = MemoryStore::default();
    assert!(ask_listing(&store, &["@alice:x:D"], "@bob:x", "H-bob", 1_000).admitted);
    // Bob joins and leaves within a second: his leave frees the place at once.
    event(&store, "H-bob", 1_100, Presence::Joined, 1_200);
    event(&store, "H-bob", 1_100, Presence::Left, 1_900);
    let carol = ask(&store, "@carol:x", "H-carol", 1_901).unwrap();
    assert!(carol.admitted && carol.on_view);
}

#[test]
fn a_leave_while_a_list_is_on_its_way_is_kept_for_it() {
    let store = MemoryStore::default();
    // No record of the room yet: the flow opens its view as it asks LiveKit.
    open(&store, ROOM, 1_000).unwrap();
    // Bob, in the list being taken, leaves before it is answered.
    event(&store, "@bob:x:D", 500, Presence::Left, 1_100);
    let identities = vec!["@bob:x:D".to_owned()];
    let mut q = on_record("@carol:x", "@carol:x:D", 1_200);
    q.max_users = 1;
    let sessions = [Session::at(500)];
    q.participants = Participants::Fresh {
        identities: &identities,
        sessions: &sessions,
        taken_ms: 1_000,
    };
    let carol = admit(&store, &q).unwrap();
    assert!(
        matches!(carol, Outcome::Decided(v) if v.admitted),
        "bob is gone"
    );
}

#[test]
fn the_leave_of_a_session_before_the_admission_does_not_settle_a_lapse_on_the_view() {
    let store = MemoryStore::default();
    assert!(ask_listing(&store, &[], "@alice:x", "@alice:x:D", 1_000).admitted);
    // Alice connects (session 1,500, its join still on its way) and is admitted again; she
    // leaves and connects with her new token (its join on its way too). Her first run's time
    // runs out; then the leave of her first session arrives.
    assert!(
        ask(&store, "@alice:x", "@alice:x:E", 2_000)
            .unwrap()
            .admitted
    );
    event(&store, "@alice:x:D", 1_500, Presence::Left, 40_000);
    assert!(ask(&store, "@bob:x", "@bob:x:D", 40_001).unwrap().admitted);
    // Alice may be in the call: carol is not refused on the view, a list is asked for.
    assert_eq!(ask(&store, "@carol:x", "@carol:x:D", 40_002), None);
}

/// A join LiveKit delivers late, after a list taken once its session was over (its leave still
/// on the way), shows its user in the call: before that user takes a place a newcomer could
/// not, a list is asked for, and it shows them gone.
#[test]
fn a_late_join_of_a_session_over_does_not_let_its_user_back_into_a_full_room() {
    // Alice connected at 1,000 and left; a list at 20,000 shows only bob; carol is admitted.
    // Alice's join of 1,000 arrives then, in the millisecond of that list or later.
    for heard in [20_000, 20_500] {
        let store = MemoryStore::default();
        assert!(ask_listing(&store, &["@b:x:D"], "@c:x", "@c:x:D", 20_000).admitted);
        event(&store, "@a:x:D", 1_000, Presence::Joined, heard);
        // Bob and carol hold the two places: alice's request waits for a list...
        assert_eq!(ask(&store, "@a:x", "@a:x:D2", 21_000), None);
        // ...which does not show her.
        let v = ask_listing(&store, &["@b:x:D"], "@a:x", "@a:x:D2", 21_000);
        assert_eq!(v.refusal, Some(Refusal::Full), "heard at {heard}");
    }
    // In a room with a place to spare, she is decided on the view at once.
    let store = MemoryStore::default();
    assert!(ask_listing(&store, &[], "@c:x", "@c:x:D", 20_000).admitted);
    event(&store, "@a:x:D", 1_000, Presence::Joined, 20_500);
    assert!(ask(&store, "@a:x", "@a:x:D2", 21_000).is_some_and(|v| v.admitted));
}

#[test]
fn a_user_whose_server_name_has_a_port_is_recognised_on_the_view() {
    let store = MemoryStore::default();
    // bob connected before the guard saw him; the list verifies the view.
    let full = ["@bob:hs.test:8448:B1", "@a:x:D"];
    let v = ask_listing(&store, &full, "@c:x", "@c:x:D", 1_000);
    assert_eq!(v.refusal, Some(Refusal::Full));
    let bob = "@bob:hs.test:8448";
    let v = ask(&store, bob, "@bob:hs.test:8448:B2", 2_000).expect("decided on the view");
    assert!(v.admitted && v.on_view, "{v:?}");
    let v = ask(&store, "@c:x", "@c:x:D", 3_000).expect("decided on the view");
    assert_eq!(v.refusal, Some(Refusal::Full));
}

#[test]
fn an_identity_of_the_port_reading_shown_only_by_events_asks_for_a_list() {
    let store = MemoryStore::default();
    let v = ask_listing(&store, &["@a:x:D", "@c:x:D"], "@d:x", "@d:x:D", 1_000);
    assert_eq!(v.refusal, Some(Refusal::Full));
    // A join heard since the list, of an identity bob's name may give: it may be late, its
    // session long over; a list is to say whether bob is in the call.
    event(
        &store,
        "@bob:hs.test:8448:B1",
        1_500,
        Presence::Joined,
        1_600,
    );
    let bob = "@bob:hs.test:8448";
    assert_eq!(ask(&store, bob, "@bob:hs.test:8448:B2", 2_000), None);
}

/// An event of `identity`'s session begun in second `second`, with sid `sid`, as LiveKit
/// versions that give only `joinedAt` write it.
fn event_of_second(
    store: &MemoryStore,
    identity: &str,
    (second, sid): (u64, &str),
    presence: Presence,
    now: u64,
) -> Applied {
    let event = RoomEvent::Participant {
        identity: identity.to_owned(),
        session: Session::of(0, second, sid),
        presence,
    };
    observe(store, ROOM, &event, now).unwrap()
}

#[test]
fn a_participant_who_reconnects_within_a_second_stays_in_the_view() {
    for leave_first in [true, false] {
        let store = MemoryStore::default();
        let v = ask_listing(&store, &["@a:x:D"], "@b:x", "@b:x:D", 1_000);
        assert!(v.admitted);
        // bob connects, drops and reconnects within the second 2 (LiveKit gives no ms).
        event_of_second(&store, "@b:x:D", (2, "PA_1"), Presence::Joined, 2_100);
        let (first, second) = if leave_first {
            ((2, "PA_1"), (2, "PA_2"))
        } else {
            ((2, "PA_2"), (2, "PA_1"))
        };
        let presence = |s: (u64, &str)| {
            if s.1 == "PA_1" {
                Presence::Left
            } else {
                Presence::Joined
            }
        };
        assert_eq!(
            event_of_second(&store, "@b:x:D", first, presence(first), 2_200),
            Applied::Changed
        );
        assert_eq!(
            event_of_second(&store, "@b:x:D", second, presence(second), 2_300),
            Applied::Changed
        );
        // Replays of the ended session change nothing.
        for p in [Presence::Joined, Presence::Left] {
            let replay = event_of_second(&store, "@b:x:D", (2, "PA_1"), p, 2_400);
            assert_eq!(replay, Applied::Known, "leave first: {leave_first}");
        }
        // bob is in the call: carol is refused, on the view; bob gets another device.
        let carol = ask(&store, "@carol:x", "@carol:x:D", 40_000).expect("on the view");
        assert_eq!(
            carol.refusal,
            Some(Refusal::Full),
            "leave first: {leave_first}"
        );
        assert!(carol.on_view);
        // The new session ends: bob has left, and carol gets in.
        event_of_second(&store, "@b:x:D", (2, "PA_2"), Presence::Left, 40_100);
        let carol = ask(&store, "@carol:x", "@carol:x:D", 40_200).expect("on the view");
        assert!(carol.admitted, "leave first: {leave_first}");
    }
}

#[test]
fn a_list_tells_a_session_of_the_second_of_one_that_ended_from_it() {
    let store = MemoryStore::default();
    ask_listing(&store, &[], "@b:x", "@b:x:D", 1_000);
    event_of_second(&store, "@b:x:D", (2, "PA_1"), Presence::Joined, 2_100);
    event_of_second(&store, "@b:x:D", (2, "PA_1"), Presence::Left, 2_200);
    // A list taken since shows bob in another session of that second.
    let identities = vec!["@b:x:D".to_owned(), "@a:x:D".to_owned()];
    let sessions = [Session::of(0, 2, "PA_2"), Session::at(1)];
    let mut q = on_record("@carol:x", "@carol:x:D", 3_000);
    q.participants = Participants::Fresh {
        identities: &identities,
        sessions: &sessions,
        taken_ms: 3_000,
    };
    assert!(matches!(admit(&store, &q).unwrap(), Outcome::Decided(v) if !v.admitted));
    // A late join of the session that ended changes nothing; the end of the one listed does.
    let late = event_of_second(&store, "@b:x:D", (2, "PA_1"), Presence::Joined, 3_100);
    assert_eq!(late, Applied::Known);
    event_of_second(&store, "@b:x:D", (2, "PA_2"), Presence::Left, 3_200);
    let carol = ask(&store, "@carol:x", "@carol:x:D", 3_300).expect("on the view");
    assert!(carol.admitted);
}
