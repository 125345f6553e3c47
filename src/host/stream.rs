//! A token request's stream as the host adapter drives it: which admission event runs in
//! which phase, how the effects become host calls, and the queues through which call answers
//! and ticks reach a stream.
//!
//! This is where the adapter can stall a response (a pass said the wrong way) or resume one
//! twice, so it talks to the proxy only through [`Host`] and is tested natively against a
//! recording host. `host` implements [`Host`] with proxy-wasm's host calls and keeps the rest
//! of the glue (callbacks, reading headers and buffers, the root's tick).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::admission::lookup::settle_orphaned;
use crate::admission::reply::LocalReply;
use crate::admission::{Admission, CallKind, Effect, Env, HttpCall};
use crate::config::Config;
use crate::counter::Counter;
use crate::state::store::SharedStore;

/// What the stream logic asks of the proxy; `host` answers with proxy-wasm host calls, the
/// tests with a record of what was asked.
pub trait Host {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// The shared data the admission reads and writes.
    fn store(&self) -> &dyn SharedStore;
    /// Makes the host calls that follow act on stream `context_id`; false when the host no
    /// longer knows it.
    fn set_effective_context(&self, context_id: u32) -> bool;
    /// Lets a paused request go on, from outside the stream's own callbacks.
    fn resume_request(&self);
    /// Lets a paused response go on, from outside the stream's own callbacks.
    fn resume_response(&self);
    /// Answers the stream with `reply` in place of the upstream response.
    fn send_reply(&self, reply: &LocalReply);
    /// Makes `call`; its token, or `None` when the host refuses it.
    fn dispatch(&self, call: &HttpCall) -> Option<u32>;
    fn count(&self, counter: Counter);
    /// The host rate-limits these: a client retrying against a full room must not flood the
    /// proxy's log.
    fn log_refusal(&self, line: &str);
    /// Has the root context tick every `period` (zero: no more ticks).
    fn set_tick_period(&self, period: Duration);
}

/// How often streams waiting for another request's Synapse answer look again.
pub const WAIT_POLL: Duration = Duration::from_millis(5);
/// How soon the root makes the Synapse lookups streams asked for.
pub const LOOKUP_DELAY: Duration = Duration::from_millis(1);

/// Calls in flight and streams waiting on this VM (one VM per worker thread).
///
/// A call made while the root context runs (on a tick) is answered to the root context, so
/// answers are routed here by token to the stream that needs them, whoever made the call.
/// Streams are held weakly: a stream that ended is simply skipped.
///
/// Synapse lookups are made by the root context, on its next tick: Envoy cancels the calls
/// of a stream when it ends, and the SDK drops answers addressed to a stream it deleted, so a
/// lookup made by the stream would be lost whenever its client went away, and every request
/// waiting for it would have to ask again. Made by the root, its answer always arrives and is
/// cached ([`settle_orphaned`]). Power-level lookups go the same way.
#[derive(Default)]
struct Pending {
    calls: Vec<(u32, Weak<RefCell<Stream>>, CallKind)>,
    waiting: Vec<Weak<RefCell<Stream>>>,
    lookups: Vec<(Weak<RefCell<Stream>>, HttpCall)>,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

/// Remembers that the answer to call `token` belongs to `stream`.
pub fn expect_answer(token: u32, stream: &Weak<RefCell<Stream>>, kind: CallKind) {
    PENDING.with(|p| {
        let calls = &mut p.borrow_mut().calls;
        // Envoy cancels the calls of a stream that ends, so their answers never come: forget
        // them here, or the list would grow with every abandoned request. Lookups are kept.
        calls.retain(|(_, stream, kind)| stream.strong_count() > 0 || kind.is_synapse_lookup());
        calls.push((token, Weak::clone(stream), kind));
    });
}

/// The stream that call `token` belongs to, and what it asked; forgotten once taken.
pub fn take_call(token: u32) -> Option<(Weak<RefCell<Stream>>, CallKind)> {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let index = p.calls.iter().position(|(t, _, _)| *t == token)?;
        let (_, stream, kind) = p.calls.swap_remove(index);
        Some((stream, kind))
    })
}

/// The Synapse lookups streams asked for since the root last made them.
pub fn take_lookups() -> Vec<(Weak<RefCell<Stream>>, HttpCall)> {
    PENDING.with(|p| std::mem::take(&mut p.borrow_mut().lookups))
}

/// The streams waiting for another request's Synapse answer; each is queued again for as
/// long as it still waits.
pub fn take_waiting() -> Vec<Weak<RefCell<Stream>>> {
    PENDING.with(|p| std::mem::take(&mut p.borrow_mut().waiting))
}

/// Whether a stream waits for the next tick.
pub fn any_waiting() -> bool {
    PENDING.with(|p| !p.borrow().waiting.is_empty())
}

/// What a stream callback returns: proxy-wasm's `Action`, mirrored so that this module does
/// not link the SDK, whose host imports nothing outside a proxy provides (the core's tests
/// also run under Node.js).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Where the host is in the stream when effects are applied; it decides how "let the
/// request (or response) go on" is said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Inside a request callback: return `Continue` unless the request is held.
    Request,
    /// Inside a response callback: return `Continue`.
    ResponseCallback,
    /// Outside the stream's own callbacks (a call's answer, a tick): resume explicitly.
    CallAnswer,
}

/// The per-stream state of a token request, shared with the queues so answers and ticks can
/// reach it.
pub struct Stream {
    context_id: u32,
    config: Rc<Config>,
    host: Rc<dyn Host>,
    /// `None` once the admission has nothing more to do: what follows streams through
    /// untouched.
    admission: Option<Admission>,
}

impl Stream {
    pub fn new(
        context_id: u32,
        config: Rc<Config>,
        host: Rc<dyn Host>,
        admission: Admission,
    ) -> Stream {
        Stream {
            context_id,
            config,
            host,
            admission: Some(admission),
        }
    }

    /// Whether the decision is still to come.
    pub fn undecided(&self) -> bool {
        self.admission.is_some()
    }

    /// Whether the decision is still to come and the request body has not been read.
    pub fn request_unread(&self) -> bool {
        self.admission.as_ref().is_some_and(|a| !a.request_read())
    }

    /// Whether the decision is still to come and a held 200 still waits for its body.
    pub fn response_body_unread(&self) -> bool {
        self.admission
            .as_ref()
            .is_some_and(Admission::awaits_response_body)
    }

    /// Whether the request is held until the decision (a MatrixRTC request).
    pub fn holds_request(&self) -> bool {
        self.admission
            .as_ref()
            .is_some_and(Admission::holds_request)
    }

    /// Whether the response is read as it passes (a request-phase admission's answer).
    pub fn watches_response(&self) -> bool {
        self.admission
            .as_ref()
            .is_some_and(Admission::watches_response)
    }

    /// The stream ended, whichever way (done, reset, timed out): what only a request that can
    /// still bring a token may hold is given back.
    pub fn end(this: &Rc<RefCell<Stream>>) {
        Stream::run(this, Phase::ResponseCallback, |admission, env| {
            admission.on_stream_end(env)
        });
    }

    /// Runs one admission event and carries out its effects; returns whether a response
    /// callback may return `Continue`.
    pub fn run(
        this: &Rc<RefCell<Stream>>,
        phase: Phase,
        event: impl FnOnce(&mut Admission, &Env) -> Vec<Effect>,
    ) -> Action {
        let (effects, host) = {
            let mut stream = this.borrow_mut();
            let stream = &mut *stream;
            let Some(admission) = stream.admission.as_mut() else {
                return Action::Continue;
            };
            let host = Rc::clone(&stream.host);
            let clock = || host.now_ms();
            let effects = event(admission, &Env::new(&stream.config, host.store(), &clock));
            (effects, host)
        };
        if phase == Phase::CallAnswer {
            // Outside the stream's callbacks, host calls must name the stream.
            let context_id = this.borrow().context_id;
            if !host.set_effective_context(context_id) {
                return Action::Continue; // the stream is gone
            }
        }
        Stream::apply(this, &*host, effects, phase)
    }

    fn apply(
        this: &Rc<RefCell<Stream>>,
        host: &dyn Host,
        effects: Vec<Effect>,
        phase: Phase,
    ) -> Action {
        let mut action = Action::Pause;
        let mut replied = false;
        for effect in effects {
            match effect {
                Effect::Count(counter) => host.count(counter),
                Effect::LogRefusal(line) => host.log_refusal(&line),
                Effect::Dispatch(call) => Stream::dispatch(this, host, call, phase),
                Effect::AwaitSharedLimit => {
                    PENDING.with(|p| p.borrow_mut().waiting.push(Rc::downgrade(this)));
                    // Make sure this VM's root ticks; the tick itself keeps it going.
                    host.set_tick_period(WAIT_POLL);
                }
                Effect::PassRequest => {
                    if phase == Phase::CallAnswer {
                        host.resume_request();
                    }
                }
                Effect::PassResponse => match phase {
                    Phase::ResponseCallback => action = Action::Continue,
                    Phase::CallAnswer => host.resume_response(),
                    Phase::Request => {}
                },
                Effect::Reply(reply) => {
                    replied = true;
                    host.send_reply(&reply);
                }
            }
        }
        let mut stream = this.borrow_mut();
        let holds_request = stream
            .admission
            .as_ref()
            .is_some_and(Admission::holds_request);
        if phase == Phase::Request && !replied && !holds_request {
            action = Action::Continue;
        }
        if replied || stream.admission.as_ref().is_some_and(Admission::finished) {
            // Whatever follows streams through untouched.
            stream.admission = None;
        }
        action
    }

    /// Makes a call for the stream; a Synapse lookup is left to the root (see [`Pending`]). A
    /// call the host refuses is answered to the admission as failed at once. Inside a
    /// response callback, that answer's outcome is carried out as on a call's answer (a pass
    /// by resuming): what the callback returns comes from its own event's effects only.
    fn dispatch(this: &Rc<RefCell<Stream>>, host: &dyn Host, call: HttpCall, phase: Phase) {
        if call.kind.is_synapse_lookup() {
            PENDING.with(|p| p.borrow_mut().lookups.push((Rc::downgrade(this), call)));
            host.set_tick_period(LOOKUP_DELAY);
            return;
        }
        if let Some(token) = host.dispatch(&call) {
            expect_answer(token, &Rc::downgrade(this), call.kind);
            return;
        }
        let kind = call.kind;
        let phase = if phase == Phase::ResponseCallback {
            Phase::CallAnswer
        } else {
            phase
        };
        Stream::run(this, phase, |admission, env| {
            admission.on_call_response(kind, None, b"", env)
        });
    }
}

/// Hands a call's answer to the stream that asked, or, when that stream has ended, settles
/// it (a limit lookup's answer is cached all the same).
pub fn hand_over(
    stream: Weak<RefCell<Stream>>,
    kind: CallKind,
    status: Option<u32>,
    body: &[u8],
    config: &Config,
    host: &dyn Host,
) {
    if let Some(stream) = stream.upgrade() {
        Stream::run(&stream, Phase::CallAnswer, |admission, env| {
            admission.on_call_response(kind, status, body, env)
        });
    } else {
        let clock = || host.now_ms();
        settle_orphaned(&kind, status, body, &Env::new(config, host.store(), &clock));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::limit_cache::{self, Cached};
    use crate::admission::reply;
    use crate::state::store::MemoryStore;
    use crate::test_support::{
        config, issued, legacy_alias, legacy_body, limit_answer, lookup, ROOM,
    };
    use crate::upstream::synapse::Limit;
    use std::cell::Cell;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// A host call, as the recording host saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Asked {
        Context(u32),
        Resume,
        ResumeRequest,
        Reply(LocalReply),
        Dispatch(CallKind),
        Count(Counter),
        LogRefusal(String),
        Tick(Duration),
    }

    #[derive(Default)]
    struct Recorder {
        store: MemoryStore,
        asked: RefCell<Vec<Asked>>,
        /// Dispatches are refused while set.
        refuse_calls: Cell<bool>,
        /// The host no longer knows any stream while set.
        streams_gone: Cell<bool>,
        last_token: Cell<u32>,
    }

    impl Recorder {
        fn record(&self, asked: Asked) {
            self.asked.borrow_mut().push(asked);
        }

        /// What was asked since the last look.
        fn take(&self) -> Vec<Asked> {
            std::mem::take(&mut self.asked.borrow_mut())
        }
    }

    impl Host for Recorder {
        fn now_ms(&self) -> u64 {
            1_000_000
        }

        fn store(&self) -> &dyn SharedStore {
            &self.store
        }

        fn set_effective_context(&self, context_id: u32) -> bool {
            self.record(Asked::Context(context_id));
            !self.streams_gone.get()
        }

        fn resume_request(&self) {
            self.record(Asked::ResumeRequest);
        }

        fn resume_response(&self) {
            self.record(Asked::Resume);
        }

        fn send_reply(&self, reply: &LocalReply) {
            self.record(Asked::Reply(reply.clone()));
        }

        fn dispatch(&self, call: &HttpCall) -> Option<u32> {
            self.record(Asked::Dispatch(call.kind.clone()));
            if self.refuse_calls.get() {
                return None;
            }
            self.last_token.set(self.last_token.get() + 1);
            Some(self.last_token.get())
        }

        fn count(&self, counter: Counter) {
            self.record(Asked::Count(counter));
        }

        fn log_refusal(&self, line: &str) {
            self.record(Asked::LogRefusal(line.to_owned()));
        }

        fn set_tick_period(&self, period: Duration) {
            self.record(Asked::Tick(period));
        }
    }

    const CONTEXT: u32 = 7;

    /// A recording host and a configuration; the VM's queues start empty (tests on Wasm
    /// share one thread, and with it the queues).
    fn setup(extra: &str) -> (Rc<Recorder>, Rc<Config>) {
        PENDING.with(|p| *p.borrow_mut() = Pending::default());
        (Rc::new(Recorder::default()), Rc::new(config(extra)))
    }

    fn new_stream(host: &Rc<Recorder>, config: &Rc<Config>) -> Rc<RefCell<Stream>> {
        stream_of(host, config, Admission::new())
    }

    fn stream_of(
        host: &Rc<Recorder>,
        config: &Rc<Config>,
        admission: Admission,
    ) -> Rc<RefCell<Stream>> {
        let host: Rc<dyn Host> = Rc::clone(host) as Rc<dyn Host>;
        Rc::new(RefCell::new(Stream::new(
            CONTEXT,
            Rc::clone(config),
            host,
            admission,
        )))
    }

    const NO_LIMIT: &[u8] = br#"{"state":[]}"#;

    // The stream's callbacks, as `host` runs them.

    fn request_body(stream: &Rc<RefCell<Stream>>, body: &[u8]) -> Action {
        Stream::run(stream, Phase::Request, |admission, env| {
            admission.on_request_body(body, env)
        })
    }

    fn response_headers(stream: &Rc<RefCell<Stream>>, status: u32) -> Action {
        Stream::run(stream, Phase::ResponseCallback, |admission, env| {
            admission.on_response_headers(Some(status), false, env)
        })
    }

    fn response_body(stream: &Rc<RefCell<Stream>>, body: &[u8]) -> Action {
        Stream::run(stream, Phase::ResponseCallback, |admission, env| {
            admission.on_response_body(body, env)
        })
    }

    /// The answer to the stream's limit lookup, as the root hands it over.
    fn answer_lookup(stream: &Rc<RefCell<Stream>>, host: &Recorder, config: &Config, body: &[u8]) {
        hand_over(
            Rc::downgrade(stream),
            lookup(),
            Some(200),
            body,
            config,
            host,
        );
    }

    #[test]
    fn a_pass_in_a_response_callback_is_the_callbacks_return_value() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        answer_lookup(&stream, &host, &config, NO_LIMIT);
        host.take();
        // A room without a limit: the 200 passes at its headers.
        assert_eq!(response_headers(&stream, 200), Action::Continue);
        assert_eq!(host.take(), [Asked::Count(Counter::Allowed)]);
        assert!(!stream.borrow().undecided());
    }

    #[test]
    fn a_pass_on_a_call_answer_resumes_the_response_once() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        // The token is held before Synapse answers.
        assert_eq!(response_headers(&stream, 200), Action::Pause);
        assert_eq!(
            response_body(&stream, &issued(&legacy_alias(), "@a:example.com:D")),
            Action::Pause
        );
        host.take();
        answer_lookup(&stream, &host, &config, NO_LIMIT);
        assert_eq!(
            host.take(),
            [
                Asked::Context(CONTEXT),
                Asked::Count(Counter::Allowed),
                Asked::Resume
            ]
        );
        assert!(!stream.borrow().undecided());
    }

    fn rtc_stream(host: &Rc<Recorder>, config: &Rc<Config>) -> Rc<RefCell<Stream>> {
        let admission = Admission::for_route(crate::request::route::Route::Client);
        let stream = stream_of(host, config, admission);
        let headers = crate::request::rtc_request::RtcHeaders {
            user_identifier: Some("@a:example.com".to_owned()),
            ..Default::default()
        };
        Stream::run(&stream, Phase::Request, |admission, env| {
            admission.on_request_headers(headers, env)
        });
        stream
    }

    const RTC_BODY: &[u8] =
        br#"{"room_id":"!room:example.com","slot_id":"s","member_id":"m","url":"wss://x"}"#;

    #[test]
    fn a_matrix_rtc_request_is_held_until_its_decision_then_resumed_once() {
        let (host, config) = setup("");
        let stream = rtc_stream(&host, &config);
        assert!(stream.borrow().holds_request());
        assert_eq!(request_body(&stream, RTC_BODY), Action::Pause);
        host.take();
        answer_lookup(&stream, &host, &config, NO_LIMIT);
        assert_eq!(
            host.take(),
            [
                Asked::Context(CONTEXT),
                Asked::Count(Counter::Allowed),
                Asked::ResumeRequest
            ]
        );
        // No limit: nothing to watch, the answer streams through.
        assert!(!stream.borrow().undecided());
    }

    #[test]
    fn a_matrix_rtc_decision_known_at_once_lets_the_body_callback_continue() {
        let (host, config) = setup("");
        let stream = rtc_stream(&host, &config);
        limit_cache::LIMITS
            .store_answer(
                host.store(),
                "!room:example.com",
                Limit::None,
                host.now_ms(),
                limit_cache::Lifetimes {
                    ttl_ms: 60_000,
                    stale_ms: 0,
                },
            )
            .unwrap();
        assert_eq!(request_body(&stream, RTC_BODY), Action::Continue);
        assert!(!host.take().contains(&Asked::ResumeRequest));
    }

    #[test]
    fn a_call_answer_for_a_stream_the_host_has_closed_makes_no_host_call() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        response_headers(&stream, 200);
        response_body(&stream, &issued(&legacy_alias(), "@a:example.com:D"));
        host.take();
        host.streams_gone.set(true);
        answer_lookup(&stream, &host, &config, NO_LIMIT);
        assert_eq!(host.take(), [Asked::Context(CONTEXT)]);
    }

    #[test]
    fn a_reply_is_sent_and_what_follows_streams_through() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        // A body the guard cannot read, for which lk-jwt-service still issues a token.
        request_body(&stream, br#"{"room":5}"#);
        assert_eq!(response_headers(&stream, 200), Action::Pause);
        host.take();
        let action = response_body(&stream, &issued(&legacy_alias(), "x"));
        assert_eq!(
            action,
            Action::Pause,
            "the local reply replaces the response"
        );
        assert_eq!(
            host.take(),
            [
                Asked::Count(Counter::Unreadable),
                Asked::Reply(reply::unreadable_request())
            ]
        );
        assert!(!stream.borrow().undecided());
        // Later callbacks and answers no longer reach the admission.
        let reached = Cell::new(false);
        let action = Stream::run(&stream, Phase::ResponseCallback, |_, _| {
            reached.set(true);
            vec![Effect::PassResponse]
        });
        assert_eq!(action, Action::Continue);
        answer_lookup(&stream, &host, &config, NO_LIMIT);
        assert!(!reached.get());
        assert_eq!(host.take(), []);
    }

    /// A stream whose held token is decided on the room's cached participant list, which is
    /// missing, so that the decision needs a LiveKit call from the response body callback.
    fn held_until_livekit(extra: &str) -> (Rc<Recorder>, Rc<Config>, Rc<RefCell<Stream>>) {
        let (host, config) = setup(extra);
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        answer_lookup(&stream, &host, &config, &limit_answer(2));
        assert_eq!(response_headers(&stream, 200), Action::Pause);
        host.take();
        (host, config, stream)
    }

    #[test]
    fn a_refused_call_in_a_response_callback_fails_open_by_resuming() {
        let (host, _config, stream) = held_until_livekit("");
        host.refuse_calls.set(true);
        let action = response_body(&stream, &issued(&legacy_alias(), "@a:example.com:D"));
        // The refused call is answered as failed on the spot, as on a call's answer: the
        // response is resumed, and the callback itself returns Pause.
        assert_eq!(action, Action::Pause);
        assert_eq!(
            host.take(),
            [
                Asked::Count(Counter::LivekitLookups),
                Asked::Dispatch(CallKind::ListParticipants(legacy_alias())),
                Asked::Context(CONTEXT),
                Asked::Count(Counter::FailOpen),
                Asked::Resume
            ]
        );
        assert!(!stream.borrow().undecided());
        assert!(PENDING.with(|p| p.borrow().calls.is_empty()));
    }

    #[test]
    fn a_refused_call_in_a_response_callback_fails_closed_with_a_reply() {
        let (host, _config, stream) = held_until_livekit(r#", "failure_mode": "closed""#);
        host.refuse_calls.set(true);
        let action = response_body(&stream, &issued(&legacy_alias(), "@a:example.com:D"));
        assert_eq!(action, Action::Pause);
        assert_eq!(
            host.take(),
            [
                Asked::Count(Counter::LivekitLookups),
                Asked::Dispatch(CallKind::ListParticipants(legacy_alias())),
                Asked::Context(CONTEXT),
                Asked::Count(Counter::FailClosed),
                Asked::Reply(reply::check_failed())
            ]
        );
        assert!(!stream.borrow().undecided());
    }

    #[test]
    fn a_refused_call_while_the_request_is_read_is_answered_in_that_phase() {
        let (host, config) = setup(r#", "participants_cache_ms": 0"#);
        // A first request leaves the room's limit in the cache.
        let first = new_stream(&host, &config);
        request_body(&first, &legacy_body("@a:example.com", "D"));
        answer_lookup(&first, &host, &config, &limit_answer(2));
        host.take();
        // The next one asks LiveKit early, while its request is read; the host refuses.
        host.refuse_calls.set(true);
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@b:example.com", "D"));
        assert_eq!(
            host.take(),
            [
                Asked::Count(Counter::TokenRequests),
                Asked::Count(Counter::LimitCacheHits),
                Asked::Count(Counter::LivekitLookups),
                Asked::Dispatch(CallKind::ListParticipants(legacy_alias())),
            ],
            "no context switch inside the stream's own callback"
        );
        // The failure decides when the token comes, in the response callback.
        assert_eq!(response_headers(&stream, 200), Action::Pause);
        assert_eq!(
            response_body(&stream, &issued(&legacy_alias(), "@b:example.com:D")),
            Action::Continue
        );
        assert_eq!(host.take(), [Asked::Count(Counter::FailOpen)]);
    }

    #[test]
    fn a_limit_lookup_is_left_to_the_root() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        // A legacy request goes on at once; the lookups run while lk-jwt-service works.
        assert_eq!(
            request_body(&stream, &legacy_body("@a:example.com", "D")),
            Action::Continue
        );
        assert_eq!(
            host.take(),
            [
                Asked::Count(Counter::TokenRequests),
                Asked::Count(Counter::SynapseLookups),
                Asked::Tick(LOOKUP_DELAY)
            ]
        );
        let lookups = take_lookups();
        assert_eq!(lookups.len(), 1);
        assert!(Weak::ptr_eq(&lookups[0].0, &Rc::downgrade(&stream)));
        assert_eq!(lookups[0].1.kind, lookup());
    }

    #[test]
    fn await_shared_limit_queues_the_stream_for_the_tick() {
        let (host, config) = setup("");
        let first = new_stream(&host, &config);
        request_body(&first, &legacy_body("@a:example.com", "D"));
        // A second request for the room while the first one's lookup is out.
        let second = new_stream(&host, &config);
        request_body(&second, &legacy_body("@b:example.com", "D"));
        response_headers(&second, 200);
        host.take();
        assert!(!any_waiting());
        let action = response_body(&second, &issued(&legacy_alias(), "@b:example.com:D"));
        assert_eq!(action, Action::Pause);
        assert_eq!(host.take(), [Asked::Tick(WAIT_POLL)]);
        assert!(any_waiting());
        let waiting = take_waiting();
        assert_eq!(waiting.len(), 1);
        assert!(Weak::ptr_eq(&waiting[0], &Rc::downgrade(&second)));
        assert!(second.borrow().undecided());
    }

    #[test]
    fn an_accepted_call_is_routed_back_by_its_token() {
        let (host, config) = setup(r#", "participants_cache_ms": 0"#);
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        answer_lookup(&stream, &host, &config, &limit_answer(2));
        let token = host.last_token.get();
        assert_eq!(token, 1);
        let (owner, kind) = take_call(token).unwrap();
        assert!(Weak::ptr_eq(&owner, &Rc::downgrade(&stream)));
        assert_eq!(kind, CallKind::ListParticipants(legacy_alias()));
        assert!(take_call(token).is_none());
    }

    #[test]
    fn calls_of_ended_streams_are_forgotten_but_lookups_are_kept() {
        let (host, config) = setup("");
        let ended = Rc::downgrade(&new_stream(&host, &config));
        let live = new_stream(&host, &config);
        expect_answer(1, &ended, CallKind::ListParticipants(legacy_alias()));
        expect_answer(2, &ended, lookup());
        expect_answer(
            3,
            &Rc::downgrade(&live),
            CallKind::ListParticipants(legacy_alias()),
        );
        assert!(take_call(1).is_none());
        assert_eq!(take_call(2).map(|(_, kind)| kind), Some(lookup()));
        assert!(take_call(3).is_some());
    }

    #[test]
    fn an_answer_for_an_ended_stream_is_cached_all_the_same() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        request_body(&stream, &legacy_body("@a:example.com", "D"));
        let gone = Rc::downgrade(&stream);
        drop(stream);
        host.take();
        hand_over(gone, lookup(), Some(200), &limit_answer(3), &config, &*host);
        assert_eq!(host.take(), []);
        assert_eq!(
            limit_cache::LIMITS.peek(&host.store, ROOM, host.now_ms()),
            Some(Cached::Known(Limit::MaxUsers(3, None)))
        );
    }

    #[test]
    fn counts_and_refusal_lines_go_to_the_host_and_decide_nothing() {
        let (host, config) = setup("");
        let stream = new_stream(&host, &config);
        let action = Stream::run(&stream, Phase::ResponseCallback, |_, _| {
            let mut effects: Vec<Effect> = Counter::ALL.into_iter().map(Effect::Count).collect();
            effects.push(Effect::LogRefusal("room !r: refused @u".into()));
            effects
        });
        assert_eq!(action, Action::Pause);
        let mut expected: Vec<Asked> = Counter::ALL.into_iter().map(Asked::Count).collect();
        expected.push(Asked::LogRefusal("room !r: refused @u".into()));
        assert_eq!(host.take(), expected);
        assert!(stream.borrow().undecided());
    }
}
