//! The proxy-wasm adapter: turns stream callbacks into admission events, run by [`stream`],
//! and implements [`Host`] with proxy-wasm's host calls. No admission logic lives here, nor
//! the choice of how a decision is carried out in each phase ([`Phase`]).
//!
//! Header values are read as bytes: the SDK's string getters panic on non-UTF-8 values, and a
//! panic traps the VM for every stream on the worker.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::admission::limit_cache;
use crate::admission::reply::LocalReply;
use crate::admission::Admission;
use crate::admission::{CallKind, HttpCall, MAX_REQUEST_BODY};
use crate::config::{Config, EdgeConfig, Role};
use crate::counter::Counter;
use crate::host::calls::{buffer, header, log_refusal, now_ms, posted_path, HostStore, Metrics};
use crate::host::edge::{EdgeMetrics, EdgeStream};
use crate::host::stream::{self, hand_over, Host, Phase, Stream, WAIT_POLL};
use crate::host::webhook_host::WebhookStream;
use crate::occupancy;
use crate::request::rtc_request::RtcHeaders;
use crate::state::store::{self, SharedStore};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Debug);
    proxy_wasm::set_root_context(|context_id| Box::new(GuardRoot {
        context_id,
        config: None,
        metrics: None,
        edge: None,
    }));
}}

/// The proxy as the stream logic sees it: host calls, counters, and the shared data.
struct ProxyHost {
    store: HostStore,
}

impl ProxyHost {
    fn new(metrics: &Rc<Metrics>) -> ProxyHost {
        ProxyHost {
            store: HostStore {
                metrics: Rc::clone(metrics),
            },
        }
    }
}

impl Host for ProxyHost {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn store(&self) -> &dyn SharedStore {
        &self.store
    }

    fn set_effective_context(&self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }

    fn resume_response(&self) {
        let _ = hostcalls::resume_http_response();
    }

    fn send_reply(&self, reply: &LocalReply) {
        let _ = hostcalls::send_http_response(
            reply.status,
            reply.headers.clone(),
            Some(reply.body.as_bytes()),
        );
    }

    fn dispatch(&self, call: &HttpCall) -> Option<u32> {
        dispatch(call)
    }

    fn count(&self, counter: Counter) {
        self.store.metrics.count(counter);
    }

    fn log_refusal(&self, line: &str) {
        log_refusal(now_ms(), line);
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }
}

/// The secret that spreads ids over buckets, the same for every VM copy of the process: the
/// first copy to start draws it from the host's randomness and leaves it in shared data.
fn bucket_seed() -> u64 {
    let read = || {
        hostcalls::get_shared_data(store::SEED_KEY)
            .ok()
            .and_then(|(value, _)| value)
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
    };
    if let Some(seed) = read() {
        return seed;
    }
    use std::hash::BuildHasher;
    // std draws RandomState's keys from the host's random source (WASI `random_get`).
    let drawn = std::collections::hash_map::RandomState::new().hash_one(0u8);
    // Shared data has no create-if-absent: should two copies start at once, both write, and
    // each reads back the value that stayed.
    let _ = hostcalls::set_shared_data(store::SEED_KEY, Some(&drawn.to_le_bytes()), None);
    read().unwrap_or(drawn)
}

struct GuardRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
    /// Set instead of `config` when the configuration is an edge's.
    edge: Option<(Rc<EdgeConfig>, Rc<EdgeMetrics>)>,
}

impl GuardRoot {
    /// Makes the Synapse lookups queued by streams, as the root context.
    fn make_lookups(&self) {
        for (stream, call) in stream::take_lookups() {
            let _ = hostcalls::set_effective_context(self.context_id);
            match dispatch(&call) {
                Some(token) => stream::expect_answer(token, &stream, call.kind),
                None => self.answer(stream, call.kind, None, &[]),
            }
        }
    }

    fn answer(
        &self,
        stream: Weak<RefCell<Stream>>,
        kind: CallKind,
        status: Option<u32>,
        body: &[u8],
    ) {
        if let (Some(config), Some(metrics)) = (&self.config, &self.metrics) {
            hand_over(stream, kind, status, body, config, &ProxyHost::new(metrics));
        }
    }
}

/// Takes the answer to call `token_id` out of the host and hands it over (see [`hand_over`]).
fn answer_call(
    token_id: u32,
    num_headers: usize,
    body_size: usize,
    config: &Config,
    metrics: &Rc<Metrics>,
) {
    if let Some(answer) = take_call_answer(token_id, num_headers, body_size) {
        let CallAnswer {
            stream,
            kind,
            status,
            body,
        } = answer;
        hand_over(
            stream,
            kind,
            status,
            &body,
            config,
            &ProxyHost::new(metrics),
        );
    }
}

impl Context for GuardRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let (Some(config), Some(metrics)) = (&self.config, &self.metrics) {
            answer_call(token_id, num_headers, body_size, config, metrics);
        }
    }
}

impl RootContext for GuardRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Role::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(Role::Edge(edge)) => {
                log::debug!(
                    "configured as an edge: room header {}, token paths {:?}",
                    edge.room_header,
                    edge.token_paths
                );
                let metrics = match self.edge.take() {
                    Some((_, metrics)) => metrics,
                    None => Rc::new(EdgeMetrics::define()),
                };
                self.edge = Some((Rc::new(edge), metrics));
                true
            }
            Ok(Role::Guard(config)) => {
                store::set_bucket_seed(bucket_seed());
                log::debug!(
                    "configured: token paths {:?}, failure mode {:?}",
                    config.token_paths,
                    config.failure_mode
                );
                self.config = Some(Rc::new(*config));
                let metrics = match &self.metrics {
                    Some(metrics) => Rc::clone(metrics),
                    None => Rc::new(Metrics::define()),
                };
                let store = HostStore {
                    metrics: Rc::clone(&metrics),
                };
                limit_cache::LIMITS.buckets.create_all(&store);
                limit_cache::POWER_LEVELS.buckets.create_all(&store);
                limit_cache::OPENID_USERS.buckets.create_all(&store);
                occupancy::BUCKETS.create_all(&store);
                if let Some(id) = metrics.shared_keys {
                    // Absolute: every VM copy creates the same buckets at start.
                    let keys = limit_cache::LIMITS.buckets.count
                        + limit_cache::POWER_LEVELS.buckets.count
                        + limit_cache::OPENID_USERS.buckets.count
                        + occupancy::BUCKETS.count;
                    let _ = hostcalls::record_metric(id, u64::from(keys));
                }
                self.metrics = Some(metrics);
                true
            }
            Err(e) => {
                log::error!("voice-limit-guard: configuration rejected: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some((edge, metrics)) = &self.edge {
            return Some(Box::new(EdgeStream::new(
                Rc::clone(edge),
                Rc::clone(metrics),
            )));
        }
        let (Some(config), Some(metrics)) = (&self.config, &self.metrics) else {
            return None;
        };
        Some(Box::new(GuardStream {
            context_id,
            config: Rc::clone(config),
            metrics: Rc::clone(metrics),
            stream: None,
            webhook: None,
        }))
    }

    fn on_tick(&mut self) {
        self.make_lookups();
        let waiting = stream::take_waiting();
        for stream in waiting.iter().filter_map(Weak::upgrade) {
            Stream::run(&stream, Phase::CallAnswer, |admission, env| {
                admission.retry(env)
            });
        }
        // Retries may have queued lookups of their own.
        self.make_lookups();
        let period = if stream::any_waiting() {
            WAIT_POLL
        } else {
            Duration::ZERO
        };
        let _ = hostcalls::set_tick_period(period);
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Makes a call. A call the host refuses is logged here; the caller answers it as failed.
fn dispatch(call: &HttpCall) -> Option<u32> {
    let headers: Vec<(&str, &str)> = call
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let body = Some(call.body.as_slice()).filter(|b| !b.is_empty());
    hostcalls::dispatch_http_call(&call.cluster, headers, body, Vec::new(), call.timeout)
        .inspect_err(|status| {
            log::warn!(
                "call to cluster {} could not be made: {status:?}",
                call.cluster
            );
        })
        .ok()
}

/// An answer taken out of the host, with the stream it belongs to.
struct CallAnswer {
    stream: Weak<RefCell<Stream>>,
    kind: CallKind,
    /// `None` for a reset call.
    status: Option<u32>,
    body: Vec<u8>,
}

/// Takes the answer to call `token_id` out of the host: the stream it belongs to, what it
/// asked, the status (`None` for a reset call) and the body, read whole whatever its size
/// (participant lists carry user-set metadata; only the fields needed are parsed).
fn take_call_answer(token_id: u32, num_headers: usize, body_size: usize) -> Option<CallAnswer> {
    let (stream, kind) = stream::take_call(token_id)?;
    // A reset call arrives without any headers; asking for one would make the host
    // report an error status that the SDK turns into a panic.
    let status = if num_headers == 0 {
        None
    } else {
        header(MapType::HttpCallResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
    };
    let body = buffer(BufferType::HttpCallResponseBody, body_size);
    Some(CallAnswer {
        stream,
        kind,
        status,
        body,
    })
}

/// The headers a MatrixRTC request is decided on (a value that is not UTF-8 reads as absent).
fn rtc_headers() -> RtcHeaders {
    let text = |name| {
        header(MapType::HttpRequestHeaders, name).and_then(|value| String::from_utf8(value).ok())
    };
    RtcHeaders {
        authorization: text("authorization"),
        user_identifier: text("x-matrix-user-identifier"),
        origin: text("x-matrix-origin"),
    }
}

/// The SDK's counterpart of what [`Stream::run`] returns.
fn action(action: stream::Action) -> Action {
    match action {
        stream::Action::Continue => Action::Continue,
        stream::Action::Pause => Action::Pause,
    }
}

/// One HTTP stream. Only token requests get a [`Stream`]; every other request costs one
/// header read and nothing else.
struct GuardStream {
    context_id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    stream: Option<Rc<RefCell<Stream>>>,
    /// A LiveKit webhook on its way.
    webhook: Option<WebhookStream>,
}

impl GuardStream {
    /// The admission's stream, while a decision is pending.
    fn pending(&self) -> Option<&Rc<RefCell<Stream>>> {
        self.stream
            .as_ref()
            .filter(|stream| stream.borrow().undecided())
    }

    /// The admission's stream, while its request body has not been read.
    fn unread_request(&self) -> Option<Rc<RefCell<Stream>>> {
        self.pending()
            .filter(|stream| stream.borrow().request_unread())
            .cloned()
    }
}

impl Context for GuardStream {
    /// The stream is over, complete or cut short (reset, timeout, client gone): a place held
    /// for a token that never passed whole is given back now, not when its time runs out.
    fn on_done(&mut self) -> bool {
        if let Some(stream) = self.pending() {
            Stream::end(stream);
        }
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        answer_call(
            token_id,
            num_headers,
            body_size,
            &self.config,
            &self.metrics,
        );
    }
}

impl GuardStream {
    /// The whole request body is here: the admission reads it. A MatrixRTC request stays
    /// held until its decision; a legacy one goes on at once.
    fn request_body(&self, stream: &Rc<RefCell<Stream>>, body: &[u8]) -> Action {
        action(Stream::run(stream, Phase::Request, |admission, env| {
            admission.on_request_body(body, env)
        }))
    }

    /// A part of a watched answer: read, never held.
    fn watch_response(&self, stream: &Rc<RefCell<Stream>>, chunk: &[u8], end: bool) -> Action {
        Stream::run(stream, Phase::ResponseCallback, |admission, env| {
            admission.on_response_chunk(chunk, end, env)
        });
        Action::Continue
    }
}

impl HttpContext for GuardStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // A request without a body (GET, HEAD, an OPTIONS preflight, a bare POST) can never
        // get a token, as lk-jwt-service refuses an empty body; only a webhook may have none.
        if end_of_stream && self.config.webhooks.is_none() {
            return Action::Continue;
        }
        let Some(path) = posted_path() else {
            return Action::Continue;
        };
        if let Some((webhook, action)) =
            WebhookStream::start(&self.config, &self.metrics, &path, end_of_stream)
        {
            self.webhook = Some(webhook);
            return action;
        }
        if end_of_stream {
            return Action::Continue;
        }
        let Some(route) = self.config.route_of(&path) else {
            return Action::Continue;
        };
        let admission = Admission::deciding(route, self.config.decision_phase);
        let on_request = admission.decides_on_request();
        let stream = Rc::new(RefCell::new(Stream::new(
            self.context_id,
            Rc::clone(&self.config),
            Rc::new(ProxyHost::new(&self.metrics)),
            admission,
        )));
        self.stream = Some(Rc::clone(&stream));
        if !on_request {
            // `decision_phase: response`. The request goes upstream only once the guard has
            // read its body: an upstream that answers on the headers alone would otherwise
            // bring a 200 before the guard knows the room. lk-jwt-service cannot answer
            // earlier anyway, as it needs the body too. (Like holding the response, this
            // needs `allow_on_headers_stop_iteration`.)
            return Action::Pause;
        }
        // The headers go on; the body callbacks hold the body until the decision, which every
        // Wasm host honours. Nothing reaches lk-jwt-service's handler before it, and a 200
        // that comes earlier is never passed (see `admission`).
        if route.decides_on_request() {
            let headers = rtc_headers();
            Stream::run(&stream, Phase::Request, |admission, env| {
                admission.on_request_headers(headers, env)
            });
        }
        if stream.borrow().undecided() {
            Action::Continue
        } else {
            Action::Pause // answered (401)
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(webhook) = &mut self.webhook {
            return webhook.on_body(body_size, end_of_stream);
        }
        let Some(stream) = self.unread_request() else {
            return match self.pending() {
                // A MatrixRTC request whose decision is pending stays held.
                Some(stream) if stream.borrow().holds_request() => Action::Pause,
                _ => Action::Continue,
            };
        };
        if body_size > MAX_REQUEST_BODY {
            return action(Stream::run(&stream, Phase::Request, |admission, _| {
                admission.on_request_too_large()
            }));
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is here
        }
        let body = buffer(BufferType::HttpRequestBody, body_size);
        self.request_body(&stream, &body)
    }

    /// HTTP/2 and HTTP/3 requests (and HTTP/1.1 chunked ones) may end with trailers instead
    /// of a last body frame: the buffered body is complete here.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(webhook) = &mut self.webhook {
            return webhook.on_trailers();
        }
        let Some(stream) = self.unread_request() else {
            return match self.pending() {
                Some(stream) if stream.borrow().holds_request() => Action::Pause,
                _ => Action::Continue,
            };
        };
        let body = buffer(BufferType::HttpRequestBody, usize::MAX);
        self.request_body(&stream, &body)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(webhook) = &mut self.webhook {
            return webhook.on_response();
        }
        let Some(stream) = self.pending() else {
            return Action::Continue;
        };
        let status = header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        action(Stream::run(
            stream,
            Phase::ResponseCallback,
            |admission, env| admission.on_response_headers(status, end_of_stream, env),
        ))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(stream) = self.pending() else {
            return Action::Continue;
        };
        if stream.borrow().watches_response() {
            let chunk = buffer(BufferType::HttpResponseBody, body_size);
            return self.watch_response(stream, &chunk, end_of_stream);
        }
        if !end_of_stream {
            return Action::Pause; // hold the whole body until the decision
        }
        let body = buffer(BufferType::HttpResponseBody, body_size);
        action(Stream::run(
            stream,
            Phase::ResponseCallback,
            |admission, env| admission.on_response_body(&body, env),
        ))
    }

    /// A response that ends with trailers: its held body is complete here.
    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(stream) = self.pending() else {
            return Action::Continue;
        };
        if stream.borrow().watches_response() {
            return self.watch_response(stream, &[], true);
        }
        if !stream.borrow().response_body_unread() {
            return Action::Pause; // the decision is pending already
        }
        let body = buffer(BufferType::HttpResponseBody, usize::MAX);
        action(Stream::run(
            stream,
            Phase::ResponseCallback,
            |admission, env| admission.on_response_body(&body, env),
        ))
    }
}
