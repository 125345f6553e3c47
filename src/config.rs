//! The plugin configuration operators write (the Wasm filter's `configuration` JSON).
//!
//! Parsing is strict: a missing required key, a wrong type or an unknown key is an error that
//! names the key, so Envoy refuses the configuration instead of running a guard that silently
//! does nothing. serde reads the JSON into the structs of `raw` (what operators write, with
//! unknown keys denied); the checks that need more than types (secrets from the environment,
//! token paths, the header name) turn them into [`Config`] or [`EdgeConfig`]. Secrets may be named through environment variables (`<field>_env`) that
//! Envoy hands to the VM, which keeps them out of config dumps; neither form is ever logged.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::request::key_path::key_path_at;
use crate::request::route::{self, Route};
use crate::request::secret::Secret;

/// Where an upstream API is reached from Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Envoy cluster name for `dispatch_http_call`.
    pub cluster: String,
    /// `:authority` of the calls; defaults to the cluster name.
    pub authority: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynapseConfig {
    pub upstream: Upstream,
    pub admin_token: Secret,
    /// The application service's `hs_token`: Synapse's bearer token on the MatrixRTC routes
    /// it forwards. When set, only requests carrying it are trusted to name their requester.
    pub hs_token: Option<Secret>,
    /// The homeserver's own server name: the OpenID tokens of its users can be checked with
    /// its userinfo endpoint (`/sfu/get` decided on the request).
    pub server_name: Option<String>,
    /// Limit lookups for rooms the guard has not seen, per second, for the whole Envoy process
    /// (0: no budget). Past it, such requests are answered 429 until the budget refills.
    pub max_lookups_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveKitConfig {
    pub upstream: Upstream,
    pub api_key: Secret,
    pub api_secret: Secret,
}

/// What the guard does when it cannot complete a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Let the token through: calls keep working while the guard is degraded.
    Open,
    /// Answer 503 `M_UNKNOWN`: the limit is never exceeded, at the price of refused joins.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub synapse: SynapseConfig,
    pub livekit: LiveKitConfig,
    pub token_paths: Vec<String>,
    pub limit_state_type: String,
    pub limit_cache_ttl: Duration,
    /// How long a limit seen before is still enforced when Synapse cannot be asked.
    pub stale_limit: Duration,
    pub failure_mode: FailureMode,
    /// How long an admitted user who has not shown up in LiveKit still holds a place.
    pub reservation: Duration,
    /// How long LiveKit's participant list of a room is reused (zero: asked for every token).
    pub participants_cache: Duration,
    /// The power level that lets a user into a full room; `None`: each room's level to send
    /// the limit event.
    pub exempt_power_level: Option<i64>,
    /// When a legacy-route request is decided (MatrixRTC requests always are on the request).
    pub decision_phase: DecisionPhase,
    /// LiveKit's webhooks, when LiveKit sends them through this Envoy.
    pub webhooks: Option<WebhookConfig>,
}

/// Where the guard reads LiveKit's webhooks, and how far it trusts what they tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The path LiveKit posts to (compared without the query).
    pub path: String,
    /// The guard answers the webhooks itself (200) instead of passing them on to
    /// lk-jwt-service (for versions that take none).
    pub answer: bool,
    /// How long a room's participants, known from a list and the events since, are trusted
    /// without asking LiveKit again.
    pub verify: Duration,
}

/// When the guard decides on a legacy-route (`/sfu/get`, `/get_token`) token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionPhase {
    /// Once the request body is read, before lk-jwt-service sees it: the requester is the
    /// body's claimed user (`/get_token`) or the OpenID token's user, asked of Synapse
    /// (`/sfu/get`). Needs nothing of the host beyond body buffering: works in every host.
    Request,
    /// On lk-jwt-service's 200, reading the token it issued. Holds the response headers, so
    /// the host must honour `allow_on_headers_stop_iteration: true` (Envoy 1.35+, set by hand).
    Response,
}

/// The routing-only configuration: an edge Envoy in front of several guard replicas names
/// each token request's room in a header, so that consistent hashing on it sends all token
/// requests of a room to one replica (whose guard then sees the whole room).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    /// The request header that carries the room key (set or overwritten; removed from
    /// every other request, so a client can never choose its replica).
    pub room_header: String,
    pub token_paths: Vec<String>,
}

impl EdgeConfig {
    /// The token route of a request path, if it is one (see [`crate::request::route`]).
    pub fn route_of(&self, path: &str) -> Option<Route> {
        route::classify(&self.token_paths, path)
    }
}

/// What a copy of the module does, chosen by the configuration's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `synapse` and `livekit` given: enforce limits.
    Guard(Box<Config>),
    /// `room_header` given instead: route token requests by room, call nothing.
    Edge(EdgeConfig),
}

impl Role {
    /// Parses the plugin configuration (`env` as for [`Config::parse`]).
    pub fn parse(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Role, ConfigError> {
        let mut raw: raw::Plugin = read(json)?;
        match raw.room_header.take() {
            Some(room_header) => EdgeConfig::from_raw(room_header, raw).map(Role::Edge),
            None => Config::from_raw(raw, env).map(|config| Role::Guard(Box::new(config))),
        }
    }
}

pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// The default budget of limit lookups per second and process.
pub const DEFAULT_MAX_LOOKUPS_PER_SECOND: u32 = 100;
pub const DEFAULT_LIMIT_CACHE_TTL_SECONDS: u64 = 10;
pub const DEFAULT_STALE_LIMIT_SECONDS: u64 = 3600;
pub const DEFAULT_RESERVATION_SECONDS: u64 = 30;
pub const DEFAULT_PARTICIPANTS_CACHE_MS: u64 = 1000;
pub const DEFAULT_LIMIT_STATE_TYPE: &str = "io.lotus.voice_limit";
pub const DEFAULT_TOKEN_PATHS: [&str; 2] = ["/sfu/get", "/get_token"];
/// Where current lk-jwt-service versions take LiveKit's webhooks.
pub const DEFAULT_WEBHOOK_PATH: &str = "/sfu_webhook";
pub const DEFAULT_WEBHOOK_VERIFY_SECONDS: u64 = 60;

/// A configuration error, naming the offending key (never a secret's value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Reads `json` as `T`; an error names the key path where reading stopped (`synapse.cluster`,
/// `token_paths[1]`; `configuration` for the document itself).
fn read<T: DeserializeOwned>(json: &[u8]) -> Result<T, ConfigError> {
    let not_json =
        |e: serde_json::Error| ConfigError(format!("configuration is not valid JSON: {e}"));
    // serde would also read a struct from an array (its fields in order).
    if crate::request::json::first_byte(json).is_some_and(|b| b != b'{') {
        return err("configuration: expected a JSON object");
    }
    let e = match serde_json::from_slice(json) {
        Ok(value) => return Ok(value),
        Err(e) if e.is_syntax() || e.is_eof() => return Err(not_json(e)),
        Err(e) => e,
    };
    // The error's message without the position serde_json appends.
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = message.strip_suffix(&position).unwrap_or(&message);
    let offset = offset_of(json, e.line(), e.column());
    match key_path_at(json, offset, message.starts_with("duplicate field")).as_str() {
        "." => err(format!("configuration: {message}")),
        path => err(format!("{path}: {message}")),
    }
}

/// The byte offset of serde_json's error position (`line` from 1; `column`, bytes into it).
fn offset_of(json: &[u8], line: usize, column: usize) -> usize {
    let lines_before = json.split(|b| *b == b'\n').take(line.saturating_sub(1));
    lines_before.map(|text| text.len() + 1).sum::<usize>() + column
}

/// The configuration as written: every key optional to serde, so that a missing one is
/// reported in the guard's own words; unknown keys are errors.
mod raw {
    use serde::Deserialize;

    /// Both roles' keys: a guard's, and `room_header` for an edge (whose other key,
    /// `token_paths`, the guard shares). One struct, so the document is read once.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Plugin {
        pub room_header: Option<String>,
        pub synapse: Option<Synapse>,
        pub livekit: Option<LiveKit>,
        pub token_paths: Option<Vec<String>>,
        pub limit_state_type: Option<String>,
        pub limit_cache_ttl_seconds: Option<u64>,
        pub stale_limit_seconds: Option<u64>,
        pub failure_mode: Option<FailureMode>,
        pub reservation_seconds: Option<u64>,
        pub participants_cache_ms: Option<u64>,
        pub exempt_power_level: Option<i64>,
        pub decision_phase: Option<DecisionPhase>,
        pub webhooks: Option<Webhooks>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Webhooks {
        pub path: Option<String>,
        pub answer: Option<bool>,
        pub verify_seconds: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Synapse {
        pub cluster: Option<String>,
        pub authority: Option<String>,
        pub timeout_ms: Option<u64>,
        pub admin_token: Option<String>,
        pub admin_token_env: Option<String>,
        pub hs_token: Option<String>,
        pub hs_token_env: Option<String>,
        pub server_name: Option<String>,
        pub max_lookups_per_second: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct LiveKit {
        pub cluster: Option<String>,
        pub authority: Option<String>,
        pub timeout_ms: Option<u64>,
        pub api_key: Option<String>,
        pub api_key_env: Option<String>,
        pub api_secret: Option<String>,
        pub api_secret_env: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum FailureMode {
        Open,
        Closed,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum DecisionPhase {
        Request,
        Response,
    }
}

impl Config {
    /// Parses the plugin configuration. `env` looks up the environment variables named by
    /// `*_env` keys (the process environment inside Envoy, a map in tests).
    pub fn parse(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let raw: raw::Plugin = read(json)?;
        if raw.room_header.is_some() {
            return err("room_header: a guard has no room_header (an edge's key, see Role::parse)");
        }
        Config::from_raw(raw, env)
    }

    fn from_raw(
        raw: raw::Plugin,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let Some(synapse) = raw.synapse else {
            return err("synapse is required");
        };
        let Some(livekit) = raw.livekit else {
            return err("livekit is required");
        };
        let synapse = SynapseConfig {
            upstream: upstream(
                "synapse",
                synapse.cluster,
                synapse.authority,
                synapse.timeout_ms,
            )?,
            admin_token: secret(
                "synapse.admin_token",
                synapse.admin_token,
                synapse.admin_token_env,
                env,
            )?,
            hs_token: match (synapse.hs_token, synapse.hs_token_env) {
                (None, None) => None,
                (inline, from_env) => Some(secret("synapse.hs_token", inline, from_env, env)?),
            },
            server_name: match synapse.server_name {
                Some(name) if name.is_empty() || name.contains(['/', '@', ' ']) => {
                    return err(format!(
                        "synapse.server_name: expected a Matrix server name, got {name:?}"
                    ))
                }
                name => name,
            },
            max_lookups_per_second: synapse
                .max_lookups_per_second
                .unwrap_or(DEFAULT_MAX_LOOKUPS_PER_SECOND),
        };
        let livekit = LiveKitConfig {
            upstream: upstream(
                "livekit",
                livekit.cluster,
                livekit.authority,
                livekit.timeout_ms,
            )?,
            api_key: secret("livekit.api_key", livekit.api_key, livekit.api_key_env, env)?,
            api_secret: secret(
                "livekit.api_secret",
                livekit.api_secret,
                livekit.api_secret_env,
                env,
            )?,
        };
        let limit_state_type = raw
            .limit_state_type
            .unwrap_or_else(|| DEFAULT_LIMIT_STATE_TYPE.to_owned());
        if limit_state_type.is_empty() {
            return err("limit_state_type: must not be empty");
        }
        let token_paths = token_paths(raw.token_paths)?;
        let webhooks = match raw.webhooks {
            Some(webhooks) => Some(webhook_config(webhooks, &token_paths)?),
            None => None,
        };
        let reservation_seconds = raw
            .reservation_seconds
            .unwrap_or(DEFAULT_RESERVATION_SECONDS);
        if reservation_seconds == 0 {
            return err("reservation_seconds: expected an integer >= 1, got 0");
        }
        Ok(Config {
            synapse,
            livekit,
            token_paths,
            limit_state_type,
            limit_cache_ttl: Duration::from_secs(
                raw.limit_cache_ttl_seconds
                    .unwrap_or(DEFAULT_LIMIT_CACHE_TTL_SECONDS),
            ),
            stale_limit: Duration::from_secs(
                raw.stale_limit_seconds
                    .unwrap_or(DEFAULT_STALE_LIMIT_SECONDS),
            ),
            failure_mode: match raw.failure_mode {
                None | Some(raw::FailureMode::Open) => FailureMode::Open,
                Some(raw::FailureMode::Closed) => FailureMode::Closed,
            },
            reservation: Duration::from_secs(reservation_seconds),
            participants_cache: Duration::from_millis(
                raw.participants_cache_ms
                    .unwrap_or(DEFAULT_PARTICIPANTS_CACHE_MS),
            ),
            exempt_power_level: raw.exempt_power_level,
            decision_phase: match raw.decision_phase {
                None | Some(raw::DecisionPhase::Request) => DecisionPhase::Request,
                Some(raw::DecisionPhase::Response) => DecisionPhase::Response,
            },
            webhooks,
        })
    }

    /// Whether a request path is where LiveKit posts its webhooks.
    pub fn is_webhook_path(&self, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.webhooks.as_ref().is_some_and(|w| w.path == path)
    }

    /// The token route of a request path (query string ignored), if it is one.
    ///
    /// lk-jwt-service's Go router unescapes the path before matching, so `/s%66u/get` reaches
    /// the token handler; the decoded path is compared too, or such a request would pass
    /// unguarded. Matching a few paths that the router then refuses costs nothing.
    pub fn route_of(&self, path: &str) -> Option<Route> {
        route::classify(&self.token_paths, path)
    }
}

impl EdgeConfig {
    fn from_raw(room_header: String, raw: raw::Plugin) -> Result<EdgeConfig, ConfigError> {
        // Every key is named here (no `..`): a key added to the guard must be placed too.
        let raw::Plugin {
            room_header: _,
            synapse,
            livekit,
            token_paths: paths,
            limit_state_type,
            limit_cache_ttl_seconds,
            stale_limit_seconds,
            failure_mode,
            reservation_seconds,
            participants_cache_ms,
            exempt_power_level,
            decision_phase,
            webhooks,
        } = raw;
        for (upstream, given) in [
            ("synapse", synapse.is_some()),
            ("livekit", livekit.is_some()),
        ] {
            if given {
                return err(format!(
                    "room_header and {upstream}: an edge (room_header) only routes and a guard \
                     (synapse, livekit) only enforces; configure them in separate filters"
                ));
            }
        }
        let guard_only = [
            ("limit_state_type", limit_state_type.is_some()),
            ("limit_cache_ttl_seconds", limit_cache_ttl_seconds.is_some()),
            ("stale_limit_seconds", stale_limit_seconds.is_some()),
            ("failure_mode", failure_mode.is_some()),
            ("reservation_seconds", reservation_seconds.is_some()),
            ("participants_cache_ms", participants_cache_ms.is_some()),
            ("exempt_power_level", exempt_power_level.is_some()),
            ("decision_phase", decision_phase.is_some()),
            ("webhooks", webhooks.is_some()),
        ];
        if let Some((key, _)) = guard_only.iter().find(|(_, given)| *given) {
            return err(format!(
                "{key}: unknown field `{key}` for an edge, expected `room_header` or `token_paths`"
            ));
        }
        check_header_name(&room_header)?;
        Ok(EdgeConfig {
            room_header,
            token_paths: token_paths(paths)?,
        })
    }
}

/// A header a route's hash policy can use and Envoy lets a filter set: lowercase token
/// characters, and none of the headers that frame or address the request.
fn check_header_name(name: &str) -> Result<(), ConfigError> {
    const RESERVED: [&str; 8] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "proxy-connection",
    ];
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !token || RESERVED.contains(&name) {
        return err(format!(
            "room_header: expected a lowercase header name (a-z, 0-9, '-', '_') that does not \
             frame or address the request, got {name:?}"
        ));
    }
    Ok(())
}

fn upstream(
    name: &str,
    cluster: Option<String>,
    authority: Option<String>,
    timeout_ms: Option<u64>,
) -> Result<Upstream, ConfigError> {
    let cluster = match cluster {
        None => return err(format!("{name}.cluster is required")),
        Some(cluster) if cluster.is_empty() => {
            return err(format!("{name}.cluster: must not be empty"))
        }
        Some(cluster) => cluster,
    };
    let timeout_ms = timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        return err(format!(
            "{name}.timeout_ms: expected an integer >= 1, got 0"
        ));
    }
    Ok(Upstream {
        authority: authority.unwrap_or_else(|| cluster.clone()),
        cluster,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// A secret given inline as `field` or through the environment variable named by `field_env`.
fn secret(
    field: &str,
    inline: Option<String>,
    from_env: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let value = match (inline, from_env) {
        (Some(_), Some(_)) => {
            return err(format!("{field} and {field}_env: give only one of them"))
        }
        (Some(value), None) => value,
        (None, Some(var)) => match env(&var) {
            Some(value) => value,
            None => {
                return err(format!(
                    "{field}_env: environment variable {var:?} is not set in the Wasm VM \
                     (list it in vm_config.environment_variables.host_env_keys)"
                ))
            }
        },
        (None, None) => return err(format!("{field} (or {field}_env) is required")),
    };
    if value.is_empty() {
        return err(format!("{field}: must not be empty"));
    }
    Ok(Secret::new(value))
}

fn webhook_config(
    raw: raw::Webhooks,
    token_paths: &[String],
) -> Result<WebhookConfig, ConfigError> {
    let path = raw.path.unwrap_or_else(|| DEFAULT_WEBHOOK_PATH.to_owned());
    if !path.starts_with('/') || path.contains(['?', '#']) {
        return err(format!(
            "webhooks.path: expected a path starting with '/' and without a query, got {path:?}"
        ));
    }
    if route::classify(token_paths, &path).is_some() {
        return err(format!(
            "webhooks.path: {path:?} is a token route; LiveKit's webhooks need a path of their own"
        ));
    }
    let verify_seconds = raw.verify_seconds.unwrap_or(DEFAULT_WEBHOOK_VERIFY_SECONDS);
    if !(1..=3600).contains(&verify_seconds) {
        return err(format!(
            "webhooks.verify_seconds: expected an integer from 1 to 3600, got {verify_seconds}"
        ));
    }
    Ok(WebhookConfig {
        path,
        answer: raw.answer.unwrap_or(false),
        verify: Duration::from_secs(verify_seconds),
    })
}

/// `token_paths`, or the default paths when it is absent.
fn token_paths(paths: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let Some(paths) = paths else {
        return Ok(DEFAULT_TOKEN_PATHS.iter().map(|p| p.to_string()).collect());
    };
    if let Some(p) = paths
        .iter()
        .find(|p| !p.starts_with('/') || p.contains(['?', '#']))
    {
        return err(format!(
            "token_paths: expected paths starting with '/' and without a query, got {p:?}"
        ));
    }
    if paths.is_empty() {
        return err("token_paths: must list at least one path");
    }
    Ok(paths)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
