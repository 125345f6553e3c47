//! Room limits cached for every worker thread, with one lookup in flight per room.
//!
//! A successful Synapse answer is kept for `limit_cache_ttl_seconds`; failures are not kept.
//! While one request looks a room up, the room holds a "lookup pending" marker for at most
//! the Synapse timeout, so concurrent requests for the same cold room wait for that answer
//! instead of each asking Synapse.

use crate::store::{Buckets, Change, SharedStore, StoreError};
use crate::synapse::Limit;

/// Where this state lives in shared data (created when the VM starts).
pub const BUCKETS: Buckets = Buckets {
    prefix: "voice_limit_guard.limits",
    // Many small buckets: a lookup decodes one bucket, so its size is the per-request cost.
    count: 512,
    max_bytes: 2 * 1024,
};

/// Stored form: `-1` a lookup is pending, `0` no limit, `n` at most n users.
type Stored = i64;
const PENDING: Stored = -1;

/// What the cache knows about a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    Known(Limit),
    /// Another request is asking Synapse right now.
    Pending,
    /// Nothing: this request has claimed the lookup and must ask Synapse.
    Claimed,
}

fn decode(stored: Stored) -> Cached {
    match stored {
        PENDING => Cached::Pending,
        n if n > 0 => Cached::Known(Limit::MaxUsers(u32::try_from(n).unwrap_or(u32::MAX))),
        _ => Cached::Known(Limit::None),
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
    if let Some(stored) = BUCKETS.get::<Stored>(store, room, now_ms) {
        return Ok(decode(stored));
    }
    BUCKETS.update(
        store,
        room,
        now_ms,
        |old: Option<(&Stored, u64)>| match old {
            Some((&stored, _)) => (Change::Keep, decode(stored)),
            None => (Change::Put(PENDING, now_ms + pending_ms), Cached::Claimed),
        },
    )
}

/// Reads the room's entry without claiming anything.
pub fn peek(store: &dyn SharedStore, room: &str, now_ms: u64) -> Option<Cached> {
    BUCKETS.get::<Stored>(store, room, now_ms).map(decode)
}

/// Stores a Synapse answer for `ttl_ms` (a zero TTL just clears the pending marker).
pub fn store_answer(
    store: &dyn SharedStore,
    room: &str,
    limit: Limit,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<(), StoreError> {
    let stored = match limit {
        Limit::None => 0,
        Limit::MaxUsers(n) => i64::from(n),
    };
    BUCKETS.update(store, room, now_ms, |_: Option<(&Stored, u64)>| {
        if ttl_ms == 0 {
            (Change::Remove, ())
        } else {
            (Change::Put(stored, now_ms + ttl_ms), ())
        }
    })
}

/// Drops a pending marker after a failed lookup, so the next request asks Synapse again.
/// An answer another request stored meanwhile is kept.
pub fn release_claim(store: &dyn SharedStore, room: &str, now_ms: u64) -> Result<(), StoreError> {
    BUCKETS.update(
        store,
        room,
        now_ms,
        |old: Option<(&Stored, u64)>| match old {
            Some((&PENDING, _)) => (Change::Remove, ()),
            _ => (Change::Keep, ()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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
        store_answer(&store, "!r", Limit::MaxUsers(3), 100, 10_000).unwrap();
        assert_eq!(
            read_or_claim(&store, "!r", 10_099, 5000),
            Ok(Cached::Known(Limit::MaxUsers(3)))
        );
        assert_eq!(
            read_or_claim(&store, "!r", 10_100, 5000),
            Ok(Cached::Claimed)
        );
        store_answer(&store, "!s", Limit::None, 0, 10_000).unwrap();
        assert_eq!(peek(&store, "!s", 1), Some(Cached::Known(Limit::None)));
    }

    #[test]
    fn a_failed_lookup_is_not_cached() {
        let store = MemoryStore::default();
        read_or_claim(&store, "!r", 0, 5000).unwrap();
        release_claim(&store, "!r", 1).unwrap();
        assert_eq!(read_or_claim(&store, "!r", 2, 5000), Ok(Cached::Claimed));
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let store = MemoryStore::default();
        read_or_claim(&store, "!r", 0, 5000).unwrap();
        store_answer(&store, "!r", Limit::MaxUsers(2), 1, 0).unwrap();
        assert_eq!(peek(&store, "!r", 1), None);
    }
}
