//! Room rules looked up in Synapse, cached for every worker thread, with one lookup in flight
//! per room, and the last rule seen kept through a Synapse outage: the room's limit
//! ([`LIMITS`]) and, for rooms that are full, its power levels ([`POWER_LEVELS`]).
//!
//! A successful Synapse answer is *fresh* for `limit_cache_ttl_seconds`. An answer that
//! matters when Synapse fails ([`Answer::keeps_stale`]: a positive limit, power levels) is then
//! kept, *stale*, for `stale_limit_seconds` more: when a refresh fails meanwhile, the guard
//! uses the stale answer (and serves it as fresh for one more TTL, so that one failing lookup
//! per TTL is made, not one per request) instead of treating the room as unlimited. "No
//! limit" answers are not used stale when Synapse fails: a room the guard never saw limited
//! fails per `failure_mode` while Synapse is down. A lookup not made because the process's
//! budget is spent ([`Unasked::OverBudget`]) takes any room answer still in its stale
//! window, "no limit" too: a room the guard knows is never refused for a flood of others.
//!
//! While one request looks a room up, the room's entry carries a "lookup pending" mark for at
//! most the Synapse timeout, so concurrent requests for the same room wait for that answer
//! instead of each asking Synapse.

use std::marker::PhantomData;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::state::store::{Buckets, Change, Eviction, Record, SharedStore, StoreError};
use crate::upstream::synapse::{Limit, PowerLevels};

/// A Synapse answer either cache holds. One type for both, so that the shared-data code is in
/// the module once; [`Cache`] keeps each cache to its own kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Limit(Limit),
    Power(PowerLevels),
    /// Whose an OpenID token is, as Synapse said ([`OPENID_USERS`]).
    User(VerifiedUser),
}

/// The Matrix user Synapse's userinfo named for an OpenID token: a token's user never changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedUser(pub String);

impl Rule {
    /// Whether the answer is kept, stale, through a Synapse outage: a positive limit (a room
    /// never seen limited is not held to one), power levels.
    fn keeps_stale(&self) -> bool {
        !matches!(self, Rule::Limit(Limit::None) | Rule::User(_))
    }

    /// Whether the answer, past its TTL, stands in for a lookup not made for `why`.
    fn serves_stale(&self, why: Unasked) -> bool {
        match why {
            Unasked::Failed => self.keeps_stale(),
            Unasked::OverBudget => !matches!(self, Rule::User(_)),
        }
    }
}

/// Why a claimed lookup brought no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unasked {
    /// Synapse failed: only an answer that [`Rule::keeps_stale`] is used stale.
    Failed,
    /// The lookup was not made, the process's budget being spent: any room answer still in
    /// its stale window is used, "no limit" too.
    OverBudget,
}

/// A kind of answer a [`Cache`] holds.
pub trait Answer: Sized {
    fn into_rule(self) -> Rule;
    fn from_rule(rule: Rule) -> Option<Self>;
}

impl Answer for Limit {
    fn into_rule(self) -> Rule {
        Rule::Limit(self)
    }
    fn from_rule(rule: Rule) -> Option<Limit> {
        match rule {
            Rule::Limit(limit) => Some(limit),
            _ => None,
        }
    }
}

impl Answer for PowerLevels {
    fn into_rule(self) -> Rule {
        Rule::Power(self)
    }
    fn from_rule(rule: Rule) -> Option<PowerLevels> {
        match rule {
            Rule::Power(levels) => Some(levels),
            _ => None,
        }
    }
}

impl Answer for VerifiedUser {
    fn into_rule(self) -> Rule {
        Rule::User(self)
    }
    fn from_rule(rule: Rule) -> Option<VerifiedUser> {
        match rule {
            Rule::User(user) => Some(user),
            _ => None,
        }
    }
}

/// A limit is stored as its number (`0`: no limit), or `[number, exempt level]` when its event
/// names a level; power levels as `[send level, users
/// default, [[user digest, level]...]]`; a verified user as its id, a string.
impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Rule::Limit(Limit::None) => 0u32.serialize(serializer),
            Rule::Limit(Limit::MaxUsers(n, None)) => n.serialize(serializer),
            Rule::Limit(Limit::MaxUsers(n, Some(level))) => {
                [(*n).into(), *level].serialize(serializer)
            }
            Rule::Power(levels) => {
                (levels.send_level, levels.users_default, &levels.users).serialize(serializer)
            }
            Rule::User(VerifiedUser(user)) => user.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = Rule;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a limit, power levels or a user")
            }
            fn visit_str<E: de::Error>(self, user: &str) -> Result<Rule, E> {
                Ok(Rule::User(VerifiedUser(user.to_owned())))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Rule, E> {
                Ok(Rule::Limit(match u32::try_from(n) {
                    Ok(0) => Limit::None,
                    Ok(n) => Limit::MaxUsers(n, None),
                    Err(_) => return Err(E::custom("limit out of range")),
                }))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rule, A::Error> {
                let missing = || de::Error::custom("a rule has two or three parts");
                let first: i64 = seq.next_element()?.ok_or_else(missing)?;
                let second: i64 = seq.next_element()?.ok_or_else(missing)?;
                let Some(users) = seq.next_element()? else {
                    let max = u32::try_from(first)
                        .ok()
                        .filter(|max| *max > 0)
                        .ok_or_else(|| de::Error::custom("limit out of range"))?;
                    return Ok(Rule::Limit(Limit::MaxUsers(max, Some(second))));
                };
                Ok(Rule::Power(PowerLevels {
                    send_level: first,
                    users_default: second,
                    users,
                }))
            }
        }
        deserializer.deserialize_any(RuleVisitor)
    }
}

/// The rooms' limits. Entries are about 70 bytes (ids are stored as digests), so this holds
/// some 28,000 rooms; entries without a limit are evicted first, limits last. Many small
/// buckets: a lookup decodes one bucket, so its size is the per-request cost.
pub const LIMITS: Cache<Limit> = Cache::new("voice_limit_guard.limits", 512, 4 * 1024);

/// The power levels of rooms that were full when someone asked to join. An entry holds the
/// few users above the room's default level ([`crate::upstream::synapse::MAX_PRIVILEGED`] at most), a
/// few hundred bytes.
pub const POWER_LEVELS: Cache<PowerLevels> =
    Cache::new("voice_limit_guard.power_levels", 256, 16 * 1024);

/// Who OpenID tokens belong to, as Synapse's userinfo said, keyed by the digest of the
/// token's server name and the token (the token itself is never stored). An entry is about 100
/// bytes; a `/sfu/get` client asking again with the same token costs no userinfo call.
pub const OPENID_USERS: Cache<VerifiedUser> =
    Cache::new("voice_limit_guard.openid_users", 256, 8 * 1024);

/// One kind of room rule, in shared data (its buckets are created when the VM starts).
pub struct Cache<V> {
    pub buckets: Buckets<Entry>,
    kind: PhantomData<fn() -> V>,
}

/// What the shared cache holds for one room. Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The last answer Synapse gave, if any.
    seen: Option<Rule>,
    /// Until when `seen` is served without asking Synapse.
    fresh_until: u64,
    /// Until when `seen` is used if Synapse is not asked or fails ([`Rule::serves_stale`]).
    stale_until: u64,
    /// Until when another request's lookup is awaited (0: none pending).
    pending_until: u64,
}

impl Entry {
    fn expires_at(&self) -> u64 {
        let stale = match &self.seen {
            Some(rule) if rule.serves_stale(Unasked::OverBudget) => self.stale_until,
            _ => 0,
        };
        self.fresh_until.max(stale).max(self.pending_until)
    }

    fn stale_rule(&self, now_ms: u64, why: Unasked) -> Option<Rule> {
        match &self.seen {
            Some(rule) if rule.serves_stale(why) && self.stale_until > now_ms => Some(rule.clone()),
            _ => None,
        }
    }
}

/// Stored as `[answer or null, fresh until, stale until, pending until]`.
impl Serialize for Entry {
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

impl<'de> Deserialize<'de> for Entry {
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

impl Record for Entry {
    /// Unlimited rooms and bare pending marks go first; limits and levels last.
    fn eviction(&self, _now_ms: u64) -> Eviction {
        Eviction::Rank(u8::from(self.seen.as_ref().is_some_and(Rule::keeps_stale)))
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

fn classify(entry: &Entry, now_ms: u64) -> Option<Cached<Rule>> {
    match &entry.seen {
        Some(rule) if entry.fresh_until > now_ms => Some(Cached::Known(rule.clone())),
        _ if entry.pending_until > now_ms => Some(Cached::Pending),
        _ => None,
    }
}

/// How long answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Served without asking again (0: every request asks).
    pub ttl_ms: u64,
    /// An answer's further life for when Synapse fails (see [`Rule::keeps_stale`]).
    pub stale_ms: u64,
}

impl<V: Answer> Cache<V> {
    const fn new(prefix: &'static str, count: u32, max_bytes: usize) -> Cache<V> {
        Cache {
            buckets: Buckets::new(prefix, count, max_bytes),
            kind: PhantomData,
        }
    }

    /// Reads the room's answer, or claims the lookup for the caller when nobody holds it.
    /// `pending_ms` bounds how long the claim holds off others (the Synapse timeout).
    pub fn read_or_claim(
        &self,
        store: &dyn SharedStore,
        room: &str,
        now_ms: u64,
        pending_ms: u64,
    ) -> Result<Cached<V>, StoreError> {
        read_or_claim(&self.buckets, store, room, now_ms, pending_ms).map(typed)
    }

    /// Reads the room's entry without claiming anything: a fresh answer or a pending lookup.
    pub fn peek(&self, store: &dyn SharedStore, room: &str, now_ms: u64) -> Option<Cached<V>> {
        self.buckets
            .get(store, room, now_ms)
            .and_then(|entry| classify(&entry, now_ms))
            .map(typed)
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
        store_answer(&self.buckets, store, room, answer.into_rule(), now_ms, life)
    }

    /// After a lookup that brought no answer (`why`): drops the pending mark, so the next
    /// request asks Synapse again, and returns the stale answer to use, if one is known. That
    /// stale answer is then served as fresh for one TTL, so an outage costs one failing lookup
    /// per TTL, not one per request.
    pub fn release_claim(
        &self,
        store: &dyn SharedStore,
        room: &str,
        now_ms: u64,
        life: Lifetimes,
        why: Unasked,
    ) -> Result<Option<V>, StoreError> {
        release_claim(&self.buckets, store, room, now_ms, life, why)
            .map(|rule| rule.and_then(V::from_rule))
    }
}

/// A cached rule as the cache's own kind (another kind, which its buckets never hold, reads
/// as nothing fresh).
fn typed<V: Answer>(cached: Cached<Rule>) -> Cached<V> {
    match cached {
        Cached::Known(rule) => V::from_rule(rule).map_or(Cached::Claimed, Cached::Known),
        Cached::Pending => Cached::Pending,
        Cached::Claimed => Cached::Claimed,
    }
}

fn read_or_claim(
    buckets: &Buckets<Entry>,
    store: &dyn SharedStore,
    room: &str,
    now_ms: u64,
    pending_ms: u64,
) -> Result<Cached<Rule>, StoreError> {
    if let Some(cached) = buckets
        .get(store, room, now_ms)
        .and_then(|entry| classify(&entry, now_ms))
    {
        return Ok(cached);
    }
    buckets.update(store, room, now_ms, |old: Option<(&Entry, u64)>| {
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

fn store_answer(
    buckets: &Buckets<Entry>,
    store: &dyn SharedStore,
    room: &str,
    rule: Rule,
    now_ms: u64,
    life: Lifetimes,
) -> Result<(), StoreError> {
    let entry = Entry {
        seen: Some(rule),
        fresh_until: now_ms.saturating_add(life.ttl_ms),
        stale_until: now_ms
            .saturating_add(life.ttl_ms)
            .saturating_add(life.stale_ms),
        pending_until: 0,
    };
    let until = entry.expires_at();
    buckets.update(store, room, now_ms, |_: Option<(&Entry, u64)>| {
        if until <= now_ms {
            (Change::Remove, ())
        } else {
            (Change::Put(entry.clone(), until), ())
        }
    })
}

fn release_claim(
    buckets: &Buckets<Entry>,
    store: &dyn SharedStore,
    room: &str,
    now_ms: u64,
    life: Lifetimes,
    why: Unasked,
) -> Result<Option<Rule>, StoreError> {
    buckets.update(store, room, now_ms, |old: Option<(&Entry, u64)>| {
        let Some((entry, _)) = old else {
            return (Change::Keep, None);
        };
        if let Some(Cached::Known(rule)) = classify(entry, now_ms) {
            // Another request stored an answer meanwhile.
            return (Change::Keep, Some(rule));
        }
        let stale = entry.stale_rule(now_ms, why);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::MemoryStore;
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
            .store_answer(&store, "!r", Limit::MaxUsers(3, None), 100, LIFE)
            .unwrap();
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 10_099, 5000),
            Ok(Cached::Known(Limit::MaxUsers(3, None)))
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
        assert_eq!(
            LIMITS.release_claim(&store, "!r", 1, LIFE, Unasked::Failed),
            Ok(None)
        );
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", 2, 5000),
            Ok(Cached::Claimed)
        );
    }

    #[test]
    fn a_limit_seen_before_outlives_a_failed_refresh() {
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!r", Limit::MaxUsers(2, None), 0, LIFE)
            .unwrap();
        // Long past the TTL, the refresh fails: the stale limit is enforced...
        let later = 1_000_000;
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later, 5000),
            Ok(Cached::Claimed)
        );
        assert_eq!(
            LIMITS.release_claim(&store, "!r", later + 1, LIFE, Unasked::Failed),
            Ok(Some(Limit::MaxUsers(2, None)))
        );
        // ...and served as cached for one TTL, so the outage costs one lookup per TTL.
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later + 2, 5000),
            Ok(Cached::Known(Limit::MaxUsers(2, None)))
        );
        assert_eq!(
            LIMITS.read_or_claim(&store, "!r", later + 1 + 10_000, 5000),
            Ok(Cached::Claimed)
        );
        // Once the stale window has passed, nothing is left to enforce.
        let past = 10_000 + 3_600_000;
        LIMITS.read_or_claim(&store, "!r", past, 5000).unwrap();
        assert_eq!(
            LIMITS.release_claim(&store, "!r", past + 1, LIFE, Unasked::Failed),
            Ok(None)
        );
    }

    #[test]
    fn no_limit_is_not_kept_stale() {
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!r", Limit::None, 0, LIFE)
            .unwrap();
        LIMITS.read_or_claim(&store, "!r", 20_000, 5000).unwrap();
        assert_eq!(
            LIMITS.release_claim(&store, "!r", 20_001, LIFE, Unasked::Failed),
            Ok(None)
        );
    }

    #[test]
    fn a_lookup_not_made_takes_any_room_answer_of_the_stale_window() {
        let store = MemoryStore::default();
        let end = 10_000 + 3_600_000;
        for (room, answer) in [("!r", Limit::MaxUsers(2, None)), ("!s", Limit::None)] {
            LIMITS.store_answer(&store, room, answer, 0, LIFE).unwrap();
            LIMITS.read_or_claim(&store, room, end - 1, 5000).unwrap();
            assert_eq!(
                LIMITS.release_claim(&store, room, end - 1, LIFE, Unasked::OverBudget),
                Ok(Some(answer))
            );
        }
        // A failure still takes only the limit.
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!s", Limit::None, 0, LIFE)
            .unwrap();
        assert_eq!(
            LIMITS.release_claim(&store, "!s", end - 1, LIFE, Unasked::Failed),
            Ok(None)
        );
        // Past the window, nothing.
        let store = MemoryStore::default();
        LIMITS
            .store_answer(&store, "!s", Limit::None, 0, LIFE)
            .unwrap();
        assert_eq!(
            LIMITS.release_claim(&store, "!s", end, LIFE, Unasked::OverBudget),
            Ok(None)
        );
    }

    #[test]
    fn zero_ttl_keeps_only_the_stale_limit() {
        let store = MemoryStore::default();
        let life = Lifetimes {
            ttl_ms: 0,
            stale_ms: 60_000,
        };
        LIMITS
            .store_answer(&store, "!r", Limit::MaxUsers(2, None), 1, life)
            .unwrap();
        assert_eq!(LIMITS.peek(&store, "!r", 1), None);
        assert_eq!(
            LIMITS.release_claim(&store, "!r", 2, life, Unasked::Failed),
            Ok(Some(Limit::MaxUsers(2, None)))
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
            .store_answer(&store, "!limited", Limit::MaxUsers(3, None), 0, LIFE)
            .unwrap();
        for i in 0..40_000u32 {
            let room = format!("!flood{i}");
            LIMITS
                .store_answer(&store, &room, Limit::None, 1, LIFE)
                .unwrap();
        }
        assert_eq!(
            LIMITS.peek(&store, "!limited", 2),
            Some(Cached::Known(Limit::MaxUsers(3, None)))
        );
        assert!(store.byte_count() <= (LIMITS.buckets.count as usize) * LIMITS.buckets.max_bytes);
    }
}
