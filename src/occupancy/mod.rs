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

use crate::occupancy::decision::should_block;
pub(crate) use crate::occupancy::record::{named_by, user_named_by, MAX_PAIRING_MS};
use crate::occupancy::record::{CachedList, Departure, Lapse, Pairing, Reservation};
pub use crate::occupancy::record::{RoomRecord, BUCKETS, ROOM_BUDGET};
use crate::occupancy::session::Session;
use crate::occupancy::view::Named;
pub use crate::occupancy::view::MAX_LIST_AGE_MS;
use crate::request::livekit_names::port_reading;
use crate::state::store::{digest, Change, SharedStore, StoreError};

/// Expiries and sightings are rewritten only when they gain more than this.
const REFRESH_SLACK_MS: u64 = 60 * 1000;
/// Learnt identities kept per user in a room. Past it, the oldest identity not connected goes
/// first; if every one is connected, the token is refused: an identity the guard could not
/// learn would count as one more user once connected, so letting it in would let one account
/// fill the room.
pub const MAX_IDENTITIES_PER_USER: usize = 16;
/// Longer participant lists are not cached (the cache is an optimisation).
const MAX_CACHED_LIST: usize = 256;
/// The longest cooling time of a user whose reservations keep lapsing.
const MAX_COOLING_MS: u64 = 3600 * 1000;
/// How long lapses are remembered past their cooling time, so that they add up.
const LAPSE_MEMORY_MS: u64 = 3600 * 1000;

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
    /// webhooks do not arrive ([`crate::occupancy::view::untrusted_before`]).
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
    // ended were recorded then ([`crate::occupancy::presence`]). Its departures are weighed below.
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

pub mod decision;
mod learn;
pub mod presence;
pub mod record;
pub mod session;
pub mod view;

#[cfg(test)]
mod tests;

#[cfg(all(test, not(target_family = "wasm")))]
mod interleavings;
