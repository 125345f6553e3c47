//! The process's budget of Synapse lookups that any client can cause: a token bucket in shared
//! data, so that every worker of one Envoy process draws from the same budget. A room id the
//! guard has not seen costs a limit lookup before anyone is verified; the budget bounds what a
//! flood of fresh room ids makes Synapse do (invariant I4), whatever the number of workers.
//!
//! The bucket holds `rate` lookups (one second's worth) and refills continuously. It is one key
//! written with compare-and-swap; a store that cannot be read or written does not stop lookups
//! (the budget protects Synapse, it is not a check of the request).

use crate::state::store::{SharedStore, StoreError};

/// The bucket's key in shared data.
pub const KEY: &str = "voice_limit_guard.lookup_budget";
const MAX_ATTEMPTS: usize = 16;

/// Takes one lookup from the budget of `rate` per second at `now_ms`; `false` when spent.
/// A `rate` of 0 means no budget: every lookup is allowed.
pub fn take(store: &dyn SharedStore, rate: u32, now_ms: u64) -> bool {
    if rate == 0 {
        return true;
    }
    for _ in 0..MAX_ATTEMPTS {
        let (current, cas) = match store.get(KEY) {
            Some((bytes, cas)) => (parse(&bytes), Some(cas)),
            None => (None, None),
        };
        // Kept in thousandths of a lookup, so that refills by the millisecond add up.
        let full = u64::from(rate) * 1000;
        let (level, since) = current.unwrap_or((full, now_ms));
        let refilled = level
            .saturating_add(now_ms.saturating_sub(since).saturating_mul(u64::from(rate)))
            .min(full);
        let Some(left) = refilled.checked_sub(1000) else {
            return false;
        };
        // A clock that stepped back keeps the later time: no refill until it catches up.
        let stamp = since.max(now_ms);
        match store.set(KEY, format!("[{left},{stamp}]").as_bytes(), cas) {
            Ok(()) => return true,
            Err(StoreError::CasMismatch) => continue,
            Err(_) => return true,
        }
    }
    true
}

fn parse(bytes: &[u8]) -> Option<(u64, u64)> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::state::store::MemoryStore;

    #[test]
    fn a_second_holds_rate_lookups_and_refills_by_the_millisecond() {
        let store = MemoryStore::default();
        let taken = (0..25).filter(|_| take(&store, 10, 1_000)).count();
        assert_eq!(taken, 10);
        // 100 ms later, one more; a second later, ten, never more.
        assert!(!take(&store, 10, 1_099));
        assert!(take(&store, 10, 1_100));
        assert!(!take(&store, 10, 1_100));
        let later = (0..25).filter(|_| take(&store, 10, 60_000)).count();
        assert_eq!(later, 10);
    }

    #[test]
    fn a_budget_of_n_allows_exactly_the_nth_lookup_of_a_second() {
        for rate in [1u32, 2, 3, 100] {
            let store = MemoryStore::default();
            for n in 1..=rate {
                assert!(take(&store, rate, 5_000), "rate {rate}: lookup {n}");
            }
            assert!(
                !take(&store, rate, 5_000),
                "rate {rate}: lookup {}",
                rate + 1
            );
            // One lookup's refill takes 1000 / rate ms: not a ms less.
            let refill = 1000 / u64::from(rate);
            if 1000 % u64::from(rate) == 0 {
                assert!(!take(&store, rate, 5_000 + refill - 1), "rate {rate}");
                assert!(take(&store, rate, 5_000 + refill), "rate {rate}");
                assert!(!take(&store, rate, 5_000 + refill), "rate {rate}");
            }
        }
    }

    #[test]
    fn no_rate_means_no_budget_and_a_clock_step_back_refills_nothing() {
        let store = MemoryStore::default();
        assert!((0..1000).all(|_| take(&store, 0, 5)));
        assert_eq!(store.get(KEY), None);
        assert!((0..2).all(|_| take(&store, 2, 10_000)));
        assert!(!take(&store, 2, 5_000));
        assert!(!take(&store, 2, 10_000));
        assert!(take(&store, 2, 10_500));
    }

    #[test]
    fn an_unreadable_bucket_starts_full() {
        let store = MemoryStore::default();
        store.set(KEY, b"not json", None).unwrap();
        assert!(take(&store, 1, 0));
        assert!(!take(&store, 1, 0));
    }
}
