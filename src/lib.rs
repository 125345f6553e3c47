//! voice-limit-guard: an Envoy proxy-wasm filter that enforces per-room participant limits
//! on Matrix (MatrixRTC) calls by refusing LiveKit tokens issued by lk-jwt-service.
//!
//! The crate is a sans-IO core plus a thin host adapter:
//! - [`flow`] is the whole admission of a token request, top to bottom, driven by events and
//!   answering with effects. Start reading there.
//! - [`route`] tells the token routes apart; [`token_request`] (on [`gojson`]) reads the
//!   legacy routes' bodies and [`rtc_request`] the MatrixRTC routes' requests; [`watch`]
//!   checks a token issued after a request-phase admission.
//! - [`synapse`] (limits, power levels) and [`livekit`] (participants) ask the services, both
//!   on [`upstream`] and [`json`]; [`lookup`] settles Synapse's answers into [`limit_cache`].
//! - [`jwt`], [`livekit_names`], [`decision`], [`occupancy`] and [`limit_cache`] (both on
//!   [`store`]), [`reply`] and [`config`] each hold one concern.
//! - [`affinity`] is the edge role: it names a token request's room in a header, so that
//!   Envoy's consistent hashing sends each room to one guard replica.
//! - [`stream`] carries a stream's effects out through a small `Host` trait (tested natively);
//!   `host` (compiled for the proxy-wasm target only) implements it with proxy-wasm host calls,
//!   and `edge` is the edge role's adapter.

pub mod affinity;
pub mod budget;
pub mod config;
pub mod decision;
mod decoded;
pub mod flow;
pub mod gojson;
pub mod json;
pub mod jwt;
mod key_path;
pub mod limit_cache;
pub mod livekit;
pub mod livekit_names;
pub mod lookup;
mod memo;
pub mod occupancy;
pub mod openid;
pub mod presence;
pub mod reply;
mod room_record;
pub mod room_view;
pub mod route;
pub mod rtc_request;
pub mod session;
pub mod store;
pub mod stream;
pub mod synapse;
#[cfg(test)]
mod test_support;
pub mod token_request;
pub mod upstream;
pub mod watch;
pub mod webhook;

#[cfg(target_os = "wasi")]
mod edge;
#[cfg(target_os = "wasi")]
mod host;
#[cfg(target_os = "wasi")]
mod webhook_host;
