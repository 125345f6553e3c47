//! Who occupies a LiveKit room: the participants LiveKit reports, plus the users the guard
//! admitted who have not connected yet, with hashed identities mapped back to users.
//!
//! A client gets its token before it connects, so LiveKit's list lags behind the tokens
//! already issued: deciding on LiveKit alone admits a whole simultaneous burst. Each admission
//! therefore leaves a *reservation* for its user, and the decision counts "present in LiveKit
//! plus reserved". Check and reserve are one compare-and-swap update of the room's shared
//! entry, so across all worker threads of the process no two admissions can take the last
//! place.
//!
//! lk-jwt-service 0.4.3+ gives `/get_token` participants hashed identities, which do not say
//! which Matrix user they are. Every token the guard lets through pairs the identity with the
//! user lk-jwt-service verified, so the guard remembers those pairs and maps participants back
//! to users. Identities it never saw count as distinct users.
//!
//! # Invariants
//!
//! - **I1** In one process, the distinct users admitted never exceed the limit, whatever the
//!   order in which requests, participant lists, lk-jwt-service's answers and connections
//!   arrive. A user counts from their admission until a list *taken after it* shows them
//!   connected (then while LiveKit lists them) or `reservation_seconds` pass without that.
//!   A list is dated by when it was asked for: a list older than a reservation's end
//!   ([`Departure`]) still counts that user, and a list older than [`MAX_LIST_AGE_MS`] is asked
//!   again. (A token lives an hour in LiveKit's eyes: a user who leaves and comes back later
//!   with a token obtained earlier is not seen by the guard; see docs/security.md.)
//! - **I2** A user LiveKit lists, or who holds a reservation, is never refused for another
//!   device or member id (except past [`MAX_IDENTITIES_PER_USER`] connected devices). A user
//!   shown in the call only by events heard since the view's newest list takes a place a
//!   newcomer could not only once a list shows them: a join may arrive after its leave.
//! - **I3** No cap lets a request through unchecked, and none refuses while the room has
//!   space without saying so: a record is bounded by [`ROOM_BUDGET`] bytes (caches and
//!   lapses go first, then pairings of identities not connected), and an admission that cannot
//!   be recorded is refused as [`Refusal::AtCapacity`].
//! - **I5** A requester that proves nothing holds a place only while its request is in flight:
//!   [`release`] gives it back when lk-jwt-service refuses the token or the stream ends first,
//!   and only a token that passed ([`issued`]) pins a reservation and can lapse.
//! - **I6** One account holds at most one place: the place of a stand-in nobody verified
//!   becomes the place of the user its issued token names ([`issued`]).
//! - **I7** A requester whose own identity is connected is in the call, even with no pairing
//!   learnt (the identity is derived from the user).
//! - Hoarding: a user whose reservation lapsed without their ever being seen connected
//!   ([`Lapse`]) may not take the room's last free place for a cooling time that doubles with
//!   each lapse (from `reservation_seconds` to an hour). A reservation is not renewed by asking
//!   again, only by being in the call.
//!
//! The record also keeps LiveKit's last participant list for `participants_cache_ms`, so a
//! burst of joins asks LiveKit once instead of once per token. A refusal is always decided on
//! a fresh list.

use std::collections::BTreeSet;

use crate::decision::should_block;
use crate::livekit_names::{matrix_user_of_identity, port_reading};
pub use crate::room_record::RoomRecord;
use crate::room_record::{CachedList, Departure, Lapse, Pairing, Reservation};
use crate::room_view::Named;
use crate::session::Session;
use crate::store::{digest, Buckets, Change, SharedStore, StoreError};

/// Where this state lives in shared data (created when the VM starts).
pub const BUCKETS: Buckets<RoomRecord> = Buckets::new("voice_limit_guard.rooms", 1024, 32 * 1024);
/// The most one room's record may take of its bucket: about 400 users with one hashed
/// identity each and a reservation, the lists and lapses aside.
pub const ROOM_BUDGET: usize = 24 * 1024;
/// Expiries and sightings are rewritten only when they gain more than this.
const REFRESH_SLACK_MS: u64 = 60 * 1000;
/// How long a pairing is kept past its latest admission or sighting: a participant may stay
/// connected long after its token expired (LiveKit checks a token when it connects), also
/// after a list showed it gone and it came back on the same token.
pub(crate) const MAX_PAIRING_MS: u64 = 24 * 3600 * 1000;
/// Learnt identities kept per user in a room. Past it, the oldest identity not connected goes
/// first; if every one is connected, the token is refused: an identity the guard could not
/// learn would count as one more user once connected, so letting it in would let one account
/// fill the room.
pub const MAX_IDENTITIES_PER_USER: usize = 16;
/// Longer participant lists are not cached (the cache is an optimisation).
const MAX_CACHED_LIST: usize = 256;
/// A participant list asked for longer ago than this is asked for again; departures are kept
/// this long for the lists still in flight. Longer than Envoy's default route timeout (15 s),
/// so a list asked for when a request arrived serves the decision on its answer; and short,
/// because the state that may not be evicted is what the last seconds of admissions left.
pub const MAX_LIST_AGE_MS: u64 = 20 * 1000;
/// The longest cooling time of a user whose reservations keep lapsing.
const MAX_COOLING_MS: u64 = 3600 * 1000;
/// How long lapses are remembered past their cooling time, so that they add up.
const LAPSE_MEMORY_MS: u64 = 3600 * 1000;

/// The digest of the Matrix user an identity's name says it is.
pub(crate) fn user_named_by(identity: &str) -> String {
    digest(matrix_user_of_identity(identity))
}

/// What an identity's name says (digests): the identity, the user it names (empty for a
/// hashed identity, which names only itself), and the other user it may name when its server
/// name may end in a port ([`port_reading`]).
pub(crate) fn named_by(identity: &str) -> Named {
    let identity_digest = digest(identity);
    let user = user_named_by(identity);
    Named {
        user: if user == identity_digest {
            String::new()
        } else {
            user
        },
        identity: identity_digest,
        alt: port_reading(identity).map(digest).unwrap_or_default(),
    }
}

/// Where the decision takes LiveKit's participant list from.
#[derive(Clone, Copy)]
pub enum Participants<'a> {
    /// Just answered: the identities LiveKit lists (disconnected ones left out), and when the
    /// list was asked for (ms since the epoch).
    Fresh {
        identities: &'a [String],
        /// The session of each, in the same order (missing ones read as unknown).
        sessions: &'a [Session],
        taken_ms: u64,
    },
    /// The room's view kept by LiveKit's webhooks, if it is verified; else the list cached in
    /// the room's record, if it is still fresh.
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
    pub reservation_ms: u64,
    /// How long a fresh list may be reused (0: never).
    pub list_cache_ms: u64,
    /// With LiveKit's webhooks read (`webhooks.verify_seconds`, 0: not read): how long a list
    /// verifies the room's view.
    pub verify_ms: u64,
    /// No view listed before this is verified: the last doubt on every view, or now while
    /// webhooks do not arrive ([`crate::room_view::untrusted_before`]).
    pub doubt_ms: u64,
    pub now_ms: u64,
    /// The admission is taken before lk-jwt-service has answered: its reservation is marked so
    /// that it can be undone ([`release`]) should lk-jwt-service refuse the token.
    pub releasable: bool,
    /// The requester may come in whatever the count (a moderator of the room); they still
    /// count, and the device caps still apply.
    pub exempt: bool,
    /// Nobody verified who asks (`requester` is the stand-in of the server its OpenID token
    /// names): admitted only as one more user, with a place free (beyond any cooling of the
    /// stand-in), never on a place already counted, and never exempt.
    pub unverified: bool,
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The room holds its limit of distinct users.
    Full,
    /// One place is left and the requester's reservations lapsed without their connecting.
    Cooling,
    /// Every identity the guard may keep for this user is connected.
    TooManyDevices,
    /// The room's record cannot hold one more admission ([`ROOM_BUDGET`], or a bucket full of
    /// other rooms' live state).
    AtCapacity,
}

/// The decision, with what it was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// Why not, when not admitted.
    pub refusal: Option<Refusal>,
    /// Distinct users present in LiveKit.
    pub present: usize,
    /// Users counted who are not in the list (the requester excluded): admitted and not yet
    /// seen, or gone from the reservations after the list was taken.
    pub reserved: usize,
    /// A releasable admission holds the requester's reservation: [`release`] it if
    /// lk-jwt-service refuses the token.
    pub holds: bool,
    /// Decided on the room's view kept by webhooks, without a list.
    pub on_view: bool,
}

impl Verdict {
    fn refuse(&mut self, why: Refusal) {
        self.admitted = false;
        self.refusal = Some(why);
        self.holds = false;
    }
}

/// The `holds` of a reservation that no refusal may end: an admission decided on the token
/// lk-jwt-service issued.
pub const PINNED: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Decided(Verdict),
    /// The list given is too old, or no fresh list is cached: ask LiveKit, then decide with
    /// [`Participants::Fresh`].
    NeedList,
}

/// Decides and, when admitting, reserves a place, atomically for the whole process.
/// An admission whose reservation or identity cannot be recorded is refused
/// ([`Refusal::AtCapacity`]), never admitted having forgotten something.
pub fn admit(store: &dyn SharedStore, q: &Request) -> Result<Outcome, StoreError> {
    let mut refused_for_space = None;
    let outcome = BUCKETS.update(
        store,
        q.room,
        q.now_ms,
        |old: Option<(&RoomRecord, u64)>| {
            let mut record = old.map(|(r, _)| r.clone()).unwrap_or_default();
            let Some(mut verdict) = decide(&mut record, q) else {
                return (Change::Keep, Outcome::NeedList);
            };
            refused_for_space = Some(verdict.clone());
            if old.is_some_and(|(unchanged, _)| *unchanged == record) {
                // Most refusals, and a repeated decision in the same millisecond, change
                // nothing: the record stays as written, within its budget.
                return (Change::Keep, Outcome::Decided(verdict));
            }
            let Some(json) = record.fit(ROOM_BUDGET, &digest(q.identity)) else {
                if verdict.admitted {
                    verdict.refuse(Refusal::AtCapacity);
                }
                return (Change::Keep, Outcome::Decided(verdict));
            };
            let change = if record.is_empty() {
                Change::Remove
            } else {
                let until = record.expires_at();
                Change::PutEncoded(record, until, json)
            };
            (change, Outcome::Decided(verdict))
        },
    );
    match (outcome, refused_for_space) {
        // The bucket is full of other rooms' live state: refused, never let through.
        (Err(StoreError::Full), Some(mut verdict)) => {
            if verdict.admitted {
                verdict.refuse(Refusal::AtCapacity);
            }
            Ok(Outcome::Decided(verdict))
        }
        (outcome, _) => outcome,
    }
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
        let Some(index) = old.r.iter().position(|res| res.user == requester) else {
            return (Change::Keep, false);
        };
        let mut record = old.clone();
        let ended = match record.r.get_mut(index) {
            Some(res) if res.holds != PINNED => {
                res.holds = res.holds.saturating_sub(1);
                res.holds == 0
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

/// The end of the cooling time of a lapse at `at`, the `strikes`-th remembered: the
/// reservation time, doubled for each earlier one, at most [`MAX_COOLING_MS`].
fn cooling_after(at: u64, strikes: u32, reservation_ms: u64) -> u64 {
    let doubled = reservation_ms.saturating_mul(1 << strikes.saturating_sub(1).min(20));
    at.saturating_add(doubled.min(MAX_COOLING_MS))
}

/// What became of a reservation when the token of its admission passed ([`issued`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// The reservation now stands for a token issued to its user: it can lapse (and its user
    /// cool), and no refusal or abandoned request ends it.
    Pinned,
    /// The hold of a stand-in for an unverified requester moved to the user the token names:
    /// one account's fresh OpenID tokens hold one place, renewed only by being in the call.
    Rekeyed,
    /// The room's record no longer knew the reservation (a list ended it, or time did).
    Gone,
}

/// The token of a releasable admission of `requester` in `room` passed to its client. Its
/// reservation is pinned: from now on it stands for a token in the user's hands, so it
/// lapses (and its user cools) if they never connect. With `owner` (the user the issued token
/// names, when `requester` was a stand-in nobody verified), the stand-in's hold moves to the
/// owner's reservation, which keeps its time (asking again renews nothing) or starts with the
/// stand-in's; an owner's cooling is carried to the stand-in ([`RoomRecord::rekey`]).
pub fn issued(
    store: &dyn SharedStore,
    room: &str,
    requester: &str,
    owner: Option<&str>,
    now_ms: u64,
    reservation_ms: u64,
) -> Result<Issued, StoreError> {
    let requester = digest(requester);
    let owner = owner.map(digest).filter(|owner| *owner != requester);
    BUCKETS.update(store, room, now_ms, |old: Option<(&RoomRecord, u64)>| {
        let Some((old, _)) = old else {
            return (Change::Keep, Issued::Gone);
        };
        let mut record = old.clone();
        let Some(index) = record.r.iter().position(|res| res.user == requester) else {
            return (Change::Keep, Issued::Gone);
        };
        let outcome = match owner.clone() {
            None => {
                if let Some(res) = record.r.get_mut(index) {
                    res.holds = PINNED;
                }
                Issued::Pinned
            }
            Some(owner) => {
                record.rekey(index, owner, reservation_ms);
                Issued::Rekeyed
            }
        };
        if record == *old {
            return (Change::Keep, outcome);
        }
        let until = record.expires_at();
        (Change::Put(record, until), outcome)
    })
}

/// The decision on `record`, updated with what it learnt; `None` when it needs a fresh list.
fn decide(record: &mut RoomRecord, q: &Request) -> Option<Verdict> {
    let now = q.now_ms;
    record.forget_past(now);
    // (digest of the identity, the identity itself when known), what the list itself showed
    // when events since were merged into it, and when the list was taken.
    let (listed, shown_by_list, taken) = record.take_list(q)?;
    let on_view = taken == ON_VIEW;
    // Every set here is a `BTreeSet<&str>` filled with `extend`: one element type and no
    // `collect` (which sorts a vector first) keep the set code in the module once, several KB
    // each time otherwise.
    let mut connected = BTreeSet::new();
    connected.extend(listed.iter().map(|n| n.identity.as_str()));
    // The view is up to date as its events arrived: its sightings and the reservations they
    // ended were recorded then ([`crate::presence`]). Its departures are weighed below.
    let taken = if on_view {
        0
    } else {
        record.note_connected(&connected, taken);
        taken
    };
    // Another decision rested on a newer list. (Within one millisecond the order of lists is
    // not known: lists taken in the same millisecond are taken to agree.)
    let stale = !on_view && taken < record.n;
    if !on_view {
        record.n = record.n.min(now).max(taken);
    }
    record.own_identity_listed(q, &connected);
    let requester = digest(q.requester);
    let (users, theirs) = record.users_of(&listed, &requester);
    let mut present = BTreeSet::new();
    present.extend(users.iter().map(String::as_str));
    // Who the list saw in the call when it was taken: a leave heard since does not undo that
    // they used a token (and so whether their reservation lapsed unused).
    let seen_users: Option<Vec<String>> =
        shown_by_list.map(|shown| record.users_of(&shown, &requester).0);
    let mut seen = BTreeSet::new();
    seen.extend(
        seen_users
            .as_ref()
            .unwrap_or(&users)
            .iter()
            .map(String::as_str),
    );
    let sighted = if on_view { None } else { Some(taken) };
    record.settle_reservations(&seen, sighted, now, q.reservation_ms);

    let mut occupied = present.clone();
    occupied.extend(record.r.iter().map(|res| res.user.as_str()));
    // Gone from the reservations after this list was taken: it may predate their connection.
    // On the view, unless a list taken since was merged into it, or the view knows of a
    // session of the user that began since; else their connection may be an event still on
    // its way (LiveKit may take 45 s to deliver one).
    let view_listed = record.w.as_ref().map_or(0, |w| w.listed);
    let mut departed = BTreeSet::new();
    departed.extend(
        record
            .d
            .iter()
            .filter(|d| {
                d.at >= taken
                    && !(on_view && (view_listed > d.at || record.session_since(&d.user, d.at)))
            })
            .map(|d| d.user.as_str()),
    );
    let in_doubt = departed.iter().any(|u| !occupied.contains(u));
    occupied.extend(departed);
    let reserved = record.r.iter().any(|res| res.user == requester);
    let listed = present.contains(requester.as_str());
    // What the requester is refused, if anything, with `occupied` counting the room's users
    // and `counted` whether they are among them.
    let refusal_for = |occupied: &BTreeSet<&str>, counted: bool| {
        let cooling = !counted
            && record
                .l
                .iter()
                .any(|l| l.user == requester && l.cooling_until > now);
        if q.unverified && (counted || occupied.len() >= q.max_users as usize) {
            Some(Refusal::Full)
        } else if q.exempt && !q.unverified {
            None
        } else if should_block(q.max_users, occupied, &requester) {
            Some(Refusal::Full)
        } else if cooling && occupied.len() + 1 >= q.max_users as usize {
            Some(Refusal::Cooling)
        } else {
            None
        }
    };
    let mut counted = occupied.contains(requester.as_str());
    if counted && !reserved && (!listed || record.shown_only_by_events(&requester, &theirs)) {
        // Whether they are in the call is not known: they are counted only by a departure
        // (this list may predate their connection), or shown only by events since the view's
        // newest list (a join may arrive after its leave; I2 is for users in the call). When
        // they would get in as a newcomer too (a free place beyond any cooling), no list can
        // change the answer; otherwise a newer list is to say.
        let mut newcomer = occupied.clone();
        newcomer.remove(requester.as_str());
        if refusal_for(&newcomer, false).is_some() {
            return None;
        }
        if !listed {
            occupied = newcomer;
            counted = false;
        }
    }
    if counted && !reserved && occupied.len() >= q.max_users as usize && stale {
        // Counted in a full room only by a list older than one already decided on (which may
        // have shown them gone and given their place away): a newer list is to say.
        return None;
    }
    let refusal = refusal_for(&occupied, counted);
    if refusal.is_some() && matches!(q.participants, Participants::Cached) && (!on_view || in_doubt)
    {
        // A refusal is decided on a fresh list only (or on the view, with no one counted for
        // an event that may be on its way): users who left since the list was taken would
        // otherwise keep their places, and a user refused would never see why not.
        return None;
    }
    let mut verdict = Verdict {
        admitted: refusal.is_none(),
        refusal,
        present: present.len(),
        reserved: occupied
            .iter()
            .filter(|u| !present.contains(*u) && **u != requester)
            .count(),
        holds: false,
        on_view,
    };
    if !verdict.admitted {
        return Some(verdict);
    }
    // A participant may stay connected long after its token expired (LiveKit checks a token
    // when it connects), so a pairing is kept a day unless a list shows its identity gone.
    let pairing_until = now.saturating_add(MAX_PAIRING_MS);
    if record
        .remember(q.identity, q.requester, pairing_until, &connected)
        .is_err()
    {
        verdict.refuse(Refusal::TooManyDevices);
        return Some(verdict);
    }
    // The identities read as the requester's by their port reading are learnt as theirs in
    // the places their cap leaves free: one not learnt reads by its name again, as one user.
    for identity in theirs {
        if record.i.iter().filter(|p| p.user == requester).count() >= MAX_IDENTITIES_PER_USER {
            break;
        }
        // Within the cap, pairing evicts nothing and cannot fail.
        let _ = record.pair(identity, requester.clone(), pairing_until, &connected);
    }
    record.reserve(&requester, present.contains(requester.as_str()), q);
    verdict.holds = q.releasable;
    Some(verdict)
}

/// A participant list: what each identity's name says, when known (a cached list holds
/// identity digests only).
type Listed = Vec<Named>;

/// The time [`RoomRecord::take_list`] gives the room's view: it is as new as its events.
const ON_VIEW: u64 = u64::MAX;

impl RoomRecord {
    /// Drops what no decision from `now` on needs. Reservations are settled with a list
    /// ([`RoomRecord::settle_reservations`]), which says whether their user ever connected.
    fn forget_past(&mut self, now: u64) {
        self.forget_view_past(now);
        self.i.retain(|p| p.until > now);
        let d = std::mem::take(&mut self.d);
        self.d = d
            .into_iter()
            .filter(|d| self.departure_matters(d.at, now))
            .collect();
        self.l
            .retain(|l| l.cooling_until.saturating_add(LAPSE_MEMORY_MS) > now);
        if self.p.as_ref().is_some_and(|p| {
            p.fresh_until <= now || p.taken.saturating_add(MAX_LIST_AGE_MS) <= now || p.taken > now
        }) {
            self.p = None;
        }
    }

    /// The list to decide on, and when it was taken ([`ON_VIEW`] for the room's view); caches
    /// a fresh one and merges it into the view. An older list never replaces a newer cached
    /// one; a list too long to cache ends the cached one.
    fn take_list(&mut self, q: &Request) -> Option<(Listed, Option<Listed>, u64)> {
        match q.participants {
            Participants::Fresh {
                identities,
                sessions,
                taken_ms,
            } => {
                // Too old, or taken "later" than now: the clock went back since, and how it
                // stands to what the record learnt meanwhile is not known.
                if taken_ms.saturating_add(MAX_LIST_AGE_MS) <= q.now_ms || taken_ms > q.now_ms {
                    return None;
                }
                let listed: Listed = identities.iter().map(|i| named_by(i)).collect();
                let newer = self.p.as_ref().map_or(true, |p| p.taken <= taken_ms);
                if q.list_cache_ms > 0 && newer {
                    let fresh_until = taken_ms.saturating_add(q.list_cache_ms.min(MAX_LIST_AGE_MS));
                    self.p =
                        (listed.len() <= MAX_CACHED_LIST && fresh_until > q.now_ms).then(|| {
                            CachedList {
                                fresh_until,
                                identities: listed.iter().map(|n| n.identity.clone()).collect(),
                                taken: taken_ms,
                            }
                        });
                }
                if q.verify_ms > 0 {
                    // With the events that arrived since it was taken.
                    let merged = self.merge_list(&listed, sessions, taken_ms);
                    return Some((merged, Some(listed), taken_ms));
                }
                Some((listed, None, taken_ms))
            }
            Participants::Cached => match &self.w {
                Some(view)
                    if q.verify_ms > 0 && view.verified(q.now_ms, q.verify_ms, q.doubt_ms) =>
                {
                    Some((view.listed(), None, ON_VIEW))
                }
                _ => self.p.as_ref().map(|p| {
                    let listed = p
                        .identities
                        .iter()
                        .map(|d| Named {
                            identity: d.clone(),
                            ..Named::default()
                        })
                        .collect();
                    (listed, None, p.taken)
                }),
            },
        }
    }

    /// A requester whose own identity is connected is in the call, whatever the record learnt:
    /// lk-jwt-service derives an identity from its user (and device and member id), so the
    /// identity is theirs. Paired now, it is no longer counted as a user of its own, as it was
    /// when it connected before the room had a limit, or before this process started (I7).
    fn own_identity_listed(&mut self, q: &Request, connected: &BTreeSet<&str>) {
        if q.unverified || q.identity.is_empty() {
            return;
        }
        let identity = digest(q.identity);
        if !connected.contains(identity.as_str()) || self.i.iter().any(|p| p.identity == identity) {
            return;
        }
        let until = q.now_ms.saturating_add(MAX_PAIRING_MS);
        // A user with every device place connected keeps counting this identity apart.
        let _ = self.remember(q.identity, q.requester, until, connected);
    }

    /// The user behind a participant (by the digest of its identity): a learnt pairing
    /// first, the user its name says otherwise (`named`, a digest). Without it (a cached list
    /// holds identity digests only), an identity never learnt counts as a user of its own.
    pub(crate) fn user_of(&self, identity_digest: &str, named: Option<&str>) -> String {
        match self.i.iter().find(|p| p.identity == identity_digest) {
            Some(p) => p.user.clone(),
            None => named.unwrap_or(identity_digest).to_owned(),
        }
    }

    /// The user behind each participant listed, and the identities read as the requester's
    /// (`requester`, a digest) by their port reading: an identity `@a:x:8448:DEV` the guard
    /// learnt no pairing of names `@a:x` (device `8448:DEV`) or `@a:x:8448` (device `DEV`);
    /// when `@a:x:8448` asks, it is read as theirs, unless `@a:x` is counted by anything else
    /// (an identity that cannot be `@a:x:8448`'s, a reservation, a departure): then reading it
    /// so would add a user, and `@a:x:8448` takes a place as a newcomer would. Either way the
    /// identity is one user, and both readings are users of one host name's server.
    fn users_of(&self, listed: &[Named], requester: &str) -> (Vec<String>, Vec<String>) {
        let mut users: Vec<String> = listed
            .iter()
            .map(|n| self.user_of(&n.identity, n.user()))
            .collect();
        let theirs_by_port = |named: &Named| {
            named.alt == requester && !self.i.iter().any(|p| p.identity == named.identity)
        };
        let counted_otherwise = |user: &str| {
            listed
                .iter()
                .zip(&users)
                .any(|(named, u)| u == user && !theirs_by_port(named))
                || self.r.iter().any(|res| res.user == user)
                || self.d.iter().any(|d| d.user == user)
        };
        let theirs: Vec<usize> = listed
            .iter()
            .zip(&users)
            .enumerate()
            .filter(|(_, (named, user))| theirs_by_port(named) && !counted_otherwise(user))
            .map(|(n, _)| n)
            .collect();
        let mut identities = Vec::with_capacity(theirs.len());
        for n in theirs {
            if let (Some(user), Some(named)) = (users.get_mut(n), listed.get(n)) {
                user.clone_from(&named.alt);
                identities.push(named.identity.clone());
            }
        }
        (users, identities)
    }

    /// Pairings of identities the list (taken at `taken`) shows connected are kept a day past
    /// the last sighting; one a newer list shows gone is no longer counted as seen (so it goes
    /// first under pressure). Sightings are rewritten at most once a minute, so repeated
    /// decisions need not rewrite the record.
    fn note_connected(&mut self, connected: &BTreeSet<&str>, taken: u64) {
        for p in &mut self.i {
            if connected.contains(p.identity.as_str()) {
                if p.seen == 0 || p.seen.saturating_add(REFRESH_SLACK_MS) < taken {
                    p.seen = taken.max(1);
                    p.until = p.until.max(taken.saturating_add(MAX_PAIRING_MS));
                }
            } else if p.seen != 0 && taken > p.seen {
                // Gone, but its token may bring it back, and a participant outlives its token:
                // kept as long (a day past the last sighting), first to go under pressure.
                p.seen = 0;
            }
        }
    }

    /// Ends the reservations of users a list taken after their latest admission (in a later
    /// millisecond: within one, which came first is not known) shows connected, and those whose
    /// time is up; both are kept as departures for lists taken before (or in the same
    /// millisecond). A reservation that lapsed with its user nowhere to be seen is a lapse.
    /// `seen`: the users the list showed (on the view, the users it shows). On the view
    /// (`sighted` is `None`) only time ends reservations: its events ended those of users who
    /// connected after their admission.
    fn settle_reservations(
        &mut self,
        seen: &BTreeSet<&str>,
        sighted: Option<u64>,
        now: u64,
        reservation_ms: u64,
    ) {
        for mut res in std::mem::take(&mut self.r) {
            let shown = seen.contains(res.user.as_str());
            if let Some(taken) = sighted {
                // The run of admissions began when its time was last set (`until` is never
                // moved by asking again, only by being in the call).
                let run_began = res.until.saturating_sub(reservation_ms);
                if shown && taken > res.since {
                    self.depart(res.user, now, now);
                    continue;
                }
                if shown && taken > run_began {
                    // In the call after the run began, and admitted again since (the list was
                    // decided on late): that admission starts a run of its own, as it would
                    // have had the list arrived in order.
                    res.until = res.until.max(res.since.saturating_add(reservation_ms));
                }
            }
            if res.until <= now {
                // Only a token its user was given can lapse unused: a request refused or cut
                // short never reached them, and a name anyone may claim must not cool.
                if !shown && res.holds == PINNED {
                    self.lapse(&res.user, res.until, reservation_ms);
                }
                // The user connected before `until` if at all: a list taken then shows them.
                self.depart(res.user, res.until.saturating_sub(1), now);
            } else {
                self.r.push(res);
            }
        }
    }

    /// Whether a departure at `at` may still be needed: by a list taken before it (one older
    /// than [`MAX_LIST_AGE_MS`] is asked for again), or by the room's view while no list taken
    /// since was merged into it (the connection of the user may be an event on its way).
    fn departure_matters(&self, at: u64, now: u64) -> bool {
        at.saturating_add(MAX_LIST_AGE_MS) > now || self.w.as_ref().is_some_and(|w| w.listed <= at)
    }

    pub(crate) fn depart(&mut self, user: String, at: u64, now: u64) {
        if !self.departure_matters(at, now) {
            return;
        }
        match self.d.iter_mut().find(|d| d.user == user) {
            Some(d) => d.at = d.at.max(at),
            None => self.d.push(Departure { user, at }),
        }
    }

    /// Counts a lapse of `user` at `at`: cooling for the reservation time, doubled for each
    /// lapse remembered, at most [`MAX_COOLING_MS`].
    fn lapse(&mut self, user: &str, at: u64, reservation_ms: u64) {
        let cooling = |strikes: u32| cooling_after(at, strikes, reservation_ms);
        match self.l.iter_mut().find(|l| l.user == user) {
            Some(l) => {
                l.strikes = l.strikes.saturating_add(1);
                l.cooling_until = l.cooling_until.max(cooling(l.strikes));
            }
            None => self.l.push(Lapse {
                user: user.to_owned(),
                cooling_until: cooling(1),
                strikes: 1,
            }),
        }
    }

    /// Moves one hold of the reservation at `index` (a stand-in's) to `owner` (a digest), as
    /// a token issued to `owner` (see [`issued`]). An owner whose tokens lapsed unused before
    /// has the stand-in cool for as long as the owner would, should this token lapse too: the
    /// owner's next fresh OpenID token, decided as the stand-in, is held to the cooling rule.
    fn rekey(&mut self, index: usize, owner: String, reservation_ms: u64) {
        let Some(stand_in) = self.r.get_mut(index) else {
            return;
        };
        let (until, since) = (stand_in.until, stand_in.since);
        let stand_in_user = stand_in.user.clone();
        if stand_in.holds != PINNED {
            stand_in.holds = stand_in.holds.saturating_sub(1);
        }
        if stand_in.holds == 0 {
            self.r.remove(index);
        }
        let owner_until = match self.r.iter_mut().find(|res| res.user == owner) {
            Some(res) => {
                res.holds = PINNED;
                res.since = res.since.max(since);
                res.until
            }
            None => {
                self.r.push(Reservation {
                    user: owner.clone(),
                    until,
                    holds: PINNED,
                    since,
                });
                until
            }
        };
        let Some(lapsed) = self.l.iter().find(|l| l.user == owner).cloned() else {
            return;
        };
        let next = cooling_after(
            owner_until,
            lapsed.strikes.saturating_add(1),
            reservation_ms,
        );
        let cooling_until = next.max(lapsed.cooling_until);
        match self.l.iter_mut().find(|l| l.user == stand_in_user) {
            Some(l) => l.cooling_until = l.cooling_until.max(cooling_until),
            None => self.l.push(Lapse {
                user: stand_in_user,
                cooling_until,
                strikes: lapsed.strikes,
            }),
        }
    }

    /// Records an admission of `user` (a digest). The reservation counts from the latest
    /// admission; it is renewed only for a user in the call, so asking again and never
    /// connecting does not hold a place for ever.
    fn reserve(&mut self, user: &str, in_the_call: bool, q: &Request) {
        let until = q.now_ms.saturating_add(q.reservation_ms);
        let hold = if q.releasable { 1 } else { PINNED };
        match self.r.iter_mut().find(|res| res.user == user) {
            Some(res) => {
                res.since = res.since.max(q.now_ms);
                if in_the_call {
                    res.until = res.until.max(until);
                }
                res.holds = if res.holds == PINNED || hold == PINNED {
                    PINNED
                } else {
                    res.holds.saturating_add(1)
                };
            }
            None => self.r.push(Reservation {
                user: user.to_owned(),
                until,
                holds: hold,
                since: q.now_ms,
            }),
        }
    }

    /// Pairs an identity with its verified user. Identities whose name already says who they
    /// are need no pairing. The cap per user drops the oldest identity that is not connected
    /// (`connected`); when all are, the pairing cannot be kept: `Err(())`.
    /// An identity whose server name may end in a port is paired whichever user it names:
    /// its name alone would leave the other reading open ([`RoomRecord::users_of`]).
    fn remember(
        &mut self,
        identity: &str,
        user: &str,
        until: u64,
        connected: &BTreeSet<&str>,
    ) -> Result<(), ()> {
        let user = digest(user);
        if identity.is_empty()
            || (user_named_by(identity) == user && port_reading(identity).is_none())
        {
            return Ok(());
        }
        self.pair(digest(identity), user, until, connected)
    }

    /// Pairs an identity with a user (both digests); see [`RoomRecord::remember`].
    fn pair(
        &mut self,
        identity: String,
        user: String,
        until: u64,
        connected: &BTreeSet<&str>,
    ) -> Result<(), ()> {
        if let Some(entry) = self.i.iter_mut().find(|p| p.identity == identity) {
            if entry.until.saturating_add(REFRESH_SLACK_MS) < until {
                entry.until = until;
            }
            entry.user = user;
            return Ok(());
        }
        let of_user = self.i.iter().filter(|p| p.user == user).count();
        if of_user >= MAX_IDENTITIES_PER_USER {
            let oldest = self
                .i
                .iter()
                .enumerate()
                .filter(|(_, p)| p.user == user && !connected.contains(p.identity.as_str()))
                .min_by_key(|(_, p)| p.until)
                .map(|(n, _)| n)
                .ok_or(())?;
            self.i.remove(oldest);
        }
        self.i.push(Pairing {
            identity,
            user,
            until,
            seen: 0,
        });
        Ok(())
    }

    /// Brings the record within `budget` bytes, dropping first what only saves work or
    /// weakens no limit: the cached list and the view, lapses, then pairings of identities not seen
    /// connected (oldest first; never `keep`, the identity being admitted). Its JSON when it
    /// fits (what the store then writes as is), `None` when it cannot.
    pub(crate) fn fit(&mut self, budget: usize, keep: &str) -> Option<Vec<u8>> {
        let json = serde_json::to_vec(self).ok()?;
        if json.len() <= budget {
            return Some(json);
        }
        let mut size = json.len();
        let entry_size = |bytes: usize| bytes + 1; // and its comma
        if let Some(p) = self.p.take() {
            size -= serde_json::to_vec(&p).map_or(0, |b| b.len()).min(size);
        }
        if let Some(view) = self.w.take() {
            size -= serde_json::to_vec(&view).map_or(0, |b| b.len()).min(size);
        }
        while size > budget {
            let Some(oldest) = self
                .l
                .iter()
                .enumerate()
                .min_by_key(|(_, l)| l.cooling_until)
                .map(|(n, _)| n)
            else {
                break;
            };
            let gone = self.l.remove(oldest);
            size -= entry_size(serde_json::to_vec(&gone).map_or(0, |b| b.len())).min(size);
        }
        while size > budget {
            let Some(oldest) = self
                .i
                .iter()
                .enumerate()
                .filter(|(_, p)| p.seen == 0 && p.identity != keep)
                .min_by_key(|(_, p)| p.until)
                .map(|(n, _)| n)
            else {
                break;
            };
            let gone = self.i.remove(oldest);
            size -= entry_size(serde_json::to_vec(&gone).map_or(0, |b| b.len())).min(size);
        }
        serde_json::to_vec(self)
            .ok()
            .filter(|json| json.len() <= budget)
    }

    /// When the record may be dropped: nothing in it matters after that.
    pub(crate) fn expires_at(&self) -> u64 {
        let pairings = self.i.iter().map(|p| p.until);
        let list = self.p.iter().map(|p| p.fresh_until);
        let view = self.w.iter().map(|w| w.expires_at());
        let lapses = self
            .l
            .iter()
            .map(|l| l.cooling_until.saturating_add(LAPSE_MEMORY_MS));
        // Reservations and departures matter as long as they keep the record pinned.
        pairings
            .chain(list)
            .chain(view)
            .chain(lapses)
            .fold(self.pinned_until(), u64::max)
    }
}

#[cfg(test)]
#[path = "occupancy_tests.rs"]
mod tests;

#[cfg(all(test, not(target_family = "wasm")))]
#[path = "occupancy_interleavings.rs"]
mod interleavings;
