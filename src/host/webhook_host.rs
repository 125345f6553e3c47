//! The host adapter of LiveKit's webhooks ([`crate::upstream::webhook`]): a POST to `webhooks.path` is
//! read as it streams past, never held, and goes on to lk-jwt-service unchanged; with
//! `webhooks.answer` the guard holds its body and answers it itself (200, or 401 for a webhook
//! without LiveKit's signature), and the body never reaches the upstream. The headers go
//! upstream in both modes (holding them would stall hosts without
//! `allow_on_headers_stop_iteration`), so the path must lead to an upstream that reads a
//! request's body before it answers, as lk-jwt-service does: once an answer that came on the
//! headers alone is complete, Envoy passes no more of the request through the filter. Such an
//! answer makes the webhook unreadable (every view in doubt), in either mode.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::config::Config;
use crate::host::calls::{buffer, header, now_ms, HostStore, Metrics};
use crate::upstream::webhook::{self, Intake, Received};

pub struct WebhookStream {
    /// Until the body is complete.
    intake: Option<Intake>,
    answer: bool,
    metrics: Rc<Metrics>,
}

impl WebhookStream {
    /// A stream for the POST to `path` whose headers are being read, if it is a webhook: one
    /// to the webhook path. A webhook without a body is taken at once.
    pub fn start(
        config: &Config,
        metrics: &Rc<Metrics>,
        path: &str,
        end_of_stream: bool,
    ) -> Option<(WebhookStream, Action)> {
        let webhooks = config.webhooks.as_ref()?;
        if !config.is_webhook_path(path) {
            return None;
        }
        let authorization = header(MapType::HttpRequestHeaders, "authorization");
        let intake = Intake::new(
            authorization.as_deref(),
            config.livekit.api_key.expose(),
            config.livekit.api_secret.expose(),
            now_ms() / 1000,
        );
        let mut stream = WebhookStream {
            intake: Some(intake),
            answer: webhooks.answer,
            metrics: Rc::clone(metrics),
        };
        // The headers go on in both modes: a pause here would stall the stream in hosts that
        // leave `allow_on_headers_stop_iteration` off.
        let action = if end_of_stream {
            stream.finish()
        } else {
            Action::Continue
        };
        Some((stream, action))
    }

    pub fn on_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(intake) = &mut self.intake else {
            return Action::Continue;
        };
        if !self.answer {
            // Each part goes on as it comes: the buffer holds just this part.
            intake.feed(&buffer(BufferType::HttpRequestBody, body_size));
            return if end_of_stream {
                self.finish()
            } else {
                Action::Continue
            };
        }
        if !end_of_stream {
            return Action::Pause; // buffered by the host until the end
        }
        intake.feed(&buffer(BufferType::HttpRequestBody, body_size));
        self.finish()
    }

    /// A body that ends with trailers is complete here.
    pub fn on_trailers(&mut self) -> Action {
        if self.answer {
            if let Some(intake) = &mut self.intake {
                intake.feed(&buffer(BufferType::HttpRequestBody, usize::MAX));
            }
        }
        self.finish()
    }

    /// The upstream's answer. One that comes before the whole body did ends what the filter
    /// sees of the request: the webhook is not read, and every view is put in doubt.
    pub fn on_response(&mut self) -> Action {
        if let Some(intake) = self.intake.take() {
            self.settle(&intake.cut_short());
        }
        Action::Continue
    }

    fn settle(&self, received: &Received) {
        let store = HostStore::new(&self.metrics);
        for counter in webhook::settle(received, &store, now_ms()) {
            self.metrics.count(counter);
        }
    }

    fn finish(&mut self) -> Action {
        let Some(intake) = self.intake.take() else {
            return Action::Continue;
        };
        let received = intake.finish();
        self.settle(&received);
        if !self.answer {
            return Action::Continue;
        }
        let status = match received {
            Received::Refused(_) => 401,
            Received::Read(_) | Received::Unreadable(_) => 200,
        };
        let _ = hostcalls::send_http_response(status, vec![("content-length", "0")], None);
        Action::Pause
    }
}
