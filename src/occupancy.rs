//! Who occupies a LiveKit room: the participants LiveKit reports, plus the users the guard
//! admitted who have not connected yet, with hashed identities mapped back to users.
//!
//! A client gets its token before it connects, so LiveKit's list lags behind the tokens
//! already issued: deciding on LiveKit alone admits a whole simultaneous burst. Each admission
//! therefore leaves a *reservation* for its user, and the decision counts "present in LiveKit
//! plus reserved". Check and reserve are one compare-and-swap update of the room's shared
//! entry, so across all worker threads of the process no two admissions can take the last
//! place. A reservation ends when its user shows up in LiveKit, or after the configured
//! reservation time if the user never connects.
//!
//! lk-jwt-service 0.4.3+ gives `/get_token` participants hashed identities, which do not say
//! which Matrix user they are. Every token the guard lets through pairs the identity with the
//! user lk-jwt-service verified, so the guard remembers those pairs (per room, as long as the
//! token lives or the participant stays) and maps participants back to users. Identities it
//! never saw count as distinct users.
//!
//! The record also keeps LiveKit's last participant list for `participants_cache_ms`, so a
//! burst of joins asks LiveKit once instead of once per token. Reservations keep the count
//! right in between: users admitted meanwhile are reserved, and users who left count until
//! the list is refreshed, which errs on the side of the limit.

use std::collections::BTreeSet;

use crate::decision::should_block;
use crate::livekit_names::matrix_user_of_identity;
use crate::store::{digest, Buckets, Change, Eviction, Record, SharedStore, StoreError};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where this state lives in shared data (created when the VM starts). A record at its caps
/// is about 28 KiB, so one always fits a bucket on its own; typical records are a few hundred
/// bytes.
pub const BUCKETS: Buckets<RoomRecord> = Buckets::new("voice_limit_guard.rooms", 1024, 32 * 1024);

/// How long a learnt identity is kept past the moment it was last seen in the room: a
/// participant stays connected after its join token expires.
const IDENTITY_KEEP_MS: u64 = 3600 * 1000;
/// Expiries are pushed back only when they gain more than this, to spare rewrites.
const REFRESH_SLACK_MS: u64 = 60 * 1000;
/// The longest a pairing is kept from a token's expiry alone.
const MAX_PAIRING_MS: u64 = 24 * 3600 * 1000;
/// Users admitted and not yet connected, per room. Beyond it an admission cannot be
/// recorded, which fails that request (never drops another reservation).
pub const MAX_RESERVATIONS: usize = 256;
/// Learnt identities kept per room and per user in a room. Past a cap, the oldest identity
/// not connected goes first; if every one is connected, the token is refused: an identity the
/// guard could not learn would count as one more user once connected, so letting it in would
/// let one account fill the room.
pub const MAX_IDENTITIES_PER_ROOM: usize = 256;
pub const MAX_IDENTITIES_PER_USER: usize = 16;
/// Longer participant lists are not cached (the cache is an optimisation).
const MAX_CACHED_LIST: usize = 256;

/// The shared record of one LiveKit room, stored as `[[[user, until, holds]...], [[identity,
/// user, until]...], [fresh until, [identity...]]]` (the last part only while a list is cached).
/// Users and identities are kept as [`digest`]s: the record's size does not depend on what
/// ids clients choose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoomRecord {
    /// Users admitted and not yet seen in LiveKit: (user, reserved until, holds). `holds`
    /// counts the admissions taken before lk-jwt-service answered that have not been refused
    /// since ([`release`]); [`PINNED`] once an admission was decided on an issued token.
    r: Vec<(String, u64, u32)>,
    /// Identities of tokens let through: (identity, user, remembered until).
    i: Vec<(String, String, u64)>,
    /// LiveKit's last participant list and until when it may be reused.
    p: Option<(u64, Vec<String>)>,
}

impl Serialize for RoomRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(2 + usize::from(self.p.is_some()))?;
        tuple.serialize_element(&self.r)?;
        tuple.serialize_element(&self.i)?;
        if let Some(p) = &self.p {
            tuple.serialize_element(p)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for RoomRecord {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = RoomRecord;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("[reservations, identities] or [reservations, identities, list]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RoomRecord, A::Error> {
                let missing = || de::Error::custom("a room record has at least two parts");
                let r = seq.next_element()?.ok_or_else(missing)?;
                let i = seq.next_element()?.ok_or_else(missing)?;
                let p = seq.next_element()?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a room record has at most three parts"));
                }
                Ok(RoomRecord { r, i, p })
            }
        }
        deserializer.deserialize_seq(RecordVisitor)
    }
}

impl Record for RoomRecord {
    /// Reservations and learnt identities hold the limit: never evicted for another room.
    fn eviction(&self) -> Eviction {
        if self.r.is_empty() && self.i.is_empty() {
            Eviction::Rank(0)
        } else {
            Eviction::Never
        }
    }
}

/// The digest of the Matrix user an identity's name says it is.
fn user_named_by(identity: &str) -> String {
    digest(matrix_user_of_identity(identity))
}

impl RoomRecord {
    /// The user behind a participant (by the digest of its identity): a learnt pairing
    /// first, the user-id grammar otherwise. Without the identity itself (a cached list holds
    /// digests only), an identity never learnt counts as a user of its own.
    fn user_of(&self, identity_digest: &str, identity: Option<&str>) -> String {
        match self.i.iter().find(|(known, _, _)| known == identity_digest) {
            Some((_, user, _)) => user.clone(),
            None => identity.map_or_else(|| identity_digest.to_owned(), user_named_by),
        }
    }

    fn expires_at(&self) -> u64 {
        let reservations = self.r.iter().map(|(_, until, _)| *until);
        let identities = self.i.iter().map(|(_, _, until)| *until);
        let list = self.p.iter().map(|(until, _)| *until);
        reservations
            .chain(identities)
            .chain(list)
            .max()
            .unwrap_or(0)
    }

    fn is_empty(&self) -> bool {
        self.r.is_empty() && self.i.is_empty() && self.p.is_none()
    }

    /// Pairs an identity with its verified user. Identities whose name already says who they
    /// are need no pairing. Caps per user and per room drop the oldest identity that is not
    /// connected (`connected`); when all are, the pairing cannot be kept: `Err(())`.
    fn remember(
        &mut self,
        identity: &str,
        user: &str,
        until: u64,
        connected: &BTreeSet<&str>,
    ) -> Result<(), ()> {
        let user = digest(user);
        if identity.is_empty() || user_named_by(identity) == user {
            return Ok(());
        }
        let identity = digest(identity);
        if let Some(entry) = self.i.iter_mut().find(|(known, _, _)| *known == identity) {
            if entry.2.saturating_add(REFRESH_SLACK_MS) < until {
                entry.2 = until;
            }
            entry.1 = user;
            return Ok(());
        }
        let of_user = self.i.iter().filter(|(_, u, _)| *u == user).count();
        if of_user >= MAX_IDENTITIES_PER_USER {
            self.forget_oldest(|(_, u, _)| *u == user, connected)?;
        }
        if self.i.len() >= MAX_IDENTITIES_PER_ROOM {
            self.forget_oldest(|_| true, connected)?;
        }
        self.i.push((identity, user, until));
        Ok(())
    }

    fn forget_oldest(
        &mut self,
        among: impl Fn(&(String, String, u64)) -> bool,
        connected: &BTreeSet<&str>,
    ) -> Result<(), ()> {
        let oldest = self
            .i
            .iter()
            .enumerate()
            .filter(|(_, entry)| among(entry) && !connected.contains(entry.0.as_str()))
            .min_by_key(|(_, (_, _, until))| *until)
            .map(|(n, _)| n)
            .ok_or(())?;
        self.i.remove(oldest);
        Ok(())
    }
}

/// Where the decision takes LiveKit's participant list from.
#[derive(Clone, Copy)]
pub enum Participants<'a> {
    /// Just asked: the identities LiveKit lists (disconnected ones left out).
    Fresh(&'a [String]),
    /// The list cached in the room's record, if it is still fresh.
    Cached,
}

/// One admission question.
pub struct Request<'a> {
    /// The LiveKit room (the token's `video.room`).
    pub room: &'a str,
    pub max_users: u32,
    pub participants: Participants<'a>,
    /// The Matrix user asking, as lk-jwt-service verified it.
    pub requester: &'a str,
    /// The identity of the token being decided.
    pub identity: &'a str,
    /// When that token expires (ms since the epoch; 0 if unknown).
    pub token_expires_ms: u64,
    pub reservation_ms: u64,
    /// How long a fresh list may be reused (0: never).
    pub list_cache_ms: u64,
    pub now_ms: u64,
    /// The admission is taken before lk-jwt-service has answered: its reservation is marked so
    /// that it can be undone ([`release`]) should lk-jwt-service refuse the token.
    pub releasable: bool,
    /// The requester may come in whatever the count (a moderator of the room); they still
    /// count, and the device caps still apply.
    pub exempt: bool,
    /// Nobody verified who asks (`requester` is a stand-in unique to the request's OpenID
    /// token): admitted only as one more user, with a place free, never on a place already
    /// counted, and never exempt.
    pub unverified: bool,
}

/// The decision, with what it was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// Refused because every identity the room can hold for this user (or at all) is
    /// connected, not because the room is full.
    pub too_many_devices: bool,
    /// Distinct users present in LiveKit.
    pub present: usize,
    /// Users admitted but not yet in LiveKit (the requester excluded).
    pub reserved: usize,
    /// A releasable admission holds the requester's reservation: [`release`] it if
    /// lk-jwt-service refuses the token.
    pub holds: bool,
}

/// The `holds` of a reservation that no refusal may end: an admission decided on the token
/// lk-jwt-service issued.
pub const PINNED: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Decided(Verdict),
    /// No fresh list is cached: ask LiveKit, then decide with [`Participants::Fresh`].
    NeedList,
}

/// Decides and, when admitting, reserves a place, atomically for the whole process.
/// An admission whose reservation or identity cannot be recorded is an error, never an
/// admission that forgot something.
pub fn admit(store: &dyn SharedStore, q: &Request) -> Result<Outcome, StoreError> {
    BUCKETS
        .update(
            store,
            q.room,
            q.now_ms,
            |old: Option<(&RoomRecord, u64)>| {
                let mut record = old.map(|(r, _)| r.clone()).unwrap_or_default();
                let verdict = match decide(&mut record, q) {
                    Ok(Some(verdict)) => verdict,
                    Ok(None) => return (Change::Keep, Ok(Outcome::NeedList)),
                    Err(e) => return (Change::Keep, Err(e)),
                };
                let change = if old.is_some_and(|(unchanged, _)| *unchanged == record) {
                    Change::Keep // most repeated admissions change nothing: no write
                } else if record.is_empty() {
                    Change::Remove
                } else {
                    let until = record.expires_at();
                    Change::Put(record, until)
                };
                (change, Ok(Outcome::Decided(verdict)))
            },
        )
        .and_then(|outcome| outcome)
}

/// Gives back the hold a releasable admission took on `requester`'s reservation in `room`,
/// when lk-jwt-service refused its token. The reservation ends with its last hold: once every
/// admission of the user that took one was refused, and none was decided on an issued token.
/// Whether the reservation ended.
pub fn release(
    store: &dyn SharedStore,
    room: &str,
    requester: &str,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let requester = digest(requester);
    BUCKETS.update(store, room, now_ms, |old: Option<(&RoomRecord, u64)>| {
        let Some((old, _)) = old else {
            return (Change::Keep, false);
        };
        let Some(index) = old.r.iter().position(|(user, _, _)| *user == requester) else {
            return (Change::Keep, false);
        };
        let mut record = old.clone();
        let ended = match record.r.get_mut(index) {
            Some((_, _, holds)) if *holds != PINNED => {
                *holds = holds.saturating_sub(1);
                *holds == 0
            }
            _ => false,
        };
        if ended {
            record.r.remove(index);
        }
        let change = if record.is_empty() {
            Change::Remove
        } else {
            let until = record.expires_at();
            Change::Put(record, until)
        };
        (change, ended)
    })
}

fn decide(record: &mut RoomRecord, q: &Request) -> Result<Option<Verdict>, StoreError> {
    record.r.retain(|(_, until, _)| *until > q.now_ms);
    record.i.retain(|(_, _, until)| *until > q.now_ms);
    if record
        .p
        .as_ref()
        .is_some_and(|(until, _)| *until <= q.now_ms)
    {
        record.p = None;
    }
    // (digest of the identity, the identity itself when known).
    let participants: Vec<(String, Option<&str>)> = match q.participants {
        Participants::Fresh(list) => {
            let digests: Vec<(String, Option<&str>)> = list
                .iter()
                .map(|identity| (digest(identity), Some(identity.as_str())))
                .collect();
            if q.list_cache_ms > 0 && digests.len() <= MAX_CACHED_LIST {
                let cached = digests.iter().map(|(d, _)| d.clone()).collect();
                record.p = Some((q.now_ms.saturating_add(q.list_cache_ms), cached));
            }
            digests
        }
        Participants::Cached => match &record.p {
            Some((_, list)) => list.iter().map(|d| (d.clone(), None)).collect(),
            None => return Ok(None),
        },
    };
    // Every set here is a `BTreeSet<&str>` filled with `extend`: one element type and no
    // `collect` (which sorts a vector first) keep the set code in the module once, several KB
    // each time otherwise.
    let mut connected = BTreeSet::new();
    connected.extend(participants.iter().map(|(d, _)| d.as_str()));

    // Identities still in the room stay known while they are there (refreshed at most once a
    // minute, so repeated decisions need not rewrite the record).
    let keep_until = q.now_ms.saturating_add(IDENTITY_KEEP_MS);
    for (identity, _, until) in record.i.iter_mut() {
        if connected.contains(identity.as_str())
            && until.saturating_add(REFRESH_SLACK_MS) < keep_until
        {
            *until = keep_until;
        }
    }
    let users: Vec<String> = participants
        .iter()
        .map(|(d, identity)| record.user_of(d, *identity))
        .collect();
    let mut present = BTreeSet::new();
    present.extend(users.iter().map(String::as_str));
    // A reservation ends once its user is in LiveKit.
    record
        .r
        .retain(|(user, _, _)| !present.contains(user.as_str()));

    let requester = digest(q.requester);
    let mut occupied = present.clone();
    occupied.extend(record.r.iter().map(|(user, _, _)| user.as_str()));
    let admitted = if q.unverified {
        !occupied.contains(requester.as_str()) && occupied.len() < q.max_users as usize
    } else {
        q.exempt || !should_block(q.max_users, &occupied, &requester)
    };
    if !admitted && matches!(q.participants, Participants::Cached) {
        // A refusal is decided on a fresh list only: users who left since the list was taken
        // would otherwise keep their places, and a user refused would never see why not.
        return Ok(None);
    }
    let reserved = record.r.iter().filter(|(u, _, _)| *u != requester).count();
    let mut verdict = Verdict {
        admitted,
        too_many_devices: false,
        present: present.len(),
        reserved,
        holds: false,
    };
    if admitted {
        // A pairing lives while its token does, but never longer than a day: the token's
        // `exp` is lk-jwt-service's (an hour), not a reason to keep state for ever.
        let token_until = q
            .token_expires_ms
            .min(q.now_ms.saturating_add(MAX_PAIRING_MS))
            .max(q.now_ms.saturating_add(q.reservation_ms));
        if record
            .remember(q.identity, q.requester, token_until, &connected)
            .is_err()
        {
            verdict.admitted = false;
            verdict.too_many_devices = true;
            return Ok(Some(verdict));
        }
        if !present.contains(requester.as_str()) {
            let until = q.now_ms.saturating_add(q.reservation_ms);
            let full = record.r.len() >= MAX_RESERVATIONS;
            let entry = record.r.iter_mut().find(|(user, _, _)| *user == requester);
            let hold = if q.releasable { 1 } else { PINNED };
            match entry {
                Some((_, reserved_until, holds)) => {
                    // A repeated request renews the reservation once half of it has passed.
                    if *reserved_until < q.now_ms.saturating_add(q.reservation_ms / 2) {
                        *reserved_until = until;
                    }
                    *holds = if *holds == PINNED || hold == PINNED {
                        PINNED
                    } else {
                        holds.saturating_add(1)
                    };
                }
                None if full => return Err(StoreError::Full),
                None => record.r.push((requester, until, hold)),
            }
            verdict.holds = q.releasable;
        }
    }
    Ok(Some(verdict))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::MemoryStore;

    const ROOM: &str = "alias";

    fn question<'a>(
        max_users: u32,
        participants: Participants<'a>,
        requester: &'a str,
        identity: &'a str,
        now_ms: u64,
    ) -> Request<'a> {
        Request {
            room: ROOM,
            max_users,
            participants,
            requester,
            identity,
            token_expires_ms: now_ms + 3_600_000,
            reservation_ms: 30_000,
            list_cache_ms: 0,
            releasable: false,
            exempt: false,
            unverified: false,
            now_ms,
        }
    }

    fn ask(
        store: &MemoryStore,
        max_users: u32,
        participants: &[&str],
        requester: &str,
        identity: &str,
        now_ms: u64,
    ) -> Verdict {
        let participants: Vec<String> = participants.iter().map(|s| s.to_string()).collect();
        let q = question(
            max_users,
            Participants::Fresh(&participants),
            requester,
            identity,
            now_ms,
        );
        match admit(store, &q).unwrap() {
            Outcome::Decided(verdict) => verdict,
            Outcome::NeedList => panic!("a fresh list needs no other"),
        }
    }

    #[test]
    fn a_burst_into_an_empty_room_admits_exactly_the_limit() {
        let store = MemoryStore::default();
        let admitted = (0..20)
            .filter(|i| {
                let user = format!("@u{i}:x");
                ask(&store, 3, &[], &user, &format!("{user}:D"), 1000).admitted
            })
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn a_reserved_user_may_come_back_and_a_refusal_reserves_nothing() {
        let store = MemoryStore::default();
        assert!(ask(&store, 1, &[], "@a:x", "@a:x:D1", 0).admitted);
        assert!(ask(&store, 1, &[], "@a:x", "@a:x:D2", 1).admitted);
        let refused = ask(&store, 1, &[], "@b:x", "@b:x:D1", 2);
        assert!(!refused.admitted);
        assert_eq!(refused.reserved, 1);
        // bob's refusal left nothing behind: once alice's reservation lapses, bob fits.
        assert!(ask(&store, 1, &[], "@b:x", "@b:x:D1", 30_001).admitted);
    }

    #[test]
    fn an_unverified_requester_only_ever_takes_a_free_place() {
        let store = MemoryStore::default();
        let unverified = |participants: &[&str], stand_in: &str, now_ms: u64| {
            let participants: Vec<String> = participants.iter().map(|s| s.to_string()).collect();
            let q = Request {
                unverified: true,
                exempt: true, // never lets an unverified requester into a full room
                ..question(2, Participants::Fresh(&participants), stand_in, "", now_ms)
            };
            match admit(&store, &q).unwrap() {
                Outcome::Decided(verdict) => verdict.admitted,
                Outcome::NeedList => panic!("a fresh list was given"),
            }
        };
        // A place free: taken, and held under the stand-in.
        assert!(unverified(&["@a:x:D"], "unverified 1", 0));
        // The same stand-in again, or a present user's name: counted already, so refused.
        assert!(!unverified(&["@a:x:D"], "unverified 1", 1));
        assert!(!unverified(&["@a:x:D"], "@a:x", 2));
        // The room is full (alice and the reservation): a new stand-in is refused too.
        assert!(!unverified(&["@a:x:D"], "unverified 2", 3));
        // A verified present user still gets in.
        assert!(ask(&store, 2, &["@a:x:D"], "@a:x", "@a:x:E", 4).admitted);
        // Once the reservation lapses, the place is free again.
        assert!(unverified(&["@a:x:D"], "unverified 2", 30_001));
    }

    #[test]
    fn a_reservation_ends_when_the_user_shows_up_in_livekit() {
        let store = MemoryStore::default();
        assert!(ask(&store, 2, &[], "@a:x", "@a:x:D1", 0).admitted);
        // alice connected and left again: her place is free at once.
        assert!(ask(&store, 2, &["@a:x:D1"], "@b:x", "@b:x:D1", 10).admitted);
        let v = ask(&store, 2, &[], "@c:x", "@c:x:D1", 20);
        assert!(v.admitted, "{v:?}");
    }

    #[test]
    fn unreserved_places_expire() {
        let store = MemoryStore::default();
        assert!(ask(&store, 1, &[], "@a:x", "@a:x:D1", 0).admitted);
        assert!(!ask(&store, 1, &[], "@b:x", "@b:x:D1", 29_999).admitted);
        assert!(ask(&store, 1, &[], "@b:x", "@b:x:D1", 30_000).admitted);
    }

    #[test]
    fn hashed_identities_map_back_to_their_users() {
        let store = MemoryStore::default();
        // alice joins with /get_token: a hashed identity.
        assert!(ask(&store, 1, &[], "@a:x", "hashA1", 0).admitted);
        // She is in LiveKit under that hash; her second device is let in, bob is not.
        assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA2", 10).admitted);
        assert!(!ask(&store, 1, &["hashA1", "hashA2"], "@b:x", "hashB1", 20).admitted);
        // Two devices of one user count once.
        let v = ask(&store, 3, &["hashA1", "hashA2"], "@c:x", "hashC1", 30);
        assert_eq!(v.present, 1);
    }

    #[test]
    fn identities_never_seen_count_as_distinct_users() {
        let store = MemoryStore::default();
        let v = ask(&store, 2, &["hashX", "hashY"], "@a:x", "hashA", 0);
        assert_eq!(v.present, 2);
        assert!(!v.admitted);
    }

    #[test]
    fn a_present_identity_is_remembered_beyond_its_token() {
        let store = MemoryStore::default();
        assert!(ask(&store, 1, &[], "@a:x", "hashA1", 0).admitted);
        // Seen in the room before her token expires, alice stays known after it expired.
        assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA2", 3_000_000).admitted);
        assert!(ask(&store, 1, &["hashA1"], "@a:x", "hashA3", 6_000_000).admitted);
        assert!(!ask(&store, 1, &["hashA1"], "@b:x", "hashB1", 6_000_001).admitted);
    }

    #[test]
    fn a_cached_list_serves_until_it_goes_stale() {
        let store = MemoryStore::default();
        let list = vec!["@a:x:D".to_owned()];
        let mut q = question(2, Participants::Fresh(&list), "@b:x", "@b:x:D", 0);
        q.list_cache_ms = 1000;
        assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
        // On the cached list plus bob's reservation the room is full; a refusal is only ever
        // decided on a fresh list, so carol's needs one.
        let q = question(2, Participants::Cached, "@c:x", "@c:x:D", 500);
        assert_eq!(admit(&store, &q), Ok(Outcome::NeedList));
        let fresh = vec!["@a:x:D".to_owned()];
        let mut q = question(2, Participants::Fresh(&fresh), "@c:x", "@c:x:D", 500);
        q.list_cache_ms = 1000;
        assert!(
            matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if !v.admitted && v.present == 1 && v.reserved == 1)
        );
        // A second user admitted within the cache window is decided on the cache alone.
        let q = question(3, Participants::Cached, "@d:x", "@d:x:D", 600);
        assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
        // Once stale, the cached list is not used.
        let q = question(2, Participants::Cached, "@c:x", "@c:x:D", 1000);
        assert_eq!(admit(&store, &q), Ok(Outcome::NeedList));
    }

    /// A releasable admission (the MatrixRTC routes) of `requester` at `now_ms`, no one in
    /// LiveKit.
    fn ask_releasable(
        store: &MemoryStore,
        max_users: u32,
        requester: &str,
        now_ms: u64,
    ) -> Verdict {
        let q = Request {
            releasable: true,
            ..question(max_users, Participants::Fresh(&[]), requester, "", now_ms)
        };
        match admit(store, &q) {
            Ok(Outcome::Decided(verdict)) => verdict,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refused_token_gives_the_place_back() {
        let store = MemoryStore::default();
        assert!(ask_releasable(&store, 1, "@stranger:x", 0).holds);
        assert!(!ask_releasable(&store, 1, "@member:x", 1).admitted);
        assert_eq!(release(&store, ROOM, "@stranger:x", 2), Ok(true));
        assert!(ask_releasable(&store, 1, "@member:x", 3).admitted);
    }

    #[test]
    fn concurrent_refused_requests_leave_no_place_behind() {
        // Two requests of one account, both refused by lk-jwt-service: the place is held while
        // either may still get a token, and free once both are refused.
        let store = MemoryStore::default();
        assert!(ask_releasable(&store, 1, "@hoarder:x", 0).holds);
        assert!(ask_releasable(&store, 1, "@hoarder:x", 1).holds);
        assert_eq!(release(&store, ROOM, "@hoarder:x", 2), Ok(false));
        assert!(!ask_releasable(&store, 1, "@member:x", 3).admitted);
        assert_eq!(release(&store, ROOM, "@hoarder:x", 4), Ok(true));
        assert!(ask_releasable(&store, 1, "@member:x", 5).admitted);
    }

    #[test]
    fn a_refusal_never_frees_the_place_of_a_token_issued_to_the_same_user() {
        let store = MemoryStore::default();
        // Two requests; one gets its token (no release), the other is refused.
        ask_releasable(&store, 1, "@a:x", 0);
        ask_releasable(&store, 1, "@a:x", 1);
        assert_eq!(release(&store, ROOM, "@a:x", 2), Ok(false));
        assert!(!ask_releasable(&store, 1, "@b:x", 3).admitted);
        // An admission decided on an issued token (the legacy routes) pins the place.
        let store = MemoryStore::default();
        ask(&store, 1, &[], "@a:x", "@a:x:D", 0);
        ask_releasable(&store, 1, "@a:x", 1);
        assert_eq!(release(&store, ROOM, "@a:x", 2), Ok(false));
        assert!(!ask_releasable(&store, 1, "@b:x", 3).admitted);
    }

    #[test]
    fn records_read_back_what_they_wrote() {
        let record = RoomRecord {
            r: vec![("@a:x".into(), 5, 1), ("@\"b\":x".into(), 6, PINNED)],
            i: vec![("hash/+=".into(), "@a:x".into(), 7)],
            p: Some((9, vec!["@a:x:D".into(), "hash/+=".into()])),
        };
        let out = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<RoomRecord>(&out).ok(), Some(record));
        let empty = serde_json::to_string(&RoomRecord::default()).unwrap();
        assert_eq!(empty, "[[],[]]");
    }

    #[test]
    fn a_repeated_admission_writes_nothing() {
        let store = MemoryStore::default();
        assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 0).admitted);
        let cas = |store: &MemoryStore| store.get(&BUCKETS.key_for(ROOM)).map(|(_, cas)| cas);
        let before = cas(&store);
        assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 1_000).admitted);
        assert_eq!(cas(&store), before);
        // Past half the reservation, a repeated request renews it.
        assert!(ask(&store, 2, &["@o:x:D"], "@a:x", "hashA", 16_000).admitted);
        assert_ne!(cas(&store), before);
        assert!(!ask(&store, 2, &["@o:x:D"], "@b:x", "hashB", 45_000).admitted);
    }

    #[test]
    fn state_is_removed_when_nothing_is_left() {
        let store = MemoryStore::default();
        assert!(ask(&store, 1, &[], "@a:x", "@a:x:D", 0).admitted);
        assert!(ask(&store, 1, &["@a:x:D"], "@a:x", "@a:x:D2", 1).admitted);
        assert_eq!(BUCKETS.get(&store, ROOM, 2), None);
    }

    #[test]
    fn one_user_counts_once_whatever_device_ids_they_choose() {
        let store = MemoryStore::default();
        // alice asks with device ids full of colons; lk-jwt-service does not check them.
        for (n, device) in ["a:1", "b:1", "1:z"].iter().enumerate() {
            let identity = format!("@alice:x:{device}");
            let v = ask(&store, 3, &[], "@alice:x", &identity, n as u64);
            assert!(v.admitted);
        }
        let connected = ["@alice:x:a:1", "@alice:x:b:1", "@alice:x:1:z", "@bob:x:D"];
        let v = ask(&store, 3, &connected, "@carol:x", "@carol:x:D", 10);
        assert_eq!(v.present, 2);
        assert!(v.admitted, "{v:?}");
    }

    #[test]
    fn a_user_on_a_server_with_a_port_is_learnt() {
        let store = MemoryStore::default();
        assert!(ask(&store, 2, &[], "@a:x:8448", "@a:x:8448:D", 0).admitted);
        // Without the pairing, `@a:x:8448:D` would read as `@a:x`: the same user as this one.
        let v = ask(&store, 2, &["@a:x:8448:D"], "@a:x", "@a:x:E", 10);
        assert_eq!(v.present, 1);
        assert!(v.admitted);
        let v = ask(&store, 2, &["@a:x:8448:D", "@a:x:E"], "@b:x", "@b:x:D", 20);
        assert_eq!(v.present, 2);
        assert!(!v.admitted);
    }

    #[test]
    fn identities_per_user_are_capped_oldest_unconnected_first() {
        let store = MemoryStore::default();
        for n in 0..(MAX_IDENTITIES_PER_USER as u64 + 4) {
            assert!(ask(&store, 1, &[], "@a:x", &format!("hashA{n}"), n).admitted);
        }
        let record: RoomRecord = BUCKETS.get(&store, ROOM, 100).unwrap();
        assert_eq!(record.i.len(), MAX_IDENTITIES_PER_USER);
        // The newest identities are the ones kept.
        let last = format!("hashA{}", MAX_IDENTITIES_PER_USER + 3);
        assert!(!ask(&store, 1, &[&last], "@b:x", "hashB", 200).admitted);
    }

    #[test]
    fn a_user_with_every_device_slot_connected_is_refused_another() {
        let store = MemoryStore::default();
        let connected: Vec<String> = (0..MAX_IDENTITIES_PER_USER)
            .map(|n| format!("hashA{n}"))
            .collect();
        for (n, identity) in connected.iter().enumerate() {
            assert!(ask(&store, 1, &[], "@a:x", identity, n as u64).admitted);
        }
        // Every learnt identity is connected: a further one has no place.
        let listed: Vec<&str> = connected.iter().map(String::as_str).collect();
        let participants: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
        let q = question(
            1,
            Participants::Fresh(&participants),
            "@a:x",
            "hashAnew",
            100,
        );
        let Ok(Outcome::Decided(verdict)) = admit(&store, &q) else {
            panic!("no decision")
        };
        assert!(!verdict.admitted && verdict.too_many_devices);
        // Another user still gets the place the room has.
        let q = question(2, Participants::Fresh(&participants), "@b:x", "hashB", 101);
        assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
    }

    #[test]
    fn a_token_that_never_expires_is_kept_a_day_and_admits_again() {
        let store = MemoryStore::default();
        let list: Vec<String> = vec![];
        let mut q = question(1, Participants::Fresh(&list), "@a:x", "hashA", 0);
        q.token_expires_ms = u64::MAX;
        assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
        let connected = vec!["hashA".to_owned()];
        let mut q = question(1, Participants::Fresh(&connected), "@a:x", "hashA", 10);
        q.token_expires_ms = u64::MAX;
        assert!(matches!(admit(&store, &q), Ok(Outcome::Decided(v)) if v.admitted));
        let record: RoomRecord = BUCKETS.get(&store, ROOM, 20).unwrap();
        assert!(record
            .i
            .iter()
            .all(|(_, _, until)| *until <= 10 + MAX_PAIRING_MS));
    }
}

/// Generated interleavings of request-phase admissions (verified users, and stand-ins for
/// requesters nobody verified) and lk-jwt-service's answers, against an exact model: the users
/// holding a place are those with a request still unanswered or a token issued, never more
/// than the limit, and the record reserves exactly them. A stand-in is admitted only into a
/// free place, never on one it already holds.
#[cfg(all(test, not(target_family = "wasm")))]
mod interleavings {
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
                            participants: Participants::Fresh(&[]),
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
                    .map(|record| record.r.iter().map(|(u, _, h)| (u.clone(), *h)).collect())
                    .unwrap_or_default();
                prop_assert_eq!(reserved.keys().cloned().collect::<BTreeSet<_>>(), holding);
            }
        }
    }
}
