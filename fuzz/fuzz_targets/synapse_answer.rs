//! Synapse's answers to the room state lookups (`/_synapse/admin/v1/rooms/{room}/state`):
//! the limit, and the power levels.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::upstream::synapse::{parse_power_levels, parse_state_response, Limit, MAX_PRIVILEGED};
use voice_limit_guard::upstream::call::{CallError, Service};

const STATE_TYPE: &str = "io.lotus.voice_limit";

fuzz_target!(|data: &[u8]| {
    match parse_state_response(Some(200), data, STATE_TYPE) {
        Ok(Limit::MaxUsers(n, _)) => assert!(n >= 1, "a limit of zero users"),
        Ok(Limit::None) | Err(CallError::BadBody(Service::Synapse)) => {}
        Err(other) => panic!("a 200 answer gave {other:?}"),
    }
    // A 404 means "no such room" only when Synapse says so; otherwise it is a failure.
    match parse_state_response(Some(404), data, STATE_TYPE) {
        Ok(Limit::None) | Err(CallError::Status(Service::Synapse, 404)) => {}
        other => panic!("a 404 answer gave {other:?}"),
    }
    assert_eq!(
        parse_state_response(None, data, STATE_TYPE),
        Err(CallError::NoResponse(Service::Synapse))
    );
    // Power levels: the users kept are above the default, highest first, and few.
    match parse_power_levels(Some(200), data, STATE_TYPE) {
        Ok(levels) => {
            assert!(levels.users.len() <= MAX_PRIVILEGED);
            assert!(levels
                .users
                .iter()
                .all(|(_, level)| *level > levels.users_default));
            assert!(levels.users.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        Err(CallError::BadBody(Service::Synapse)) => {}
        Err(other) => panic!("a 200 answer gave {other:?}"),
    }
});
