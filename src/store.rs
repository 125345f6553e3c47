//! State shared by every worker thread of one Envoy process, in bounded buckets.
//!
//! proxy-wasm shared data is a flat key/value store with compare-and-swap, no expiry and no
//! key listing. The guard therefore never creates keys per room: each kind of state lives in
//! a fixed number of buckets (`<prefix>.<n>`), a room is hashed to one bucket, and every write
//! to a bucket drops its expired entries and, past a size cap, the entries closest to expiry.
//! Keys and bytes held are thus bounded by construction, whatever the number of rooms seen.
//! Updates are read-modify-write loops on the bucket's CAS, so they are atomic across threads.

use crate::gojson::{self, Value};

/// The host's shared data, as the core sees it.
pub trait SharedStore {
    /// The value and its CAS token, or `None` when the key does not exist.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if `cas` is still current (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
    /// Told about every change in the number of keys and bytes the guard holds.
    fn account(&self, _keys_delta: i64, _bytes_delta: i64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another thread wrote the key since it was read.
    CasMismatch,
    /// The host refused the write.
    Failed,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreError::CasMismatch => "shared data kept changing under contention",
            StoreError::Failed => "shared data write failed",
        })
    }
}

const EMPTY_BUCKET: &[u8] = b"[]";

/// Attempts of one read-modify-write before giving up; contention on one bucket is brief.
const MAX_ATTEMPTS: usize = 64;

/// A value kept in a bucket, written as JSON.
pub trait Record: Sized {
    fn write(&self, out: &mut String);
    fn read(value: &Value) -> Option<Self>;
}

impl Record for i64 {
    fn write(&self, out: &mut String) {
        out.push_str(&self.to_string());
    }

    fn read(value: &Value) -> Option<Self> {
        match value {
            Value::Number(text) => text.parse().ok(),
            _ => None,
        }
    }
}

/// One stored entry: its id (a room), when it expires (ms since the epoch), its value.
/// A bucket is the JSON array of its entries, each `[id, expiry, value]`.
#[derive(Clone, Debug, PartialEq)]
struct Entry<T> {
    k: String,
    e: u64,
    v: T,
}

fn decode<T: Record>(bytes: &[u8]) -> Vec<Entry<T>> {
    let Ok(Value::Array(items)) = gojson::parse_document(bytes) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item.as_array()? {
            [Value::String(k), e, v] => Some(Entry {
                k: k.clone(),
                e: e.as_u64()?,
                v: T::read(v)?,
            }),
            _ => None,
        })
        .collect()
}

fn encode_entry<T: Record>(entry: &Entry<T>) -> String {
    let mut out = String::from("[");
    gojson::write_string(&mut out, &entry.k);
    out.push(',');
    out.push_str(&entry.e.to_string());
    out.push(',');
    entry.v.write(&mut out);
    out.push(']');
    out
}

#[cfg(test)]
fn encode<T: Record>(entries: &[Entry<T>]) -> Vec<u8> {
    let parts: Vec<String> = entries.iter().map(encode_entry).collect();
    format!("[{}]", parts.join(",")).into_bytes()
}

/// What an update does to an entry.
pub enum Change<T> {
    /// Leave the bucket as it is (no write).
    Keep,
    /// Store this value until this time (ms since the epoch).
    Put(T, u64),
    Remove,
}

/// A family of buckets holding entries of type `T`.
pub struct Buckets {
    pub prefix: &'static str,
    pub count: u32,
    /// Bytes a bucket may hold before entries are evicted.
    pub max_bytes: usize,
}

impl Buckets {
    pub fn key_for(&self, id: &str) -> String {
        self.key_of(fnv1a(id.as_bytes()) % self.count)
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
                store.account(1, EMPTY_BUCKET.len() as i64);
            }
        }
    }

    /// The live entry for `id`, if any.
    pub fn get<T: Record>(&self, store: &dyn SharedStore, id: &str, now_ms: u64) -> Option<T> {
        let (bytes, _) = store.get(&self.key_for(id))?;
        decode::<T>(&bytes)
            .into_iter()
            .find(|entry| entry.k == id && entry.e > now_ms)
            .map(|entry| entry.v)
    }

    /// Atomically applies `change` to the live entry for `id` (its value and expiry).
    /// `change` may run several times under contention and must depend only on its input;
    /// the second half of its last result is returned.
    pub fn update<T, R>(
        &self,
        store: &dyn SharedStore,
        id: &str,
        now_ms: u64,
        mut change: impl FnMut(Option<(&T, u64)>) -> (Change<T>, R),
    ) -> Result<R, StoreError>
    where
        T: Record,
    {
        let key = self.key_for(id);
        for _ in 0..MAX_ATTEMPTS {
            let (old_bytes, cas) = match store.get(&key) {
                Some((bytes, cas)) => (bytes, Some(cas)),
                None => (Vec::new(), None),
            };
            // A bucket that does not parse (another version of the guard) is started afresh.
            let mut entries: Vec<Entry<T>> = decode(&old_bytes);
            entries.retain(|entry| entry.e > now_ms);
            let position = entries.iter().position(|entry| entry.k == id);
            let (change, result) = change(position.map(|i| (&entries[i].v, entries[i].e)));
            match change {
                Change::Keep => return Ok(result),
                Change::Remove => {
                    if let Some(i) = position {
                        entries.remove(i);
                    }
                }
                Change::Put(v, e) => {
                    if let Some(i) = position {
                        entries.remove(i);
                    }
                    entries.push(Entry {
                        k: id.to_owned(),
                        e,
                        v,
                    });
                }
            }
            let bytes = self.encode_within_cap(&mut entries, id);
            match store.set(&key, &bytes, cas) {
                Ok(()) => {
                    let new_key = i64::from(cas.is_none());
                    store.account(new_key, bytes.len() as i64 - old_bytes.len() as i64);
                    return Ok(result);
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// Serialises the bucket, evicting the entries closest to expiry until it fits. The entry
    /// just written (`keep`) goes last: it is what the caller needs now, even when it expires
    /// sooner than the rest (a pending-lookup marker does).
    fn encode_within_cap<T: Record>(&self, entries: &mut Vec<Entry<T>>, keep: &str) -> Vec<u8> {
        let mut encoded: Vec<(u64, bool, String)> = entries
            .drain(..)
            .map(|entry| (entry.e, entry.k == keep, encode_entry(&entry)))
            .collect();
        // "[" + entries joined by "," + "]"
        let mut size = 2 + encoded.iter().map(|(_, _, e)| e.len() + 1).sum::<usize>();
        while size > self.max_bytes && !encoded.is_empty() {
            let victim = encoded
                .iter()
                .enumerate()
                .min_by_key(|(_, (expiry, kept, _))| (*kept, *expiry))
                .map_or(0, |(i, _)| i);
            size -= encoded.remove(victim).2.len() + 1;
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
        out.into_bytes()
    }
}

/// FNV-1a: a stable, dependency-free hash to spread ids over buckets.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// An in-process [`SharedStore`] with the host's semantics (CAS starts at 1 and changes on
/// every write), for tests and for anything that runs outside Envoy.
#[derive(Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    /// Mirrors the host's accounting gauges.
    pub keys: std::cell::Cell<i64>,
    pub bytes: std::cell::Cell<i64>,
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

    fn account(&self, keys_delta: i64, bytes_delta: i64) {
        self.keys.set(self.keys.get() + keys_delta);
        self.bytes.set(self.bytes.get() + bytes_delta);
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

    const BUCKETS: Buckets = Buckets {
        prefix: "t",
        count: 4,
        max_bytes: 400,
    };

    #[test]
    fn stores_reads_and_expires_entries() {
        let store = MemoryStore::default();
        BUCKETS
            .update(&store, "!a", 1000, |old: Option<(&i64, u64)>| {
                assert!(old.is_none());
                (Change::Put(7, 2000), ())
            })
            .unwrap();
        assert_eq!(BUCKETS.get::<i64>(&store, "!a", 1999), Some(7));
        assert_eq!(BUCKETS.get::<i64>(&store, "!a", 2000), None);
        assert_eq!(BUCKETS.get::<i64>(&store, "!b", 1000), None);
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
                        k: "!a".to_owned(),
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
        assert_eq!(BUCKETS.get::<i64>(&store.inner, "!a", 0), Some(2));
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
        // The newest entries survive eviction.
        assert_eq!(
            BUCKETS.get::<i64>(&store, "!room9999:example.com", 0),
            Some(1)
        );
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
        let one_bucket = Buckets {
            prefix: "t",
            count: 1,
            max_bytes: 200,
        };
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
        assert_eq!(one_bucket.get::<i64>(&store, "!short", 0), Some(-1));
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
        assert_eq!(BUCKETS.get::<i64>(&store, "!a", 0), None);
    }
}
