"""Fixtures for the end-to-end tests: one Synapse, one real LiveKit and the lk-jwt-service stand-in per session,
and a cheap Envoy per test.

Components that are not built yet (the Wasm module, the stand-in binaries) make
the tests that need them skip with the command that builds them, instead of failing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest

import stack
from guard import fill_room
from realstack import ForeignHomeserver, RealStandIns, missing_binaries
from stack import (
    CLOCKSHIFT,
    LIVEKIT_SECRET,
    WASM_PATH,
    AppService,
    Envoy,
    FaultServer,
    ShiftedClock,
    Synapse,
    default_plugin_config,
    join_body,
    jwt_claims,
    livekit_alias,
    livekit_identity,
    stats_delta,
    tail,
)

# Helpers the tests may take from here as well as from ``stack``.
__all__ = [
    "connect", "join_body", "jwt_claims", "livekit_alias", "livekit_identity", "requires_standins",
    "requires_wasm", "room_alias", "stats_delta",
]

requires_wasm = pytest.mark.skipif(
    not WASM_PATH.exists(), reason=f"Wasm module not built: {WASM_PATH} (run `make build`)")
requires_standins = pytest.mark.skipif(
    bool(missing_binaries()),
    reason="real LiveKit stack not built (run `make livekit lkstack`)")

# Server names of users who are not on the test Synapse (their homeserver is a stand-in).
FOREIGN_SERVERS = ["example.org", "example.org:8448"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "check_fails: the test makes the guard's check fail (fail_open or fail_closed "
        "counted); without it, any such failure fails the test")


# A guard that fails open lets everyone in while every "allowed" test passes, so no test may
# make a check fail unless it says so.
CHECK_FAILURES = ("fail_open", "fail_closed")


def _failures(stats: dict[str, int] | None) -> dict[str, int]:
    return {name: (stats or {}).get(name, 0) for name in CHECK_FAILURES}


@pytest.fixture(autouse=True)
def _no_check_fails_unless_expected(request: pytest.FixtureRequest) -> Any:
    """Fails a test during which any guard counted fail_open or fail_closed, unless the test is
    marked ``check_fails``: shared Envoys are compared before and after the test, Envoys
    started and stopped within it by what they counted when stopped."""
    expected = request.node.get_closest_marker("check_fails") is not None
    before = {envoy: _failures(envoy.stats()) for envoy in list(Envoy.running) if envoy.with_filter}
    Envoy.stopped.clear()
    yield
    if expected:
        return
    seen = []
    for envoy in [*Envoy.running, *Envoy.stopped]:
        if not envoy.with_filter:
            continue
        after = _failures(envoy.final_stats if envoy in Envoy.stopped else envoy.stats())
        start = before.get(envoy, _failures(None))
        grew = {name: after[name] - start[name] for name in CHECK_FAILURES if after[name] != start[name]}
        if grew:
            seen.append(f"{envoy.name}: {grew}")
    assert not seen, ("the guard's check failed during this test (mark it check_fails if it is "
                      f"meant to): {'; '.join(seen)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's outcome on the test item, so finalizers can print logs of failed tests."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return bool(report and report.failed)


# --------------------------------------------------------------------------- session components


@pytest.fixture(scope="session")
def synapse() -> Synapse:
    """A real Synapse with an admin account, started once for the whole run.

    lk-jwt-service is registered as its application service (tokens random per run:
    ``synapse.appservice.hs_token``/``as_token``): Synapse forwards MatrixRTC token requests
    (``rtc/livekit/...``) to ``synapse.proxy_url`` (``127.0.0.1:synapse.proxy_port``), where a
    test starts the Envoy it wants in front of the stand-in (``start_envoy(listen_port=...)``)."""
    server = Synapse(appservice=AppService())
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def standins(synapse: Synapse) -> Any:
    """lk-jwt-service and LiveKit for the whole run: the Go lk-jwt-service stand-in checking
    real OpenID tokens against the session's Synapse (and a stand-in for other homeservers),
    the real LiveKit server, and real clients (see :class:`realstack.RealStandIns`). The
    stand-in also serves the routes Synapse forwards to its application service."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"real LiveKit stack not built: {', '.join(missing)}")
    foreign = ForeignHomeserver(FOREIGN_SERVERS).start()
    pair = RealStandIns(synapse.server_name, synapse.base_url, foreign, appservice=synapse.appservice)
    try:
        pair.start()
    except Exception:
        pair.stop()
        foreign.stop()
        raise
    stack.OPENID_PROVIDER = synapse.openid_token
    yield pair
    stack.OPENID_PROVIDER = None
    pair.stop()
    foreign.stop()


@pytest.fixture(scope="session")
def real_livekit(standins: Any) -> Any:
    """The real LiveKit server (its API reached directly, not through the counting proxy)."""
    return standins.livekit


@pytest.fixture(scope="session")
def real_lk_jwt(standins: Any) -> Any:
    """The Go lk-jwt-service stand-in."""
    return standins.jwt


@pytest.fixture(scope="session")
def clients(standins: Any) -> Any:
    """Real LiveKit clients (the Go SDK), driven from the tests."""
    return standins.clients


@pytest.fixture
def livekit(standins: Any) -> Any:
    """LiveKit with every test client gone and no delay, for tests that populate rooms."""
    standins.reset()
    return standins


# --------------------------------------------------------------------------- per-test factories


@pytest.fixture
def new_room(synapse: Synapse) -> Callable[..., str]:
    """Factory: ``new_room(limit=None)`` creates a room, sets its limit if given, returns its id."""
    def make(limit: Any = None, name: str | None = None) -> str:
        room_id = synapse.create_room(name)
        if limit is not None:
            synapse.set_limit(room_id, limit)
        return room_id
    return make


@pytest.fixture
def full_room(new_room: Callable[..., str], standins: Any) -> str:
    """A room limited to 1 with alice in the call (the LiveKit room both body shapes name):
    a guard that checks a new user's request answers 403."""
    room = new_room(limit=1)
    for shape in ("legacy", "new"):
        fill_room(standins, room, shape, [("alice", "A1")])
    return room


@pytest.fixture
def plugin_config(request: pytest.FixtureRequest) -> Callable[..., dict]:
    """Factory: ``plugin_config(**overrides)`` gives the filter configuration for the session stack.

    Overrides are deep-merged (see :func:`stack.default_plugin_config`). The
    LiveKit secret is the one the stand-ins are started with.
    """
    def make(**overrides: Any) -> dict:
        server: Synapse = request.getfixturevalue("synapse")
        return default_plugin_config(server.admin_token, LIVEKIT_SECRET, **overrides)
    return make


@pytest.fixture
def shifted_clock(tmp_path: Path) -> ShiftedClock:
    """A wall clock to move for one Envoy (:class:`stack.ShiftedClock`)."""
    if not CLOCKSHIFT.exists():
        pytest.skip(f"clock shim not built: {CLOCKSHIFT} (make clockshift)")
    return ShiftedClock(tmp_path)


@pytest.fixture
def fault_server(request: pytest.FixtureRequest) -> Callable[..., FaultServer]:
    """Factory: ``fault_server(mode, **options)`` starts a :class:`stack.FaultServer`, stopped after the test."""
    servers: list[FaultServer] = []

    def make(mode: str = "ok", **options: Any) -> FaultServer:
        name = f"fault-{_slug(request.node.name)}-{len(servers)}"
        if "openid_upstream" not in options:
            options["openid_upstream"] = request.getfixturevalue("synapse").address
        server = FaultServer(mode, name=name, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def start_envoy(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Factory that starts an Envoy for this test (about 0.2 s) and stops it afterwards.

    ``start_envoy(plugin_config=None, *, lk_jwt=None, synapse=None, livekit=None,
    with_filter=True, env=None, expect_rejection=False, **envoy_options)``

    Upstreams default to the session's stand-ins and Synapse; any of them may be a
    :class:`stack.FaultServer`, a ``(host, port)`` pair or ``"host:port"``. The
    plugin configuration defaults to :func:`plugin_config` (a dict or a raw string
    is used as given). With ``expect_rejection=True`` the call returns Envoy's log
    and fails the test unless Envoy refused the configuration. Envoy's log tail is
    printed when the test fails.
    """
    started: list[Envoy] = []

    def make(plugin_config: dict | str | None = None, *, lk_jwt: Any = None, synapse: Any = None,
             livekit: Any = None, with_filter: bool = True, env: dict[str, str] | None = None,
             expect_rejection: bool = False, **options: Any) -> Any:
        if with_filter and not WASM_PATH.exists():
            pytest.skip(f"Wasm module not built: {WASM_PATH} (run `make build`)")
        if lk_jwt is None or livekit is None:
            pair = request.getfixturevalue("standins")
            lk_jwt = lk_jwt if lk_jwt is not None else pair.jwt_address
            livekit = livekit if livekit is not None else pair.livekit_address
        if synapse is None:
            synapse = request.getfixturevalue("synapse")
        if with_filter and plugin_config is None:
            plugin_config = request.getfixturevalue("plugin_config")()
        envoy = Envoy(lk_jwt=lk_jwt, synapse=synapse, livekit=livekit, plugin_config=plugin_config,
                      with_filter=with_filter, env=env,
                      name=f"envoy-{_slug(request.node.name)}-{len(started)}", **options)
        started.append(envoy)
        if expect_rejection:
            return envoy.start_expecting_rejection()
        return envoy.start()

    yield make
    for envoy in started:
        if _failed(request) and envoy.process is not None:
            print(f"\n--- {envoy.name}: {envoy.log_path} (excerpt) ---\n{envoy.log_excerpt()}")
            print(f"--- {envoy.access_log_path} ---\n{tail(envoy.access_log_path, 20)}")
        envoy.stop()


def _slug(text: str) -> str:
    """A test name made safe and short enough for a directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


# --------------------------------------------------------------------------- small helpers for tests


def connect(standins: Any, token_response: Any) -> Any:
    """Connect to the LiveKit stand-in with the JWT of an lk-jwt-service answer."""
    return standins.connect(token_response)


def room_alias(room: str, shape: str = "legacy", slot_id: str = "m.call#ROOM") -> str:
    """LiveKit alias of a room for a request shape (the legacy shape always uses ``m.call#ROOM``)."""
    return livekit_alias(room, "m.call#ROOM" if shape == "legacy" else slot_id)
