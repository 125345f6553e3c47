"""Helpers shared by the filter's end-to-end tests: request shapes, the answers lk-jwt-service
and the guard give, counter bookkeeping, and Envoys shared by a whole test module.

Kept free of fixtures so each test module decides how long its Envoy lives.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import requests

from stack import (
    COUNTERS,
    DECISION_PHASE,
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    Envoy,
    Synapse,
    default_plugin_config,
    http,
    join_body,
    jwt_claims,
    livekit_alias,
    livekit_identity,
    signed_by,
    wait_until,
)

# Both token endpoints with the body shape each is used with by clients.
SHAPES = [
    pytest.param("/sfu/get", "legacy", id="sfu_get"),
    pytest.param("/get_token", "new", id="get_token"),
]

# Every counter the guard documents (the harness's list predates the later ones).
GUARD_COUNTERS = tuple(dict.fromkeys((*COUNTERS, "fail_closed", "livekit_cache_hits",
                                      "unreadable_requests", "stale_limits",
                                      "released_reservations", "token_mismatches",
                                      "unverified_requesters", "oversized_requests",
                                      "cooling_refusals", "capacity_refusals",
                                      "lookups_over_budget", "stale_limits_over_budget",
                                      "webhooks_received",
                                      "webhooks_accepted", "webhooks_refused",
                                      "webhooks_unreadable", "livekit_lookups_avoided",
                                      "abandoned_reservations", "rekeyed_reservations")))

CHANNEL_FULL = b'{"errcode":"M_FORBIDDEN","error":"This voice channel is full."}'


def unverified_when_synapse_fails(issued: bool = False) -> dict[str, int]:
    """The counters a ``/sfu/get`` decided on the request adds when Synapse cannot answer who
    its OpenID token belongs to (the guard's Synapse is down or a fault server): the requester
    is unverified, and may only take a free place; once lk-jwt-service ``issued`` the token,
    that place is the user's it names. Decided on the response, nothing."""
    if DECISION_PHASE != "request":
        return {}
    return {"unverified_requesters": 1, **({"rekeyed_reservations": 1} if issued else {})}

# What lk-jwt-service puts on every answer of its token endpoints; the guard's own answers
# must carry the same, or browsers would hide them from Element Call.
LK_JWT_HEADERS = {
    "content-type": "application/json",
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST",
    "access-control-allow-headers": "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}

# Headers whose value Envoy may legitimately change on the way (hop-by-hop or its own).
ENVOY_OWN_HEADERS = {"date", "server", "x-envoy-upstream-service-time", "connection",
                     "transfer-encoding", "keep-alive"}


# --------------------------------------------------------------------------- requests


def user(name: str) -> str:
    return f"@{name}:test.local"


def token_body(shape: str, who: str, device: str, room: str) -> dict:
    """The body a client sends for this shape; the member id follows the device so it is stable."""
    return join_body(user(who), device, room, shape=shape, member_id=f"m-{who}-{device}")


def identity(shape: str, who: str, device: str) -> str:
    """The LiveKit identity lk-jwt-service issues for :func:`token_body`."""
    if shape == "legacy":
        return livekit_identity(user(who), device)
    return livekit_identity(user(who), device, f"m-{who}-{device}")


def ask(envoy: Envoy, path: str, shape: str, who: str, device: str, room: str,
        **kwargs: Any) -> requests.Response:
    """One token request through Envoy."""
    return envoy.post(path, token_body(shape, who, device, room), **kwargs)


def fill_room(standins: Any, room: str, shape: str, people: list[tuple[str, str]],
              state: str = "ACTIVE") -> str:
    """Put ``(name, device)`` participants into the room's LiveKit room; return its alias."""
    alias = livekit_alias(room)
    standins.set_room(alias, [(identity(shape, who, device), state) for who, device in people])
    return alias


# --------------------------------------------------------------------------- answers


def verify_jwt(token: str, secret: str = LIVEKIT_SECRET) -> dict:
    """Check an HS256 JWT's signature with the LiveKit secret and return its claims."""
    assert token.count(".") == 2, "not a JWT"
    assert signed_by(token, secret), "JWT signature does not verify"
    return jwt_claims(token)


def assert_lk_jwt_headers(resp: requests.Response) -> None:
    """The four headers lk-jwt-service puts on token endpoint answers, with its exact values."""
    got = {k: resp.headers.get(k) for k in LK_JWT_HEADERS}
    assert got == LK_JWT_HEADERS


def assert_token_issued(resp: requests.Response, room: str, shape: str, who: str,
                        device: str, standins: Any) -> dict:
    """A 200 exactly as lk-jwt-service sends it: ``{"url","jwt"}`` plus newline, a valid JWT
    for the right LiveKit room and identity, and lk-jwt's headers."""
    assert resp.status_code == 200, resp.text
    assert resp.content.endswith(b"}\n")
    body = resp.json()
    assert list(body) == ["url", "jwt"]
    assert body["url"] == standins.livekit_ws_url
    claims = verify_jwt(body["jwt"])
    assert claims["iss"] == LIVEKIT_KEY
    assert claims["sub"] == identity(shape, who, device)
    assert claims["video"]["room"] == livekit_alias(room)
    assert claims["video"]["roomJoin"] is True
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert_lk_jwt_headers(resp)
    return claims


def assert_channel_full(resp: requests.Response) -> None:
    """The guard's refusal: 403, the exact Matrix error, lk-jwt's content type and CORS headers."""
    assert resp.status_code == 403, resp.text
    assert resp.content == CHANNEL_FULL
    assert_lk_jwt_headers(resp)


def assert_check_failed(resp: requests.Response) -> None:
    """The guard's answer under ``failure_mode: closed``: 503 ``M_UNKNOWN`` with lk-jwt's headers."""
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert set(body) == {"errcode", "error"}
    assert body["errcode"] == "M_UNKNOWN" and body["error"]
    assert_lk_jwt_headers(resp)


def comparable_headers(resp: requests.Response) -> dict[str, str]:
    """Response headers minus those Envoy sets itself, lower-cased, for byte-identity checks."""
    return {k.lower(): v for k, v in resp.headers.items() if k.lower() not in ENVOY_OWN_HEADERS}


def direct(standins: Any, method: str, path: str, data: bytes | None = None) -> requests.Response:
    """The same request sent straight to the lk-jwt stand-in, bypassing Envoy."""
    return http().request(method, f"{standins.jwt_url}{path}", data=data, timeout=10)


def as_bytes(body: Any) -> bytes:
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


# --------------------------------------------------------------------------- counters


class Counts:
    """Counter changes over a block: the guard's counters and LiveKit ``ListParticipants`` calls."""

    def __init__(self, envoy: Envoy, standins: Any):
        self.envoy = envoy
        self.standins = standins
        self.guard: dict[str, int] = {}
        self.list_participants = 0

    def _read(self) -> tuple[dict[str, int], int]:
        stats = self.envoy.stats()
        calls = self.standins.livekit_stats()["list_participants_calls"] if self.standins else 0
        return {k: stats.get(k, 0) for k in GUARD_COUNTERS}, calls

    def __enter__(self) -> "Counts":
        self._before = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        after = self._read()
        self.guard = {k: after[0][k] - self._before[0][k]
                      for k in GUARD_COUNTERS if after[0][k] != self._before[0][k]}
        self.list_participants = after[1] - self._before[1]


def counting(envoy: Envoy, standins: Any = None) -> Counts:
    """``with counting(envoy, standins) as c: ...`` then ``c.guard`` is the exact counter delta."""
    return Counts(envoy, standins)


# --------------------------------------------------------------------------- Envoys


def shared_envoy(name: str, synapse: Synapse, standins: Any, config: dict | None = None, *,
                 lk_jwt_at: Any = None, synapse_at: Any = None, livekit_at: Any = None,
                 **envoy_options: Any) -> Envoy:
    """Start an Envoy with the filter that a whole test module or class shares.

    ``config`` overrides are deep-merged into the default plugin configuration; ``*_at``
    put another upstream (a fault server) in place of the session's component.
    Starting one per test costs little, but sharing one per configuration keeps the suite
    fast and also shows that earlier tests leave the filter in a working state.
    """
    plugin_config = default_plugin_config(synapse.admin_token, LIVEKIT_SECRET, **(config or {}))
    envoy = Envoy(
        lk_jwt=lk_jwt_at if lk_jwt_at is not None else standins.jwt_address,
        synapse=synapse_at if synapse_at is not None else synapse,
        livekit=livekit_at if livekit_at is not None else standins.livekit_address,
        plugin_config=plugin_config,
        name=f"envoy-{name}",
        **envoy_options,
    )
    return envoy.start()


def module_envoy(name: str) -> tuple[Any, Any]:
    """The fixtures of a test module that shares one default Envoy: ``envoy`` (module scope)
    and an autouse one printing its log when a test fails. Use as
    ``envoy, _log_on_failure = module_envoy("name")``."""

    @pytest.fixture(scope="module")
    def envoy(synapse: Synapse, standins: Any) -> Iterator[Envoy]:
        proxy = shared_envoy(name, synapse, standins)
        yield proxy
        proxy.stop()

    @pytest.fixture(autouse=True)
    def log_on_failure(envoy: Envoy) -> Iterator[None]:
        with printing_log_on_failure(envoy):
            yield

    return envoy, log_on_failure


@contextmanager
def printing_log_on_failure(envoy: Envoy) -> Iterator[None]:
    """Show the shared Envoy's log excerpt when a test using it fails."""
    try:
        yield
    except BaseException:
        print(f"\n--- {envoy.name}: {envoy.log_path} (excerpt) ---\n{envoy.log_excerpt()}")
        raise


def elapsed(action: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``action`` and return its result with the wall time it took."""
    start = time.monotonic()
    result = action()
    return result, time.monotonic() - start


def poll(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll until ``check`` returns something truthy (exceptions count as not yet)."""
    return wait_until(check, what, timeout)


def still_serving(envoy: Envoy) -> None:
    """Envoy still answers after whatever the test did (no trapped VM, no hung worker)."""
    for _ in range(4):  # more than one request, so that both workers are likely touched
        resp = envoy.get("/healthz", timeout=5)
        assert resp.status_code == 200
