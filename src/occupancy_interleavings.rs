use super::*;
use crate::store::MemoryStore;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const ROOM: &str = "alias";
/// Verified users, then stand-ins for unverified requesters (`/sfu/get` tokens of
/// another homeserver).
const USERS: [&str; 8] = [
    "@a:x",
    "@b:x",
    "@c:x",
    "@d:x",
    "@e:x",
    "unverified 1",
    "unverified 2",
    "unverified 3",
];
const VERIFIED: usize = 5;

#[derive(Debug, Clone)]
enum Step {
    /// A request of this user (or stand-in) reaches the guard.
    Ask(usize),
    /// lk-jwt-service answers the n-th unanswered request: a token, or a refusal.
    Answer(usize, bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..USERS.len()).prop_map(Step::Ask),
        (0..8usize, any::<bool>()).prop_map(|(n, ok)| Step::Answer(n, ok)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn places_are_held_exactly_by_pending_requests_and_issued_tokens(
        limit in 1u32..4,
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let store = MemoryStore::default();
        let mut pending: Vec<usize> = Vec::new();
        let mut tokens: BTreeSet<usize> = BTreeSet::new();
        for (t, step) in steps.iter().enumerate() {
            let now_ms = t as u64; // well within the reservation time
            match *step {
                Step::Ask(user) => {
                    let q = Request {
                        room: ROOM,
                        max_users: limit,
                        participants: Participants::Fresh { identities: &[], sessions: &[], taken_ms: now_ms },
                        requester: USERS[user],
                        identity: "",
                        reservation_ms: 60_000,
                        list_cache_ms: 0,
                        verify_ms: 0,
                        doubt_ms: 0,
                        now_ms,
                        releasable: true,
                        exempt: false,
                        unverified: user >= VERIFIED,
                    };
                    let holding: BTreeSet<usize> =
                        pending.iter().copied().chain(tokens.iter().copied()).collect();
                    let Ok(Outcome::Decided(verdict)) = admit(&store, &q) else {
                        panic!("no decision");
                    };
                    let free = holding.len() < limit as usize;
                    let room_for_one_more = if user >= VERIFIED {
                        !holding.contains(&user) && free
                    } else {
                        holding.contains(&user) || free
                    };
                    prop_assert_eq!(verdict.admitted, room_for_one_more, "admission of {}", user);
                    if verdict.admitted {
                        prop_assert!(verdict.holds);
                        pending.push(user);
                    }
                }
                Step::Answer(n, issued) => {
                    if pending.is_empty() {
                        continue;
                    }
                    let user = pending.remove(n % pending.len());
                    if issued {
                        tokens.insert(user);
                    } else {
                        release(&store, ROOM, USERS[user], now_ms).map_err(|e| {
                            TestCaseError::fail(format!("release: {e:?}"))
                        })?;
                    }
                }
            }
            let holding: BTreeSet<String> = pending
                .iter()
                .chain(tokens.iter())
                .map(|u| digest(USERS[*u]))
                .collect();
            prop_assert!(holding.len() <= limit as usize);
            let reserved: BTreeMap<String, u32> = BUCKETS
                .get(&store, ROOM, now_ms)
                .map(|record| record.r.iter().map(|res| (res.user.clone(), res.holds)).collect())
                .unwrap_or_default();
            prop_assert_eq!(reserved.keys().cloned().collect::<BTreeSet<_>>(), holding);
        }
    }
}

/// Generated interleavings of everything the room's record hears of, checked against a
/// reference model of who may be in the call. Requests are decided on participant lists
/// taken when they were asked for and answered in any order (or asked again); users connect
/// with the token of their latest admission, leave, and the clock moves by milliseconds,
/// reservation times, minutes and hours, or steps back (with no list in flight).
///
/// The model: a user *holds a place* while connected, or from the first admission of their run
/// until `reservation_ms` later, unless a list decided on, taken since their latest admission,
/// showed them connected (from then on they hold it while connected). A list decided on that
/// shows them connected after their run began (before their latest admission) starts a run at
/// the latest admission. Users may connect only while they hold a place by admission. Checked
/// after every step and decision:
/// - I1: users holding a place never exceed the limit;
/// - I2: a user in the list decided on, or holding a place by admission, is never refused;
/// - I3: nothing fails or is refused for capacity, and a refusal for a full room (or the
///   last place, for a user cooling down) is only given when the users the list shows, those
///   connected within [`MAX_LIST_AGE_MS`] before it was taken and those admitted within a
///   reservation time before it fill the room.
mod orders {
    use super::*;

    const USERS: [&str; 6] = ["@a:x", "@b:x", "@c:x", "@d:x", "@e:x", "@f:x"];
    const RESERVATION_MS: u64 = 30_000;
    const START_MS: u64 = 1_000_000_000;

    /// Users 0-3 join under `<user>:D` identities, 4-5 under hashed ones the guard learns.
    fn identity(user: usize) -> String {
        if user < 4 {
            format!("{}:D", USERS[user])
        } else {
            format!("hash{user}")
        }
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// A request of this user arrives; LiveKit's list is asked for now.
        Ask(usize),
        /// The n-th request waiting for its list gets it (taken when asked for).
        Answer(usize),
        Connect(usize),
        /// A connected user joins with many devices at once (a list too long to cache).
        Crowd(usize),
        Leave(usize),
        Tick(u64),
        Back(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0..USERS.len()).prop_map(Event::Ask),
            4 => (0..6usize).prop_map(Event::Answer),
            3 => (0..USERS.len()).prop_map(Event::Connect),
            1 => (0..4usize).prop_map(Event::Crowd),
            2 => (0..USERS.len()).prop_map(Event::Leave),
            3 => prop_oneof![
                Just(1u64),
                Just(700),
                Just(RESERVATION_MS / 2),
                Just(RESERVATION_MS),
                Just(MAX_LIST_AGE_MS),
                Just(2 * 3600 * 1000),
            ]
            .prop_map(Event::Tick),
            1 => prop_oneof![Just(1u64), Just(5_000), Just(RESERVATION_MS)].prop_map(Event::Back),
        ]
    }

    /// A user's latest run of admissions while not shown connected.
    #[derive(Debug, Clone, Copy)]
    struct Ticket {
        first: u64,
        latest: u64,
        shown: bool,
        /// Its time was up at a decision (which ended the reservation for good, whatever the
        /// clock does next).
        spent: bool,
    }

    #[derive(Default)]
    struct Model {
        now: u64,
        /// Connected users, and whether with many devices.
        connected: BTreeMap<usize, bool>,
        tickets: BTreeMap<usize, Ticket>,
        /// Every admission: (user, when).
        admissions: Vec<(usize, u64)>,
        /// The last time each user was seen connected at the end of a step.
        last_connected: BTreeMap<usize, u64>,
        /// Requests waiting for their list: (user, taken at, the users it shows).
        waiting: Vec<(usize, u64, BTreeMap<usize, bool>)>,
    }

    impl Model {
        fn by_admission(&self, user: usize) -> bool {
            self.tickets
                .get(&user)
                .is_some_and(|t| !t.shown && !t.spent && self.now < t.first + RESERVATION_MS)
        }

        /// At a decision: a ticket whose time is up stays so, whatever the clock does next.
        fn expire(&mut self) {
            let now = self.now;
            for t in self.tickets.values_mut() {
                if now >= t.first + RESERVATION_MS {
                    t.spent = true;
                }
            }
        }

        fn holding(&self) -> BTreeSet<usize> {
            let mut users: BTreeSet<usize> = self.connected.keys().copied().collect();
            users.extend((0..USERS.len()).filter(|u| self.by_admission(*u)));
            users
        }

        /// Asks LiveKit for the list now.
        fn take_list(&self) -> (u64, BTreeMap<usize, bool>) {
            (self.now, self.connected.clone())
        }

        /// A list taken at `taken` is decided on: a user it shows connected after their
        /// latest admission no longer holds a place by admission; one it shows connected after
        /// their run of admissions began, and admitted again since, starts a run at that
        /// admission. (A list taken but never decided on tells the guard nothing.)
        fn decided_on(&mut self, taken: u64, shown: &BTreeMap<usize, bool>) {
            for user in shown.keys() {
                if let Some(t) = self.tickets.get_mut(user) {
                    if taken > t.latest {
                        t.shown = true;
                    } else if taken > t.first && !t.shown && !t.spent {
                        t.first = t.latest;
                    }
                }
            }
        }

        fn admitted(&mut self, user: usize) {
            self.admissions.push((user, self.now));
            let now = self.now;
            let fresh = Ticket {
                first: now,
                latest: now,
                shown: false,
                spent: false,
            };
            let ticket = self.tickets.entry(user).or_insert(fresh);
            // Admitted again within the first admission's reservation time: that time still
            // bounds when the user may connect (asking again does not extend it).
            if !ticket.shown && !ticket.spent && now < ticket.first + RESERVATION_MS {
                ticket.latest = ticket.latest.max(now);
            } else {
                *ticket = fresh;
            }
        }
    }

    fn list_of(shown: &BTreeMap<usize, bool>) -> Vec<String> {
        let mut list = Vec::new();
        for (user, crowd) in shown {
            if *crowd {
                list.extend((0..300).map(|n| format!("{}:D{n}", USERS[*user])));
            } else {
                list.push(identity(*user));
            }
        }
        list
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("OCCUPANCY_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256)
        ))]
        #[test]
        fn no_order_of_events_lets_one_user_too_many_in(
            limit in 1u32..5,
            cache_ms in prop_oneof![Just(0u64), Just(1000)],
            events in proptest::collection::vec(event(), 1..80),
        ) {
            let store = MemoryStore::default();
            let mut m = Model { now: START_MS, ..Model::default() };
            let mut went_back = false;
            for event in events {
                match event {
                    Event::Ask(user) => {
                        let (taken, shown) = m.take_list();
                        m.waiting.push((user, taken, shown));
                    }
                    Event::Answer(n) => {
                        if m.waiting.is_empty() {
                            continue;
                        }
                        let (user, taken, shown) = m.waiting.remove(n % m.waiting.len());
                        let list = list_of(&shown);
                        let identity = identity(user);
                        let q = Request {
                            room: ROOM,
                            max_users: limit,
                            participants: Participants::Fresh { identities: &list, sessions: &[], taken_ms: taken },
                            requester: USERS[user],
                            identity: &identity,
                            reservation_ms: RESERVATION_MS,
                            list_cache_ms: cache_ms,
                            verify_ms: 0,
                            doubt_ms: 0,
                            now_ms: m.now,
                            releasable: false,
                            exempt: false,
                            unverified: false,
                        };
                        let verdict = match admit(&store, &q) {
                            Ok(Outcome::Decided(verdict)) => verdict,
                            Ok(Outcome::NeedList) => {
                                // Asked again: a list taken now.
                                let (taken, shown) = m.take_list();
                                m.waiting.push((user, taken, shown));
                                continue;
                            }
                            Err(e) => return Err(TestCaseError::fail(format!("admit: {e:?}"))),
                        };
                        // A decision settles the record's reservations as of now.
                        m.expire();
                        m.decided_on(taken, &shown);
                        if verdict.admitted {
                            m.admitted(user);
                            continue;
                        }
                        // I2
                        prop_assert!(!shown.contains_key(&user) && !m.by_admission(user),
                            "user {} refused while in the list or holding a place: {:?}", user, verdict);
                        // I3
                        // What the list shows, users connected within MAX_LIST_AGE_MS before
                        // it was taken (a list older than what ended a reservation counts its
                        // user), and users admitted lately.
                        let mut counted: BTreeSet<usize> = shown.keys().copied().collect();
                        counted.extend(m.last_connected.iter()
                            .filter(|(_, at)| **at + MAX_LIST_AGE_MS >= taken).map(|(u, _)| *u));
                        if !went_back {
                            counted.extend(m.admissions.iter()
                                .filter(|(_, at)| *at + RESERVATION_MS >= taken)
                                .map(|(u, _)| *u));
                        } else {
                            counted.extend(m.admissions.iter().map(|(u, _)| *u));
                        }
                        let needed = match verdict.refusal {
                            Some(Refusal::Full) => limit as usize,
                            Some(Refusal::Cooling) => limit as usize - 1,
                            other => return Err(TestCaseError::fail(format!("refused for {other:?}"))),
                        };
                        prop_assert!(counted.len() >= needed,
                            "refused {} with only {:?} counted: {:?}", user, counted, verdict);
                    }
                    // LiveKit's state changes between milliseconds: lists taken within one agree
                    // (the guard's clock has no finer grain to order them by).
                    Event::Connect(user) => {
                        if m.by_admission(user) && !m.connected.contains_key(&user) {
                            m.connected.insert(user, false);
                            m.now += 1;
                        }
                    }
                    Event::Crowd(user) => {
                        if let Some(crowd) = m.connected.get_mut(&user) {
                            *crowd = true;
                            m.now += 1;
                        }
                    }
                    Event::Leave(user) => {
                        if m.connected.remove(&user).is_some() {
                            m.now += 1;
                            m.last_connected.insert(user, m.now);
                        }
                    }
                    Event::Tick(ms) => m.now += ms,
                    // Only with no list in flight: a list taken before a step back and decided
                    // on once the clock has caught up cannot be told from a newer one (proxy-wasm
                    // offers wall-clock time only); see docs/security.md.
                    Event::Back(ms) => {
                        if m.waiting.is_empty() {
                            m.now -= ms;
                            went_back = true;
                        }
                    }
                }
                for user in m.connected.keys() {
                    m.last_connected.insert(*user, m.now);
                }
                // I1
                let holding = m.holding();
                prop_assert!(holding.len() <= limit as usize,
                    "{:?} hold places, limit {}", holding, limit);
            }
        }
    }
}
