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
                        participants: Participants::Fresh { identities: &[], taken_ms: now_ms },
                        requester: USERS[user],
                        identity: "",
                        token_expires_ms: 0,
                        reservation_ms: 60_000,
                        list_cache_ms: 0,
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
