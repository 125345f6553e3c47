//! What the admission asks the host to do: calls to make (and which question each asks),
//! counters, passing or replacing the request or the response.

use std::time::Duration;

use super::reply::LocalReply;
use crate::config::Upstream;
use crate::counter::Counter;
use crate::upstream::call::Request;

/// Which question an outgoing call asks; the host hands it back with the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// Synapse's state of this Matrix room. Its answer is kept in the shared cache even when
    /// the request that asked has ended (see [`lookup::settle_orphaned`]).
    LimitLookup(String),
    /// `ListParticipants` for this LiveKit room.
    ListParticipants(String),
    /// Synapse's power levels of this Matrix room (full, so someone may be exempt). Kept in
    /// the shared cache like a limit lookup's answer.
    PowerLookup(String),
    /// The create event of this Matrix room: its creators, exempt in room version 12.
    CreatorsLookup(String),
    /// Synapse's userinfo for the OpenID token of this request (`/sfu/get`).
    Userinfo,
}

impl CallKind {
    /// Whether the call asks Synapse for a room rule: made by the root context, and its answer
    /// cached even when the request that asked has ended.
    pub fn is_synapse_lookup(&self) -> bool {
        matches!(
            self,
            CallKind::LimitLookup(_) | CallKind::PowerLookup(_) | CallKind::CreatorsLookup(_)
        )
    }
}

/// An HTTP call to make with `dispatch_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub kind: CallKind,
    pub cluster: String,
    /// Pseudo-headers included.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Dispatch(HttpCall),
    Count(Counter),
    /// Let the held request go on to lk-jwt-service.
    PassRequest,
    /// Let the upstream response go on unchanged.
    PassResponse,
    /// Answer the stream with this reply (in place of the upstream response).
    Reply(LocalReply),
    /// Another request of this process is asking Synapse for the same room: call
    /// [`Admission::retry`] again shortly, until that answer is in the shared cache.
    AwaitSharedLimit,
    /// The `info` line of a refusal (room, user, counts). The host rate-limits these: a client
    /// retrying against a full room must not flood the proxy's log.
    LogRefusal(String),
}

/// A service's request as the host makes it: to the upstream's cluster, with its authority
/// and timeout.
pub(super) fn call(kind: CallKind, upstream: &Upstream, request: Request) -> HttpCall {
    let mut headers = vec![
        (":method".to_owned(), request.method.to_owned()),
        (":path".to_owned(), request.path),
        (":authority".to_owned(), upstream.authority.clone()),
    ];
    headers.extend(request.headers);
    HttpCall {
        kind,
        cluster: upstream.cluster.clone(),
        headers,
        body: request.body,
        timeout: upstream.timeout,
    }
}
