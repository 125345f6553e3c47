//! A participant's session as LiveKit tells it, and how two sessions of one identity stand to
//! each other.
//!
//! LiveKit gives each connection a new participant `sid` and dates it: `joinedAtMs` (ms), or
//! in versions without it only `joinedAt` (s). Sessions are ordered by that time. Two sessions
//! of one identity begun in the same millisecond do not happen (a reconnection takes longer),
//! but in the same second they do: a client that drops and reconnects at once. So when LiveKit
//! gives the time to the second only, the session keeps its sid, and two sessions of the same
//! second with different sids are told apart, their order unknown. With `joinedAtMs` the sid
//! is not kept: the time tells sessions apart, and the room's record spends nothing on it.

/// One session of a participant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// When it began (ms since the epoch; 0 when LiveKit did not say).
    pub start: u64,
    /// LiveKit's sid of it, kept when `start` is only to the second; empty otherwise.
    pub sid: String,
}

/// The longest sid kept: LiveKit's are some 15 bytes (`PA_` and letters and digits); anything
/// longer is cut, and other characters dropped, so that a record stays within its budget and
/// its encoding whatever an event holds.
const MAX_SID: usize = 32;

impl Session {
    /// A session known by its start alone.
    pub fn at(start: u64) -> Session {
        Session {
            start,
            sid: String::new(),
        }
    }

    /// A session as LiveKit writes it: `joinedAtMs` if given (the sid is then not needed),
    /// else `joinedAt` (s) and the sid.
    pub fn of(joined_at_ms: u64, joined_at_s: u64, sid: &str) -> Session {
        if joined_at_ms != 0 {
            return Session::at(joined_at_ms);
        }
        let sid = sid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(MAX_SID);
        Session {
            start: joined_at_s.saturating_mul(1000),
            sid: sid.collect(),
        }
    }
}

/// What is known of the sessions of one identity begun in one second, by sid, as the room's
/// record keeps it: each sid heard of, space-separated, `-` before those that ended (an end is
/// final, whatever the order events arrive in). The identity is connected while a sid has not
/// ended. At most [`MAX_KEPT`] sids: past it the oldest ends go first (a late join of one then
/// shows the identity connected until a list says otherwise: fuller, never emptier).
pub fn first_of_second(sid: &str, gone: bool) -> String {
    if sid.is_empty() {
        String::new()
    } else if gone {
        format!("-{sid}")
    } else {
        sid.to_owned()
    }
}

/// The sids of one second known after an event of session `sid` (`gone`: its end); `None`
/// when the event tells nothing new.
pub fn take(known: &str, sid: &str, gone: bool) -> Option<String> {
    let ended = format!("-{sid}");
    let mut sids: Vec<&str> = known.split(' ').filter(|s| !s.is_empty()).collect();
    if sids.contains(&ended.as_str()) || (!gone && sids.contains(&sid)) {
        return None;
    }
    sids.retain(|s| *s != sid);
    sids.push(if gone { &ended } else { sid });
    while sids.len() > MAX_KEPT {
        let drop = sids.iter().position(|s| s.starts_with('-')).unwrap_or(0);
        sids.remove(drop);
    }
    Some(sids.join(" "))
}

/// Whether a session of those known (see [`take`]) has not ended.
pub fn connected(known: &str) -> bool {
    known
        .split(' ')
        .any(|s| !s.is_empty() && !s.starts_with('-'))
}

/// The sids known once a list shows the identity connected in session `sid` of that second:
/// the ends known, and that session.
pub fn listed(known: &str, sid: &str) -> String {
    let mut sids: Vec<&str> = known.split(' ').filter(|s| s.starts_with('-')).collect();
    let ended = format!("-{sid}");
    if !sids.contains(&ended.as_str()) {
        sids.push(sid);
    }
    while sids.len() > MAX_KEPT {
        sids.remove(0);
    }
    sids.join(" ")
}

/// The sids known once a list shows the identity gone: every one ended.
pub fn all_ended(known: &str) -> String {
    let sids = known.split(' ').filter(|s| !s.is_empty());
    let ended: Vec<String> = sids
        .map(|s| {
            if s.starts_with('-') {
                s.to_owned()
            } else {
                format!("-{s}")
            }
        })
        .collect();
    ended.join(" ")
}

/// The most sids of one second kept per identity.
const MAX_KEPT: usize = 4;

impl From<u64> for Session {
    fn from(start: u64) -> Session {
        Session::at(start)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn the_sid_is_kept_only_when_the_time_is_to_the_second() {
        assert_eq!(
            Session::of(1_700_000_000_123, 1_700_000_000, "PA_a"),
            Session::at(1_700_000_000_123)
        );
        assert_eq!(
            Session::of(0, 1_700_000_000, "PA_a"),
            Session {
                start: 1_700_000_000_000,
                sid: "PA_a".into()
            }
        );
        assert_eq!(Session::of(0, 0, "").start, 0);
        assert_eq!(Session::of(0, 1, &"x".repeat(40)).sid, "x".repeat(32));
        assert_eq!(Session::of(0, 1, "-PA_a b").sid, "PA_ab");
    }

    #[test]
    fn sessions_of_one_second_are_told_apart_by_sid_and_an_end_is_final() {
        let known = first_of_second("a", false);
        assert!(connected(&known));
        // a drops, b connects: in either order, connected in b.
        let left_first = take(&take(&known, "a", true).unwrap(), "b", false).unwrap();
        let join_first = take(&take(&known, "b", false).unwrap(), "a", true).unwrap();
        for known in [&left_first, &join_first] {
            assert!(connected(known), "{known}");
            // A late or replayed join of a ends nothing and changes nothing.
            assert_eq!(take(known, "a", false), None);
            assert_eq!(take(known, "a", true), None);
            assert!(!connected(&take(known, "b", true).unwrap()));
        }
        // A leave heard before its join: the join never shows the session.
        let known = take("", "c", true).unwrap();
        assert_eq!(take(&known, "c", false), None);
        assert!(!connected(&known));
    }

    #[test]
    fn a_list_or_a_bound_never_hides_a_connected_session() {
        let known = take(&first_of_second("a", true), "b", false).unwrap();
        assert_eq!(listed(&known, "c"), "-a c");
        assert_eq!(listed(&known, "a"), "-a");
        assert_eq!(all_ended(&known), "-a -b");
        let mut known = String::new();
        for sid in ["1", "2", "3", "4", "5"] {
            known = take(&known, sid, true).unwrap();
        }
        known = take(&known, "6", false).unwrap();
        assert_eq!(known, "-3 -4 -5 6");
        assert!(connected(&known));
    }
}
