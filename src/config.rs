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

use crate::key_path::key_path_at;
use crate::route::{self, Route};

/// A secret value; its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

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
    /// The token route of a request path, if it is one (see [`crate::route`]).
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
    if crate::json::first_byte(json).is_some_and(|b| b != b'{') {
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
        let reservation_seconds = raw
            .reservation_seconds
            .unwrap_or(DEFAULT_RESERVATION_SECONDS);
        if reservation_seconds == 0 {
            return err("reservation_seconds: expected an integer >= 1, got 0");
        }
        Ok(Config {
            synapse,
            livekit,
            token_paths: token_paths(raw.token_paths)?,
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
        })
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
    Ok(Secret(value))
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
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MINIMAL: &str = r#"{
        "synapse": {"cluster": "synapse", "admin_token": "syt_secret"},
        "livekit": {"cluster": "livekit", "api_key": "devkey", "api_secret": "lk_secret"}
    }"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), &no_env)
    }

    fn error_of(json: &str) -> String {
        parse(json).unwrap_err().0
    }

    #[test]
    fn minimal_configuration_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.synapse.upstream.cluster, "synapse");
        assert_eq!(c.synapse.upstream.authority, "synapse");
        assert_eq!(c.synapse.upstream.timeout, Duration::from_millis(5000));
        assert_eq!(c.synapse.max_lookups_per_second, 100);
        assert_eq!(c.synapse.admin_token.expose(), "syt_secret");
        assert_eq!(c.livekit.upstream.authority, "livekit");
        assert_eq!(c.livekit.api_key.expose(), "devkey");
        assert_eq!(c.livekit.api_secret.expose(), "lk_secret");
        assert_eq!(c.token_paths, ["/sfu/get", "/get_token"]);
        assert_eq!(c.limit_state_type, "io.lotus.voice_limit");
        assert_eq!(c.limit_cache_ttl, Duration::from_secs(10));
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(c.reservation, Duration::from_secs(30));
        assert_eq!(c.participants_cache, Duration::from_millis(1000));
    }

    #[test]
    fn full_configuration() {
        let c = parse(
            r#"{
            "synapse": {"cluster": "hs", "authority": "matrix.example", "admin_token": "t", "timeout_ms": 250, "max_lookups_per_second": 7},
            "livekit": {"cluster": "lk", "authority": "sfu", "api_key": "k", "api_secret": "s", "timeout_ms": 300},
            "token_paths": ["/get_token"],
            "limit_state_type": "org.example.limit",
            "limit_cache_ttl_seconds": 0,
            "failure_mode": "closed",
            "reservation_seconds": 5,
            "participants_cache_ms": 750
        }"#,
        )
        .unwrap();
        assert_eq!(c.synapse.upstream.authority, "matrix.example");
        assert_eq!(c.synapse.upstream.timeout, Duration::from_millis(250));
        assert_eq!(c.synapse.max_lookups_per_second, 7);
        assert_eq!(c.livekit.upstream.timeout, Duration::from_millis(300));
        assert_eq!(c.token_paths, ["/get_token"]);
        assert_eq!(c.limit_state_type, "org.example.limit");
        assert_eq!(c.limit_cache_ttl, Duration::ZERO);
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.reservation, Duration::from_secs(5));
        assert_eq!(c.participants_cache, Duration::from_millis(750));
    }

    #[test]
    fn secrets_can_come_from_the_environment() {
        let env = |name: &str| match name {
            "SYNAPSE_TOKEN" => Some("from-env".to_owned()),
            "LK_SECRET" => Some("lk-from-env".to_owned()),
            _ => None,
        };
        let c = Config::parse(
            br#"{"synapse": {"cluster": "s", "admin_token_env": "SYNAPSE_TOKEN"},
                 "livekit": {"cluster": "l", "api_key": "k", "api_secret_env": "LK_SECRET"}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(c.synapse.admin_token.expose(), "from-env");
        assert_eq!(c.livekit.api_secret.expose(), "lk-from-env");
        let e = Config::parse(
            br#"{"synapse": {"cluster": "s", "admin_token_env": "MISSING"},
                 "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
            &env,
        )
        .unwrap_err();
        assert!(e.0.contains("synapse.admin_token_env") && e.0.contains("MISSING"));
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(error_of("{}"), "synapse is required");
        assert_eq!(error_of("[]"), "configuration: expected a JSON object");
        assert!(error_of("{").starts_with("configuration is not valid JSON"));
        assert_eq!(
            error_of(r#"{"synapse": {"admin_token": "t"}, "livekit": {}}"#),
            "synapse.cluster is required"
        );
        assert_eq!(
            error_of(r#"{"synapse": {"cluster": "s"}, "livekit": {}}"#),
            "synapse.admin_token (or synapse.admin_token_env) is required"
        );
        let with = |extra: &str| MINIMAL.replacen('{', &format!("{{{extra},"), 1);
        let starts = |json: &str, start: &str| {
            let error = error_of(json);
            assert!(
                error.starts_with(start),
                "{error:?} does not start with {start:?}"
            );
        };
        starts(
            &with(r#""limit_cache_ttl_seconds": "10""#),
            r#"limit_cache_ttl_seconds: invalid type: string "10", expected u64"#,
        );
        starts(&with(r#""bogus": 1"#), "bogus: unknown field `bogus`");
        starts(
            &with(r#""failure_mode": "open", "failure_mode": "closed""#),
            "configuration: duplicate field `failure_mode`",
        );
        starts(
            &with(r#""limit_cache_ttl_seconds": 1.5"#),
            "limit_cache_ttl_seconds: invalid type: floating point `1.5`, expected u64",
        );
        starts(
            &with(r#""failure_mode": "maybe""#),
            "failure_mode: unknown variant `maybe`, expected `open` or `closed`",
        );
        starts(
            &with(r#""token_paths": ["/a", 1]"#),
            "token_paths[1]: invalid type: integer `1`, expected a string",
        );
        assert_eq!(
            error_of(&with(r#""token_paths": []"#)),
            "token_paths: must list at least one path"
        );
        assert_eq!(
            error_of(&with(r#""reservation_seconds": 0"#)),
            "reservation_seconds: expected an integer >= 1, got 0"
        );
        starts(
            r#"{"synapse": {"cluster": "s", "admin_token": "t", "timeout": 5},
                "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
            "synapse.timeout: unknown field `timeout`",
        );
        starts(
            r#"{"synapse": {"cluster": "s", "admin_token": 5},
                "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
            "synapse.admin_token: invalid type: integer `5`, expected a string",
        );
    }

    #[test]
    fn errors_name_the_key_on_any_line_without_the_position() {
        let json = "{\n  \"synapse\": {\"cluster\": \"s\", \"admin_token\": \"t\"},\n  \"livekit\": {\n    \"cluster\": \"l\",\n    \"timeout_ms\": -1}}";
        assert_eq!(
            error_of(json),
            "livekit.timeout_ms: invalid value: integer `-1`, expected u64"
        );
        let json = "{\"synapse\": {\"cluster\": \"s\",\n \"cluster\": \"t\"}}";
        assert_eq!(error_of(json), "synapse: duplicate field `cluster`");
    }

    #[test]
    fn errors_never_contain_secrets() {
        let e = error_of(
            r#"{"synapse": {"cluster": "s", "admin_token": "syt_topsecret", "admin_token_env": "X"},
                "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
        );
        assert!(!e.contains("topsecret"), "{e}");
        let c = parse(MINIMAL).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("syt_secret") && !debug.contains("lk_secret"));
    }

    #[test]
    fn token_paths_ignore_the_query_string() {
        let c = parse(MINIMAL).unwrap();
        let legacy = |path| c.route_of(path) == Some(Route::Legacy);
        assert!(legacy("/sfu/get"));
        assert!(legacy("/get_token?x=1"));
        assert!(!legacy("/sfu/get/"));
        assert!(c.route_of("/healthz").is_none());
        assert!(legacy("/s%66u/get"));
        assert!(legacy("/get%5Ftoken"));
        assert!(c.route_of("/sfu%2").is_none());
        assert_eq!(
            c.route_of("/_matrix/client/v1/rtc/livekit/get_token"),
            Some(Route::Client)
        );
    }

    #[test]
    fn stale_limit_seconds_defaults_to_an_hour_and_may_be_set() {
        let minimal = r#"{"synapse": {"cluster": "s", "admin_token": "t"},
                          "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#;
        let config = Config::parse(minimal.as_bytes(), &|_| None).unwrap();
        assert_eq!(config.stale_limit, Duration::from_secs(3600));
        let set = minimal.replacen('{', r#"{"stale_limit_seconds": 0, "#, 1);
        let config = Config::parse(set.as_bytes(), &|_| None).unwrap();
        assert_eq!(config.stale_limit, Duration::ZERO);
        let wrong = minimal.replacen('{', r#"{"stale_limit_seconds": "1", "#, 1);
        assert!(Config::parse(wrong.as_bytes(), &|_| None)
            .unwrap_err()
            .0
            .starts_with("stale_limit_seconds"));
    }

    fn role(json: &str) -> Result<Role, ConfigError> {
        Role::parse(json.as_bytes(), &no_env)
    }

    #[test]
    fn the_shape_chooses_the_role() {
        assert_eq!(
            role(MINIMAL),
            Ok(Role::Guard(Box::new(parse(MINIMAL).unwrap())))
        );
        let Ok(Role::Edge(edge)) = role(r#"{"room_header": "x-matrix-room"}"#) else {
            panic!("not an edge configuration");
        };
        assert_eq!(edge.room_header, "x-matrix-room");
        assert!(edge.route_of("/sfu/get").is_some() && edge.route_of("/get%5Ftoken").is_some());
        assert!(edge
            .route_of("/_matrix/federation/v1/rtc/livekit/get_token")
            .is_some());
        let Ok(Role::Edge(edge)) = role(r#"{"room_header": "x-room", "token_paths": ["/only"]}"#)
        else {
            panic!("not an edge configuration");
        };
        assert!(edge.route_of("/only").is_some() && edge.route_of("/sfu/get").is_none());
    }

    #[test]
    fn an_edge_configuration_is_checked_as_strictly() {
        let error = |json: &str| role(json).unwrap_err().0;
        assert!(
            error(r#"{"room_header": "x-room", "failure_mode": "open"}"#)
                .starts_with("failure_mode: unknown field `failure_mode`")
        );
        assert!(error(r#"{"room_header": 1}"#).starts_with("room_header: invalid type"));
        for bad in [
            "",
            "X-Room",
            "x room",
            ":authority",
            "host",
            "content-length",
            "x-rööm",
        ] {
            let json = format!(r#"{{"room_header": {bad:?}}}"#);
            assert!(error(&json).starts_with("room_header: expected a lowercase header name"));
        }
        let both = MINIMAL.replacen('{', r#"{"room_header": "x-room", "#, 1);
        assert!(error(&both).starts_with("room_header and synapse"));
        // Without room_header the guard's own rules apply.
        assert_eq!(error("{}"), "synapse is required");
    }
}
