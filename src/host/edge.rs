//! The host adapter of the edge role ([`crate::host::affinity`]): holds a token request's headers
//! until its body names the room, then sets the room header and lets the request be routed.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, MetricType};

use crate::config::EdgeConfig;
use crate::host::affinity;
use crate::host::calls::{buffer, posted_path};

/// The edge's counters, defined once per VM.
pub struct EdgeMetrics {
    /// Token requests sent on with a room header.
    routed: Option<u32>,
    /// Token requests whose body named no readable room: sent on without one.
    unroutable: Option<u32>,
}

impl EdgeMetrics {
    pub fn define() -> EdgeMetrics {
        let counter = |name| hostcalls::define_metric(MetricType::Counter, name).ok();
        EdgeMetrics {
            routed: counter("voice_limit_guard.routed_requests"),
            unroutable: counter("voice_limit_guard.unroutable_requests"),
        }
    }
}

pub struct EdgeStream {
    config: Rc<EdgeConfig>,
    metrics: Rc<EdgeMetrics>,
    /// A token request whose headers are held until its body is complete.
    holding: bool,
}

impl EdgeStream {
    pub fn new(config: Rc<EdgeConfig>, metrics: Rc<EdgeMetrics>) -> EdgeStream {
        EdgeStream {
            config,
            metrics,
            holding: false,
        }
    }

    /// Names the body's room in the header, and has Envoy pick the route (and with it the
    /// hash) again from the headers as they are now.
    fn route(&mut self, body: &[u8]) {
        self.holding = false;
        let key = affinity::room_key(body);
        let counter = match &key {
            Some(key) => {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    &self.config.room_header,
                    Some(key),
                );
                self.metrics.routed
            }
            None => self.metrics.unroutable,
        };
        if let Some(id) = counter {
            let _ = hostcalls::increment_metric(id, 1);
        }
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }
}

impl Context for EdgeStream {}

impl HttpContext for EdgeStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Whatever the request, a room header the client sent never reaches the hash.
        let _ =
            hostcalls::set_map_value(MapType::HttpRequestHeaders, &self.config.room_header, None);
        // Only a POST with a body to a token path can get a token (lk-jwt-service refuses an
        // empty body).
        if end_of_stream
            || posted_path()
                .and_then(|p| self.config.route_of(&p))
                .is_none()
        {
            return Action::Continue;
        }
        // Routing waits for the body (this needs `allow_on_headers_stop_iteration`).
        self.holding = true;
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.holding {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is here
        }
        self.route(&buffer(BufferType::HttpRequestBody, body_size));
        Action::Continue
    }

    /// A body that ends with trailers is complete here.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.holding {
            self.route(&buffer(BufferType::HttpRequestBody, usize::MAX));
        }
        Action::Continue
    }
}
