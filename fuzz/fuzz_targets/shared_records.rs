//! The records the filter keeps in proxy-wasm shared data, read back from arbitrary bytes.
//!
//! Shared data outlives a filter version and is written by every worker of the process, so
//! its decoders must take anything without panicking. Their decoders are private; they are
//! reached the way the filter reaches them: the bytes are put in the bucket of one id, then
//! the public operations on that id run over them.
//!
//! Input: a 16-byte header (missing bytes read as zero), then the bucket's bytes.
//! `header[0] & 1` chooses the state:
//!
//! - 0, the limit cache (`limit_cache`): `[1..5]` now (ms, u32 LE), `[5..7]` Synapse timeout
//!   (ms), `[7..9]` TTL (ms), `[9..11]` stale time (ms), `[11]` the limit Synapse answers (0:
//!   none), `[12..16]` four operations (low 2 bits: peek, read_or_claim, store_answer,
//!   release_claim; high 6 bits: how far the clock moves first, in 100 ms).
//! - 1, room occupancy (`occupancy::admit`): `[1..5]` now, `[5]` max users, `[6]` LiveKit's
//!   list (bit 7: the cached list, else the identities of `IDENTITIES` in the bitmask of
//!   bits 0-6), `[7]` requester (of `USERS`), `[8]` token identity (of `IDENTITIES`),
//!   `[9..11]` reservation time (10 ms), `[11..13]` list cache time (10 ms).
//!
//! After every write, a read must see what was written.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::admission::limit_cache::{self, Cached, Lifetimes};
use voice_limit_guard::occupancy::{self, Outcome, Participants, Request};
use voice_limit_guard::state::store::{MemoryStore, SharedStore};
use voice_limit_guard::upstream::synapse::Limit;

const HEADER_LEN: usize = 16;
const ROOM: &str = "!room:example.org";
const ALIAS: &str = "alias-of-room";
const USERS: [&str; 4] = [
    "@alice:example.org",
    "@bob:example.org",
    "@carol:example.org",
    "@dave:example.org",
];
const IDENTITIES: [&str; 8] = [
    "@alice:example.org:DEV1",
    "@bob:example.org:DEV1",
    "@carol:example.org:DEV1",
    "@alice:example.org:DEV2",
    "0d3c2b5a9f1e4d7c8b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c",
    "opaque-identity",
    "",
    "@dave:example.org:DEV1",
];

struct Header([u8; HEADER_LEN]);

impl Header {
    fn u16(&self, at: usize) -> u64 {
        u64::from(u16::from_le_bytes([self.0[at], self.0[at + 1]]))
    }
    fn u32(&self, at: usize) -> u64 {
        u64::from(u32::from_le_bytes([
            self.0[at],
            self.0[at + 1],
            self.0[at + 2],
            self.0[at + 3],
        ]))
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.len().min(HEADER_LEN);
    let mut header = [0u8; HEADER_LEN];
    header[..split].copy_from_slice(&data[..split]);
    let header = Header(header);
    let bucket = &data[split..];
    if header.0[0] & 1 == 0 {
        limit_cache_ops(&header, bucket);
    } else {
        occupancy_ops(&header, bucket);
    }
});

fn limit_cache_ops(header: &Header, bucket: &[u8]) {
    let store = MemoryStore::default();
    let key = limit_cache::LIMITS.buckets.key_for(ROOM);
    store.set(&key, bucket, None).expect("a first write");
    let mut now = header.u32(1);
    let pending_ms = header.u16(5);
    let life = Lifetimes {
        ttl_ms: header.u16(7),
        stale_ms: header.u16(9),
    };
    let limit = match header.0[11] {
        0 => Limit::None,
        // Even limits name their own exemption level (negative ones too).
        n => Limit::MaxUsers(u32::from(n), (n % 2 == 0).then_some(i64::from(n) * 7 - 500)),
    };
    for &op in &header.0[12..16] {
        now += u64::from(op >> 2) * 100;
        let before = limit_cache::LIMITS.peek(&store, ROOM, now);
        match op & 3 {
            0 => assert_eq!(limit_cache::LIMITS.peek(&store, ROOM, now), before),
            1 => match limit_cache::LIMITS.read_or_claim(&store, ROOM, now, pending_ms) {
                Ok(Cached::Claimed) => {
                    assert_eq!(before, None, "claimed a lookup while the cache answers");
                    if pending_ms > 0 {
                        assert_eq!(
                            limit_cache::LIMITS.peek(&store, ROOM, now),
                            Some(Cached::Pending),
                            "a claim that is not seen"
                        );
                    }
                }
                Ok(cached) => assert_eq!(Some(cached), before),
                Err(e) => panic!("read_or_claim failed: {e:?}"),
            },
            2 => {
                let stored = limit_cache::LIMITS.store_answer(&store, ROOM, limit, now, life);
                assert_eq!(stored, Ok(()), "store_answer failed");
                let expected = (life.ttl_ms > 0).then_some(Cached::Known(limit));
                assert_eq!(
                    limit_cache::LIMITS.peek(&store, ROOM, now),
                    expected,
                    "a stored answer that is not seen"
                );
            }
            _ => match limit_cache::LIMITS.release_claim(&store, ROOM, now, life, limit_cache::Unasked::Failed) {
                Ok(Some(stale)) => {
                    let after = limit_cache::LIMITS.peek(&store, ROOM, now);
                    if life.ttl_ms > 0 {
                        assert_eq!(after, Some(Cached::Known(stale)), "a stale limit not kept");
                    } else {
                        assert!(matches!(after, None | Some(Cached::Known(_))));
                    }
                }
                Ok(None) => assert_eq!(
                    limit_cache::LIMITS.peek(&store, ROOM, now),
                    None,
                    "a released claim still answers"
                ),
                Err(e) => panic!("release_claim failed: {e:?}"),
            },
        }
    }
}

fn occupancy_ops(header: &Header, bucket: &[u8]) {
    let store = MemoryStore::default();
    let key = occupancy::BUCKETS.key_for(ALIAS);
    store.set(&key, bucket, None).expect("a first write");
    let now_ms = header.u32(1);
    let list_byte = header.0[6];
    let fresh: Vec<String> = IDENTITIES
        .iter()
        .enumerate()
        .filter(|(n, _)| list_byte & (1 << n) != 0 && *n < 7)
        .map(|(_, identity)| (*identity).to_owned())
        .collect();
    let participants = if list_byte & 0x80 != 0 {
        Participants::Cached
    } else {
        Participants::Fresh {
            identities: &fresh,
            sessions: &[],
            taken_ms: now_ms,
        }
    };
    let q = Request {
        room: ALIAS,
        max_users: u32::from(header.0[5]),
        participants,
        requester: USERS[usize::from(header.0[7]) % USERS.len()],
        identity: IDENTITIES[usize::from(header.0[8]) % IDENTITIES.len()],
        reservation_ms: header.u16(9) * 10,
        list_cache_ms: header.u16(11) * 10,
        // Some decisions read LiveKit's webhooks: the record's view is merged and decided on.
        verify_ms: if now_ms % 7 == 3 { 60_000 } else { 0 },
        doubt_ms: 0,
        releasable: now_ms % 2 == 1,
        exempt: now_ms % 3 == 1,
        unverified: now_ms % 5 == 2,
        now_ms,
    };
    let verdict = match occupancy::admit(&store, &q) {
        Ok(Outcome::Decided(verdict)) => verdict,
        Ok(Outcome::NeedList) => {
            assert!(
                matches!(q.participants, Participants::Cached),
                "a fresh list was not enough"
            );
            return;
        }
        Err(e) => panic!("admit failed: {e:?}"),
    };
    if let Participants::Fresh { identities, .. } = q.participants {
        assert!(
            verdict.present <= identities.len(),
            "more users than participants"
        );
    }
    assert_eq!(verdict.admitted, verdict.refusal.is_none());
    if q.unverified {
        // A requester nobody verified only ever takes a free place, exempt or not; asking
        // again is another stand-in's business (each one is unique to its OpenID token).
        if verdict.admitted {
            assert!(
                verdict.present + verdict.reserved < q.max_users as usize,
                "an unverified requester took a place already counted: {verdict:?}"
            );
        }
        return;
    }
    // An admission is recorded: asking again at once is admitted too. The first answer may
    // have taught the record who an identity is, which can change the count once; after
    // that, asking again changes nothing: the same verdict, and the same stored bytes.
    if verdict.holds {
        // A releasable admission's hold can be given back; releasing more than was held
        // changes nothing.
        occupancy::release(&store, ALIAS, q.requester, now_ms).expect("a release");
        occupancy::release(&store, ALIAS, q.requester, now_ms).expect("a second release");
        return;
    }
    if verdict.admitted && q.reservation_ms > 0 {
        let again = match occupancy::admit(&store, &q) {
            Ok(Outcome::Decided(again)) => again,
            other => panic!("asking again gave {other:?}"),
        };
        assert!(again.admitted, "an admission that is not seen: {again:?}");
        let written = store.get(&key).map(|(bytes, _cas)| bytes);
        assert_eq!(
            occupancy::admit(&store, &q),
            Ok(Outcome::Decided(again)),
            "a third answer differs"
        );
        assert_eq!(
            store.get(&key).map(|(bytes, _cas)| bytes),
            written,
            "a third answer changed the record"
        );
    }
}
