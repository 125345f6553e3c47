//! What every role of the adapter reads of the proxy and keeps in it: headers and buffers
//! (as bytes: the SDK's string getters panic on values that are not UTF-8), the clock, the
//! metrics and the shared data with the gauges that account for it.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::counter::Counter;
use crate::state::store::{Held, SharedStore, StoreError};

/// Metric ids, defined once per VM (every VM copy gets the same shared counters).
pub(crate) struct Metrics {
    counters: Vec<(Counter, u32)>,
    pub(crate) shared_keys: Option<u32>,
    shared_bytes: Option<u32>,
    shared_entries: Option<u32>,
}

impl Metrics {
    pub(crate) fn define() -> Metrics {
        let counters = Counter::ALL
            .iter()
            .filter_map(|&c| {
                hostcalls::define_metric(MetricType::Counter, counter_name(c))
                    .ok()
                    .map(|id| (c, id))
            })
            .collect();
        let gauge = |name| hostcalls::define_metric(MetricType::Gauge, name).ok();
        Metrics {
            counters,
            shared_keys: gauge("voice_limit_guard.shared_data_keys"),
            shared_bytes: gauge("voice_limit_guard.shared_data_bytes"),
            shared_entries: gauge("voice_limit_guard.shared_data_entries"),
        }
    }

    pub(crate) fn count(&self, counter: Counter) {
        if let Some((_, id)) = self.counters.iter().find(|(c, _)| *c == counter) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

/// The exported name of a counter.
fn counter_name(counter: Counter) -> &'static str {
    match counter {
        Counter::TokenRequests => "voice_limit_guard.token_requests",
        Counter::Allowed => "voice_limit_guard.allowed",
        Counter::Blocked => "voice_limit_guard.blocked",
        Counter::FailOpen => "voice_limit_guard.fail_open",
        Counter::FailClosed => "voice_limit_guard.fail_closed",
        Counter::SynapseLookups => "voice_limit_guard.synapse_lookups",
        Counter::LimitCacheHits => "voice_limit_guard.limit_cache_hits",
        Counter::LivekitLookups => "voice_limit_guard.livekit_lookups",
        Counter::LivekitCacheHits => "voice_limit_guard.livekit_cache_hits",
        Counter::Unreadable => "voice_limit_guard.unreadable_requests",
        Counter::StaleLimits => "voice_limit_guard.stale_limits",
        Counter::Untrusted => "voice_limit_guard.untrusted_requests",
        Counter::Relayed => "voice_limit_guard.relayed_requests",
        Counter::Released => "voice_limit_guard.released_reservations",
        Counter::Abandoned => "voice_limit_guard.abandoned_reservations",
        Counter::Rekeyed => "voice_limit_guard.rekeyed_reservations",
        Counter::TokenMismatches => "voice_limit_guard.token_mismatches",
        Counter::PowerLevelLookups => "voice_limit_guard.power_level_lookups",
        Counter::OpenidLookups => "voice_limit_guard.openid_lookups",
        Counter::UnverifiedRequesters => "voice_limit_guard.unverified_requesters",
        Counter::OversizedRequests => "voice_limit_guard.oversized_requests",
        Counter::CapacityRefusals => "voice_limit_guard.capacity_refusals",
        Counter::LookupsOverBudget => "voice_limit_guard.lookups_over_budget",
        Counter::StaleOverBudget => "voice_limit_guard.stale_limits_over_budget",
        Counter::CoolingRefusals => "voice_limit_guard.cooling_refusals",
        Counter::OpenidCacheHits => "voice_limit_guard.openid_cache_hits",
        Counter::ExemptAdmissions => "voice_limit_guard.exempt_admissions",
        Counter::WebhooksReceived => "voice_limit_guard.webhooks_received",
        Counter::WebhooksAccepted => "voice_limit_guard.webhooks_accepted",
        Counter::WebhooksRefused => "voice_limit_guard.webhooks_refused",
        Counter::WebhooksUnreadable => "voice_limit_guard.webhooks_unreadable",
        Counter::LivekitLookupsAvoided => "voice_limit_guard.livekit_lookups_avoided",
    }
}

/// Refusals are logged at most once a second per worker, with a count of those not logged:
/// a client retrying against a full room must not flood the proxy's log.
pub(crate) fn log_refusal(now_ms: u64, line: &str) {
    thread_local! {
        static LAST: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    LAST.with(|last| {
        let (logged_at, suppressed) = last.get();
        if now_ms.saturating_sub(logged_at) < 1000 && logged_at != 0 {
            last.set((logged_at, suppressed + 1));
            return;
        }
        if suppressed > 0 {
            log::info!("{line} (and {suppressed} more refusals in the last seconds)");
        } else {
            log::info!("{line}");
        }
        last.set((now_ms, 0));
    });
}

/// The host's shared data, plus the gauges that account for what the guard keeps there.
pub(crate) struct HostStore {
    pub(crate) metrics: Rc<Metrics>,
}

impl HostStore {
    pub(crate) fn new(metrics: &Rc<Metrics>) -> HostStore {
        HostStore {
            metrics: Rc::clone(metrics),
        }
    }
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

    fn account(&self, held: Held) {
        let gauges = [
            (self.metrics.shared_keys, held.keys),
            (self.metrics.shared_bytes, held.bytes),
            (self.metrics.shared_entries, held.entries),
        ];
        for (gauge, delta) in gauges {
            if let (Some(id), true) = (gauge, delta != 0) {
                let _ = hostcalls::increment_metric(id, delta);
            }
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The path of the request whose headers are being read, if it is a POST: the only method of
/// token requests and LiveKit's webhooks. Anything else is told apart by one header read.
pub(crate) fn posted_path() -> Option<String> {
    if header(MapType::HttpRequestHeaders, ":method").as_deref() != Some(b"POST") {
        return None;
    }
    let path = header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
    Some(String::from_utf8_lossy(&path).into_owned())
}

pub(crate) fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

pub(crate) fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}
