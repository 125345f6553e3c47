//! Room limits cached for every worker thread, with one lookup in flight per room, and the
//! last limit seen kept through a Synapse outage.
//!
//! A successful Synapse answer is *fresh* for `limit_cache_ttl_seconds`. A positive limit is
//! then kept, *stale*, for `stale_limit_seconds` more: when a refresh fails meanwhile, the
//! guard enforces the stale limit (and serves it as fresh for one more TTL, so that one
//! failing lookup per TTL is made, not one per request) instead of treating the room as
//! unlimited. "No limit" answers are not kept stale: a room the guard never saw limited
//! fails per `failure_mode` while Synapse is down.
//!
//! While one request looks a room up, the room's entry carries a "lookup pending" mark for at
//! most the Synapse timeout, so concurrent requests for the same room wait for that answer
//! instead of each asking Synapse.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::store::{Buckets, Change, Eviction, Record, SharedStore, StoreError};
use crate::synapse::Limit;

/// Where this state lives in shared data (created when the VM starts). Entries are about 70
/// bytes (ids are stored as digests), so this holds some 28,000 rooms; entries without a limit
/// are evicted first, limits last. Many small buckets: a lookup decodes one bucket, so its
/// size is the per-request cost.
pub const BUCKETS: Buckets<Entry> = Buckets::new("voice_limit_guard.limits", 512, 4 * 1024);

/// What the shared cache holds for one room. Times are ms since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The last answer Synapse gave, if any.
    seen: Option<Limit>,
    /// Until when `seen` is served without asking Synapse.
    fresh_until: u64,
    /// Until when a positive `seen` is enforced if Synapse cannot be asked.
    stale_until: u64,
    /// Until when another request's lookup is awaited (0: none pending).
    pending_until: u64,
}

impl Entry {
    fn expires_at(&self) -> u64 {
        let stale = match self.seen {
            Some(Limit::MaxUsers(_)) => self.stale_until,
            _ => 0,
        };
        self.fresh_until.max(stale).max(self.pending_until)
    }

    fn stale_limit(&self, now_ms: u64) -> Option<Limit> {
        match self.seen {
            Some(limit @ Limit::MaxUsers(_)) if self.stale_until > now_ms => Some(limit),
            _ => None,
        }
    }
}

/// Stored as `[limit, fresh until, stale until, pending until]`, limit `-1` for none seen,
/// `0` for no limit.
impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let limit = match self.seen {
            None => -1,
            Some(Limit::None) => 0,
            Some(Limit::MaxUsers(n)) => i64::from(n),
        };
        (
            limit,
            self.fresh_until,
            self.stale_until,
            self.pending_until,
        )
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (limit, fresh_until, stale_until, pending_until): (i64, u64, u64, u64) =
            Deserialize::deserialize(deserializer)?;
        let seen = match limit {
            -1 => None,
            0 => Some(Limit::None),
            n => Some(Limit::MaxUsers(
                u32::try_from(n).map_err(|_| de::Error::custom("limit out of range"))?,
            )),
        };
        Ok(Entry {
            seen,
            fresh_until,
            stale_until,
            pending_until,
        })
    }
}

impl Record for Entry {
    /// Unlimited rooms and bare pending marks go first; a limit only when nothing else can.
    fn eviction(&self) -> Eviction {
        match self.seen {
            Some(Limit::MaxUsers(_)) => Eviction::Rank(1),
            _ => Eviction::Rank(0),
        }
    }
}

/// What the cache knows about a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    Known(Limit),
    /// Another request is asking Synapse right now.
    Pending,
    /// Nothing fresh: this request has claimed the lookup and must ask Synapse.
    Claimed,
}

fn classify(entry: &Entry, now_ms: u64) -> Option<Cached> {
    match entry.seen {
        Some(limit) if entry.fresh_until > now_ms => Some(Cached::Known(limit)),
        _ if entry.pending_until > now_ms => Some(Cached::Pending),
        _ => None,
    }
}

/// Reads the room's limit, or claims the lookup for the caller when nobody holds it.
/// `pending_ms` bounds how long the claim holds off others (the Synapse timeout).
pub fn read_or_claim(
    store: &dyn SharedStore,
    room: &str,
    now_ms: u64,
    pending_ms: u64,
) -> Result<Cached, StoreError> {
    if let Some(cached) = peek(store, room, now_ms) {
        return Ok(cached);
    }
    BUCKETS.update(store, room, now_ms, |old: Option<(&Entry, u64)>| {
        let old = old.map(|(entry, _)| *entry);
        if let Some(cached) = old.and_then(|entry| classify(&entry, now_ms)) {
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
        (Change::Put(claimed, claimed.expires_at()), Cached::Claimed)
    })
}

/// Reads the room's entry without claiming anything: a fresh limit or a pending lookup.
pub fn peek(store: &dyn SharedStore, room: &str, now_ms: u64) -> Option<Cached> {
    BUCKETS
        .get(store, room, now_ms)
        .and_then(|entry| classify(&entry, now_ms))
}

/// How long answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Served without asking again (0: every request asks).
    pub ttl_ms: u64,
    /// A positive limit's further life for when Synapse fails.
    pub stale_ms: u64,
}

/// Stores a Synapse answer: fresh for the TTL, a limit stale for `stale_ms` after that.
pub fn store_answer(
    store: &dyn SharedStore,
    room: &str,
    limit: Limit,
    now_ms: u64,
    life: Lifetimes,
) -> Result<(), StoreError> {
    let entry = Entry {
        seen: Some(limit),
        fresh_until: now_ms.saturating_add(life.ttl_ms),
        stale_until: now_ms
            .saturating_add(life.ttl_ms)
            .saturating_add(life.stale_ms),
        pending_until: 0,
    };
    BUCKETS.update(store, room, now_ms, |_: Option<(&Entry, u64)>| {
        if entry.expires_at() <= now_ms {
            (Change::Remove, ())
        } else {
            (Change::Put(entry, entry.expires_at()), ())
        }
    })
}

/// After a failed lookup: drops the pending mark, so the next request asks Synapse again,
/// and returns the stale limit to enforce, if one is known. That stale limit is then served
/// as fresh for one TTL, so an outage costs one failing lookup per TTL, not one per request.
pub fn release_claim(
    store: &dyn SharedStore,
    room: &str,
    now_ms: u64,
    life: Lifetimes,
) -> Result<Option<Limit>, StoreError> {
    BUCKETS.update(store, room, now_ms, |old: Option<(&Entry, u64)>| {
        let Some((&entry, _)) = old else {
            return (Change::Keep, None);
        };
        if let Some(Cached::Known(limit)) = classify(&entry, now_ms) {
            // Another request stored an answer meanwhile.
            return (Change::Keep, Some(limit));
        }
        let stale = entry.stale_limit(now_ms);
        let mut next = Entry {
            pending_until: 0,
            ..entry
        };
        if stale.is_some() {
            next.fresh_until = now_ms.saturating_add(life.ttl_ms).min(entry.stale_until);
        }
        if next.expires_at() <= now_ms {
            (Change::Remove, stale)
        } else {
            (Change::Put(next, next.expires_at()), stale)
        }
    })
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
        assert_eq!(read_or_claim(&store, "!r", 0, 5000), Ok(Cached::Claimed));
        assert_eq!(read_or_claim(&store, "!r", 10, 5000), Ok(Cached::Pending));
        // The claim lapses after the Synapse timeout.
        assert_eq!(read_or_claim(&store, "!r", 5000, 5000), Ok(Cached::Claimed));
    }

    #[test]
    fn answers_are_cached_for_the_ttl() {
        let store = MemoryStore::default();
        read_or_claim(&store, "!r", 0, 5000).unwrap();
        store_answer(&store, "!r", Limit::MaxUsers(3), 100, LIFE).unwrap();
        assert_eq!(
            read_or_claim(&store, "!r", 10_099, 5000),
            Ok(Cached::Known(Limit::MaxUsers(3)))
        );
        assert_eq!(
            read_or_claim(&store, "!r", 10_100, 5000),
            Ok(Cached::Claimed)
        );
        store_answer(&store, "!s", Limit::None, 0, LIFE).unwrap();
        assert_eq!(peek(&store, "!s", 1), Some(Cached::Known(Limit::None)));
    }

    #[test]
    fn a_failed_lookup_of_a_room_never_seen_is_not_cached() {
        let store = MemoryStore::default();
        read_or_claim(&store, "!r", 0, 5000).unwrap();
        assert_eq!(release_claim(&store, "!r", 1, LIFE), Ok(None));
        assert_eq!(read_or_claim(&store, "!r", 2, 5000), Ok(Cached::Claimed));
    }

    #[test]
    fn a_limit_seen_before_outlives_a_failed_refresh() {
        let store = MemoryStore::default();
        store_answer(&store, "!r", Limit::MaxUsers(2), 0, LIFE).unwrap();
        // Long past the TTL, the refresh fails: the stale limit is enforced...
        let later = 1_000_000;
        assert_eq!(
            read_or_claim(&store, "!r", later, 5000),
            Ok(Cached::Claimed)
        );
        assert_eq!(
            release_claim(&store, "!r", later + 1, LIFE),
            Ok(Some(Limit::MaxUsers(2)))
        );
        // ...and served as cached for one TTL, so the outage costs one lookup per TTL.
        assert_eq!(
            read_or_claim(&store, "!r", later + 2, 5000),
            Ok(Cached::Known(Limit::MaxUsers(2)))
        );
        assert_eq!(
            read_or_claim(&store, "!r", later + 1 + 10_000, 5000),
            Ok(Cached::Claimed)
        );
        // Once the stale window has passed, nothing is left to enforce.
        let past = 10_000 + 3_600_000;
        read_or_claim(&store, "!r", past, 5000).unwrap();
        assert_eq!(release_claim(&store, "!r", past + 1, LIFE), Ok(None));
    }

    #[test]
    fn no_limit_is_not_kept_stale() {
        let store = MemoryStore::default();
        store_answer(&store, "!r", Limit::None, 0, LIFE).unwrap();
        read_or_claim(&store, "!r", 20_000, 5000).unwrap();
        assert_eq!(release_claim(&store, "!r", 20_001, LIFE), Ok(None));
    }

    #[test]
    fn zero_ttl_keeps_only_the_stale_limit() {
        let store = MemoryStore::default();
        let life = Lifetimes {
            ttl_ms: 0,
            stale_ms: 60_000,
        };
        store_answer(&store, "!r", Limit::MaxUsers(2), 1, life).unwrap();
        assert_eq!(peek(&store, "!r", 1), None);
        assert_eq!(
            release_claim(&store, "!r", 2, life),
            Ok(Some(Limit::MaxUsers(2)))
        );
        store_answer(&store, "!s", Limit::None, 1, life).unwrap();
        assert_eq!(peek(&store, "!s", 1), None);
    }

    #[test]
    fn limits_survive_a_flood_of_unlimited_rooms() {
        let store = MemoryStore::default();
        store_answer(&store, "!limited", Limit::MaxUsers(3), 0, LIFE).unwrap();
        for i in 0..40_000u32 {
            let room = format!("!flood{i}");
            store_answer(&store, &room, Limit::None, 1, LIFE).unwrap();
        }
        assert_eq!(
            peek(&store, "!limited", 2),
            Some(Cached::Known(Limit::MaxUsers(3)))
        );
        assert!(store.byte_count() <= (BUCKETS.count as usize) * BUCKETS.max_bytes);
    }
}
