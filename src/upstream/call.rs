//! What the two services the guard calls have in common: the request it sends (built by
//! [`crate::upstream::synapse`] and [`crate::upstream::livekit`], which know their APIs) and the ways an answer
//! can be unusable.

use std::fmt;

/// One HTTP request to a service; the caller adds the cluster, `:authority` and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    /// Regular headers (the pseudo-headers come from `method` and `path`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The service an answer came from, as log lines name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Synapse,
    LiveKit,
}

/// Why an answer gave nothing the guard can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No `:status` at all: the call was reset, refused or timed out.
    NoResponse(Service),
    /// An HTTP status the service does not answer a good request with.
    Status(Service, u32),
    /// A 200 whose body is not what the API returns.
    BadBody(Service),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |service: &Service| match service {
            Service::Synapse => "Synapse",
            Service::LiveKit => "LiveKit",
        };
        match self {
            CallError::NoResponse(service) => write!(f, "{} gave no response", name(service)),
            CallError::Status(service, status) => {
                write!(f, "{} answered HTTP {status}", name(service))
            }
            CallError::BadBody(Service::Synapse) => {
                f.write_str("Synapse's answer is not a state list")
            }
            CallError::BadBody(Service::LiveKit) => {
                f.write_str("LiveKit's answer is not a participant list")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn errors_name_the_service() {
        assert_eq!(
            CallError::Status(Service::LiveKit, 401).to_string(),
            "LiveKit answered HTTP 401"
        );
        assert_eq!(
            CallError::NoResponse(Service::Synapse).to_string(),
            "Synapse gave no response"
        );
        assert_eq!(
            CallError::BadBody(Service::Synapse).to_string(),
            "Synapse's answer is not a state list"
        );
    }
}
