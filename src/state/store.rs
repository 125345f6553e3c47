//! State shared by every worker thread of one Envoy process, in bounded buckets.
//!
//! proxy-wasm shared data is a flat key/value store with compare-and-swap, no expiry and no
//! key listing. The guard therefore never creates keys per room: each kind of state lives in
//! a fixed number of buckets (`<prefix>.<n>`), a room is hashed to one bucket, and every write
//! to a bucket drops its expired entries. Keys and bytes held are thus bounded by
//! construction, whatever the number of rooms seen. Updates are read-modify-write loops on
//! the bucket's CAS, so they are atomic across threads.
//!
//! Ids are attacker-chosen (room ids, slot ids), so two rules keep one room's traffic from
//! pushing out another room's state:
//! - entries are filed under a fixed-size [`digest`] of their id, and the bucket is chosen
//!   with a per-process secret ([`set_bucket_seed`]), so nobody can aim many ids at the
//!   bucket of a room they want to disturb;
//! - a write never evicts the entry being written, and evicts other live entries only when
//!   their record says it may be dropped ([`Record::eviction`]): caches and what only makes
//!   the guard kinder go, state whose loss could let a limit be exceeded never does. A write that cannot fit fails with
//!   [`StoreError::Full`], which the caller treats as a failure of its request.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::state::decoded::{decoded, remember};
use crate::state::memo::{self, Memo};

/// The host's shared data, as the core sees it.
pub trait SharedStore {
    /// The value and its CAS token, or `None` when the key does not exist.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if `cas` is still current (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
    /// Told about every change in what the guard holds: keys, bytes and entries, each counted
    /// from the buckets as written, so the gauges show the state itself.
    fn account(&self, _held: Held) {}
}

/// A change in the shared data the guard holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub keys: i64,
    pub bytes: i64,
    /// Stored ids (rooms), live or expired but not yet dropped by a write to their bucket.
    pub entries: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another thread wrote the key since it was read.
    CasMismatch,
    /// The host refused the write.
    Failed,
    /// The bucket holds only live state that may not be dropped: the entry does not fit.
    Full,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreError::CasMismatch => "shared data kept changing under contention",
            StoreError::Failed => "shared data write failed",
            StoreError::Full => "shared data is full of live state",
        })
    }
}

const EMPTY_BUCKET: &[u8] = b"[]";

/// Attempts of one read-modify-write before giving up; contention on one bucket is brief.
const MAX_ATTEMPTS: usize = 64;

/// The shared-data key under which every VM copy of the process finds the bucket seed.
pub const SEED_KEY: &str = "voice_limit_guard.seed";

static BUCKET_SEED: AtomicU64 = AtomicU64::new(0);

/// Sets the secret that spreads ids over buckets. Every VM copy of one process must use the
/// same value (the host keeps it in shared data under [`SEED_KEY`]).
pub fn set_bucket_seed(seed: u64) {
    BUCKET_SEED.store(seed, Ordering::Relaxed);
}

/// A fixed-size stand-in for an attacker-chosen id: 96 bits of its SHA-256, in 16 URL-safe
/// base64 characters. Long ids then cost no more room than short ones, and no two ids anyone
/// can find share one.
pub fn digest(id: &str) -> String {
    memo::named(&DIGESTS, id, |id| {
        URL_SAFE_NO_PAD.encode(&Sha256::digest(id.as_bytes())[..12])
    })
}

thread_local! {
    static DIGESTS: RefCell<Memo<String>> = RefCell::new(Memo::default());
    /// A digest's keyed hash, with the seed it was keyed with.
    static BUCKET_HASHES: RefCell<Memo<(u64, u32)>> = RefCell::new(Memo::default());
}

/// Whether another room's live entry may be dropped to make room for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Eviction {
    /// A cache that can be asked for again; lower ranks go first.
    Rank(u8),
    /// State whose loss would let the limit be exceeded.
    Never,
}

/// A value kept in a bucket, written as JSON (serde_json).
pub trait Record:
    Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug + 'static
{
    /// Whether this entry, live at `now_ms`, may be evicted for another room's entry.
    fn eviction(&self, _now_ms: u64) -> Eviction {
        Eviction::Rank(0)
    }
}

impl Record for i64 {}

/// One stored entry: its id (a room), when it expires (ms since the epoch), its value.
/// A bucket is the JSON array of its entries, each `[id, expiry, value]`.
#[derive(Clone, Debug, PartialEq)]
struct Entry<T> {
    k: String,
    e: u64,
    v: T,
}

impl<T: Serialize> Serialize for Entry<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.k, self.e, &self.v).serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entry<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (k, e, v) = Deserialize::deserialize(deserializer)?;
        Ok(Entry { k, e, v })
    }
}

/// The entries of a bucket; a bucket that does not read as this version's entries (another
/// version of the guard wrote it) reads as empty. A bucket the guard wrote holds each id once;
/// should one hold an id twice (written by something else), only the last entry for it
/// counts, for reads and writes alike, so that a write is always what the next read sees.
fn decode<T: Record>(bytes: &[u8]) -> Vec<Entry<T>> {
    let items: Vec<Entry<T>> = serde_json::from_slice(bytes).unwrap_or_default();
    let mut entries: Vec<Entry<T>> = Vec::with_capacity(items.len());
    for entry in items {
        entries.retain(|earlier| earlier.k != entry.k);
        entries.push(entry);
    }
    entries
}

/// One entry's JSON; `None` only if its value cannot be written as JSON (no record can fail).
fn encode_entry<T: Record>(entry: &Entry<T>) -> Option<String> {
    serde_json::to_string(entry).ok()
}

/// The same, given the value's JSON: `[id, expiry, value]` as serde_json writes it.
fn encode_entry_with<T>(entry: &Entry<T>, value: &[u8]) -> Option<String> {
    let mut out = serde_json::to_string(&(&entry.k, entry.e)).ok()?;
    out.pop(); // the closing bracket
    out.push(',');
    out.push_str(std::str::from_utf8(value).ok()?);
    out.push(']');
    Some(out)
}

/// What an update does to an entry.
pub enum Change<T> {
    /// Leave the bucket as it is (no write).
    Keep,
    /// Store this value until this time (ms since the epoch).
    Put(T, u64),
    /// The same, with the value's JSON as serde_json writes it (so it is written only once).
    PutEncoded(T, u64, Vec<u8>),
    Remove,
}

/// A change to one live entry (its value and expiry, if any), as [`Buckets::apply`] takes it.
type ChangeFn<'a, T> = dyn FnMut(Option<(&T, u64)>) -> Change<T> + 'a;

/// A family of buckets holding entries of type `T`.
pub struct Buckets<T> {
    pub prefix: &'static str,
    pub count: u32,
    /// Bytes a bucket may hold before entries are evicted.
    pub max_bytes: usize,
    record: PhantomData<fn() -> T>,
}

impl<T> Buckets<T> {
    pub const fn new(prefix: &'static str, count: u32, max_bytes: usize) -> Buckets<T> {
        Buckets {
            prefix,
            count,
            max_bytes,
            record: PhantomData,
        }
    }

    /// The bucket that holds `id`'s entry.
    pub fn key_for(&self, id: &str) -> String {
        self.key_of(bucket_index(&digest(id), self.count))
    }

    fn key_of(&self, index: u32) -> String {
        format!("{}.{index}", self.prefix)
    }

    /// Creates the buckets that do not exist yet, empty.
    ///
    /// Shared data cannot create a key conditionally (a write without CAS always succeeds), so
    /// two threads creating the same bucket at once could lose one's first entry. Creating every
    /// bucket when the VM starts, before it serves streams, leaves later updates a CAS to check.
    pub fn create_all(&self, store: &dyn SharedStore) {
        for index in 0..self.count {
            let key = self.key_of(index);
            if store.get(&key).is_none() && store.set(&key, EMPTY_BUCKET, None).is_ok() {
                store.account(Held {
                    keys: 1,
                    bytes: EMPTY_BUCKET.len() as i64,
                    entries: 0,
                });
            }
        }
    }
}

impl<T: Record> Buckets<T> {
    /// The live entry for `id`, if any.
    pub fn get(&self, store: &dyn SharedStore, id: &str, now_ms: u64) -> Option<T> {
        let k = digest(id);
        let key = self.key_of(bucket_index(&k, self.count));
        let (bytes, _) = store.get(&key)?;
        decoded(&key, bytes, decode::<T>)
            .iter()
            .find(|entry| entry.k == k && entry.e > now_ms)
            .map(|entry| entry.v.clone())
    }

    /// Atomically applies `change` to the live entry for `id` (its value and expiry).
    /// `change` may run several times under contention and must depend only on its input;
    /// the second half of its last result is returned.
    pub fn update<R>(
        &self,
        store: &dyn SharedStore,
        id: &str,
        now_ms: u64,
        mut change: impl FnMut(Option<(&T, u64)>) -> (Change<T>, R),
    ) -> Result<R, StoreError> {
        let mut result = None;
        self.apply(store, id, now_ms, &mut |old| {
            let (change, outcome) = change(old);
            result = Some(outcome);
            change
        })?;
        // `apply` succeeds only after running `change`.
        result.ok_or(StoreError::Failed)
    }

    /// The read-modify-write loop of [`Buckets::update`], taking the change as a trait object:
    /// the loop is then in the module once per record type, not once per caller.
    fn apply(
        &self,
        store: &dyn SharedStore,
        id: &str,
        now_ms: u64,
        change: &mut ChangeFn<'_, T>,
    ) -> Result<(), StoreError> {
        let k = digest(id);
        let key = self.key_of(bucket_index(&k, self.count));
        for _ in 0..MAX_ATTEMPTS {
            let (old_bytes, cas) = match store.get(&key) {
                Some((bytes, cas)) => (bytes, Some(cas)),
                None => (Vec::new(), None),
            };
            let old_size = old_bytes.len();
            // A bucket that does not parse (another version of the guard) is started afresh.
            let mut entries: Vec<Entry<T>> = decoded(&key, old_bytes, decode::<T>).to_vec();
            let old_entries = entries.len();
            entries.retain(|entry| entry.e > now_ms);
            let position = entries.iter().position(|entry| entry.k == k);
            let change = change(position.map(|i| (&entries[i].v, entries[i].e)));
            // The value to write, if any, and its JSON when the change gives it.
            let (put, json) = match change {
                Change::Keep => return Ok(()),
                Change::Remove => (None, None),
                Change::Put(v, e) => (Some((v, e)), None),
                Change::PutEncoded(v, e, json) => {
                    debug_assert_eq!(serde_json::to_vec(&v).ok().as_ref(), Some(&json));
                    (Some((v, e)), Some(json))
                }
            };
            match (put, position) {
                // Nothing to remove: no write, and no CAS change for the bucket's others.
                (None, None) => return Ok(()),
                (None, Some(i)) => {
                    entries.remove(i);
                }
                (Some((v, e)), position) => {
                    if let Some(i) = position {
                        entries.remove(i);
                    }
                    entries.push(Entry { k: k.clone(), e, v });
                }
            }
            let own = json.as_deref().map(|json| (k.as_str(), json));
            let (bytes, new_entries) =
                self.encode_within_cap(&entries, own, &k, old_size, now_ms)?;
            match store.set(&key, &bytes, cas) {
                Ok(()) => {
                    store.account(Held {
                        keys: i64::from(cas.is_none()),
                        bytes: bytes.len() as i64 - old_size as i64,
                        entries: new_entries as i64 - old_entries as i64,
                    });
                    // What was written is what the next read of it decodes (unless entries
                    // had to go, which are then decoded from the bytes).
                    if new_entries == entries.len() {
                        debug_assert_eq!(decode::<T>(&bytes), entries, "a bucket reads back");
                        remember(&key, bytes, entries);
                    }
                    return Ok(());
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// Serialises the bucket within its byte cap. Past the cap, other rooms' entries that
    /// [`Record::eviction`] allows to go are dropped, lowest rank and soonest expiry first;
    /// the entry being written (`keep`) and entries that must never go stay. If the bucket
    /// still does not fit and the write would make it larger, nothing is written:
    /// [`StoreError::Full`]. Returns the bucket's bytes and how many entries they hold.
    fn encode_within_cap(
        &self,
        entries: &[Entry<T>],
        own: Option<(&str, &[u8])>,
        keep: &str,
        old_size: usize,
        now_ms: u64,
    ) -> Result<(Vec<u8>, usize), StoreError> {
        let mut encoded: Vec<(Eviction, u64, String)> = entries
            .iter()
            .filter_map(|entry| {
                let eviction = if entry.k == keep {
                    Eviction::Never
                } else {
                    entry.v.eviction(now_ms)
                };
                let json = match own {
                    Some((k, value)) if k == entry.k => encode_entry_with(entry, value)?,
                    _ => encode_entry(entry)?,
                };
                Some((eviction, entry.e, json))
            })
            .collect();
        // "[" + entries joined by "," + "]"
        let mut size = 2 + encoded.iter().map(|(_, _, e)| e.len() + 1).sum::<usize>();
        while size > self.max_bytes {
            let victim = encoded
                .iter()
                .enumerate()
                .filter(|(_, (eviction, _, _))| *eviction != Eviction::Never)
                .min_by_key(|(_, (eviction, expiry, _))| (*eviction, *expiry))
                .map(|(i, _)| i);
            let Some(victim) = victim else { break };
            size -= encoded.remove(victim).2.len() + 1;
        }
        if size > self.max_bytes && size > old_size {
            return Err(StoreError::Full);
        }
        let mut out = String::with_capacity(size);
        out.push('[');
        for (i, (_, _, entry)) in encoded.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(entry);
        }
        out.push(']');
        Ok((out.into_bytes(), encoded.len()))
    }
}

/// The bucket of a digested id: SHA-256 keyed by the process's secret seed, so which ids
/// share a bucket cannot be worked out from outside.
fn bucket_index(digest: &str, count: u32) -> u32 {
    let seed = BUCKET_SEED.load(Ordering::Relaxed);
    let keyed = |digest: &str| {
        let mut hasher = Sha256::new();
        hasher.update(seed.to_le_bytes());
        hasher.update(digest.as_bytes());
        let hash = hasher.finalize();
        (
            seed,
            u32::from_le_bytes([hash[0], hash[1], hash[2], hash[3]]),
        )
    };
    let hash = match memo::named(&BUCKET_HASHES, digest, keyed) {
        (with, hash) if with == seed => hash,
        _ => keyed(digest).1,
    };
    hash % count.max(1)
}

/// An in-process [`SharedStore`] with the host's semantics (CAS starts at 1 and changes on
/// every write), for tests and for anything that runs outside Envoy.
#[derive(Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    /// Mirrors the host's accounting gauges.
    pub keys: std::cell::Cell<i64>,
    pub bytes: std::cell::Cell<i64>,
    pub entries: std::cell::Cell<i64>,
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.map.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut map = self.map.borrow_mut();
        let current = map.get(key).map(|(_, c)| *c);
        if let (Some(expected), Some(current)) = (cas, current) {
            if expected != current {
                return Err(StoreError::CasMismatch);
            }
        }
        let next = current.map_or(1, |c| c.wrapping_add(1));
        map.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }

    fn account(&self, held: Held) {
        self.keys.set(self.keys.get() + held.keys);
        self.bytes.set(self.bytes.get() + held.bytes);
        self.entries.set(self.entries.get() + held.entries);
    }
}

impl MemoryStore {
    pub fn key_count(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn byte_count(&self) -> usize {
        self.map.borrow().values().map(|(v, _)| v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const BUCKETS: Buckets<i64> = Buckets::new("t", 4, 400);

    fn encode<T: Record>(entries: &[Entry<T>]) -> Vec<u8> {
        serde_json::to_vec(entries).unwrap()
    }

    #[test]
    fn stores_reads_and_expires_entries() {
        let store = MemoryStore::default();
        BUCKETS
            .update(&store, "!a", 1000, |old: Option<(&i64, u64)>| {
                assert!(old.is_none());
                (Change::Put(7, 2000), ())
            })
            .unwrap();
        assert_eq!(BUCKETS.get(&store, "!a", 1999), Some(7));
        assert_eq!(BUCKETS.get(&store, "!a", 2000), None);
        assert_eq!(BUCKETS.get(&store, "!b", 1000), None);
    }

    #[test]
    fn update_retries_on_cas_mismatch() {
        /// A store where another thread writes the key right after every first read.
        struct Contended {
            inner: MemoryStore,
            interfered: std::cell::Cell<bool>,
        }
        impl SharedStore for Contended {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                let value = self.inner.get(key);
                if !self.interfered.replace(true) {
                    let other = encode(&[Entry {
                        k: digest("!a"),
                        e: 9999,
                        v: 1i64,
                    }]);
                    self.inner.set(key, &other, None).unwrap();
                }
                value
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
                self.inner.set(key, value, cas)
            }
        }
        let store = Contended {
            inner: MemoryStore::default(),
            interfered: Default::default(),
        };
        store
            .inner
            .set(&BUCKETS.key_for("!a"), b"[]", None)
            .unwrap();
        let mut seen = Vec::new();
        BUCKETS
            .update(&store, "!a", 0, |old: Option<(&i64, u64)>| {
                let old = old.map(|(v, _)| *v);
                seen.push(old);
                (Change::Put(old.unwrap_or(0) + 1, 9999), ())
            })
            .unwrap();
        assert_eq!(seen, [None, Some(1)]);
        assert_eq!(BUCKETS.get(&store.inner, "!a", 0), Some(2));
    }

    #[test]
    fn keys_and_bytes_stay_bounded() {
        let store = MemoryStore::default();
        for i in 0..10_000u64 {
            let room = format!("!room{i}:example.com");
            BUCKETS
                .update(&store, &room, i, |_: Option<(&i64, u64)>| {
                    (Change::Put(1, i + 1_000_000), ())
                })
                .unwrap();
        }
        assert!(store.key_count() <= 4);
        assert!(store.byte_count() <= 4 * 400);
        assert_eq!(store.keys.get() as usize, store.key_count());
        assert_eq!(store.bytes.get() as usize, store.byte_count());
        let entries: usize = (0..BUCKETS.count)
            .filter_map(|i| store.get(&BUCKETS.key_of(i)))
            .map(|(bytes, _)| decode::<i64>(&bytes).len())
            .sum();
        assert!(entries > 0);
        assert_eq!(store.entries.get() as usize, entries);
        // The newest entries survive eviction.
        assert_eq!(BUCKETS.get(&store, "!room9999:example.com", 0), Some(1));
    }

    #[test]
    fn create_all_makes_every_bucket_once() {
        let store = MemoryStore::default();
        BUCKETS.create_all(&store);
        BUCKETS.create_all(&store);
        assert_eq!(store.key_count(), 4);
        assert_eq!(store.keys.get(), 4);
        assert_eq!(store.bytes.get() as usize, store.byte_count());
        // Updates find their bucket and go through CAS.
        BUCKETS
            .update(&store, "!a", 0, |_: Option<(&i64, u64)>| {
                (Change::Put(1, 10), ())
            })
            .unwrap();
        assert_eq!(store.keys.get(), 4);
    }

    #[test]
    fn the_entry_being_written_survives_a_full_bucket() {
        let store = MemoryStore::default();
        let one_bucket: Buckets<i64> = Buckets::new("t", 1, 200);
        for i in 0..20 {
            one_bucket
                .update(
                    &store,
                    &format!("!long-lived{i}"),
                    0,
                    |_: Option<(&i64, u64)>| (Change::Put(1, 1_000_000), ()),
                )
                .unwrap();
        }
        // A short-lived entry written into the full bucket is kept; older ones make room.
        one_bucket
            .update(&store, "!short", 0, |_: Option<(&i64, u64)>| {
                (Change::Put(-1, 10), ())
            })
            .unwrap();
        assert_eq!(one_bucket.get(&store, "!short", 0), Some(-1));
        assert!(store.byte_count() <= 200);
    }

    #[test]
    fn removing_an_entry() {
        let store = MemoryStore::default();
        BUCKETS
            .update(&store, "!a", 0, |_: Option<(&i64, u64)>| {
                (Change::Put(1, 10), ())
            })
            .unwrap();
        BUCKETS
            .update(&store, "!a", 0, |_: Option<(&i64, u64)>| {
                (Change::Remove, ())
            })
            .unwrap();
        assert_eq!(BUCKETS.get(&store, "!a", 0), None);
    }

    /// A record that must never be evicted while it lives.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Held(i64);

    impl Record for Held {
        fn eviction(&self, _now_ms: u64) -> Eviction {
            Eviction::Never
        }
    }

    #[test]
    fn live_entries_that_must_stay_are_never_evicted() {
        let store = MemoryStore::default();
        let one_bucket: Buckets<Held> = Buckets::new("t", 1, 200);
        let mut kept = Vec::new();
        let mut full = 0;
        for i in 0..20 {
            let id = format!("!held{i}");
            match one_bucket.update(&store, &id, 0, |_: Option<(&Held, u64)>| {
                (Change::Put(Held(1), 1_000_000), ())
            }) {
                Ok(()) => kept.push(id),
                Err(StoreError::Full) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(full > 0 && !kept.is_empty());
        // Every write that succeeded is still there; the ones that did not fit said so.
        for id in &kept {
            assert_eq!(one_bucket.get(&store, id, 0), Some(Held(1)));
        }
        assert!(store.byte_count() <= 200);
        // Once they expire, their place is free again.
        one_bucket
            .update(&store, "!later", 1_000_000, |_: Option<(&Held, u64)>| {
                (Change::Put(Held(2), 2_000_000), ())
            })
            .unwrap();
    }

    #[test]
    fn ids_are_filed_under_fixed_size_digests() {
        let store = MemoryStore::default();
        let huge = "!".repeat(100_000);
        BUCKETS
            .update(&store, &huge, 0, |_: Option<(&i64, u64)>| {
                (Change::Put(1, 10), ())
            })
            .unwrap();
        assert_eq!(BUCKETS.get(&store, &huge, 0), Some(1));
        assert!(store.byte_count() < 100);
    }

    #[test]
    fn an_id_held_twice_reads_as_its_last_entry_and_a_write_is_what_is_read() {
        let store = MemoryStore::default();
        let k = digest("!r");
        let twice = format!(r#"[["{k}",9999,3],["{k}",9999,7]]"#);
        store
            .set(&BUCKETS.key_for("!r"), twice.as_bytes(), None)
            .unwrap();
        assert_eq!(BUCKETS.get(&store, "!r", 0), Some(7));
        BUCKETS
            .update(&store, "!r", 0, |_: Option<(&i64, u64)>| {
                (Change::Put(2, 9999), ())
            })
            .unwrap();
        assert_eq!(BUCKETS.get(&store, "!r", 0), Some(2));
    }

    #[test]
    fn removing_what_is_not_there_writes_nothing() {
        let store = MemoryStore::default();
        BUCKETS.create_all(&store);
        let before = store.get(&BUCKETS.key_for("!a"));
        BUCKETS
            .update(&store, "!a", 0, |_: Option<(&i64, u64)>| {
                (Change::Remove, ())
            })
            .unwrap();
        assert_eq!(store.get(&BUCKETS.key_for("!a")), before);
    }
}
