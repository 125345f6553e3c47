//! The proxy-wasm adapter: turns stream callbacks into [`Admission`] events and its effects
//! into host calls. No admission logic lives here.
//!
//! Header values are read as bytes: the SDK's string getters panic on non-UTF-8 values, and a
//! panic traps the VM for every stream on the worker.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::Config;
use crate::flow::{Admission, CallKind, Counter, Effect, Env};
use crate::store::{SharedStore, StoreError};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(GuardRoot::default()));
}}

/// Metric ids, defined once per VM (every VM copy gets the same shared counters).
struct Metrics {
    counters: Vec<(Counter, u32)>,
    shared_keys: Option<u32>,
    shared_bytes: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let counters = Counter::ALL
            .iter()
            .filter_map(|&c| {
                hostcalls::define_metric(MetricType::Counter, c.name())
                    .ok()
                    .map(|id| (c, id))
            })
            .collect();
        let gauge = |name| hostcalls::define_metric(MetricType::Gauge, name).ok();
        Metrics {
            counters,
            shared_keys: gauge("voice_limit_guard.shared_data_keys"),
            shared_bytes: gauge("voice_limit_guard.shared_data_bytes"),
        }
    }

    fn count(&self, counter: Counter) {
        if let Some((_, id)) = self.counters.iter().find(|(c, _)| *c == counter) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

/// The host's shared data, plus the gauges that account for what the guard keeps there.
struct HostStore {
    metrics: Rc<Metrics>,
}

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Some((value, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }

    fn account(&self, keys_delta: i64, bytes_delta: i64) {
        if let Some(id) = self.metrics.shared_keys {
            let _ = hostcalls::increment_metric(id, keys_delta);
        }
        if let Some(id) = self.metrics.shared_bytes {
            let _ = hostcalls::increment_metric(id, bytes_delta);
        }
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct GuardRoot {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for GuardRoot {}

impl RootContext for GuardRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                log::debug!(
                    "configured: token paths {:?}, failure mode {:?}",
                    config.token_paths,
                    config.failure_mode
                );
                self.config = Some(Rc::new(config));
                if self.metrics.is_none() {
                    self.metrics = Some(Rc::new(Metrics::define()));
                }
                true
            }
            Err(e) => {
                log::error!("voice-limit-guard: configuration rejected: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match (&self.config, &self.metrics) {
            (Some(config), Some(metrics)) => Some(Box::new(GuardStream {
                config: Rc::clone(config),
                store: HostStore {
                    metrics: Rc::clone(metrics),
                },
                admission: None,
                calls: Vec::new(),
            })),
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Where the host is in the stream when effects are applied; it decides how "let the
/// response go on" is said.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    /// Inside a response callback: return `Continue`.
    ResponseCallback,
    /// Inside a call's answer: the response must be resumed explicitly.
    CallAnswer,
}

struct GuardStream {
    config: Rc<Config>,
    store: HostStore,
    /// `None` for streams that are not token requests: they pass untouched.
    admission: Option<Admission>,
    /// Calls in flight and what they ask.
    calls: Vec<(u32, CallKind)>,
}

impl GuardStream {
    /// Carries out effects; returns whether the response may continue from a response callback.
    fn apply(&mut self, effects: Vec<Effect>, phase: Phase) -> Action {
        let mut action = Action::Pause;
        let mut queue = effects;
        while !queue.is_empty() {
            let mut follow_up = Vec::new();
            for effect in queue {
                match effect {
                    Effect::Count(counter) => self.store.metrics.count(counter),
                    Effect::Dispatch(call) => {
                        let headers: Vec<(&str, &str)> = call
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let body = Some(call.body.as_slice()).filter(|b| !b.is_empty());
                        match hostcalls::dispatch_http_call(
                            &call.cluster,
                            headers,
                            body,
                            Vec::new(),
                            call.timeout,
                        ) {
                            Ok(token) => self.calls.push((token, call.kind)),
                            Err(status) => {
                                log::warn!(
                                    "call to cluster {} could not be made: {status:?}",
                                    call.cluster
                                );
                                follow_up.extend(self.event(|admission, env| {
                                    admission.on_call_response(call.kind, None, b"", env)
                                }));
                            }
                        }
                    }
                    Effect::PassResponse => match phase {
                        Phase::ResponseCallback => action = Action::Continue,
                        Phase::CallAnswer => {
                            let _ = hostcalls::resume_http_response();
                        }
                        Phase::Request => {}
                    },
                    Effect::Reply(reply) => {
                        let body = reply.body.as_bytes();
                        let _ = hostcalls::send_http_response(
                            reply.status,
                            reply.headers.clone(),
                            Some(body),
                        );
                    }
                }
            }
            queue = follow_up;
        }
        action
    }

    /// Runs one admission event with a fresh environment.
    fn event(&mut self, f: impl FnOnce(&mut Admission, &Env) -> Vec<Effect>) -> Vec<Effect> {
        let Some(admission) = self.admission.as_mut() else {
            return Vec::new();
        };
        let env = Env {
            config: &self.config,
            store: &self.store,
            now_ms: now_ms(),
        };
        f(admission, &env)
    }
}

/// Answers from Synapse or LiveKit larger than this are not parsed: a limit lookup filtered by
/// type is tiny, and a participant list this large is beyond any sensible room limit.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl Context for GuardStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(index) = self.calls.iter().position(|(t, _)| *t == token_id) else {
            return;
        };
        let (_, kind) = self.calls.swap_remove(index);
        // A reset call arrives without any headers; asking for one would make the host
        // report an error status that the SDK turns into a panic.
        let status = if num_headers == 0 {
            None
        } else {
            header(MapType::HttpCallResponseHeaders, ":status")
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
        };
        let (status, body) = if body_size > MAX_ANSWER_BYTES {
            log::warn!("answer of {body_size} bytes exceeds {MAX_ANSWER_BYTES}; treated as failed");
            (None, Vec::new())
        } else {
            (status, buffer(BufferType::HttpCallResponseBody, body_size))
        };
        let effects =
            self.event(|admission, env| admission.on_call_response(kind, status, &body, env));
        self.apply(effects, Phase::CallAnswer);
    }
}

impl HttpContext for GuardStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let method = header(MapType::HttpRequestHeaders, ":method");
        let path = header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let path = String::from_utf8_lossy(&path);
        if method.as_deref() != Some(b"POST") || !self.config.is_token_path(&path) {
            return Action::Continue;
        }
        self.admission = Some(Admission::new());
        if end_of_stream {
            let effects = self.event(|admission, env| admission.on_request_body(b"", env));
            self.apply(effects, Phase::Request);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.admission.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause; // buffer until the whole body is here
        }
        let body = buffer(BufferType::HttpRequestBody, body_size);
        let effects = self.event(|admission, env| admission.on_request_body(&body, env));
        self.apply(effects, Phase::Request);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.admission.is_none() {
            return Action::Continue;
        }
        let status = header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        let effects =
            self.event(|admission, env| admission.on_response_headers(status, end_of_stream, env));
        let action = self.apply(effects, Phase::ResponseCallback);
        if action == Action::Continue {
            // Decided already: the body streams through untouched.
            self.admission = None;
        }
        action
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.admission.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = buffer(BufferType::HttpResponseBody, body_size);
        let effects = self.event(|admission, env| admission.on_response_body(&body, env));
        self.apply(effects, Phase::ResponseCallback)
    }
}
