"""`make run` (envoy/run_from_env.py): the filter in Envoy as a drop-in for the reference Python
guard, configured from the reference's environment variables.

- The demo's scenario (a room limited to 2: alice 200, bob 200, carol 403, alice's second device
  200, each admitted user connecting to the real LiveKit) through the drop-in, always; and
  through the reference guard with the same environment, when its file is there
  (``VLG_REFERENCE_GUARD``, or ``../shared/reference/voice_limit_guard.py`` next to the
  repository), comparing the status codes.
- Rendering: defaults as the reference's, https upstreams with TLS, SNI and certificate checks,
  path prefixes, secrets kept out of the file, clear errors for bad variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import requires_standins, requires_wasm
from demo import LIMIT, limited_room_steps
from stack import (
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    REPO,
    WASM_PATH,
    Process,
    envoy_binary,
    free_port,
    http,
    run_dir_for,
    wait_until,
)

RUNNER = REPO / "envoy" / "run_from_env.py"
REFERENCE_GUARD = Path(os.environ.get(
    "VLG_REFERENCE_GUARD", REPO.parent / "shared" / "reference" / "voice_limit_guard.py"))
SECRETS = {"MATRIX_TOKEN": "syt_admin_secret_value", "LIVEKIT_KEY": "lk_key_value",
           "LIVEKIT_SECRET": "lk_secret_value_0123456789abcdef0123"}
EXPECTED = [step.expect for step in limited_room_steps("!room")]


# --------------------------------------------------------------------------- running a guard


def guard_env(synapse: Any, standins: Any, port: int) -> dict[str, str]:
    """The reference guard's variables, pointing at the test stack."""
    return {
        "GUARD_BIND_HOST": "127.0.0.1",
        "GUARD_BIND_PORT": str(port),
        "GUARD_UPSTREAM": standins.jwt_url,
        "LIVEKIT_API": standins.livekit.url,
        "LIVEKIT_KEY": LIVEKIT_KEY,
        "LIVEKIT_SECRET": LIVEKIT_SECRET,
        "SYNAPSE_API": synapse.base_url,
        "MATRIX_TOKEN": synapse.admin_token,
        # The reference's HTTP client honours proxy variables; loopback must never use one.
        "NO_PROXY": "*", "no_proxy": "*",
    }


def walk_demo(url: str, synapse: Any, standins: Any) -> list[int]:
    """The demo's limited-room steps against a guard at ``url``, in a new room limited to
    ``LIMIT``; every admitted user connects to LiveKit before the next step, as in the demo."""
    room = synapse.create_room("drop-in")
    synapse.set_limit(room, LIMIT)
    codes = []
    for step in limited_room_steps(room):
        resp = http().post(f"{url}{step.path}", json=step.body, timeout=30)
        codes.append(resp.status_code)
        if resp.status_code == 200:
            standins.connect(resp)
    return codes


def serving(url: str, process: Process) -> None:
    """Wait until the guard passes a request through to lk-jwt-service."""
    wait_until(lambda: http().get(f"{url}/healthz", timeout=2).status_code == 200,
               f"{process.name} to serve {url}", 60, process)


@pytest.fixture(scope="module")
def dropin_demo(synapse: Any, standins: Any) -> dict[str, Any]:
    """The drop-in started as `make run` starts it, the demo walked through it once, then
    stopped; what it answered, logged and counted."""
    if not WASM_PATH.exists():
        pytest.skip(f"Wasm module not built: {WASM_PATH} (run `make build`)")
    run_dir = run_dir_for("dropin")
    env = guard_env(synapse, standins, free_port())
    admin_path = run_dir / "admin.address"
    process = Process("dropin", [
        sys.executable, RUNNER, "--wasm", WASM_PATH, "--config-out", run_dir / "envoy.json",
        "--admin-address", "127.0.0.1:0",
        "--", "--admin-address-path", admin_path, "--concurrency", "2"],
        run_dir / "stderr.log", env=env, stdout_path=run_dir / "stdout.log").start()
    try:
        url = f"http://127.0.0.1:{env['GUARD_BIND_PORT']}"
        serving(url, process)
        exe = Path(os.readlink(f"/proc/{process.pid}/exe"))
        codes = walk_demo(url, synapse, standins)
        admin = admin_path.read_text().strip()
        stats = http().get(f"http://{admin}/stats", params={"format": "json",
                           "filter": r"^wasmcustom\.voice_limit_guard\."}, timeout=5).json()["stats"]
        counters = {s["name"].rsplit(".", 1)[1]: s["value"] for s in stats if "value" in s}
        # Envoy writes its log file in batches; the refusal line is waited for, not assumed.
        wait_until(lambda: "refused @carol:test.local" in (run_dir / "stdout.log").read_text(),
                   "the refusal in the drop-in's log", 15, process)
    finally:
        process.stop()
    return {
        "env": env, "codes": codes, "exe": exe, "counters": counters,
        "stdout": (run_dir / "stdout.log").read_text(errors="replace"),
        "stderr": (run_dir / "stderr.log").read_text(errors="replace"),
        "config": (run_dir / "envoy.json").read_text(),
    }


# --------------------------------------------------------------------------- the demo scenario


@requires_wasm
@requires_standins
def test_dropin_walks_the_demo_scenario(dropin_demo):
    assert EXPECTED == [200, 200, 403, 200]
    assert dropin_demo["codes"] == EXPECTED
    counters = dropin_demo["counters"]
    assert (counters["token_requests"], counters["allowed"], counters["blocked"]) == (4, 3, 1), counters
    assert counters.get("fail_open", 0) == 0 and counters.get("fail_closed", 0) == 0, counters
    # Started in the foreground by exec: the process is Envoy itself, logging to stdout only.
    assert dropin_demo["exe"].resolve() == Path(envoy_binary()).resolve()
    assert dropin_demo["stderr"] == ""
    stdout = dropin_demo["stdout"]
    assert f"voice-limit-guard: Envoy on 127.0.0.1:{dropin_demo['env']['GUARD_BIND_PORT']}" in stdout
    assert "starting main dispatch loop" in stdout
    # No secret in the rendered file: the filter reads them from Envoy's environment.
    for name in ("MATRIX_TOKEN", "LIVEKIT_KEY", "LIVEKIT_SECRET"):
        assert dropin_demo["env"][name] not in dropin_demo["config"]


@requires_wasm
@requires_standins
@pytest.mark.skipif(not REFERENCE_GUARD.exists(),
                    reason=f"reference guard not found at {REFERENCE_GUARD} (set VLG_REFERENCE_GUARD): "
                           "the drop-in is tested alone by test_dropin_walks_the_demo_scenario")
def test_dropin_answers_as_the_reference_guard(dropin_demo, synapse, standins):
    """The same scenario through the reference guard, started with the drop-in's environment
    (the same port too: the drop-in has stopped)."""
    env = dropin_demo["env"]
    run_dir = run_dir_for("reference-guard")
    process = Process("reference-guard", [sys.executable, REFERENCE_GUARD], run_dir / "reference.log",
                      env={**env, "PYTHONUNBUFFERED": "1"}).start()
    try:
        url = f"http://127.0.0.1:{env['GUARD_BIND_PORT']}"
        serving(url, process)
        codes = walk_demo(url, synapse, standins)
    finally:
        process.stop()
    assert codes == dropin_demo["codes"] == EXPECTED


# --------------------------------------------------------------------------- rendering


def runner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The runner with exactly these variables (plus PATH), so defaults are the runner's own."""
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ.get("PATH", ""), **env})


def rendered(env: dict[str, str]) -> dict:
    result = runner(env, "--render-only")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def clusters_of(config: dict) -> dict[str, dict]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def route_of(config: dict) -> dict:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def filter_config_of(config: dict) -> tuple[dict, dict]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    return wasm, json.loads(wasm["configuration"]["value"])


def endpoint_of(cluster: dict) -> tuple[str, int]:
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def test_defaults_are_the_reference_guards():
    config = rendered({})
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (listener["address"], listener["port_value"]) == ("0.0.0.0", 8070)
    clusters = clusters_of(config)
    assert {name: endpoint_of(c) for name, c in clusters.items()} == {
        "lk_jwt": ("127.0.0.1", 8071), "livekit": ("127.0.0.1", 7880), "synapse": ("127.0.0.1", 8008)}
    assert all("transport_socket" not in c and c["type"] == "STATIC" for c in clusters.values())
    assert "prefix_rewrite" not in route_of(config)
    wasm, settings = filter_config_of(config)
    assert wasm["allow_on_headers_stop_iteration"] is True
    assert settings["failure_mode"] == "open" and settings["limit_cache_ttl_seconds"] == 10
    assert settings["synapse"]["timeout_ms"] == settings["livekit"]["timeout_ms"] == 5000


def test_secrets_are_named_never_written():
    config = rendered(SECRETS)
    text = json.dumps(config)
    for value in SECRETS.values():
        assert value not in text
    wasm, settings = filter_config_of(config)
    assert sorted(wasm["vm_config"]["environment_variables"]["host_env_keys"]) == sorted(SECRETS)
    assert settings["synapse"]["admin_token_env"] == "MATRIX_TOKEN"
    livekit = settings["livekit"]
    assert (livekit["api_key_env"], livekit["api_secret_env"]) == ("LIVEKIT_KEY", "LIVEKIT_SECRET")


def test_https_urls_give_tls_clusters_with_sni():
    config = rendered({"GUARD_UPSTREAM": "https://jwt.example.org",
                       "SYNAPSE_API": "https://matrix.example.org:8448/",
                       "LIVEKIT_API": "http://livekit.internal:7880"})
    clusters = clusters_of(config)
    for name, host, port in (("lk_jwt", "jwt.example.org", 443), ("synapse", "matrix.example.org", 8448)):
        cluster = clusters[name]
        assert cluster["type"] == "STRICT_DNS" and endpoint_of(cluster) == (host, port)
        socket = cluster["transport_socket"]
        assert socket["name"] == "envoy.transport_sockets.tls"
        tls = socket["typed_config"]
        assert tls["@type"].endswith("tls.v3.UpstreamTlsContext")
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert Path(validation["trusted_ca"]["filename"]).is_file()
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": host}}]
    assert "transport_socket" not in clusters["livekit"]
    assert endpoint_of(clusters["livekit"]) == ("livekit.internal", 7880)
    # The Host the calls carry is the upstream's, port included when it is not the default.
    assert route_of(config)["host_rewrite_literal"] == "jwt.example.org"
    _, settings = filter_config_of(config)
    assert settings["synapse"]["authority"] == "matrix.example.org:8448"
    assert settings["livekit"]["authority"] == "livekit.internal:7880"


@requires_wasm
def test_an_https_configuration_passes_envoys_validation(tmp_path):
    result = runner({**SECRETS, "GUARD_UPSTREAM": "https://jwt.example.org/livekit/jwt",
                     "SYNAPSE_API": "https://matrix.example.org", "LIVEKIT_API": "https://[2001:db8::7]:7443"},
                    "--validate-only", "--wasm", str(WASM_PATH), "--config-out", str(tmp_path / "envoy.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = clusters_of(json.loads((tmp_path / "envoy.json").read_text()))
    tls = clusters["livekit"]["transport_socket"]["typed_config"]
    # An IP address is no server name: no SNI, and the certificate must name the address.
    assert "sni" not in tls
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "2001:db8::7"}}]


def test_a_bind_host_name_is_resolved_as_the_reference_resolves_it():
    listener = rendered({"GUARD_BIND_HOST": "localhost"})["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"


def test_a_path_in_the_upstream_url_is_kept():
    route = route_of(rendered({"GUARD_UPSTREAM": "http://10.0.0.5:8080/livekit/jwt/"}))
    assert route["prefix_rewrite"] == "/livekit/jwt/"  # /sfu/get goes to /livekit/jwt/sfu/get
    assert route["host_rewrite_literal"] == "10.0.0.5:8080"


@pytest.mark.parametrize("variable, value, says", [
    ("GUARD_UPSTREAM", "lk-jwt:8081", "must start with http:// or https://"),
    ("GUARD_UPSTREAM", "ftp://lk-jwt", "must start with http:// or https://"),
    ("LIVEKIT_API", "http://", "names no host"),
    ("LIVEKIT_API", "http://livekit:78800", "is not a valid URL"),
    ("SYNAPSE_API", "https://admin:pw@matrix.example.org", "credentials in the URL"),
    ("SYNAPSE_API", "https://matrix.example.org/synapse", "a path in the URL is not supported"),
    ("LIVEKIT_API", "http://livekit:7880/api", "a path in the URL is not supported"),
    ("GUARD_UPSTREAM", "http://lk-jwt:8081/?x=1", "a query or fragment"),
    ("GUARD_BIND_PORT", "eighty", "is not a port number"),
    ("GUARD_BIND_PORT", "70000", "is not a port number"),
    ("GUARD_BIND_HOST", "guard.invalid", "no IPv4 address found for that name"),
])
def test_a_bad_variable_is_a_clear_error(variable, value, says):
    result = runner({**SECRETS, variable: value}, "--render-only")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"run_from_env: {variable}={value!r}")
    assert says in result.stderr


def test_missing_secrets_stop_it_before_envoy_starts(tmp_path):
    result = runner({"LIVEKIT_KEY": "k"}, "--config-out", str(tmp_path / "envoy.json"))
    assert result.returncode == 2
    assert "MATRIX_TOKEN, LIVEKIT_SECRET not set" in result.stderr
    assert not (tmp_path / "envoy.json").exists()
