#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;

const KEY: &str = "devkey";
const SECRET: &str = "secret-of-at-least-32-characters!";
const NOW: u64 = 1_700_000_010;

/// A participant_joined event as livekit-server 1.13 writes it (protojson with its spaces),
/// and its token, computed independently with Python's hmac, hashlib and base64 modules.
const BODY: &str = r#"{"event":"participant_joined", "room":{"sid":"RM_abc", "name":"myroom", "creationTime":"1700000000", "turnPassword":"tp"}, "participant":{"sid":"PA_xyz", "identity":"@alice:example.org:DEVICE", "state":"ACTIVE", "joinedAt":"1700000001", "joinedAtMs":"1700000001234"}, "id":"EV_abc123", "createdAt":"1700000002"}"#;
const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJkZXZrZXkiLCJleHAiOjE3MDAwMDAzMDIsIm5iZiI6MTcwMDAwMDAwMiwiaWF0IjoxNzAwMDAwMDAyLCJzaGEyNTYiOiJqS0pkeGY2aFNXb2hnQlloLzgvL2dZK2tPaEJTaEZYVVZDV1M5ZUIrbWxnPSJ9.t0sthEUxr6e5ciijnoRGPpl78lWOBDof5mjzpSv3Q4g";

fn receive(authorization: Option<&str>, chunks: &[&[u8]], now_s: u64) -> Received {
    let mut intake = Intake::new(authorization.map(str::as_bytes), KEY, SECRET, now_s);
    for chunk in chunks {
        intake.feed(chunk);
    }
    intake.finish()
}

/// A token as LiveKit signs one, for `body`, with these claims besides `sha256`.
fn sign(body: &[u8], claims: &str, secret: &str) -> String {
    let sha256 = STANDARD.encode(Sha256::digest(body));
    let claims = format!(r#"{{{claims},"sha256":"{sha256}"}}"#);
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

const VALID: &str = r#""iss":"devkey","exp":1700000302,"nbf":1700000002"#;

fn joined(room: &str, identity: &str, session: u64) -> Received {
    let event = RoomEvent::Participant {
        identity: identity.to_owned(),
        session: session.into(),
        presence: Presence::Joined,
    };
    Received::Read(Some((room.to_owned(), event)))
}

#[test]
fn reads_a_webhook_as_livekit_signs_it_in_any_chunks() {
    let expected = joined("myroom", "@alice:example.org:DEVICE", 1_700_000_001_234);
    assert_eq!(receive(Some(TOKEN), &[BODY.as_bytes()], NOW), expected);
    let (a, b) = BODY.as_bytes().split_at(77);
    assert_eq!(receive(Some(TOKEN), &[a, &[], b], NOW), expected);
    assert_eq!(
        receive(Some(&format!("Bearer {TOKEN}")), &[BODY.as_bytes()], NOW),
        expected
    );
}

#[test]
fn anything_but_livekits_signature_on_this_body_is_refused() {
    let body = BODY.as_bytes();
    let refused = |auth: Option<&str>, body: &[u8], now: u64| match receive(auth, &[body], now) {
        Received::Refused(why) => Some(why),
        _ => None,
    };
    assert_eq!(refused(None, body, NOW), Some(Refusal::Unsigned));
    assert_eq!(refused(Some("x.y"), body, NOW), Some(Refusal::Malformed));
    assert_eq!(refused(Some("\u{ff}"), body, NOW), Some(Refusal::Malformed));
    // One byte changed, removed or added.
    let changed = BODY.replace("alice", "alicf");
    assert_eq!(
        refused(Some(TOKEN), changed.as_bytes(), NOW),
        Some(Refusal::BodyMismatch)
    );
    assert_eq!(
        refused(Some(TOKEN), &body[1..], NOW),
        Some(Refusal::BodyMismatch)
    );
    assert_eq!(
        refused(Some(TOKEN), format!("{BODY} ").as_bytes(), NOW),
        Some(Refusal::BodyMismatch)
    );
    // Another key, another secret, a forged signature.
    let other_key = sign(body, r#""iss":"other","exp":1700000302"#, SECRET);
    assert_eq!(
        refused(Some(&other_key), body, NOW),
        Some(Refusal::OtherKey)
    );
    let other_secret = sign(body, VALID, "another secret of 32 characters!!");
    assert_eq!(
        refused(Some(&other_secret), body, NOW),
        Some(Refusal::BadSignature)
    );
    let mut forged = TOKEN.to_owned();
    forged.pop();
    forged.push('A');
    assert_eq!(
        refused(Some(&forged), body, NOW),
        Some(Refusal::BadSignature)
    );
    // Other algorithms, including none.
    for header in [r#"{"alg":"none"}"#, r#"{"alg":"HS512"}"#, r#"{}"#] {
        let mut parts: Vec<String> = TOKEN.split('.').map(str::to_owned).collect();
        parts[0] = URL_SAFE_NO_PAD.encode(header);
        assert_eq!(
            refused(Some(&parts.join(".")), body, NOW),
            Some(Refusal::Malformed)
        );
    }
    // Times, with a minute of leeway; a token without exp or sha256.
    assert_eq!(refused(Some(TOKEN), body, 1_700_000_302 + 60), None);
    assert_eq!(
        refused(Some(TOKEN), body, 1_700_000_302 + 61),
        Some(Refusal::OutOfTime)
    );
    assert_eq!(
        refused(Some(TOKEN), body, 1_700_000_002 - 61),
        Some(Refusal::OutOfTime)
    );
    let no_exp = sign(body, r#""iss":"devkey""#, SECRET);
    assert_eq!(refused(Some(&no_exp), body, NOW), Some(Refusal::Malformed));
}

#[test]
fn the_events_the_guard_uses_and_those_it_skips() {
    let read = |body: &str| {
        let token = sign(body.as_bytes(), VALID, SECRET);
        receive(Some(&token), &[body.as_bytes()], NOW)
    };
    let left = |event: &str| {
        format!(
            r#"{{"event":"{event}","room":{{"name":"r"}},"participant":{{"identity":"i","joinedAtMs":"5"}}}}"#
        )
    };
    for event in ["participant_left", "participant_connection_aborted"] {
        let expected = RoomEvent::Participant {
            identity: "i".to_owned(),
            session: 5.into(),
            presence: Presence::Left,
        };
        assert_eq!(
            read(&left(event)),
            Received::Read(Some(("r".to_owned(), expected)))
        );
    }
    assert_eq!(
        read(r#"{"event":"room_finished","room":{"name":"r"}}"#),
        Received::Read(Some(("r".to_owned(), RoomEvent::Finished)))
    );
    for skipped in [
        r#"{"event":"track_published","room":{"name":"r"},"participant":{"identity":"i"}}"#,
        r#"{"event":"egress_ended","egressInfo":{"egressId":"EG_1"}}"#,
        r#"{"event":"room_started","room":{"name":"r"}}"#,
    ] {
        assert_eq!(read(skipped), Received::Read(None), "{skipped}");
    }
    // Proto names, and an older LiveKit's seconds.
    assert_eq!(
        read(
            r#"{"event":"participant_joined","room":{"name":"r"},"participant":{"identity":"i","joined_at":"7"}}"#
        ),
        joined("r", "i", 7_000)
    );
    // To the second only, the sid tells sessions of one second apart; with the milliseconds
    // it is not needed.
    let with_sid = |participant: &str| {
        read(&format!(
            r#"{{"event":"participant_left","room":{{"name":"r"}},"participant":{{"identity":"i",{participant}}}}}"#
        ))
    };
    let left_in = |start, sid: &str| {
        let event = RoomEvent::Participant {
            identity: "i".to_owned(),
            session: Session {
                start,
                sid: sid.to_owned(),
            },
            presence: Presence::Left,
        };
        Received::Read(Some(("r".to_owned(), event)))
    };
    assert_eq!(
        with_sid(r#""sid":"PA_x1","joinedAt":"7""#),
        left_in(7_000, "PA_x1")
    );
    assert_eq!(
        with_sid(r#""sid":"PA_x1","joinedAt":"7","joinedAtMs":"7123""#),
        left_in(7_123, "")
    );
    for unreadable in [
        "[]",
        r#"{"room":{"name":"r"}}"#,
        r#"{"event":"room_finished"}"#,
        r#"{"event":"participant_joined","room":{"name":""},"participant":{"identity":"i"}}"#,
        r#"{"event":"participant_joined","room":{"name":"r"}}"#,
        r#"{"event":"participant_joined","room":{"name":"r"},"participant":{"identity":5}}"#,
        r#"{"event":"participant_left","room":{"name":"r"},"participant":{"identity":""}}"#,
    ] {
        assert!(
            matches!(read(unreadable), Received::Unreadable(_)),
            "{unreadable}"
        );
    }
}

#[test]
fn a_signed_body_longer_than_the_guard_reads_is_unreadable_and_memory_stays_bounded() {
    let metadata = "m".repeat(MAX_WEBHOOK_BODY);
    let body = format!(
        r#"{{"event":"participant_joined","room":{{"name":"r","metadata":"{metadata}"}}}}"#
    );
    let token = sign(body.as_bytes(), VALID, SECRET);
    let mut intake = Intake::new(Some(token.as_bytes()), KEY, SECRET, NOW);
    for chunk in body.as_bytes().chunks(64 * 1024) {
        intake.feed(chunk);
        assert!(intake.body.len() <= MAX_WEBHOOK_BODY);
    }
    assert!(matches!(intake.finish(), Received::Unreadable(_)));
    // A refused token reads nothing at all.
    let mut intake = Intake::new(None, KEY, SECRET, NOW);
    intake.feed(body.as_bytes());
    assert!(intake.body.is_empty());
}

#[test]
fn a_webhook_cut_short_by_an_answer_is_unreadable_when_signed_and_refused_otherwise() {
    let (first, _) = BODY.as_bytes().split_at(77);
    let mut intake = Intake::new(Some(TOKEN.as_bytes()), KEY, SECRET, NOW);
    intake.feed(first);
    assert!(matches!(intake.cut_short(), Received::Unreadable(_)));
    let intake = Intake::new(Some(b"not a token"), KEY, SECRET, NOW);
    assert_eq!(intake.cut_short(), Received::Refused(Refusal::Malformed));
    // Doubt follows only from what LiveKit signed.
    let store = crate::state::store::MemoryStore::default();
    let unsigned = Intake::new(None, KEY, SECRET, NOW).cut_short();
    assert!(!settle(&unsigned, &store, 5_000).contains(&Counter::WebhooksUnreadable));
    assert_eq!(crate::occupancy::view::doubt_since(&store), 0);
    let signed = Intake::new(Some(TOKEN.as_bytes()), KEY, SECRET, NOW).cut_short();
    assert!(settle(&signed, &store, 5_000).contains(&Counter::WebhooksUnreadable));
    assert_eq!(crate::occupancy::view::doubt_since(&store), 5_000);
}
