//! voice-limit-guard: an Envoy proxy-wasm filter that enforces per-room participant limits
//! on Matrix (MatrixRTC) calls by refusing LiveKit tokens issued by lk-jwt-service.
//!
//! The crate is a sans-IO core under a thin host adapter, in layers; a module uses only the
//! layers below it (`tests/layers.py` checks the arrows, `docs/development.md` draws them):
//!
//! | layer | module | what lives there |
//! | --- | --- | --- |
//! | 5 | [`host`] | the proxy-wasm adapters: root and stream contexts, the edge and webhook roles, and the stream logic they drive ([`host::stream`], tested natively) |
//! | 4 | [`admission`] | the sans-IO admission of one token request, events in, effects out: start reading there |
//! | 3 | [`upstream`] | what Synapse, LiveKit and lk-jwt-service say: requests to them, their answers, issued tokens, signed webhooks |
//! | 2 | [`occupancy`], [`config`] | who is in a room (reservations, pairings, the view kept by webhooks); the filter's configuration |
//! | 1 | [`request`] | what clients send: routes, bodies as lk-jwt-service's Go decoder reads them, LiveKit names derived from them |
//! | 0 | [`state`], [`counter`] | shared data and per-VM memory; the counters the guard exports |

pub mod admission;
pub mod config;
pub mod counter;
pub mod host;
pub mod occupancy;
pub mod request;
pub mod state;
#[cfg(test)]
mod test_support;
pub mod upstream;
