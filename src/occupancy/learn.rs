//! What a room's record learns at each decision: the list it decides on (cached, merged into
//! the view), sightings of identities, reservations settled or lapsed, departures, pairings of
//! identities with users, and how the record keeps within its budget.

use super::*;

impl RoomRecord {
    /// Drops what no decision from `now` on needs. Reservations are settled with a list
    /// ([`RoomRecord::settle_reservations`]), which says whether their user ever connected.
    pub(super) fn forget_past(&mut self, now: u64) {
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
    pub(super) fn take_list(&mut self, q: &Request) -> Option<(Listed, Option<Listed>, u64)> {
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
    pub(super) fn own_identity_listed(&mut self, q: &Request, connected: &BTreeSet<&str>) {
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
    pub(super) fn users_of(&self, listed: &[Named], requester: &str) -> (Vec<String>, Vec<String>) {
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
    pub(super) fn note_connected(&mut self, connected: &BTreeSet<&str>, taken: u64) {
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
    pub(super) fn settle_reservations(
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
    pub(super) fn departure_matters(&self, at: u64, now: u64) -> bool {
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
    pub(super) fn lapse(&mut self, user: &str, at: u64, reservation_ms: u64) {
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
    pub(super) fn rekey(&mut self, index: usize, owner: String, reservation_ms: u64) {
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
    pub(super) fn reserve(&mut self, user: &str, in_the_call: bool, q: &Request) {
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
    pub(super) fn remember(
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
    pub(super) fn pair(
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
