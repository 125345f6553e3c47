"""The harness's MatrixRTC token route through Synapse, without the guard.

Current MatrixRTC clients ask their homeserver for a LiveKit token
(``POST /_matrix/client/{v1,unstable/io.element.msc4195}/rtc/livekit/get_token``); Synapse
authenticates them and forwards the request to lk-jwt-service, registered as its application
service, at ``synapse.proxy_url``. Here an Envoy WITHOUT the filter listens there in front of
the lk-jwt-service stand-in, so these tests check the harness and the stand-in: what Synapse
forwards, what the stand-in answers and does (``/stats``), and that a real LiveKit client joins
with the token.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, NamedTuple

import pytest

from conftest import requires_standins
from stack import (
    LEGACY_SLOT,
    RTC_CLIENT_TOKEN_PATHS,
    RTC_FEDERATION_TOKEN_PATHS,
    http,
    jwt_claims,
    livekit_alias,
    rtc_identity,
    wait_until,
)

pytestmark = requires_standins

DELAYED_LEAVE_PATH = "/_matrix/client/v1/rtc/livekit/delegate_delayed_leave"


class User(NamedTuple):
    id: str
    token: str


@pytest.fixture(scope="module")
def users(synapse: Any) -> dict[str, User]:
    """Two users of the session's Synapse with their own access tokens."""
    made = {}
    for name in ("alice", "bob"):
        localpart, password = f"rtc-{name}", secrets.token_hex(8)
        made[name] = User(synapse.register_user(localpart, password), synapse.login(localpart, password))
    return made


@pytest.fixture
def call_room(synapse: Any, users: dict[str, User]) -> str:
    """A room alice created (so she is joined to it) and bob is not in."""
    return synapse.create_room(token=users["alice"].token)


@pytest.fixture
def proxy(start_envoy: Any, synapse: Any) -> Any:
    """Envoy without the filter at Synapse's proxy URL, in front of the session's stand-in."""
    return start_envoy(with_filter=False, listen_port=synapse.proxy_port)


def counted(stats: dict) -> dict[str, int]:
    """The stand-in's counters flattened to ``"issued.client": N``."""
    return {f"{group}.{route}": n for group, routes in stats.items() for route, n in routes.items()}


def changes(before: dict, after: dict) -> dict[str, int]:
    """Counters of the stand-in that changed between two ``/stats`` readings."""
    old, new = counted(before), counted(after)
    return {k: new[k] - old.get(k, 0) for k in sorted(new) if new[k] != old.get(k, 0)}


def federation_body(user_id: str, room_id: str, livekit_url: str, member_id: str = "fed-member") -> dict:
    return {"user_id": user_id, "url": livekit_url, "room_id": room_id, "slot_id": LEGACY_SLOT,
            "member_id": member_id}


def as_synapse_forwards(synapse: Any, origin: str | None = None, **headers: str) -> dict[str, str]:
    """The headers Synapse adds when it forwards a request to the application service
    (``origin``: the ``X-Matrix-Origin`` of a federation request)."""
    headers = {"Authorization": f"Bearer {synapse.appservice.hs_token}", **headers}
    if origin is not None:
        headers["X-Matrix-Origin"] = origin
    return headers


@pytest.mark.parametrize("path", ["stable", "unstable"])
def test_joined_user_gets_a_token_and_joins_livekit(path, synapse, users, call_room, proxy, livekit,
                                                   real_lk_jwt):
    """Synapse forwards the request through Envoy to the stand-in, which checks the membership,
    creates the LiveKit room and answers ``{"jwt"}``; a real client joins with it."""
    alice, member = users["alice"], f"member-{path}"
    alias, identity = livekit_alias(call_room, LEGACY_SLOT), rtc_identity(alice.id, member)
    before = real_lk_jwt.stats()

    resp = synapse.rtc_token(alice.token, call_room, member, livekit.livekit_ws_url, path=path)

    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    assert set(resp.json()) == {"jwt"}
    claims = jwt_claims(resp.json()["jwt"])
    assert claims["sub"] == identity
    assert claims["video"]["room"] == alias
    assert claims["video"]["roomJoin"] is True
    assert claims["video"]["canPublish"] is True and claims["video"]["canSubscribe"] is True
    assert abs(claims["exp"] - time.time() - 3600) < 60
    assert changes(before, real_lk_jwt.stats()) == {
        "requests.client": 1, "issued.client": 1, "create_room.client": 1}
    # Envoy at the proxy URL carried it, on the path the client used.
    wait_until(lambda: RTC_CLIENT_TOKEN_PATHS[path] in proxy.access_log_path.read_text(),
               "Envoy's access log to show the forwarded request", 5)
    # CreateRoom made the room before anyone joined: LiveKit lists it, empty.
    assert livekit.list_participants(alias) == []

    livekit.connect(resp.json()["jwt"])
    wait_until(lambda: livekit.livekit.states(alias) == {identity: "ACTIVE"},
               f"LiveKit to list {identity} ACTIVE", 10)
    livekit.leave(alias, identity)


def test_user_not_joined_is_refused(synapse, users, call_room, proxy, standins, real_lk_jwt):
    before = real_lk_jwt.stats()
    resp = synapse.rtc_token(users["bob"].token, call_room, "bob-member", standins.livekit_ws_url)
    assert resp.status_code == 403, resp.text
    assert resp.json()["errcode"] == "M_FORBIDDEN"
    assert changes(before, real_lk_jwt.stats()) == {"requests.client": 1}


def test_joining_the_room_is_what_counts(synapse, users, proxy, standins):
    """bob joins a public room and then gets a token for it."""
    room = synapse.create_room(token=users["alice"].token, preset="public_chat")
    bob = users["bob"]
    assert synapse.rtc_token(bob.token, room, "m", standins.livekit_ws_url).status_code == 403
    synapse.join_room(room, bob.token)
    resp = synapse.rtc_token(bob.token, room, "m", standins.livekit_ws_url)
    assert resp.status_code == 200, resp.text
    assert jwt_claims(resp.json()["jwt"])["sub"] == rtc_identity(bob.id, "m")


@pytest.mark.parametrize("change, status, errcode", [
    ({"url": "ws://127.0.0.1:1"}, 400, "M_INVALID_PARAM"),
    ({"member_id": ""}, 400, "M_BAD_JSON"),
    ({"server_name": "example.org"}, 502, "M_UNKNOWN"),
], ids=["other-livekit-url", "no-member-id", "other-server"])
def test_refusals_reach_the_client_unchanged(change, status, errcode, synapse, users, call_room, proxy,
                                             standins, real_lk_jwt):
    before = real_lk_jwt.stats()
    body = {"room_id": call_room, "slot_id": LEGACY_SLOT, "member_id": "m",
            "url": standins.livekit_ws_url, **change}
    resp = synapse.rtc_token(users["alice"].token, call_room, "m", "", body=body)
    assert (resp.status_code, resp.json()["errcode"]) == (status, errcode), resp.text
    assert changes(before, real_lk_jwt.stats()) == {"requests.client": 1}


def test_our_server_name_is_a_local_token(synapse, users, call_room, proxy, standins):
    resp = synapse.rtc_token(users["alice"].token, call_room, "m", standins.livekit_ws_url,
                             server_name=synapse.server_name)
    assert resp.status_code == 200, resp.text


def test_a_body_that_is_not_json_is_refused(synapse, users, proxy):
    resp = synapse.request("POST", RTC_CLIENT_TOKEN_PATHS["stable"], users["alice"].token,
                           data=b"not json", headers={"Content-Type": "application/json"})
    assert (resp.status_code, resp.json()["errcode"]) == (400, "M_NOT_JSON"), resp.text


def test_delegate_delayed_leave_is_acknowledged(synapse, users, call_room, proxy):
    resp = synapse.request("POST", DELAYED_LEAVE_PATH, users["alice"].token, json={"room_id": call_room})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {}


@pytest.mark.parametrize("path", [RTC_CLIENT_TOKEN_PATHS["stable"], RTC_CLIENT_TOKEN_PATHS["unstable"],
                                  RTC_FEDERATION_TOKEN_PATHS["stable"], RTC_FEDERATION_TOKEN_PATHS["unstable"],
                                  DELAYED_LEAVE_PATH, "/_matrix/app/v1/ping"])
def test_the_proxied_paths_want_the_hs_token(path, synapse, users, call_room, proxy, standins):
    """Straight to Envoy, past Synapse: without Synapse's hs_token nothing is served, whatever
    identity headers the caller sets, and a user's own access token is no hs_token."""
    body = {"room_id": call_room, "slot_id": LEGACY_SLOT, "member_id": "m", "url": standins.livekit_ws_url,
            "user_id": users["alice"].id}
    claims = {"X-Matrix-User-Identifier": users["alice"].id, "X-Matrix-Origin": synapse.server_name}
    for authorization, errcode in ((None, "M_MISSING_TOKEN"), ("Bearer wrong", "M_UNKNOWN_TOKEN"),
                                   (f"Bearer {users['alice'].token}", "M_UNKNOWN_TOKEN"),
                                   (f"Bearer {synapse.appservice.as_token}", "M_UNKNOWN_TOKEN")):
        headers = dict(claims, **({"Authorization": authorization} if authorization else {}))
        resp = proxy.post(path, body, headers=headers)
        assert (resp.status_code, resp.json()["errcode"]) == (401, errcode), (authorization, resp.text)
    resp = proxy.post(path, body, headers=as_synapse_forwards(synapse, **claims))
    assert resp.status_code == 200, resp.text


def test_client_route_wants_the_user_header(synapse, call_room, proxy, standins):
    body = {"room_id": call_room, "slot_id": LEGACY_SLOT, "member_id": "m", "url": standins.livekit_ws_url}
    resp = proxy.post(RTC_CLIENT_TOKEN_PATHS["stable"], body, headers=as_synapse_forwards(synapse))
    assert (resp.status_code, resp.json()["errcode"]) == (400, "M_MISSING_PARAM"), resp.text


@pytest.mark.parametrize("path", ["stable", "unstable"])
def test_federation_requests_as_synapse_forwards_them(path, synapse, users, call_room, proxy, standins,
                                                      real_lk_jwt):
    """Requests shaped as Synapse forwards another homeserver's (hs_token, X-Matrix-Origin),
    sent to Envoy directly: a remote user cannot really be joined to a room here, so the token
    itself is shown with a joined user of the origin ``test.local``."""
    url, route = standins.livekit_ws_url, RTC_FEDERATION_TOKEN_PATHS[path]
    remote = federation_body("@x:example.org", call_room, url)
    before = real_lk_jwt.stats()

    # No origin: Synapse always names the server that signed the request.
    resp = proxy.post(route, remote, headers=as_synapse_forwards(synapse))
    assert (resp.status_code, resp.json()["errcode"]) == (401, "M_UNAUTHORIZED"), resp.text
    # A server asks for another server's user.
    resp = proxy.post(route, remote, headers=as_synapse_forwards(synapse, "evil.example"))
    assert (resp.status_code, resp.json()["errcode"]) == (403, "M_FORBIDDEN"), resp.text
    # Its own user, who is not in the room.
    resp = proxy.post(route, remote, headers=as_synapse_forwards(synapse, "example.org"))
    assert (resp.status_code, resp.json()["errcode"]) == (403, "M_FORBIDDEN"), resp.text
    assert "not joined" in resp.json()["error"]
    # A room our server is not in.
    resp = proxy.post(route, federation_body("@x:example.org", "!nowhere:example.org", url),
                      headers=as_synapse_forwards(synapse, "example.org"))
    assert (resp.status_code, resp.json()["errcode"]) == (403, "M_FORBIDDEN"), resp.text
    # A room id Synapse refuses to look up (400 from is_joined): the check failed.
    resp = proxy.post(route, federation_body("@x:example.org", "!nowhere", url),
                      headers=as_synapse_forwards(synapse, "example.org"))
    assert (resp.status_code, resp.json()["errcode"]) == (502, "M_UNKNOWN"), resp.text
    # A joined user of the origin: a subscribe-only token.
    alice = users["alice"]
    resp = proxy.post(route, federation_body(alice.id, call_room, url, "fed-m"),
                      headers=as_synapse_forwards(synapse, synapse.server_name))
    assert resp.status_code == 200, resp.text
    assert set(resp.json()) == {"jwt"}
    claims = jwt_claims(resp.json()["jwt"])
    assert claims["sub"] == rtc_identity(alice.id, "fed-m")
    assert claims["video"]["room"] == livekit_alias(call_room, LEGACY_SLOT)
    assert claims["video"].get("canPublish", False) is False
    assert claims["video"]["canSubscribe"] is True
    assert changes(before, real_lk_jwt.stats()) == {
        "requests.federation": 6, "issued.federation": 1, "create_room.federation": 1}


def test_what_synapse_forwards_to_the_proxy_url(synapse, users, call_room, fault_server):
    """A recording server at the proxy URL shows the request as Synapse forwards it: the same
    path, the query without ``access_token``, the hs_token, Synapse's user header in place of
    the client's, none of the client's other headers, and the answer relayed as it came."""
    recorder = fault_server("ok", body={"jwt": "a.b.c"}, port=synapse.proxy_port)
    alice = users["alice"]
    body = {"room_id": call_room, "slot_id": LEGACY_SLOT, "member_id": "m", "url": "ws://x"}
    resp = http().post(
        f"{synapse.base_url}{RTC_CLIENT_TOKEN_PATHS['unstable']}?access_token={alice.token}&x=1",
        data=json.dumps(body), timeout=30,
        headers={"Content-Type": "application/json", "X-Matrix-User-Identifier": users["bob"].id,
                 "X-Forwarded-For": "203.0.113.9", "Cookie": "c=1"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"jwt": "a.b.c"}
    [seen] = recorder.requests
    assert (seen["method"], seen["path"]) == ("POST", f"{RTC_CLIENT_TOKEN_PATHS['unstable']}?x=1")
    headers = seen["headers"]
    assert headers["authorization"] == f"Bearer {synapse.appservice.hs_token}"
    assert headers["x-matrix-user-identifier"] == alice.id
    assert headers["content-type"] == "application/json"
    assert not {"x-forwarded-for", "cookie"} & set(headers)
    assert alice.token not in json.dumps(headers)
    assert json.loads(seen["body"]) == body


def test_stand_in_stats_shape(real_lk_jwt):
    stats = real_lk_jwt.stats()
    assert set(stats) == {"requests", "issued", "create_room", "create_room_failed", "webhooks"}
    assert set(stats["webhooks"]) == {"accepted", "refused"}
    assert set(stats["issued"]) >= {"client", "federation", "legacy"}
    assert set(stats["create_room"]) >= {"client", "federation"}
