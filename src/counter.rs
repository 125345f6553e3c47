//! The counters the guard exports (Envoy's `/stats`, `voice_limit_guard_*` in Prometheus's
//! form): what each one counts. The host names them; the admission and the webhook reader
//! say which to count.
//!
//! May use: nothing of the crate (the lowest layer).

/// The guard's counters (the host exports them as `voice_limit_guard.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    TokenRequests,
    Allowed,
    Blocked,
    FailOpen,
    FailClosed,
    SynapseLookups,
    LimitCacheHits,
    LivekitLookups,
    LivekitCacheHits,
    /// lk-jwt-service issued a token for a request body the guard could not read.
    Unreadable,
    /// A refresh failed and the last limit seen was enforced.
    StaleLimits,
    /// A MatrixRTC request without the application service's `hs_token`, answered 401.
    Untrusted,
    /// A client-server MatrixRTC request for another homeserver's SFU, let through.
    Relayed,
    /// A place reserved before lk-jwt-service answered, given back when it refused the token.
    Released,
    /// A token issued after a request-phase admission for another room or participant than
    /// the one counted.
    TokenMismatches,
    /// Power-level lookups sent to Synapse (made only for rooms that are full).
    PowerLevelLookups,
    /// Users let into a full room for their power level.
    ExemptAdmissions,
    /// OpenID userinfo lookups sent to Synapse, to learn who asks on `/sfu/get` (made only
    /// for rooms with a limit, on the request phase).
    OpenidLookups,
    /// `/sfu/get` requests decided without knowing who asks (another homeserver's OpenID
    /// token, or Synapse's userinfo failed), and `/get_token` requests claiming a user of
    /// another server than their OpenID token's: they may only take a free place.
    UnverifiedRequesters,
    /// Token request bodies over [`MAX_REQUEST_BODY`], answered 413.
    OversizedRequests,
    /// `/sfu/get` requesters known from an earlier userinfo answer for the same OpenID token.
    OpenidCacheHits,
    /// Tokens refused because the room's shared record could not hold the admission (503).
    CapacityRefusals,
    /// Tokens refused the room's last place because the requester's reservations lapsed
    /// without their connecting (403, like a full room).
    CoolingRefusals,
    /// Synapse lookups not made because the process's budget was spent
    /// (`synapse.max_lookups_per_second`): limit lookups of rooms not seen within
    /// `stale_limit_seconds` (the token answered 429) and OpenID checks (the requester
    /// decided on as unverified).
    LookupsOverBudget,
    /// Limit lookups not made because the process's budget was spent, decided instead on the
    /// limit (or "no limit") seen last, within `stale_limit_seconds`.
    StaleOverBudget,
    /// Requests on the webhook path (`webhooks.path`).
    WebhooksReceived,
    /// Webhooks LiveKit signed, read.
    WebhooksAccepted,
    /// Webhooks without LiveKit's valid signature on their body: ignored.
    WebhooksRefused,
    /// Webhooks LiveKit signed that the guard could not read: every room's view in doubt.
    WebhooksUnreadable,
    /// Decisions taken on a room's view kept by webhooks, where LiveKit would have been asked.
    LivekitLookupsAvoided,
    /// Places reserved on a request and given back as its stream ended (reset, timed out,
    /// client gone) before lk-jwt-service's token passed whole.
    Abandoned,
    /// Places of requesters nobody verified moved to the user the token issued names.
    Rekeyed,
}

impl Counter {
    pub const ALL: [Counter; 32] = [
        Counter::TokenRequests,
        Counter::Allowed,
        Counter::Blocked,
        Counter::FailOpen,
        Counter::FailClosed,
        Counter::SynapseLookups,
        Counter::LimitCacheHits,
        Counter::LivekitLookups,
        Counter::LivekitCacheHits,
        Counter::Unreadable,
        Counter::StaleLimits,
        Counter::Untrusted,
        Counter::Relayed,
        Counter::Released,
        Counter::TokenMismatches,
        Counter::PowerLevelLookups,
        Counter::ExemptAdmissions,
        Counter::OpenidLookups,
        Counter::UnverifiedRequesters,
        Counter::OversizedRequests,
        Counter::OpenidCacheHits,
        Counter::CapacityRefusals,
        Counter::CoolingRefusals,
        Counter::LookupsOverBudget,
        Counter::StaleOverBudget,
        Counter::WebhooksReceived,
        Counter::WebhooksAccepted,
        Counter::WebhooksRefused,
        Counter::WebhooksUnreadable,
        Counter::LivekitLookupsAvoided,
        Counter::Abandoned,
        Counter::Rekeyed,
    ];
}
