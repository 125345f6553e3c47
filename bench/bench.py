#!/usr/bin/env python3
"""What voice-limit-guard costs: Envoy with the filter against plain Envoy, an empty Wasm
filter, the reference Python guard and an edge Envoy with room affinity in front of the guard
(the extra hop of several replicas), in one run (`make bench`).

Every subject sits in front of the same upstreams, one extra Envoy answering for
lk-jwt-service, Synapse and LiveKit with ``direct_response`` (fixed bodies, a fixed JWT),
so the upstreams are never what is measured. ``wrk`` drives each scenario at 1 and at 64
connections; every figure is also given as a ratio to plain Envoy (the floor) in the same
scenario of the same run, because absolute numbers on a shared 2-core machine drift more
than the ratios do. The table goes to stdout and to ``bench/results.md``.

Each figure is the median of ``BENCH_ROUNDS`` (default 5) rounds of ``BENCH_SECONDS`` (default 1)
per subject, the subjects taking turns within each round: a burst of unrelated work on the
machine then spoils one round of every subject instead of all of one subject's measurement.
Other overrides: ``BENCH_WARMUP_SECONDS`` (default 1), ``VLG_REFERENCE_GUARD`` (path of the
reference guard).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# The end-to-end harness already knows how to find Envoy, pick ports and name LiveKit rooms.
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from stack import envoy_binary, free_port, livekit_alias  # noqa: E402

BENCH = REPO / "bench"
OUT = BENCH / "out"
RESULTS = BENCH / "results.md"
GUARD_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "voice_limit_guard.wasm"
# The same module as cargo built it, before `make build`'s optional wasm-opt pass.
GUARD_WASM_RAW = GUARD_WASM.parent / "deps" / GUARD_WASM.name
# The start-up goal compares the module with an earlier one, built from git in the same run:
# by default the last commit before serde_json carried the configuration and the answers.
BASELINE_REF = os.environ.get("VLG_BENCH_BASELINE", "dac8743")
BASELINE_DIR = REPO / "target" / "bench-baseline"
# `make bench` passes `make build`'s wasm-opt command, so the baseline is optimised alike.
WASM_OPT = os.environ.get("VLG_WASM_OPT", "").split()
EMPTY_CRATE = BENCH / "empty-filter"
EMPTY_TARGET_DIR = REPO / "target" / "bench-empty-filter"
EMPTY_WASM = EMPTY_TARGET_DIR / "wasm32-wasip1" / "release" / "bench_empty_filter.wasm"
REFERENCE_GUARD = Path(os.environ.get(
    "VLG_REFERENCE_GUARD", REPO.parent / "shared" / "reference" / "voice_limit_guard.py"))

SECONDS = float(os.environ.get("BENCH_SECONDS", "1"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
WARMUP_SECONDS = float(os.environ.get("BENCH_WARMUP_SECONDS", "1"))
LOADS = ((1, 1), (64, 2))  # (connections, wrk threads)
ENVOY_CONCURRENCY = 2
BURST = 64  # concurrent token requests for one cold room
WASM_SIZE_GOAL = 400_000

LIVEKIT_KEY = "benchkey"
LIVEKIT_SECRET = "bench-secret-0123456789abcdef0123456789"
SYNAPSE_TOKEN = "syt_bench_admin"
LIMIT_STATE_TYPE = "io.lotus.voice_limit"
BENCH_USER = "@bench:example.com"
BENCH_DEVICE = "BENCHDEV"
OTHER_IDENTITY = "@other:example.com:D"
ROOM_OPEN = "!bench-open:example.com"
ROOM_ALLOWED = "!bench-allowed:example.com"
ROOM_BLOCKED = "!bench-blocked:example.com"
BURST_PREFIX = "!bench-burst-"
# The reference guard forwards only Content-Type, Accept and Origin to lk-jwt-service, so the
# upstream picks the token for the blocked room by Origin: both guards then see a token whose
# `video.room` is the alias of the room they were asked about.
BLOCKED_ORIGIN = "https://blocked.bench.invalid"
ALLOWED_ORIGIN = "https://allowed.bench.invalid"
# Slow enough that every request of the burst arrives while the first lookup is in flight.
BURST_SYNAPSE_DELAY = "0.3s"

CORS_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST",
    "access-control-allow-headers": "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}


# --------------------------------------------------------------------------- processes


class Process:
    """A child in its own process group, logging to a file; stopping it ends the whole group."""

    running: list["Process"] = []

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.log_path = OUT / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, **(env or {})}, start_new_session=True)
        Process.running.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_ticks(self) -> int:
        """utime + stime of the process (all its threads), in clock ticks."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the process is idle: the reference guard finishes requests that were in
        flight when wrk stopped, and that work must not land on the next measurement."""
        deadline = time.monotonic() + timeout
        last = self.cpu_ticks()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.cpu_ticks()
            if now - last <= 1:
                return
            last = now

    def rss_kib(self) -> int | None:
        """VmRSS from /proc: what the process holds after its load, shared pages included."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else None

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after a grace period; safe to call twice."""
        if self in Process.running:
            Process.running.remove(self)
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything left behind in the group
        except ProcessLookupError:
            pass

    @classmethod
    def stop_all(cls) -> None:
        for proc in reversed(list(cls.running)):
            proc.stop()


def wait_until(check: Callable[[], object], what: str, proc: Process, timeout: float = 30.0):
    """Poll ``check`` until truthy; fail early with the log tail if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if proc.exited():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{proc.log_tail()}")
        time.sleep(0.05)


def http_get(url: str, timeout: float = 5.0) -> str:
    """GET without any proxy from the environment: all traffic here is loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return resp.read().decode()


# --------------------------------------------------------------------------- tools


def ensure_wrk() -> str:
    """wrk from Debian, installed on first use (the bench runs as root on these machines)."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get install -y wrk) ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed and apt-get could not install it")
    return found


def cargo_build_wasm(target_dir: Path, *args: str | Path, cwd: Path | None = None) -> None:
    """`cargo build --release` for wasm32-wasip1 into ``target_dir`` (cargo skips it when fresh)."""
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", *args,
                    "--target-dir", target_dir], cwd=cwd, check=True)


def build_empty_filter() -> Path:
    """Build the empty filter with the guard's release profile."""
    cargo_build_wasm(EMPTY_TARGET_DIR, "--manifest-path", EMPTY_CRATE / "Cargo.toml")
    return EMPTY_WASM


def build_baseline(run: "Run") -> Path | None:
    """The module at BASELINE_REF, built in a git worktree with the guard's release profile and
    then passed through the same wasm-opt as `make build` (if any). None, with a note, when the
    checkout has no such commit (a shallow clone)."""
    wasm = BASELINE_DIR / f"voice_limit_guard-{BASELINE_REF}{'-opt' if WASM_OPT else ''}.wasm"
    if wasm.exists():
        return wasm
    source, target = BASELINE_DIR / "source", BASELINE_DIR / "target"
    subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", source], capture_output=True)
    added = subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", source, BASELINE_REF],
                           capture_output=True, text=True)
    if added.returncode != 0:
        run.notes.append(f"baseline module {BASELINE_REF} not built: {added.stderr.strip()[-200:]}")
        return None
    try:
        cargo_build_wasm(target, "--lib", cwd=source)
        built = target / "wasm32-wasip1" / "release" / GUARD_WASM.name
        if WASM_OPT:
            subprocess.run([*WASM_OPT, built, "-o", wasm], check=True)
        else:
            shutil.copyfile(built, wasm)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", source], capture_output=True)
    return wasm


def wasm_opt_oz_size(wasm: Path) -> int | None:
    """The module's size after `wasm-opt -Oz` (with `make build`'s feature flags), if wasm-opt is there."""
    if not WASM_OPT:
        return None
    flags = [f for f in WASM_OPT[1:] if not f.startswith("-O")]
    out = OUT / "voice_limit_guard-Oz.wasm"
    subprocess.run([WASM_OPT[0], "-Oz", *flags, wasm, "-o", out], check=True)
    return out.stat().st_size


def v8_compile(guard: Path, baseline: Path, run: "Run") -> dict | None:
    """V8's compile of the guard's module against the baseline's, alone: CPU ms and the median
    over V8_COMPILE_ROUNDS of the paired ratio (bench/v8_compile.js), when node is installed.
    This is the bulk of a VM's start, measured without Envoy's own start around it."""
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--no-liftoff", "--no-wasm-lazy-compilation", "--single-threaded",
                          REPO / "bench" / "v8_compile.js", str(V8_COMPILE_ROUNDS), baseline, guard],
                         capture_output=True, text=True)
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "Error" in line] or [out.stderr.strip()]
        run.notes.append(f"V8 compile of the modules not measured: {errors[0][-200:]}")
        return None
    times = json.loads(out.stdout)
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    return {"node": version, "guard_ms": times[str(guard)]["median_ms"],
            "baseline_ms": times[str(baseline)]["median_ms"], "ratio": times[str(guard)]["ratio"]}


def envoy_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else out.strip()


# --------------------------------------------------------------------------- MatrixRTC data


def b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def join_jwt(room: str) -> str:
    """The token lk-jwt-service would issue to the bench user for ``room`` (signed, valid a year)."""
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"iss": LIVEKIT_KEY, "sub": f"{BENCH_USER}:{BENCH_DEVICE}", "nbf": now - 60,
              "exp": now + 365 * 86400,
              "video": {"roomJoin": True, "room": livekit_alias(room), "canPublish": True,
                        "canSubscribe": True}}
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(LIVEKIT_SECRET.encode(), f"{header}.{payload}".encode(),
                         hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def webhook(room: str) -> tuple[str, dict[str, str]]:
    """A `room_started` webhook as LiveKit signs one (body, headers): what tells a guard with
    `webhooks` that LiveKit's webhooks reach it."""
    body = json.dumps({"event": "room_started", "room": {"name": livekit_alias(room)},
                       "id": "EV_bench", "createdAt": str(int(time.time()))})
    now = int(time.time())
    claims = {"iss": LIVEKIT_KEY, "nbf": now, "exp": now + 300,
              "sha256": base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}
    signed = (b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
              + b64url(json.dumps(claims).encode()))
    signature = hmac.new(LIVEKIT_SECRET.encode(), signed.encode(), hashlib.sha256).digest()
    return body, {"Authorization": f"{signed}.{b64url(signature)}",
                  "Content-Type": "application/webhook+json"}


def token_body(room: str) -> str:
    """A legacy `/sfu/get` request body as Element Call sends it."""
    return json.dumps({
        "room": room,
        "openid_token": {"access_token": "bench-openid", "token_type": "Bearer",
                         "matrix_server_name": "example.com", "expires_in": 3600},
        "device_id": BENCH_DEVICE,
    }, separators=(",", ":"))


def limit_state(max_users: int | None) -> str:
    events = [] if max_users is None else [
        {"type": LIMIT_STATE_TYPE, "state_key": "", "content": {"max_users": max_users}}]
    return json.dumps({"state": events}, separators=(",", ":"))


def state_prefix(room_prefix: str) -> str:
    """Synapse admin path prefix for rooms starting with ``room_prefix`` (`!` is %21, `:` %3A)."""
    encoded = room_prefix.replace("!", "%21").replace(":", "%3A")
    return f"/_synapse/admin/v1/rooms/{encoded}"


# --------------------------------------------------------------------------- Envoy configs


def socket_address(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def router_filter() -> dict:
    return {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def listener(name: str, routes: list[dict], http_filters: list[dict], port: int = 0,
             hcm_extra: dict | None = None) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": http_filters + [router_filter()],
        **(hcm_extra or {}),
    }
    return {"name": name, "address": socket_address(port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def direct(match: dict, body: str = "", headers: dict | None = None, extra: dict | None = None) -> dict:
    """A route answered by Envoy itself with status 200."""
    route = {"match": match, "direct_response": {"status": 200}}
    if body:
        route["direct_response"]["body"] = {"inline_string": body}
    if headers:
        route["response_headers_to_add"] = [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in headers.items()]
    route.update(extra or {})
    return route


def lk_jwt_routes() -> list[dict]:
    json_cors = {"content-type": "application/json", **CORS_HEADERS}
    token = lambda room: json.dumps({"url": "ws://sfu", "jwt": join_jwt(room)}, separators=(",", ":")) + "\n"
    return [
        direct({"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "OPTIONS"}}]},
               headers=json_cors),
        direct({"path": "/healthz"}),
        direct({"prefix": "/", "headers": [{"name": "origin", "string_match": {"exact": BLOCKED_ORIGIN}}]},
               token(ROOM_BLOCKED), json_cors),
        direct({"prefix": "/"}, token(ROOM_ALLOWED), json_cors),
    ]


def synapse_routes() -> list[dict]:
    delayed = {"typed_per_filter_config": {"envoy.filters.http.fault": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "delay": {"fixed_delay": BURST_SYNAPSE_DELAY,
                  "percentage": {"numerator": 100, "denominator": "HUNDRED"}}}}}
    json_type = {"content-type": "application/json"}
    prefix = lambda room: {"prefix": state_prefix(room), "case_sensitive": False}
    userinfo = json.dumps({"sub": BENCH_USER})
    return [
        # Who the bench user's OpenID token is (asked by a guard deciding on the request).
        direct({"prefix": "/_matrix/federation/v1/openid/userinfo"}, userinfo, json_type),
        direct(prefix(ROOM_ALLOWED + "/"), limit_state(10), json_type),
        direct(prefix(ROOM_BLOCKED + "/"), limit_state(1), json_type),
        direct(prefix(BURST_PREFIX), limit_state(10), json_type, delayed),
        direct({"prefix": "/"}, limit_state(None), json_type),
    ]


def livekit_routes() -> list[dict]:
    body = json.dumps({"participants": [{"identity": OTHER_IDENTITY, "state": "ACTIVE"}]},
                      separators=(",", ":"))
    return [direct({"prefix": "/"}, body, {"content-type": "application/json"})]


def upstream_bootstrap() -> dict:
    """One Envoy answering as lk-jwt-service, Synapse and LiveKit, one listener each, so the
    Synapse listener's request counter says how many lookups a guard made."""
    fault = {"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}}
    # lk-jwt-service answers once it has read the request body (it needs it); so does this
    # stand-in, through a buffer filter. Answering on the headers alone would race a guard
    # that decides on the body, which never lets a 200 that comes before its decision pass.
    buffer = {"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 65536}}
    return {
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": [
            listener("lk_jwt", lk_jwt_routes(), [buffer]),
            listener("synapse", synapse_routes(), [fault]),
            listener("livekit", livekit_routes(), []),
        ]},
    }


def wasm_filter(name: str, wasm: Path, configuration: str | None,
                stop_iteration: bool = True) -> dict:
    """The Wasm filter entry as envoy/envoy.yaml has it (same knobs for the empty module);
    without ``stop_iteration``, as Istio's WasmPlugin and Envoy Gateway render it."""
    config = {
        "name": name, "root_id": name,
        **({"allow_on_headers_stop_iteration": True} if stop_iteration else {}),
        "failure_policy": "FAIL_OPEN",
        "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                      "code": {"local": {"filename": str(wasm)}},
                      "environment_variables": {"host_env_keys": ["SYNAPSE_ADMIN_TOKEN", "LIVEKIT_KEY",
                                                                  "LIVEKIT_SECRET"]}},
    }
    if configuration is not None:
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": configuration}
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config}}


NO_BUDGET = {"max_lookups_per_second": 0}


def guard_configuration(synapse_extra: dict | None = None, **extra: str) -> str:
    """The default configuration: only the required keys of envoy/envoy.yaml's (the upstreams and
    their secrets; not the optional hs_token, which the baseline module does not know), every
    tunable at its default, plus ``extra`` keys (and ``synapse_extra`` in ``synapse``)."""
    import yaml  # PyYAML comes with matrix-synapse in the venv

    example = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    hcm = example["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    wasm = next(f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    config = json.loads(wasm["typed_config"]["config"]["configuration"]["value"])
    synapse = {key: value for key, value in config["synapse"].items() if key != "hs_token_env"}
    synapse.update(synapse_extra or {})
    return json.dumps({"synapse": synapse, "livekit": config["livekit"], **extra})


# The front Envoys' connection manager settings, as in envoy/envoy.yaml.
FRONT_HCM = {"normalize_path": True, "merge_slashes": True}


def static_cluster(name: str, port: int, **settings: str) -> dict:
    """A cluster of one loopback endpoint."""
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", **settings,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": socket_address(port)}}]}]}}


def edge_bootstrap(guard_port: int) -> dict:
    """An edge Envoy as envoy/edge.yaml has it (the module in its edge role, the room header
    hashed onto a RING_HASH cluster), its one guard replica being the guard subject: the extra
    hop that room affinity across replicas costs."""
    import yaml

    example = yaml.safe_load((REPO / "envoy" / "edge.yaml").read_text())
    hcm = example["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    configuration = wasm["typed_config"]["config"]["configuration"]["value"]
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "guards", "timeout": "15s",
                                                   "hash_policy": route["hash_policy"]}}]
    filters = [wasm_filter("voice_limit_guard_edge", GUARD_WASM, configuration)]
    return {"admin": {"address": socket_address(0)},
            "static_resources": {"listeners": [listener("main", routes, filters, hcm_extra=FRONT_HCM)],
                                 "clusters": [static_cluster("guards", guard_port, lb_policy="RING_HASH")]}}


def subject_bootstrap(upstream_ports: dict[str, int], http_filters: list[dict]) -> dict:
    """The front Envoy: one listener as in envoy/envoy.yaml, the filter under test (if any)."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "lk_jwt", "timeout": "15s"}}]
    clusters = [static_cluster(name, port) for name, port in upstream_ports.items()]
    return {"admin": {"address": socket_address(0)},
            "static_resources": {"listeners": [listener("main", routes, http_filters, hcm_extra=FRONT_HCM)],
                                 "clusters": clusters}}


# --------------------------------------------------------------------------- servers


class EnvoyServer:
    """An Envoy on loopback; ports are bound by Envoy (port 0) and read back from its admin."""

    def __init__(self, name: str, bootstrap: dict, concurrency: int = ENVOY_CONCURRENCY,
                 env: dict[str, str] | None = None, log_level: str = "info"):
        config = OUT / f"{name}.json"
        config.write_text(json.dumps(bootstrap, indent=1))
        self.admin_file = OUT / f"{name}.admin"
        self.admin_file.unlink(missing_ok=True)
        self.process = Process(name, [
            envoy_binary(), "-c", config, "--concurrency", concurrency, "--use-dynamic-base-id",
            "--disable-hot-restart", "--admin-address-path", self.admin_file, "--log-level", log_level,
        ], env)
        wait_until(self._ready, f"{name} admin /ready", self.process)
        self.ports = self._listener_ports()

    def _ready(self) -> bool:
        address = self.admin_file.read_text().strip() if self.admin_file.exists() else ""
        if not address:
            return False
        self.admin = f"http://{address}"
        return http_get(f"{self.admin}/ready", 2).strip() == "LIVE"

    def _listener_ports(self) -> dict[str, int]:
        statuses = json.loads(http_get(f"{self.admin}/listeners?format=json"))["listener_statuses"]
        return {s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in statuses}

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters whose name contains ``prefix``, by name."""
        text = http_get(f"{self.admin}/stats?filter={prefix}")
        return {name: int(value) for name, value in re.findall(r"^(\S+): (\d+)$", text, re.M)}

    def counter(self, name: str) -> int:
        return self.stats(re.escape(name)).get(name, 0)

    def stop(self) -> None:
        self.process.stop()


class ReferenceGuard:
    """The reference Python guard, run as it is, pointed at the same upstreams."""

    def __init__(self, script: Path, upstream_ports: dict[str, int]):
        self.port = free_port()
        env = {
            "GUARD_BIND_HOST": "127.0.0.1", "GUARD_BIND_PORT": str(self.port),
            "GUARD_UPSTREAM": f"http://127.0.0.1:{upstream_ports['lk_jwt']}",
            "LIVEKIT_API": f"http://127.0.0.1:{upstream_ports['livekit']}",
            "SYNAPSE_API": f"http://127.0.0.1:{upstream_ports['synapse']}",
            "LIVEKIT_KEY": LIVEKIT_KEY, "LIVEKIT_SECRET": LIVEKIT_SECRET, "MATRIX_TOKEN": SYNAPSE_TOKEN,
            "PYTHONUNBUFFERED": "1", "no_proxy": "*", "NO_PROXY": "*",
        }
        self.process = Process("reference", [sys.executable, script], env)
        wait_until(lambda: http_get(f"http://127.0.0.1:{self.port}/healthz", 2) is not None,
                   "reference guard /healthz", self.process)

    def stop(self) -> None:
        self.process.stop()


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    method: str
    path: str
    expect: int
    body: str = ""
    origin: str = ""
    cold: bool = False  # a fresh room id per request

    def request(self, room: str | None = None) -> tuple[str, str, str, dict[str, str]]:
        """(method, path, body, headers) of one request; ``room`` replaces the body's room."""
        body = token_body(room) if room else self.body
        headers = {"content-type": "application/json"} if body else {}
        if self.origin:
            headers["origin"] = self.origin
        return self.method, self.path, body, headers


SCENARIOS: list[Scenario] = [
    Scenario("options", "OPTIONS /sfu/get", "OPTIONS", "/sfu/get", 200),
    Scenario("healthz", "GET /healthz", "GET", "/healthz", 200),
    Scenario("open", "token, room without limit", "POST", "/sfu/get", 200, token_body(ROOM_OPEN)),
    Scenario("allowed", "token, limited room, allowed", "POST", "/sfu/get", 200,
             token_body(ROOM_ALLOWED), ALLOWED_ORIGIN),
    Scenario("blocked", "token, limited room, blocked", "POST", "/sfu/get", 403,
             token_body(ROOM_BLOCKED), BLOCKED_ORIGIN),
    Scenario("cold", "token, new cold room each request", "POST", "/sfu/get", 200, cold=True),
]


SCENARIOS_BY_KEY = {scenario.key: scenario for scenario in SCENARIOS}


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for this ASCII


def wrk_script(scenario: Scenario, nonce: str) -> Path:
    """The wrk Lua script: the request (a new room per request for cold rooms, built in Lua so
    the static fast path is kept otherwise) and a ``done`` hook printing the figures as JSON."""
    method, path, body, headers = scenario.request()
    lines = [f"wrk.method = {lua_string(method)}", f"wrk.path = {lua_string(path)}"]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    if body:
        lines.append(f"wrk.body = {lua_string(body)}")
    if scenario.cold:
        marker = "ROOM_MARKER"
        head, tail = token_body(marker).split(marker)
        lines += [
            "wrk.headers['content-type'] = 'application/json'",
            "local threads, counter, tid = 0, 0, 0",
            "function setup(thread) threads = threads + 1; thread:set('tid', threads) end",
            "function init(args) tid = wrk.thread:get('tid') end",
            "function request()",
            "  counter = counter + 1",
            f"  local room = string.format('!cold-{nonce}-%d-%d:example.com', tid, counter)",
            f"  return wrk.format(nil, nil, nil, {lua_string(head)} .. room .. {lua_string(tail)})",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        "  io.write(string.format('BENCH {\"requests\":%d,\"duration_us\":%d,\"non2xx\":%d,"
        "\"socket_errors\":%d,\"p50_us\":%d,\"p99_us\":%d}\\n',",
        "    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,",
        "    latency:percentile(50), latency:percentile(99)))",
        "end",
    ]
    script = OUT / f"wrk-{scenario.key}-{nonce}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


@dataclass
class Measure:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    # CPU time the subject's own process spent per request, in µs: what the subject costs,
    # unlike throughput hardly moved by other work on the machine or its speed drifting.
    cpu_us: float | None = None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def run_wrk(wrk: str, url: str, scenario: Scenario, connections: int, threads: int,
            seconds: float) -> Measure:
    script = wrk_script(scenario, secrets.token_hex(4))
    argv = [wrk, "-c", str(connections), "-t", str(threads), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "5s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    script.unlink(missing_ok=True)
    match = re.search(r"^BENCH (\{.*\})$", out.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(match.group(1))
    return Measure(rps=r["requests"] / (r["duration_us"] / 1e6), p50_ms=r["p50_us"] / 1000,
                   p99_ms=r["p99_us"] / 1000, requests=r["requests"], non2xx=r["non2xx"],
                   socket_errors=r["socket_errors"])


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_of(rounds: list[Measure]) -> Measure:
    """Median figures over the rounds; status and error counts are summed."""
    cpu = [m.cpu_us for m in rounds if m.cpu_us is not None]
    return Measure(rps=median([m.rps for m in rounds]), p50_ms=median([m.p50_ms for m in rounds]),
                   p99_ms=median([m.p99_ms for m in rounds]),
                   requests=sum(m.requests for m in rounds), non2xx=sum(m.non2xx for m in rounds),
                   socket_errors=sum(m.socket_errors for m in rounds),
                   cpu_us=median(cpu) if cpu else None)


def send(port: int, method: str, path: str, body: str, headers: dict[str, str],
         timeout: float = 10.0) -> int:
    """One request on its own connection; returns the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body.encode() if body else None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def precheck(port: int, scenario: Scenario, expect: int) -> str:
    """One request before the load: the status must be the expected one (a 403 really is a 403)."""
    room = f"!cold-check-{secrets.token_hex(4)}:example.com" if scenario.cold else None
    try:
        status = send(port, *scenario.request(room))
    except OSError as exc:
        return f"request failed: {exc}"
    return "" if status == expect else f"got {status}, want {expect}"


def load_check(expect: int, m: Measure) -> str:
    """Statuses under load, from wrk's count of non-2xx responses."""
    problems = []
    if m.socket_errors:
        problems.append(f"{m.socket_errors} socket errors")
    if expect < 300 and m.non2xx:
        problems.append(f"{m.non2xx} non-2xx")
    if expect >= 300 and m.non2xx != m.requests:
        problems.append(f"{m.requests - m.non2xx} of {m.requests} not refused")
    return ", ".join(problems)


# --------------------------------------------------------------------------- the run


@dataclass
class Subject:
    key: str
    title: str
    port: int
    process: Process
    envoy: EnvoyServer | None = None
    rss_kib: int | None = None
    enforces: bool = True  # refuses tokens for full rooms

    def expected(self, scenario: Scenario) -> int:
        """A subject without a guard passes the blocked room's token like any other."""
        return scenario.expect if self.enforces else 200


@dataclass
class Row:
    scenario: Scenario
    connections: int
    subject: Subject
    measure: Measure | None
    check: str
    rounds: list[Measure] = field(default_factory=list)  # in the order they were run


@dataclass
class Run:
    rows: list[Row] = field(default_factory=list)
    guard_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    burst: dict[str, dict] = field(default_factory=dict)
    vm_start: dict[str, list[float]] = field(default_factory=dict)  # subject -> ms of each start
    baseline_size: int = 0  # the BASELINE_REF module, built alike
    oz_size: int | None = None  # the module after `wasm-opt -Oz`, when wasm-opt is there
    v8_compile: dict | None = None  # see v8_compile()
    notes: list[str] = field(default_factory=list)
    load_before: str = ""

    def row(self, scenario: str, connections: int, subject: str) -> Row | None:
        for row in self.rows:
            if (row.scenario.key, row.connections, row.subject.key) == (scenario, connections, subject):
                return row
        return None

    def find(self, scenario: str, connections: int, subject: str) -> Measure | None:
        row = self.row(scenario, connections, subject)
        return row.measure if row else None


# The secrets the guard's configuration names (`*_env`), in the subjects' environment.
SECRETS_ENV = {"SYNAPSE_ADMIN_TOKEN": SYNAPSE_TOKEN, "LIVEKIT_KEY": LIVEKIT_KEY,
               "LIVEKIT_SECRET": LIVEKIT_SECRET}


def ports_of(upstream: EnvoyServer) -> dict[str, int]:
    """The upstreams Envoy's listener ports, by cluster name."""
    return {name: upstream.ports[name] for name in ("lk_jwt", "synapse", "livekit")}


def start_subjects(upstream: EnvoyServer, run: Run) -> list[Subject]:
    ports = ports_of(upstream)
    filters = {
        "plain": ("Envoy, no filter (floor)", []),
        "empty": ("Envoy + empty Wasm filter", [wasm_filter("bench_empty", build_empty_filter(), None)]),
        # The default (decision_phase: request), rendered as WasmPlugin and Envoy Gateway do;
        # without a lookup budget, so that the cold scenario measures the lookup path itself
        # (by default a flood of new room ids past 100 a second is answered 429).
        "guard": ("Envoy + voice-limit-guard", [wasm_filter("voice_limit_guard", GUARD_WASM,
                                                            guard_configuration(NO_BUDGET), False)]),
        # The same with LiveKit's webhooks read (`webhooks`): decisions rest on each room's
        # view, verified by a list once a minute, instead of a list per refusal.
        "webhooks": ("Envoy + voice-limit-guard, webhooks on",
                     [wasm_filter("voice_limit_guard", GUARD_WASM,
                                  guard_configuration(NO_BUDGET, webhooks={}), False)]),
        "response": ("Envoy + voice-limit-guard, decision_phase response",
                     [wasm_filter("voice_limit_guard", GUARD_WASM,
                                  guard_configuration(NO_BUDGET, decision_phase="response"))]),
    }
    subjects = []
    for key, (title, http_filters) in filters.items():
        envoy = EnvoyServer(f"subject-{key}", subject_bootstrap(ports, http_filters), env=SECRETS_ENV)
        subjects.append(Subject(key, title, envoy.ports["main"], envoy.process, envoy,
                                enforces=key in ("guard", "webhooks", "response")))
    guard_port = next(s.port for s in subjects if s.key == "guard")
    edge = EnvoyServer("subject-edge", edge_bootstrap(guard_port))
    subjects.append(Subject("edge", "edge Envoy (room affinity) + guard", edge.ports["main"],
                            edge.process, edge))
    if REFERENCE_GUARD.exists():
        guard = ReferenceGuard(REFERENCE_GUARD, ports)
        subjects.append(Subject("reference", "reference Python guard", guard.port, guard.process))
    else:
        run.notes.append(f"reference guard not found at {REFERENCE_GUARD}: subject skipped")
    return subjects


# The subjects whose guard counters are kept per scenario.
GUARDS = ("guard", "webhooks", "response")


def guard_stats(subjects: list[Subject], key: str = "guard") -> dict[str, int]:
    guard = next(s for s in subjects if s.key == key)
    return {k.rsplit(".", 1)[-1]: v for k, v in guard.envoy.stats("voice_limit_guard").items()}


def bench_scenario(wrk: str, scenario: Scenario, subjects: list[Subject], run: Run) -> None:
    """Warm-up then each load for every subject, subjects interleaved within the scenario so
    the ratios compare measurements taken moments apart."""
    # LiveKit's webhooks reach the guard that reads them (one per scenario, as LiveKit sends
    # one for any join or leave in any of its rooms).
    body, headers = webhook(ROOM_BLOCKED)
    port = next(s.port for s in subjects if s.key == "webhooks")
    send(port, "POST", "/sfu_webhook", body, headers)
    before = {key: guard_stats(subjects, key) for key in GUARDS}
    checks = {s.key: precheck(s.port, scenario, s.expected(scenario)) for s in subjects}
    for subject in subjects:
        run_wrk(wrk, f"http://127.0.0.1:{subject.port}", scenario, 64, 2, WARMUP_SECONDS)
        subject.process.settle()
    # Steady state: what the measured rounds cost, the warm-up (a cold room's first burst) aside.
    steady = guard_stats(subjects, "webhooks")
    for connections, threads in LOADS:
        rounds: dict[str, list[Measure]] = {s.key: [] for s in subjects}
        for _ in range(ROUNDS):
            for subject in subjects:
                url = f"http://127.0.0.1:{subject.port}"
                ticks = subject.process.cpu_ticks()
                measure = run_wrk(wrk, url, scenario, connections, threads, SECONDS)
                subject.process.settle()  # requests still in flight when wrk stopped count too
                if measure.requests:
                    spent = (subject.process.cpu_ticks() - ticks) / CLOCK_TICKS
                    measure.cpu_us = spent / measure.requests * 1e6
                rounds[subject.key].append(measure)
        for subject in subjects:
            measure = median_of(rounds[subject.key])
            expect = subject.expected(scenario)
            check = "; ".join(filter(None, [checks[subject.key], load_check(expect, measure)]))
            run.rows.append(Row(scenario, connections, subject, measure, check, rounds[subject.key]))
            print(f"  {scenario.key:8} c={connections:<3} {subject.key:10} {measure.rps:9.0f} req/s "
                  f"p50 {measure.p50_ms:7.3f} ms p99 {measure.p99_ms:7.3f} ms {check}", flush=True)
    for key in GUARDS:
        after = guard_stats(subjects, key)
        run.guard_counters[f"{key}/{scenario.key}"] = {
            k: after.get(k, 0) - before[key].get(k, 0) for k in after}
    after = guard_stats(subjects, "webhooks")
    run.guard_counters[f"webhooks/{scenario.key}/steady"] = {
        k: after.get(k, 0) - steady.get(k, 0) for k in after}


VM_START_RUNS = int(os.environ.get("BENCH_VM_START_RUNS", "15"))
V8_COMPILE_ROUNDS = int(os.environ.get("BENCH_V8_COMPILE_ROUNDS", "21"))


def vm_start_ms(upstream: EnvoyServer, subjects: dict[str, list[dict]],
                may_refuse: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Per subject, the time from starting an Envoy to its first answered token request (a
    limited room, so the guard asks Synapse and LiveKit) in each of VM_START_RUNS fresh
    processes: the cost of loading and configuring the module in every VM. The subjects take
    turns, so the starts of one turn meet the same load of the machine. The answer must be a
    200, or for a subject named in `may_refuse` a 503 (see run_all): either way the VM ran."""
    ports = ports_of(upstream)
    method, path, body, headers = SCENARIOS_BY_KEY["allowed"].request()
    times: dict[str, list[float]] = {name: [] for name in subjects}
    for i in range(VM_START_RUNS):
        for name, http_filters in subjects.items():
            started = time.monotonic()
            envoy = EnvoyServer(f"vm-start-{name}-{i}", subject_bootstrap(ports, http_filters),
                                env=SECRETS_ENV, log_level="warn")
            try:
                status = send(envoy.ports["main"], method, path, body, headers)
                times[name].append((time.monotonic() - started) * 1000)
                if status != 200 and not (status == 503 and name in may_refuse):
                    raise RuntimeError(f"{name}: first request answered {status}")
            finally:
                envoy.stop()
    return times


def burst(subject: Subject, upstream: EnvoyServer) -> dict:
    """BURST concurrent token requests for one fresh room whose Synapse answer is slow; counts
    the lookups that reached the Synapse listener (and the guard's own counter)."""
    room = f"{BURST_PREFIX}{secrets.token_hex(4)}:example.com"
    method, path, body, headers = Scenario("burst", "", "POST", "/sfu/get", 200).request(room)
    synapse_counter = "http.synapse.downstream_rq_total"
    synapse_before = upstream.counter(synapse_counter)
    guard_before = guard_counter(subject)
    openid_before = openid_lookups(subject)
    barrier = threading.Barrier(BURST)
    statuses: list[int] = []

    def fire() -> None:
        barrier.wait()
        try:
            statuses.append(send(subject.port, method, path, body, headers, timeout=15))
        except OSError:
            statuses.append(0)

    workers = [threading.Thread(target=fire) for _ in range(BURST)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # The Synapse listener also answers the OpenID userinfo lookups of a guard deciding on the
    # request (one per /sfu/get into a limited room): those are not limit lookups.
    userinfo = openid_lookups(subject) - openid_before
    result = {"requests": BURST,
              "synapse_requests": upstream.counter(synapse_counter) - synapse_before - userinfo,
              "userinfo_requests": userinfo,
              "non_200": sum(1 for s in statuses if s != 200)}
    if guard_before is not None:
        result["guard_counter"] = guard_counter(subject) - guard_before
    return result


def openid_lookups(subject: Subject) -> int:
    if subject.envoy is None or subject.key != "guard":
        return 0
    return subject.envoy.counter("wasmcustom.voice_limit_guard.openid_lookups") or 0


def guard_counter(subject: Subject) -> int | None:
    if subject.envoy is None or subject.key != "guard":
        return None
    return subject.envoy.counter("wasmcustom.voice_limit_guard.synapse_lookups")


def load_average() -> str:
    """Other work on the machine skews every figure; the report says how busy it was."""
    return Path("/proc/loadavg").read_text().split()[0]


def run_all(wrk: str) -> tuple[Run, list[Subject]]:
    run = Run(load_before=load_average())
    upstream = EnvoyServer("upstreams", upstream_bootstrap(), log_level="warn")
    subjects = start_subjects(upstream, run)
    print(f"subjects: {', '.join(f'{s.key}:{s.port}' for s in subjects)}; "
          f"{ROUNDS} x {SECONDS:g} s per load after {WARMUP_SECONDS:g} s warm-up", flush=True)
    for scenario in SCENARIOS:
        bench_scenario(wrk, scenario, subjects, run)
    for subject in subjects:
        subject.process.settle()
        subject.rss_kib = subject.process.rss_kib()
    for subject in subjects:
        if subject.key in ("guard", "reference"):
            run.burst[subject.key] = burst(subject, upstream)
    for subject in subjects:
        subject.process.stop()  # the machine to itself for the start-up timings
    starts = {"plain": [], "empty": [wasm_filter("bench_empty", EMPTY_WASM, None)],
              "guard": [wasm_filter("voice_limit_guard", GUARD_WASM, guard_configuration())]}
    baseline = build_baseline(run)
    if baseline is not None:
        starts["baseline"] = [wasm_filter("voice_limit_guard", baseline, guard_configuration())]
        run.baseline_size = baseline.stat().st_size
        run.v8_compile = v8_compile(GUARD_WASM, baseline, run)
    run.oz_size = wasm_opt_oz_size(GUARD_WASM_RAW if GUARD_WASM_RAW.exists() else GUARD_WASM)
    # The baseline module passed a token request's headers upstream before reading its body; it
    # may still refuse a token (503) now and then, after its VM has started.
    run.vm_start = vm_start_ms(upstream, starts, may_refuse=("baseline",))
    return run, subjects


# --------------------------------------------------------------------------- report


def ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "–"
    return f"{value / floor:.2f}"


def results_table(run: Run, subjects: list[Subject]) -> list[str]:
    lines = ["| scenario | conns | subject | req/s | ×floor | p50 ms | ×floor | p99 ms | ×floor | "
             "CPU µs/req | ×floor | status check |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in run.rows:
        m = row.measure
        floor = run.find(row.scenario.key, row.connections, "plain")
        check = f"⚠ {row.check}" if row.check else f"ok ({row.subject.expected(row.scenario)})"
        cpu = "–" if m.cpu_us is None else f"{m.cpu_us:.0f}"
        lines.append(
            f"| {row.scenario.title} | {row.connections} | {row.subject.title} | {m.rps:,.0f} | "
            f"{ratio(m.rps, floor.rps)} | {m.p50_ms:.3f} | {ratio(m.p50_ms, floor.p50_ms)} | "
            f"{m.p99_ms:.3f} | {ratio(m.p99_ms, floor.p99_ms)} | {cpu} | {ratio(m.cpu_us, floor.cpu_us)} | "
            f"{check} |")
    return lines


def counters_table(run: Run) -> list[str]:
    names = ["token_requests", "synapse_lookups", "openid_lookups", "power_level_lookups",
             "limit_cache_hits", "livekit_lookups", "livekit_lookups_avoided", "allowed", "blocked",
             "fail_open", "unverified_requesters"]
    lines = ["| scenario | decided on | " + " | ".join(names) + " |",
             "| --- | --- |" + " ---: |" * len(names)]
    for scenario in SCENARIOS:
        for key in GUARDS:
            deltas = run.guard_counters.get(f"{key}/{scenario.key}", {})
            phase = {"guard": "request (default)", "webhooks": "request, webhooks on",
                     "response": "response"}[key]
            lines.append(f"| {scenario.title} | {phase} | "
                         + " | ".join(str(deltas.get(n, 0)) for n in names) + " |")
    return lines


def memory_lines(subjects: list[Subject]) -> list[str]:
    lines = ["| subject | resident memory after the run (VmRSS) |", "| --- | ---: |"]
    for s in subjects:
        rss = f"{s.rss_kib / 1024:.1f} MiB" if s.rss_kib else "–"
        lines.append(f"| {s.title} | {rss} |")
    return lines


def burst_lines(run: Run) -> list[str]:
    lines = [f"{BURST} concurrent token requests for one fresh room with a limit (Synapse answers after "
             f"{BURST_SYNAPSE_DELAY}, so all of them arrive while the first lookup is in flight):", "",
             "| subject | requests | Synapse limit lookups (upstream count) | guard's synapse_lookups counter | OpenID userinfo lookups | non-200 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, b in run.burst.items():
        lines.append(f"| {key} | {b['requests']} | {b['synapse_requests']} | "
                     f"{b.get('guard_counter', '–')} | {b.get('userinfo_requests', 0)} | {b['non_200']} |")
    return lines


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**pass**" if ok else "**miss**")


def goals(run: Run, wasm_size: int) -> list[str]:
    """Each goal of the benchmark's brief with the measured ratio and whether it holds."""
    lines = ["| goal | measured | result |", "| --- | --- | --- |"]

    def rel(scenario: str, conns: int, subject: str, base: str, attr: str) -> float | None:
        """The median over the rounds of the subject's figure divided by the base's in the same
        round, measured moments apart: a drift of the machine's speed over the scenario moves
        both alike."""
        m, b = run.row(scenario, conns, subject), run.row(scenario, conns, base)
        if m is None or b is None:
            return None
        ratios = [getattr(x, attr) / getattr(y, attr) for x, y in zip(m.rounds, b.rounds)
                  if getattr(x, attr) is not None and getattr(y, attr)]
        return median(ratios) if ratios else None

    def row(goal: str, value: float | None, holds: Callable[[float], bool] | None = None) -> None:
        """One goal (`holds` None: the figure is reported, with no goal to meet)."""
        result = verdict(None if value is None or holds is None else holds(value))
        lines.append(f"| {goal} | {fmt(value)} × | {result if holds else '–'} |")

    row("limited room, allowed, warm: p50 at 1 conn ≤ 1.5 × floor",
        rel("allowed", 1, "guard", "plain", "p50_ms"), lambda v: v <= 1.5)
    row("limited room, allowed, warm: req/s at 64 conns ≥ 0.6 × floor",
        rel("allowed", 64, "guard", "plain", "rps"), lambda v: v >= 0.6)
    for key in ("options", "healthz"):
        row(f"non-token {key}: req/s at 64 conns ≥ 0.97 × empty Wasm filter",
            rel(key, 64, "guard", "empty", "rps"), lambda v: v >= 0.97)
        row(f"non-token {key}: p50 at 1 conn ≤ 1.03 × empty Wasm filter",
            rel(key, 1, "guard", "empty", "p50_ms"), lambda v: v <= 1.03)
    row("limited room, allowed, warm: CPU per request in the subject's process at 64 conns, × floor "
        "(reported; hardly moved by the machine's load)", rel("allowed", 64, "guard", "plain", "cpu_us"))
    for key in ("open", "allowed", "blocked", "cold"):
        title = SCENARIOS_BY_KEY[key].title
        row(f"{title}: decided on the request (default) against on the response, p50 at 1 conn "
            "(reported)", rel(key, 1, "guard", "response", "p50_ms"))
        row(f"{title}: decided on the request (default) against on the response, req/s at "
            "64 conns (reported)", rel(key, 64, "guard", "response", "rps"))
    row("webhooks on, blocked: req/s at 64 conns ≥ 0.8 × floor",
        rel("blocked", 64, "webhooks", "plain", "rps"), lambda v: v >= 0.8)
    row("webhooks on, allowed, warm: p50 at 1 conn ≤ 1.2 × floor",
        rel("allowed", 1, "webhooks", "plain", "p50_ms"), lambda v: v <= 1.2)
    row("webhooks on, allowed, warm: req/s at 64 conns ≥ 0.8 × floor",
        rel("allowed", 64, "webhooks", "plain", "rps"), lambda v: v >= 0.8)
    row("webhooks off (default), blocked: req/s at 64 conns, × floor (reported)",
        rel("blocked", 64, "guard", "plain", "rps"))
    for key in ("allowed", "blocked"):
        counters = run.guard_counters.get(f"webhooks/{key}/steady", {})
        whole = run.guard_counters.get(f"webhooks/{key}", {})
        tokens, lists = counters.get("token_requests", 0), counters.get("livekit_lookups", 0)
        if tokens:
            lines.append(f"| webhooks on, {SCENARIOS_BY_KEY[key].title}: 0 ListParticipants per token in "
                         f"steady state (under 1 per 1,000: one a room per `verify_seconds`; the measured rounds; with the warm-up's cold start "
                         f"{whole.get('livekit_lookups', 0)} for {whole.get('token_requests', 0):,}) | "
                         f"{lists} lists / {tokens:,} tokens "
                         f"({counters.get('livekit_lookups_avoided', 0):,} decisions on the view) | "
                         f"{verdict(lists / tokens < 0.001)} |")
    row("room affinity: edge + guard p50 at 1 conn, × the guard alone (the extra hop; reported)",
        rel("allowed", 1, "edge", "guard", "p50_ms"))
    row("room affinity: edge + guard req/s at 64 conns, × the guard alone (reported)",
        rel("allowed", 64, "edge", "guard", "rps"))
    guard_burst = run.burst.get("guard")
    if guard_burst:
        n = guard_burst["synapse_requests"]
        lines.append(f"| cold room: {BURST} concurrent requests cause 1 Synapse lookup per Envoy process | "
                     f"{n} lookups / {BURST} requests | {verdict(n <= 1)} |")
    starts = {name: median(times) for name, times in run.vm_start.items()}
    start, base = starts.get("guard"), starts.get("baseline")
    if start is not None:
        others = (f"plain Envoy {starts.get('plain', 0):.0f} ms, "
                  f"empty Wasm filter {starts.get('empty', 0):.0f} ms")
        if base:
            # As for throughput: each start over the baseline's start of the same turn, then
            # the median of those ratios, so that the machine's drift between turns cancels.
            paired = median([g / b for g, b in zip(run.vm_start["guard"], run.vm_start["baseline"])])
            lines.append(f"| start-up: Envoy start to first token answered, median over {VM_START_RUNS} turns "
                         f"of the start over the baseline's in the same turn, ≤ 1.10 × the module at "
                         f"{BASELINE_REF} | {paired:.2f} × (medians {start:.0f} ms against {base:.0f} ms; "
                         f"{others}) | {verdict(paired <= 1.10)} |")
        else:
            lines.append(f"| start-up: Envoy start to first token answered (median of {VM_START_RUNS}), "
                         f"reported | {start:.0f} ms ({others}) | – |")
    if run.v8_compile:
        c = run.v8_compile
        lines.append(f"| start-up: V8's compile of the module alone (node {c['node']}, TurboFan only, "
                     f"single-threaded; median of {V8_COMPILE_ROUNDS} paired ratios), × the module at "
                     f"{BASELINE_REF} (reported; the bulk of a VM's start, without Envoy's noise) | "
                     f"{c['ratio']:.2f} × ({c['guard_ms']:.0f} ms against {c['baseline_ms']:.0f} ms CPU) | – |")
    raw = GUARD_WASM_RAW.stat().st_size if GUARD_WASM_RAW.exists() else wasm_size
    sizes = [f"as cargo builds it {raw:,} bytes", f"as `make build` leaves it {wasm_size:,} bytes"]
    if run.oz_size:
        sizes.append(f"with `wasm-opt -Oz` {run.oz_size:,} bytes")
    if run.baseline_size:
        sizes.append(f"the module at {BASELINE_REF}, built alike, {run.baseline_size:,} bytes")
    lines.append(f"| `.wasm` ≤ 400 KB, without wasm-opt too | {'; '.join(sizes)} | "
                 f"{verdict(max(raw, wasm_size) <= WASM_SIZE_GOAL)} |")
    return lines


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def command() -> str:
    return "make bench" if os.environ.get("MAKELEVEL") else " ".join(
        [Path(sys.executable).name, *map(str, sys.argv)])


def report(run: Run, subjects: list[Subject], envoy_ver: str, wrk: str) -> str:
    wasm_size = GUARD_WASM.stat().st_size
    empty_size = EMPTY_WASM.stat().st_size if EMPTY_WASM.exists() else 0
    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    wrk_ver = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    header = [
        "# voice-limit-guard benchmark", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command()}`",
        f"- machine: {os.cpu_count()} cores ({cpu.group(1) if cpu else platform.machine()}), "
        f"{platform.system()} {platform.release()}",
        f"- Envoy {envoy_ver} (subjects with --concurrency {ENVOY_CONCURRENCY}; the upstreams are one more "
        f"Envoy with direct responses), {wrk_ver.split(' [')[0]}",
        f"- load: {WARMUP_SECONDS:g} s warm-up at 64 connections, then at 1 connection (1 thread) and at "
        f"64 connections (2 threads): median of {ROUNDS} rounds of {SECONDS:g} s, subjects taking turns; "
        "load generator, subjects and upstreams share the machine",
        f"- load average (1 min) before / after the run: {run.load_before} / {load_average()}",
        f"- `.wasm`: voice-limit-guard {wasm_size:,} bytes, empty filter {empty_size:,} bytes",
        "- CPU µs/req: user and system time of the subject's own process per request (the edge "
        "subject: the edge Envoy alone; the reference guard: its Python process)",
        "- ×floor: the subject's figure divided by plain Envoy's in the same scenario and run "
        "(throughput: higher is better; latency: lower is better); the Goals take the median over "
        "the rounds of that ratio within each round, the tables the ratio of the medians",
        *[f"- note: {n}" for n in run.notes], "",
    ]
    sections = [
        ("## Goals", goals(run, wasm_size)),
        ("## Throughput and latency", results_table(run, subjects)),
        ("## Memory", memory_lines(subjects)),
        ("## Cold room burst", burst_lines(run)),
        ("## voice-limit-guard counters per scenario (warm-up and both loads)", counters_table(run)),
    ]
    body = []
    for title, lines in sections:
        body += [title, "", *lines, ""]
    return "\n".join(header + body)


# --------------------------------------------------------------------------- main


def main() -> int:
    # Ctrl-C must stop every child even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    signal.signal(signal.SIGHUP, lambda signum, _frame: sys.exit(128 + signum))
    if not GUARD_WASM.exists():
        print(f"{GUARD_WASM} missing: run `make build`", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    started = time.monotonic()
    try:
        run, subjects = run_all(wrk)
        text = report(run, subjects, envoy_version(envoy_binary()), wrk)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        Process.stop_all()
    RESULTS.write_text(text)
    print()
    print(text)
    print(f"(written to {RESULTS.relative_to(REPO)}; run took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
