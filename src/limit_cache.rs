//! Room rules looked up in Synapse, cached for every worker thread, with one lookup in flight
//! per room, and the last rule seen kept through a Synapse outage: the room's limit
//! ([`LIMITS`]) and, for rooms that are full, its power levels ([`POWER_LEVELS`]).
//!
//! A successful Synapse answer is *fresh* for `limit_cache_ttl_seconds`. An answer that
//! matters when Synapse fails ([`Answer::keeps_stale`]: a positive limit, power levels) is then
//! kept, *stale*, for `stale_limit_seconds` more: when a refresh fails meanwhile, the guard
//! uses the stale answer (and serves it as fresh for one more TTL, so that one failing lookup
//! per TTL is made, not one per request) instead of treating the room as unlimited. "No
//! limit" answers are not kept stale: a room the guard never saw limited fails per
//! `failure_mode` while Synapse is down.
//!
//! While one request looks a room up, the room's entry carries a "lookup pending" mark for at
//! most the Synapse timeout, so concurrent requests for the same room wait for that answer
//! instead of each asking Synapse.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::store::{Buckets, Change, Eviction, Record, SharedStore, StoreError};
use crate::synapse::{Limit, PowerLevels};

/// A Synapse answer the cache can hold.
pub trait Answer: Clone + PartialEq + Serialize + DeserializeOwned {
    /// Whether the answer is kept, stale, through a Synapse outage.
    fn keeps_stale(&self) -> bool;
    /// How readily the entry is evicted for another room's.
    fn eviction(&self) -> Eviction;
}

impl Answer for Limit {
    fn keeps_stale(&self) -> bool {
        matches!(self, Limit::MaxUsers(_))
    }

    /// Unlimited rooms go first; a limit only when nothing else can.
    fn eviction(&self) -> Eviction {
        Eviction::Rank(u8::from(self.keeps_stale()))
    }
}

impl Answer for PowerLevels {
    fn keeps_stale(&self) -> bool {
        true
    }

    fn eviction(&self) -> Eviction {
        Eviction::Rank(1)
    }
}

/// Stored as the number: `0` for no limit.
impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::None => 0u32.serialize(serializer),
            Limit::MaxUsers(n) => n.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match u32::deserialize(deserializer)? {
            0 => Limit::None,
            n => Limit::MaxUsers(n),
        })
    }
}

/// The rooms' limits. Entries are about 70 bytes (ids are stored as digests), so this holds
/// some 28,000 rooms; entries without a limit are evicted first, limits last. Many small
/// buckets: a lookup decodes one bucket, so its size is the per-request cost.
pub const LIMITS: Cache<Limit> = Cache(Buckets::new("voice_limit_guard.limits", 512, 4 * 1024));

/// The power levels of rooms that were full when someone asked to join. An entry holds the
/// few users above the room's default level ([`crate::synapse::MAX_PRIVILEGED`] at most), a
/// few hundred bytes.
pub const POWER_LEVELS: Cache<PowerLevels> = Cache(Buckets::new(
    "voice_limit_guard.power_levels",
    256,
    16 * 1024,
));

/// One kind of room rule, in shared data (its buckets are created when the VM starts).
pub struct Cache<V>(pub Buckets<Entry<V>>);

/// What the shared cache holds for one room. Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<V> {
    /// The last answer Synapse gave, if any.
    seen: Option<V>,
    /// Until when `seen` is served without asking Synapse.
    fresh_until: u64,
    /// Until when `seen` is used if Synapse cannot be asked (when it [`Answer::keeps_stale`]).
    stale_until: u64,
    /// Until when another request's lookup is awaited (0: none pending).
    pending_until: u64,
}

impl<V: Answer> Entry<V> {
    fn expires_at(&self) -> u64 {
        let stale = match &self.seen {
            Some(answer) if answer.keeps_stale() => self.stale_until,
            _ => 0,
        };
        self.fresh_until.max(stale).max(self.pending_until)
    }

    fn stale_answer(&self, now_ms: u64) -> Option<V> {
        match &self.seen {
            Some(answer) if answer.keeps_stale() && self.stale_until > now_ms => {
                Some(answer.clone())
            }
            _ => None,
        }
    }
}

/// Stored as `[answer or null, fresh until, stale until, pending until]`.
impl<V: Serialize> Serialize for Entry<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.seen,
            self.fresh_until,
            self.stale_until,
            self.pending_until,
        )
            .serialize(serializer)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entry<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (seen, fresh_until, stale_until, pending_until) =
            Deserialize::deserialize(deserializer)?;
        Ok(Entry {
            seen,
            fresh_until,
            stale_until,
            pending_until,
        })
    }
}

impl<V: Answer> Record for Entry<V> {
    /// Bare pending marks go first; otherwise as the answer says.
    fn eviction(&self) -> Eviction {
        match &self.seen {
            Some(answer) => answer.eviction(),
            None => Eviction::Rank(0),
        }
    }
}

/// What the cache knows about a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached<V = Limit> {
    Known(V),
    /// Another request is asking Synapse right now.
    Pending,
    /// Nothing fresh: this request has claimed the lookup and must ask Synapse.
    Claimed,
}

fn classify<V: Answer>(entry: &Entry<V>, now_ms: u64) -> Option<Cached<V>> {
    match &entry.seen {
        Some(answer) if entry.fresh_until > now_ms => Some(Cached::Known(answer.clone())),
        _ if entry.pending_until > now_ms => Some(Cached::Pending),
        _ => None,
    }
}

/// How long answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Served without asking again (0: every request asks).
    pub ttl_ms: u64,
    /// An answer's further life for when Synapse fails (see [`Answer::keeps_stale`]).
    pub stale_ms: u64,
}

impl<V: Answer> Cache<V> {
    /// Reads the room's answer, or claims the lookup for the caller when nobody holds it.
    /// `pending_ms` bounds how long the claim holds off others (the Synapse timeout).
    pub fn read_or_claim(
        &self,
        store: &dyn SharedStore,
        room: &str,
        now_ms: u64,
        pending_ms: u64,
    ) -> Result<Cached<V>, StoreError> {
        if let Some(cached) = self.peek(store, room, now_ms) {
            return Ok(cached);
        }
        self.0
            .update(store, room, now_ms, |old: Option<(&Entry<V>, u64)>| {
                let old = old.map(|(entry, _)| entry.clone());
                if let Some(cached) = old.as_ref().and_then(|entry| classify(entry, now_ms)) {
                    return (Change::Keep, cached);
                }
                let claimed = Entry {
                    pending_until: now_ms.saturating_add(pending_ms),
                    ..old.unwrap_or(Entry {
                        seen: None,
                        fresh_until: 0,
                        stale_until: 0,
                        pending_until: 0,
                    })
                };
                let until = claimed.expires_at();
                (Change::Put(claimed, until), Cached::Claimed)
            })
    }

    /// Reads the room's entry without claiming anything: a fresh answer or a pending lookup.
    pub fn peek(&self, store: &dyn SharedStore, room: &str, now_ms: u64) -> Option<Cached<V>> {
        self.0
            .get(store, room, now_ms)
            .and_then(|entry| classify(&entry, now_ms))
    }

    /// Stores a Synapse answer: fresh for the TTL, stale for `stale_ms` after that.
    pub fn store_answer(
        &self,
        store: &dyn SharedStore,
        room: &str,
        answer: V,
        now_ms: u64,
        life: Lifetimes,
    ) -> Result<(), StoreError> {
        let entry = Entry {
            seen: Some(answer),
            fresh_until: now_ms.saturating_add(life.ttl_ms),
            stale_until: now_ms
                .saturating_add(life.ttl_ms)
                .saturating_add(life.stale_ms),
            pending_until: 0,
        };
        let until = entry.expires_at();
        self.0
            .update(store, room, now_ms, |_: Option<(&Entry<V>, u64)>| {
                if until <= now_ms {
                    (Change::Remove, ())
                } else {
                    (Change::Put(entry.clone(), until), ())
                }
            })
    }

    /// After a failed lookup: drops the pending mark, so the next request asks Synapse again,
    /// and returns the stale answer to use, if one is known. That stale answer is then served
    /// as fresh for one TTL, so an outage costs one failing lookup per TTL, not one per
    /// request.
    pub fn release_claim(
        &self,
        store: &dyn SharedStore,
        room: &str,
        now_ms: u64,
        life: Lifetimes,
    ) -> Result<Option<V>, StoreError> {
        self.0
            .update(store, room, now_ms, |old: Option<(&Entry<V>, u64)>| {
                let Some((entry, _)) = old else {
                    return (Change::Keep, None);
                };
                if let Some(Cached::Known(answer)) = classify(entry, now_ms) {
                    // Another request stored an answer meanwhile.
                    return (Change::Keep, Some(answer));
                }
                let stale = entry.stale_answer(now_ms);
                let mut next = Entry {
                    pending_until: 0,
                    ..entry.clone()
                };
                if stale.is_some() {
                    next.fresh_until = now_ms.saturating_add(life.ttl_ms).min(entry.stale_until);
                }
                let until = next.expires_at();
                if until <= now_ms {
                    (Change::Remove, stale)
                } else {
                    (Change::Put(next, until), stale)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LIFE: Lifetimes = Lifetimes {
        ttl_ms: 10_000,
        stale_ms: 3_600_000,
    };

    #[test]
    fn first_reader_claims_the_lookup_and_others_see_it_pending() {
        let store = MemoryStore::default();
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 0, 5000),
            Ok(Cached::Claimed)
        );
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 10, 5000),
            Ok(Cached::Pending)
        );
        // The claim lapses after the Synapse timeout.
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 5000, 5000),
            Ok(Cached::Claimed)
        );
    }

    #[test]
    fn answers_are_cached_for_the_ttl() {
        let store = MemoryStore::default();
        LIMITS.read_or_claim(&store, "!r", 0, 5000).unwrap();
        LIMITS
            .store_answer(&store, "!r", Limit::MaxUsers(3), 100, LIFE)
            .unwrap();
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 10_099, 5000),
            Ok(Cached::Known(Limit::MaxUsers(3)))
        );
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 10_100, 5000),
            Ok(Cached::Claimed)
        );
        LIMITS
            .store_answer(&store, "!s", Limit::None, 0, LIFE)
            .unwrap();
        assert_eq!(
            LIMITS.peek(&store, "!s", 1),
            Some(Cached::Known(Limit::None))
        );
    }

    #[test]
    fn a_failed_lookup_of_a_room_never_seen_is_not_cached() {
        let store = MemoryStore::default();
        LIMITS.read_or_claim(&store, "!r", 0, 5000).unwrap();
        assert_eq!(LIMITS.release_claim(&store, "!r", 1, LIFE), Ok(None));
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 2, 5000),
            Ok(Cached::Claimed)
        );
    }

    #[test]
    fn a_limit_seen_before_outlives_a_failed_refresh() {
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!r", Limit::MaxUsers(2), 0, LIFE)
            .unwrap();
        // Long past the TTL, the refresh fails: the stale limit is enforced...
        let later = 1_000_000;
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later, 5000),
            Ok(Cached::Claimed)
        );
        assert_eq!(
            LIMITS.release_claim(&store, "!r", later + 1, LIFE),
            Ok(Some(Limit::MaxUsers(2)))
        );
        // ...and served as cached for one TTL, so the outage costs one lookup per TTL.
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later + 2, 5000),
            Ok(Cached::Known(Limit::MaxUsers(2)))
        );
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later + 1 + 10_000, 5000),
            Ok(Cached::Claimed)
        );
        // Once the stale window has passed, nothing is left to enforce.
        let past = 10_000 + 3_600_000;
        LIMITS.read_or_claim(&store, "!r", past, 5000).unwrap();
        assert_eq!(LIMITS.release_claim(&store, "!r", past + 1, LIFE), Ok(None));
    }

    #[test]
    fn no_limit_is_not_kept_stale() {
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!r", Limit::None, 0, LIFE)
            .unwrap();
        LIMITS.read_or_claim(&store, "!r", 20_000, 5000).unwrap();
        assert_eq!(LIMITS.release_claim(&store, "!r", 20_001, LIFE), Ok(None));
    }

    #[test]
    fn zero_ttl_keeps_only_the_stale_limit() {
        let store = MemoryStore::default();
        let life = Lifetimes {
            ttl_ms: 0,
            stale_ms: 60_000,
        };
        LIMITS
            .store_answer(&store, "!r", Limit::MaxUsers(2), 1, life)
            .unwrap();
        assert_eq!(LIMITS.peek(&store, "!r", 1), None);
        assert_eq!(
            LIMITS.release_claim(&store, "!r", 2, life),
            Ok(Some(Limit::MaxUsers(2)))
        );
        LIMITS
            .store_answer(&store, "!s", Limit::None, 1, life)
            .unwrap();
        assert_eq!(LIMITS.peek(&store, "!s", 1), None);
    }

    #[test]
    fn limits_survive_a_flood_of_unlimited_rooms() {
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!limited", Limit::MaxUsers(3), 0, LIFE)
            .unwrap();
        for i in 0..40_000u32 {
            let room = format!("!flood{i}");
            LIMITS
                .store_answer(&store, &room, Limit::None, 1, LIFE)
                .unwrap();
        }
        assert_eq!(
            LIMITS.peek(&store, "!limited", 2),
            Some(Cached::Known(Limit::MaxUsers(3)))
        );
        assert!(store.byte_count() <= (LIMITS.0.count as usize) * LIMITS.0.max_bytes);
    }
}
