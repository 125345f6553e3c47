//! What LiveKit's webhooks say of a room, applied to its occupancy record: the room's view
//! ([`crate::occupancy::view`]), the reservations of users seen connecting, the sightings of
//! learnt identities.
//!
//! Events are applied only to rooms the guard keeps a record of (rooms with a limit that
//! someone asked a token for): every other room's events cost a read of shared data.

use crate::occupancy::record::{named_by, RoomRecord, BUCKETS, MAX_PAIRING_MS, ROOM_BUDGET};
use crate::occupancy::session::Session;
use crate::occupancy::view::{Member, Named, Presence, View};
use crate::state::store::{Change, SharedStore, StoreError};

/// What a webhook says of a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomEvent {
    /// A participant connected (`participant_joined`) or left (`participant_left`,
    /// `participant_connection_aborted`): its identity, and its session.
    Participant {
        identity: String,
        session: Session,
        presence: Presence,
    },
    /// The room closed (`room_finished`): nothing is known of it until a list is taken.
    Finished,
}

/// What applying an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The room's record took it in.
    Changed,
    /// It told nothing new (a repeated, late or older event).
    Known,
    /// The guard keeps no record of the room.
    NotGuarded,
}

/// Applies `event` of LiveKit room `room`, learnt at `now_ms`, to the room's shared record.
pub fn observe(
    store: &dyn SharedStore,
    room: &str,
    event: &RoomEvent,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    BUCKETS.update(store, room, now_ms, |old: Option<(&RoomRecord, u64)>| {
        let Some((old, _)) = old else {
            return (Change::Keep, Applied::NotGuarded);
        };
        let mut record = old.clone();
        if !record.take_event(event, now_ms) {
            return (Change::Keep, Applied::Known);
        }
        // Past the room's budget, the view goes first: decisions then ask LiveKit.
        let json = record.fit(ROOM_BUDGET, "");
        let change = if record.is_empty() {
            Change::Remove
        } else {
            let until = record.expires_at();
            match json {
                Some(json) => Change::PutEncoded(record, until, json),
                None => Change::Put(record, until),
            }
        };
        (change, Applied::Changed)
    })
}

/// Opens `room`'s view as LiveKit is asked for its participants at `now_ms`: events arriving
/// while the list is on its way are kept in the room's record, and the list is merged with
/// them (a room the guard kept no record of would otherwise lose them).
pub fn open(store: &dyn SharedStore, room: &str, now_ms: u64) -> Result<(), StoreError> {
    BUCKETS.update(store, room, now_ms, |old: Option<(&RoomRecord, u64)>| {
        let opened = old.and_then(|(r, _)| r.w.as_ref()).map_or(0, |w| w.opened);
        if opened <= now_ms && now_ms < opened.saturating_add(REOPEN_MS) {
            return (Change::Keep, ());
        }
        let mut record = old.map(|(r, _)| r.clone()).unwrap_or_default();
        record.w.get_or_insert_with(View::default).opened = now_ms;
        let until = record.expires_at();
        (Change::Put(record, until), ())
    })
}

/// A view opened this recently is not written again for another list.
const REOPEN_MS: u64 = 1000;

impl RoomRecord {
    /// Whether the event changed the record.
    fn take_event(&mut self, event: &RoomEvent, now: u64) -> bool {
        let (identity, session, presence) = match event {
            RoomEvent::Finished => return self.w.take().is_some(),
            RoomEvent::Participant {
                identity,
                session,
                presence,
            } => (identity, session, *presence),
        };
        let named = named_by(identity);
        let identity_digest = named.identity.clone();
        let view = self.w.get_or_insert_with(View::default);
        if !view.apply(&named, session, presence, now) {
            return false;
        }
        if let Some(p) = self.i.iter_mut().find(|p| p.identity == identity_digest) {
            if presence == Presence::Left {
                // Gone, but its token may bring it back: no longer counted as seen.
                p.seen = 0;
            } else {
                p.seen = now.max(1);
                p.until = p.until.max(now.saturating_add(MAX_PAIRING_MS));
            }
        }
        // A session that began after the user's latest admission (joined, or already left:
        // events may come in any order): the token that admission let through may be this
        // one, used. The user counts by being connected, or no more.
        let user = self.user_of(&identity_digest, named.user());
        if let Some(n) = self
            .r
            .iter()
            .position(|res| res.user == user && res.since < session.start)
        {
            self.r.remove(n);
            // A list taken after the session began shows it, while it lasts.
            self.depart(user, session.start.min(now), now);
        }
        true
    }

    /// Merges a fresh list (taken at `taken`) into the view, which it verifies; what the view
    /// then shows connected: the list, with what events told since it was taken.
    pub(crate) fn merge_list(
        &mut self,
        listed: &[Named],
        sessions: &[Session],
        taken: u64,
    ) -> Vec<Named> {
        let unknown = Session::default();
        let members: Vec<(&Named, &Session)> = listed
            .iter()
            .enumerate()
            .map(|(n, named)| (named, sessions.get(n).unwrap_or(&unknown)))
            .collect();
        let view = self.w.get_or_insert_with(View::default);
        view.merge(&members, taken);
        view.listed()
    }

    /// Whether the view knows of a session of `user` (a digest) that began at `at` or later
    /// (connected or since ended): then a departure at `at` says nothing the view does not.
    pub(crate) fn session_since(&self, user: &str, at: u64) -> bool {
        self.w.as_ref().is_some_and(|view| {
            view.members
                .iter()
                .any(|m| m.session >= at && self.user_of_member(m) == user)
        })
    }

    /// Whether the view shows `user` (a digest) connected only by events heard since its
    /// newest list, no list having shown them since. Such a join may be one of a session that
    /// ended long ago: LiveKit may deliver it minutes late, with its leave still on the way.
    /// `theirs`: identities read as the user's besides what their names and pairings say
    /// ([`RoomRecord::users_of`]).
    pub(crate) fn shown_only_by_events(&self, user: &str, theirs: &[String]) -> bool {
        self.w.as_ref().is_some_and(|view| {
            let mut shown = view
                .members
                .iter()
                .filter(|m| {
                    !m.gone && (theirs.contains(&m.identity) || self.user_of_member(m) == user)
                })
                .peekable();
            shown.peek().is_some() && shown.all(|m| m.at > view.listed)
        })
    }

    fn user_of_member(&self, m: &Member) -> String {
        let named = (!m.user.is_empty()).then_some(m.user.as_str());
        self.user_of(&m.identity, named)
    }

    /// Drops the view's old tombstones, and the view itself once it is unverified and nothing
    /// in it is recent.
    pub(crate) fn forget_view_past(&mut self, now: u64) {
        if let Some(view) = &mut self.w {
            view.forget_past(now);
        }
        if self.w.as_ref().is_some_and(|view| view.expires_at() <= now) {
            self.w = None;
        }
    }
}

#[cfg(test)]
#[path = "presence_tests.rs"]
mod tests;
