//! The shared record of one LiveKit room, as [`crate::occupancy`] keeps it, and how it is
//! written: each part is a JSON array of arrays, so that a record costs a few dozen bytes per
//! user. Every entry is dated: what it says holds from, or until, a given time, so that
//! observations can be weighed by when they were taken, not by when they arrived.
//!
//! A record written by an earlier version reads back (the parts and fields it lacks take
//! their defaults), so a hot swap keeps the reservations and pairings of calls in progress.

use serde::ser::SerializeTuple;
use serde::{Deserialize, Serialize, Serializer};

pub use crate::occupancy::view::View;
use crate::occupancy::view::{Named, MAX_LIST_AGE_MS};
use crate::request::livekit_names::{matrix_user_of_identity, port_reading};
use crate::state::store::{digest, Buckets, Eviction, Record};

/// Where this state lives in shared data (created when the VM starts).
pub const BUCKETS: Buckets<RoomRecord> = Buckets::new("voice_limit_guard.rooms", 1024, 32 * 1024);

/// The most one room's record may take of its bucket: about 400 users with one hashed
/// identity each and a reservation, the lists and lapses aside.
pub const ROOM_BUDGET: usize = 24 * 1024;

/// How long a pairing is kept past its latest admission or sighting: a participant may stay
/// connected long after its token expired (LiveKit checks a token when it connects), also
/// after a list showed it gone and it came back on the same token.
pub(crate) const MAX_PAIRING_MS: u64 = 24 * 3600 * 1000;

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

/// A user admitted whose admission no list taken since has shown connected.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Reservation {
    /// The user's [`crate::state::store::digest`].
    pub user: String,
    pub until: u64,
    /// The admissions taken before lk-jwt-service answered that were not refused since;
    /// [`crate::occupancy::PINNED`] once an admission was decided on an issued token.
    pub holds: u32,
    /// The user's latest admission: only a list taken after it shows whether the token it let
    /// through is in use.
    #[serde(default)]
    pub since: u64,
}

/// A token identity paired with the user lk-jwt-service verified for it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Pairing {
    pub identity: String,
    pub user: String,
    pub until: u64,
    /// When a list last showed the identity connected (the list's time); 0 if none has
    /// since it last left.
    #[serde(default)]
    pub seen: u64,
}

/// LiveKit's last participant list (identity digests), reused until `fresh_until`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedList {
    pub fresh_until: u64,
    pub identities: Vec<String>,
    /// When the list was asked for.
    #[serde(default)]
    pub taken: u64,
}

/// A user who stopped being reserved at `at` without a list showing them gone: a list taken
/// at `at` or before may predate their connection, so it counts them.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Departure {
    pub user: String,
    pub at: u64,
}

/// A user whose reservation lapsed without their ever being seen connected: until
/// `cooling_until` they may not take the room's last free place. `strikes` counts the lapses
/// remembered.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Lapse {
    pub user: String,
    pub cooling_until: u64,
    pub strikes: u32,
}

/// The shared record of one LiveKit room, stored as `[reservations, pairings, cached list or
/// null, departures, lapses, newest list, view or null]`, trailing empty parts left out.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RoomRecord {
    pub r: Vec<Reservation>,
    pub i: Vec<Pairing>,
    #[serde(default)]
    pub p: Option<CachedList>,
    #[serde(default)]
    pub d: Vec<Departure>,
    #[serde(default)]
    pub l: Vec<Lapse>,
    /// When the newest list decided on was taken.
    #[serde(default)]
    pub n: u64,
    /// Who is connected as LiveKit's webhooks tell it (with `webhooks` configured).
    #[serde(default)]
    pub w: Option<View>,
}

use crate::state::compact::as_array;

as_array!(Reservation {
    user,
    until,
    holds,
    since
});
as_array!(Pairing {
    identity,
    user,
    until,
    seen
});
as_array!(CachedList {
    fresh_until,
    identities,
    taken
});
as_array!(Departure { user, at });
as_array!(Lapse {
    user,
    cooling_until,
    strikes
});

impl Serialize for RoomRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let parts = if self.w.is_some() {
            7
        } else if self.n != 0 {
            6
        } else if !self.l.is_empty() {
            5
        } else if !self.d.is_empty() {
            4
        } else if self.p.is_some() {
            3
        } else {
            2
        };
        let mut tuple = serializer.serialize_tuple(parts)?;
        tuple.serialize_element(&self.r)?;
        tuple.serialize_element(&self.i)?;
        if parts > 2 {
            tuple.serialize_element(&self.p)?;
        }
        if parts > 3 {
            tuple.serialize_element(&self.d)?;
        }
        if parts > 4 {
            tuple.serialize_element(&self.l)?;
        }
        if parts > 5 {
            tuple.serialize_element(&self.n)?;
        }
        if parts > 6 {
            tuple.serialize_element(&self.w)?;
        }
        tuple.end()
    }
}

impl Record for RoomRecord {
    /// Live reservations, and departures a list still in use may predate, hold the limit:
    /// never evicted for another room. Past them, a record is memory that makes the guard
    /// kinder, not stricter: a pairing lost makes its identity count as a user of its own (so
    /// its user may be refused another device in a full room), a lapse lost forgets a cooling
    /// time. Pairings of identities seen connected go last.
    fn eviction(&self, now_ms: u64) -> Eviction {
        if self.pinned_until() > now_ms {
            Eviction::Never
        } else if self.i.iter().any(|p| p.seen != 0 && p.until > now_ms) {
            Eviction::Rank(1)
        } else {
            Eviction::Rank(0)
        }
    }
}

impl RoomRecord {
    pub fn is_empty(&self) -> bool {
        self.r.is_empty()
            && self.i.is_empty()
            && self.p.is_none()
            && self.d.is_empty()
            && self.l.is_empty()
            && self.w.is_none()
    }

    /// Until when losing the record could let the limit be exceeded: a reservation counts
    /// until a list taken after its end could be decided on, and so does a departure.
    pub fn pinned_until(&self) -> u64 {
        let reservations = self.r.iter().map(|res| res.until);
        let departures = self.d.iter().map(|d| d.at);
        reservations
            .chain(departures)
            .max()
            .map_or(0, |end| end.saturating_add(MAX_LIST_AGE_MS))
    }

    /// The bytes the record takes in its bucket.
    #[cfg(test)]
    pub fn size(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |bytes| bytes.len())
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn records_read_back_what_they_wrote() {
        let record = RoomRecord {
            r: vec![Reservation {
                user: "@\"b\":x".into(),
                until: 6,
                holds: 1,
                since: 2,
            }],
            i: vec![Pairing {
                identity: "hash/+=".into(),
                user: "@a:x".into(),
                until: 7,
                seen: 3,
            }],
            p: None,
            d: vec![Departure {
                user: "@c:x".into(),
                at: 4,
            }],
            l: vec![],
            n: 0,
            w: None,
        };
        let out = serde_json::to_string(&record).unwrap();
        assert_eq!(
            out,
            r#"[[["@\"b\":x",6,1,2]],[["hash/+=","@a:x",7,3]],null,[["@c:x",4]]]"#
        );
        assert_eq!(serde_json::from_str::<RoomRecord>(&out).ok(), Some(record));
        let empty = serde_json::to_string(&RoomRecord::default()).unwrap();
        assert_eq!(empty, "[[],[]]");
    }

    #[test]
    fn a_record_of_the_earlier_format_reads_back_with_defaults() {
        let old = r#"[[["@a:x",5,1]],[["hash","@a:x",7]],[9,["@a:x:D"]]]"#;
        let record: RoomRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.r[0].since, 0);
        assert_eq!(record.i[0].seen, 0);
        assert_eq!(record.p.as_ref().map(|p| p.taken), Some(0));
        assert!(record.d.is_empty() && record.l.is_empty());
        assert!(serde_json::from_str::<RoomRecord>("[[]]").is_err());
        assert!(serde_json::from_str::<RoomRecord>("[[],[],null,[],[],1,2]").is_err());
        assert!(serde_json::from_str::<RoomRecord>("[[],[],null,[],[],1,null,3]").is_err());
        let viewed: RoomRecord =
            serde_json::from_str(r#"[[],[],null,[],[],0,[9,[["id","",5,true,7]],3]]"#).unwrap();
        let view = viewed.w.as_ref().unwrap();
        assert_eq!((view.listed, view.members[0].gone), (9, true));
        assert_eq!(
            serde_json::to_string(&viewed).unwrap(),
            r#"[[],[],null,[],[],0,[9,[["id","",5,true,7]],3]]"#
        );
    }

    #[test]
    fn a_members_other_reading_is_written_only_when_it_has_one() {
        let text = r#"[[],[],null,[],[],0,[9,[["id","u",5,false,7,"alt"],["id2","",6,true,8]],3]]"#;
        let record: RoomRecord = serde_json::from_str(text).unwrap();
        let view = record.w.as_ref().unwrap();
        assert_eq!(view.members[0].alt, "alt");
        assert_eq!(view.members[1].alt, "");
        assert_eq!(serde_json::to_string(&record).unwrap(), text);
    }

    #[test]
    fn the_sids_of_a_members_second_are_written_only_when_known() {
        let text = r#"[[],[],null,[],[],0,[9,[["id","u",5000,false,7,"","-PA_1 PA_2"]],3]]"#;
        let record: RoomRecord = serde_json::from_str(text).unwrap();
        let view = record.w.as_ref().unwrap();
        assert_eq!(
            (view.members[0].alt.as_str(), view.members[0].sid.as_str()),
            ("", "-PA_1 PA_2")
        );
        assert_eq!(serde_json::to_string(&record).unwrap(), text);
        // A member of the earlier format has neither.
        let old: RoomRecord =
            serde_json::from_str(r#"[[],[],null,[],[],0,[9,[["id","",5,true,7]],3]]"#).unwrap();
        assert_eq!(old.w.as_ref().unwrap().members[0].sid, "");
    }

    fn reservation(until: u64) -> Reservation {
        Reservation {
            user: "@a:x".into(),
            until,
            holds: 1,
            since: 0,
        }
    }

    fn pairing(until: u64, seen: u64) -> Pairing {
        Pairing {
            identity: "id".into(),
            user: "@a:x".into(),
            until,
            seen,
        }
    }

    #[test]
    fn only_what_holds_the_limit_is_never_evicted() {
        let reserved = RoomRecord {
            r: vec![reservation(1_000)],
            i: vec![pairing(100_000_000, 0)],
            ..RoomRecord::default()
        };
        // A list taken before the reservation ended may still be decided on for a while.
        assert_eq!(reserved.eviction(1_000), Eviction::Never);
        assert_eq!(
            reserved.eviction(1_000 + MAX_LIST_AGE_MS - 1),
            Eviction::Never
        );
        // Past that, written or not, only an unseen pairing is left: the first thing to go.
        assert_eq!(
            reserved.eviction(1_000 + MAX_LIST_AGE_MS),
            Eviction::Rank(0)
        );
        let departed = RoomRecord {
            d: vec![Departure {
                user: "@b:x".into(),
                at: 5_000,
            }],
            i: vec![pairing(100_000_000, 4_000)],
            ..RoomRecord::default()
        };
        assert_eq!(departed.eviction(5_000), Eviction::Never);
        // A pairing of an identity seen connected goes after the others.
        assert_eq!(
            departed.eviction(5_000 + MAX_LIST_AGE_MS),
            Eviction::Rank(1)
        );
        assert_eq!(departed.eviction(100_000_000), Eviction::Rank(0));
    }
}
