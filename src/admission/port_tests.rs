//! A user whose server name ends in a port (`@bob:hs.test:8448`), in the call on a `/sfu/get`
//! identity the guard never saw issued (`@bob:hs.test:8448:B1`, which the Matrix grammar alone
//! reads as `@bob:hs.test`'s device `8448:B1`), asks for another device on each route: let in
//! without a new place, and counted once afterwards.

use super::tests::{outcome, participants, Drive};
use super::*;
use crate::config::Config;
use crate::request::livekit_names::hash_of_strings;
use crate::state::store::MemoryStore;
use crate::test_support::{config, issued, legacy_alias, limit_answer, lookup, ROOM};
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SLOT: &str = "m.call#ROOM";
const ALICE: &str = "@alice:example.com:A1";

/// Server names with a port: a DNS name, an IPv4 address, an IPv6 literal.
const SERVERS: [&str; 3] = ["hs.test:8448", "10.0.0.1:8008", "[2001:db8::1]:443"];
/// Device ids of bob's first device, colons and digits included.
const FIRST_DEVICES: [&str; 3] = ["B1", "b:1", "443:x"];

fn openid(server: &str, user: &str) -> String {
    format!(
        r#"{{"access_token":"openid:{user}","token_type":"Bearer","matrix_server_name":"{server}","expires_in":3600}}"#
    )
}

fn sfu_get_body(server: &str, user: &str, device: &str) -> Vec<u8> {
    let openid = openid(server, user);
    format!(r#"{{"room":"{ROOM}","openid_token":{openid},"device_id":"{device}"}}"#).into_bytes()
}

fn get_token_body(server: &str, user: &str, member: &str) -> Vec<u8> {
    let openid = openid(server, user);
    format!(
        r#"{{"room_id":"{ROOM}","slot_id":"{SLOT}","openid_token":{openid},"member":{{"id":"{member}","claimed_user_id":"{user}","claimed_device_id":"NEW"}}}}"#
    )
    .into_bytes()
}

fn rtc_body(member: &str, user: Option<&str>) -> Vec<u8> {
    let user = user.map_or(String::new(), |u| format!(r#""user_id":"{u}","#));
    format!(r#"{{{user}"room_id":"{ROOM}","slot_id":"{SLOT}","member_id":"{member}","url":"wss://sfu"}}"#)
        .into_bytes()
}

/// The routes a token is asked for on, each way it is decided.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// `/sfu/get` decided on lk-jwt-service's token (`decision_phase: response`), any server.
    SfuGetOnResponse,
    /// `/sfu/get` decided on the request, Synapse vouching for the OpenID token: the guard's
    /// own homeserver (`synapse.server_name`) is the user's.
    SfuGetOnRequest,
    GetTokenOnResponse,
    GetTokenOnRequest,
    /// MatrixRTC, Synapse forwarding its own user's request.
    Client,
    /// MatrixRTC, Synapse forwarding the request of a remote homeserver's user.
    Federation,
}

const WAYS: [Way; 6] = [
    Way::SfuGetOnResponse,
    Way::SfuGetOnRequest,
    Way::GetTokenOnResponse,
    Way::GetTokenOnRequest,
    Way::Client,
    Way::Federation,
];

/// `user` (of `server`) asks on `way` for a new device into the room limited to 2 whose LiveKit
/// room holds `present`; the answer's status.
fn ask(
    cfg: &Config,
    store: &MemoryStore,
    way: Way,
    server: &str,
    user: &str,
    present: &[&str],
) -> Option<u32> {
    let route = match way {
        Way::Client => Route::Client,
        Way::Federation => Route::Federation,
        _ => Route::Legacy,
    };
    let phase = match way {
        Way::SfuGetOnResponse | Way::GetTokenOnResponse => DecisionPhase::Response,
        _ => DecisionPhase::Request,
    };
    let mut d = Drive::on(route, cfg, store, 1_000);
    d.admission = Admission::deciding(route, phase);
    let headers = RtcHeaders {
        authorization: Some("Bearer hs".to_owned()),
        user_identifier: (route == Route::Client).then(|| user.to_owned()),
        origin: (route == Route::Federation).then(|| server.to_owned()),
    };
    let (body, token) = match way {
        Way::SfuGetOnResponse | Way::SfuGetOnRequest => (
            sfu_get_body(server, user, "NEW"),
            issued(&legacy_alias(), &format!("{user}:NEW")),
        ),
        Way::GetTokenOnResponse | Way::GetTokenOnRequest => (
            get_token_body(server, user, "m2"),
            issued(
                &room_alias(ROOM, SLOT),
                &hash_of_strings(&[user, "NEW", "m2"]),
            ),
        ),
        Way::Client => (rtc_body("m2", None), Vec::new()),
        Way::Federation => (rtc_body("m2", Some(user)), Vec::new()),
    };
    if route != Route::Legacy {
        let effects = d.admission.on_request_headers(headers, &d.env);
        d.keep(effects);
    }
    let effects = d.request(&body);
    if effects
        .iter()
        .any(|e| matches!(e, Effect::Dispatch(c) if c.kind == lookup()))
    {
        d.synapse(Some(200), &limit_answer(2));
    }
    if super::tests::dispatched(&d.all)
        .iter()
        .any(|c| c.kind == CallKind::Userinfo)
    {
        let sub = format!(r#"{{"sub":"{user}"}}"#);
        let effects =
            d.admission
                .on_call_response(CallKind::Userinfo, Some(200), sub.as_bytes(), &d.env);
        d.keep(effects);
    }
    if phase == DecisionPhase::Response && route == Route::Legacy {
        d.token(&token);
    }
    if d.livekit_call().is_some() && outcome(&d.all).is_none() {
        d.livekit(Some(200), &participants(present));
    }
    outcome(&d.all)
}

fn configured(way: Way, server: &str) -> Config {
    let mut cfg = config(r#", "participants_cache_ms": 0"#);
    if matches!(way, Way::SfuGetOnRequest) {
        cfg.synapse.server_name = Some(server.to_owned());
    }
    cfg
}

#[test]
fn a_present_user_whose_server_name_has_a_port_gets_another_device_on_every_route() {
    for way in WAYS {
        for server in SERVERS {
            for first in FIRST_DEVICES {
                let cfg = configured(way, server);
                let store = MemoryStore::default();
                let bob = format!("@bob:{server}");
                let bob_first = format!("{bob}:{first}");
                let case = format!("{way:?} {bob_first}");
                // The room is full: bob (connected before the limit was set) and alice.
                let present = [bob_first.as_str(), ALICE];
                assert_eq!(
                    ask(&cfg, &store, way, server, &bob, &present),
                    Some(200),
                    "{case}"
                );
                // Bob took no new place: carol is refused.
                let carol = "@carol:example.com";
                let refused = ask(&cfg, &store, way, "example.com", carol, &present);
                assert_eq!(refused, Some(403), "{case}");
                // Bob's first device is now known as his: with alice gone, he holds one place
                // of two (read as `@bob:hs.test`, it would hold another).
                let dave = "@dave:example.com";
                let admitted = ask(&cfg, &store, way, "example.com", dave, &[&bob_first]);
                assert_eq!(admitted, Some(200), "{case}");
            }
        }
    }
}

#[test]
fn a_user_without_the_port_is_still_read_from_the_name_alone() {
    // `@bob:hs.test`, with a device `8448:B1` the guard never saw, is in the call and asks
    // again: the name reads as theirs, as before.
    for way in [Way::SfuGetOnResponse, Way::GetTokenOnRequest, Way::Client] {
        let cfg = configured(way, "hs.test");
        let store = MemoryStore::default();
        let present = ["@bob:hs.test:8448:B1", ALICE];
        let status = ask(&cfg, &store, way, "hs.test", "@bob:hs.test", &present);
        assert_eq!(status, Some(200), "{way:?}");
    }
}
