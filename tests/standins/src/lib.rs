//! Faithful, self-contained stand-ins for the two services voice-limit-guard
//! talks to, so its tests run without Go, a homeserver or a LiveKit server:
//!
//! * [`lkjwt`]: element-hq/lk-jwt-service (the upstream the filter guards);
//! * [`livekit`]: the LiveKit RoomService `ListParticipants` call the filter
//!   makes, plus a control API to shape the room state.
//!
//! Tokens are minted and verified with the official `livekit-api` crate, so
//! they are exactly what the real services produce and accept.

pub mod cli;
pub mod gojson;
pub mod http;
pub mod livekit;
pub mod lkjwt;
