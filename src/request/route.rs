//! Which token route a request path is, and so how the guard learns who is asking.
//!
//! lk-jwt-service issues tokens on four kinds of route:
//!
//! - the legacy `/sfu/get` and `/get_token` (the configured `token_paths`), which clients call
//!   directly with an OpenID token: the requester is the body's claimed user (`/get_token`)
//!   or its OpenID token's user, which Synapse can say (`/sfu/get`), so the decision is taken
//!   on the request by default, and on the issued token with `decision_phase: response`;
//! - the MatrixRTC routes (MSC4195) that Synapse forwards to lk-jwt-service as an application
//!   service (MSC4512): `/_matrix/client/<version>/rtc/livekit/get_token`, with the
//!   authenticated user in `X-Matrix-User-Identifier`, and
//!   `/_matrix/federation/<version>/rtc/livekit/get_token`, with the remote user in the body
//!   and its server in `X-Matrix-Origin`. The requester arrives with the request, so the
//!   decision is taken before lk-jwt-service sees the body.
//!
//! Synapse forwards any version segment (`v1`, `unstable/<anything>`), so the MatrixRTC routes
//! are matched by their prefix and their last three segments, with whatever stands between.
//! The path is read as generously as any server could read it: without its query, after one
//! round of percent-decoding, with empty and `.` segments dropped, `..` applied, and the fixed
//! segments compared without regard to ASCII case. A spelling that some server routes to a
//! token handler is therefore always guarded; guarding a spelling that lk-jwt-service then
//! refuses costs nothing. Other paths under those prefixes (`delegate_delayed_leave`, ...)
//! are not token routes and pass untouched.

/// A token route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A configured `token_paths` entry: `/sfu/get` or `/get_token`.
    Legacy,
    /// The client-server MatrixRTC route, forwarded by the user's own homeserver.
    Client,
    /// The federation MatrixRTC route, a remote homeserver asking for one of its users.
    Federation,
}

impl Route {
    /// Whether the requester arrives with the request's trusted headers or body (and the
    /// decision is always taken before lk-jwt-service sees it, whatever `decision_phase`).
    pub fn decides_on_request(self) -> bool {
        !matches!(self, Route::Legacy)
    }
}

/// The route of a request path, if it is a token route. `legacy_paths` are the configured
/// `token_paths`, compared as given and after percent-decoding.
pub fn classify(legacy_paths: &[String], path: &str) -> Option<Route> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let decoded = percent_decode(path);
    let decoded = decoded.as_deref().unwrap_or(path);
    if legacy_paths.iter().any(|p| p == path || p == decoded) {
        return Some(Route::Legacy);
    }
    matrix_rtc_route(decoded)
}

/// `/_matrix/{client|federation}/<one or more version segments>/rtc/livekit/get_token`.
fn matrix_rtc_route(path: &str) -> Option<Route> {
    let segments = normalised_segments(path);
    let [first, kind, middle @ .., rtc, livekit, get_token] = segments.as_slice() else {
        return None;
    };
    let is = |segment: &str, name: &str| segment.eq_ignore_ascii_case(name);
    if middle.is_empty()
        || !is(first, "_matrix")
        || !is(rtc, "rtc")
        || !is(livekit, "livekit")
        || !is(get_token, "get_token")
    {
        return None;
    }
    if is(kind, "client") {
        Some(Route::Client)
    } else if is(kind, "federation") {
        Some(Route::Federation)
    } else {
        None
    }
}

/// The path's segments with empty and `.` segments dropped and `..` applied.
fn normalised_segments(path: &str) -> Vec<&str> {
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    segments
}

/// Decodes `%XX` escapes once; `None` when there are none or they do not decode to UTF-8.
pub fn percent_decode(path: &str) -> Option<String> {
    if !path.contains('%') {
        return None;
    }
    percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn route(path: &str) -> Option<Route> {
        let legacy = vec!["/sfu/get".to_owned(), "/get_token".to_owned()];
        classify(&legacy, path)
    }

    #[test]
    fn the_documented_routes() {
        for (path, expected) in [
            ("/sfu/get", Route::Legacy),
            ("/get_token", Route::Legacy),
            ("/_matrix/client/v1/rtc/livekit/get_token", Route::Client),
            (
                "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token",
                Route::Client,
            ),
            (
                "/_matrix/federation/v1/rtc/livekit/get_token",
                Route::Federation,
            ),
            (
                "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token",
                Route::Federation,
            ),
        ] {
            assert_eq!(route(path), Some(expected), "{path}");
        }
    }

    #[test]
    fn every_version_segment_synapse_forwards_is_guarded() {
        for path in [
            "/_matrix/client/v2/rtc/livekit/get_token",
            "/_matrix/client/unstable/org.example/rtc/livekit/get_token",
            "/_matrix/client/r0/rtc/livekit/get_token",
            "/_matrix/federation/unstable/x/y/rtc/livekit/get_token",
        ] {
            assert!(route(path).is_some(), "{path}");
        }
    }

    #[test]
    fn variant_spellings_cannot_slip_past() {
        for path in [
            "/_matrix/client/v1/rtc/livekit/get_token?access_token=x",
            "/_matrix/client/v1/rtc/livekit/get_token/",
            "//_matrix//client/v1/rtc//livekit/get_token",
            "/_matrix/client/v1/./rtc/livekit/get_token",
            "/_matrix/client/v1/x/../rtc/livekit/get_token",
            "/_matrix/client/v1/rtc/livekit/get%5Ftoken",
            "/_matrix/client/v1/rtc%2Flivekit%2Fget_token",
            "/_MATRIX/Client/v1/RTC/LiveKit/GET_TOKEN",
            "/_matrix/client/v1/rtc/livekit/get_token#frag",
        ] {
            assert_eq!(route(path), Some(Route::Client), "{path}");
        }
        assert_eq!(route("/sfu%2Fget"), Some(Route::Legacy));
        assert_eq!(route("/s%66u/get?x=1"), Some(Route::Legacy));
    }

    #[test]
    fn other_paths_under_the_prefixes_pass() {
        for path in [
            "/_matrix/client/v1/rtc/livekit/delegate_delayed_leave",
            "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave",
            "/_matrix/client/rtc/livekit/get_token",
            "/_matrix/app/v1/ping",
            "/_matrix/media/v1/rtc/livekit/get_token",
            "/_matrix/client/v1/rtc/livekit/get_token/x",
            "/sfu_webhook",
            "/healthz",
            "/",
            "",
        ] {
            assert_eq!(route(path), None, "{path}");
        }
    }

    #[test]
    fn only_the_legacy_routes_decide_on_the_response() {
        assert!(!Route::Legacy.decides_on_request());
        assert!(Route::Client.decides_on_request());
        assert!(Route::Federation.decides_on_request());
    }
}
