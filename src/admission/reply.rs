//! The answers the guard gives in place of lk-jwt-service's, shaped like lk-jwt-service's own
//! errors (Matrix error JSON and the same CORS headers), so browsers and clients treat them alike.

/// A local reply replacing the upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: &'static str,
}

/// The headers lk-jwt-service puts on every answer of its token endpoints.
pub const LK_JWT_HEADERS: [(&str, &str); 4] = [
    ("content-type", "application/json"),
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "POST"),
    (
        "access-control-allow-headers",
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
    ),
];

/// 403: the room already holds its limit of distinct users.
pub fn channel_full() -> LocalReply {
    LocalReply {
        status: 403,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_FORBIDDEN","error":"This voice channel is full."}"#,
    }
}

/// 503 under `failure_mode: closed`: the limit could not be checked.
pub fn check_failed() -> LocalReply {
    LocalReply {
        status: 503,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_UNKNOWN","error":"The participant limit of this voice channel could not be checked."}"#,
    }
}

/// 503 whatever `failure_mode` says: lk-jwt-service issued a token for a request body the
/// guard could not read (incomplete, or not readable the way lk-jwt-service reads it).
pub fn unreadable_request() -> LocalReply {
    LocalReply {
        status: 503,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_UNKNOWN","error":"The token request could not be checked against the participant limit."}"#,
    }
}

/// 413: a token request body over [`crate::admission::MAX_REQUEST_BODY`], answered (unless one read
/// takes it past the proxy's own buffer limit) before that limit would answer it in plain
/// text without the CORS headers a browser needs.
pub fn body_too_large() -> LocalReply {
    LocalReply {
        status: 413,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_TOO_LARGE","error":"The token request body is over 64 KiB."}"#,
    }
}

/// 403: the requester's devices already fill every place the guard can remember; one more
/// would count as another user.
pub fn too_many_devices() -> LocalReply {
    LocalReply {
        status: 403,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_FORBIDDEN","error":"Too many devices are connected to this voice channel."}"#,
    }
}

/// 503: the room's shared record cannot hold one more admission (a room limited to several
/// hundred users, or an Envoy process whose shared data is full of live calls).
pub fn at_capacity() -> LocalReply {
    LocalReply {
        status: 503,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_RESOURCE_LIMIT_EXCEEDED","error":"The participant limit of this voice channel cannot count one more participant."}"#,
    }
}

/// 429: the process's budget of Synapse lookups is spent for now (a flood of new room ids).
/// Matrix's rate-limit answer, which clients retry after `retry_after_ms`.
pub fn lookups_exhausted() -> LocalReply {
    let mut headers = LK_JWT_HEADERS.to_vec();
    headers.push(("retry-after", "1"));
    LocalReply {
        status: 429,
        headers,
        body: r#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too many token requests for rooms this server has not checked yet; retry shortly.","retry_after_ms":1000}"#,
    }
}

/// 401 on a MatrixRTC route without a bearer token: lk-jwt-service's answer to a request that
/// does not come from the homeserver.
pub fn missing_token() -> LocalReply {
    LocalReply {
        status: 401,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_MISSING_TOKEN","error":"Missing access token."}"#,
    }
}

/// 401 on a MatrixRTC route with another bearer token than the application service's.
pub fn unknown_token() -> LocalReply {
    LocalReply {
        status: 401,
        headers: LK_JWT_HEADERS.to_vec(),
        body: r#"{"errcode":"M_UNKNOWN_TOKEN","error":"Unrecognised access token."}"#,
    }
}
