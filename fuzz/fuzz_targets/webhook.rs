//! LiveKit's webhooks (`webhook.rs`): the `Authorization` token and the body, as anyone who can
//! reach `webhooks.path` may send them, and the body reader on its own (what a body LiveKit
//! signed may hold).
//!
//! The first byte chooses how the rest is used:
//! - `0 mod 2`: the body alone, read as a signed one would be;
//! - `1 mod 2`: up to the first newline the `Authorization` header, the rest the body, fed in
//!   chunks whose sizes the next bytes choose: nothing unsigned is ever read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::occupancy::presence::RoomEvent;
use voice_limit_guard::upstream::webhook::{read_event, Intake, Received};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Some(Some((room, event))) = read_event(rest) {
            assert!(!room.is_empty(), "an event without a room was read");
            if let RoomEvent::Participant { identity, .. } = event {
                assert!(
                    !identity.is_empty(),
                    "a participant event without an identity"
                );
            }
        }
        return;
    }
    let (authorization, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(n) => (&rest[..n], &rest[n + 1..]),
        None => (rest, &[][..]),
    };
    let mut intake = Intake::new(
        Some(authorization),
        "devkey",
        "a secret nobody here knows",
        1_700_000_000,
    );
    for chunk in body.chunks(1 + usize::from(mode) % 7) {
        intake.feed(chunk);
    }
    assert!(
        matches!(intake.finish(), Received::Refused(_)),
        "a webhook without a valid signature was taken"
    );
});
