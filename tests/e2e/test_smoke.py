"""Smoke tests of the stack itself: if these fail, the filter tests cannot mean anything."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
import requests

from conftest import requires_standins, requires_wasm
from stack import (
    REPO,
    LIMIT_STATE_TYPE,
    Envoy,
    huge_json,
    join_body,
    jwt_claims,
    livekit_alias,
    livekit_identity,
    stats_delta,
)

EXAMPLE_CONFIG = REPO / "envoy" / "envoy.yaml"


def test_synapse_limit_visible_through_admin_state_api(synapse, new_room):
    """The limit set through the client API is what the filter's admin-API lookup will read."""
    room_id = new_room(limit=3)
    state = synapse.room_state(room_id, LIMIT_STATE_TYPE)
    limits = [ev for ev in state if ev["type"] == LIMIT_STATE_TYPE and ev["state_key"] == ""]
    assert [ev["content"] for ev in limits] == [{"max_users": 3}]
    assert all(ev["type"] == LIMIT_STATE_TYPE for ev in state), "Synapse ignored ?type="


def test_synapse_unknown_room_is_404(synapse):
    resp = synapse.request("GET", "/_synapse/admin/v1/rooms/%21nope%3Atest.local/state")
    assert resp.status_code == 404
    assert resp.json()["errcode"] == "M_NOT_FOUND"


def test_alias_and_identity_match_lk_jwt_service_vectors():
    assert livekit_alias("!roomid:example.com", "slot1234") == "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
    assert (livekit_identity("@alice:example.com", "DEVICE123", "memberABC")
            == "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU")
    assert livekit_identity("@alice:example.com", "DEV") == "@alice:example.com:DEV"


def test_alias_uses_go_escaping():
    """Go's json.Marshal escapes <, > and & and keeps other non-ASCII as UTF-8."""
    expected_input = '["!a\\u003cb\\u003e\\u0026c:é","m.call#ROOM"]'.encode()
    expected = base64.b64encode(hashlib.sha256(expected_input).digest()).rstrip(b"=").decode()
    assert livekit_alias("!a<b>&c:é") == expected


def test_join_body_shapes():
    legacy = join_body("@alice:test.local", "DEV1", "!r")
    assert set(legacy) == {"room", "openid_token", "device_id"}
    # Users of other homeservers get tokens their (stand-in) homeserver vouches for.
    foreign = join_body("@alice:example.org", "DEV1", "!r")
    assert foreign["openid_token"]["access_token"] == "openid:@alice:example.org"
    assert foreign["openid_token"]["matrix_server_name"] == "example.org"
    new = join_body("@alice:test.local", "DEV1", "!r", shape="new", member_id="m1")
    assert set(new) == {"room_id", "slot_id", "openid_token", "member"}
    assert new["member"] == {"id": "m1", "claimed_user_id": "@alice:test.local", "claimed_device_id": "DEV1"}


def test_envoy_without_filter_proxies_to_upstream(start_envoy, fault_server):
    """The generated Envoy configuration routes every path to the lk_jwt cluster."""
    upstream = fault_server("ok", body={"url": "ws://x", "jwt": "a.b.c"})
    envoy = start_envoy(with_filter=False, lk_jwt=upstream, synapse=("127.0.0.1", 1), livekit=("127.0.0.1", 1))
    resp = envoy.post("/sfu/get", {"room": "!r"})
    assert resp.status_code == 200
    assert resp.json() == {"url": "ws://x", "jwt": "a.b.c"}
    assert upstream.requests[-1]["path"] == "/sfu/get"
    assert json.loads(upstream.requests[-1]["body"]) == {"room": "!r"}
    assert envoy.stats()["token_requests"] == 0


@requires_standins
def test_envoy_without_filter_reaches_lk_jwt_standin(start_envoy, standins, synapse, new_room):
    envoy = start_envoy(with_filter=False)
    health = envoy.get("/healthz")
    assert health.status_code == 200
    assert health.content == b""
    room_id = new_room()
    resp = envoy.post("/sfu/get", join_body("@alice:test.local", "DEV1", room_id))
    assert resp.status_code == 200, resp.text
    assert resp.text.endswith("\n")
    claims = jwt_claims(resp.json()["jwt"])
    assert claims["video"]["room"] == livekit_alias(room_id)
    assert claims["sub"] == "@alice:test.local:DEV1"


@requires_standins
def test_standin_join_makes_participant_visible(livekit, start_envoy, new_room):
    envoy = start_envoy(with_filter=False)
    room_id = new_room()
    resp = envoy.post("/get_token", join_body("@bob:test.local", "DEV2", room_id, shape="new", member_id="mb"))
    assert resp.status_code == 200, resp.text
    livekit.connect(resp)
    alias = livekit_alias(room_id, "m.call#ROOM")
    identities = [p["identity"] for p in livekit.list_participants(alias)]
    assert identities == [livekit_identity("@bob:test.local", "DEV2", "mb")]


def _host_env_keys(node) -> set[str]:
    """Every name listed under ``host_env_keys`` anywhere in a parsed configuration."""
    if isinstance(node, dict):
        found = set(node.get("host_env_keys") or [])
        for value in node.values():
            found |= _host_env_keys(value)
        return found
    if isinstance(node, list):
        return set().union(*(_host_env_keys(item) for item in node)) if node else set()
    return set()


def test_example_envoy_config_validates():
    """Validation runs the plugin's on_configure, so the example's secrets must be in the environment."""
    if not EXAMPLE_CONFIG.exists():
        pytest.skip(f"{EXAMPLE_CONFIG} not written yet")
    yaml = pytest.importorskip("yaml")
    keys = _host_env_keys(yaml.safe_load(EXAMPLE_CONFIG.read_text()))
    ok, output = Envoy.validate(EXAMPLE_CONFIG, env={key: f"example-{key.lower()}" for key in keys}, cwd=REPO)
    assert ok, output


@requires_wasm
def test_filter_loads_and_defines_counters(start_envoy, fault_server):
    upstream = fault_server("ok", body={})
    envoy = start_envoy(lk_jwt=upstream, livekit=("127.0.0.1", 1))
    resp = envoy.get("/healthz")
    assert resp.status_code == 200
    assert "voice_limit_guard_token_requests" in envoy.prometheus()


@requires_wasm
def test_bad_plugin_configuration_is_refused(start_envoy, plugin_config):
    """A plugin whose on_configure fails makes Envoy exit at start-up, naming the offending key."""
    log = start_envoy(plugin_config(unknown_key=1), lk_jwt=("127.0.0.1", 1), livekit=("127.0.0.1", 1),
                      expect_rejection=True)
    assert "Unable to create Wasm plugin voice_limit_guard" in log
    assert "unknown_key" in log


class TestFaultServer:
    """The fault server itself must do what each mode promises, or fault tests prove nothing."""

    def test_ok_and_status(self, fault_server):
        server = fault_server("ok", body={"state": []})
        assert requests.get(server.url + "/x", timeout=5).json() == {"state": []}
        server.mode, server.status, server.body = "status", 502, {}
        resp = requests.get(server.url + "/x", timeout=5)
        assert resp.status_code == 502 and resp.json()["errcode"] == "M_UNKNOWN"
        assert server.hits == 2

    def test_refused_then_back(self, fault_server):
        server = fault_server("refused")
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url, timeout=5)
        server.mode = "ok"
        assert requests.get(server.url, timeout=5).status_code == 200

    def test_reset_mid_answer(self, fault_server):
        server = fault_server("reset", body={"state": [{"type": "m.room.create"}] * 50})
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(server.url, timeout=5)

    def test_slow(self, fault_server):
        server = fault_server("slow", delay=0.5)
        start = time.monotonic()
        assert requests.get(server.url, timeout=5).status_code == 200
        assert time.monotonic() - start >= 0.5

    def test_garbage_truncated_huge(self, fault_server):
        server = fault_server("garbage")
        with pytest.raises(ValueError):
            requests.get(server.url, timeout=5).json()
        server.mode, server.body = "truncated", {"participants": [{"identity": "@a:b:C"}]}
        with pytest.raises(ValueError):
            requests.get(server.url, timeout=5).json()
        server.mode, server.huge_size = "huge", 1 << 20
        body = requests.get(server.url, timeout=10).content
        assert len(body) >= 1 << 20
        parsed = json.loads(body)
        assert parsed["state"][-1]["content"] == {"max_users": 1}


def test_huge_json_is_valid_and_sized():
    data = huge_json(64 * 1024)
    assert 64 * 1024 <= len(data) < 66 * 1024
    assert len(json.loads(data)["participants"]) > 100


def test_fault_server_through_envoy(start_envoy, fault_server):
    """Envoy's view of each fault: what the filter's dispatch_http_call will see on its upstreams."""
    server = fault_server("refused")
    envoy = start_envoy(with_filter=False, lk_jwt=server, synapse=("127.0.0.1", 1), livekit=("127.0.0.1", 1))
    assert envoy.post("/x", {}).status_code == 503
    server.mode = "reset"
    # Envoy has already forwarded the 200 headers when the reset comes, so the client sees a broken body.
    with pytest.raises(requests.exceptions.RequestException):
        envoy.post("/x", {}).content
    server.mode = "ok"
    assert envoy.post("/x", {}).status_code == 200


@requires_wasm
@requires_standins
@pytest.mark.parametrize("path, shape", [("/sfu/get", "legacy"), ("/get_token", "new")])
def test_limit_of_two_walkthrough(livekit, start_envoy, new_room, path, shape):
    """The whole stack wired together: the third distinct user is refused, a second device is not."""
    envoy = start_envoy()
    room_id = new_room(limit=2)
    before = envoy.stats()

    def join(user: str, device: str) -> requests.Response:
        return envoy.post(path, join_body(user, device, room_id, shape=shape, member_id=f"m-{device}"))

    for user, device in (("@alice:test.local", "A1"), ("@bob:test.local", "B1")):
        resp = join(user, device)
        assert resp.status_code == 200, resp.text
        livekit.connect(resp)

    refused = join("@carol:test.local", "C1")
    assert refused.status_code == 403
    assert refused.json() == {"errcode": "M_FORBIDDEN", "error": "This voice channel is full."}
    assert refused.headers["Access-Control-Allow-Origin"] == "*"

    second_device = join("@alice:test.local", "A2")
    # On /get_token identities are hashed: the filter knows whose they are from the tokens it let through.
    assert second_device.status_code == 200, second_device.text

    delta = stats_delta(before, envoy.stats())
    assert delta["token_requests"] == 4
    assert delta["synapse_lookups"] == 1
    assert delta["blocked"] == 1
