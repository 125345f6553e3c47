//! Who is connected to a LiveKit room as LiveKit's webhooks tell it: a participant list kept
//! up to date by events, so that decisions need not ask LiveKit ([`crate::occupancy`]).
//!
//! Events may arrive late, twice or out of order, and a list may be answered after events
//! newer than it. Each participant's entry is therefore ordered: a session (LiveKit's
//! `joined_at_ms`) replaces an older one, and within a session leaving is final; what an
//! event established is undone only by a newer event or a list *taken* after it arrived (or
//! one that shows a later session than the event's).
//! A mistake in that order can only make the view show someone who is gone (a place held
//! until the next list), never hide someone connected whose events arrived; and someone shown
//! only by events since the newest list is not let into a room a newcomer could not enter
//! until a list shows them ([`crate::occupancy`], I2).
//!
//! LiveKit drops an event when it cannot deliver it (its queue per room and URL holds 200
//! events for 30 s; a send is tried five times) and says nothing of it, so a view is trusted
//! for decisions only while it is verified: a list was merged in less than
//! `webhooks.verify_seconds` ago, and after the last *doubt*: a webhook that LiveKit signed
//! but the guard could not read puts every view in doubt ([`doubt`]), as it may have been
//! about any room.

use serde::Deserialize;

use crate::occupancy::session::{self, Session};
use crate::state::store::SharedStore;

/// A participant list asked for longer ago than this is asked for again; departures are kept
/// this long for the lists still in flight. Longer than Envoy's default route timeout (15 s),
/// so a list asked for when a request arrived serves the decision on its answer; and short,
/// because the state that may not be evicted is what the last seconds of admissions left.
pub const MAX_LIST_AGE_MS: u64 = 20 * 1000;

/// One participant identity (its [`crate::state::store::digest`]).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Member {
    pub identity: String,
    /// The digest of the user the identity's name says it is; empty when it names none (a
    /// hashed identity, whose user only a learnt pairing tells).
    pub user: String,
    /// When the session last heard of began (LiveKit's `joined_at_ms`; 0: from a list without
    /// it).
    pub session: u64,
    /// That session ended (a tombstone, kept for late or repeated events of it).
    pub gone: bool,
    /// When the guard learnt it (its own clock): a list taken earlier does not undo it.
    pub at: u64,
    /// The digest of the other user the identity may name, when its server name may end in a
    /// port ([`crate::request::livekit_names::port_reading`]); empty otherwise. Left out of the record
    /// when empty.
    #[serde(default)]
    pub alt: String,
    /// When LiveKit gives session times to the second only: the sids of that second's
    /// sessions, and which ended ([`session::take`]); empty otherwise. Left out of the record
    /// when empty.
    #[serde(default)]
    pub sid: String,
}

/// A participant as a list or an event names it (digests): its identity, the user its name
/// says it is (empty when it names none, or only itself), and the other user it may name
/// ([`Member::alt`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub identity: String,
    pub user: String,
    pub alt: String,
}

impl Named {
    /// The user its name says it is, if any.
    pub fn user(&self) -> Option<&str> {
        (!self.user.is_empty()).then_some(self.user.as_str())
    }
}

/// A room's view. Stored as `[listed, members, opened]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct View {
    /// When the newest list merged in was taken: it verifies the view for the verify time.
    pub listed: u64,
    pub members: Vec<Member>,
    /// When a list was last asked for: events are kept from then on, for it to be merged with.
    #[serde(default)]
    pub opened: u64,
}

impl serde::Serialize for Member {
    /// `[identity, user, session, gone, at, alt, sid]`, trailing empty fields left out (as
    /// records of earlier versions are written).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let with_sid = !self.sid.is_empty();
        let with_alt = with_sid || !self.alt.is_empty();
        let fields = 5 + usize::from(with_alt) + usize::from(with_sid);
        let mut tuple = serializer.serialize_tuple(fields)?;
        tuple.serialize_element(&self.identity)?;
        tuple.serialize_element(&self.user)?;
        tuple.serialize_element(&self.session)?;
        tuple.serialize_element(&self.gone)?;
        tuple.serialize_element(&self.at)?;
        if with_alt {
            tuple.serialize_element(&self.alt)?;
        }
        if with_sid {
            tuple.serialize_element(&self.sid)?;
        }
        tuple.end()
    }
}
crate::state::compact::as_array!(View {
    listed,
    members,
    opened
});

/// How long the end of a session is remembered, so that a late or replayed `participant_joined`
/// of it does not bring it back: longer than LiveKit's webhook signatures are valid (5 min).
pub const TOMBSTONE_MS: u64 = 10 * 60 * 1000;

impl Member {
    fn new(named: &Named, session: &Session, gone: bool, at: u64) -> Member {
        Member {
            identity: named.identity.clone(),
            user: if named.user == named.identity {
                String::new()
            } else {
                named.user.clone()
            },
            session: session.start,
            gone,
            at,
            alt: named.alt.clone(),
            sid: session::first_of_second(&session.sid, gone),
        }
    }

    /// Whether an event of `session` is one of the second of the member's session, told apart
    /// by sid (see [`crate::occupancy::session`]).
    fn of_its_second(&self, session: &Session) -> bool {
        session.start == self.session && !session.sid.is_empty() && !self.sid.is_empty()
    }

    fn named(&self) -> Named {
        Named {
            identity: self.identity.clone(),
            user: self.user.clone(),
            alt: self.alt.clone(),
        }
    }
}

/// The longest `webhooks.verify_seconds`.
pub const MAX_VERIFY_MS: u64 = 3600 * 1000;

/// The shared data key of the time of the last doubt.
const DOUBT_KEY: &str = "voice_limit_guard.webhook_doubt";

/// When the last doubt was (ms; 0: never): views listed before it are not verified.
pub fn doubt_since(store: &dyn SharedStore) -> u64 {
    store.get(DOUBT_KEY).map_or(0, |(bytes, _)| read_ms(&bytes))
}

/// Puts every view in doubt at `now`: a list taken after it verifies a view again.
pub fn doubt(store: &dyn SharedStore, now: u64) {
    for _ in 0..8 {
        let (since, cas) = match store.get(DOUBT_KEY) {
            Some((bytes, cas)) => {
                let since = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| t.parse().ok());
                (since.unwrap_or(0), Some(cas))
            }
            None => (0, None),
        };
        if since >= now
            || store
                .set(DOUBT_KEY, now.to_string().as_bytes(), cas)
                .is_ok()
        {
            return;
        }
    }
}

/// The shared data key of when a webhook was last taken in.
const HEARD_KEY: &str = "voice_limit_guard.webhook_heard";
/// Views are trusted only while webhooks keep arriving: LiveKit sends one for every join and
/// leave in any of its rooms, so a process that heard none for this long may not be getting
/// them (LiveKit not configured to send them here, or a route that no longer leads here).
pub const STREAM_QUIET_MS: u64 = 10 * 60 * 1000;

/// A webhook was taken in at `now` (written at most once a second).
pub fn heard(store: &dyn SharedStore, now: u64) {
    let (last, cas) = match store.get(HEARD_KEY) {
        Some((bytes, cas)) => (read_ms(&bytes), Some(cas)),
        None => (0, None),
    };
    if last <= now && now < last.saturating_add(1000) {
        return;
    }
    // A lost race means another worker just wrote it.
    let _ = store.set(HEARD_KEY, now.to_string().as_bytes(), cas);
}

/// The time before which no view is verified at `now`: the last doubt, or `now` itself when
/// no webhook arrived within [`STREAM_QUIET_MS`].
pub fn untrusted_before(store: &dyn SharedStore, now: u64) -> u64 {
    let heard = store.get(HEARD_KEY).map_or(0, |(bytes, _)| read_ms(&bytes));
    if heard == 0 || heard.saturating_add(STREAM_QUIET_MS) <= now {
        return now;
    }
    doubt_since(store)
}

fn read_ms(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0)
}

/// What an event says of one participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Joined,
    Left,
}

impl View {
    /// The participants connected, as a list.
    pub fn listed(&self) -> Vec<Named> {
        self.members
            .iter()
            .filter(|m| !m.gone)
            .map(Member::named)
            .collect()
    }

    /// Whether decisions may rest on the view at `now`: a list verified it less than
    /// `verify_ms` ago, and after the last doubt (`doubt_ms`, see [`doubt`]).
    pub fn verified(&self, now: u64, verify_ms: u64, doubt_ms: u64) -> bool {
        self.listed > doubt_ms && self.listed.saturating_add(verify_ms) > now
    }

    /// Takes in what an event says of a participant's session `session`, learnt at `now`.
    /// Whether it changed the view.
    pub fn apply(
        &mut self,
        named: &Named,
        session: &Session,
        presence: Presence,
        now: u64,
    ) -> bool {
        let identity = named.identity.as_str();
        let gone = presence == Presence::Left;
        // Heard after the newest list even in the millisecond it was taken: that list may
        // predate the event, so only a later one undoes it.
        let now = now.max(self.listed.saturating_add(1));
        match self.members.iter_mut().find(|m| m.identity == identity) {
            // Sessions of one second: which began first is not known, so an end hides only
            // its own session.
            Some(m) if m.of_its_second(session) => {
                let Some(known) = session::take(&m.sid, &session.sid, gone) else {
                    return false;
                };
                m.gone = !session::connected(&known);
                m.sid = known;
                m.at = now;
                true
            }
            // An older session, or the same one already as far (left is final).
            Some(m) if (session.start, gone) <= (m.session, m.gone) => false,
            Some(m) => {
                m.session = session.start;
                m.sid = session::first_of_second(&session.sid, gone);
                m.gone = gone;
                m.at = now;
                true
            }
            None => {
                self.members.push(Member::new(named, session, gone, now));
                true
            }
        }
    }

    /// Merges a list taken at `taken` (identity and named user digests, and sessions): it
    /// replaces what was learnt before it was taken, and leaves what was learnt since, but for
    /// a session it shows that began after the one learnt of since (a list older than one
    /// merged already changes nothing). The end of a session stays known whatever a list says
    /// (a late or replayed join of it must not bring it back); a participant learnt before the
    /// list and not in it has left.
    pub fn merge(&mut self, listed: &[(&Named, &Session)], taken: u64) {
        if taken < self.listed {
            // A newer list was merged: what this one says, that one said later.
            return;
        }
        for m in &mut self.members {
            if m.at > taken {
                // Learnt since the list was taken: newer than what the list says of that
                // session. But a session the list shows that began after the entry's, or one of
                // its second the entry does not know, is one no event told of: connected (an
                // old session's leave, late or replayed, does not hide the new one).
                if let Some((_, session)) = listed
                    .iter()
                    .find(|(named, _)| named.identity == m.identity)
                {
                    if m.of_its_second(session) {
                        if let Some(known) = session::take(&m.sid, &session.sid, false) {
                            m.gone = !session::connected(&known);
                            m.sid = known;
                        }
                    } else if session.start > m.session {
                        // What was heard since is all of an older session: the list says more.
                        m.session = session.start;
                        m.sid = session::first_of_second(&session.sid, false);
                        m.gone = false;
                        m.at = taken;
                    }
                }
                continue;
            }
            match listed
                .iter()
                .find(|(named, _)| named.identity == m.identity)
            {
                // A session of the second the entry knows of: connected, unless it ended.
                Some((_, session)) if m.of_its_second(session) => {
                    m.sid = session::listed(&m.sid, &session.sid);
                    m.gone = !session::connected(&m.sid);
                    m.at = taken;
                }
                // A session the entry does not know of (without LiveKit's session times, any
                // later than the one that ended).
                Some((_, session)) if m.gone && session.start <= m.session => {
                    if session.start == 0 {
                        m.session = m.session.saturating_add(1);
                        m.gone = false;
                        m.at = taken;
                    }
                }
                Some((_, session)) => {
                    if session.start >= m.session {
                        m.session = session.start;
                        m.sid = session::first_of_second(&session.sid, false);
                    }
                    m.gone = false;
                    m.at = taken;
                }
                None => {
                    m.gone = true;
                    m.sid = session::all_ended(&m.sid);
                }
            }
        }
        for (named, session) in listed {
            if !self.members.iter().any(|m| m.identity == named.identity) {
                let member = Member::new(named, session, false, taken);
                self.members.push(member);
            }
        }
        self.listed = self.listed.max(taken);
    }

    /// When nothing in the view matters any more: no verify time reaches past it, and its
    /// newest entry is as old as a tombstone lives.
    pub fn expires_at(&self) -> u64 {
        let newest = self.members.iter().map(|m| m.at).max().unwrap_or(0);
        let verified = self.listed.saturating_add(MAX_VERIFY_MS);
        let awaited = self.opened.saturating_add(MAX_LIST_AGE_MS);
        verified
            .max(newest.saturating_add(TOMBSTONE_MS))
            .max(awaited)
    }

    /// Forgets the ends of sessions too old to be heard of again.
    pub fn forget_past(&mut self, now: u64) {
        self.members
            .retain(|m| !m.gone || m.at.saturating_add(TOMBSTONE_MS) > now);
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn connected(view: &View) -> Vec<String> {
        view.listed()
            .into_iter()
            .map(|named| named.identity)
            .collect()
    }

    /// A participant whose identity names itself.
    fn named(identity: &str) -> Named {
        Named {
            identity: identity.to_owned(),
            user: identity.to_owned(),
            alt: String::new(),
        }
    }

    /// Merges a list of (identity, named user, session) taken at `taken`.
    fn merge(view: &mut View, listed: &[(&str, &str, u64)], taken: u64) {
        let named: Vec<(Named, Session)> = listed
            .iter()
            .map(|(identity, user, session)| {
                let mut n = named(identity);
                n.user = (*user).to_owned();
                (n, Session::at(*session))
            })
            .collect();
        let listed: Vec<(&Named, &Session)> = named.iter().map(|(n, s)| (n, s)).collect();
        view.merge(&listed, taken);
    }

    #[test]
    fn a_later_session_replaces_an_earlier_one_and_leaving_is_final() {
        let mut view = View::default();
        assert!(view.apply(&named("a"), &Session::at(10), Presence::Joined, 100));
        assert_eq!(connected(&view), ["a"]);
        assert!(view.apply(&named("a"), &Session::at(10), Presence::Left, 200));
        // The join of the session that ended, late or replayed, changes nothing.
        assert!(!view.apply(&named("a"), &Session::at(10), Presence::Joined, 300));
        assert!(connected(&view).is_empty());
        // A new session does; the end of the old one, arriving late, does not undo it.
        assert!(view.apply(&named("a"), &Session::at(20), Presence::Joined, 400));
        assert!(!view.apply(&named("a"), &Session::at(10), Presence::Left, 500));
        assert_eq!(connected(&view), ["a"]);
        // A leave heard before its join: the join never shows the session.
        assert!(view.apply(&named("b"), &Session::at(30), Presence::Left, 600));
        assert!(!view.apply(&named("b"), &Session::at(30), Presence::Joined, 700));
        assert_eq!(connected(&view), ["a"]);
    }

    #[test]
    fn a_list_replaces_only_what_was_learnt_before_it_was_taken() {
        let mut view = View::default();
        view.apply(&named("early"), &Session::at(1), Presence::Joined, 100);
        view.apply(&named("late"), &Session::at(2), Presence::Joined, 300);
        view.apply(&named("left-late"), &Session::at(3), Presence::Left, 300);
        view.apply(&named("ended"), &Session::at(5), Presence::Left, 150);
        // Taken at 200: shows "left-late", "ended" (its session 5) and "other", not "early"
        // nor "late".
        let listed = [
            ("left-late", "left-late", 3),
            ("ended", "ended", 5),
            ("other", "@o:x", 4),
        ];
        merge(&mut view, &listed, 200);
        let mut now = connected(&view);
        now.sort_unstable();
        assert_eq!(now, ["late", "other"]);
        assert!(view.verified(60_199, 60_000, 0));
        assert!(!view.verified(60_200, 60_000, 0));
        assert!(!view.verified(1_000, 60_000, 200));
        // The ends of sessions stay known: a late join of them changes nothing.
        for (identity, session) in [("early", 1), ("ended", 5), ("left-late", 3)] {
            assert!(!view.apply(
                &named(identity),
                &Session::at(session),
                Presence::Joined,
                250
            ));
        }
        // An older list changes nothing.
        merge(&mut view, &[("early", "early", 7)], 150);
        let mut now = connected(&view);
        now.sort_unstable();
        assert_eq!(now, ["late", "other"]);
        assert!(view.verified(60_199, 60_000, 0));
        // A list taken later shows "ended" in a session of its own.
        merge(&mut view, &[("ended", "ended", 9)], 400);
        assert_eq!(connected(&view), ["ended"]);
    }

    #[test]
    fn views_are_trusted_only_while_webhooks_arrive() {
        let store = crate::state::store::MemoryStore::default();
        assert_eq!(untrusted_before(&store, 5_000), 5_000, "none heard yet");
        heard(&store, 6_000);
        assert_eq!(untrusted_before(&store, 7_000), 0);
        doubt(&store, 6_500);
        assert_eq!(untrusted_before(&store, 7_000), 6_500);
        let quiet = 6_000 + STREAM_QUIET_MS;
        assert_eq!(untrusted_before(&store, quiet), quiet);
        heard(&store, quiet);
        assert_eq!(untrusted_before(&store, quiet + 1), 6_500);
    }

    #[test]
    fn a_doubt_unverifies_every_view_listed_before_it() {
        let store = crate::state::store::MemoryStore::default();
        assert_eq!(doubt_since(&store), 0);
        let mut view = View::default();
        merge(&mut view, &[], 1_000);
        assert!(view.verified(2_000, 60_000, doubt_since(&store)));
        doubt(&store, 1_500);
        doubt(&store, 1_200); // an earlier doubt changes nothing
        assert_eq!(doubt_since(&store), 1_500);
        assert!(!view.verified(2_000, 60_000, doubt_since(&store)));
        merge(&mut view, &[], 1_600);
        assert!(view.verified(2_000, 60_000, doubt_since(&store)));
    }

    #[test]
    fn an_old_sessions_leave_heard_after_a_list_does_not_hide_the_session_it_shows() {
        let mut view = View::default();
        // The leave of session 10, heard (or replayed) at 300, after a list taken at 200
        // that shows session 20.
        assert!(view.apply(&named("a"), &Session::at(10), Presence::Left, 300));
        merge(&mut view, &[("a", "a", 20)], 200);
        assert_eq!(connected(&view), ["a"]);
        // The leave of the session the list shows, heard since, is final.
        let mut view = View::default();
        assert!(view.apply(&named("a"), &Session::at(20), Presence::Left, 300));
        merge(&mut view, &[("a", "a", 20)], 200);
        assert!(connected(&view).is_empty());
        // To the second: an end of another sid of that second hides only its own.
        let mut view = View::default();
        let ended = Session::of(0, 1, "PA_x");
        assert!(view.apply(&named("a"), &ended, Presence::Left, 300));
        let shown = Session::of(0, 1, "PA_y");
        let a = named("a");
        view.merge(&[(&a, &shown)], 200);
        assert_eq!(connected(&view), ["a"]);
        assert_eq!(view.members[0].sid, "-PA_x PA_y");
    }

    #[test]
    fn tombstones_are_forgotten_after_their_time() {
        let mut view = View::default();
        view.apply(&named("a"), &Session::at(1), Presence::Left, 100);
        view.apply(&named("b"), &Session::at(1), Presence::Joined, 100);
        view.forget_past(100 + TOMBSTONE_MS);
        assert_eq!(view.members.len(), 1);
        assert_eq!(connected(&view), ["b"]);
    }
}
