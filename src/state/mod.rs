//! Shared data and per-VM memory: the proxy's key-value store as buckets of typed records
//! written by compare-and-swap ([`store`]), the buckets a VM decoded last ([`decoded`]), bounded
//! memos of derived names ([`memo`]), records written as arrays ([`compact`]), and the process's budget of Synapse lookups ([`budget`]).
//!
//! May use: nothing of the crate (the lowest layer).

pub mod budget;
pub(crate) mod compact;
pub(crate) mod decoded;
pub(crate) mod memo;
pub mod store;
