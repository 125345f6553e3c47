//! The proxy-wasm adapters: what runs in Envoy. [`stream`] carries an admission's effects out
//! on a stream through a small `Host` trait (tested natively); the rest is compiled for the
//! proxy-wasm target only: `proxy` (the root and HTTP contexts, and the `Host` of host calls),
//! `calls` (reading headers and buffers, metrics, the shared store), `edge` (the edge role,
//! which names a request's room for consistent hashing, [`affinity`]) and `webhook_host`
//! (LiveKit's webhooks as they pass).
//!
//! May use: every layer below.

pub mod affinity;
#[cfg(target_os = "wasi")]
mod calls;
#[cfg(target_os = "wasi")]
mod edge;
#[cfg(target_os = "wasi")]
mod proxy;
pub mod stream;
#[cfg(target_os = "wasi")]
mod webhook_host;
